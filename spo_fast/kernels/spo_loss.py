"""Win-lose log-ratio loss of SPO and Diffusion-DPO: the PyTorch reference (the specification), the fused
Triton kernels (forward and backward), and the public ``spo_loss`` that dispatches between them.

Formula, ``mode="spo"`` (per transition n; all per-sample quantities are fp32)::

    log r_w[n] = mean_{CHW} ((x_w - mu_ref_w)^2 - (x_w - mu_pol_w)^2) / (2 sigma[n]^2)
    log r_l[n] = mean_{CHW} ((x_l - mu_ref_l)^2 - (x_l - mu_pol_l)^2) / (2 sigma[n]^2)
    (= log pi_theta(x | x_t) - log pi_ref(x | x_t) of the Gaussian DDIM step, averaged over CHW;
       the -log sigma terms cancel because policy and reference share sigma)
    c_w, c_l = clamp(log r_w | log r_l, log(1 - eps), log(1 + eps))     (clamped ratio, eps = ratio_clip)
    z[n]     = beta * (c_w - c_l)

Formula, ``mode="dpo"`` (Diffusion-DPO, Wallace et al. 2023; ``dpo_loss`` below is its API with DPO's argument
names; through ``spo_loss`` the arguments are reused: policy_mean = the
policy's noise prediction eps_pol, ref_mean = the reference's eps_ref, x_win / x_lose = the target noise
of the win / lose image, sigma = a per-sample weight w[n]; ratio_clip is ignored)::

    mse_pol_w[n] = mean_{CHW} (eps_pol_w - target_w)^2, mse_ref_w[n] = mean_{CHW} (eps_ref_w - target_w)^2
    (the same for the lose side)
    log r_w[n] = -(mse_pol_w - mse_ref_w),   log r_l[n] = -(mse_pol_l - mse_ref_l)
    z[n]       = -beta / 2 * w[n] * ((mse_pol_w - mse_ref_w) - (mse_pol_l - mse_ref_l))
               =  beta / 2 * w[n] * (log r_w - log r_l)

``w[n]`` multiplies beta per sample: the paper's loss carries T * omega(lambda_t), which the official
implementation drops (constant 1, beta_dpo = 5000, MSE averaged over all latent pixels); w = 1 with
beta = 5000 is exactly that implementation, and a timestep weighting goes into w.

Both modes then::

    L[n]     = -log sigmoid(z[n])
    loss     = sum_n valid[n] * L[n] / max(sum_n valid[n], 1)            (0 when no pair is valid)
    accuracy = sum_n valid[n] * [log r_w > log r_l] / max(sum_n valid[n], 1)
               (DPO: the fraction with (mse_pol_w - mse_ref_w) < (mse_pol_l - mse_ref_l))

Shapes: x_win, x_lose (N, C, H, W) (any trailing dims: everything after N is "CHW"); policy_mean and
ref_mean each (N, C, H, W) when win and lose share one prediction (SPO: they share x_t, one forward serves
both), or (2, N, C, H, W) = (win side, lose side) when they do not (SDXL inner steps; DPO, whose win and
lose images are noised separately); the two may differ in form. sigma (N,) (DPO: the weight), valid (N,)
bool or 0/1 float. ``LossOutput.log_ratio_win/lose`` are the (N,) unclamped log r above (DPO: -(mse_pol -
mse_ref) per side).

Dtype policy: policy_mean, ref_mean, x_win, x_lose in fp32, fp16 or bf16, all four the same (the kernel
reads them in that dtype and upcasts in registers); every sum and every per-sample quantity is fp32; the
gradient w.r.t. policy_mean is written in policy_mean's dtype; sigma and valid may be any float (valid:
also bool) dtype, upcast to fp32. Gradients flow to policy_mean only (the reference and the targets are
constants); loss and accuracy are fp32 scalars. The torch reference accepts anything that upcasts.

The Triton path (``backend`` / ``SPO_FAST_KERNELS`` / ``auto``: see ``_dispatch.py``):
- forward kernel, grid (N, n_chunks): program (n, j) reads chunk j (BLOCK * BLOCKS_PER_PROGRAM elements)
  of sample n of every input once (a shared policy or reference once for both sides) and writes the fp32
  partial sums of (mu_pol - mu_ref) * (2x - mu_ref - mu_pol) = (x - mu_ref)^2 - (x - mu_pol)^2 for the win
  and the lose side to partial[side, n, j]. torch then sums the (2, N, n_chunks) partials over j: a fixed
  order, no atomics, so the result is bitwise reproducible run to run. The factored form is the same
  quantity with one rounding less per element (no cancellation between two squares).
- the per-sample epilogue (divide by 2 sigma^2, clamp, logsigmoid, masked mean, accuracy) is torch on
  (2, N) vectors and is the very code the reference runs, so its gradient (torch.clamp's included: zero
  outside [lo, hi], passed through inside and on the bounds) is the reference's by construction.
- backward kernel, the same grid: d mean_CHW(...)/d mu_pol = 2 (x - mu_pol) / CHW, times the upstream
  per-sample, per-side coefficient; a shared (N, ...) policy gets the win and the lose terms summed in one
  pass, a (2, N, ...) policy one write per side. SPO: 2/(2 sigma^2 CHW) = 1/(sigma^2 CHW); DPO: d mse/d
  eps_pol = 2 (eps_pol - target)/CHW, with the sign that log r = -(mse_pol - mse_ref) gives.
Limits: CHW >= 1 and CHW <= 65535 * BLOCK * BLOCKS_PER_PROGRAM (~2.7e8; the grid's second axis); each
sample's CHW elements must be contiguous (a strided sample axis, e.g. the trainer's x_prev[:, 0], is read
in place; anything else is copied by .contiguous() first). All tensors on one device. Block sizes are
untuned (no GPU measurement yet): BLOCK 1024 and 4 blocks per program keep a 4x128x128 SDXL latent at 16
programs per sample.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._dispatch import describe, on_device, resolve_backend

MODES = ("spo", "dpo")


@dataclass
class LossOutput:
    loss: torch.Tensor  # () masked mean over valid pairs
    accuracy: torch.Tensor  # () implicit accuracy over valid pairs
    log_ratio_win: torch.Tensor  # (N,) unclamped (DPO: -(mse_pol_w - mse_ref_w))
    log_ratio_lose: torch.Tensor  # (N,) unclamped (DPO: -(mse_pol_l - mse_ref_l))


# ----------------------------------------------------------------------------- reference (the specification)
def _sides(mean: torch.Tensor, like: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if mean.shape == like.shape:
        return mean, mean
    if mean.dim() == like.dim() + 1 and mean.shape[0] == 2 and mean.shape[1:] == like.shape:
        return mean[0], mean[1]
    raise ValueError(f"{name} has shape {tuple(mean.shape)}; expected {tuple(like.shape)} (shared x_t) "
                     f"or {(2, *like.shape)} (win side, lose side)")


def _check_shapes(policy_mean: torch.Tensor, ref_mean: torch.Tensor, x_win: torch.Tensor, x_lose: torch.Tensor,
                  sigma: torch.Tensor, valid: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {'|'.join(MODES)}")
    if x_win.shape != x_lose.shape:
        raise ValueError(f"x_win {tuple(x_win.shape)} and x_lose {tuple(x_lose.shape)} differ in shape")
    if x_win.dim() < 1:
        raise ValueError(f"x_win has shape {tuple(x_win.shape)}; expected (N, C, H, W)")
    n = x_win.shape[0]
    if sigma.shape != (n,) or valid.shape != (n,):
        raise ValueError(f"sigma {tuple(sigma.shape)} and valid {tuple(valid.shape)} must both be ({n},)")
    _sides(policy_mean, x_win, "policy_mean")
    _sides(ref_mean, x_win, "ref_mean")


def _log_ratio(x: torch.Tensor, mu_pol: torch.Tensor, mu_ref: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    x, mu_pol, mu_ref = x.float(), mu_pol.float(), mu_ref.float()
    d = ((x - mu_ref) ** 2 - (x - mu_pol) ** 2).flatten(1).mean(1)
    return d / (2 * sigma.float() ** 2)


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)  # (N,)


def _pair_loss(lr_w: torch.Tensor, lr_l: torch.Tensor, sigma: torch.Tensor, valid: torch.Tensor, beta: float,
               ratio_clip: float, mode: str) -> LossOutput:
    """Per-sample log-ratios (N,) fp32 -> LossOutput; shared by the reference and the Triton path."""
    if mode == "spo":
        lo, hi = math.log(1 - ratio_clip), math.log(1 + ratio_clip)
        z = beta * (lr_w.clamp(lo, hi) - lr_l.clamp(lo, hi))
    else:
        z = 0.5 * beta * sigma.float() * (lr_w - lr_l)
    per_pair = -F.logsigmoid(z)
    v = valid.float()
    denom = v.sum().clamp(min=1)
    loss = (per_pair * v).sum() / denom
    accuracy = ((lr_w > lr_l).float() * v).sum() / denom
    return LossOutput(loss, accuracy.detach(), lr_w.detach(), lr_l.detach())


def spo_loss_reference(policy_mean: torch.Tensor, ref_mean: torch.Tensor, x_win: torch.Tensor,
                       x_lose: torch.Tensor, sigma: torch.Tensor, valid: torch.Tensor, beta: float,
                       ratio_clip: float, mode: str = "spo") -> LossOutput:
    """The loss in plain PyTorch, fp32 (see the module docstring; ``mode`` is ``spo`` or ``dpo``)."""
    _check_shapes(policy_mean, ref_mean, x_win, x_lose, sigma, valid, mode)
    pol_w, pol_l = _sides(policy_mean, x_win, "policy_mean")
    ref_w, ref_l = _sides(ref_mean.detach(), x_win, "ref_mean")
    x_win, x_lose = x_win.detach(), x_lose.detach()
    if mode == "spo":
        lr_w = _log_ratio(x_win, pol_w, ref_w, sigma)
        lr_l = _log_ratio(x_lose, pol_l, ref_l, sigma)
    else:
        lr_w = -(_mse(pol_w, x_win) - _mse(ref_w, x_win))
        lr_l = -(_mse(pol_l, x_lose) - _mse(ref_l, x_lose))
    return _pair_loss(lr_w, lr_l, sigma, valid, beta, ratio_clip, mode)


# ----------------------------------------------------------------------------- Triton kernels
# triton.language, bound by _kernels() on first use: importing this module never imports triton. The two
# kernels below are plain functions until _kernels() wraps them with triton.jit; triton's interpreter looks
# the language module up in the kernels' module globals, so it is a global here, not a closure variable.
tl = None

_MAX_BLOCK = 1024
_BLOCKS_PER_PROGRAM = 4
_MAX_GRID_AXIS1 = 65535


def _win_lose_fwd_kernel(xw_ptr, xl_ptr, pol_ptr, ref_ptr, partial_ptr, CHW, N, n_chunks,
                         xw_sn, xl_sn, pol_ss, pol_sn, ref_ss, ref_sn,
                         SHARED_POL: tl.constexpr, SHARED_REF: tl.constexpr,
                         BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    # partial[side, n, chunk] = sum over the chunk of (pol - ref) * ((x - ref) + (x - pol)), fp32
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    xw_ptr += n * xw_sn
    xl_ptr += n * xl_sn
    pol_ptr += n * pol_sn
    ref_ptr += n * ref_sn
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    start = chunk * (BLOCK * BLOCKS_PER_PROGRAM)
    for i in tl.static_range(BLOCKS_PER_PROGRAM):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < CHW  # masked lanes load 0 and add (0 - 0) * ... = 0
        xw = tl.load(xw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xl = tl.load(xl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pw = tl.load(pol_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rw = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SHARED_POL:
            pl = pw
        else:
            pl = tl.load(pol_ptr + pol_ss + offs, mask=mask, other=0.0).to(tl.float32)
        if SHARED_REF:
            rl = rw
        else:
            rl = tl.load(ref_ptr + ref_ss + offs, mask=mask, other=0.0).to(tl.float32)
        acc_w += (pw - rw) * ((xw - rw) + (xw - pw))
        acc_l += (pl - rl) * ((xl - rl) + (xl - pl))
    tl.store(partial_ptr + n * n_chunks + chunk, tl.sum(acc_w, axis=0))
    tl.store(partial_ptr + (N + n) * n_chunks + chunk, tl.sum(acc_l, axis=0))


def _win_lose_bwd_kernel(xw_ptr, xl_ptr, pol_ptr, coef_ptr, grad_ptr, CHW, N,
                         xw_sn, xl_sn, pol_ss, pol_sn, grad_ss,
                         SHARED_POL: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    # grad = coef[0, n] * (x_w - pol_w) (+ coef[1, n] * (x_l - pol_l)), coef = upstream * 2 / CHW (fp32);
    # grad is contiguous: (N, CHW) for a shared policy, else (2, N, CHW) with side stride grad_ss = N * CHW
    # (passed from the host: an in-kernel N * CHW would be int32 and overflow past 2^31 elements)
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c_w = tl.load(coef_ptr + n)
    c_l = tl.load(coef_ptr + N + n)
    xw_ptr += n * xw_sn
    xl_ptr += n * xl_sn
    pol_ptr += n * pol_sn
    grad_ptr += n * CHW
    start = chunk * (BLOCK * BLOCKS_PER_PROGRAM)
    for i in tl.static_range(BLOCKS_PER_PROGRAM):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < CHW
        xw = tl.load(xw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xl = tl.load(xl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pw = tl.load(pol_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SHARED_POL:
            g = c_w * (xw - pw) + c_l * (xl - pw)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            pl = tl.load(pol_ptr + pol_ss + offs, mask=mask, other=0.0).to(tl.float32)
            g_w = c_w * (xw - pw)
            g_l = c_l * (xl - pl)
            tl.store(grad_ptr + offs, g_w.to(grad_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_ptr + grad_ss + offs, g_l.to(grad_ptr.dtype.element_ty), mask=mask)


_KERNELS: dict[bool, tuple] = {}


def _kernels() -> tuple:
    """(forward, backward) jitted on first use. triton decides compiled vs interpreted when a function is
    decorated (reading TRITON_INTERPRET), so there is one pair per setting of that variable."""
    global tl
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret not in _KERNELS:
        import triton
        import triton.language as tl

        _KERNELS[interpret] = (triton.jit(_win_lose_fwd_kernel), triton.jit(_win_lose_bwd_kernel))
    return _KERNELS[interpret]


def _blocks(chw: int) -> tuple[int, int, int]:
    """(BLOCK, BLOCKS_PER_PROGRAM, n_chunks) for CHW elements per sample: BLOCK 128 .. 1024 with one block per
    program up to 1024 elements, BLOCK 1024 with 4 above (a masked tail). Few variants on purpose: every one is
    compiled ahead of time for sm_80/sm_90 in CI (tests/test_kernels_aot.py)."""
    block = min(_MAX_BLOCK, max(128, 1 << (chw - 1).bit_length()))
    per_program = 1 if chw <= block else _BLOCKS_PER_PROGRAM
    return block, per_program, -(-chw // (block * per_program))


def _flat(t: torch.Tensor, lead: int, chw: int) -> torch.Tensor:
    """(lead dims..., CHW) view with unit stride along CHW; copies only when CHW is not contiguous."""
    f = t.reshape(*t.shape[:lead], chw)
    return f if f.stride(-1) == 1 else f.contiguous()


def _check_kernel_inputs(policy_mean: torch.Tensor, ref_mean: torch.Tensor, x_win: torch.Tensor,
                         x_lose: torch.Tensor, sigma: torch.Tensor, valid: torch.Tensor) -> None:
    """What the Triton path needs beyond the shapes the reference checks; raises TypeError on dtypes,
    ValueError on devices and sizes, naming the tensor."""
    big = {"policy_mean": policy_mean, "ref_mean": ref_mean, "x_win": x_win, "x_lose": x_lose}
    for name, t in big.items():
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{describe(name, t)}: the Triton loss reads float32, float16 or bfloat16; "
                            f"cast it, or use backend='torch' (SPO_FAST_KERNELS=torch)")
        if t.dtype != policy_mean.dtype:
            raise TypeError(f"{describe(name, t)} differs in dtype from {describe('policy_mean', policy_mean)}; "
                            f"the Triton loss takes policy_mean, ref_mean, x_win, x_lose in one dtype")
    if not sigma.is_floating_point():
        raise TypeError(f"{describe('sigma', sigma)}: expected a floating dtype")
    for name, t in {**big, "sigma": sigma, "valid": valid}.items():
        if t.device != policy_mean.device:
            raise ValueError(f"{describe(name, t)} is not on policy_mean's device {policy_mean.device}; "
                             f"move all inputs to one device")
    chw = x_win[0].numel() if x_win.shape[0] > 0 else math.prod(x_win.shape[1:])
    if chw == 0:
        raise ValueError(f"{describe('x_win', x_win)} has no elements per sample")
    n_chunks = _blocks(chw)[2]
    if n_chunks > _MAX_GRID_AXIS1:
        raise ValueError(f"{describe('x_win', x_win)} has {chw} elements per sample; the Triton loss takes at "
                         f"most {_MAX_GRID_AXIS1 * _MAX_BLOCK * _BLOCKS_PER_PROGRAM}")


def _side_strides(t: torch.Tensor) -> tuple[int, int, bool]:
    """(side stride, sample stride, shared) of a flat (N, CHW) or (2, N, CHW) tensor."""
    if t.dim() == 2:
        return 0, t.stride(0), True
    return t.stride(0), t.stride(1), False


class _WinLoseDiff(torch.autograd.Function):
    """(2, N) fp32: mean_CHW((x - mu_ref)^2 - (x - mu_pol)^2) for the (win, lose) side; the gradient goes to
    mu_pol only. Inputs are the public shapes (x: (N, ...); mu: (N, ...) or (2, N, ...))."""

    @staticmethod
    def forward(ctx, pol: torch.Tensor, ref: torch.Tensor, x_win: torch.Tensor, x_lose: torch.Tensor):
        n, chw = x_win.shape[0], math.prod(x_win.shape[1:])
        xw, xl = _flat(x_win, 1, chw), _flat(x_lose, 1, chw)  # (N, CHW)
        lead = 1 - x_win.dim()  # + t.dim(): 1 for a shared (N, ...) mean, 2 for (2, N, ...)
        pol_f, ref_f = _flat(pol, lead + pol.dim(), chw), _flat(ref, lead + ref.dim(), chw)  # (N|2,N, CHW)
        block, per_program, n_chunks = _blocks(chw)
        partial = torch.empty(2, n, n_chunks, dtype=torch.float32, device=xw.device)  # (side, N, chunk)
        if n > 0:
            fwd, _ = _kernels()
            pol_ss, pol_sn, shared_pol = _side_strides(pol_f)
            ref_ss, ref_sn, shared_ref = _side_strides(ref_f)
            with on_device(xw):
                fwd[(n, n_chunks)](xw, xl, pol_f, ref_f, partial, chw, n, n_chunks,
                                   xw.stride(0), xl.stride(0), pol_ss, pol_sn, ref_ss, ref_sn,
                                   SHARED_POL=shared_pol, SHARED_REF=shared_ref,
                                   BLOCK=block, BLOCKS_PER_PROGRAM=per_program)
        ctx.save_for_backward(xw, xl, pol_f)
        ctx.pol_shape = pol.shape
        return partial.sum(-1) / chw  # (2, N)

    @staticmethod
    def backward(ctx, grad_d: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        xw, xl, pol_f = ctx.saved_tensors
        n, chw = xw.shape
        grad = torch.empty(pol_f.shape, dtype=pol_f.dtype, device=pol_f.device)  # contiguous (N|2,N, CHW)
        if n > 0:
            _, bwd = _kernels()
            block, per_program, n_chunks = _blocks(chw)
            coef = (grad_d.float() * (2.0 / chw)).contiguous()  # (2, N): d mean/d pol = 2 (x - pol) / CHW
            pol_ss, pol_sn, shared_pol = _side_strides(pol_f)
            with on_device(xw):
                bwd[(n, n_chunks)](xw, xl, pol_f, coef, grad, chw, n, xw.stride(0), xl.stride(0), pol_ss, pol_sn,
                                   n * chw, SHARED_POL=shared_pol, BLOCK=block, BLOCKS_PER_PROGRAM=per_program)
        return grad.view(ctx.pol_shape), None, None, None


def _spo_loss_triton(policy_mean: torch.Tensor, ref_mean: torch.Tensor, x_win: torch.Tensor, x_lose: torch.Tensor,
                     sigma: torch.Tensor, valid: torch.Tensor, beta: float, ratio_clip: float,
                     mode: str) -> LossOutput:
    """The launcher: validates, runs the fused kernels, then the shared per-sample epilogue."""
    _check_shapes(policy_mean, ref_mean, x_win, x_lose, sigma, valid, mode)
    _check_kernel_inputs(policy_mean, ref_mean, x_win, x_lose, sigma, valid)
    d = _WinLoseDiff.apply(policy_mean, ref_mean.detach(), x_win.detach(), x_lose.detach())  # (2, N) fp32
    lr = d / (2 * sigma.float() ** 2) if mode == "spo" else d  # DPO: d = -(mse_pol - mse_ref)
    return _pair_loss(lr[0], lr[1], sigma, valid, beta, ratio_clip, mode)


def spo_loss(policy_mean: torch.Tensor, ref_mean: torch.Tensor, x_win: torch.Tensor, x_lose: torch.Tensor,
             sigma: torch.Tensor, valid: torch.Tensor, beta: float = 10.0, ratio_clip: float = 0.1, *,
             mode: str = "spo", backend: str | None = None) -> LossOutput:
    """Win-lose loss over N pairs; the trainer's only entry point to it.

    ``mode="spo"``: SPO's clamped-ratio loss (sigma: the step's std). ``mode="dpo"``: Diffusion-DPO, with
    policy_mean/ref_mean the noise predictions, x_win/x_lose the target noises and sigma the per-sample
    weight (ratio_clip unused; beta 5000 in the paper). Shapes and formulas: the module docstring.
    ``backend``: ``torch`` | ``triton`` | ``auto`` | None (None: SPO_FAST_KERNELS, else auto).
    Raises ValueError on inconsistent shapes or a bad mode/backend; on the Triton path also TypeError on
    unsupported or mixed dtypes and ValueError on mixed devices; RuntimeError if Triton cannot run here.
    """
    sigma = sigma.detach()  # a schedule constant (or DPO weight): no gradient flows to it
    if resolve_backend(backend, (policy_mean, ref_mean, x_win, x_lose, sigma, valid)) == "triton":
        return _spo_loss_triton(policy_mean, ref_mean, x_win, x_lose, sigma, valid, beta, ratio_clip, mode)
    return spo_loss_reference(policy_mean, ref_mean, x_win, x_lose, sigma, valid, beta, ratio_clip, mode)


def dpo_loss(pred_policy: torch.Tensor, pred_ref: torch.Tensor, target_win: torch.Tensor, target_lose: torch.Tensor,
             valid: torch.Tensor, beta: float = 5000.0, weight: torch.Tensor | None = None, *,
             backend: str | None = None) -> LossOutput:
    """Diffusion-DPO's loss over N pairs through the same fused kernel (``mode="dpo"`` of ``spo_loss``).

    pred_policy, pred_ref: (2, N, C, H, W) noise predictions on (winner, loser) (the reference's carries no
    gradient); target_win, target_lose: (N, C, H, W) what each side should predict (the shared noise, or the
    velocity for v-prediction models); valid: (N,) 1/True for a pair that counts; beta: the official convention
    (5000: the MSE is a mean over C*H*W); weight: (N,) per-pair multiplier of beta (default 1, the official
    implementation; a timestep weighting goes here).
    L[n] = -log sigmoid(-beta/2 * w[n] * ((mse_pol_w - mse_ref_w) - (mse_pol_l - mse_ref_l))), averaged over valid
    pairs; ``accuracy`` is the fraction of valid pairs whose policy improves on the reference more for the winner.
    Raises as ``spo_loss``.
    """
    if weight is None:
        weight = torch.ones(target_win.shape[0], dtype=torch.float32, device=target_win.device)
    return spo_loss(pred_policy, pred_ref, target_win, target_lose, weight, valid, beta, mode="dpo", backend=backend)
