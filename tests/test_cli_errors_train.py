"""Bad input to ``python -m spo_fast.train``: each case is one line ``error: ...`` naming the bad key, value or file,
exit code 2, no traceback, and (the fast path) no model is built before the error."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_train import FAST, cfg_for

from spo_fast.core import trainer
from spo_fast.diffusion.models import resolve_model_path
from spo_fast.train import main, run


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run of one iteration with a checkpoint (config recorded), copied by the resume cases."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run(cfg_for(out, "train.max_iterations=1", "checkpoint.resume=never"))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def _ckpt(out: Path) -> Path:
    return next((out / "checkpoints").glob("iter_*"))


# --- how each case builds its bad input (in tmp: the case's own directory) and what the error must name ---------
def _model_copy(tmp: Path, damage) -> Path:
    d = tmp / "base"
    shutil.copytree(resolve_model_path("toyworld:base"), d)
    damage(d)
    return d


def _spm_copy(tmp: Path, damage) -> Path:
    d = tmp / "spm"
    shutil.copytree(resolve_model_path("toyworld:spm"), d)
    damage(d)
    return d


def _run_copy(tmp: Path, trained: Path, damage=None) -> Path:
    d = tmp / "run"
    shutil.copytree(trained, d)
    if damage:
        damage(_ckpt(d))
    return d


def _write_state(ckpt: Path, **change) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    state.update(change)
    (ckpt / "state.json").write_text(json.dumps(state))


CASES = {
    # name: (overrides builder(tmp, trained) -> list[str], what stderr must contain)
    "lr_inf": (lambda tmp, tr: ["train.lr=inf"], "train.lr=inf: must be a finite number"),
    "lr_nan": (lambda tmp, tr: ["train.lr=nan"], "train.lr=nan: must be a finite number"),
    "eta_yaml_inf": (lambda tmp, tr: ["sampling.eta=-inf"], "sampling.eta=-inf"),
    "beta_text": (lambda tmp, tr: ["spo.beta=ten"], "spo.beta: expected a number, got 'ten'"),
    "unknown_key": (lambda tmp, tr: ["train.lrr=1e-4"], "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    "bad_steps_zero": (lambda tmp, tr: ["train.max_bad_steps=0"], "train.max_bad_steps=0"),
    "no_model_dir": (lambda tmp, tr: [f"model.path={tmp}/nope", "model.init=pretrained"], "nope does not exist"),
    "unet_truncated": (lambda tmp, tr: [f"model.path={_model_copy(tmp, lambda d: _truncate(d / 'unet' / 'diffusion_pytorch_model.safetensors'))}",
                                        "model.init=pretrained"], "diffusion_pytorch_model.safetensors is truncated"),
    "text_encoder_not_safetensors": (
        lambda tmp, tr: [f"model.path={_model_copy(tmp, lambda d: (d / 'text_encoder' / 'model.safetensors').write_text('<html>404</html>'))}",
                         "model.init=pretrained"], "model.safetensors is truncated or not a safetensors file"),
    "spm_truncated": (lambda tmp, tr: ["scorer.name=spm", f"scorer.path={_spm_copy(tmp, lambda d: _truncate(d / 'spm.safetensors'))}"],
                      "spm.safetensors is truncated"),
    "spm_clip_truncated": (lambda tmp, tr: ["scorer.name=spm", f"scorer.path={_spm_copy(tmp, lambda d: _truncate(d / 'model.safetensors'))}"],
                           "model.safetensors is truncated"),
    "spm_not_clip": (lambda tmp, tr: ["scorer.name=spm", f"scorer.path={resolve_model_path('toyworld:base') / 'unet'}"],
                     "expected model_type 'clip'"),
    "resume_nonexistent": (lambda tmp, tr: [f"checkpoint.resume={tmp}/nope"], "nope' is not a checkpoint directory"),
    "resume_rank_changed": (lambda tmp, tr: [f"log.output_dir={_run_copy(tmp, tr)}", "lora.rank=8"],
                            "lora.rank was 4, is now 8"),
    "resume_full_finetune": (lambda tmp, tr: [f"log.output_dir={_run_copy(tmp, tr)}", "lora.enabled=false"],
                             "lora.enabled was True, is now False"),
    "resume_method_model": (lambda tmp, tr: [f"log.output_dir={_run_copy(tmp, tr)}", "model.seed=7"],
                            "model.seed was 0, is now 7"),
    "resume_batch_layout": (lambda tmp, tr: [f"log.output_dir={_run_copy(tmp, tr)}", "train.batch_size=4",
                                             "train.train_batch_size=4"], "train.batch_size was 2, is now 4"),
    "resume_path_other_targets": (lambda tmp, tr: [f"checkpoint.resume={_ckpt(_run_copy(tmp, tr))}", "lora.targets=to_q",
                                                   f"log.output_dir={tmp}/new"], "Restore lora.targets=to_q,to_k,to_v,to_out.0"),
    "resume_world_size": (lambda tmp, tr: [f"log.output_dir={_run_copy(tmp, tr, lambda c: _write_state(c, world_size=2))}"],
                          "written by 2 processes, this run has 1"),
    "resume_state_corrupt": (lambda tmp, tr: [f"log.output_dir={_run_copy(tmp, tr, lambda c: (c / 'state.json').write_text('{'))}"],
                             "state.json is unreadable or incomplete"),
    "resume_weights_truncated": (lambda tmp, tr: [f"log.output_dir={_run_copy(tmp, tr, lambda c: _truncate(c / 'trainable.safetensors'))}"],
                                 "trainable.safetensors is truncated"),
    "resume_optimizer_truncated": (lambda tmp, tr: [f"log.output_dir={_run_copy(tmp, tr, lambda c: _truncate(c / 'optimizer.pt'))}"],
                                   "optimizer.pt is truncated or corrupt"),
    "resume_optimizer_missing": (lambda tmp, tr: [f"log.output_dir={_run_copy(tmp, tr, lambda c: (c / 'optimizer.pt').unlink())}"],
                                 "lacks optimizer.pt"),
    "prompts_empty": (lambda tmp, tr: [f"data.prompts={tmp / 'empty.txt'}"], "empty.txt"),
    "output_under_a_file": (lambda tmp, tr: [f"log.output_dir={tmp / 'afile' / 'sub'}"], "not writable"),
    "recipe_missing": (lambda tmp, tr: None, "nope.yaml' does not exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_named_line_before_any_model(case, tmp_path, trained, capsys, monkeypatch):
    build, needle = CASES[case]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "afile").write_text("x")
    overrides = build(tmp_path, trained)
    argv = [str(tmp_path / "nope.yaml")] if overrides is None else \
        ["tiny_sd15_color", *FAST, *(["log.output_dir=" + str(tmp_path / "out")] if not any(
            o.startswith("log.output_dir=") for o in overrides) else []), *overrides]

    def built(*a, **k):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(trainer, "build", built)
    monkeypatch.setattr(trainer, "load_components", built)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err


def test_weights_of_another_component_fail_by_name_when_loading(tmp_path, capsys):
    """A UNet directory holding the text encoder's weights: complete files, so only loading can tell; diffusers
    would initialise the UNet randomly and carry on. One named line, exit 2, no traceback."""
    d = tmp_path / "base"
    shutil.copytree(resolve_model_path("toyworld:base"), d)
    shutil.copy(d / "text_encoder" / "model.safetensors", d / "unet" / "diffusion_pytorch_model.safetensors")
    code = main(["tiny_sd15_color", *FAST, f"log.output_dir={tmp_path / 'out'}", f"model.path={d}",
                 "model.init=pretrained"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: unet weights in {d / 'unet'} are not this model's"), err
    assert "missing" in lines[0] and "Traceback" not in err


def test_safe_change_on_resume_is_a_warning_and_is_used(tmp_path, trained, capsys):
    out = _run_copy(tmp_path, trained)
    run(cfg_for(out, "train.max_iterations=2", "train.lr=0.02", "train.adam_beta2=0.99"))
    err = capsys.readouterr().err
    assert "warning: resuming from" in err and "train.lr: 0.01 -> 0.02" in err and "train.adam_beta2" in err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == 2 and rows[-1]["lr"] == pytest.approx(0.02)  # the new lr, not the saved one


def test_resume_loads_the_new_hyperparameters_into_the_optimizer(tmp_path, trained):
    from accelerate import Accelerator

    from spo_fast.core.checkpoint import load_checkpoint

    cfg = cfg_for(tmp_path, "train.lr=0.005", "train.weight_decay=0.5", "train.warmup_steps=1000")
    s = trainer.build(cfg, Accelerator())
    state = load_checkpoint(Accelerator(), _ckpt(trained), s.raw_unet, s.optimizer, s.lr_scheduler)
    g = s.optimizer.param_groups[0]
    assert g["weight_decay"] == 0.5 and g["initial_lr"] == 0.005
    # constant_with_warmup at the resumed optimizer step: lr = 0.005 * step / 1000
    assert g["lr"] == pytest.approx(0.005 * state["opt_step"] / 1000)
    assert len(s.optimizer.state) > 0  # the moments came back


def test_old_checkpoint_without_config_resumes_with_a_warning(tmp_path, trained, capsys):
    out = _run_copy(tmp_path, trained, lambda c: (c / "config.yaml").unlink())
    summary, _ = run(cfg_for(out, "train.max_iterations=2"))
    assert summary["iteration"] == 2
    assert "records no config" in capsys.readouterr().err


def test_checkpoint_records_the_resolved_config(trained):
    saved = yaml.safe_load((_ckpt(trained) / "config.yaml").read_text())
    assert saved["lora"]["rank"] == 4 and saved["train"]["lr"] == 0.01 and saved["method"] == "spo"


def test_subprocess_has_no_traceback(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"iteration": 1, "opt_step": 1, "world_size": 1}))
    save_file({"x": torch.zeros(4)}, str(ckpt / "trainable.safetensors"))
    _truncate(ckpt / "trainable.safetensors")
    proc = subprocess.run([sys.executable, "-m", "spo_fast.train", "tiny_sd15_color", *FAST,
                           f"log.output_dir={tmp_path / 'out'}", f"checkpoint.resume={ckpt}"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "trainable.safetensors is truncated" in proc.stderr
