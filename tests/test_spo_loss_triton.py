"""The fused Triton win-lose loss (spo_fast.kernels.spo_loss, SPO and DPO modes) against its reference, on CPU
under Triton's interpreter, and the backend dispatch (spo_fast.kernels._dispatch).

Accuracy rule (flash-attention's): for a dtype, the kernel's error against the exact value is at most twice
the PyTorch reference's own error in that dtype, plus a small atol. "Exact" is the specification evaluated
in float64 on the fp32 inputs (``truth64`` below), so for fp32 the reference's own error is its fp32
arithmetic and not zero by definition; for fp16/bf16 it is the input rounding plus that. Errors are max-abs
over a quantity (loss, the (N,) log-ratios, the whole gradient tensor). atol: 1e-6 of the quantity's scale
(fp32 summation order), and for the gradient, which both paths round to the input dtype, half a unit of
that dtype at the gradient's scale (one rounding).

Input construction: the per-sample quantity mean_CHW((x - r)^2 - (x - p)^2) is affine in x, so x_win/x_lose
are steered (in float64) to hit chosen log-ratios: SPO pairs with both ratios inside the clamp, one outside,
both outside; DPO pairs with beta=5000 and z = beta/2 * w * (lr_w - lr_l) in a non-saturated range.
"""
import os

# Triton decides interpreted vs compiled when a kernel is decorated (spo_loss builds its kernels on first
# use); set the variable before anything imports triton in case this triton reads it earlier. It is reset
# below once the imports are done and set again per test by _interpreter: left set, it would route every
# later test file's spo_loss calls (the trainer's included) through the interpreter.
_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
import spo_fast.kernels.spo_loss as spo_loss_mod
from spo_fast.kernels._dispatch import resolve_backend
from spo_fast.kernels.spo_loss import spo_loss, spo_loss_reference

if _INTERPRET_BEFORE is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE


pytestmark = pytest.mark.usefixtures("triton_interpreter")
needs_interpreter = pytest.mark.usefixtures("interpreted_kernels")  # conftest: skip unless interpretable


def triton_kernels():
    """The jitted kernels ``interpreted_kernels`` checks."""
    return spo_loss_mod._kernels()


BETA = {"spo": 10.0, "dpo": 5000.0}
EPS = 0.1  # ratio_clip: the clamp is [log 0.9, log 1.1] = [-0.105, 0.095]
# SPO target (log r_w, log r_l) per pair index i % 5: both inside, win outside, lose outside, both
# outside, both inside (each jittered by x0.8..1.2, far from the clamp bounds)
SPO_KINDS = [(0.04, -0.03), (0.3, 0.05), (-0.02, -0.4), (-0.5, 0.6), (0.06, 0.02)]


def _steer(r, p, half_d, g):
    """(N, CHW) float64 x with mean_CHW((x - r)^2 - (x - p)^2) = 2 * half_d[n]: that mean is
    2 mean((p - r) * u) for x = (r + p) / 2 + u, so u = noise + alpha * (p - r) with alpha solved per sample."""
    a = (p - r).flatten(1)
    u = 0.5 * torch.randn(a.shape, generator=g, dtype=torch.float64)
    alpha = (half_d - (a * u).mean(1)) / (a * a).mean(1)
    return ((r + p) / 2).flatten(1) + u + alpha[:, None] * a


