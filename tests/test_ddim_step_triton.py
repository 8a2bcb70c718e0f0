"""The pooled candidate DDIM step (spo_fast.kernels.ddim_step) against its reference and spo_fast.diffusion.sampling, on
CPU under Triton's interpreter: forward accuracy per dtype, the in-kernel Philox noise (reproducibility and
distribution), launcher errors and the backend dispatch.

Accuracy rule (as in test_spo_loss_triton): for a dtype, the kernel's error against the exact value is at most
twice the PyTorch reference's own error in that dtype, plus a small atol. "Exact" is the formula evaluated in
float64 on the fp32 inputs and the kernel's own noise z (``philox_normal`` reproduces it), written out
independently below (``truth64``). atol: 1e-6 of the quantity's scale (fp32 arithmetic), plus half a unit of the
output dtype at that scale for the outputs stored in the input dtype (mean, x_prev: one rounding each).
"""
import os

# See test_spo_loss_triton: set before anything imports triton, reset after the imports, set per test.
_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch

pytest.importorskip("triton")
import spo_fast.kernels.ddim_step as step_mod
from spo_fast.diffusion.sampling import DDIMSchedule, ddim_log_prob, ddim_step_stats
from spo_fast.kernels.ddim_step import ddim_step, philox_normal, pooled_ddim_step, pooled_ddim_step_reference

if _INTERPRET_BEFORE is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE


pytestmark = pytest.mark.usefixtures("triton_interpreter")
needs_interpreter = pytest.mark.usefixtures("interpreted_kernels")  # conftest: skip unless interpretable


def triton_kernels():
    """The jitted kernels ``interpreted_kernels`` checks."""
    return step_mod._kernels()

G = 5.0  # guidance scale
ETA = 1.0


