"""``python -m spo_fast.evaluate`` with bad input: one line ``error: ...`` naming it, exit code 2, no traceback, and
(the fast path) no model built; ``--seed-offset``; the LoRA architecture check that diffusers' loader lacks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spo_fast import evaluate
from spo_fast.diffusion.models import resolve_model_path
from spo_fast.evaluation import heldout as evaluation

TINY = ["--n-prompts", "2", "--seeds", "1", "--num-steps", "2", "--grid-prompts", "1"]
MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a Linear 64 -> 64 of the toy UNet


def save_lora(unet, out: Path) -> Path:
    """The LoRA of ``unet``'s adapter as ``spo_fast.core.trainer.save_weights`` writes it."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(save_directory=str(out), unet_lora_layers=layers,
                                                    safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A valid LoRA of the toy UNet (the trainer's adapter: rank 4 on to_q/k/v/out.0), with non-zero weights so that
    trained and base differ."""
    from peft import LoraConfig

    from spo_fast.diffusion.models import load_components

    unet = load_components("toyworld:base", "sd15").unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return save_lora(unet, tmp_path_factory.mktemp("run") / "lora")


@pytest.fixture
def no_models(monkeypatch):
    """Building a model or sampling fails the test: the bad input must be found before."""
    from spo_fast.reward.spm import SPMScorer

    def built(*a, **k):
        raise AssertionError("model built")

    def sampled(*a, **k):
        raise AssertionError("sampled")

    monkeypatch.setattr(evaluate, "load_components", built)
    monkeypatch.setattr(SPMScorer, "from_pretrained", built)
    monkeypatch.setattr(evaluate, "evaluate", sampled)


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = evaluate.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (errors.ArgumentParser: one line, exit 2)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def lora_file(tmp_path: Path, tensors: dict[str, torch.Tensor], name="pytorch_lora_weights.safetensors") -> Path:
    d = tmp_path / "lora"
    d.mkdir()
    save_file(tensors, str(d / name))
    return d


def lora_of(modules: dict[str, tuple[int, int]], rank=4) -> dict[str, torch.Tensor]:
    """LoRA tensors in diffusers' format for modules of (in, out) widths."""
    sd = {}
    for name, (fan_in, fan_out) in modules.items():
        sd[f"unet.{name}.lora.down.weight"] = torch.zeros(rank, fan_in)
        sd[f"unet.{name}.lora.up.weight"] = torch.zeros(fan_out, rank)
    return sd


def copy_base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(resolve_model_path("toyworld:base"), base)
    return base


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


# ----------------------------------------------------------------------------- the bad-input table
# each case: (tmp_path, valid LoRA dir) -> (argv, strings the error line must hold)
def _missing_lora(t, lora):
    return ["--lora", t / "nope"], [str(t / "nope"), "does not exist"]


def _empty_lora(t, lora):
    (t / "empty").mkdir()
    return ["--lora", t / "empty"], [str(t / "empty"), "is empty", "pytorch_lora_weights.safetensors"]


def _lora_is_file(t, lora):
    return ["--lora", lora / "pytorch_lora_weights.safetensors", "--out", t], ["is a file", f"--lora {lora}"]


def _run_dir_not_lora(t, lora):  # the training run's output directory instead of its lora/
    return ["--lora", lora.parent], [f"--lora {lora.parent}:", f"pass its weights: --lora {lora}"]


def _truncated_lora(t, lora):
    d = t / "lora"
    shutil.copytree(lora, d)
    truncate(d / "pytorch_lora_weights.safetensors")
    return ["--lora", d], [str(d / "pytorch_lora_weights.safetensors"), "truncated"]


def _not_safetensors(t, lora):
    d = t / "lora"
    d.mkdir()
    (d / "pytorch_lora_weights.safetensors").write_text("these are not the weights you are looking for\n" * 4)
    return ["--lora", d], [str(d / "pytorch_lora_weights.safetensors"), "not a safetensors file"]


def _lora_of_sdxl(t, lora):  # modules the toy UNet does not have (an SDXL UNet's third block)
    d = lora_file(t, lora_of({"down_blocks.2.attentions.1.transformer_blocks.5.attn1.to_q": (1280, 1280),
                              "down_blocks.2.attentions.1.transformer_blocks.5.attn2.to_k": (2048, 1280)}))
    return ["--lora", d], ["does not fit the UNet of --model toyworld:base", "2 of its 2 LoRA modules",
                           "down_blocks.2.attentions.1.transformer_blocks.5.attn1.to_q", "check --model/--family"]


def _lora_other_widths(t, lora):  # the toy UNet's module names, an SD1.5-sized UNet's widths
    d = lora_file(t, lora_of({MODULE: (320, 320), MODULE.replace("to_q", "to_k"): (320, 320)}))
    return ["--lora", d], ["2 of its 2 LoRA modules have other widths", MODULE, "LoRA down 4x320, up 320x4", "Linear is 64 -> 64",
                           "check --model/--family"]


def _lora_partly_foreign(t, lora):  # diffusers' load_lora_adapter loads the one module and skips the other silently
    d = lora_file(t, lora_of({MODULE: (64, 64), "down_blocks.3.attentions.0.proj_in": (1280, 1280)}))
    return ["--lora", d], ["1 of its 2 LoRA modules", "down_blocks.3.attentions.0.proj_in"]


def _lora_not_diffusers_keys(t, lora):  # a kohya-style file: no key for diffusers' loader, which loads nothing
    d = lora_file(t, {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
                      "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(4.0)})
    return ["--lora", d], ["2 tensors are not LoRA weights of a UNet module", "lora_unet_down_blocks_1"]


def _lora_text_encoder(t, lora):
    sd = lora_of({MODULE: (64, 64)})
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight"] = torch.zeros(4, 64)
    return ["--lora", lora_file(t, sd)], ["text_encoder", "does not apply"]


def _unet_dir_truncated(t, lora):
    d = t / "unet"
    shutil.copytree(resolve_model_path("toyworld:base") / "unet", d)
    truncate(d / "diffusion_pytorch_model.safetensors")
    return ["--lora", d], [str(d / "diffusion_pytorch_model.safetensors"), "truncated"]


def _unet_dir_other_arch(t, lora):
    d = t / "unet"
    d.mkdir()
    cfg = json.loads((resolve_model_path("toyworld:base") / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [2 * c for c in cfg["block_out_channels"]]
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({"conv_in.weight": torch.zeros(cfg["block_out_channels"][0], 3, 3, 3)},
              str(d / "diffusion_pytorch_model.safetensors"))
    return ["--lora", d], [str(d), "another architecture", "parameters differ", "check --model/--family"]


def _missing_prompts(t, lora):
    return ["--lora", lora, "--prompts", t / "p.txt"], [str(t / "p.txt"), "--prompts", "does not exist"]


def _empty_prompts(t, lora):
    (t / "p.txt").write_text("")
    return ["--lora", lora, "--prompts", t / "p.txt"], [str(t / "p.txt"), "is empty"]


def _blank_prompts(t, lora):
    (t / "p.txt").write_text("\n  \n\n")
    return ["--lora", lora, "--prompts", t / "p.txt"], [str(t / "p.txt"), "only blank lines"]


def _non_toy_prompt_ground_truth(t, lora):
    (t / "p.txt").write_text("a photo of an astronaut riding a horse\n")
    return ["--lora", lora, "--prompts", t / "p.txt", "--reward", "ground_truth"], [
        "--reward ground_truth", "prompt 1", "astronaut", "--reward spm"]


def _unknown_prompt_set(t, lora):
    return ["--lora", lora, "--prompts", "toyworld:tset"], ["toyworld:tset", "toyworld:heldout"]


def _missing_model(t, lora):
    return ["--lora", lora, "--model", t / "nomodel"], ["--model", str(t / "nomodel"), "does not exist"]


def _model_without_unet(t, lora):
    base = copy_base(t)
    shutil.rmtree(base / "unet")
    return ["--lora", lora, "--model", base], [str(base / "unet"), "is missing"]


def _model_truncated_unet(t, lora):
    base = copy_base(t)
    truncate(base / "unet" / "diffusion_pytorch_model.safetensors")
    return ["--lora", lora, "--model", base], [str(base / "unet" / "diffusion_pytorch_model.safetensors"),
                                               "truncated"]


def _unknown_toy_model(t, lora):
    return ["--lora", lora, "--model", "toyworld:nope"], ["toyworld:nope", "toyworld:base"]


def _wrong_family(t, lora):
    return ["--lora", lora, "--family", "sdxl"], ["--family sdxl", "text_encoder_2"]


def _seeds_0(t, lora):
    return ["--lora", lora, "--seeds", "0"], ["--seeds 0", ">= 1"]


def _n_prompts_0(t, lora):
    return ["--lora", lora, "--n-prompts", "0"], ["--n-prompts 0"]


def _batch_size_negative(t, lora):
    return ["--lora", lora, "--batch-size", "-4"], ["--batch-size -4"]


def _seeds_not_int(t, lora):
    return ["--lora", lora, "--seeds", "four"], ["--seeds", "'four'"]


def _eta_nan(t, lora):
    return ["--lora", lora, "--eta", "nan"], ["--eta nan", "finite"]


def _guidance_inf(t, lora):
    return ["--lora", lora, "--guidance-scale", "inf"], ["--guidance-scale inf", "finite"]


def _seed_offset_negative(t, lora):
    return ["--lora", lora, "--seed-offset", "-1"], ["--seed-offset -1", ">= 0"]


def _too_many_steps(t, lora):
    return ["--lora", lora, "--num-steps", "5000"], ["--num-steps 5000", "1000"]


def _spm_not_spm(t, lora):  # the toy base model's directory is not a preference model
    base = resolve_model_path("toyworld:base")
    return ["--lora", lora, "--reward", "spm", "--spm", base], ["--spm", str(base), "config.json"]


def _spm_truncated(t, lora):
    d = t / "spm"
    shutil.copytree(resolve_model_path("toyworld:spm"), d)
    truncate(d / "model.safetensors")
    return ["--lora", lora, "--reward", "spm", "--spm", d], ["--spm", str(d / "model.safetensors"), "truncated"]


def _clip_reward_missing(t, lora):
    return ["--lora", lora, "--clip-reward", t / "pickscore"], ["--clip-reward", str(t / "pickscore"),
                                                                 "no such directory"]


def _clip_reward_without_dir(t, lora):
    return ["--lora", lora, "--reward", "clip"], ["--reward clip", "--clip-reward DIR"]


def _out_under_a_file(t, lora):
    (t / "file.txt").write_text("x")
    return ["--lora", lora, "--out", t / "file.txt" / "ev"], [str(t / "file.txt"), "not a directory"]


def _out_is_a_file(t, lora):
    (t / "ev").write_text("x")
    return ["--lora", lora, "--out", t / "ev"], ["--out", str(t / "ev"), "not a directory"]


def _out_holds_an_earlier_evaluation(t, lora):
    (t / "ev").mkdir()
    (t / "ev" / "eval.json").write_text("{}")
    return ["--lora", lora, "--out", t / "ev"], [f"--out={t / 'ev'}", "already holds eval.json"]


CASES = [_missing_lora, _empty_lora, _lora_is_file, _run_dir_not_lora, _truncated_lora, _not_safetensors, _lora_of_sdxl,
         _lora_other_widths, _lora_partly_foreign, _lora_not_diffusers_keys, _lora_text_encoder, _unet_dir_truncated,
         _unet_dir_other_arch, _missing_prompts, _empty_prompts, _blank_prompts, _non_toy_prompt_ground_truth,
         _unknown_prompt_set, _missing_model, _model_without_unet, _model_truncated_unet, _unknown_toy_model,
         _wrong_family, _seeds_0, _n_prompts_0, _batch_size_negative, _seeds_not_int, _eta_nan, _guidance_inf,
         _seed_offset_negative, _too_many_steps, _spm_not_spm, _spm_truncated, _clip_reward_missing,
         _clip_reward_without_dir, _out_under_a_file, _out_is_a_file, _out_holds_an_earlier_evaluation]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_is_one_named_error_before_any_model(case, tmp_path, lora_dir, no_models, capsys):
    argv, names = case(tmp_path, lora_dir)
    if "--out" not in map(str, argv):
        argv = [*argv, "--out", tmp_path / "ev"]
    rc, out, err = run_main(argv, capsys)
    assert rc == 2, (rc, err)
    assert "Traceback" not in out + err and "model built" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert not (tmp_path / "ev").is_dir() or case is _out_holds_an_earlier_evaluation


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out(tmp_path, lora_dir, no_models, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = run_main(["--lora", lora_dir, "--out", ro / "ev"], capsys)
    finally:
        ro.chmod(0o700)
    assert rc == 2 and err.startswith("error: ") and f"{ro} is not writable" in err


def test_truncated_lora_subprocess(tmp_path, lora_dir):
    """The real command line: one error line on stderr, exit code 2, no traceback."""
    d = tmp_path / "lora"
    shutil.copytree(lora_dir, d)
    truncate(d / "pytorch_lora_weights.safetensors")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "spo_fast.evaluate", "--lora", str(d), *TINY], capture_output=True,
                       text=True, env=env, timeout=300, check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --lora LoRA weights file") and "truncated" in lines[0]


# ----------------------------------------------------------------------------- valid input
def test_lora_fits_check_accepts_both_key_formats(lora_dir):
    """The trainer's file (``unet.`` + lora.down/up) and a bare peft state dict (lora_A/B) both fit the toy UNet."""
    from safetensors import safe_open

    from spo_fast.core.errors import safetensors_header

    unet = evaluate._meta_unet(resolve_model_path("toyworld:base") / "unet", "toy")
    file = lora_dir / "pytorch_lora_weights.safetensors"
    header = safetensors_header(file)
    assert evaluate.check_lora_fits(file, header, unet, "toyworld:base", "sd15") == ("unet", len(header) // 2)
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
    peft_style = {k.removeprefix("unet.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."):
                  {"shape": header[k]["shape"]} for k in keys}
    assert evaluate.check_lora_fits(file, peft_style, unet, "toyworld:base", "sd15") == (None, len(keys) // 2)


def test_sdxl_lora_does_not_fit_sd15_unet():
    """The real case, on the packaged architectures' UNets built on the meta device: a LoRA with SDXL's module names
    and widths (attention and 1x1 conv modules) fits the SDXL UNet and not the SD1.5 one."""
    from torch import nn

    from spo_fast.core.errors import WeightsFileError

    sdxl, sd15 = (evaluate._meta_unet(resolve_model_path(f"arch:{n}") / "unet", n) for n in ("sdxl", "sd15"))
    header = {}
    for name, m in sdxl.named_modules():
        if name.endswith((".attn1.to_q", ".attn2.to_k", ".proj_in")):
            conv = isinstance(m, nn.Conv2d)
            fan_in, fan_out = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
            header[f"unet.{name}.lora.down.weight"] = {"shape": [4, fan_in, *([1, 1] if conv else [])]}
            header[f"unet.{name}.lora.up.weight"] = {"shape": [fan_out, 4, *([1, 1] if conv else [])]}
    file = Path("sdxl_lora.safetensors")
    assert evaluate.check_lora_fits(file, header, sdxl, "sdxl", "sdxl") == ("unet", len(header) // 2)
    with pytest.raises(WeightsFileError, match=r"are not modules of that UNet.*other widths.*check --model/--family"):
        evaluate.check_lora_fits(file, header, sd15, "sd15", "sd15")


def test_seed_offset_selects_the_noise_seeds(monkeypatch):
    """Offset 0 is today's noise (seed s of chunk c from ``(base_seed * 7919 + s) * 1_000_003 + c``); offset N
    samples seeds N.. with the same noise they have in a longer run."""
    from spo_fast.diffusion.models import load_components

    comp = load_components("toyworld:base", "sd15")
    noise = []

    def fake_sample(unet, schedule, cond, uncond, x, guidance_scale, eta, gen, backend=None):
        noise.append(x.clone())
        return x

    monkeypatch.setattr(evaluation, "sample", fake_sample)
    prompts = ["a", "b", "c"]

    def run(seeds, **kw):
        noise.clear()
        evaluation.generate(comp, None, None, prompts, seeds, 5.0, 1.0, 2, "cpu", **kw)
        return list(noise)

    today = run(3)
    shape = (3, 24, 24)
    for s in range(3):
        for i, start in enumerate((0, 2)):
            gen = torch.Generator().manual_seed(s * 1_000_003 + start)
            assert torch.equal(today[2 * s + i], torch.randn((len(prompts[start:start + 2]), *shape), generator=gen))
    assert all(torch.equal(a, b) for a, b in zip(run(3, seed_offset=0), today))
    shifted = run(2, seed_offset=1)
    assert all(torch.equal(a, b) for a, b in zip(shifted, today[2:]))  # seeds 1, 2
    assert not torch.equal(shifted[0], today[0])


def test_cli_seed_offset_and_valid_unet_dir(tmp_path, lora_dir, capsys):
    """--seed-offset 1 with one seed = the second seed of a two-seed run (recorded in eval.json and the summary);
    the default is offset 0. A fine-tuned UNet directory (here the base UNet itself) passes the checks."""
    assert evaluate.main(["--lora", str(lora_dir), *TINY, "--seeds", "2", "--out", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert a["seed_offset"] == 0 and a["n_seeds"] == 2
    capsys.readouterr()
    assert evaluate.main(["--lora", str(lora_dir), *TINY, "--seed-offset", "1", "--out", str(tmp_path / "b")]) == 0
    b = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert b["seed_offset"] == 1 and b["n_seeds"] == 1
    assert b["reward_base_per_seed"][0] == pytest.approx(a["reward_base_per_seed"][1], abs=1e-6)
    assert b["reward_trained_per_seed"][0] == pytest.approx(a["reward_trained_per_seed"][1], abs=1e-6)
    assert b["reward_base"] != pytest.approx(a["reward_base_per_seed"][0], abs=1e-6)  # other noise than seed 0
    assert "(noise seed 1)" in capsys.readouterr().out
    unet = tmp_path / "ft" / "unet"
    shutil.copytree(resolve_model_path("toyworld:base") / "unet", unet)
    assert evaluate.main(["--lora", str(unet), *TINY, "--out", str(tmp_path / "c")]) == 0
    c = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert c["margin"] == 0 and c["ties"] == 2


def test_default_out_is_a_new_directory_next_to_the_lora(tmp_path, lora_dir):
    """Without --out each evaluation gets a new directory (evaluate-1, evaluate-2, ...) next to --lora: a training
    run's own eval.json and eval_grid.png beside its lora/ are never replaced."""
    run = tmp_path / "run"
    shutil.copytree(lora_dir, run / "lora")
    (run / "eval.json").write_text('{"the run": "own"}')
    assert evaluate.check_out(None, run / "lora") == run / "evaluate-1"
    assert evaluate.main(["--lora", str(run / "lora"), *TINY]) == 0
    assert json.loads((run / "eval.json").read_text()) == {"the run": "own"}
    assert json.loads((run / "evaluate-1" / "eval.json").read_text())["n_prompts"] == 2
    assert (run / "evaluate-1" / "eval_grid.png").is_file()
    assert evaluate.check_out(None, run / "lora") == run / "evaluate-2"
