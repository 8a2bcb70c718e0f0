"""Batched reward scoring and pair selection: score the k candidates of each pool against its prompt and pick
the win/lose pair, its validity and the continuation index in one pass. The PyTorch reference (the
specification, which takes the uniform draws u explicitly), the Triton kernel (one program per pool; u given, or
drawn in-kernel with Philox), and the public ``score_and_select`` that dispatches between them.

Formula, per pool b (rows j = 0 .. k-1 of img are img[b * k + j]; ``spo_fast.diffusion.rollout.select_pairs``'s rules)::

    f_j     = img_j / max(||img_j||_2, 1e-12)             (F.normalize; fp32 accumulation)
    s[b, j] = logit_scale * <f_j, txt_b>                  (txt is already L2-normalised, as the SPM returns it)
    win     = argmax_j s[b, j],  lose = argmin_j s[b, j]  (first index on ties, like torch.argmax/argmin)
    valid   = tanh((s[b, win] - s[b, lose]) / 2) > threshold
    cont    = min(floor(u_b * k), k - 1),  u_b uniform in [0, 1)

Shapes: img (B * k, D) un-normalised image features, pool-major (pool b owns rows b*k .. b*k+k-1); txt (B, D);
u (B,) when given. Outputs (``PairSelection``): scores (B, k) fp32, win (B,) int64, lose (B,) int64,
valid (B,) bool, cont (B,) int64. logit_scale is a Python float (already exp'ed; a 0-d tensor is read with
float()).

Dtype policy: img and txt each fp32, fp16 or bf16 (they may differ); the kernel reads them in that dtype and
does every sum and every product in fp32. u any float dtype, upcast to fp32.

Continuation draws: with ``u`` given both backends compute cont = min(floor(u * k), k - 1) from it (they agree
exactly). Without ``u`` the Triton kernel draws u_b = ``tl.rand(seed, offset + b)`` (Triton's Philox), seed and
offset read from an int64 RNG state in device memory (``spo_fast.kernels.philox``); ``philox_uniform(seed,
offset, n)`` reproduces those draws, and the torch backend draws the same numbers bit for bit with tensor
arithmetic (``philox_uniform_torch``), so the two backends agree. A caller that selects several times passes one
RNG state tensor (advanced in place by B per call) or advances offset by B per call.

Validity in the kernel: Triton has no portable tanh (libdevice does not run under the interpreter), so the kernel
evaluates tanh(y), y = (s_win - s_lose) / 2 >= 0, as an odd Taylor polynomial to y^9 for y < 0.125 and as
(1 - e^{-2y}) / (1 + e^{-2y}) above (a few fp32 ulps). valid therefore equals torch.tanh's on the same scores
except when tanh(y) lies within a few ulps of threshold.

Limits: 1 <= k <= 64 on the Triton path (``auto`` runs larger pools on the torch path; ``triton`` is an error),
D >= 1; 0 <= seed < 2^63, offset >= 0 and offset + B < 2^63. NaN scores (NaN or inf
features) give unspecified win/lose/valid (torch.argmax would return the NaN's index). Each row of img and txt
must have unit stride along D (anything else is copied by .contiguous() first). All tensors on one device.
Block sizes untuned (no GPU measured yet).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._dispatch import ENV_VAR, describe, on_device, resolve_backend
from .philox import philox_uniform_torch, resolve_state

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_K = 64  # BLOCK_K x BLOCK_D = _TILE on 4 warps: k up to 64 (official pools: 4 and 2); at k > 512 it spilled
_TILE = 4096  # elements of img one program holds per step of its loop over D (BLOCK_K * BLOCK_D)
_NORM_EPS = 1e-12  # F.normalize's default


@dataclass
class PairSelection:
    scores: torch.Tensor  # (B, k) fp32
    win: torch.Tensor  # (B,) int64
    lose: torch.Tensor  # (B,) int64
    valid: torch.Tensor  # (B,) bool
    cont: torch.Tensor  # (B,) int64


# ----------------------------------------------------------------------------- reference (the specification)
def _check_shapes(img: torch.Tensor, txt: torch.Tensor, k: int, u: torch.Tensor | None) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k is {k!r}; expected an int >= 1 (candidates per pool)")
    if txt.dim() != 2:
        raise ValueError(f"txt has shape {tuple(txt.shape)}; expected (B, D)")
    b, d = txt.shape
    if tuple(img.shape) != (b * k, d):
        raise ValueError(f"img has shape {tuple(img.shape)}; expected (B * k, D) = ({b * k}, {d}) for "
                         f"txt {tuple(txt.shape)} and k={k}")
    for name, t in (("img", img), ("txt", txt)):
        if not t.is_floating_point():
            raise TypeError(f"{name} is {t.dtype}; expected a floating dtype")
    if u is not None:
        if tuple(u.shape) != (b,):
            raise ValueError(f"u has shape {tuple(u.shape)}; expected ({b},)")
        if not u.is_floating_point():
            raise TypeError(f"u is {u.dtype}; expected a floating dtype (uniform draws in [0, 1))")


def select_from_scores(scores: torch.Tensor, threshold: float, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(win, lose, valid, cont) from (B, k) scores and (B,) uniforms: ``select_pairs`` with cont from u."""
    k = scores.shape[1]
    win, lose = scores.argmax(1), scores.argmin(1)
    rows = torch.arange(scores.shape[0], device=scores.device)
    valid = torch.tanh((scores[rows, win] - scores[rows, lose]) / 2) > threshold
    cont = (u.float() * k).floor().long().clamp(0, k - 1)
    return win, lose, valid, cont


