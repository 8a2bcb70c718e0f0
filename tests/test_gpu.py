"""GPU-only checks (marked ``gpu``; skipped on CPU): the compiled Triton kernels against their PyTorch references at
the recipe sizes, and the rollout with ``sampling.graphs=cuda_graphs`` / ``compile`` against eager.

Run on a GPU machine with ``SPO_FAST_TEST_GPU=1 python -m pytest -m gpu tests/`` (benchmarks/gpu_suite.sh does;
the variable keeps tests/conftest.py from turning on Triton's interpreter).

Both backends of the step and selection ops draw Triton's Philox stream for one RNG state
(``spo_fast.kernels.philox``), so here a Triton step is compared with the torch step fed the same state: the
noise agrees up to the Box-Muller transform's float rounding (~5e-7 measured on CPU against the interpreter).
"""
import functools

import pytest
import torch

from spo_fast.core.config import SamplingConfig, SPOConfig
from spo_fast.kernels.ddim_step import pooled_ddim_step
from spo_fast.kernels.pair_select import score_and_select
from spo_fast.kernels.philox import rng_state
from spo_fast.kernels.spo_loss import spo_loss

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(10, 4, (4, 64, 64)), (2, 2, (4, 128, 128))], ids=["sd15", "sdxl"])
def test_pooled_step_triton_matches_torch(shape, dtype):
    b, k, chw = shape
    g = torch.Generator(DEV).manual_seed(0)
    x = torch.randn(b, *chw, generator=g, device=DEV).to(dtype)
    out = torch.randn(2 * b, *chw, generator=g, device=DEV).to(dtype)
    at = torch.full((b,), 0.45, device=DEV)
    ap = torch.full((b,), 0.5, device=DEV)
    s_tr, s_to = rng_state(7, DEV), rng_state(7, DEV)
    tr = pooled_ddim_step(x, out, 7.5, at, ap, 1.0, k, s_tr, backend="triton")
    to = pooled_ddim_step(x, out, 7.5, at, ap, 1.0, k, s_to, backend="torch")
    assert torch.equal(s_tr, s_to) and s_tr[1].item() == b * k * x[0].numel()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(tr.x0, to.x0) < 1e-6
    assert _rel(tr.mean, to.mean) < tol
    assert _rel(tr.x_prev, to.x_prev) < tol
    assert torch.allclose(tr.log_prob, to.log_prob, rtol=1e-4, atol=1e-4)


def test_score_and_select_triton_matches_torch():
    b, k, d = 10, 4, 1024
    g = torch.Generator(DEV).manual_seed(1)
    img = torch.randn(b * k, d, generator=g, device=DEV)
    txt = torch.nn.functional.normalize(torch.randn(b, d, generator=g, device=DEV), dim=-1)
    s_tr, s_to = rng_state(3, DEV), rng_state(3, DEV)
    tr = score_and_select(img, txt, 100.0, k, 0.3, seed=s_tr, backend="triton")
    to = score_and_select(img, txt, 100.0, k, 0.3, seed=s_to, backend="torch")
    assert torch.allclose(tr.scores, to.scores, rtol=1e-5, atol=1e-4)
    for name in ("win", "lose", "valid", "cont"):
        assert torch.equal(getattr(tr, name), getattr(to, name)), name
    assert torch.equal(s_tr, s_to)


def test_spo_loss_triton_matches_torch_fwd_bwd():
    n, chw = 10, (4, 64, 64)
    g = torch.Generator(DEV).manual_seed(2)
    pol = torch.randn(n, *chw, generator=g, device=DEV, requires_grad=True)
    ref = pol.detach() + 0.01 * torch.randn(n, *chw, generator=g, device=DEV)
    xw = pol.detach() + 0.1 * torch.randn(n, *chw, generator=g, device=DEV)
    xl = pol.detach() + 0.1 * torch.randn(n, *chw, generator=g, device=DEV)
    sigma = torch.full((n,), 0.3, device=DEV)
    valid = torch.ones(n, device=DEV)
    outs = []
    for backend in ("triton", "torch"):
        p = pol.detach().clone().requires_grad_(True)
        lo = spo_loss(p, ref, xw, xl, sigma, valid, 10.0, 0.1, backend=backend)
        lo.loss.backward()
        outs.append((lo.loss.detach(), p.grad))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    assert _rel(outs[0][1], outs[1][1]) < 1e-5


