"""``python -m spo_fast.estimate``: the trainer's own code on fake tensors (``spo_fast.core.fakerun``).

Checked here: the fake run's memory agrees with the same code on real CPU tensors tracked the same way (tiny
architectures); weights, gradients and optimizer states at the real SD1.5 architecture are the parameter counts
by hand times their dtypes; the FLOPs equal the end-to-end benchmark's for the same config; the roofline and hours
arithmetic; bad input is one ``error:`` line with exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from spo_fast import estimate as est
from spo_fast.core.fakerun import MemoryTracker, Placeholders

ROOT = Path(__file__).resolve().parents[1]
TINY_SPO = ["model.path=arch:tiny_sd15", "scorer.path=arch:tiny_spm", "train.mixed_precision=no",
            "spo.threshold=0.0", "train.batch_size=2", "train.train_batch_size=2", "sampling.num_steps=6",
            "spo.divert_start_step=2"]

# By hand (the published sizes; diffusers / transformers modules as built from configs/arch):
SD15_UNET = 859_520_964  # SD1.5 UNet
SD15_VAE = 83_653_863  # the SD VAE (encoder + decoder + quant convs)
CLIP_L_TEXT = 123_060_480  # CLIP ViT-L/14 text encoder (+ its 77 position ids, a buffer)
CLIP_H = 986_109_441  # CLIP ViT-H/14 (text + vision + projections + logit scale), PickScore's size
SD15_LORA4 = 797_184  # rank 4 on to_q/to_k/to_v/to_out.0: sum over the 32 attention modules of 4 * (in + out)
SDXL_UNET = 2_567_463_684
CLIP_BIGG_TEXT = 694_659_840  # OpenCLIP bigG text encoder with projection


def _cfg(recipe: str, overrides: list[str], tmp_path):
    cfg, _ = est.estimate_config(recipe, overrides, str(tmp_path / "run"))
    return cfg


TINY_DPO = ["model.path=arch:tiny_sdxl", "train.mixed_precision=no", "train.batch_size=4", "train.train_batch_size=2",
            "train.grad_accum=2"]


@pytest.mark.parametrize("recipe, overrides", [("sd15_spo", TINY_SPO), ("sdxl_dpo", TINY_DPO)], ids=["spo", "dpo"])
def test_fake_run_matches_real_tensors_on_the_tiny_architecture(recipe, overrides, tmp_path):
    """Peaks per phase and what is live at them: fake tensors vs real CPU tensors through the same tracker (SPO with
    LoRA; Diffusion-DPO full fine-tuning with its frozen reference copy and Adafactor)."""
    fake = est.measure(_cfg(recipe, overrides, tmp_path), train_steps=None)
    real = est.measure(_cfg(recipe, [*overrides, "log.output_dir=" + str(tmp_path / "real")], tmp_path),
                       train_steps=None, real=True)
    assert fake.micro_run == real.micro_run  # threshold 0: every transition valid in both
    phase1 = "rollout" if recipe.endswith("spo") else "pairs"
    for phase in ("build", phase1, "train"):
        assert fake.peaks[phase] > 0
        # equal to the byte (measured: torch 2.13 CPU, every phase and category): the fake kernels allocate what the
        # real ones do, and the tracker sees the same storages
        assert fake.peaks[phase] == real.peaks[phase], phase
        assert fake.breakdown[phase] == real.breakdown[phase], phase
    assert {"gradients", "optimizer states", "weights: trainable"} <= set(fake.state_bytes)
    assert fake.state_bytes == real.state_bytes
    if recipe.endswith("dpo"):  # full fine-tuning: fp32 trainable UNet and its gradients, a frozen copy
        assert fake.state_bytes["gradients"] == fake.state_bytes["weights: trainable"] > 0
        assert fake.state_bytes["weights: reference UNet"] == fake.state_bytes["weights: trainable"]
    assert fake.reads and not real.reads  # the fake run says what it assumed


def test_weights_gradients_and_optimizer_at_the_real_sd15_architecture(tmp_path):
    """The SD1.5 recipe's categories equal the parameter counts by hand times their dtypes: frozen UNet, VAE and text
    encoder in bf16 (fp16 run as bf16), the ViT-H SPM in fp32 (scorer.dtype=autocast keeps its weights fp32), the
    LoRA weights fp32 with fp32 gradients and two fp32 AdamW states (+ a step counter each)."""
    cfg = _cfg("sd15_spo", ["train.batch_size=1", "spo.k=2", "sampling.num_steps=6", "spo.divert_start_step=4"],
               tmp_path)
    m = est.measure(cfg, train_steps=1)
    assert m.params["weights: trainable"] == SD15_LORA4
    assert m.params["weights: UNet (frozen)"] == SD15_UNET
    assert m.params["weights: VAE"] == SD15_VAE
    assert m.params["weights: text encoders"] == CLIP_L_TEXT + 77
    assert m.params["weights: preference model"] > CLIP_H  # CLIP ViT-H/14 + the step-aware time conditioning
    assert m.breakdown["train"]["weights: UNet (frozen)"] == 2 * SD15_UNET  # live at the training peak
    train = m.state_bytes  # each category whole
    assert train["weights: UNet (frozen)"] == 2 * SD15_UNET
    assert train["weights: VAE"] == 2 * SD15_VAE
    assert train["weights: text encoders"] == 2 * CLIP_L_TEXT + 8 * 77
    assert train["weights: trainable"] == 4 * SD15_LORA4
    # fp32 weights; the CLIP towers' position ids (257 + 77) are int64 buffers: 4 more bytes each
    assert train["weights: preference model"] == 4 * m.params["weights: preference model"] + 4 * (257 + 77)
    assert train["gradients"] == 4 * SD15_LORA4
    lora_tensors = 4 * 32 * 2  # 4 projections x 32 attention modules x (A, B)
    assert train["optimizer states"] == 8 * SD15_LORA4 + 4 * lora_tensors  # exp_avg, exp_avg_sq fp32; step fp32


def test_parameter_counts_of_the_real_sdxl_and_spm(tmp_path):
    """SDXL's UNet and both text encoders, and the SPM's CLIP, built on fake tensors, count as by hand."""
    from accelerate import Accelerator

    from spo_fast.core import trainer
    from spo_fast.reward.scorers import build_scorer

    cfg = _cfg("sdxl_spo", [], tmp_path)
    with Placeholders().active():
        s = trainer.build(cfg, Accelerator(cpu=True))
        unet = sum(p.numel() for n, p in s.raw_unet.named_parameters() if "lora_" not in n)
        texts = [sum(p.numel() for p in te.parameters()) for te in s.comp.text_encoders]
        spm = build_scorer(cfg.scorer, torch.device("cpu"))
        clip = sum(p.numel() for p in spm.model.clip.parameters())
    assert unet == SDXL_UNET
    assert texts == [CLIP_L_TEXT, CLIP_BIGG_TEXT]
    assert clip == CLIP_H


def test_flops_equal_the_benchmark_suites(tmp_path, monkeypatch):
    """The estimator's FLOPs of an iteration = ``flops_per_iteration`` of benchmarks/e2e.py's FLOP pass for the same
    config (tiny SD1.5 SPO case; the benchmark runs real CPU tensors, the estimator fake ones)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import e2e

    case = e2e.CASES["sd15_spo"]
    dev = torch.device("cpu")
    # smaller than the benchmark's CPU case (time); the fused ops' PyTorch references, as the estimator runs them
    # (the Triton kernels' matmuls are invisible to the flop counter)
    extra = ("train.batch_size=2", "train.train_batch_size=2", "sampling.num_steps=6", "spo.divert_start_step=2",
             "train.kernels=torch")
    run = e2e.build(case, dev, extra)
    try:
        flops = e2e.flop_pass(run)
    finally:
        e2e.release(run)
    cfg = _cfg(case.recipe, [*case.overrides(dev), *extra], tmp_path)
    m = est.measure(cfg, train_steps=None)
    assert m.micro_run == flops.n_micro
    assert sum(t["flops"] for t in m.phase_totals.values()) == flops.flops_total
    for name, st in flops.stages.items():
        assert m.stages[name]["flops"] == st["flops"], name
    assert flops.stages["rollout/score"]["flops"] > 0  # attention (the CPU's flash kernel) is counted


