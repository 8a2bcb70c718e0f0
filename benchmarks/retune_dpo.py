"""Choose DPO's setting again on today's validation prompts, from tune-dpo runs already trained: every run's final
LoRA is evaluated on ``toyworld:validation`` and ``spo_fast.compare``'s choice rule (``TUNE_RULE``: the highest lowest
margin over the training seeds) picks the lr and beta at the runs' length.

    python benchmarks/retune_dpo.py OUT/tune_dpo.json [MORE.json ...] [--out outputs/retune_dpo]

For when the validation prompts change after the runs were trained (the toy world's evaluation splits were
stratified by colour): a run's LoRA depends only on its config, not on the prompts it was evaluated on, so
evaluating the saved final LoRAs is the tune at one point per run (its end) without training again. The evaluation
is the end-of-run protocol (``python -m spo_fast.evaluate``: 64 prompts x 4 seeds, base and trained on the same
noise, the ground truth; the base's half from the base-evaluation cache). Writes ``OUT/tune_dpo.json`` in
tune-dpo's format (``--dpo-from`` reads it) with ``retuned_from`` naming the records; prints one line per run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from spo_fast import compare
from spo_fast.core import jsonio


def evaluate(lora: Path, out: Path, seeds: int) -> dict:
    cmd = [sys.executable, "-m", "spo_fast.evaluate", "--lora", str(lora), "--prompts", "toyworld:validation",
           "--n-prompts", "64", "--seeds", str(seeds), "--grid-prompts", "8", "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "eval.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", type=Path, help="tune_dpo.json files whose runs' output dirs still exist")
    p.add_argument("--out", type=Path, default=Path("outputs/retune_dpo"))
    p.add_argument("--seeds", type=int, default=4, help="noise seeds per prompt (default 4, the protocol's)")
    args = p.parse_args(argv)
    rows, base, first = [], None, None
    for path in args.records:
        record = json.loads(path.read_text())
        first = first or record
        for row in record["grid"]:
            lora = Path(row["output_dir"]) / "lora"
            if not (lora / "pytorch_lora_weights.safetensors").is_file():
                raise SystemExit(f"{path}: run {row['output_dir']} has no final LoRA at {lora}")
            seed = compare._record_seed(row, record, path)
            r = evaluate(lora, args.out / f"lr{row['lr']:g}_beta{row['beta']:g}_s{seed}", args.seeds)
            last = row["points"][-1]
            point = {"iteration": last["iteration"], "unet_fwd_eq": last["unet_fwd_eq"], "reward": r["reward_trained"],
                     "margin": r["margin"], "margin_se": r["margin_se"], "win_rate": r["win_rate"], "ties": r["ties"]}
            base = {"reward": r["reward_base"], "reward_seed_spread": r["reward_base_seed_spread"],
                    "reward_per_seed": r["reward_base_per_seed"]}
            rows.append({"lr": row["lr"], "beta": row["beta"], "seed": seed, "reward": point["reward"],
                         "win_rate": point["win_rate"], "margin": point["margin"], "ties": point["ties"],
                         "iterations": row["iterations"], "unet_fwd_eq": point["unet_fwd_eq"],
                         "points": [{**row["points"][0], "reward": r["reward_base"]}, point],
                         "output_dir": row["output_dir"]})
            print(f"lr {row['lr']:g} beta {row['beta']:g} seed {seed} at {last['iteration']} it: margin "
                  f"{r['margin']:+.3f} (se {r['margin_se']:.3f}), win rate {r['win_rate']:.3f}", flush=True)
    overrides = [o for o in first.get("overrides") or [] if not compare._is_seed_override(o)]
    report = compare.tune_report(rows, first["protocol"], base, first.get("recipe"), overrides,
                                 sources=[str(p) for p in args.records])
    report["retuned_from"] = report.pop("from_records")
    report["note"] = ("final LoRAs of the records' runs evaluated on toyworld:validation (benchmarks/retune_dpo.py); "
                      "each grid row's point 0 is the base on these prompts, its last point the new evaluation")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_dpo.json").write_text(jsonio.dumps(report, indent=1) + "\n")
    print(f"chosen: {jsonio.dumps(report['chosen'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
