"""Did the toy world's former validation prompts stand for its former test prompts? The colour make-up of each
prompt set, and a trained LoRA's margin over the base on prompt sets that separate *colour* from *held-out-ness*
(docs/toy_world.md, "DPO's run length chosen on whole validation curves, and why validation did not predict test").

    python benchmarks/split_shift.py --lora outputs/toy_dpo/lora [--lora DIR ...] [--out outputs/split_shift]

The former splits (before ``toyworld:test``/``toyworld:validation`` were stratified by colour): ``test``, the first
64 held-out prompts in the world's colour-major order (red, green, blue and 2 yellow); ``validation``, every other
held-out prompt from the 65th on (``world.probe_prompts``; the five other colours). The script adds three sets of 64
that cross the two factors: ``heldout_other`` (the held-out prompts between the validation ones), ``train_rgb`` and
``train_other`` (training prompts, evenly spaced, whose colour is / is not red, green or blue), and evaluates every
LoRA on all five with the end-of-run protocol (``python -m spo_fast.evaluate``: 64 prompts x ``--seeds`` seeds, base
and trained on the same noise, the ground truth; the base's half from the base-evaluation cache when it has it).
Writes ``OUT/split_shift.json``: per set its colour counts, the shipped training pairs per colour (rows, pairs
without ties, mean ground-truth gap between winner and loser), and per LoRA and set the margin with its paired
standard error, the win rate, the ties and each ground-truth component's change.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from spo_fast.core import jsonio
from spo_fast.toyworld import world

RGB = ("red", "green", "blue")


def prompt_sets() -> dict[str, list[world.Attributes]]:
    held, train = world.split("heldout"), world.split("train")

    def spaced(attrs: list, n: int = 64) -> list:
        return attrs[::max(1, len(attrs) // n)][:n]

    return {"test": held[:64],
            "validation": [world.parse_prompt(t) for t in world.probe_prompts()],
            "heldout_other": held[65:192:2],
            "train_rgb": spaced([a for a in train if a.color in RGB]),
            "train_other": spaced([a for a in train if a.color not in RGB])}


def pairs_by_colour() -> dict:
    """The shipped training pairs per object colour: rows, ties, and the mean ground-truth gap between winner and
    loser of the pairs without ties (pairs_train.parquet's score_0/score_1)."""
    import pyarrow.parquet as pq

    from spo_fast.diffusion.models import toyworld_assets

    t = pq.read_table(toyworld_assets() / "pairs_train.parquet", columns=["caption", "label_0", "score_0", "score_1"])
    out: dict[str, dict] = {}
    for cap, lab, s0, s1 in zip(*(t.column(c).to_pylist() for c in t.column_names)):
        row = out.setdefault(world.parse_prompt(cap).color, {"rows": 0, "ties": 0, "gap_sum": 0.0})
        row["rows"] += 1
        if lab == 0.5:
            row["ties"] += 1
        else:
            row["gap_sum"] += abs(s0 - s1)
    return {c: {"rows": r["rows"], "pairs_without_ties": r["rows"] - r["ties"],
                "mean_gap": r["gap_sum"] / max(1, r["rows"] - r["ties"])} for c, r in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", action="append", required=True, help="a trained LoRA dir (repeatable)")
    p.add_argument("--out", type=Path, default=Path("outputs/split_shift"))
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = prompt_sets()
    report = {"sets": {name: {"colors": dict(Counter(a.color for a in attrs)),
                              "backgrounds": dict(Counter(a.background for a in attrs))}
                       for name, attrs in sets.items()},
              "pairs_by_colour": pairs_by_colour(), "seeds": args.seeds, "loras": {}}
    for name, attrs in sets.items():
        (args.out / f"{name}.txt").write_text("".join(a.prompt + "\n" for a in attrs))
    for i, lora in enumerate(args.lora):
        rows = {}
        for name in sets:
            out = args.out / f"lora{i}_{name}"
            cmd = [sys.executable, "-m", "spo_fast.evaluate", "--lora", lora,
                   "--prompts", str(args.out / f"{name}.txt"),
                   "--n-prompts", "64", "--seeds", str(args.seeds), "--grid-prompts", "8", "--out", str(out)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            r = json.loads((out / "eval.json").read_text())
            cb, ct = r["components_base"], r["components_trained"]
            rows[name] = {"base": r["reward_base"], "trained": r["reward_trained"], "margin": r["margin"],
                          "margin_se": r["margin_se"], "win_rate": r["win_rate"], "ties": r["ties"],
                          "component_change": {k: ct[k] - cb[k] for k in cb}}
            print(f"{lora} {name:14s} margin {r['margin']:+.3f} (se {r['margin_se']:.3f}), win rate "
                  f"{r['win_rate']:.3f}, ties {r['ties']}", flush=True)
        report["loras"][lora] = rows
    (args.out / "split_shift.json").write_text(jsonio.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out / 'split_shift.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