def test_cpu_flash_attention_flops_are_counted():
    from torch.utils.flop_counter import FlopCounterMode

    import spo_fast.core.profiling  # noqa: F401  (registers the formulas)

    q = torch.randn(2, 4, 64, 32, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    assert fc.get_total_flops() == 4 * 2 * 4 * 64 * 64 * 32 * (1 + 2.5)  # forward 2 matmuls, backward 2.5x


def test_tracker_counts_views_once_and_frees():
    tr = MemoryTracker()
    with tr:
        tr.segment("a")
        x = torch.empty(1000, dtype=torch.float32)
        y = x.view(10, 100)  # a view: no new storage, no traffic
        moved = tr.bytes_moved
        assert tr.current == 4000 and moved == 0
        z = x + 1  # reads 4000, writes 4000
        assert tr.bytes_moved == 8000 and tr.current == 8000
        del x, y, z
        assert tr.current == 0
    tr.finish()
    assert tr.segments[-1].peak == 8000


def test_stage_table_roofline_and_hours():
    m = est.Measurement(peaks={"rollout": 1, "train": 1}, breakdown={}, modules={},
                        stages={"rollout/unet": {"flops": 312e12, "bytes": 1e9, "calls": 1},
                                "train/policy": {"flops": 1e9, "bytes": 2.039e12, "calls": 2},
                                "train/optimizer": {"flops": 0, "bytes": 0, "calls": 1}},
                        phase_totals={"rollout": {"flops": 312e12, "bytes": 1e9},
                                      "train": {"flops": 1e9, "bytes": 2.039e12}},
                        micro_run=2, micro_total=10, steps_run=1, transitions=20, reads={})

    class C:
        method = "spo"

        class train:
            train_batch_size, grad_accum, epochs, max_iterations, batch_size = 2, 1, 10, 0, 10

    gpu = est.GPUS["a100-80gb"]
    table = est.stage_table(C, m, gpu, valid_ratio=0.5)  # 10 valid of 20 -> 5 micro-batches (2 ran)
    assert table["rollout/unet"]["roofline_s"] == pytest.approx(1.0)
    assert table["rollout/unet"]["bound"] == "compute"
    assert table["train/policy"]["bytes"] == pytest.approx(2.039e12 * 2.5)
    assert table["train/policy"]["roofline_s"] == pytest.approx(2.5) and table["train/policy"]["bound"] == "memory"
    h = est.hours(C, "sd15_spo", m, table, gpu, gpus=4, mfu=0.5, prompts=4000)
    assert h["iterations_per_gpu"] == 1000  # 4000 x 10 / (10 x 4)
    assert h["roofline_gpu_hours"] == pytest.approx(1000 * 3.5 * 4 / 3600)
    assert h["bounding_stage"] == "train/policy" and h["paper_gpu_hours"] == 48


def test_every_gpu_has_a_source_and_dense_rates():
    for name in ("a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "l40s", "rtx4090", "rtx3090"):
        g = est.GPUS[name]
        assert g.source and 50 < g.tflops < 1000 and 0.5 < g.tb_per_s < 5  # dense: no with-sparsity 1,979


@pytest.mark.parametrize("argv, expect", [
    (["sd15_spo", "--gpu", "b200x"], "--gpu 'b200x' is not known; choose one of a100-40gb"),
    (["sd15_spo", "--gpus", "0"], "argument --gpus: 0 is out of range"),
    (["sd15_spo", "--fit", "-1"], "argument --fit: -1 is out of range"),
    (["sd15_spo", "--valid-ratio", "2"], "--valid-ratio 2.0 is out of range"),
    (["sd15_spo", "lora.targets=nothing"], "lora.targets=nothing matched no UNet module"),
    (["sd15_spo", "model.path=/no/such/dir"], "/no/such/dir"),
])
def test_bad_input_is_one_error_line(argv, expect, capsys):
    try:
        rc = est.main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error:") and expect in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cli_on_the_toy_recipe_writes_json(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert est.main(["toy_spo", "--gpus", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "iteration peak" in text and "roofline" in text
    import json

    data = json.loads(out.read_text())
    assert data["label"].startswith("estimated")
    assert data["memory"]["iteration_peak_gib"] > 0 and data["hours"]["iterations_per_gpu"] > 0


def test_gpu_suite_writes_the_estimate_beside_the_measurement(tmp_path, monkeypatch):
    """``e2e.py estimate SUMMARY``: each case gets the estimate of the same config, labelled, side by side with what
    was measured (here a CPU summary: the tiny configs, no GPU in the table, peak memory not measured)."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import e2e

    summary = tmp_path / "e2e.json"
    summary.write_text(json.dumps({
        "environment": {"device": "cpu", "device_name": "cpu"},
        "matmul_peak": {"flops_per_s": 1e11, "label": "1024^3 fp32 matmul (CPU)"},
        "cases": {"sd15_spo": {"peak_mem_gib": None, "iteration_s": 3.0, "training_pairs_per_s": 1.0,
                               "unet_fwd_equivalents_per_s": 10.0, "stages": {
            "rollout/unet": {"seconds": 2.0, "calls": 4, "flops": 8e9}}}}}))
    data = e2e.side_by_side(summary)
    e = data["cases"]["sd15_spo"]["estimate"]
    assert e["label"] == "estimated" and e["peak_mem_gib"] > 0 and e["gpu_table_entry"] is None
    row = e["side_by_side"]["stages"]["rollout/unet"]
    assert row["measured_s_per_call"] == 0.5 and row["estimated_flops_per_call"] > 0
    assert "cpu_not_measured" in e["side_by_side"]["peak_mem_gib"]
    assert e2e.gpu_key("NVIDIA H200") == "h200" and e2e.gpu_key("NVIDIA A100-SXM4-40GB", 40) == "a100-40gb"
    assert "estimate vs measurement" in e2e.report(summary)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_stage_split_arithmetic(monkeypatch):
    """``e2e.py stages``: stage seconds summed over passes, per iteration, as shares of the iteration, and each
    phase's unnamed rest."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import e2e

    total = {}
    for unet in (2.0, 4.0):
        stats = e2e.IterationStats(3.5 if unet == 2.0 else 5.5, 2.0, 8, 1, 1, 64, 0, 0,
                                   {"rollout/unet": {"seconds": unet, "calls": 16},
                                    "train/ref": {"seconds": 0.5, "calls": 1}})
        e2e.add_stages(total, stats)
    assert total == {"rollout/unet": {"seconds": 6.0, "calls": 32}, "train/ref": {"seconds": 1.0, "calls": 2}}
    split = e2e.split_shares(total, work_s=9.0, train_s=4.0, iterations=2)
    assert split["seconds_per_iteration"] == 6.5 and split["rollout_s_per_iteration"] == 4.5
    st = split["stages"]
    assert st["rollout/unet"] == {"seconds_per_iteration": 3.0, "share": round(6 / 13, 4)}
    assert st["rollout/other"]["seconds_per_iteration"] == 1.5 and st["train/other"]["seconds_per_iteration"] == 1.5
    assert abs(sum(v["share"] for v in st.values()) - 1) < 1e-3


@pytest.mark.parametrize("argv, expect", [
    (["stages", "nope"], "unknown recipe 'nope'"),
    (["stages", "toy_dpo"], "is a dpo recipe"),
    (["stages", "toy_spo", "--iterations", "0"], "--iterations must be >= 1, got 0"),
])
def test_stage_split_bad_input(argv, expect, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import e2e

    with pytest.raises(SystemExit) as e:
        e2e.main(argv)
    assert e.value.code not in (0, None)
    assert expect in capsys.readouterr().err + str(e.value.code)


def test_stage_split_of_a_toy_iteration(tmp_path, monkeypatch):
    """One warm-up and one timed iteration of the toy recipe at batch 2: the rollout's UNet and the three training
    stages are there and the shares add up to the whole iteration."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import e2e

    out = tmp_path / "split.json"
    assert e2e.main(["stages", "toy_spo", "train.batch_size=2", "spo.threshold=0.0", "--iterations", "1",
                     "--out", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    assert data["recipe"] == "toy_spo" and data["iterations"] == 1 and data["device"] == "cpu"
    st = data["stages"]
    assert {"rollout/unet", "rollout/score", "train/ref", "train/policy", "train/backward"} <= set(st)
    assert abs(sum(v["share"] for v in st.values()) - 1) < 1e-3
    assert abs(data["rollout_s_per_iteration"] + data["train_s_per_iteration"] - data["seconds_per_iteration"]) < 1e-9
