"""Pooled candidate denoising step: one guided DDIM step from x_t that draws k candidates x_{t-1} per sample
(SPO's candidate pool) together with their Gaussian log-densities. The PyTorch reference (the specification,
which takes the noise z explicitly), the fused Triton kernel (noise drawn in-kernel with Philox), and the public
``pooled_ddim_step`` / ``ddim_step`` that dispatch between them.

Formula, per sample b (a_t = alpha_t[b], a_p = alpha_prev[b]: alphas_cumprod at t and at the previous timestep,
as ``DDIMSchedule.alpha`` gives them; the math is ``spo_fast.diffusion.sampling``'s)::

    o      = out_u + g * (out_c - out_u)          model_out = [uncond; cond] (cfg_model_output's order)
    epsilon:       eps = o,                               x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    v_prediction:  eps = sqrt(a_t) * o + sqrt(1 - a_t) * x_t,  x0 = sqrt(a_t) * x_t - sqrt(1 - a_t) * o
    var    = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    std    = eta * sqrt(max(var, 0))
    mean   = sqrt(a_p) * x0 + sqrt(max(1 - a_p - std^2, 0)) * eps
    x_prev[b, j] = round_to_dtype(mean + std * z[b, j]),   z ~ N(0, I), j = 0 .. k-1
    log_prob[b, j] = mean_CHW( -(x_prev[b, j] - mean)^2 / (2 std^2) - log std - log(2 pi) / 2 )

log_prob is ``spo_fast.diffusion.sampling.ddim_log_prob`` of the stored (dtype-rounded) candidate under the fp32 mean,
constants included (std = 0, i.e. eta = 0, gives NaN there as in ddim_log_prob).

Shapes: x_t (B, C, H, W) (any trailing dims: everything after B is "CHW"); model_out (2B, C, H, W) laid out as
[uncond; cond]; alpha_t, alpha_prev (B,). Outputs (``PooledStep``): x0 (B, C, H, W) fp32, mean (B, C, H, W) in
the input dtype, std (B,) fp32, x_prev (B, k, C, H, W) in the input dtype, log_prob (B, k) fp32.

Dtype policy: x_t and model_out in fp32, fp16 or bf16, both the same; the kernel reads them in that dtype and
does all math in fp32 (CFG included); alpha_t/alpha_prev any float dtype, upcast to fp32. The per-sample
coefficients (sqrt a_t, sqrt(1 - a_t), sqrt a_p, the eps coefficient, std) are computed inside the kernel from
alpha_t/alpha_prev with ``step_coefficients``' operation order and IEEE-rounded division and square root
(``tl.div_rn``, ``tl.sqrt_rn``), so std equals the reference's bit for bit (tested).

Noise: the Triton kernel draws z[b, j, e] = ``tl.randn(seed, offset + (b * k + j) * CHW + e)`` (Triton's
Philox, int64 counters): nothing of size (B, k, C, H, W) is materialised besides the candidates. seed and
offset are read by the kernel from an int64 RNG state [seed, offset] in device memory (``spo_fast.kernels.philox``;
ints given by the caller are put in a temporary one), so a captured CUDA graph replays with new noise when the
state advances. ``philox_normal(seed, offset, shape, device)`` reproduces those draws (same Triton RNG) so the
kernel can be checked exactly against the reference. The torch backend draws the same stream with tensor
arithmetic (``torch_normal``, ``spo_fast.kernels.philox.philox_normal_torch``: no Generator, no host read), so
the two backends draw the same noise for one (seed, offset) up to float rounding of the Box-Muller transform.
A caller that steps several times passes one RNG state tensor (advanced in place by B * k * CHW per step), or
advances offset by that much per step itself, so steps do not reuse counters.

The Triton path (``backend`` / ``SPO_FAST_KERNELS`` / ``auto``: see ``_dispatch.py``): grid (B, n_chunks);
program (b, c) reads chunk c (BLOCK * BLOCKS_PER_PROGRAM elements) of x_t and both CFG halves once, writes x0
and mean, then for each of the k candidates draws z, writes x_prev and the fp32 sum over each block of
(x_prev - mean)^2 to partial[b, j, c * BLOCKS_PER_PROGRAM + i]. A second kernel (grid (B,)) sums the partials
in a fixed order (no atomics: bitwise reproducible) and applies the per-sample log-density epilogue. So the
Triton path is two launches and four allocations (no torch arithmetic around them: at the SD1.5 recipe shape
the kernels move ~6 MB, ~2 us at H100 bandwidth by that byte count, so launches would dominate; an estimate,
not yet measured on a GPU: benchmarks/test_bench_ddim_step.py will). Stores round to nearest even
like torch's casts (Triton's interpreter truncates fp32 -> bf16, so under it the kernel rounds bf16 by hand; NaN
payloads aside the result is the same).
Limits: CHW >= 1 and n_chunks <= 65535 (the grid's second axis, CHW up to ~1.3e8); 0 <= seed < 2^63,
offset >= 0 and offset + B * k * CHW < 2^63; k >= 1; each sample's CHW elements must be contiguous (anything
else is copied by .contiguous() first). All tensors on one device. Block sizes untuned (no GPU measured yet).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ._dispatch import describe, on_device, resolve_backend
from .philox import philox_normal_torch, resolve_state

PREDICTION_TYPES = ("epsilon", "v_prediction")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class PooledStep:
    x0: torch.Tensor  # (B, C, H, W) fp32
    mean: torch.Tensor  # (B, C, H, W) input dtype
    std: torch.Tensor  # (B,) fp32
    x_prev: torch.Tensor  # (B, k, C, H, W) input dtype (ddim_step: (B, C, H, W))
    log_prob: torch.Tensor  # (B, k) fp32 (ddim_step: (B,))


# ----------------------------------------------------------------------------- reference (the specification)
def _check_shapes(x_t: torch.Tensor, model_out: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor,
                  prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type is {prediction_type!r}; expected one of {'|'.join(PREDICTION_TYPES)}")
    if x_t.dim() < 2:
        raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected (B, C, H, W)")
    b = x_t.shape[0]
    want = (2 * b, *x_t.shape[1:])
    if tuple(model_out.shape) != want:
        raise ValueError(f"model_out has shape {tuple(model_out.shape)}; expected {want} = [uncond; cond] for "
                         f"x_t {tuple(x_t.shape)}")
    for name, t in (("alpha_t", alpha_t), ("alpha_prev", alpha_prev)):
        if tuple(t.shape) != (b,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({b},)")
        if not t.is_floating_point():
            raise TypeError(f"{name} is {t.dtype}; expected a floating dtype")


def step_coefficients(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """(5, B) fp32: sqrt(a_t), sqrt(1 - a_t), sqrt(a_p), sqrt(max(1 - a_p - std^2, 0)), std of the DDIM step from t
    to t_prev (alpha_t, alpha_prev (B,)). The one implementation of the step's coefficients: the reference, the
    kernel launcher and ``spo_fast.diffusion.sampling`` (``DDIMSchedule.std``, ``ddim_step_stats``) all call it; the Triton
    kernel repeats its operation order with IEEE-rounded division and square root."""
    a_t, a_p = alpha_t.float(), alpha_prev.float()
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    std = eta * var.clamp(min=0).sqrt()
    direction = (1 - a_p - std**2).clamp(min=0).sqrt()
    return torch.stack([a_t.sqrt(), (1 - a_t).sqrt(), a_p.sqrt(), direction, std])


def x0_and_eps(x: torch.Tensor, o: torch.Tensor, sqrt_a: torch.Tensor, sqrt_1ma: torch.Tensor,
               prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps) from the (guided) model output o at x, fp32 in, fp32 out; sqrt_a = sqrt(a_t) and sqrt_1ma =
    sqrt(1 - a_t) broadcast against x. The one implementation of the prediction-type algebra (the reference and
    ``spo_fast.diffusion.sampling.predict_x0_eps`` / ``ddim_step_stats`` call it)."""
    if prediction_type == "epsilon":
        return (x - sqrt_1ma * o) / sqrt_a, o
    return sqrt_a * x - sqrt_1ma * o, sqrt_a * o + sqrt_1ma * x