def make_case(b, chw, seed):
    """fp32 x_t (B, *chw), model_out (2B, *chw), alpha_t < alpha_prev (B,) in a realistic range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, *chw), generator=g)
    out = torch.randn((2 * b, *chw), generator=g)
    alpha_t = 0.05 + 0.8 * torch.rand(b, generator=g)
    alpha_prev = alpha_t + (0.999 - alpha_t) * (0.1 + 0.8 * torch.rand(b, generator=g))
    return x, out, alpha_t, alpha_prev


def truth64(x, out, alpha_t, alpha_prev, eta, z, pred):
    """The step in float64, written out independently: (x0, mean, std, x_prev, log_prob)."""
    x, out, z = x.double(), out.double(), z.double()
    b = x.shape[0]
    shape = (b, *[1] * (x.dim() - 1))
    a, ap = alpha_t.double().view(shape), alpha_prev.double().view(shape)
    u, c = out[:b], out[b:]
    o = u + G * (c - u)
    if pred == "epsilon":
        eps = o
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    else:
        x0 = a.sqrt() * x - (1 - a).sqrt() * o
        eps = a.sqrt() * o + (1 - a).sqrt() * x
    std = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).clamp(min=0).sqrt()
    mean = ap.sqrt() * x0 + (1 - ap - std**2).clamp(min=0).sqrt() * eps
    x_prev = mean[:, None] + std[:, None] * z
    lp = -((x_prev - mean[:, None]) ** 2) / (2 * std[:, None] ** 2) - std[:, None].log() - 0.5 * math.log(2 * math.pi)
    return x0, mean, std.flatten(), x_prev, lp.flatten(2).mean(2)


def assert_rule(name, kernel, reference, truth, atol):
    assert kernel.shape == truth.shape, name
    err_k = (kernel.double() - truth).abs().max().item()
    err_r = (reference.double() - truth).abs().max().item()
    assert err_k <= 2 * err_r + atol, f"{name}: kernel error {err_k:.3e} > 2 x reference error {err_r:.3e} + {atol:.1e}"


def check_case(b, k, chw, dtype, pred, seed=0, offset=0):
    x, out, at, ap = make_case(b, chw, seed=b * 100 + k + sum(chw))
    xl, outl = x.to(dtype), out.to(dtype)
    s = pooled_ddim_step(xl, outl, G, at, ap, ETA, k, seed, offset, prediction_type=pred, backend="triton")
    z = philox_normal(seed, offset, (b, k, *chw))
    r = pooled_ddim_step_reference(xl, outl, G, at, ap, ETA, z, pred)
    truth = truth64(x, out, at, ap, ETA, z, pred)
    assert s.x0.dtype == torch.float32 and s.std.dtype == torch.float32 and s.log_prob.dtype == torch.float32
    assert s.mean.dtype == dtype and s.x_prev.dtype == dtype
    assert s.x_prev.shape == (b, k, *chw) and s.log_prob.shape == (b, k)
    half_ulp = torch.finfo(dtype).eps / 2
    for name in ("x0", "mean", "std", "x_prev", "log_prob"):
        kv, rv, tv = getattr(s, name), getattr(r, name), truth[("x0", "mean", "std", "x_prev", "log_prob").index(name)]
        assert torch.isfinite(kv).all(), name
        scale = tv.abs().max().item()
        rounding = half_ulp if name in ("mean", "x_prev") else 0.0
        assert_rule(f"{name} {dtype}", kv, rv, tv, (1e-6 + rounding) * scale)
    return s, z


# --------------------------------------------------------------------------- forward vs the reference

CASES = [  # (B, k, CHW, prediction type)
    (1, 2, (3, 5, 7), "epsilon"),
    (2, 4, (4, 8, 8), "epsilon"),
    (3, 2, (5, 40, 25), "epsilon"),  # 5000 = one full 4096 chunk + a ragged one
    (2, 4, (4, 8, 8), "v_prediction"),
    (1, 3, (3, 5, 7), "v_prediction"),
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,k,chw,pred", CASES, ids=[f"B{b}-k{k}-{'x'.join(map(str, c))}-{p}" for b, k, c, p in CASES])
def test_forward_matches_reference(b, k, chw, pred, dtype):
    check_case(b, k, chw, dtype, pred, seed=b + k)


@needs_interpreter
def test_sdxl_latent():
    check_case(1, 2, (4, 128, 128), torch.float32, "epsilon", seed=3, offset=12345)


@needs_interpreter
def test_kernel_uses_the_documented_counters():
    """x_prev[b, j] = mean + std * philox_normal(seed, offset)[b, j] exactly (fp32): the noise layout the module
    docstring promises, not merely some noise the reference happens to be fed."""
    x, out, at, ap = make_case(2, (3, 5, 7), seed=1)
    s = pooled_ddim_step(x, out, G, at, ap, ETA, 3, 9, 40, backend="triton")
    z = philox_normal(9, 40, (2, 3, 3, 5, 7))
    assert torch.equal(s.x_prev, s.mean[:, None] + s.std.view(2, 1, 1, 1, 1) * z)
    assert not torch.equal(z, philox_normal(9, 41, z.shape))


# --------------------------------------------------------------------------- against spo_fast.diffusion.sampling


def toy_schedule(pred):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0).float()
    return DDIMSchedule(alphas, 1.0, torch.arange(950, -1, -50), 50, pred)


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_matches_sampling_module(pred, backend):
    """mean/x0/std equal ddim_step_stats on the guided output (the last timestep uses final_alpha_cumprod), and
    log_prob equals ddim_log_prob of the candidates."""
    sched = toy_schedule(pred)
    b, k, chw = 3, 2, (4, 8, 8)
    x, out, _, _ = make_case(b, chw, seed=5)
    t = torch.tensor([950, 400, 0])  # t=0: previous timestep < 0
    at, ap = sched.alpha(t), sched.alpha(sched.prev(t))
    s = pooled_ddim_step(x, out, G, at, ap, 0.7, k, 11, prediction_type=pred, backend=backend)
    guided = out[:b] + G * (out[b:] - out[:b])  # cfg_model_output's order: [uncond; cond]
    x0, mean, std = ddim_step_stats(sched, guided, x, t, 0.7)
    torch.testing.assert_close(s.x0, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.std, std, rtol=1e-6, atol=1e-7)
    lp = ddim_log_prob(s.x_prev.flatten(0, 1), s.mean.repeat_interleave(k, 0), s.std.repeat_interleave(k))
    assert torch.isfinite(s.log_prob[:2]).all() and s.std[2] == 0  # the last step is deterministic: std 0,
    torch.testing.assert_close(s.log_prob, lp.view(b, k), rtol=1e-5, atol=1e-5, equal_nan=True)  # NaN density


@needs_interpreter
def test_cfg_halves_order():
    """g = 0 is the unconditional half (first), g = 1 the conditional half (second)."""
    sched = toy_schedule("epsilon")
    b, chw = 2, (3, 5, 7)
    x, out, _, _ = make_case(b, chw, seed=6)
    t = torch.tensor([500, 300])
    at, ap = sched.alpha(t), sched.alpha(sched.prev(t))
    for g, half in ((0.0, out[:b]), (1.0, out[b:])):
        s = ddim_step(x, out, g, at, ap, ETA, 0, backend="triton")
        _, mean, _ = ddim_step_stats(sched, half, x, t, ETA)
        torch.testing.assert_close(s.mean, mean, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_plain_step_is_k1():
    x, out, at, ap = make_case(2, (3, 5, 7), seed=7)
    one = ddim_step(x, out, G, at, ap, ETA, 5, 3, backend="triton")
    pool = pooled_ddim_step(x, out, G, at, ap, ETA, 1, 5, 3, backend="triton")
    assert one.x_prev.shape == x.shape and one.log_prob.shape == (2,)
    assert torch.equal(one.x_prev, pool.x_prev[:, 0]) and torch.equal(one.log_prob, pool.log_prob[:, 0])


# --------------------------------------------------------------------------- the noise


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_seed_and_offset(backend):
    x, out, at, ap = make_case(2, (4, 8, 8), seed=8)

    def cands(seed, offset):
        return pooled_ddim_step(x, out, G, at, ap, ETA, 4, seed, offset, backend=backend).x_prev

    a = cands(1, 0)
    assert torch.equal(a, cands(1, 0))
    assert not torch.equal(a, cands(2, 0))
    assert not torch.equal(a, cands(1, 1))
    for i in range(2):
        for j in range(4):
            for jj in range(j + 1, 4):
                assert (a[i, j] != a[i, jj]).float().mean() > 0.99  # candidates of one sample differ
    assert (a[0] != a[1]).float().mean() > 0.99


@needs_interpreter
def test_backends_draw_different_noise_same_statistics():
    x, out, at, ap = make_case(2, (4, 8, 8), seed=9)
    a = pooled_ddim_step(x, out, G, at, ap, ETA, 2, 1, backend="triton")
    b = pooled_ddim_step(x, out, G, at, ap, ETA, 2, 1, backend="torch")
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-5)
    assert not torch.equal(a.x_prev, b.x_prev)


@needs_interpreter
def test_in_kernel_noise_distribution():
    """The kernel's own draws z = (x_prev - mean) / std over 1e5 elements (B=1, k=4, CHW=25000): mean 0,
    variance 1, KS distance to N(0, 1) below the 0.1% critical value, no correlation between neighbouring
    counters or between candidates."""
    b, k, chw = 1, 4, (1, 100, 250)
    x, out, at, ap = make_case(b, chw, seed=10)
    s = pooled_ddim_step(x, out, G, at, ap, ETA, k, 2024, backend="triton")
    z = ((s.x_prev.double() - s.mean.double()[:, None]) / s.std.double().view(-1, 1, 1, 1, 1))
    z = z.flatten(1)[0]  # (B=1, k, CHW) in counter order
    n = z.numel()
    assert n == 100_000
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    zs = z.sort().values
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.95 / math.sqrt(n), f"KS statistic {ks:.4f}"
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 / math.sqrt(n)
    per_cand = z.view(k, -1)
    assert abs((per_cand[0] * per_cand[1]).mean().item()) < 5 / math.sqrt(n / k)


# --------------------------------------------------------------------------- errors and dispatch


def test_launcher_names_the_offending_argument():
    x, out, at, ap = make_case(2, (3, 5, 7), seed=12)
    with pytest.raises(ValueError, match=r"model_out has shape \(2, 3, 5, 7\); expected \(4, 3, 5, 7\)"):
        pooled_ddim_step(x, out[:2], G, at, ap, ETA, 2, 0, backend="triton")
    with pytest.raises(TypeError, match=r"model_out \(4, 3, 5, 7\) torch.float16 .*x_t"):
        pooled_ddim_step(x, out.half(), G, at, ap, ETA, 2, 0, backend="triton")
    with pytest.raises(TypeError, match=r"x_t \(2, 3, 5, 7\) torch.float64"):
        pooled_ddim_step(x.double(), out.double(), G, at, ap, ETA, 2, 0, backend="triton")
    with pytest.raises(ValueError, match=r"alpha_prev \(2,\) torch.float32 on meta"):
        step_mod._check_kernel_inputs(x, out, at, ap.to("meta"))
    with pytest.raises(ValueError, match=r"alpha_t has shape \(3,\); expected \(2,\)"):
        pooled_ddim_step(x, out, G, torch.rand(3), ap, ETA, 2, 0, backend="triton")
    for bad_k in (0, -1):
        with pytest.raises(ValueError, match=rf"k is {bad_k}; expected an int >= 1"):
            pooled_ddim_step(x, out, G, at, ap, ETA, bad_k, 0, backend="triton")
    with pytest.raises(ValueError, match=r"seed is -1"):
        pooled_ddim_step(x, out, G, at, ap, ETA, 2, -1, backend="triton")
    with pytest.raises(ValueError, match=r"prediction_type is 'sample'"):
        pooled_ddim_step(x, out, G, at, ap, ETA, 2, 0, prediction_type="sample", backend="triton")
    with pytest.raises(ValueError, match=r"z has shape \(2, 3, 5, 6\)"):
        pooled_ddim_step_reference(x, out, G, at, ap, ETA, torch.randn(2, 3, 5, 6))


def test_triton_backend_without_a_usable_device(monkeypatch):
    x, out, at, ap = make_case(2, (3, 5, 7), seed=13)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="backend argument=triton.*TRITON_INTERPRET=1"):
        pooled_ddim_step(x, out, G, at, ap, ETA, 2, 0, backend="triton")
    monkeypatch.setenv("SPO_FAST_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="SPO_FAST_KERNELS=triton.*TRITON_INTERPRET=1"):
        ddim_step(x, out, G, at, ap, ETA, 0)
    meta = [t.to("meta") for t in (x, out, at, ap)]
    with pytest.raises(RuntimeError, match="meta"):
        pooled_ddim_step(*meta[:2], G, *meta[2:], ETA, 2, 0, backend="triton")


def test_auto_dispatch(monkeypatch):
    x, out, at, ap = make_case(2, (3, 5, 7), seed=14)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr(step_mod, "_pooled_ddim_step_triton", no_kernel)
    with pytest.raises(AssertionError, match="Triton path ran"):  # CPU + TRITON_INTERPRET=1: auto picks Triton
        pooled_ddim_step(x, out, G, at, ap, ETA, 2, 0)
    monkeypatch.delenv("TRITON_INTERPRET")
    a = pooled_ddim_step(x, out, G, at, ap, ETA, 2, 0)  # auto, interpreter off: the torch reference
    monkeypatch.setenv("SPO_FAST_KERNELS", "torch")
    assert torch.equal(a.x_prev, pooled_ddim_step(x, out, G, at, ap, ETA, 2, 0).x_prev)


@needs_interpreter
def test_in_kernel_coefficients_equal_the_reference_bitwise():
    """The kernel computes std (and the other per-sample coefficients) itself with IEEE division and square root:
    std equals step_coefficients' bit for bit, at ordinary, final (alpha_prev = 1) and near-zero-noise steps."""
    from spo_fast.kernels.ddim_step import step_coefficients

    sched = toy_schedule("epsilon")
    t = torch.tensor([950, 500, 0, 1, 999])
    at, ap = sched.alpha(t), sched.alpha(sched.prev(t))
    x, out, _, _ = make_case(5, (3, 4, 4), seed=2)
    for eta in (1.0, 0.3):
        s = pooled_ddim_step(x, out, G, at, ap, eta, 2, 0, backend="triton")
        assert torch.equal(s.std, step_coefficients(at, ap, eta)[4])
