"""The effect of each of our training-dynamics improvements over the official SPO code, measured on the toy world:
the official dynamics (no clipping, each micro-batch's mean / grad_accum, accumulation across rollouts, shared and
not-shared transitions mixed in micro-batches) against the same run with one key switched to ours, on the
validation prompts (``toyworld:validation``, never the test split).

    python benchmarks/toy_official_dynamics.py --setting sdxl --out outputs/official_dynamics   # 6 runs
    python benchmarks/toy_official_dynamics.py --setting sd15 --out outputs/official_dynamics   # 2 runs
    python benchmarks/toy_official_dynamics.py --setting sd15x2 --out outputs/official_dynamics # 2 runs, 2 processes
    python benchmarks/toy_official_dynamics.py --split outputs/official_dynamics/sd15_ours/metrics.jsonl --world 4

Settings (overrides of ``toy_spo``, which is ours):

- ``sd15``: the toy default itself (k = 4, no inner steps, grad_accum 1): only clipping can differ from the
  official dynamics there, so two runs: ``max_grad_norm=0`` (official) and 1.0 (ours);
- ``sdxl``: the SDXL recipe's structure on the toy world: k = 2 with 3 inner steps, ``grad_accum`` 2 (8 prompts,
  micro-batches of 8), where every key matters: the official run, one run per key switched to ours, all ours;
- ``sd15x2``: the toy default on two processes (``accelerate launch``, gloo; 8 prompts each): the official process
  split (``gather``) against ours (``own``).

``--split METRICS --world N``: what the official multi-process split would do with the per-iteration valid counts
of a run (taken as N processes' counts, N consecutive iterations at a time): the official trainer gathers every
process's valid transitions, skips a rollout with fewer than N, gives each process total // N of them (dropping the
rest) in micro-batches of ``--micro``; ours keeps each process's own and pads to the busiest. Prints the share
dropped and both micro-batch counts.

Each run prints one line and the table is written to ``<out>/<setting>.json``. Runs are single seeds: the table also
gives the base model's seed spread on the split, the scale below which a difference is noise.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

OFFICIAL = ["train.max_grad_norm=0", "train.loss_weighting=micro_batches", "train.accumulate_across_iterations=true",
            "spo.micro_batches=mixed", "spo.process_split=gather"]
OURS = {"clipping": "train.max_grad_norm=1.0", "pairs_weighting": "train.loss_weighting=pairs",
        "per_iteration_steps": "train.accumulate_across_iterations=false",
        "split_micro_batches": "spo.micro_batches=split", "own_process_split": "spo.process_split=own"}
SETTINGS = {
    "sd15": [],
    "sdxl": ["spo.k=2", "spo.num_inner_steps=3", "train.grad_accum=2"],
    "sd15x2": [],  # two processes (accelerate launch, gloo)
}
PROCESSES = {"sd15x2": 2}
EVAL = ["eval.prompts=toyworld:validation", "eval.n_prompts=64", "log.sample_prompts=0", "log.progress=false",
        "log.report_to=none", "checkpoint.every=0", "checkpoint.resume=never"]


def variants(setting: str) -> dict[str, list[str]]:
    if setting == "sd15":
        return {"official": OFFICIAL, "ours": [*OFFICIAL, OURS["clipping"]]}
    if setting == "sd15x2":
        return {"official": OFFICIAL, "official+own_process_split": [*OFFICIAL, OURS["own_process_split"]]}
    out = {"official": OFFICIAL}
    for name, override in OURS.items():
        if name != "own_process_split":  # one process: no effect
            out[f"official+{name}"] = [*OFFICIAL, override]
    out["ours"] = [*OFFICIAL, *OURS.values()]
    return out


def run_one(name: str, overrides: list[str], out: Path, iterations: int, seeds: int, processes: int = 1) -> dict:
    d = out / name
    launch = [sys.executable, "-m", "spo_fast.train"]
    if processes > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                  "spo_fast.train"]
    cmd = [*launch, "toy_spo", *overrides, *EVAL, f"eval.seeds={seeds}", f"train.max_iterations={iterations}",
           f"log.output_dir={d}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    ev = json.loads((d / "eval.json").read_text())
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in rows if r["grad_norm"] is not None]
    res = {"overrides": overrides, "reward_base": ev["reward_base"], "reward_trained": ev["reward_trained"],
           "margin": ev["margin"], "win_rate": ev["win_rate"], "ties": ev.get("ties"),
           "base_seed_spread": ev["reward_base_seed_spread"], "opt_steps": rows[-1]["opt_step"],
           "valid_pairs": sum(r["valid_pairs"] for r in rows),
           "iterations_mean_grad_norm_over_1": sum(n > 1 for n in norms), "grad_norm_max_iteration_mean": max(norms),
           "iterations": iterations, "eval_seeds": seeds, "seconds": time.perf_counter() - t0}
    print(f"{name}: margin {res['margin']:+.3f} win rate {res['win_rate']:.3f} ({res['ties']} ties), "
          f"{res['opt_steps']} optimizer steps, {res['valid_pairs']} pairs trained, "
          "iterations with mean grad norm > 1: "
          f"{res['iterations_mean_grad_norm_over_1']} of {len(norms)}, {res['seconds']:.0f} s", flush=True)
    return res


def split(metrics: Path, world: int, micro: int) -> dict:
    """The official multi-process split against ours, on per-iteration valid counts taken as processes' counts."""
    counts = [json.loads(x)["valid_pairs"] for x in metrics.read_text().splitlines()]
    total = dropped = official_mb = ours_mb = skipped = 0
    for i in range(0, len(counts) - world + 1, world):
        per = counts[i:i + world]
        n = sum(per)
        total += n
        if n < world:
            skipped += 1
            dropped += n
            continue
        dropped += n % world
        official_mb += math.ceil((n // world) / micro)
        ours_mb += max(math.ceil(v / micro) for v in per)
    res = {"metrics": str(metrics), "world": world, "micro": micro, "rollouts": len(counts) // world,
           "valid": total, "dropped": dropped, "dropped_share": dropped / max(total, 1),
           "rollouts_skipped": skipped, "micro_batches_per_process_official": official_mb,
           "micro_batches_per_process_ours": ours_mb}
    print(json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="sdxl")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=4, help="evaluation noise seeds per validation prompt")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--out", default="outputs/official_dynamics")
    ap.add_argument("--split", default="", help="a metrics.jsonl: the multi-process split analysis instead")
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--micro", type=int, default=8)
    args = ap.parse_args(argv)
    if args.split:
        split(Path(args.split), args.world, args.micro)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table_file = out / f"{args.setting}.json"
    table = json.loads(table_file.read_text()) if table_file.is_file() else {}
    wanted = set(filter(None, args.only.split(",")))
    for name, overrides in variants(args.setting).items():
        if wanted and name not in wanted:
            continue
        table[name] = run_one(f"{args.setting}_{name}", [*SETTINGS[args.setting], *overrides], out, args.iterations,
                              args.seeds, PROCESSES.get(args.setting, 1))
        table_file.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
