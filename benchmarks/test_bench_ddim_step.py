"""pytest-benchmark: the pooled candidate DDIM step, one guided step from x_t drawing k candidates x_{t-1} per
sample together with their log-densities (the rollout's branching step).

Providers: ``eager`` (the PyTorch reference, ``pooled_ddim_step(..., backend="torch")``; it draws its noise with
``torch.randn`` inside the call, which is part of the op's work), ``compile`` (``torch.compile`` of a function
that draws z (B, k, C, H, W) with ``torch.randn`` and calls ``pooled_ddim_step_reference``; on CPU only with
``SPO_FAST_BENCH_COMPILE=1`` and only at the ``sd15`` shape, compiling takes tens of seconds there) and
``triton`` (``pooled_ddim_step(..., backend="triton")``, noise drawn in-kernel with Philox; CUDA only).

Shapes (B samples of C x H x W latents, k candidates each; model_out (2B, C, H, W) laid out [uncond; cond]):

- ``sd15``: the SD1.5 recipe, B=10, k=4, 4x64x64;
- ``sdxl``: the SDXL recipe, B=2, k=2, 4x128x128;
- ``large``: B=64, k=4, 4x128x128, enough to fill a GPU: the bandwidth target (GPU only);
- ``small``: B=16, k=4, 4x64x64, the CPU's stand-in for ``large`` (CPU only).

The step itself is the recipes': epsilon prediction, guidance 7.5, eta 1, alphas_cumprod of the SD
``scaled_linear`` schedule (beta 0.00085 .. 0.012, 1000 steps) at t=501 -> t_prev=481, the middle of a 50-step
DDIM sampler. dtypes: fp32 and bf16 on GPU, fp32 on CPU. Every provider's outputs are checked once before
timing, so a broken kernel cannot post a fast number: ``eager`` and ``triton`` against the reference fed the
exact noise that backend draws (``torch_normal`` / ``philox_normal``); ``compile`` draws noise of its own, so
its x0, mean and std are checked against the reference, its candidates' standardised noise for N(0, 1)
statistics and independence across the k candidates, and its log_prob against the density of the candidates
it returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from bench_utils import compiled, fill_extra_info, skip_reason, sync, tensor_bytes

from spo_fast.kernels.ddim_step import philox_normal, pooled_ddim_step, pooled_ddim_step_reference, torch_normal

GUIDANCE, ETA, PREDICTION_TYPE = 7.5, 1.0, "epsilon"  # the SD1.5 / SDXL recipes
T, T_PREV = 501, 481  # a 50-step DDIM sampler's middle step (timestep spacing 20, steps_offset 1)
BETA_START, BETA_END, TRAIN_STEPS = 0.00085, 0.012, 1000  # SD's scaled_linear schedule
SEED, OFFSET = 1234, 0


@dataclass(frozen=True)
class Shape:
    b: int
    k: int  # candidates per sample
    c: int
    h: int
    w: int
    where: str  # "any" | "gpu" | "cpu"

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.b, self.k, self.c, self.h, self.w)

    def as_dict(self) -> dict:
        chw = [self.c, self.h, self.w]
        return {"B": self.b, "k": self.k, "C": self.c, "H": self.h, "W": self.w, "x_shape": [self.b, *chw],
                "model_out_shape": [2 * self.b, *chw], "x_prev_shape": list(self.noise_shape)}


SHAPES = {
    "sd15": Shape(10, 4, 4, 64, 64, where="any"),
    "sdxl": Shape(2, 2, 4, 128, 128, where="any"),
    "large": Shape(64, 4, 4, 128, 128, where="gpu"),
    "small": Shape(16, 4, 4, 64, 64, where="cpu"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("eager", "compile", "triton")


# ----------------------------------------------------------------------------- providers
def _step_drawing_noise(x_t: torch.Tensor, model_out: torch.Tensor, guidance_scale: float, alpha_t: torch.Tensor,
                        alpha_prev: torch.Tensor, eta: float, k: int):
    """The reference with its noise drawn inside, as the op does: what ``compile`` compiles."""
    z = torch.randn((x_t.shape[0], k, *x_t.shape[1:]), dtype=torch.float32, device=x_t.device)
    return pooled_ddim_step_reference(x_t, model_out, guidance_scale, alpha_t, alpha_prev, eta, z, PREDICTION_TYPE)


def _step_fn(provider: str):
    """fn(x_t, model_out, guidance_scale, alpha_t, alpha_prev, eta, k) -> PooledStep."""
    if provider == "eager":
        return lambda *a: pooled_ddim_step(*a, SEED, OFFSET, prediction_type=PREDICTION_TYPE, backend="torch")
    if provider == "compile":
        return compiled(_step_drawing_noise)
    if provider == "triton":
        return lambda *a: pooled_ddim_step(*a, SEED, OFFSET, prediction_type=PREDICTION_TYPE, backend="triton")
    raise ValueError(provider)


# ----------------------------------------------------------------------------- inputs
def _alphas_cumprod(device: torch.device) -> torch.Tensor:
    """(1000,) fp32 alphas_cumprod of the scaled_linear schedule, computed as diffusers' DDIMScheduler does."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_STEPS, dtype=torch.float32, device=device) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    """(x_t, model_out, alpha_t, alpha_prev): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps for unit-variance x0 and
    eps; the unconditional prediction is eps plus an error, the conditional one a small offset from it (so the
    guidance term is the small difference it is in a real model). x_t and model_out in ``dtype``, alphas fp32."""
    g = torch.Generator(device=device).manual_seed(0)
    lead, chw = shape.b, (shape.c, shape.h, shape.w)
    alphas = _alphas_cumprod(device)
    alpha_t, alpha_prev = alphas[T].expand(lead).clone(), alphas[T_PREV].expand(lead).clone()
    x0 = torch.randn(lead, *chw, generator=g, device=device)
    eps = torch.randn(lead, *chw, generator=g, device=device)
    a = alpha_t.view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out_u = eps + 0.1 * torch.randn(lead, *chw, generator=g, device=device)
    out_c = out_u + 0.05 * torch.randn(lead, *chw, generator=g, device=device)
    return x_t.to(dtype), torch.cat([out_u, out_c]).to(dtype), alpha_t, alpha_prev


# ----------------------------------------------------------------------------- correctness
def _rtol(name: str, dtype: torch.dtype) -> float:
    """Relative tolerance (of the tensor's largest magnitude) per output: fp32 math throughout, so 1e-5 for the
    fp32 outputs (x0, std, log_prob; 1e-4 for log_prob from bf16 candidates, which sums their roundings); mean
    and x_prev are stored in the input dtype, where one rounding may land one unit apart (bf16: 2^-8 relative)."""
    if dtype == torch.float32:
        return 1e-5
    if name in ("mean", "x_prev"):
        return 1.6e-2  # torch.testing's bf16 default
    return 1e-4 if name == "log_prob" else 1e-5


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, provider: str) -> None:
    rtol = _rtol(name, dtype)
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{provider}: {name} differs from the reference\n{m}")


def _check_exact_noise(out, args, provider: str, shape: Shape, dtype: torch.dtype) -> None:
    """eager / triton: every output against the reference fed the very noise the backend draws."""
    x_t, model_out, alpha_t, alpha_prev = args
    draw = philox_normal if provider == "triton" else torch_normal
    z = draw(SEED, OFFSET, shape.noise_shape, x_t.device)
    ref = pooled_ddim_step_reference(x_t, model_out, GUIDANCE, alpha_t, alpha_prev, ETA, z, PREDICTION_TYPE)
    for name in ("x0", "mean", "std", "x_prev", "log_prob"):
        _assert_close(name, getattr(out, name), getattr(ref, name), dtype, provider)


def _check_own_noise(out, args, provider: str, shape: Shape, dtype: torch.dtype) -> None:
    """compile (noise of its own): x0, mean and std against the reference; (x_prev - mean) / std must look like
    independent N(0, 1) draws (mean 0, std 1, neighbouring candidates uncorrelated, each within 6 standard errors:
    a false alarm about once in 10^9 runs, while a 5% error in the noise's scale fails at every shape), and
    log_prob must be the density of the candidates returned."""
    x_t, model_out, alpha_t, alpha_prev = args
    zeros = torch.zeros((shape.b, 1, shape.c, shape.h, shape.w), device=x_t.device)
    # the fp32 upcast inputs: the same fp32 math, with mean returned unrounded (the centre x_prev is drawn around)
    ref = pooled_ddim_step_reference(x_t.float(), model_out.float(), GUIDANCE, alpha_t, alpha_prev, ETA, zeros,
                                     PREDICTION_TYPE)
    _assert_close("x0", out.x0, ref.x0, dtype, provider)
    _assert_close("mean", out.mean, ref.mean.to(dtype), dtype, provider)
    _assert_close("std", out.std, ref.std, dtype, provider)
    assert out.x_prev.shape == shape.noise_shape and out.x_prev.dtype == dtype, \
        f"{provider}: x_prev is {out.x_prev.dtype} {tuple(out.x_prev.shape)}"
    assert out.log_prob.shape == (shape.b, shape.k) and out.log_prob.dtype == torch.float32, \
        f"{provider}: log_prob is {out.log_prob.dtype} {tuple(out.log_prob.shape)}"
    std = ref.std.view(-1, 1, 1, 1, 1)
    d = out.x_prev.float() - ref.mean[:, None]
    z = d / std
    n = z.numel()
    z_mean, z_std = z.mean().item(), z.std().item()
    assert abs(z_mean) < 6 / math.sqrt(n) and abs(z_std - 1) < 6 / math.sqrt(2 * n), \
        f"{provider}: the candidates' noise has mean {z_mean:.4f} and std {z_std:.4f} over {n} draws; expected N(0, 1)"
    if shape.k > 1:
        pairs = z[:, :-1] * z[:, 1:]  # candidate j against j + 1
        corr = pairs.mean().item()
        assert abs(corr) < 6 / math.sqrt(pairs.numel()), \
            f"{provider}: neighbouring candidates' noise is correlated ({corr:.4f}); expected independent draws"
    s = ref.std[:, None]
    chw = shape.c * shape.h * shape.w
    log_prob = -(d * d).flatten(2).sum(2) / chw / (2 * s**2) - s.log() - 0.5 * math.log(2 * math.pi)
    _assert_close("log_prob", out.log_prob, log_prob, dtype, provider)


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_pooled_ddim_step(benchmark, device, copy_bandwidth, shape_name, dtype_name, provider):
    reason = skip_reason(provider, shape_name, SHAPES[shape_name].where, dtype_name, device)
    if reason:
        pytest.skip(reason)
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    step_fn = _step_fn(provider)
    args = _inputs(shape, dtype, device)
    x_t, model_out, alpha_t, alpha_prev = args

    def step():
        return step_fn(x_t, model_out, GUIDANCE, alpha_t, alpha_prev, ETA, shape.k)

    def step_synced():  # pytest-benchmark times on the host: wait for the device
        out = step()
        sync(device)
        return out

    out = step_synced()  # also compiles (compile, triton)
    check = _check_own_noise if provider == "compile" else _check_exact_noise
    check(out, args, provider, shape, dtype)
    benchmark.group = f"pooled_ddim_step | {shape_name} | {dtype_name}"
    benchmark(step_synced)

    # every input read once (the noise is drawn, not read), every output written once
    inputs = tensor_bytes(x_t, model_out, alpha_t, alpha_prev)
    outputs = tensor_bytes(out.x0, out.mean, out.x_prev, out.std, out.log_prob)
    fill_extra_info(benchmark, op="pooled_ddim_step", provider=provider, shape_name=shape_name,
                    shape=shape.as_dict(), dtype=dtype, device=device, bytes_moved=inputs + outputs, fn=step,
                    copy_bandwidth=copy_bandwidth)
    benchmark.extra_info["params"] = {"guidance_scale": GUIDANCE, "eta": ETA, "prediction_type": PREDICTION_TYPE,
                                      "t": T, "t_prev": T_PREV, "alpha_t": alpha_t[0].item(),
                                      "alpha_prev": alpha_prev[0].item(), "std": out.std[0].item()}
