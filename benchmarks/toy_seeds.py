"""The embedded default over several training seeds, on the toy world's two evaluation splits.

    python benchmarks/toy_seeds.py [--seeds 0 1 2] [--out outputs/toy_seeds] [--tune] [key=value ...]

For each ``train.seed``: ``python -m spo_fast.train`` (the ``toy_spo`` recipe plus the overrides) into
OUT/seedS, whose end-of-run evaluation is the **test** split (the first 64 held-out prompts x 4 seeds), then
``python -m spo_fast.evaluate`` of the same LoRA on the **validation** split (64 other held-out prompts,
``toyworld:validation``) into OUT/seedS/validation. ``--tune`` is for choosing settings: the run evaluates on the
validation split only and the test split is never generated. Writes OUT/seeds.json and prints a table: base (seed
spread), trained, margin (in units of the base seed spread), win rate, ties, and whether each (seed, split) meets
the targets (win rate >= 0.70, margin > the base seed spread).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TARGET_WIN = 0.70


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"error: {' '.join(cmd)} exited with {rc}; see {log}")
    return time.perf_counter() - t0


def _summary(eval_json: Path) -> dict:
    e = json.loads(eval_json.read_text())
    spread = e["reward_base_seed_spread"]
    row = {k: e.get(k) for k in ("reward_base", "reward_base_seed_spread", "reward_trained", "margin", "win_rate",
                                 "ties", "n_prompts", "n_seeds")}
    row["margin_over_spread"] = e["margin"] / spread if spread else None
    row["meets_targets"] = bool(e["win_rate"] >= TARGET_WIN and e["margin"] > spread)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("outputs/toy_seeds"))
    p.add_argument("--tune", action="store_true", help="evaluate on the validation split only (choosing settings)")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"overrides": args.overrides, "tune": args.tune, "runs": {}}
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        cmd = [sys.executable, "-m", "spo_fast.train", f"train.seed={seed}", f"log.output_dir={out}",
               "log.progress=false", *args.overrides]
        if args.tune:
            cmd.append("eval.prompts=toyworld:validation")
        wall = _run(cmd, args.out / f"seed{seed}.log")
        run = {"wall_s": round(wall, 1)}
        if args.tune:
            run["validation"] = _summary(out / "eval.json")
        else:
            run["test"] = _summary(out / "eval.json")
            _run([sys.executable, "-m", "spo_fast.evaluate", "--lora", str(out / "lora"), "--prompts",
                  "toyworld:validation", "--out", str(out / "validation")], args.out / f"seed{seed}_validation.log")
            run["validation"] = _summary(out / "validation" / "eval.json")
        results["runs"][seed] = run
        (args.out / "seeds.json").write_text(json.dumps(results, indent=1) + "\n")
        for split in ("test", "validation"):
            if split in run:
                r = run[split]
                print(f"seed {seed} {split:10s}: base {r['reward_base']:.3f} (spread {r['reward_base_seed_spread']:.3f})"
                      f" -> {r['reward_trained']:.3f}, margin {r['margin']:+.3f} ({r['margin_over_spread']:.1f}x), "
                      f"win {r['win_rate']:.3f} ({r['ties']} ties){'' if r['meets_targets'] else '  MISSES'}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
