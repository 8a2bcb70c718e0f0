"""Every JSON file the project writes is strict JSON: no bare NaN or Infinity, which strict parsers reject."""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from spo_fast import evaluate, train
from spo_fast.core import jsonio

PACKAGE = Path(__file__).resolve().parents[1] / "spo_fast"


def loads_strict(text: str):
    def reject(constant: str):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=reject)


def test_non_finite_floats_become_null_at_any_depth():
    obj = {"a": math.nan, "b": [math.inf, 1.5, {"c": -math.inf}], "d": (2.0, math.nan), "e": "NaN", "f": 3}
    text = jsonio.dumps(obj)
    assert loads_strict(text) == {"a": None, "b": [None, 1.5, {"c": None}], "d": [2.0, None], "e": "NaN", "f": 3}
    finite = {"x": [0.1, 2.5e-7, -3.0], "y": {"z": 1}, "n": None}
    assert jsonio.dumps(finite, indent=1) == json.dumps(finite, indent=1)  # finite data: byte-identical output
    with pytest.raises(ValueError):
        loads_strict(json.dumps({"a": math.nan}))  # what plain json.dumps writes


def test_the_package_serialises_only_through_jsonio():
    """No ``json.dump``/``json.dumps`` call in spo_fast outside ``core/jsonio.py``: a new writer cannot bring NaN
    back without failing here."""
    found = []
    for f in PACKAGE.rglob("*.py"):
        if f.name == "jsonio.py" and f.parent.name == "core":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("dump", "dumps")
                    and isinstance(node.value, ast.Name) and node.value.id == "json"):
                found.append(f"{f.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, found


@pytest.mark.slow
def test_a_run_with_one_seed_writes_strict_json(tmp_path):
    """One evaluation seed (no seed spread), a checkpoint, the sample grid, the evaluation CLI: every .json and
    .jsonl file written parses strictly."""
    out = tmp_path / "run"
    train.train(train.load_config(None, [
        f"log.output_dir={out}", "train.max_iterations=1", "sampling.num_steps=4", "spo.divert_start_step=2",
        "train.batch_size=2", "train.train_batch_size=2", "eval.n_prompts=2", "eval.seeds=1", "eval.grid_prompts=1",
        "log.progress=false", "log.sample_prompts=1", "checkpoint.every=1"]))
    assert evaluate.main(["--lora", str(out / "lora"), "--n-prompts", "2", "--seeds", "1", "--num-steps", "4",
                          "--grid-prompts", "1", "--out", str(tmp_path / "ev")]) == 0
    files = sorted(p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl"))
    names = {p.name for p in files}
    assert {"eval.json", "samples.json", "summary.json", "state.json"} <= names and "metrics.jsonl" in names, names
    for p in files:
        lines = p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]
        for line in lines:
            loads_strict(line)
    for ev in (out / "eval.json", tmp_path / "ev" / "eval.json"):
        assert loads_strict(ev.read_text())["reward_base_seed_spread"] is None