def _log_prob_epilogue(sum_sq: torch.Tensor, std: torch.Tensor, chw: int) -> torch.Tensor:
    """(B, k) log-density averaged over CHW from the (B, k) sums of (x_prev - mean)^2."""
    s = std[:, None]
    return -(sum_sq / chw) / (2 * s**2) - s.log() - _HALF_LOG_2PI


def pooled_ddim_step_reference(x_t: torch.Tensor, model_out: torch.Tensor, guidance_scale: float,
                               alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float, z: torch.Tensor,
                               prediction_type: str = "epsilon") -> PooledStep:
    """The step in plain PyTorch, fp32 math, with the noise given: z (B, k, C, H, W) (any float dtype)."""
    _check_shapes(x_t, model_out, alpha_t, alpha_prev, prediction_type)
    b = x_t.shape[0]
    if z.dim() != x_t.dim() + 1 or z.shape[0] != b or z.shape[2:] != x_t.shape[1:] or z.shape[1] < 1:
        raise ValueError(f"z has shape {tuple(z.shape)}; expected ({b}, k, {', '.join(map(str, x_t.shape[1:]))})"
                         f" with k >= 1")
    sqrt_a, sqrt_1ma, sqrt_ap, direction, std = (c.view(-1, *[1] * (x_t.dim() - 1))
                                                  for c in step_coefficients(alpha_t, alpha_prev, eta))
    x = x_t.float()
    out_u, out_c = model_out.float().chunk(2)
    o = out_u + guidance_scale * (out_c - out_u)
    x0, eps = x0_and_eps(x, o, sqrt_a, sqrt_1ma, prediction_type)
    mean = sqrt_ap * x0 + direction * eps  # fp32
    x_prev = (mean[:, None] + std[:, None] * z.float()).to(x_t.dtype)  # (B, k, ...)
    d = x_prev.float() - mean[:, None]
    sum_sq = (d * d).flatten(2).sum(2)  # (B, k)
    std1 = std.flatten()
    log_prob = _log_prob_epilogue(sum_sq, std1, math.prod(x_t.shape[1:]))
    return PooledStep(x0, mean.to(x_t.dtype), std1, x_prev, log_prob)


