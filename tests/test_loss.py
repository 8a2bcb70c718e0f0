"""Tests for the SPO loss (spo_fast.kernels.spo_loss) against an independent float64 computation."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch

from spo_fast.kernels.spo_loss import LossOutput, spo_loss, spo_loss_reference

CHW = (3, 5, 7)


# --------------------------------------------------------------------------- independent float64 version


def _softplus(v: float) -> float:
    """log(1 + exp(v)) without overflow."""
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _sides(mean, n_dims):
    return (mean, mean) if mean.dim() == n_dims else (mean[0], mean[1])


def _raw_diffs(pol, ref, xw, xl):
    """(N,) mean_CHW((x - mu_ref)^2 - (x - mu_pol)^2) for the win and lose sides, float64."""
    pw, pl = _sides(pol.double(), xw.dim())
    rw, rl = _sides(ref.double(), xw.dim())
    xw, xl = xw.double(), xl.double()
    dw = torch.stack([((xw[n] - rw[n]) ** 2 - (xw[n] - pw[n]) ** 2).mean() for n in range(xw.shape[0])])
    dl = torch.stack([((xl[n] - rl[n]) ** 2 - (xl[n] - pl[n]) ** 2).mean() for n in range(xw.shape[0])])
    return dw, dl


def indep_loss(pol, ref, xw, xl, sigma, valid, beta, eps, clamp=True):
    """float64, pair by pair. Differentiable w.r.t. pol (autograd); returns (loss, acc, lr_w, lr_l)."""
    dw, dl = _raw_diffs(pol, ref, xw, xl)
    s2 = sigma.double() ** 2
    lr_w, lr_l = dw / (2 * s2), dl / (2 * s2)
    lo, hi = (math.log(1 - eps), math.log(1 + eps)) if clamp else (-math.inf, math.inf)
    total = torch.zeros((), dtype=torch.float64)
    n_valid, n_right = 0, 0
    for n in range(xw.shape[0]):
        if not bool(valid[n]):
            continue
        cw = torch.minimum(torch.maximum(lr_w[n], torch.tensor(lo, dtype=torch.float64)),
                           torch.tensor(hi, dtype=torch.float64))
        cl = torch.minimum(torch.maximum(lr_l[n], torch.tensor(lo, dtype=torch.float64)),
                           torch.tensor(hi, dtype=torch.float64))
        z = beta * (cw - cl)
        # -log sigmoid(z) = log(1 + exp(-z)); written through softplus for autograd
        total = total + torch.nn.functional.softplus(-z)
        n_valid += 1
        n_right += int(lr_w[n].item() > lr_l[n].item())
    denom = max(n_valid, 1)
    return total / denom, n_right / denom, lr_w, lr_l


def indep_loss_scalar(pol, ref, xw, xl, sigma, valid, beta, eps) -> float:
    """The same loss in plain Python floats (no autograd), as a second opinion on the value."""
    dw, dl = _raw_diffs(pol, ref, xw, xl)
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    vals = []
    for n in range(xw.shape[0]):
        if bool(valid[n]):
            s2 = float(sigma[n]) ** 2
            cw = min(max(float(dw[n]) / (2 * s2), lo), hi)
            cl = min(max(float(dl[n]) / (2 * s2), lo), hi)
            vals.append(_softplus(-beta * (cw - cl)))
    return sum(vals) / max(len(vals), 1)


# --------------------------------------------------------------------------- inputs

# Per pair, how sigma is chosen: "in" keeps both |log r| <= 0.05 (inside the clamp for eps >= 0.1),
# "one" puts one side's |log r| at 0.6 (outside) and the other's at 0.03 (inside), alternating
# which side is clamped, "both" puts both |log r| >= 0.6 (both clamped).
KINDS = ("one", "in", "both", "in", "one")


def make_inputs(n, shared_pol, shared_ref, seed, dtype=torch.float32, kinds=KINDS):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    ref = torch.randn(n, *CHW, generator=g, dtype=f64)
    ref2 = ref if shared_ref else torch.stack([ref, ref + 0.05 * torch.randn(n, *CHW, generator=g, dtype=f64)])
    if shared_pol:
        pol = (ref2 if shared_ref else ref2[0]) + 0.2 * torch.randn(n, *CHW, generator=g, dtype=f64)
    else:
        pol = (ref2 if not shared_ref else torch.stack([ref2, ref2]))
        pol = pol + 0.2 * torch.randn(2, n, *CHW, generator=g, dtype=f64)
    xw = ref + 0.7 * torch.randn(n, *CHW, generator=g, dtype=f64)
    xl = ref + 0.7 * torch.randn(n, *CHW, generator=g, dtype=f64)
    pw, pl = _sides(pol, xw.dim())
    rw, rl = _sides(ref2, xw.dim())
    # mean((x - r)^2 - (x - p)^2) = mean((p - r)(2x - r - p)) is affine in x and vanishes at x = (r + p)/2
    # for this pair when p - r is spread out; scaling x about the midpoint scales it: we use that to make
    # one side's raw difference 20x smaller than the other's for the "one" pairs.
    for i in range(n):
        if kinds[i % len(kinds)] == "one":
            dw, dl = _raw_diffs(pol, ref2, xw, xl)
            if i % 2 == 0:  # shrink the lose side: win clamped, lose inside
                c = abs(dw[i].item()) / (20 * abs(dl[i].item()))
                mid = (rl[i] + pl[i]) / 2
                xl[i] = mid + c * (xl[i] - mid)
            else:
                c = abs(dl[i].item()) / (20 * abs(dw[i].item()))
                mid = (rw[i] + pw[i]) / 2
                xw[i] = mid + c * (xw[i] - mid)
    dw, dl = _raw_diffs(pol, ref2, xw, xl)
    sig = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        a, b = abs(dw[i].item()), abs(dl[i].item())
        big, small = max(a, b), min(a, b)
        if kind == "in":
            s2 = big / (2 * 0.05)
        elif kind == "both":
            s2 = small / (2 * 0.6)
        else:
            assert small < big / 10
            s2 = big / (2 * 0.6)
        sig.append(math.sqrt(s2))
    sigma = torch.tensor(sig, dtype=f64)
    return tuple(t.to(dtype) for t in (pol, ref2, xw, xl, sigma))


def clamp_category(lr, eps):
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    return [(v < lo or v > hi) for v in lr.tolist()]


CASES = [  # (N, shared policy, shared ref)
    (1, True, True),
    (3, True, True),
    (3, False, False),
    (5, True, True),
    (5, False, False),
    (4, True, False),
    (4, False, True),
]


# --------------------------------------------------------------------------- value


@pytest.mark.parametrize("n,shared_pol,shared_ref", CASES)
@pytest.mark.parametrize("beta,eps", [(10.0, 0.1), (3.7, 0.25)])
def test_value_matches_independent(n, shared_pol, shared_ref, beta, eps):
    pol, ref, xw, xl, sigma = make_inputs(n, shared_pol, shared_ref, seed=17 * n + int(beta))
    valid = torch.tensor([i % 3 != 1 for i in range(n)])  # N=1: valid; N>=3: some invalid
    out = spo_loss(pol, ref, xw, xl, sigma, valid, beta=beta, ratio_clip=eps)
    assert isinstance(out, LossOutput)
    assert out.loss.shape == () and out.accuracy.shape == ()
    assert out.log_ratio_win.shape == (n,) and out.log_ratio_lose.shape == (n,)

    loss, acc, lr_w, lr_l = indep_loss(pol, ref, xw, xl, sigma, valid, beta, eps)
    # the clamp must matter for this input: some ratios are outside [log(1-eps), log(1+eps)] ...
    cat = clamp_category(lr_w, eps) + clamp_category(lr_l, eps)
    if eps == 0.1:
        assert any(cat) and (n == 1 or not all(cat))
        # ... and dropping it changes the value
        noclamp = indep_loss(pol, ref, xw, xl, sigma, valid, beta, eps, clamp=False)[0]
        assert abs(noclamp.item() - loss.item()) > 1e-3

    assert torch.allclose(out.log_ratio_win.double(), lr_w, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.log_ratio_lose.double(), lr_l, rtol=1e-5, atol=1e-6)
    assert abs(out.loss.item() - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
    assert abs(out.loss.item() - indep_loss_scalar(pol, ref, xw, xl, sigma, valid, beta, eps)) <= 1e-5
    assert abs(out.accuracy.item() - acc) < 1e-7

    # the entry point and the reference agree
    out_ref = spo_loss_reference(pol, ref, xw, xl, sigma, valid, beta, eps)
    assert torch.allclose(out.loss, out_ref.loss, rtol=1e-6, atol=1e-7)


def test_valid_as_float_and_accuracy_counts():
    n = 5
    pol, ref, xw, xl, sigma = make_inputs(n, True, True, seed=3)
    valid_b = torch.tensor([True, True, False, True, True])
    a = spo_loss(pol, ref, xw, xl, sigma, valid_b)
    b = spo_loss(pol, ref, xw, xl, sigma, valid_b.float())
    assert torch.allclose(a.loss, b.loss) and torch.allclose(a.accuracy, b.accuracy)
    right = (a.log_ratio_win > a.log_ratio_lose) & valid_b
    assert a.accuracy.item() == pytest.approx(right.sum().item() / 4)
    # swapping win and lose flips every comparison
    swapped = spo_loss(pol, ref, xl, xw, sigma, valid_b)
    assert swapped.accuracy.item() == pytest.approx(1 - a.accuracy.item()) or \
        bool(((a.log_ratio_win == a.log_ratio_lose) & valid_b).any())
    assert not torch.allclose(swapped.loss, a.loss)


def test_ties_count_as_wrong_and_cost_log2():
    """x_win == x_lose with shared means: equal log-ratios, so L = -log sigmoid(0) = log 2 and
    the pair is not counted as correct (accuracy uses a strict >)."""
    n = 3
    pol, ref, xw, _, sigma = make_inputs(n, True, True, seed=8)
    valid = torch.tensor([True, True, False])
    out = spo_loss(pol, ref, xw, xw.clone(), sigma, valid, beta=10.0, ratio_clip=0.1)
    assert torch.equal(out.log_ratio_win, out.log_ratio_lose)
    assert out.accuracy.item() == 0.0
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)


# --------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("n,shared_pol,shared_ref", CASES)
def test_gradient_matches_independent_autograd(n, shared_pol, shared_ref):
    eps, beta = 0.1, 10.0
    pol, ref, xw, xl, sigma = make_inputs(n, shared_pol, shared_ref, seed=101 + n)
    valid = torch.tensor([i % 3 != 1 for i in range(n)])

    pol32 = pol.clone().requires_grad_(True)
    ref32 = ref.clone().requires_grad_(True)
    xw32, xl32 = xw.clone().requires_grad_(True), xl.clone().requires_grad_(True)
    spo_loss(pol32, ref32, xw32, xl32, sigma, valid, beta, eps).loss.backward()
    assert ref32.grad is None, "gradient leaked into ref_mean"
    assert xw32.grad is None and xl32.grad is None, "gradient leaked into the samples"

    pol64 = pol.double().requires_grad_(True)
    loss64, _, lr_w, lr_l = indep_loss(pol64, ref, xw, xl, sigma, valid, beta, eps)
    loss64.backward()
    g32, g64 = pol32.grad.double(), pol64.grad
    scale = g64.abs().max().item()
    assert scale > 0
    assert (g32 - g64).abs().max().item() <= 1e-5 * scale + 1e-9

    # pairs with both ratios clamped, and invalid pairs, get exactly zero gradient
    out_w, out_l = clamp_category(lr_w.detach(), eps), clamp_category(lr_l.detach(), eps)
    g_pairs = g32 if shared_pol else g32.transpose(0, 1)  # (N, ...) per pair
    saw_zero = saw_nonzero = False
    for i in range(n):
        if not bool(valid[i]) or (out_w[i] and out_l[i]):
            assert torch.all(g_pairs[i] == 0), i
            saw_zero |= bool(valid[i])
        else:
            assert g_pairs[i].abs().max() > 0, i
            saw_nonzero = True
    assert saw_nonzero
    if n >= 3 and shared_pol and shared_ref:
        assert saw_zero  # a valid pair with both ratios clamped was present


def test_gradient_one_side_clamped_flows_to_other_side_only():
    """Unshared means: if only the win ratio is clamped, the win side's mean gets no gradient."""
    eps = 0.1
    pol, ref, xw, xl, sigma = make_inputs(1, False, False, seed=5, kinds=("one",))
    valid = torch.tensor([True])
    lr_w, lr_l = [v / (2 * sigma.double() ** 2) for v in _raw_diffs(pol, ref, xw, xl)]
    cw, cl = clamp_category(lr_w, eps)[0], clamp_category(lr_l, eps)[0]
    assert cw != cl
    p = pol.clone().requires_grad_(True)
    spo_loss(p, ref, xw, xl, sigma, valid, 10.0, eps).loss.backward()
    clamped_side, free_side = (0, 1) if cw else (1, 0)
    assert torch.all(p.grad[clamped_side] == 0)
    assert p.grad[free_side].abs().max() > 0


