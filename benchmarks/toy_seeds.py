"""The embedded default over several training seeds, on the toy world's two evaluation splits.

    python benchmarks/toy_seeds.py [--seeds 0 1 2] [--out outputs/toy_seeds] [--tune | --evaluate-only] [key=value ...]

For each ``train.seed``: ``python -m spo_fast.train`` (the ``toy_spo`` recipe plus the overrides) into OUT/seedS,
whose end-of-run evaluation is the **test** split (``toyworld:test``: 64 held-out prompts x 4 seeds), then ``python
-m spo_fast.evaluate`` of the same LoRA on the **validation** split (64 other held-out prompts, the same colours,
``toyworld:validation``) into OUT/seedS/validation. ``--tune`` is for choosing settings: the run evaluates on the
validation split only and the test split is never generated. ``--evaluate-only`` trains nothing: it evaluates the
LoRA already in OUT/seedS/lora (e.g. a link to ``python -m spo_fast.compare``'s ``spo/`` run of that seed, the same
training) on both splits, into OUT/seedS/test and OUT/seedS/validation. Writes OUT/seeds.json and prints a table:
base (seed spread), trained, margin (in units of the base seed spread), win rate, ties, the largest weighted fall of
a ground-truth component, and whether each (seed, split) meets the targets (win rate >= 0.75, margin > 3x the base
seed spread, no component's weighted fall larger than the base seed spread: no reward hacking).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TARGET_WIN = 0.75
TARGET_MARGIN_OVER_SPREAD = 3.0


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
    # the ground truth's components are in [0, 1]; weighted, each fall is in the reward's units
    from spo_fast.toyworld.world import WEIGHTS

    falls = {k: WEIGHTS[k] * (e["components_base"][k] - e["components_trained"][k]) for k in WEIGHTS}
    worst = max(falls, key=falls.get)
    row["largest_component_fall"] = {"component": worst, "weighted_fall": falls[worst]}
    row["meets_targets"] = bool(e["win_rate"] >= TARGET_WIN and e["margin"] > TARGET_MARGIN_OVER_SPREAD * spread
                                and falls[worst] <= spread)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("outputs/toy_seeds"))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tune", action="store_true", help="evaluate on the validation split only (choosing settings)")
    mode.add_argument("--evaluate-only", action="store_true",
                      help="train nothing: evaluate OUT/seedS/lora on the test and validation splits")
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
        if args.evaluate_only:
            if not (out / "lora").is_dir():
                sys.exit(f"error: --evaluate-only: {out / 'lora'} does not exist (train seed {seed} there first)")
            run = {}
            for split in ("test", "validation"):
                _run([sys.executable, "-m", "spo_fast.evaluate", "--lora", str(out / "lora"), "--prompts",
                      f"toyworld:{split}", "--out", str(out / split)], args.out / f"seed{seed}_{split}.log")
                run[split] = _summary(out / split / "eval.json")
        elif args.tune:
            run = {"wall_s": round(_run(cmd, args.out / f"seed{seed}.log"), 1)}
            run["validation"] = _summary(out / "eval.json")
        else:
            run = {"wall_s": round(_run(cmd, args.out / f"seed{seed}.log"), 1)}
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
                      f"win {r['win_rate']:.3f} ({r['ties']} ties), largest fall "
                      f"{r['largest_component_fall']['component']} {r['largest_component_fall']['weighted_fall']:+.3f}"
                      f"{'' if r['meets_targets'] else '  MISSES'}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