# ----------------------------------------------------------------------------- Triton kernels
# triton.language, bound by _kernels() on first use (see spo_loss.py: the interpreter looks it up in the
# kernels' module globals, so it is a global here).
tl = None

_MAX_BLOCK = 512
_BLOCKS_PER_PROGRAM = 4
_BLOCK_P = 128  # the log-density kernel's loop over the partial sums (one variant; n_parts is a few hundred)
_MAX_GRID_AXIS1 = 65535


def _pooled_step_kernel(x_ptr, out_ptr, at_ptr, ap_ptr, std_ptr, x0_ptr, mean_ptr, xprev_ptr, partial_ptr, rng_ptr,
                        CHW, K, n_parts, guidance, eta, x_sb, out_sb, cond_off,
                        V_PRED: tl.constexpr, MANUAL_RTNE: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCKS_PER_PROGRAM: tl.constexpr):
    # x0, mean: contiguous (B, CHW); x_prev contiguous (B, K, CHW); partial (B, K, n_parts) fp32; std (B,) fp32
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    seed = tl.load(rng_ptr)  # the RNG state [seed, offset] (int64), read on the device
    offset = tl.load(rng_ptr + 1)
    # the per-sample coefficients, step_coefficients' formula and operation order with IEEE-rounded division and
    # square root (torch's), so they equal the reference's bit for bit
    a_t = tl.load(at_ptr + b).to(tl.float32)
    a_p = tl.load(ap_ptr + b).to(tl.float32)
    var = tl.div_rn(1.0 - a_p, 1.0 - a_t) * (1.0 - tl.div_rn(a_t, a_p))
    std = eta * tl.sqrt_rn(tl.maximum(var, 0.0))
    direction = tl.sqrt_rn(tl.maximum(1.0 - a_p - std * std, 0.0))
    sqrt_a = tl.sqrt_rn(a_t)
    sqrt_1ma = tl.sqrt_rn(1.0 - a_t)
    sqrt_ap = tl.sqrt_rn(a_p)
    if chunk == 0:
        tl.store(std_ptr + b, std)
    x_ptr += b * x_sb
    out_ptr += b * out_sb
    start = chunk * (BLOCK * BLOCKS_PER_PROGRAM)
    for i in range(BLOCKS_PER_PROGRAM):  # a loop, not unrolled: unrolled, BLOCK 512 x 4 spilled on sm_90 (V_PRED)
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < CHW
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out_u = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out_c = tl.load(out_ptr + cond_off + offs, mask=mask, other=0.0).to(tl.float32)
        o = out_u + guidance * (out_c - out_u)
        if V_PRED:
            x0 = sqrt_a * x - sqrt_1ma * o
            eps = sqrt_a * o + sqrt_1ma * x
        else:
            eps = o
            x0 = (x - sqrt_1ma * eps) / sqrt_a
        mean = sqrt_ap * x0 + direction * eps
        tl.store(x0_ptr + b * CHW + offs, x0, mask=mask)
        if MANUAL_RTNE:  # bf16 under the interpreter, which truncates fp32 -> bf16: round to nearest even
            bits = mean.to(tl.int32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            mean_out = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            mean_out = mean.to(mean_ptr.dtype.element_ty)
        tl.store(mean_ptr + b * CHW + offs, mean_out, mask=mask)
        for j in range(K):
            row = b * K + j
            z = tl.randn(seed, offset + row * CHW + offs.to(tl.int64))
            xp = mean + std * z
            if MANUAL_RTNE:
                bits = xp.to(tl.int32, bitcast=True)
                bits += 0x7FFF + ((bits >> 16) & 1)
                xp = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
            else:
                xp = xp.to(xprev_ptr.dtype.element_ty)
            tl.store(xprev_ptr + row * CHW + offs, xp, mask=mask)
            d = tl.where(mask, xp.to(tl.float32) - mean, 0.0)
            tl.store(partial_ptr + row * n_parts + chunk * BLOCKS_PER_PROGRAM + i, tl.sum(d * d, axis=0))


def _log_prob_kernel(partial_ptr, std_ptr, lp_ptr, K, n_parts, inv_chw, BLOCK_P: tl.constexpr):
    # lp (B, K) fp32 from the (B, K, n_parts) partial sums, summed in a fixed order (no atomics)
    b = tl.program_id(0).to(tl.int64)
    std = tl.load(std_ptr + b)
    for j in range(K):
        row = b * K + j
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            acc += tl.load(partial_ptr + row * n_parts + offs, mask=offs < n_parts, other=0.0)
        sum_sq = tl.sum(acc, axis=0)
        lp = -(sum_sq * inv_chw) / (2.0 * std * std) - tl.log(std) - 0.9189385332046727  # 0.5 * log(2 pi)
        tl.store(lp_ptr + row, lp)


def _philox_normal_kernel(z_ptr, rng_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(rng_ptr)
    offset = tl.load(rng_ptr + 1)
    tl.store(z_ptr + offs, tl.randn(seed, offset + offs), mask=offs < n)


_KERNELS: dict[bool, tuple] = {}


def _kernels() -> tuple:
    """(step, philox_normal, log_prob) jitted on first use, one set per setting of TRITON_INTERPRET."""
    global tl
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret not in _KERNELS:
        import triton
        import triton.language as tl

        _KERNELS[interpret] = (triton.jit(_pooled_step_kernel), triton.jit(_philox_normal_kernel),
                               triton.jit(_log_prob_kernel))
    return _KERNELS[interpret]


def _blocks(chw: int) -> tuple[int, int, int]:
    """(BLOCK, BLOCKS_PER_PROGRAM, n_chunks) for CHW elements per sample: BLOCK 128, 256 or 512 with one block per
    program up to 512 elements, BLOCK 512 with 4 above (a masked tail). Few variants on purpose: every one is
    compiled ahead of time for sm_80/sm_90 in CI (tests/test_kernels_aot.py). BLOCK is capped at 512 because at
    1024 the kernel spills registers on both archs (tl.randn's Box-Muller inlines libdevice's precise cosine;
    measured with ptxas -v: 4-28 B spill stores per thread), with 8 or 16 warps too."""
    block = min(_MAX_BLOCK, max(128, 1 << (chw - 1).bit_length()))
    per_program = 1 if chw <= block else _BLOCKS_PER_PROGRAM
    return block, per_program, -(-chw // (block * per_program))


def _check_kernel_inputs(x_t: torch.Tensor, model_out: torch.Tensor, alpha_t: torch.Tensor,
                         alpha_prev: torch.Tensor) -> None:
    """What the Triton path needs beyond the shapes; TypeError on dtypes, ValueError on devices and sizes."""
    for name, t in (("x_t", x_t), ("model_out", model_out)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{describe(name, t)}: the Triton step reads float32, float16 or bfloat16; "
                            f"cast it, or use backend='torch' (SPO_FAST_KERNELS=torch)")
    if model_out.dtype != x_t.dtype:
        raise TypeError(f"{describe('model_out', model_out)} differs in dtype from {describe('x_t', x_t)}; "
                        f"the Triton step takes x_t and model_out in one dtype")
    for name, t in (("model_out", model_out), ("alpha_t", alpha_t), ("alpha_prev", alpha_prev)):
        if t.device != x_t.device:
            raise ValueError(f"{describe(name, t)} is not on x_t's device {x_t.device}; move all inputs to one "
                             f"device")
    chw = math.prod(x_t.shape[1:])
    if chw == 0:
        raise ValueError(f"{describe('x_t', x_t)} has no elements per sample")
    if _blocks(chw)[2] > _MAX_GRID_AXIS1:
        raise ValueError(f"{describe('x_t', x_t)} has {chw} elements per sample; the Triton step takes at most "
                         f"{_MAX_GRID_AXIS1 * _MAX_BLOCK * _BLOCKS_PER_PROGRAM}")


def _flat(t: torch.Tensor, chw: int) -> torch.Tensor:
    """(rows, CHW) with unit stride along CHW; copies only when needed."""
    f = t.reshape(t.shape[0], chw)
    return f if f.stride(-1) == 1 else f.contiguous()


def philox_normal(seed: int, offset: int, shape, device="cpu") -> torch.Tensor:
    """fp32 tensor of ``shape`` holding ``tl.randn(seed, offset + i)`` at flat index i: exactly the noise the
    Triton step draws for (seed, offset) when ``shape`` is (B, k, C, H, W). Runs a Triton kernel (CUDA, or CPU
    under TRITON_INTERPRET=1); ``torch_normal`` is the same stream in PyTorch."""
    shape = tuple(shape)
    n = math.prod(shape)
    z = torch.empty(shape, dtype=torch.float32, device=device)
    state, _ = resolve_state(seed, offset, n, z)
    if n > 0:
        _, kernel, _ = _kernels()
        block = 1024
        with on_device(z):
            kernel[(-(-n // block),)](z, state, n, BLOCK=block)
    return z


def _pooled_ddim_step_triton(x_t: torch.Tensor, model_out: torch.Tensor, guidance_scale: float,
                             alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float, k: int,
                             state: torch.Tensor, prediction_type: str) -> PooledStep:
    """The launcher: validates, allocates, runs the fused step kernel, then the log-density kernel."""
    _check_kernel_inputs(x_t, model_out, alpha_t, alpha_prev)
    b, chw = x_t.shape[0], math.prod(x_t.shape[1:])
    block, per_program, n_chunks = _blocks(chw)
    n_parts = n_chunks * per_program
    dev, dtype = x_t.device, x_t.dtype
    x0 = torch.empty(b, chw, dtype=torch.float32, device=dev)
    mean = torch.empty(b, chw, dtype=dtype, device=dev)
    x_prev = torch.empty(b, k, chw, dtype=dtype, device=dev)
    std = torch.empty(b, dtype=torch.float32, device=dev)
    log_prob = torch.empty(b, k, dtype=torch.float32, device=dev)
    partial = torch.empty(b, k, n_parts, dtype=torch.float32, device=dev)  # every part is written (masked: 0)
    if b > 0:
        kernel, _, lp_kernel = _kernels()
        x, out = _flat(x_t, chw), _flat(model_out, chw)
        with on_device(x):
            kernel[(b, n_chunks)](x, out, alpha_t.float().contiguous(), alpha_prev.float().contiguous(), std, x0, mean, x_prev,
                                  partial, state, chw, k, n_parts, float(guidance_scale), float(eta),
                                  x.stride(0), out.stride(0), b * out.stride(0),
                                  V_PRED=prediction_type == "v_prediction",
                                  MANUAL_RTNE=dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
                                  BLOCK=block, BLOCKS_PER_PROGRAM=per_program)
            lp_kernel[(b,)](partial, std, log_prob, k, n_parts, 1.0 / chw, BLOCK_P=_BLOCK_P)
    rest = x_t.shape[1:]
    return PooledStep(x0.view(b, *rest), mean.view(b, *rest), std, x_prev.view(b, k, *rest), log_prob)


def torch_normal(seed: int | torch.Tensor, offset, shape, device="cpu") -> torch.Tensor:
    """The fp32 noise z the torch backend draws for (seed, offset) and z's shape (B, k, C, H, W): Triton's Philox
    stream in PyTorch (``spo_fast.kernels.philox``), i.e. ``philox_normal``'s numbers up to float rounding of the
    Box-Muller transform. ``seed``/``offset`` ints, or 0-d int64 tensors (read on their device)."""
    return philox_normal_torch(seed, offset, tuple(shape), device)


def pooled_ddim_step(x_t: torch.Tensor, model_out: torch.Tensor, guidance_scale: float, alpha_t: torch.Tensor,
                     alpha_prev: torch.Tensor, eta: float, k: int, seed: int | torch.Tensor, offset: int = 0, *,
                     prediction_type: str = "epsilon", backend: str | None = None) -> PooledStep:
    """One guided DDIM step from x_t drawing k candidates per sample (see the module docstring).

    ``seed``: an int (with ``offset``), or an RNG state tensor (2,) int64 [seed, offset] on x_t's device
    (``spo_fast.kernels.philox.rng_state``), read on the device and advanced in place by B * k * CHW draws (no
    host read: what a captured or compiled rollout passes).
    ``backend``: ``torch`` | ``triton`` | ``auto`` | None (None: SPO_FAST_KERNELS, else auto). Both backends draw
    Triton's Philox stream for (seed, offset): the same noise up to float rounding of the Box-Muller transform.
    Raises ValueError on inconsistent shapes, k < 1, bad seed/offset/state, prediction_type or backend; on the
    Triton path also TypeError on unsupported or mixed dtypes and ValueError on mixed devices; RuntimeError if
    Triton cannot run here.
    """
    _check_shapes(x_t, model_out, alpha_t, alpha_prev, prediction_type)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k is {k!r}; expected an int >= 1 (candidates per sample)")
    if eta < 0:
        raise ValueError(f"eta is {eta}; expected eta >= 0")
    x_t, model_out = x_t.detach(), model_out.detach()
    n_draws = x_t.shape[0] * k * math.prod(x_t.shape[1:])
    state, advance = resolve_state(seed, offset, n_draws, x_t)
    if resolve_backend(backend, (x_t, model_out, alpha_t, alpha_prev)) == "triton":
        out = _pooled_ddim_step_triton(x_t, model_out, guidance_scale, alpha_t, alpha_prev, eta, k, state,
                                       prediction_type)
    else:
        z = philox_normal_torch(state[0], state[1], (x_t.shape[0], k, *x_t.shape[1:]))
        out = pooled_ddim_step_reference(x_t, model_out, guidance_scale, alpha_t, alpha_prev, eta, z,
                                         prediction_type)
    if advance:
        state[1:].add_(n_draws)
    return out


def ddim_step(x_t: torch.Tensor, model_out: torch.Tensor, guidance_scale: float, alpha_t: torch.Tensor,
              alpha_prev: torch.Tensor, eta: float, seed: int | torch.Tensor, offset: int = 0, *,
              prediction_type: str = "epsilon", backend: str | None = None) -> PooledStep:
    """The plain one-sample step (non-branching steps, evaluation): ``pooled_ddim_step`` with k = 1, returning
    x_prev (B, C, H, W) and log_prob (B,)."""
    s = pooled_ddim_step(x_t, model_out, guidance_scale, alpha_t, alpha_prev, eta, 1, seed, offset,
                         prediction_type=prediction_type, backend=backend)
    return PooledStep(s.x0, s.mean, s.std, s.x_prev[:, 0], s.log_prob[:, 0])
