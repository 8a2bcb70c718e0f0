"""End-to-end trainer tests on the tiny pipelines (CPU, deterministic)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spo_fast.core.config import load_config
from spo_fast.diffusion.models import load_components
from spo_fast.train import clip_gradients, main, run

# Small but complete: 2 plain steps, 4 branching steps, k = 2, 2 prompts; threshold 0 and a large
# scorer scale so that (nearly) every pair of the random tiny model is valid and gradients flow.
FAST = ["sampling.num_steps=6", "spo.divert_start_step=2", "spo.k=2", "train.batch_size=2",
        "train.train_batch_size=2", "scorer.scale=1000", "spo.threshold=0.0", "train.lr=1e-2",
        "log.report_to=none", "log.progress=false", "log.sample_prompts=0"]


def cfg_for(out, *extra):
    return load_config("tiny_sd15_color", FAST + [f"log.output_dir={out}", *extra])


def final_weights(out) -> dict:
    ckpts = sorted((Path(out) / "checkpoints").glob("iter_*"))
    return load_file(str(ckpts[-1] / "trainable.safetensors"))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_train_changes_lora_and_leaves_base_untouched(tmp_path):
    summary, s = run(cfg_for(tmp_path, "train.max_iterations=2"))
    rows = metrics(tmp_path)
    # valid transitions only, in micro-batches of 2: ceil(valid / 2) optimizer steps per rollout
    assert summary["valid_ratio"] > 0 and all(r["opt_steps"] == -(-r["valid_pairs"] // 2) for r in rows)
    assert summary["opt_step"] == sum(r["opt_steps"] for r in rows) > 0
    base = load_components("arch:tiny_sd15", "sd15", "random", seed=0).unet.state_dict()
    trained = s.raw_unet.state_dict()
    lora_b = [k for k in trained if "lora_B" in k]
    assert lora_b and any(trained[k].abs().max() > 0 for k in lora_b)  # B starts at 0: it moved
    for k, v in trained.items():
        if "lora" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert {"loss", "implicit_acc", "valid_ratio", "samples_per_s", "grad_norm", "lr"} <= rows[0].keys()
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_resume_continues_the_same_trajectory(tmp_path):
    run(cfg_for(tmp_path / "a", "train.max_iterations=4", "checkpoint.every=2"))
    run(cfg_for(tmp_path / "b", "train.max_iterations=2"))
    summary, _ = run(cfg_for(tmp_path / "b", "train.max_iterations=4"))
    assert summary["iteration"] == 4
    assert_same(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "samples_per_s")} for x in la]
    assert strip == [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "samples_per_s")} for x in lb]


def _cli(out, *extra):
    return [sys.executable, "-m", "spo_fast.train", "tiny_sd15_color", *FAST, f"log.output_dir={out}", *extra]


def _wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"trainer exited early: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path):
    run(cfg_for(tmp_path / "ref", "train.max_iterations=6", "checkpoint.every=1"))
    out = tmp_path / "killed"
    args = _cli(out, "train.max_iterations=6", "checkpoint.every=1")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(out / "checkpoints" / "iter_0000002", proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert not (out / "lora").exists(), "the run finished before it could be killed"
    done = subprocess.run(args, check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    assert_same(final_weights(tmp_path / "ref"), final_weights(out))


@pytest.mark.slow
def test_sigterm_checkpoints_then_resume_finishes(tmp_path):
    out = tmp_path / "term"
    args = _cli(out, "train.max_iterations=40", "checkpoint.every=0")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped at iteration" in stdout
    saved = sorted((out / "checkpoints").glob("iter_*"))
    assert len(saved) == 1 and not (out / "lora").exists()
    stopped_at = json.loads((saved[0] / "state.json").read_text())["iteration"]
    assert 1 <= stopped_at < 40


@pytest.mark.slow
def test_two_processes_through_accelerate(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spo_fast.train", *FAST,
           f"log.output_dir={out}", "train.max_iterations=2", "eval.n_prompts=2", "eval.seeds=2"]  # the toy world
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "iter_0000002" / "state.json").read_text())
    assert state["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # main process only
    assert json.loads((out / "eval.json").read_text())["n_prompts"] == 2  # written once, by the main process
    w = final_weights(out)
    assert any(v.abs().max() > 0 for k, v in w.items() if "lora_B" in k)


def test_sdxl_family_with_inner_steps_trains(tmp_path):
    summary, _ = run(cfg_for(tmp_path, "model.family=sdxl", "model.path=arch:tiny_sdxl", "spo.num_inner_steps=1",
                             "train.max_iterations=1", "log.sample_prompts=2"))
    assert summary["valid_ratio"] > 0 and summary["opt_step"] == metrics(tmp_path)[0]["opt_steps"] >= 1
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "samples.png").is_file()


def test_grad_accum_and_gradient_checkpointing(tmp_path):
    summary, s = run(cfg_for(tmp_path, "train.grad_accum=2", "train.gradient_checkpointing=true",
                             "train.max_iterations=1"))
    micro = -(-metrics(tmp_path)[0]["valid_pairs"] // 2)  # micro-batches of 2 valid transitions
    assert micro > 1 and summary["opt_step"] == -(-micro // 2)  # one optimizer step per 2 (the last may be short)
    assert s.raw_unet.is_gradient_checkpointing
    assert any(p.abs().max() > 0 for n, p in s.raw_unet.named_parameters() if "lora_B" in n)


def test_bf16_mixed_precision_on_cpu_trains(tmp_path):
    summary, s = run(cfg_for(tmp_path, "train.mixed_precision=bf16", "train.max_iterations=1"))
    assert s.comp.text_encoders[0].dtype == torch.bfloat16
    lora = [p for n, p in s.raw_unet.named_parameters() if "lora_B" in n]
    assert all(p.dtype == torch.float32 for p in lora) and any(p.abs().max() > 0 for p in lora)
    assert summary["loss"] == summary["loss"]  # not NaN


def test_full_finetune_uses_frozen_copy_as_reference(tmp_path):
    _, s = run(cfg_for(tmp_path, "lora.enabled=false", "train.max_iterations=1", "train.lr=1e-4"))
    base = load_components("arch:tiny_sd15", "sd15", "random", seed=0).unet.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in s.ref_unet.state_dict().items())
    assert any(not torch.equal(v, base[k]) for k, v in s.raw_unet.state_dict().items())
    assert (tmp_path / "unet" / "config.json").is_file()


def test_trained_lora_loads_into_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    _, s = run(cfg_for(tmp_path, "train.max_iterations=2"))
    comp = load_components("arch:tiny_sd15", "sd15", "random", seed=0)
    pipe = StableDiffusionPipeline(vae=comp.vae, text_encoder=comp.text_encoders[0], tokenizer=comp.tokenizers[0],
                                   unet=comp.unet, scheduler=comp.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)

    def generate():
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, generator=g, output_type="np", height=16, width=16).images

    before = generate()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    after = generate()
    assert abs(after - before).max() > 1e-4
    # the loaded adapter is exactly the trained one: same UNet output
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    ehs = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ehs).sample, s.raw_unet(x, t, ehs).sample, rtol=1e-5, atol=1e-5)


def test_clip_gradients_really_clips():
    from accelerate import Accelerator

    params = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p) * 100
    before = torch.stack([p.grad.norm() for p in params]).norm()
    reported = clip_gradients(Accelerator(cpu=True), params, 1.0)
    after = torch.stack([p.grad.norm() for p in params]).norm()
    assert float(reported) == pytest.approx(float(before), rel=1e-5)
    assert float(after) == pytest.approx(1.0, rel=1e-4)


def test_profile_writes_a_trace(tmp_path):
    run(cfg_for(tmp_path, "train.max_iterations=2", "profile.enabled=true", "profile.wait=0", "profile.warmup=0",
                "profile.active=1"))
    assert list((tmp_path / "profile").glob("*.json")), "no torch.profiler trace written"


@pytest.mark.parametrize("override, needle", [
    ("model.path=/nonexistent/sd15", "/nonexistent/sd15"),
    ("model.resolution=20", "model.resolution=20"),
    ("checkpoint.resume=/nonexistent/ckpt", "/nonexistent/ckpt"),
    ("data.prompts=EMPTY", "empty.txt"),
    ("data.prompts=/nonexistent/prompts.txt", "/nonexistent/prompts.txt"),
    ("log.output_dir=FILE/sub", "not writable"),
    pytest.param("sampling.graphs=cuda_graphs", "sampling.graphs=cuda_graphs needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_inputs_fail_fast_with_a_named_problem(tmp_path, capsys, override, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    override = override.replace("EMPTY", str(empty)).replace("FILE", str(afile))
    extra = ["model.init=pretrained"] if override.startswith("model.path") else []
    t0 = time.time()
    code = main(FAST + [f"log.output_dir={tmp_path / 'o'}", override, *extra])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert time.time() - t0 < 5  # before any model is built


def test_loss_curve_same_with_torch_and_triton_kernels(tmp_path, monkeypatch):
    """The trainer gives the same loss curve with the PyTorch reference and the Triton loss kernel (interpreter).

    The rollout's step op is pinned to its torch backend in both runs: its two backends draw different noise
    for the same seed by design (each reproducible), which would make the two rollouts differ."""
    import spo_fast.diffusion.rollout as rollout_mod

    step = rollout_mod.pooled_ddim_step
    monkeypatch.setattr(rollout_mod, "pooled_ddim_step", lambda *a, backend=None, **kw: step(*a, backend="torch", **kw))
    curves = {}
    for backend in ("torch", "triton"):
        out = tmp_path / backend
        run(cfg_for(out, "train.max_iterations=3", f"train.kernels={backend}"))
        curves[backend] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(curves["torch"]) == 3 and any(r["valid_ratio"] > 0 for r in curves["torch"])
    for a, b in zip(curves["torch"], curves["triton"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["implicit_acc"] == pytest.approx(b["implicit_acc"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


# ----------------------------------------------------------------------------- SPO trains on valid pairs only
def test_no_valid_pair_no_optimizer_step(tmp_path):
    """A rollout without a valid pair runs no training forward and no optimizer step: the LoRA stays at its init
    (AdamW's weight decay and momentum would otherwise move it)."""
    from spo_fast.core.trainer import build  # noqa: F401 (the run below builds the same init)

    summary, s = run(cfg_for(tmp_path, "train.max_iterations=2", "spo.threshold=0.99", "scorer.scale=1e-3"))
    rows = metrics(tmp_path)
    assert all(r["valid_pairs"] == 0 and r["opt_steps"] == 0 and r["loss"] is None for r in rows)
    assert summary["opt_step"] == 0
    lora_b = [p for n, p in s.raw_unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.equal(p, torch.zeros_like(p)) for p in lora_b)


def _buffer(valid: torch.Tensor, shared: list[bool]):
    from spo_fast.diffusion.rollout import RolloutBuffer

    S, B = valid.shape
    x = torch.randn(S, 2, B, 1, 2, 2)
    return RolloutBuffer(x, x.clone(), torch.arange(S) * 50 + 50, valid, torch.zeros(S, B), torch.zeros(S, B),
                         shared, torch.zeros(B, 2), torch.zeros(B, 1, 2, 2))


def test_compact_valid_fixed_shapes_covers_valid_pairs_exactly():
    from spo_fast.methods.spo import compact_valid

    g = torch.Generator().manual_seed(0)
    valid = torch.rand(7, 5, generator=g) < 0.4
    shared = [True, False, False, True, False, False, True]
    batches = compact_valid(_buffer(valid, shared), 3, torch.Generator().manual_seed(1))
    seen = []
    for is_shared, slot, b, n in batches:
        assert slot.shape == b.shape == (3,) and 1 <= n <= 3  # one fixed shape; never a batch without a pair
        assert all(shared[int(i)] == is_shared for i in slot)
        seen += list(zip(slot[:n].tolist(), b[:n].tolist()))
    assert sorted(seen) == sorted(map(tuple, valid.nonzero().tolist()))  # each valid pair once, nothing else
    for kind in (True, False):
        n_kind = sum(int(valid[i].sum()) for i in range(7) if shared[i] == kind)
        assert sum(1 for k, *_ in batches if k == kind) == -(-n_kind // 3)


class _FakeMethod:
    """Micro-batches whose per-pair losses are w . x_i: the loss of a micro-batch is their mean over valid pairs."""

    def __init__(self, xs, masks):
        from spo_fast.core.trainer import MicroBatch
        from spo_fast.kernels.spo_loss import LossOutput

        self.Out, self.micro = LossOutput, [MicroBatch((x, m), int(m.sum())) for x, m in zip(xs, masks)]
        self.w = None

    def loss(self, mb):
        x, m = mb.data
        per = x @ self.w
        loss = (per * m).sum() / m.sum().clamp(min=1)
        return self.Out(loss, torch.zeros(()), per, per)


def test_loss_is_the_mean_over_the_optimizer_steps_valid_pairs():
    """Two micro-batches (3 valid of 4, 1 valid of 4) in one optimizer step: the gradient is that of the mean over
    the step's 4 valid pairs, not the mean of the two micro-batch means."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from spo_fast.core.trainer import Work, train_iteration

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, generator=g) for _ in range(2)]
    masks = [torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])]
    w = torch.nn.Parameter(torch.zeros(3))
    method = _FakeMethod(xs, masks)
    method.w = w
    opt = torch.optim.SGD([w], lr=1.0)
    s = SimpleNamespace(unet=torch.nn.Linear(1, 1), params=[w], optimizer=opt,
                        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    cfg = load_config("tiny_sd15_color", ["train.grad_accum=2", "train.max_grad_norm=0"])
    sums = train_iteration(cfg, s, Accelerator(cpu=True), method, Work(method.micro, {}, 8))
    valid_x = torch.cat([x[m.bool()] for x, m in zip(xs, masks)])  # (4, 3)
    torch.testing.assert_close(w.detach(), -valid_x.mean(0))  # SGD lr 1 from 0: w = -grad of the mean loss
    assert sums["steps"] == 1 and sums["n_valid"] == 4
