"""Batched reward scoring and pair selection (spo_fast.kernels.pair_select) against its reference and
spo_fast.diffusion.rollout.select_pairs, on CPU under Triton's interpreter: scores per dtype, win/lose/valid/cont, ties,
the continuation draws (given u, and the in-kernel Philox draws), launcher errors and the backend dispatch.

Accuracy rule (as in test_ddim_step_triton): the kernel's score error against the exact value is at most twice
the PyTorch reference's own error in that dtype, plus atol = 1e-6 * logit_scale (fp32 arithmetic on unit
vectors). "Exact" is the formula in float64 on the fp32 features before they are cast to the tested dtype.
The selections (win, lose, valid) must equal the reference's selection computed on the kernel's own scores.
"""
import os

# See test_spo_loss_triton: set before anything imports triton, reset after the imports, set per test.
_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
import spo_fast.kernels.pair_select as ps_mod
from spo_fast.diffusion.rollout import select_pairs
from spo_fast.kernels.pair_select import (
    philox_uniform,
    score_and_select,
    score_and_select_reference,
    select_from_scores,
)
from spo_fast.kernels.philox import rng_state

if _INTERPRET_BEFORE is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE


pytestmark = pytest.mark.usefixtures("triton_interpreter")
needs_interpreter = pytest.mark.usefixtures("interpreted_kernels")  # conftest: skip unless interpretable


def triton_kernels():
    """The jitted kernels ``interpreted_kernels`` checks."""
    return ps_mod._kernels()

SCALE = 5.0  # logit_scale: score gaps of a few units, so thresholds in [0, 1) split pools both ways


