"""benchmarks/retune_dpo.py: tune-dpo's choice again from trained runs' final LoRAs, with the evaluation faked."""
import json
from pathlib import Path

import pytest


@pytest.fixture
def mod(bench_script):
    return bench_script("retune_dpo")


def _record(tmp_path, seed, lrs):
    grid = []
    for lr in lrs:
        run = tmp_path / f"s{seed}" / f"lr{lr}"
        (run / "lora").mkdir(parents=True)
        (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
        point0 = {"iteration": 0, "unet_fwd_eq": 0, "reward": 9.0, "margin": 0.0}
        last = {"iteration": 400, "unet_fwd_eq": 51200, "reward": 9.5, "margin": 0.5}
        grid.append({"lr": lr, "beta": 5000.0, "iterations": 400, "output_dir": str(run), "points": [point0, last]})
    path = tmp_path / f"tune_s{seed}.json"
    path.write_text(json.dumps({"grid": grid, "protocol": {"prompts": "toyworld:validation"}, "recipe": "toy_dpo",
                                "overrides": [f"train.seed={seed}"], "base": {"reward": 9.0}}))
    return path


def test_rechooses_on_new_evaluations(tmp_path, capsys, mod):
    # new validation margins by (lr, seed): 1e-3 wins on the mean, 3e-4 on the lowest seed (the rule)
    margins = {(3e-4, 0): 0.30, (3e-4, 1): 0.25, (1e-3, 0): 0.60, (1e-3, 1): 0.10}

    def fake_evaluate(lora, out, seeds):
        lr = float(Path(lora).parent.name[2:])
        seed = int(Path(lora).parent.parent.name[1:])
        return {"reward_trained": 3.0 + margins[lr, seed], "reward_base": 3.0, "margin": margins[lr, seed],
                "margin_se": 0.05, "win_rate": 0.5, "ties": 0, "reward_base_seed_spread": 0.2,
                "reward_base_per_seed": [3.0] * seeds}

    mod.evaluate = fake_evaluate
    records = [_record(tmp_path, s, [3e-4, 1e-3]) for s in (0, 1)]
    assert mod.main([*map(str, records), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "tune_dpo.json").read_text())
    assert report["chosen"]["lr"] == 3e-4 and report["chosen"]["margins"] == [0.30, 0.25]
    assert report["chosen"]["max_iterations"] == 400 and report["base"]["reward"] == 3.0
    assert len(report["grid"]) == 4 and all(r["points"][0]["reward"] == 3.0 for r in report["grid"])
    assert report["retuned_from"] == [str(r) for r in records]
    capsys.readouterr()


def test_a_run_without_its_lora_is_named(tmp_path, mod):
    record = _record(tmp_path, 0, [3e-4])
    (tmp_path / "s0" / "lr0.0003" / "lora" / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(SystemExit, match="has no final LoRA"):
        mod.main([str(record), "--out", str(tmp_path / "out")])
