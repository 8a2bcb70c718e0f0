"""A finished run started again says so and exits (no model built, its results untouched), unless its end phase is
asked for again (checkpoint.redo_end=true) or the run is made longer (it then resumes and trains on)."""
from __future__ import annotations

import json

import pytest

from spo_fast import train
from spo_fast.core import trainer

TINY = ["train.max_iterations=1", "sampling.num_steps=4", "spo.divert_start_step=2", "train.batch_size=2",
        "train.train_batch_size=2", "eval.n_prompts=2", "eval.seeds=1", "eval.grid_prompts=1", "log.progress=false",
        "log.sample_prompts=1"]


@pytest.mark.slow
def test_a_finished_run_is_not_redone(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = [f"log.output_dir={out}", *TINY]
    assert train.main(argv) == 0
    finished = {f: (out / f).stat().st_mtime_ns for f in ("eval.json", "eval_grid.png", "summary.json", "samples.png")}
    capsys.readouterr()

    def built(*a, **k):
        raise AssertionError("model built")

    with monkeypatch.context() as m:
        m.setattr(trainer, "build", built)
        assert train.main(argv) == 0
    said = capsys.readouterr().out
    assert "holds a finished run (1 iterations" in said and "checkpoint.redo_end=true" in said
    assert {f: (out / f).stat().st_mtime_ns for f in finished} == finished

    (out / "eval.json").unlink()
    assert train.main([*argv, "checkpoint.redo_end=true"]) == 0  # the end phase again, no training
    assert (out / "eval.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    longer = [a if not a.startswith("train.max_iterations") else "train.max_iterations=2" for a in argv]
    assert train.main(longer) == 0  # a longer run resumes and trains on
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert trainer.finished_run(train.load_config(None, longer), out)["iterations"] == 2
    assert trainer.finished_run(train.load_config(None, [*longer, "checkpoint.resume=never"]), out) is None
