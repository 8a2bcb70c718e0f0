"""log.report_to: metrics (and the config) to accelerate's trackers; a tracker asked for but not installed is a
named error before any model is built; the console says once where metrics go."""
from __future__ import annotations

import pytest

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
