"""pytest-benchmark: the SPO win-lose loss, forward + backward w.r.t. policy_mean (the training use).

Providers: ``eager`` (the PyTorch reference, ``spo_loss(..., backend="torch")``), ``compile``
(``torch.compile`` of ``spo_loss_reference``; on CPU only with ``SPO_FAST_BENCH_COMPILE=1`` and only at the
``sd15`` shape, compiling takes tens of seconds there) and ``triton`` (``spo_loss(..., backend="triton")``; CUDA only).

Shapes (``N`` transitions of C x H x W latents, win and lose as strided views of one (N, 2, C, H, W)
buffer, as the trainer passes ``x_prev[:, 0]`` and ``x_prev[:, 1]``):

- ``sd15``: the SD1.5 recipe, N=10, 4x64x64, one shared policy/reference mean (N, C, H, W);
- ``sdxl``: the SDXL recipe's inner steps, N=2, 4x128x128, separate win/lose means (2, N, C, H, W);
- ``large``: N=256, 4x128x128 shared, enough to fill a GPU: the bandwidth target (GPU only);
- ``small``: N=32, 4x64x64 shared, the CPU's stand-in for ``large`` (CPU only).

dtypes: fp32 and bf16 on GPU, fp32 on CPU. Every provider's loss and gradient are checked against eager once
before timing, so a broken kernel cannot post a fast number.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from bench_utils import compiled, fill_extra_info, skip_reason, sync, tensor_bytes

from spo_fast.kernels.spo_loss import spo_loss, spo_loss_reference

BETA, RATIO_CLIP = 10.0, 0.1  # the SD1.5 / SDXL recipes


@dataclass(frozen=True)
class Shape:
    n: int
    c: int
    h: int
    w: int
    shared: bool  # policy/ref (N, C, H, W) shared by win and lose, else (2, N, C, H, W)
    where: str  # "any" | "gpu" | "cpu"

    def as_dict(self) -> dict:
        mean = (self.n, self.c, self.h, self.w) if self.shared else (2, self.n, self.c, self.h, self.w)
        return {"N": self.n, "C": self.c, "H": self.h, "W": self.w, "mean_shape": list(mean),
                "x_shape": [self.n, self.c, self.h, self.w], "shared_mean": self.shared}


SHAPES = {
    "sd15": Shape(10, 4, 64, 64, shared=True, where="any"),
    "sdxl": Shape(2, 4, 128, 128, shared=False, where="any"),
    "large": Shape(256, 4, 128, 128, shared=True, where="gpu"),
    "small": Shape(32, 4, 64, 64, shared=True, where="cpu"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("eager", "compile", "triton")


# ----------------------------------------------------------------------------- providers


def _loss_fn(provider: str):
    if provider == "eager":
        return lambda *a: spo_loss(*a, backend="torch")
    if provider == "compile":
        return compiled(spo_loss_reference)
    if provider == "triton":
        return lambda *a: spo_loss(*a, backend="triton")
    raise ValueError(provider)


# ----------------------------------------------------------------------------- inputs
def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    """(policy_mean [requires grad], ref_mean, x_win, x_lose, sigma, valid), DDIM-step-like values: x ~
    mu_ref + sigma * noise, the policy a small perturbation of the reference (some ratios clamp, some not)."""
    g = torch.Generator(device=device).manual_seed(0)
    n, chw = shape.n, (shape.c, shape.h, shape.w)
    lead = (n,) if shape.shared else (2, n)
    sigma = torch.rand(n, generator=g, device=device) * 0.1 + 0.05
    ref = torch.randn(*lead, *chw, generator=g, device=device)
    pol = ref + 0.01 * torch.randn(*lead, *chw, generator=g, device=device)
    ref_sides = (ref, ref) if shape.shared else (ref[0], ref[1])
    s = sigma.view(n, 1, 1, 1)
    x_prev = torch.stack([r + s * torch.randn(r.shape, generator=g, device=device) for r in ref_sides], dim=1)
    x_prev = x_prev.to(dtype)  # (N, 2, C, H, W): win and lose are strided views, as in the trainer
    valid = (torch.rand(n, generator=g, device=device) > 0.2).float()
    valid[0] = 1.0
    pol = pol.to(dtype).requires_grad_(True)
    return pol, ref.to(dtype), x_prev[:, 0], x_prev[:, 1], sigma, valid


def _check_against_eager(loss_fn, args, dtype: torch.dtype) -> None:
    pol = args[0]
    ref_out = spo_loss(*args, BETA, RATIO_CLIP, backend="torch")
    (ref_grad,) = torch.autograd.grad(ref_out.loss, pol)
    out = loss_fn(*args, BETA, RATIO_CLIP)
    (grad,) = torch.autograd.grad(out.loss, pol)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=tol, atol=tol * 1e-2)
    scale = ref_grad.float().abs().max().clamp(min=1e-30)
    err = (grad.float() - ref_grad.float()).abs().max()
    assert err <= tol * scale, f"gradient differs from eager: max |diff| {err:.3e} vs max |grad| {scale:.3e}"


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_spo_loss_fwd_bwd(benchmark, device, copy_bandwidth, shape_name, dtype_name, provider):
    reason = skip_reason(provider, shape_name, SHAPES[shape_name].where, dtype_name, device)
    if reason:
        pytest.skip(reason)
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    loss_fn = _loss_fn(provider)
    args = _inputs(shape, dtype, device)
    pol, ref, xw, xl, sigma, valid = args

    def step():
        out = loss_fn(pol, ref, xw, xl, sigma, valid, BETA, RATIO_CLIP)
        (grad,) = torch.autograd.grad(out.loss, pol)
        return grad

    def step_synced():  # pytest-benchmark times on the host: wait for the device
        grad = step()
        sync(device)
        return grad

    _check_against_eager(loss_fn, args, dtype)  # also compiles (compile, triton)
    step_synced()
    benchmark.group = f"spo_loss fwd+bwd | {shape_name} | {dtype_name}"
    benchmark(step_synced)

    inputs = tensor_bytes(pol, ref, xw, xl, sigma, valid)
    outputs = tensor_bytes(pol) + 4  # the gradient, in policy_mean's dtype, and the fp32 loss
    # what a forward kernel + backward kernel pair must move: the forward reads the four big inputs, the
    # backward re-reads x_win, x_lose, policy_mean and writes the gradient (the backward needs the
    # per-sample sums of the forward, so one pass cannot do both)
    two_pass = tensor_bytes(pol, ref, xw, xl) + tensor_bytes(xw, xl, pol) + tensor_bytes(pol)
    fill_extra_info(benchmark, op="spo_loss_fwd_bwd", provider=provider, shape_name=shape_name,
                    shape=shape.as_dict(), dtype=dtype, device=device, bytes_moved=inputs + outputs, fn=step,
                    copy_bandwidth=copy_bandwidth, extra_bytes={"bytes_two_pass": two_pass})
