"""The end-to-end benchmarks' machinery on CPU (tiny models, seconds): the stage split and its FLOPs through the
trainer's pieces, the projection and MFU arithmetic of ``benchmarks/e2e.py``, and the speed options (config keys,
their errors before any model is built, what ``trainer.build`` does with them), the random-weight preference model
architectures and the flash-attn processor's reshapes."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from spo_fast.core.config import ConfigError, load_config
from spo_fast.core.profiling import STAGES

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_module(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks folder is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_bench_module("bench_utils")
e2e = _bench_module("e2e")

# A small SPO case: 6 steps (2 plain, 4 branching), k = 2, 2 prompts, every pair valid, the tiny SPM.
TINY_SPO = ("log.report_to=none", "log.progress=false", "log.sample_prompts=0", "checkpoint.resume=never",
            "model.init=random", "model.path=arch:tiny_sd15", "scorer.path=arch:tiny_spm", "scorer.init=random",
            "data.prompts=builtin:toy", "spo.threshold=0.0", "train.mixed_precision=no", "sampling.num_steps=6",
            "spo.divert_start_step=2", "spo.k=2", "train.batch_size=2", "train.train_batch_size=2")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP's spin-waiting
    under oversubscription made one tiny iteration 50-100x slower with two threads (measured: 27 s vs 0.5 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _case(*extra: str) -> "e2e.Case":
    return e2e.Case("tiny", "sd15_spo", "spo", gpu=(), cpu=(*TINY_SPO, *extra))


# ----------------------------------------------------------------------------- stage split and FLOPs
@pytest.fixture
def tiny_run():
    run = e2e.build(_case(), CPU)
    yield run
    e2e.release(run)


def test_stage_split_and_flops_are_collected(tiny_run):
    flops = e2e.flop_pass(tiny_run)
    timed = e2e.timed_pass(tiny_run)
    for name in ("train/ref", "train/policy", "train/backward", "train/optimizer"):
        assert timed.stages[name]["calls"] == timed.n_micro > 0 and timed.stages[name]["seconds"] > 0, name
    for name in ("train/ref", "train/policy", "train/backward"):  # UNet forward / backward FLOPs are attributed
        assert flops.stages[name]["flops"] > 0, name
    # the backward of a forward costs about twice the forward (LoRA: no weight gradients of the frozen base)
    assert flops.stages["train/backward"]["flops"] >= 0.5 * flops.stages["train/policy"]["flops"]
    rollout_stages = [s for s in STAGES if s.startswith("rollout/")]
    import spo_fast.diffusion.rollout

    if "rollout/unet" in Path(spo_fast.diffusion.rollout.__file__).read_text():  # the rollout's ranges, once present
        for name in rollout_stages:
            assert timed.stages[name]["calls"] > 0, name
        assert flops.stages["rollout/unet"]["flops"] > 0 and flops.stages["rollout/decode"]["flops"] > 0
    assert set(timed.stages) <= set(STAGES)
    assert flops.flops_total >= sum(v["flops"] for v in flops.stages.values())
    # 4 branching steps x 2 prompts, all valid; CFG batches: rollout 2*2 per plain step, 2*2*2 per pool
    assert timed.transitions == 8 and timed.n_valid == 8
    assert timed.fwd_equivalents - timed.fwd_rollout == timed.n_micro * (2 * 2) * 4  # ref + policy + 2 x backward

    rounds = [e2e.iteration(tiny_run)]
    info = e2e.summarize(tiny_run, flops, timed, rounds, None, {"flops_per_s": 1e10, "label": "test"})
    assert info["stages"]["train/policy"]["mfu"] > 0 and info["mfu"] > 0
    assert info["rollout_images"] == 4 * 2 * 2 and info["valid_ratio_measured"] == 1.0
    assert info["training_pairs_per_s"] == pytest.approx(8 / info["iteration_s"])
    assert info["iteration_s_at_toy_ratio"] == pytest.approx(
        info["rollout_s"] + e2e.TOY_VALID_RATIO * 8 * info["train_s_per_valid_pair"])


# ----------------------------------------------------------------------------- arithmetic
def test_toy_valid_ratio_is_the_documented_one():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "toy_results_history.md").read_text()
    assert "2,132" in readme and "5,120" in readme
    assert e2e.TOY_VALID_RATIO == 2132 / 5120


def test_targets_say_measured_only_on_a_gpu():
    data = {"cases": {"sd15_spo": {"mfu": 0.06, "projection": {"gpu_hours": 2.2}}, "sdxl_spo": {"peak_mem_gib": 1.0}},
            "environment": {"device": "cpu", "device_name": "a CPU"}}
    cpu = e2e.targets(data)
    assert not cpu["on_gpu"] and all("measured" not in v and v["comparable"] is False
                                     for v in cpu.values() if isinstance(v, dict))
    assert cpu["sd15_spo_recipe_gpu_hours"]["cpu_tiny_architectures"] == 2.2
    data["environment"]["device"] = "cuda:0"
    gpu = e2e.targets(data)
    assert gpu["sd15_spo_mfu"] == {"target_min": 0.45, "measured": 0.06, "comparable": True}


def test_projection_arithmetic():
    p = e2e.project_spo_hours(rollout_s=3.0, train_s_per_valid_pair=0.05, transitions_per_iteration=160,
                              valid_ratio=0.5, prompts=4000, epochs=10, batch_per_gpu=10, gpus=4)
    assert p["iterations"] == 4000 and p["valid_pairs_per_iteration"] == 80
    assert p["iteration_s"] == pytest.approx(3.0 + 80 * 0.05)
    assert p["gpu_hours"] == pytest.approx(4000 * 7.0 / 3600) and p["wall_hours"] == pytest.approx(p["gpu_hours"] / 4)
    assert e2e.project_spo_hours(1.0, 0.0, 32, 0.4, 4000, 10, 2)["iterations"] == 20000  # SDXL: 2 per GPU
    assert e2e.project_spo_hours(1.0, 0.0, 1, 0.4, 5, 1, 2)["iterations"] == 3  # a partial last batch counts
    d = e2e.project_dpo_hours(step_s=9.0, steps=2000, gpus=8)
    assert d["gpu_hours"] == pytest.approx(2000 * 9 * 8 / 3600) and d["wall_hours"] == pytest.approx(5.0)
    assert e2e.extrapolate_step(10.0, 2.0, 8, 64) == pytest.approx(8.0 / 8 * 64 + 2.0)
    assert e2e.mfu(4e12, 2.0, 1e12) == 2.0 and e2e.mfu(1.0, 0.0, 1e12) is None
    assert e2e.spo_scored_images(20, 4, 0, 10, 4) == 16 * 10 * 4  # SD1.5: a pool at every step from 4
    assert e2e.spo_scored_images(20, 4, 3, 2, 2) == 4 * 2 * 2  # SDXL: branch at 4, 8, 12, 16


def test_stage_split_scales_flops_by_calls():
    flop_pass = {"train/policy": {"flops": 100, "calls": 2, "seconds": 9.0}}
    timed = {"train/policy": {"flops": 0, "calls": 3, "seconds": 1.5}, "rollout/step": {"flops": 0, "calls": 4,
                                                                                       "seconds": 0.5}}
    out = e2e.stage_split(flop_pass, timed, peak_flops_per_s=100.0)
    assert out["train/policy"]["flops"] == 150 and out["train/policy"]["mfu"] == pytest.approx(1.0)
    assert out["rollout/step"]["flops"] == 0 and out["rollout/step"]["mfu"] is None


def test_ablation_selection(monkeypatch):
    monkeypatch.delenv(e2e.ABLATION_ENV, raising=False)
    assert e2e.ablation_names(CPU) == e2e.CPU_ABLATION
    monkeypatch.setenv(e2e.ABLATION_ENV, "default,vae_bf16")
    assert e2e.ablation_names(CPU) == ("default", "vae_bf16")
    monkeypatch.setenv(e2e.ABLATION_ENV, "0")
    assert e2e.ablation_names(CPU) == ()
    monkeypatch.setenv(e2e.ABLATION_ENV, "warp_drive")
    with pytest.raises(ValueError, match="warp_drive"):
        e2e.ablation_names(CPU)


# ----------------------------------------------------------------------------- speed options: keys and errors
@pytest.mark.parametrize("override, needle", [
    ("train.attention=flash", "train.attention='flash'"),
    ("train.channels_last=sometimes", "train.channels_last"),
    ("train.fused_adamw=maybe", "train.fused_adamw"),
    ("model.vae_dtype=fp16", "model.vae_dtype='fp16'"),
    ("scorer.dtype=fp8", "scorer.dtype='fp8'"),
    ("scorer.init=zeros", "scorer.init='zeros'"),
    ("train.allow_tf32=perhaps", "train.allow_tf32"),
    ("train.gradient_checkpointing=2", "train.gradient_checkpointing"),
])
def test_speed_option_values_are_checked(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_sd15_color", [override])
    assert needle in str(e.value)


def test_speed_option_combinations_are_checked():
    with pytest.raises(ConfigError, match="train.fused_adamw=true applies to train.optimizer=adamw"):
        load_config("tiny_sd15_color", ["train.fused_adamw=true", "train.optimizer=adafactor"])
    with pytest.raises(ConfigError, match="scorer.init=random"):
        load_config("tiny_sd15_color", ["scorer.init=random"])  # the colour scorer has no weights
    with pytest.raises(ConfigError, match="scorer.path=arch:tiny_spm holds architecture files only"):
        load_config("tiny_sd15_color", ["scorer.name=spm", "scorer.path=arch:tiny_spm"])
    cfg = load_config("sd15_spo", list(TINY_SPO) + ["train.fused_adamw=true", "train.channels_last=true",
                                                    "model.vae_dtype=bf16", "scorer.dtype=fp32"])
    assert (cfg.train.fused_adamw, cfg.train.channels_last, cfg.model.vae_dtype, cfg.scorer.dtype) == (
        True, True, "bf16", "fp32")


@pytest.mark.parametrize("backend, package", [("xformers", "xformers"), ("flash_attn", "flash-attn")])
def test_attention_backend_missing_is_an_error_before_any_model(backend, package, tmp_path, monkeypatch):
    if torch.cuda.is_available() and importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} can run here")
    from spo_fast.core import trainer
    from spo_fast.train import run

    built = []
    monkeypatch.setattr(trainer, "load_components", lambda *a, **k: built.append(1))
    cfg = load_config("sd15_spo", [*TINY_SPO, f"train.attention={backend}", f"log.output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        run(cfg)
    msg = str(e.value)
    assert f"train.attention={backend}" in msg and "train.attention=sdpa" in msg
    if not torch.cuda.is_available():
        assert "no CUDA device" in msg
    if importlib.util.find_spec(backend) is None:
        assert f"pip install {package}" in msg
    assert not built


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_is_an_error_before_any_model(tmp_path):
    from spo_fast.train import preflight

    cfg = load_config("sd15_spo", [*TINY_SPO, "train.optimizer=adamw8bit", f"log.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes"):
        preflight(cfg)


# ----------------------------------------------------------------------------- speed options: what build does
def test_speed_options_are_applied_and_train():
    run = e2e.build(_case("train.channels_last=true", "model.vae_dtype=bf16", "train.fused_adamw=true",
                          "scorer.dtype=bf16", "train.gradient_checkpointing=true"), CPU)
    try:
        s = run.s
        w = s.raw_unet.conv_in.weight
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        assert s.comp.vae.dtype == torch.bfloat16 and not s.comp.vae_autocast
        assert s.optimizer.defaults["fused"] is True
        assert run.method.scorer.model.dtype == torch.bfloat16 and run.method.scorer.precision == "bf16"
        assert s.raw_unet.is_gradient_checkpointing
        before = {n: p.detach().clone() for n, p in s.raw_unet.named_parameters() if p.requires_grad}
        stats = e2e.iteration(run)
        assert stats.n_valid > 0 and stats.steps > 0
        after = dict(s.raw_unet.named_parameters())
        assert any(not torch.equal(before[n], after[n]) for n in before)  # the fused optimizer stepped
    finally:
        e2e.release(run)


def test_vae_and_scorer_precision_switch_autocast_off():
    """An explicit VAE / SPM dtype runs in that dtype under the caller's autocast; ``auto``/``autocast`` keep
    running under it (the behaviour before the keys existed)."""
    from spo_fast.diffusion.models import decode_latents, load_components
    from spo_fast.reward.spm import SPMScorer

    comp = load_components("arch:tiny_sd15", "sd15", "random", seed=0)
    seen = []
    comp.vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    z = torch.randn(1, 4, 8, 8)
    for own, want in ((False, torch.float32), (True, torch.bfloat16)):
        comp.vae_autocast = own
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert decode_latents(comp, z).dtype == torch.float32
        assert seen.pop() == want
    root = Path(__file__).resolve().parents[1] / "configs/arch/tiny_spm"
    images, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([10, 500])
    for precision, want in (("fp32", torch.float32), ("autocast", torch.bfloat16), ("bf16", torch.bfloat16)):
        spm = SPMScorer.random(root, seed=0, precision=precision)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert spm.image_features(images, t).dtype == want, precision


def test_spm_architectures():
    """arch:spm_vit_h14 is PickScore's CLIP ViT-H/14 (986M parameters, built on the meta device); arch:tiny_spm
    builds with random weights from its seed, deterministically, with the packaged tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from spo_fast.diffusion.models import resolve_model_path
    from spo_fast.reward.scorers import build_scorer
    from spo_fast.reward.spm import SPMScorer

    root = resolve_model_path("arch:spm_vit_h14")
    cfg = CLIPConfig.from_pretrained(root)
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size,
            v.image_size) == (1280, 32, 16, 5120, 14, 224)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size, t.vocab_size) == (
        1024, 24, 16, 4096, 49408)
    assert cfg.projection_dim == 1024
    with torch.device("meta"):
        n = sum(p.numel() for p in CLIPModel(cfg).parameters())
    assert n == pytest.approx(986.1e6, rel=1e-3)
    a = build_scorer(load_config("sd15_spo", list(TINY_SPO)).scorer, "cpu")
    b = SPMScorer.random(resolve_model_path("arch:tiny_spm"), seed=0)
    assert isinstance(a, SPMScorer) and a.model.dtype == torch.float32
    state = a.prepare(["a red cube", "a blue ball"])
    assert state.shape == (2, 32) and torch.equal(state, b.prepare(["a red cube", "a blue ball"]))
    scores = a.score(torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 10, 500, 999]), state,
                     torch.tensor([0, 1, 0, 1]))
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    torch.manual_seed(5)
    want = torch.rand(2)
    torch.manual_seed(5)
    SPMScorer.random(resolve_model_path("arch:tiny_spm"), seed=1)
    assert torch.equal(torch.rand(2), want)  # the global RNG is untouched


def test_flash_attn_processor_matches_sdpa():
    """FlashAttnProcessor's reshapes, with an SDPA stand-in for flash_attn_func ((B, L, H, D) in and out), give
    the default processor's output on the tiny UNet in bf16 (self- and cross-attention)."""
    import torch.nn.functional as F

    from spo_fast.diffusion.models import FlashAttnProcessor, load_components

    def flash_standin(q, k, v, dropout_p, softmax_scale, causal):
        assert q.dim() == 4 and not causal and dropout_p == 0.0
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              scale=softmax_scale).transpose(1, 2)

    unet = load_components("arch:tiny_sd15", "sd15", "random", seed=0).unet.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).bfloat16()
    t = torch.tensor([10, 700])
    want = unet(x, t, encoder_hidden_states=ctx).sample
    unet.set_attn_processor(FlashAttnProcessor(flash_standin))
    got = unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert (got.float() - want.float()).abs().max() < 0.05 * want.float().abs().max()
