"""Tests for spo_fast.kernels.philox: Triton's Philox stream in PyTorch, and the RNG state the ops read and advance
on the device (so a rollout has no host read and no per-call Generator)."""
import math

import pytest
import torch

from spo_fast.kernels.ddim_step import philox_normal, pooled_ddim_step, torch_normal
from spo_fast.kernels.pair_select import philox_uniform, score_and_select
from spo_fast.kernels.philox import philox_normal_torch, philox_uniform_torch, rng_state, state_from_generator


def triton_kernels():
    from spo_fast.kernels import ddim_step, pair_select

    return (*ddim_step._kernels(), *pair_select._kernels())


# seeds and offsets across the 32-bit boundaries of Philox's key and counter words
CASES = [(0, 0), (9, 40), (2**32 + 5, 2**32 - 3), (2**62 + 12345, 2**33 + 7), (2**63 - 1, 0)]


@pytest.mark.parametrize("seed,offset", CASES)
def test_torch_philox_equals_triton(triton_interpreter, interpreted_kernels, seed, offset):
    """Uniforms bit for bit; normals up to the Box-Muller transform's float rounding (libm vs numpy here)."""
    u_tr, u_to = philox_uniform(seed, offset, 4099), philox_uniform_torch(seed, offset, (4099,))
    assert torch.equal(u_tr, u_to)
    z_tr, z_to = philox_normal(seed, offset, (3, 1000)), philox_normal_torch(seed, offset, (3, 1000))
    assert (z_tr - z_to).abs().max().item() < 2e-6
    assert torch.equal(torch_normal(seed, offset, (3, 1000)), z_to)


def test_torch_philox_distribution_and_counters():
    z = philox_normal_torch(11, 0, (200_000,)).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(2e5) and abs(z.std().item() - 1) < 0.01
    u = philox_uniform_torch(11, 0, (200_000,)).double()
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    # counter i of offset o is counter i + 1 of offset o - 1; tensors and ints give the same draws
    assert torch.equal(philox_normal_torch(11, 5, (10,))[1:], philox_normal_torch(11, 6, (9,)))
    assert torch.equal(philox_normal_torch(torch.tensor(11), torch.tensor(5), (10,)), philox_normal_torch(11, 5, (10,)))
    assert not torch.equal(philox_normal_torch(12, 5, (10,)), philox_normal_torch(11, 5, (10,)))


def _step_inputs(b=3, chw=(2, 5, 7)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, *chw, generator=g)
    out = torch.randn(2 * b, *chw, generator=g)
    return x, out, torch.full((b,), 0.45), torch.full((b,), 0.5)


def test_state_is_read_and_advanced_like_ints():
    """A state tensor gives the ints' draws at its offset and advances by the op's draws, so two calls with one
    state equal two calls with offsets 0 and B*k*CHW."""
    x, out, at, ap = _step_inputs()
    k, n = 4, 3 * 4 * 70
    state = rng_state(21)
    a1 = pooled_ddim_step(x, out, 5.0, at, ap, 1.0, k, state, backend="torch")
    assert state.tolist() == [21, n]
    a2 = pooled_ddim_step(x, out, 5.0, at, ap, 1.0, k, state, backend="torch")
    assert state.tolist() == [21, 2 * n]
    b1 = pooled_ddim_step(x, out, 5.0, at, ap, 1.0, k, 21, 0, backend="torch")
    b2 = pooled_ddim_step(x, out, 5.0, at, ap, 1.0, k, 21, n, backend="torch")
    assert torch.equal(a1.x_prev, b1.x_prev) and torch.equal(a2.x_prev, b2.x_prev)
    assert not torch.equal(a1.x_prev, a2.x_prev)
    img, txt = torch.randn(12, 8), torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    s = score_and_select(img, txt, 10.0, 4, 0.3, seed=state, backend="torch")
    assert state.tolist() == [21, 2 * n + 3]
    assert torch.equal(s.cont, score_and_select(img, txt, 10.0, 4, 0.3, seed=21, offset=2 * n, backend="torch").cont)


def test_backends_draw_the_same_step_noise(triton_interpreter, interpreted_kernels):
    """The Triton kernel and the torch path fed one state agree (before: different streams per backend)."""
    x, out, at, ap = _step_inputs()
    s1, s2 = rng_state(5), rng_state(5)
    tr = pooled_ddim_step(x, out, 5.0, at, ap, 1.0, 3, s1, backend="triton")
    to = pooled_ddim_step(x, out, 5.0, at, ap, 1.0, 3, s2, backend="torch")
    assert torch.equal(s1, s2)
    assert (tr.x_prev - to.x_prev).abs().max().item() < 1e-5
    assert torch.allclose(tr.log_prob, to.log_prob, atol=1e-4)
    img, txt = torch.randn(12, 8), torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    a = score_and_select(img, txt, 10.0, 4, 0.3, seed=s1, backend="triton")
    b = score_and_select(img, txt, 10.0, 4, 0.3, seed=s2, backend="torch")
    assert torch.equal(a.cont, b.cont) and torch.equal(s1, s2)


def test_state_from_generator_reads_nothing_on_host(monkeypatch):
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)

    def no_host_read(*a, **kw):
        raise AssertionError("host read")

    monkeypatch.setattr(torch.Tensor, "item", no_host_read)
    monkeypatch.setattr(torch.Tensor, "tolist", no_host_read)
    monkeypatch.setattr(torch.Tensor, "__int__", no_host_read)
    s1, s2 = state_from_generator(g1, "cpu"), state_from_generator(g2, "cpu")
    monkeypatch.undo()
    assert torch.equal(s1, s2) and s1.dtype == torch.int64 and s1[1].item() == 0


def test_bad_state_is_a_clear_error():
    x, out, at, ap = _step_inputs()
    with pytest.raises(ValueError, match=r"RNG state is \(3,\) torch.int64.*expected a \(2,\) int64"):
        pooled_ddim_step(x, out, 5.0, at, ap, 1.0, 2, torch.zeros(3, dtype=torch.int64), backend="torch")
    with pytest.raises(ValueError, match="RNG state is .*torch.float32"):
        pooled_ddim_step(x, out, 5.0, at, ap, 1.0, 2, torch.zeros(2), backend="torch")
    with pytest.raises(ValueError, match="offset is 4 with an RNG state tensor"):
        pooled_ddim_step(x, out, 5.0, at, ap, 1.0, 2, rng_state(1), 4, backend="torch")
