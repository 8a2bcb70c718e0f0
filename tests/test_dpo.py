"""Diffusion-DPO: the loss API against a hand computation and a float64 loop, and the method on the toy world
(LoRA moves, base untouched, end to end with the evaluation, the latent cache, kill -9 + resume, bad input)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spo_fast.core.config import ConfigError, load_config
from spo_fast.diffusion.models import load_components
from spo_fast.kernels.spo_loss import dpo_loss
from spo_fast.train import main, run

BACKENDS = ["torch", "triton"]


# ----------------------------------------------------------------------------- the loss
def test_dpo_loss_by_hand():
    # one pair, CHW = 2: policy and reference predictions for the winner and the loser, target noise shared
    target = torch.tensor([[1.0, -1.0]])
    pol = torch.tensor([[[0.5, -1.0]], [[1.0, 0.0]]])  # (2, 1, 2): winner pred, loser pred
    ref = torch.tensor([[[0.0, -1.0]], [[1.0, -1.0]]])
    # mse_pol_w = (0.25 + 0) / 2 = 0.125; mse_ref_w = (1 + 0) / 2 = 0.5; mse_pol_l = (0 + 1) / 2 = 0.5; mse_ref_l = 0
    # inside = -beta/2 * ((0.125 - 0.5) - (0.5 - 0)) = -beta/2 * (-0.875) = 0.4375 * beta
    beta = 2.0
    want = -math.log(1 / (1 + math.exp(-0.875)))
    for backend in BACKENDS:
        out = dpo_loss(pol, ref, target, target, torch.ones(1), beta, backend=backend)
        assert out.loss.item() == pytest.approx(want, rel=1e-6)
        assert out.accuracy.item() == 1.0  # the winner improved more (by 0.375) than the loser (by -0.5)
        assert out.log_ratio_win.item() == pytest.approx(0.375) and out.log_ratio_lose.item() == pytest.approx(-0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_loss_matches_float64_loop_and_its_gradient(backend):
    g = torch.Generator().manual_seed(7)
    # beta 50 with a policy 1e-3 from the reference: z is O(1) and the fp32 cancellation in mse_pol - mse_ref
    # (the torch reference's own error, ~beta * 1e-8) stays below the tolerance
    n, shape, beta = 5, (3, 5, 7), 50.0
    pol = (0.3 * torch.randn(2, n, *shape, generator=g)).requires_grad_(True)
    ref = 0.3 * torch.randn(2, n, *shape, generator=g)
    tw, tl = 0.3 * torch.randn(n, *shape, generator=g), 0.3 * torch.randn(n, *shape, generator=g)
    pol.data = ref + 1e-3 * torch.randn(2, n, *shape, generator=g)
    valid = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    weight = torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0])
    out = dpo_loss(pol, ref, tw, tl, valid, beta, weight, backend=backend)
    out.loss.backward()

    p64 = pol.detach().double().requires_grad_(True)
    terms = []
    for i in range(n):
        mse = [((p64[s, i] - t[i].double()) ** 2).mean() - ((ref[s, i].double() - t[i].double()) ** 2).mean()
               for s, t in ((0, tw), (1, tl))]
        inside = -beta / 2 * weight[i].double() * (mse[0] - mse[1])
        terms.append(-torch.nn.functional.logsigmoid(inside) * valid[i])
    want = torch.stack(terms).sum() / valid.sum()
    want.backward()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(pol.grad.double(), p64.grad, rtol=1e-4, atol=1e-9)


def test_dpo_loss_names_its_shapes():
    with pytest.raises(ValueError, match="policy_mean has shape"):
        dpo_loss(torch.zeros(3, 2, 4), torch.zeros(2, 2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2))


# ----------------------------------------------------------------------------- config
def test_dpo_and_spo_keys_do_not_mix():
    with pytest.raises(ConfigError, match="spo.beta.*method=spo key.*method=dpo"):
        load_config("toy_dpo", ["spo.beta=10"])
    with pytest.raises(ConfigError, match="dpo.beta.*method=dpo key.*method=spo"):
        load_config("toy_spo", ["dpo.beta=5000"])
    with pytest.raises(ConfigError, match="data.pairs"):
        load_config("toy_spo", ["data.pairs=/x.parquet"])
    with pytest.raises(ConfigError, match="data.prompts"):
        load_config("toy_dpo", ["data.prompts=builtin:toy"])
    with pytest.raises(ConfigError, match="method='sft'.*spo, dpo"):
        load_config("toy_dpo", ["method=sft"])
    with pytest.raises(ConfigError, match="method=dpo needs data.pairs"):
        load_config("toy_dpo", ["data.pairs="])
    with pytest.raises(ConfigError, match="train.grad_accum=3"):
        load_config("toy_dpo", ["train.grad_accum=3"])
    with pytest.raises(ConfigError, match="train.optimizer='sgd'"):
        load_config("toy_dpo", ["train.optimizer=sgd"])
    with pytest.raises(ConfigError, match="data.ties=keep"):
        load_config("toy_dpo", ["data.ties=keep"])
    with pytest.raises(ConfigError, match="train.seed=-1"):
        load_config("toy_dpo", ["train.seed=-1"])


def test_dpo_recipes_follow_the_official_settings():
    for name in ("sd15_dpo", "sdxl_dpo"):
        c = load_config(name)
        assert c.method == "dpo" and c.dpo.beta == 5000.0 and c.dpo.empty_prompt_prob == 0.2
        assert c.train.lr == pytest.approx(1e-8 * 2048) and c.train.max_iterations == 2000
        assert c.train.batch_size == c.train.train_batch_size * c.train.grad_accum  # one step per iteration
        assert c.train.batch_size * 8 == 2048  # 8 processes: the official effective batch
        assert not c.lora.enabled and c.data.ties == "drop" and c.data.cache_dir
    sdxl = load_config("sdxl_dpo")
    assert sdxl.train.optimizer == "adafactor" and sdxl.train.gradient_checkpointing and sdxl.model.family == "sdxl"


# ----------------------------------------------------------------------------- the method on the toy world
QUICK = ["log.report_to=none", "log.progress=false", "train.batch_size=4", "train.train_batch_size=2",
         "train.grad_accum=1", "sampling.num_steps=4"]


def _cfg(out, *extra):
    return load_config("toy_dpo", QUICK + [f"log.output_dir={out}", *extra])


def test_toy_dpo_end_to_end_moves_lora_keeps_base(tmp_path):
    out = tmp_path / "run"
    summary, s = run(_cfg(out, "train.max_iterations=3", "eval.n_prompts=4", "eval.seeds=2",
                          "log.sample_prompts=2"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(r["opt_steps"] == 2 and r["valid_pairs"] == 4 and 0 <= r["implicit_acc"] <= 1 for r in rows)
    assert summary["opt_step"] == 6 and math.isfinite(summary["loss"])
    base = load_components("toyworld:base", "sd15").unet.state_dict()
    trained = s.raw_unet.state_dict()
    assert any(trained[k].abs().max() > 0 for k in trained if "lora_B" in k)
    for k, v in trained.items():
        if "lora" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n_prompts"] == 4 and ev["n_seeds"] == 2 and 0 <= ev["win_rate"] <= 1
    for f in ("eval_grid.png", "samples.png", "samples.json", "config.yaml", "lora/pytorch_lora_weights.safetensors"):
        assert (out / f).is_file(), f
    assert load_config(str(out / "config.yaml")).method == "dpo"  # the resolved config loads back


def test_latent_cache_second_run_decodes_and_encodes_nothing(tmp_path, monkeypatch):
    import spo_fast.data.pairs as pairs_mod
    import spo_fast.methods.dpo as dpo_mod

    cache = tmp_path / "cache"
    args = ["train.max_iterations=2", "eval.enabled=false", "log.sample_prompts=0", f"data.cache_dir={cache}"]
    run(_cfg(tmp_path / "a", *args))
    assert (cache / "manifest.json").is_file()

    def forbidden(*a, **k):
        raise AssertionError("called with a complete cache")

    monkeypatch.setattr(pairs_mod, "decode_image", forbidden)
    monkeypatch.setattr(dpo_mod, "encode_images", forbidden)
    monkeypatch.setattr(dpo_mod, "encode_prompts", forbidden)
    summary, _ = run(_cfg(tmp_path / "b", *args))
    assert summary["opt_step"] == 4
    first = load_file(str(max((tmp_path / "a" / "checkpoints").glob("iter_*")) / "trainable.safetensors"))
    second = load_file(str(max((tmp_path / "b" / "checkpoints").glob("iter_*")) / "trainable.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)  # the cache gives the same training


@pytest.mark.slow
def test_dpo_kill_and_resume_reproduces_uninterrupted_run(tmp_path):
    args = ["train.max_iterations=6", "checkpoint.every=1", "eval.enabled=false", "log.sample_prompts=0"]
    run(_cfg(tmp_path / "ref", *args))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "spo_fast.train", "toy_dpo", *QUICK, f"log.output_dir={out}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (out / "checkpoints" / "iter_0000002").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 180
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (out / "lora").exists(), "the run finished before it could be killed"
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    ref = load_file(str(tmp_path / "ref" / "checkpoints" / "iter_0000006" / "trainable.safetensors"))
    got = load_file(str(out / "checkpoints" / "iter_0000006" / "trainable.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_dpo_bad_model_and_scorer_paths_are_named_before_any_model(tmp_path, capsys):
    for override, needle in (("model.path=/nonexistent/sd15", "/nonexistent/sd15"),
                             ("scorer.path=/nonexistent/spm", "scorer.path='/nonexistent/spm'")):
        t0 = time.time()
        assert main(["toy_dpo", *QUICK, f"log.output_dir={tmp_path / 'o'}", override]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and time.time() - t0 < 5


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("empty_dir", "parquet"),
    ("no_columns", "label_1"),
    ("bad_label", "row 1"),
    ("corrupt", "row 0"),
])
def test_bad_pairs_fail_before_any_model_is_built(tmp_path, capsys, case, needle):
    good = {"caption": "a red circle", "jpg_0": _jpeg(), "jpg_1": _jpeg(), "label_0": 1.0, "label_1": 0.0}
    if case == "missing":
        spec = tmp_path / "nope.parquet"
    elif case == "empty_dir":
        (tmp_path / "d").mkdir()
        spec = tmp_path / "d"
    elif case == "no_columns":
        spec = _parquet(tmp_path / "p.parquet", [{k: v for k, v in good.items() if k != "label_1"}])
    elif case == "bad_label":
        spec = _parquet(tmp_path / "p.parquet", [good, {**good, "label_0": 0.3, "label_1": 0.7}])
    else:
        spec = _parquet(tmp_path / "p.parquet", [{**good, "jpg_1": _jpeg()[:40]}] + [good] * 4)
    t0 = time.time()
    code = main(["toy_dpo", *QUICK, f"log.output_dir={tmp_path / 'o'}", f"data.pairs={spec}", "train.batch_size=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and needle in err and "Traceback" not in err
    assert str(spec.name) in err
    assert time.time() - t0 < 5


@pytest.mark.parametrize("recipe, arch, extra", [
    # no latent cache (the recipe's cache_dir is relative to the working directory: a test must not write there)
    ("sd15_dpo", "tiny_sd15", ["lora.enabled=true", "data.cache_dir="]),
    # full fine-tuning (frozen copy as reference), Adafactor, gradient checkpointing, SDXL conditioning from the cache
    ("sdxl_dpo", "tiny_sdxl", ["data.cache_dir=CACHE"]),
])
def test_real_dpo_recipes_run_on_the_tiny_architectures(tmp_path, recipe, arch, extra):
    """The SD1.5/SDXL recipes as shipped, pointed at a tiny random pipeline (a real AutoencoderKL: the latent path)
    and the toy pairs (resized to its 16 px), reduced to a few steps."""
    out = tmp_path / "run"
    extra = [e.replace("CACHE", str(tmp_path / "cache")) for e in extra]
    summary, s = run(load_config(recipe, [f"model.path=arch:{arch}", "model.init=random", "data.pairs=toyworld:train",
                                          "train.batch_size=4", "train.train_batch_size=2", "train.grad_accum=2",
                                          "train.max_iterations=2", "train.mixed_precision=no", "train.warmup_steps=0",
                                          "train.lr=1e-3", f"log.output_dir={out}", "log.progress=false",
                                          "log.report_to=none", "log.sample_prompts=2", "sampling.num_steps=3",
                                          *extra]))
    assert summary["opt_step"] == 2 and math.isfinite(summary["loss"])
    assert (out / "samples.png").is_file()
    if "lora.enabled=true" in extra:
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert s.ref_unet is not None and (out / "unet" / "config.json").is_file()
        assert type(s.optimizer.optimizer).__name__ == "Adafactor" and s.raw_unet.is_gradient_checkpointing


def test_cache_of_another_setting_is_a_named_error(tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["train.max_iterations=1", "eval.enabled=false", "log.sample_prompts=0", f"data.cache_dir={cache}"]
    run(_cfg(tmp_path / "a", *args))
    code = main(["toy_dpo", *QUICK, f"log.output_dir={tmp_path / 'b'}", *args, "model.resolution=32"])
    err = capsys.readouterr().err
    assert code == 2 and "resolution" in err and str(cache) in err and "Traceback" not in err


@pytest.mark.slow
def test_dpo_two_processes_share_the_cache_build(tmp_path):
    """Two processes (gloo on CPU): the latent cache is built by both (chunk c by rank c % 2), then each trains on
    its own pairs; one metrics file, one checkpoint of world size 2."""
    import os

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spo_fast.train",
           "toy_dpo", *QUICK, f"log.output_dir={out}", "train.max_iterations=2", "eval.enabled=false",
           "log.sample_prompts=0", f"data.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "checkpoints" / "iter_0000002" / "state.json").read_text())["world_size"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["valid_pairs"] == 8 for r in rows)  # 4 pairs per process, summed
    assert (tmp_path / "cache" / "manifest.json").is_file()


def test_dpo_drops_captions_to_the_encoded_empty_prompt_on_sdxl(tmp_path):
    """The official Diffusion-DPO script replaces a dropped caption by "" encoded through both SDXL text encoders;
    zeros (SDXL's and SPO's empty *negative* prompt) would be another conditioning."""
    from accelerate import Accelerator

    from spo_fast.core import trainer
    from spo_fast.diffusion.models import encode_negative, encode_prompts
    from spo_fast.methods.dpo import DiffusionDPO

    cfg = load_config("sdxl_dpo", ["model.path=arch:tiny_sdxl", "model.init=random", "data.pairs=toyworld:train",
                                   "data.cache_dir=", "train.mixed_precision=no", "train.batch_size=4",
                                   "train.train_batch_size=2", "train.grad_accum=2", f"log.output_dir={tmp_path}",
                                   "log.report_to=none"])
    method = DiffusionDPO()
    method.preflight(cfg)
    acc = Accelerator(cpu=True)
    s = trainer.build(cfg, acc)
    method.setup(cfg, s, acc)
    encoded = encode_prompts(s.comp, [""], acc.device, s.resolution)
    zeros = encode_negative(s.comp, "", 1, acc.device, s.resolution)
    assert torch.equal(method.empty.embeds, encoded.embeds) and torch.equal(method.empty.pooled, encoded.pooled)
    assert s.comp.force_zeros_for_empty_prompt and zeros.embeds.abs().max() == 0
    print("max |encoded - zeros|:", float(encoded.embeds.abs().max()), float(encoded.pooled.abs().max()))
    assert encoded.embeds.abs().max() > 0.1 and encoded.pooled.abs().max() > 0.1