def make_case(mode, n, chw, pol_form, ref_form, seed, targets=None):
    """fp32 (policy, ref, x_win, x_lose, sigma-or-weight) with chosen per-sample log-ratios; the means are
    (N, *chw) for "shared", (2, N, *chw) for "sided"."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    ref = torch.randn((2, n, *chw) if ref_form == "sided" else (n, *chw), generator=g, dtype=f64)
    if pol_form == "sided":
        base = ref if ref_form == "sided" else torch.stack([ref, ref])
    else:
        base = ref if ref_form == "shared" else ref[0]
    pol = base + 0.1 * torch.randn(base.shape, generator=g, dtype=f64)
    if mode == "spo":
        sigma = 0.5 + 1.5 * torch.rand(n, generator=g, dtype=f64)
        jitter = 0.8 + 0.4 * torch.rand(2, n, generator=g, dtype=f64)
        kinds = torch.tensor([SPO_KINDS[i % len(SPO_KINDS)] for i in range(n)], dtype=f64).T  # (2, N)
        lr = kinds * jitter if targets is None else torch.tensor(targets, dtype=f64).T
        half_d = lr * sigma**2  # log r = d / (2 sigma^2)
    else:
        sigma = 0.5 + torch.rand(n, generator=g, dtype=f64)  # the per-sample weight w
        lr_w = 2e-3 * torch.randn(n, generator=g, dtype=f64)
        sign = torch.where(torch.rand(n, generator=g, dtype=f64) < 0.5, -1.0, 1.0).to(f64)
        delta = sign * (5e-4 + 2.5e-3 * torch.rand(n, generator=g, dtype=f64))  # |z| = 2500 w |delta| in [0.6, 11]
        half_d = torch.stack([lr_w, lr_w - delta]) / 2  # log r = d

    def side(t, s):
        return t if t.dim() == len(chw) + 1 else t[s]

    xw = _steer(side(ref, 0), side(pol, 0), half_d[0], g).view(n, *chw)
    xl = _steer(side(ref, 1), side(pol, 1), half_d[1], g).view(n, *chw)
    return [t.float() for t in (pol, ref, xw, xl, sigma)]


def truth64(mode, pol, ref, xw, xl, sigma, valid, beta, eps):
    """The specification in float64, written out independently: (loss, lr_w, lr_l, accuracy, d loss/d pol)."""
    p = pol.double().requires_grad_(True)
    r, xw, xl, s = ref.double(), xw.double(), xl.double(), sigma.double()

    def side(t, i):
        return t if t.dim() == xw.dim() else t[i]

    def mean_chw(t):
        return t.flatten(1).mean(1)

    if mode == "spo":
        lr_w = mean_chw((xw - side(r, 0)) ** 2 - (xw - side(p, 0)) ** 2) / (2 * s**2)
        lr_l = mean_chw((xl - side(r, 1)) ** 2 - (xl - side(p, 1)) ** 2) / (2 * s**2)
        lo, hi = math.log(1 - eps), math.log(1 + eps)
        z = beta * (lr_w.clamp(lo, hi) - lr_l.clamp(lo, hi))
    else:
        mse_pw, mse_rw = mean_chw((side(p, 0) - xw) ** 2), mean_chw((side(r, 0) - xw) ** 2)
        mse_pl, mse_rl = mean_chw((side(p, 1) - xl) ** 2), mean_chw((side(r, 1) - xl) ** 2)
        z = -beta / 2 * s * ((mse_pw - mse_rw) - (mse_pl - mse_rl))
        lr_w, lr_l = -(mse_pw - mse_rw), -(mse_pl - mse_rl)
    v = valid.double()
    loss = (F.softplus(-z) * v).sum() / v.sum().clamp(min=1)
    accuracy = ((lr_w > lr_l).double() * v).sum() / v.sum().clamp(min=1)
    loss.backward()
    return loss.detach(), lr_w.detach(), lr_l.detach(), accuracy, p.grad


def run(inputs, valid, mode, backend, beta=None, eps=EPS):
    """(LossOutput, gradient of the loss w.r.t. the policy tensor)."""
    p = inputs[0].clone().requires_grad_(True)
    out = spo_loss(p, *inputs[1:], valid, BETA[mode] if beta is None else beta, eps, mode=mode, backend=backend)
    out.loss.backward()
    return out, p.grad


def assert_rule(name, kernel, reference, truth, atol):
    err_k = (kernel.double() - truth).abs().max().item()
    err_r = (reference.double() - truth).abs().max().item()
    assert err_k <= 2 * err_r + atol, f"{name}: kernel error {err_k:.3e} > 2 x reference error {err_r:.3e} + {atol:.1e}"


def check_against_truth(mode, inputs, valid, dtype):
    """The accuracy rule (module docstring) for loss, log-ratios and gradient; accuracy counts exactly."""
    truth = truth64(mode, *inputs, valid, BETA[mode], EPS)
    low = [t.to(dtype) for t in inputs]
    k_out, k_grad = run(low, valid, mode, "triton")
    r_out, r_grad = run(low, valid, mode, "torch")
    assert k_out.loss.dtype == torch.float32 and k_out.log_ratio_win.dtype == torch.float32
    assert k_grad.dtype == dtype and k_grad.shape == inputs[0].shape
    assert torch.isfinite(k_out.loss) and torch.isfinite(k_grad).all()
    t_loss, t_lr_w, t_lr_l, t_acc, t_grad = truth
    assert_rule("loss", k_out.loss, r_out.loss, t_loss, 1e-6 * max(1.0, t_loss.abs().item()))
    lr_scale = max(t_lr_w.abs().max().item(), t_lr_l.abs().max().item())
    assert_rule("log_ratio_win", k_out.log_ratio_win, r_out.log_ratio_win, t_lr_w, 1e-6 * lr_scale)
    assert_rule("log_ratio_lose", k_out.log_ratio_lose, r_out.log_ratio_lose, t_lr_l, 1e-6 * lr_scale)
    g_scale = t_grad.abs().max().item()
    assert g_scale > 0  # some valid pair has a ratio inside the clamp: the gradient test means something
    assert_rule("grad", k_grad, r_grad, t_grad, (1e-6 + torch.finfo(dtype).eps / 2) * g_scale)
    assert k_out.accuracy.item() == r_out.accuracy.item()
    if dtype == torch.float32:
        assert k_out.accuracy.item() == pytest.approx(t_acc.item(), abs=1e-7)
    return k_out, k_grad


def pair_valid(n):
    return torch.tensor([i % 3 != 1 for i in range(n)])  # N >= 2: some invalid pairs


# --------------------------------------------------------------------------- forward and gradient, fp32

CASES = [  # (mode, N, CHW, policy form, reference form)
    ("spo", 1, (3, 5, 7), "shared", "shared"),
    ("spo", 2, (3, 5, 7), "shared", "shared"),
    ("spo", 4, (3, 5, 7), "sided", "sided"),
    ("spo", 5, (3, 5, 7), "shared", "sided"),
    ("spo", 4, (3, 5, 7), "sided", "shared"),
    ("spo", 2, (5, 40, 25), "shared", "shared"),  # 5000 = one full 4096 chunk + a ragged one
    ("spo", 1, (4, 128, 128), "shared", "shared"),  # SDXL latent: 16 chunks
    ("dpo", 1, (3, 5, 7), "sided", "sided"),
    ("dpo", 2, (3, 5, 7), "sided", "sided"),
    ("dpo", 4, (3, 5, 7), "sided", "sided"),
    ("dpo", 3, (5, 40, 25), "sided", "sided"),
    ("dpo", 3, (3, 5, 7), "shared", "shared"),
    ("dpo", 1, (4, 128, 128), "sided", "sided"),
]


@needs_interpreter
@pytest.mark.parametrize("mode,n,chw,pol_form,ref_form", CASES,
                         ids=[f"{m}-N{n}-{'x'.join(map(str, c))}-pol_{p}-ref_{r}" for m, n, c, p, r in CASES])
def test_forward_and_gradient_match_reference(mode, n, chw, pol_form, ref_form):
    inputs = make_case(mode, n, chw, pol_form, ref_form, seed=n * 31 + sum(chw))
    check_against_truth(mode, inputs, pair_valid(n), torch.float32)


# --------------------------------------------------------------------------- every dtype


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,pol_form", [("spo", "shared"), ("spo", "sided"), ("dpo", "sided")])
def test_dtypes_within_twice_the_references_error(dtype, mode, pol_form):
    n, chw = 5, (3, 5, 7)
    inputs = make_case(mode, n, chw, pol_form, pol_form, seed=7)
    check_against_truth(mode, inputs, pair_valid(n), dtype)


@needs_interpreter
def test_deterministic():
    inputs = make_case("spo", 3, (5, 40, 25), "sided", "shared", seed=2)
    valid = pair_valid(3)
    (a, ga), (b, gb) = run(inputs, valid, "spo", "triton"), run(inputs, valid, "spo", "triton")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.log_ratio_win, b.log_ratio_win)
    assert torch.equal(ga, gb)


# --------------------------------------------------------------------------- no valid pair


@needs_interpreter
@pytest.mark.parametrize("mode,form", [("spo", "shared"), ("spo", "sided"), ("dpo", "sided")])
def test_zero_valid_pairs(mode, form):
    n = 4
    inputs = make_case(mode, n, (3, 5, 7), form, form, seed=11)
    for valid in (torch.zeros(n, dtype=torch.bool), torch.zeros(n)):
        out, grad = run(inputs, valid, mode, "triton")
        assert out.loss.item() == 0.0 and out.accuracy.item() == 0.0
        assert torch.isfinite(out.log_ratio_win).all() and torch.isfinite(out.log_ratio_lose).all()
        assert grad is not None and grad.shape == inputs[0].shape
        assert torch.all(grad == 0)


def test_empty_batch():
    inputs = [t[:, :0] if t.dim() == 5 else t[:0] for t in make_case("spo", 2, (3, 5, 7), "sided", "shared", 1)]
    out, grad = run(inputs, torch.zeros(0, dtype=torch.bool), "spo", "triton")
    assert out.loss.item() == 0.0 and out.log_ratio_win.shape == (0,) and grad.shape == inputs[0].shape


# --------------------------------------------------------------------------- the clamp


@needs_interpreter
@pytest.mark.parametrize("form", ["shared", "sided"])
def test_clamp_inside_and_outside_in_one_batch(form):
    """Pairs: both inside, win outside, lose outside, both outside. A side outside the clamp gets no
    gradient; a pair with both outside none at all (and there L is a constant)."""
    targets = [(0.04, -0.03), (0.3, 0.05), (-0.02, -0.4), (0.5, -0.6)]
    inputs = make_case("spo", 4, (3, 5, 7), form, form, seed=5, targets=targets)
    valid = torch.ones(4, dtype=torch.bool)
    out, grad = check_against_truth("spo", inputs, valid, torch.float32)
    lo, hi = math.log(1 - EPS), math.log(1 + EPS)
    outside = [[not (lo <= v <= hi) for v in lr.tolist()] for lr in (out.log_ratio_win, out.log_ratio_lose)]
    assert outside == [[False, True, False, True], [False, False, True, True]]
    per_pair = grad if form == "shared" else grad.transpose(0, 1)  # (N, ...) or (N, 2, ...)
    assert torch.all(per_pair[3] == 0)
    assert all(per_pair[i].abs().max() > 0 for i in range(3))
    if form == "sided":
        assert torch.all(per_pair[1, 0] == 0) and per_pair[1, 1].abs().max() > 0  # win clamped
        assert torch.all(per_pair[2, 1] == 0) and per_pair[2, 0].abs().max() > 0  # lose clamped


@needs_interpreter
@pytest.mark.parametrize("side", ["win", "lose"])
def test_clamp_bound_passes_gradient_like_torch_clamp(side):
    """A ratio exactly on the bound passes its gradient (torch.clamp's rule); just past it, none."""
    targets = [(0.05, -0.02)] if side == "win" else [(0.02, -0.05)]
    inputs = make_case("spo", 1, (3, 5, 7), "sided", "sided", seed=3, targets=targets)
    valid = torch.ones(1, dtype=torch.bool)
    out, free = run(inputs, valid, "spo", "triton", eps=0.5)  # both ratios well inside
    k = 0 if side == "win" else 1
    lr = float((out.log_ratio_win if side == "win" else out.log_ratio_lose)[0])
    eps_on_bound = math.expm1(lr) if side == "win" else -math.expm1(lr)  # log(1 + eps) or log(1 - eps) = lr
    bound = math.log(1 + eps_on_bound) if side == "win" else math.log(1 - eps_on_bound)
    assert torch.tensor(bound, dtype=torch.float32).item() == lr  # exactly on the bound in fp32
    _, on_bound = run(inputs, valid, "spo", "triton", eps=eps_on_bound)
    assert torch.equal(on_bound, free) and free[k].abs().max() > 0
    _, past = run(inputs, valid, "spo", "triton", eps=eps_on_bound * 0.99)
    assert torch.all(past[k] == 0) and past[1 - k].abs().max() > 0


# --------------------------------------------------------------------------- inputs the launcher handles


@needs_interpreter
def test_strided_and_non_contiguous_inputs():
    """The trainer's x_prev[:, 0] (strided sample axis) and a (2, N) view of an (N, 2) buffer are read in
    place; a policy with transposed H, W is copied. Results as for contiguous inputs."""
    n, chw = 3, (3, 5, 7)
    pol, ref, xw, xl, sigma = make_case("spo", n, chw, "sided", "sided", seed=21)
    valid = pair_valid(n)
    x_prev = torch.stack([xw, xl], 1)  # (N, 2, C, H, W), as the rollout buffer holds it
    ref_buf = ref.transpose(0, 1).contiguous()  # (N, 2, C, H, W)
    pol_t = pol.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, CHW not contiguous
    strided = [pol_t, ref_buf.transpose(0, 1), x_prev[:, 0], x_prev[:, 1], sigma]
    assert not strided[2].is_contiguous() and not strided[1].is_contiguous() and not pol_t.is_contiguous()
    a, ga = run(strided, valid, "spo", "triton")
    b, gb = run([pol, ref, xw, xl, sigma], valid, "spo", "triton")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.log_ratio_lose, b.log_ratio_lose)
    assert torch.equal(ga, gb)