# ----------------------------------------------------------------------------- rollout graphs vs eager
@pytest.fixture(scope="module")
def tiny_lora():
    from peft import LoraConfig

    from spo_fast.diffusion.models import decode_latents, encode_prompts, load_components
    from spo_fast.diffusion.sampling import DDIMSchedule
    from spo_fast.reward.scorers import ColorScorer

    comp = load_components("arch:tiny_sd15", "sd15", "random", seed=0)
    comp.unet.to(DEV)
    comp.vae.to(DEV)
    for te in comp.text_encoders:
        te.to(DEV)
    comp.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    comp.unet.eval()
    prompts = ["a red cube", "a blue ball", "a green cone"]
    return {"comp": comp, "cond": encode_prompts(comp, prompts, DEV, 16),
            "uncond": encode_prompts(comp, [""] * 3, DEV, 16), "scorer": ColorScorer(), "prompts": prompts,
            "schedule": DDIMSchedule.from_scheduler(comp.scheduler, 8, device=DEV),
            "decode": functools.partial(decode_latents, comp)}


def _rollout(t, calls, seed):
    from spo_fast.diffusion.rollout import rollout

    spo = SPOConfig(k=3, divert_start_step=2, num_inner_steps=1, threshold=0.0)
    sampling = SamplingConfig(num_steps=8, eta=1.0, guidance_scale=5.0)
    noise = torch.randn(3, *t["comp"].latent_shape, generator=torch.Generator(DEV).manual_seed(seed), device=DEV)
    return rollout(t["comp"].unet, t["schedule"], t["cond"], t["uncond"], t["scorer"],
                   t["scorer"].prepare(t["prompts"]), t["decode"], noise, spo, sampling,
                   torch.Generator(DEV).manual_seed(seed), calls=calls)


@pytest.mark.parametrize("mode", ["cuda_graphs", "compile"])
def test_rollout_graphs_equal_eager_across_weight_updates(tiny_lora, mode):
    """Graphs are captured at the first rollout; after an in-place update of the LoRA weights (what the optimizer
    does) the replayed rollout must follow the new weights, equal to eager's."""
    from spo_fast.diffusion.rollout import RolloutCalls

    t = tiny_lora
    graphed = RolloutCalls(t["comp"].unet, t["decode"], t["scorer"], mode, DEV)
    eager = RolloutCalls(t["comp"].unet, t["decode"], t["scorer"], "off", DEV)
    tol = 1e-5 if mode == "cuda_graphs" else 1e-3  # compile: inductor may reorder float sums
    lora = [p for n, p in t["comp"].unet.named_parameters() if "lora_B" in n]
    for round_ in range(3):
        a, b = _rollout(t, graphed, 10 + round_), _rollout(t, eager, 10 + round_)
        assert _rel(a.x_prev, b.x_prev) < tol and _rel(a.final, b.final) < tol
        if mode == "cuda_graphs":
            assert torch.equal(a.valid, b.valid)
        with torch.no_grad():
            for p in lora:
                p.add_(0.05 * torch.randn_like(p))
    if mode == "cuda_graphs":
        assert len(graphed._halves.graphs) == 2  # the B and the B*k UNet calls, captured once each


def test_graphed_call_replays_new_inputs():
    from spo_fast.diffusion.graphs import GraphedCall

    w = torch.randn(64, 64, device=DEV)
    f = GraphedCall(lambda x, y: (x @ w + 1, y * 2))
    for s in range(3):
        x, y = torch.randn(8, 64, device=DEV), torch.randn(5, device=DEV)
        a, b = f(x, y)
        assert torch.allclose(a, x @ w + 1, atol=1e-4) and torch.equal(b, y * 2)
    w.mul_(2)  # the graph reads w in place
    x = torch.randn(8, 64, device=DEV)
    assert torch.allclose(f(x, y)[0], x @ w + 1, atol=1e-4)
    assert len(f.graphs) == 1