# --------------------------------------------------------------------------- no valid pair


@pytest.mark.parametrize("shared", [True, False])
def test_all_invalid(shared):
    n = 3
    pol, ref, xw, xl, sigma = make_inputs(n, shared, shared, seed=9)
    for valid in (torch.zeros(n, dtype=torch.bool), torch.zeros(n)):
        p = pol.clone().requires_grad_(True)
        out = spo_loss(p, ref, xw, xl, sigma, valid)
        assert out.loss.item() == 0.0 and out.accuracy.item() == 0.0
        assert torch.isfinite(out.loss) and torch.isfinite(out.accuracy)
        out.loss.backward()
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert torch.all(p.grad == 0)


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False])
def test_low_precision_inputs(dtype, shared):
    n, beta, eps = 5, 10.0, 0.1
    pol, ref, xw, xl, sigma = make_inputs(n, shared, shared, seed=77)
    valid = torch.tensor([True, True, False, True, True])
    truth = spo_loss(pol, ref, xw, xl, sigma, valid, beta, eps)  # fp32 inputs

    low = [t.to(dtype) for t in (pol, ref, xw, xl, sigma)]
    p_low = low[0].clone().requires_grad_(True)
    out = spo_loss(p_low, *low[1:], valid, beta, eps)
    assert out.loss.dtype == torch.float32 and out.log_ratio_win.dtype == torch.float32
    assert torch.isfinite(out.loss)

    # 1) on the rounded inputs the computation itself is fp32-accurate (it upcasts)
    loss64, _, lr_w64, lr_l64 = indep_loss(*[t.double() for t in low], valid, beta, eps)
    assert abs(out.loss.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item()))
    assert torch.allclose(out.log_ratio_win.double(), lr_w64, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.log_ratio_lose.double(), lr_l64, rtol=1e-4, atol=1e-5)

    # 2) against the fp32 result: the input rounding is all the error there is; a low-precision path
    #    may be at most twice as far off as the fp32 reference path run on the same rounded inputs
    ref_low = spo_loss_reference(*low, valid, beta, eps)
    err = abs(out.loss.item() - truth.loss.item())
    ref_err = abs(ref_low.loss.item() - truth.loss.item())
    assert err <= 2 * ref_err + 1e-4, (err, ref_err)
    # and that input rounding is what one expects of the dtype: small, but not zero
    unit = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    assert err < 50 * unit * max(1.0, truth.loss.item())

    # gradient: finite, in the input dtype, close to the float64 gradient on the rounded inputs
    out.loss.backward()
    assert p_low.grad.dtype == dtype and torch.isfinite(p_low.grad).all()
    p64 = low[0].double().requires_grad_(True)
    indep_loss(p64, *[t.double() for t in low[1:]], valid, beta, eps)[0].backward()
    tol = 1e-2 if dtype == torch.float16 else 2e-2
    assert (p_low.grad.double() - p64.grad).abs().max().item() <= tol * p64.grad.abs().max().item()