def test_launcher_names_the_offending_tensor():
    n = 2
    pol, ref, xw, xl, sigma = make_case("spo", n, (3, 5, 7), "shared", "shared", seed=4)
    valid = torch.ones(n, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"x_lose \(2, 3, 5, 7\) torch.float64"):
        spo_loss(pol, ref, xw, xl.double(), sigma, valid, backend="triton")
    with pytest.raises(TypeError, match=r"ref_mean \(2, 3, 5, 7\) torch.float16 .*policy_mean"):
        spo_loss(pol, ref.half(), xw, xl, sigma, valid, backend="triton")
    with pytest.raises(ValueError, match=r"policy_mean has shape \(2, 3, 5, 6\)"):
        spo_loss(pol[..., :6], ref, xw, xl, sigma, valid, backend="triton")
    with pytest.raises(ValueError, match=r"sigma \(2,\) torch.float32 on meta"):
        spo_loss_mod._check_kernel_inputs(pol, ref, xw, xl, sigma.to("meta"), valid)
    with pytest.raises(ValueError, match=r"mode is 'ipo'; expected one of spo\|dpo"):
        spo_loss(pol, ref, xw, xl, sigma, valid, mode="ipo", backend="triton")


# --------------------------------------------------------------------------- dispatch


def test_env_torch_forces_the_reference(monkeypatch):
    inputs = make_case("spo", 3, (3, 5, 7), "shared", "shared", seed=8)
    valid = pair_valid(3)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr(spo_loss_mod, "_spo_loss_triton", no_kernel)
    monkeypatch.setenv("SPO_FAST_KERNELS", "torch")
    out = spo_loss(*inputs, valid)
    assert torch.equal(out.loss, spo_loss_reference(*inputs, valid, 10.0, 0.1).loss)
    monkeypatch.setenv("SPO_FAST_KERNELS", "auto")  # CPU + TRITON_INTERPRET=1: auto picks the kernel
    with pytest.raises(AssertionError, match="Triton path ran"):
        spo_loss(*inputs, valid)
    monkeypatch.setenv("SPO_FAST_KERNELS", "triton")  # the argument wins over the variable
    spo_loss(*inputs, valid, backend="torch")


