"""log.report_to: metrics (and the config) to accelerate's trackers; a tracker asked for but not installed is a
named error before any model is built; the console says once where metrics go."""
from __future__ import annotations

import json

import pytest
import torch

from spo_fast import train
from spo_fast.core import trainer
from spo_fast.core.config import ConfigError, load_config

FAST = ["train.max_iterations=1", "sampling.num_steps=4", "spo.divert_start_step=2", "spo.threshold=0.0",
        "train.batch_size=2", "train.train_batch_size=2", "log.progress=false", "log.sample_prompts=0"]


def _cfg(out, *extra):
    return load_config("tiny_sd15_color", [*FAST, f"log.output_dir={out}", *extra])


@pytest.mark.slow
def test_tensorboard_and_wandb_offline(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written locally, `wandb sync` uploads it
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.train(_cfg(out, "log.report_to=tensorboard,wandb"))
    assert "metrics: " in capsys.readouterr().out
    assert list((out / "spo").rglob("events.out.tfevents.*"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_the_console_says_where_metrics_go(tmp_path, capsys):
    train.train(_cfg(tmp_path / "run", "log.report_to=none"))
    said = capsys.readouterr().out
    assert f"metrics: {tmp_path / 'run' / 'metrics.jsonl'}; no tracker (log.report_to=none)" in said


def test_auto_all_and_lists(tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["wandb"])
    assert trainer.trackers(_cfg(tmp_path, "log.report_to=auto")) == []  # auto: tensorboard only, when installed
    assert trainer.trackers(_cfg(tmp_path, "log.report_to=all")) == ["wandb"]
    assert trainer.trackers(_cfg(tmp_path, "log.report_to=none")) == []
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard", "wandb"])
    assert trainer.trackers(_cfg(tmp_path, "log.report_to=auto")) == ["tensorboard"]
    assert trainer.trackers(_cfg(tmp_path, "log.report_to=wandb, tensorboard")) == ["wandb", "tensorboard"]


@pytest.mark.parametrize("value, names", [("comet_ml", ["comet_ml is not installed", "pip install comet_ml"]),
                                          ("wandb", ["wandb is not installed", "spo_fast[wandb]"])])
def test_a_tracker_not_installed_is_named_before_any_model(value, names, tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])

    def built(*a, **k):
        raise AssertionError("model built")

    monkeypatch.setattr(trainer, "build", built)
    with pytest.raises(ConfigError) as e:
        train.train(_cfg(tmp_path, f"log.report_to={value}"))
    assert all(n in str(e.value) for n in names) and f"log.report_to={value!r}" in str(e.value)


@pytest.mark.parametrize("item, name", [("log.report_to=tensorbored", "log.report_to='tensorbored' is not accepted"),
                                        ("log.tensorboard=false", "'log.tensorboard' was replaced by log.report_to")])
def test_bad_report_to_values(item, name):
    with pytest.raises(ConfigError, match=name.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [item])


@pytest.mark.slow
def test_validation_images_every_n_iterations(tmp_path):
    """log.sample_every=1 over 3 iterations: samples/iter_1 and iter_2 (the last one is the end's samples.png), the
    same prompts and noise each time, the grids in tensorboard; and sampling them changes nothing in training."""
    pytest.importorskip("tensorboard")
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["train.max_iterations=3", "log.sample_prompts=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    train.train(_cfg(a, *common, "log.sample_every=1", "log.report_to=tensorboard"))
    train.train(_cfg(b, *common, "log.report_to=none"))
    assert sorted(p.name for p in (a / "samples").iterdir()) == [
        "iter_0000001.json", "iter_0000001.png", "iter_0000002.json", "iter_0000002.png"]
    first, second = (json.loads((a / "samples" / f"iter_000000{i}.json").read_text()) for i in (1, 2))
    assert first["prompts"] == second["prompts"] and first["scores"]["base"] == second["scores"]["base"]
    assert not (b / "samples").exists()
    ea = EventAccumulator(str(next((a / "spo").rglob("events.out.tfevents.*")).parent))
    ea.Reload()
    assert "samples" in ea.Tags()["images"] and [e.step for e in ea.Images("samples")] == [1, 2]
    wa, wb = (load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