def make_case(b, k, d, seed):
    """fp32 img (B*k, D) with varied row norms, L2-normalised txt (B, D), u (B,) in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b * k, d, generator=g) * (0.1 + 3 * torch.rand(b * k, 1, generator=g))
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    return img, txt, torch.rand(b, generator=g)


def truth64(img, txt, scale, k):
    b, d = txt.shape
    f = img.double() / img.double().norm(dim=-1, keepdim=True)
    return scale * (f.view(b, k, d) * txt.double()[:, None]).sum(-1)


def assert_rule(name, kernel, reference, truth, atol):
    assert kernel.shape == truth.shape, name
    err_k = (kernel.double() - truth).abs().max().item()
    err_r = (reference.double() - truth).abs().max().item()
    assert err_k <= 2 * err_r + atol, f"{name}: kernel error {err_k:.3e} > 2 x reference error {err_r:.3e} + {atol:.1e}"


def assert_selection(s, threshold, u):
    """win/lose/valid/cont equal the reference's selection on the kernel's own scores."""
    win, lose, valid, cont = select_from_scores(s.scores, threshold, u)
    assert s.win.dtype == torch.int64 and s.lose.dtype == torch.int64 and s.cont.dtype == torch.int64
    assert s.valid.dtype == torch.bool
    assert torch.equal(s.win, win) and torch.equal(s.lose, lose)
    assert torch.equal(s.valid, valid) and torch.equal(s.cont, cont)


# --------------------------------------------------------------------------- forward vs the reference

CASES = [(1, 2, 20), (2, 4, 64), (3, 3, 1024), (5, 4, 37), (2, 7, 200)]  # (B, k, D): D off the block, odd k


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,k,d", CASES, ids=[f"B{b}-k{k}-D{d}" for b, k, d in CASES])
def test_forward_matches_reference(b, k, d, dtype):
    img, txt, u = make_case(b, k, d, seed=b * 1000 + k * 10 + d)
    il, tl_ = img.to(dtype), txt.to(dtype)
    truth = truth64(img, txt, SCALE, k)
    for threshold in (0.0, 0.3, 0.9):
        s = score_and_select(il, tl_, SCALE, k, threshold, u, backend="triton")
        r = score_and_select_reference(il, tl_, SCALE, k, threshold, u)
        assert s.scores.dtype == torch.float32 and s.scores.shape == (b, k)
        assert torch.isfinite(s.scores).all()
        assert_rule(f"scores {dtype}", s.scores, r.scores, truth, 1e-6 * SCALE)
        assert_selection(s, threshold, u)
        assert torch.equal(s.cont, r.cont)


@needs_interpreter
def test_clip_sized_batch_and_strided_rows():
    """B=8 pools of k=4 at D=768 and logit_scale=100 (CLIP's); img a column slice of a wider tensor (row stride
    > D) and a transposed (non-unit stride along D) txt: the launcher reads the slice in place and copies txt."""
    img, txt, u = make_case(8, 4, 768, seed=1)
    wide = torch.randn(32, 1000)
    wide[:, 100:868] = img
    txt_t = txt.t().contiguous().t()
    assert txt_t.stride(-1) != 1
    s = score_and_select(wide[:, 100:868], txt_t, 100.0, 4, 0.3, u, backend="triton")
    r = score_and_select_reference(img, txt, 100.0, 4, 0.3, u)
    assert_rule("scores", s.scores, r.scores, truth64(img, txt, 100.0, 4), 1e-6 * 100)
    assert_selection(s, 0.3, u)


# --------------------------------------------------------------------------- selection semantics


@needs_interpreter
def test_hand_made_pool():
    """txt = e0; rows normalise to cos = 0.6, 0, -1, 1 -> scores 2 * (0.6, 0, -1, 1); win 3, lose 2,
    tanh((2 - -2) / 2) = tanh(2) = 0.964."""
    txt = torch.tensor([[1.0, 0.0]])
    img = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-1.0, 0.0], [5.0, 0.0]])
    for threshold, want in ((0.9, True), (0.97, False)):
        s = score_and_select(img, txt, 2.0, 4, threshold, torch.tensor([0.6]), backend="triton")
        torch.testing.assert_close(s.scores, torch.tensor([[1.2, 0.0, -2.0, 2.0]]), rtol=0, atol=1e-6)
        assert s.win.tolist() == [3] and s.lose.tolist() == [2] and s.valid.tolist() == [want]
        assert s.cont.tolist() == [2]  # floor(0.6 * 4)


@needs_interpreter
def test_ties():
    """Constant scores (identical rows): win = lose = 0 and no valid pair, even at threshold 0; partial ties
    take the first index, like torch.argmax/argmin."""
    g = torch.Generator().manual_seed(2)
    txt = F.normalize(torch.randn(2, 24, generator=g), dim=-1)
    row = torch.randn(1, 24, generator=g)
    img = row.repeat(8, 1)  # pools of k=4, all rows equal
    s = score_and_select(img, txt, 100.0, 4, 0.0, torch.zeros(2), backend="triton")
    assert (s.scores == s.scores[:, :1]).all()
    assert s.win.tolist() == [0, 0] and s.lose.tolist() == [0, 0] and s.valid.tolist() == [False, False]
    a, c = torch.randn(1, 24, generator=g), torch.randn(1, 24, generator=g)
    img = torch.cat([c, a, a, c])  # scores (x, y, y, x)
    s = score_and_select(img, txt[:1], 100.0, 4, 0.0, torch.zeros(1), backend="triton")
    hi = 1 if s.scores[0, 1] > s.scores[0, 0] else 0
    assert s.win.tolist() == [hi] and s.lose.tolist() == [1 - hi]
    assert_selection(s, 0.0, torch.zeros(1))


@needs_interpreter
def test_k2_and_b1():
    img, txt, u = make_case(1, 2, 20, seed=3)
    s = score_and_select(img, txt, SCALE, 2, 0.3, u, backend="triton")
    assert sorted([s.win.item(), s.lose.item()]) == [0, 1]
    assert_selection(s, 0.3, u)


@needs_interpreter
def test_agrees_with_rollout_select_pairs():
    img, txt, u = make_case(16, 4, 48, seed=4)
    n_valid = []
    for threshold in (0.0, 0.3, 0.6, 0.95):
        s = score_and_select(img, txt, SCALE, 4, threshold, u, backend="triton")
        n_valid.append(int(s.valid.sum()))
        win, lose, valid, cont = select_pairs(s.scores, threshold, 4, rng_state(0))
        assert torch.equal(s.win, win) and torch.equal(s.lose, lose) and torch.equal(s.valid, valid)
        assert cont.dtype == s.cont.dtype and ((s.cont >= 0) & (s.cont < 4)).all()
        # without u the op draws the continuation from the same state as select_pairs: the same indices
        assert torch.equal(score_and_select(img, txt, SCALE, 4, threshold, seed=rng_state(0), backend="triton").cont,
                           cont)
    assert n_valid[0] == 16 and 0 < min(n_valid[1:3]) and min(n_valid[1:3]) < 16, n_valid  # both outcomes seen


# --------------------------------------------------------------------------- continuation indices


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cont_from_u_edges(backend):
    """cont = min(floor(u * k), k - 1): 0 at u = 0, k - 1 just below 1 (and at u = 1, clamped)."""
    img, txt, _ = make_case(5, 3, 16, seed=5)
    u = torch.tensor([0.0, 1 / 3 - 1e-6, 1 / 3 + 1e-6, 1 - 2**-24, 1.0])
    s = score_and_select(img, txt, SCALE, 3, 0.3, u, backend=backend)
    assert s.cont.tolist() == [0, 0, 1, 2, 2]


@needs_interpreter
def test_seeded_cont_uses_documented_draws():
    img, txt, _ = make_case(64, 4, 16, seed=6)
    a = score_and_select(img, txt, SCALE, 4, 0.3, seed=7, offset=100, backend="triton")
    assert torch.equal(a.cont, (philox_uniform(7, 100, 64) * 4).floor().long())
    assert torch.equal(a.cont, score_and_select(img, txt, SCALE, 4, 0.3, seed=7, offset=100, backend="triton").cont)
    assert not torch.equal(a.cont, score_and_select(img, txt, SCALE, 4, 0.3, seed=8, offset=100,
                                                    backend="triton").cont)
    assert not torch.equal(a.cont, score_and_select(img, txt, SCALE, 4, 0.3, seed=7, offset=101,
                                                    backend="triton").cont)
    ref = score_and_select_reference(img, txt, SCALE, 4, 0.3, philox_uniform(7, 100, 64))
    assert torch.equal(a.cont, ref.cont)


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_seeded_cont_roughly_uniform(backend):
    """B = 400 pools of k = 5: each index within 5 sigma of B / k, reproducible, in range."""
    b, k = 400, 5
    img, txt, _ = make_case(b, k, 16, seed=9)
    s = score_and_select(img, txt, SCALE, k, 0.3, seed=11, offset=3, backend=backend)
    assert ((s.cont >= 0) & (s.cont < k)).all()
    counts = torch.bincount(s.cont, minlength=k).double()
    p = 1 / k
    assert ((counts - b * p).abs() < 5 * math.sqrt(b * p * (1 - p))).all(), counts.tolist()
    assert torch.equal(s.cont, score_and_select(img, txt, SCALE, k, 0.3, seed=11, offset=3, backend=backend).cont)


@needs_interpreter
def test_philox_uniform_distribution():
    u = philox_uniform(2024, 0, 100_000).double()
    assert ((u >= 0) & (u < 1)).all()
    n = u.numel()
    us = u.sort().values
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - us, us - (i - 1) / n).max().item()
    assert ks < 1.95 / math.sqrt(n), f"KS statistic {ks:.4f}"


# --------------------------------------------------------------------------- errors and dispatch


def test_launcher_names_the_offending_argument():
    img, txt, u = make_case(2, 4, 20, seed=12)
    with pytest.raises(ValueError, match=r"img has shape \(7, 20\); expected \(B \* k, D\) = \(8, 20\)"):
        score_and_select(img[:7], txt, SCALE, 4, 0.3, u, backend="triton")
    with pytest.raises(ValueError, match=r"txt has shape \(40,\); expected \(B, D\)"):
        score_and_select(img, txt.flatten(), SCALE, 4, 0.3, u, backend="triton")
    with pytest.raises(TypeError, match=r"txt \(2, 20\) torch.float64"):
        score_and_select(img, txt.double(), SCALE, 4, 0.3, u, backend="triton")
    with pytest.raises(TypeError, match=r"img is torch.int64"):
        score_and_select(img.long(), txt, SCALE, 4, 0.3, u, backend="triton")
    with pytest.raises(ValueError, match=r"u has shape \(3,\); expected \(2,\)"):
        score_and_select(img, txt, SCALE, 4, 0.3, torch.rand(3), backend="triton")
    with pytest.raises(TypeError, match=r"u is torch.int64"):
        score_and_select(img, txt, SCALE, 4, 0.3, torch.zeros(2, dtype=torch.long), backend="triton")
    for bad_k in (0, -1, 2.0):
        with pytest.raises(ValueError, match=rf"k is {bad_k}; expected an int >= 1"):
            score_and_select(img, txt, SCALE, bad_k, 0.3, u, backend="triton")
    with pytest.raises(ValueError, match=r"seed is -1"):
        score_and_select(img, txt, SCALE, 4, 0.3, seed=-1, backend="triton")
    with pytest.raises(ValueError, match=r"offset is -2"):
        score_and_select(img, txt, SCALE, 4, 0.3, seed=0, offset=-2, backend="torch")
    with pytest.raises(ValueError, match=r"u \(2,\) torch.float32 on meta"):
        ps_mod._check_kernel_inputs(img, txt, 4, u.to("meta"))
    with pytest.raises(ValueError, match=r"k is 65; the Triton pair selection takes at most 64"):
        score_and_select(torch.zeros(65, 3), torch.zeros(1, 3), SCALE, 65, 0.3, backend="triton")
    with pytest.raises(ValueError, match=r"no features"):
        score_and_select(torch.zeros(4, 0), torch.zeros(1, 0), SCALE, 4, 0.3, backend="triton")


def test_triton_backend_without_a_usable_device(monkeypatch):
    img, txt, u = make_case(2, 4, 20, seed=13)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="backend argument=triton.*TRITON_INTERPRET=1"):
        score_and_select(img, txt, SCALE, 4, 0.3, u, backend="triton")
    monkeypatch.setenv("SPO_FAST_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="SPO_FAST_KERNELS=triton.*TRITON_INTERPRET=1"):
        score_and_select(img, txt, SCALE, 4, 0.3, u)
    with pytest.raises(RuntimeError, match="meta"):
        score_and_select(img.to("meta"), txt.to("meta"), SCALE, 4, 0.3, backend="triton")


def test_auto_dispatch(monkeypatch):
    img, txt, u = make_case(2, 4, 20, seed=14)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr(ps_mod, "_score_and_select_triton", no_kernel)
    with pytest.raises(AssertionError, match="Triton path ran"):  # CPU + TRITON_INTERPRET=1: auto picks Triton
        score_and_select(img, txt, SCALE, 4, 0.3, u)
    monkeypatch.delenv("TRITON_INTERPRET")
    a = score_and_select(img, txt, SCALE, 4, 0.3, u)  # auto, interpreter off: the torch reference
    monkeypatch.setenv("SPO_FAST_KERNELS", "torch")
    b = score_and_select(img, txt, SCALE, 4, 0.3, u)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.cont, b.cont)
    assert torch.equal(a.scores, score_and_select_reference(img, txt, SCALE, 4, 0.3, u).scores)