def score_and_select_reference(img: torch.Tensor, txt: torch.Tensor, logit_scale: float, k: int,
                               threshold: float, u: torch.Tensor) -> PairSelection:
    """The op in plain PyTorch, fp32 math, with the uniform draws given: u (B,)."""
    _check_shapes(img, txt, k, u)
    b, d = txt.shape
    feats = F.normalize(img.float(), dim=-1, eps=_NORM_EPS).view(b, k, d)
    scores = float(logit_scale) * torch.einsum("bkd,bd->bk", feats, txt.float())
    return PairSelection(scores, *select_from_scores(scores, threshold, u))


# ----------------------------------------------------------------------------- Triton kernels
# triton.language, bound by _kernels() on first use (see spo_loss.py: the interpreter looks it up in the
# kernels' module globals, so it is a global here).
tl = None


def _score_select_kernel(img_ptr, txt_ptr, u_ptr, scores_ptr, win_ptr, lose_ptr, valid_ptr, cont_ptr,
                         rng_ptr, D, K, img_sr, txt_sr, logit_scale, threshold,
                         HAS_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # scores contiguous (B, K) fp32; win, lose, cont (B,) int64; valid (B,) int8
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_K)
    row_mask = rows < K
    row_ptr = img_ptr + (b * K + rows.to(tl.int64))[:, None] * img_sr
    txt_row = txt_ptr + b * txt_sr
    dot = tl.zeros([BLOCK_K], dtype=tl.float32)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        x = tl.load(row_ptr + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        t = tl.load(txt_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        dot += tl.sum(x * t[None, :], axis=1)
        sq += tl.sum(x * x, axis=1)
    s = logit_scale * (dot / tl.maximum(tl.sqrt(sq), 1e-12))
    tl.store(scores_ptr + b * K + rows, s, mask=row_mask)
    s_hi = tl.where(row_mask, s, float("-inf"))
    s_lo = tl.where(row_mask, s, float("inf"))
    win = tl.argmax(s_hi, axis=0, tie_break_left=True)
    lose = tl.argmin(s_lo, axis=0, tie_break_left=True)
    y = (tl.max(s_hi, axis=0) - tl.min(s_lo, axis=0)) * 0.5  # >= 0
    y2 = y * y
    th_small = y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0)))))
    e = tl.exp(-2.0 * y)
    th = tl.where(y < 0.125, th_small, (1.0 - e) / (1.0 + e))
    if HAS_U:
        u = tl.load(u_ptr + b).to(tl.float32)
    else:  # the RNG state [seed, offset] (int64), read on the device
        u = tl.rand(tl.load(rng_ptr), tl.load(rng_ptr + 1) + b)
    cont = tl.minimum(tl.maximum(tl.floor(u * K), 0.0), K - 1.0)
    tl.store(win_ptr + b, win.to(tl.int64))
    tl.store(lose_ptr + b, lose.to(tl.int64))
    tl.store(valid_ptr + b, (th > threshold).to(tl.int8))
    tl.store(cont_ptr + b, cont.to(tl.int64))