def test_resolve_backend_rules(monkeypatch):
    cpu = [torch.randn(2)]
    assert resolve_backend(None, cpu) == "triton"  # auto, interpreter on
    monkeypatch.delenv("TRITON_INTERPRET")
    assert resolve_backend(None, cpu) == "torch"  # auto, interpreter off
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("SPO_FAST_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="SPO_FAST_KERNELS=triton.*CPU.*TRITON_INTERPRET=1"):
        resolve_backend(None, cpu)
    with pytest.raises(RuntimeError, match="backend argument=triton.*TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(RuntimeError, match="meta"):
        resolve_backend("triton", [torch.empty(2, device="meta")])
    monkeypatch.setenv("SPO_FAST_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"SPO_FAST_KERNELS is 'cuda'; expected one of torch\|triton\|auto"):
        resolve_backend(None, cpu)
    with pytest.raises(ValueError, match=r"backend argument is 'Triton'; expected one of torch\|triton\|auto"):
        resolve_backend("Triton", cpu)


def test_resolve_backend_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    cpu = [torch.randn(2)]
    assert resolve_backend(None, cpu) == "torch"  # auto, interpreter on, but no triton
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        resolve_backend("triton", cpu)


def test_import_and_cpu_fallback_without_triton():
    """A fresh process: importing the kernels imports no triton, and with triton unavailable the auto
    backend computes the loss with the reference."""
    code = (
        "import sys, torch\n"
        "import spo_fast.kernels, spo_fast.kernels.spo_loss as m\n"
        "assert 'triton' not in sys.modules, 'importing spo_fast.kernels imported triton'\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "args = (x + 0.1, x, torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.ones(2), torch.ones(2))\n"
        "m.spo_loss(*args)\n"
        "assert 'triton' not in sys.modules, 'the CPU auto path imported triton'\n"
        "sys.modules['triton'] = None\n"
        "print(float(m.spo_loss(*args, mode='dpo', backend='auto').loss))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPO_FAST_KERNELS")}
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert math.isfinite(float(proc.stdout.strip().splitlines()[-1]))