# --------------------------------------------------------------------------- shapes


def test_bad_shapes_raise_value_error():
    n = 3
    pol, ref, xw, xl, sigma = make_inputs(n, True, True, seed=1)
    valid = torch.ones(n, dtype=torch.bool)

    def raises(shape_in_msg, *args):
        with pytest.raises(ValueError) as info:
            spo_loss(*args)
        assert str(tuple(shape_in_msg)) in str(info.value), str(info.value)
        return str(info.value)

    bad_pol = torch.randn(n, 3, 5, 6)
    msg = raises(bad_pol.shape, bad_pol, ref, xw, xl, sigma, valid)
    assert "policy_mean" in msg
    bad_ref = torch.randn(3, n, *CHW)  # leading dim must be 2 (win side, lose side)
    msg = raises(bad_ref.shape, pol, bad_ref, xw, xl, sigma, valid)
    assert "ref_mean" in msg
    bad_xl = torch.randn(n, 3, 7, 5)
    raises(bad_xl.shape, pol, ref, xw, bad_xl, sigma, valid)
    bad_sigma = torch.rand(n, 1) + 0.5
    raises(bad_sigma.shape, pol, ref, xw, xl, bad_sigma, valid)
    bad_valid = torch.ones(n - 1, dtype=torch.bool)
    raises(bad_valid.shape, pol, ref, xw, xl, sigma, bad_valid)
    bad_pol2 = torch.randn(2, n + 1, *CHW)
    raises(bad_pol2.shape, bad_pol2, ref, xw, xl, sigma, valid)