def _philox_uniform_kernel(u_ptr, rng_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(u_ptr + offs, tl.rand(tl.load(rng_ptr), tl.load(rng_ptr + 1) + offs), mask=offs < n)


_KERNELS: dict[bool, tuple] = {}


def _kernels() -> tuple:
    """(score_select, philox_uniform) jitted on first use, one pair per setting of TRITON_INTERPRET."""
    global tl
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret not in _KERNELS:
        import triton
        import triton.language as tl

        _KERNELS[interpret] = (triton.jit(_score_select_kernel), triton.jit(_philox_uniform_kernel))
    return _KERNELS[interpret]


def _blocks(k: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D) for k candidates: BLOCK_K the next power of two >= k (at least 2) and BLOCK_D =
    _TILE // BLOCK_K whatever D is (the loop over D masks its tail), so the variants are the six BLOCK_K choices,
    every one compiled ahead of time for sm_80/sm_90 in CI (tests/test_kernels_aot.py)."""
    block_k = max(2, 1 << (k - 1).bit_length())
    return block_k, _TILE // block_k


def _check_kernel_inputs(img: torch.Tensor, txt: torch.Tensor, k: int, u: torch.Tensor | None) -> None:
    """What the Triton path needs beyond the shapes; TypeError on dtypes, ValueError on devices and sizes."""
    for name, t in (("img", img), ("txt", txt)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{describe(name, t)}: the Triton pair selection reads float32, float16 or bfloat16; "
                            f"cast it, or use backend='torch' (SPO_FAST_KERNELS=torch)")
    for name, t in (("txt", txt), ("u", u)):
        if t is not None and t.device != img.device:
            raise ValueError(f"{describe(name, t)} is not on img's device {img.device}; move all inputs to one "
                             f"device")
    if k > _MAX_K:
        raise ValueError(f"k is {k}; the Triton pair selection takes at most {_MAX_K} candidates per pool")
    if txt.shape[1] == 0:
        raise ValueError(f"{describe('txt', txt)} has no features (D = 0)")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def philox_uniform(seed: int, offset: int, n: int, device="cpu") -> torch.Tensor:
    """(n,) fp32 holding ``tl.rand(seed, offset + i)``: exactly the u the Triton kernel draws for (seed, offset)
    when ``u`` is not given (n = B). Runs a Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1);
    ``spo_fast.kernels.philox.philox_uniform_torch`` is the same stream in PyTorch (bit for bit)."""
    u = torch.empty(n, dtype=torch.float32, device=device)
    state, _ = resolve_state(seed, offset, n, u)
    if n > 0:
        _, kernel = _kernels()
        block = 1024
        with on_device(u):
            kernel[(-(-n // block),)](u, state, n, BLOCK=block)
    return u


def _score_and_select_triton(img: torch.Tensor, txt: torch.Tensor, logit_scale: float, k: int, threshold: float,
                             u: torch.Tensor | None, state: torch.Tensor | None) -> PairSelection:
    """The launcher: validates, then runs one program per pool."""
    _check_kernel_inputs(img, txt, k, u)
    b, d = txt.shape
    dev = img.device
    scores = torch.empty(b, k, dtype=torch.float32, device=dev)
    win = torch.empty(b, dtype=torch.int64, device=dev)
    lose = torch.empty(b, dtype=torch.int64, device=dev)
    valid = torch.empty(b, dtype=torch.bool, device=dev)  # the kernel stores 0/1 bytes through an int8 view
    cont = torch.empty(b, dtype=torch.int64, device=dev)
    if b > 0:
        kernel, _ = _kernels()
        # txt (B, D) and u (B,) are small: read as fp32 (one kernel variant per img dtype, not per combination)
        img_r, txt_r = _rows(img), txt.float().contiguous()
        u_r = u.float().contiguous() if u is not None else scores  # a dummy pointer when HAS_U is off
        rng = state if state is not None else win  # a dummy int64 pointer when HAS_U is on
        block_k, block_d = _blocks(k)
        with on_device(img_r):
            kernel[(b,)](img_r, txt_r, u_r, scores, win, lose, valid.view(torch.int8), cont, rng, d, k,
                         img_r.stride(0), txt_r.stride(0), float(logit_scale), float(threshold),
                         HAS_U=u is not None, BLOCK_K=block_k, BLOCK_D=block_d)
    return PairSelection(scores, win, lose, valid, cont)


def score_and_select(img: torch.Tensor, txt: torch.Tensor, logit_scale: float, k: int, threshold: float,
                     u: torch.Tensor | None = None, seed: int | torch.Tensor = 0, offset: int = 0, *,
                     backend: str | None = None) -> PairSelection:
    """Score the k candidates of each pool against its prompt and select the pair (see the module docstring).

    ``u`` (B,) uniforms in [0, 1) fix the continuation indices; without it they are drawn from ``seed``: an int
    (with ``offset``) or an RNG state tensor (2,) int64 [seed, offset] on img's device, advanced in place by B
    draws (``spo_fast.kernels.philox``). Both backends draw Triton's Philox stream (bit for bit) and agree.
    ``backend``: ``torch`` | ``triton`` | ``auto`` | None (None: SPO_FAST_KERNELS, else auto).
    Raises ValueError on inconsistent shapes, k < 1, bad seed/offset/state or backend; on the Triton path also
    TypeError on unsupported dtypes and ValueError on mixed devices or k > 64; RuntimeError if Triton cannot
    run here.
    """
    _check_shapes(img, txt, k, u)
    img, txt = img.detach(), txt.detach()
    b = txt.shape[0]
    state, advance = resolve_state(seed, offset, b, img) if u is None else (None, False)
    tensors = (img, txt) if u is None else (img, txt, u)
    choice = resolve_backend(backend, tensors)
    if choice == "triton" and k > _MAX_K and (backend or os.environ.get(ENV_VAR, "auto")) == "auto":
        choice = "torch"  # auto: pools beyond the kernel's 64 candidates run the reference
    if choice == "triton":
        out = _score_and_select_triton(img, txt, logit_scale, k, threshold, u, state)
    else:
        if u is None:
            u = philox_uniform_torch(state[0], state[1], (b,))
        out = score_and_select_reference(img, txt, logit_scale, k, threshold, u)
    if advance:
        state[1:].add_(b)
    return out
