"""SPO's cost to reach a DPO model's reward, from a recorded comparison's SPO curve and an end-of-run evaluation of
the DPO LoRA (``eval.json`` of ``python -m spo_fast.evaluate`` on the same prompts, seeds and base).

    python benchmarks/reach_from_eval.py --compare compare_seed0.json --dpo-eval eval.json --dpo-unet-fwd-eq 102400 \\
        [--out reach.json]

For a DPO setting whose final LoRA was trained and evaluated outside ``spo_fast.compare`` (e.g. the run length
tune-dpo chose): the SPO points come from the comparison, DPO's final point from the evaluation, and
``spo_fast.compare.summarize`` computes the same ratios as the comparison (linear between SPO's points; the pairs'
production from the comparison's record). Refuses an evaluation whose base reward differs from the comparison's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spo_fast.compare import summarize
from spo_fast.core import jsonio


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", type=Path, required=True, help="a compare.json (its SPO points and base)")
    p.add_argument("--dpo-eval", type=Path, required=True, help="eval.json of the DPO LoRA")
    p.add_argument("--dpo-unet-fwd-eq", type=int, required=True, help="DPO's training cost in forward-equivalents")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cmp, ev = json.loads(args.compare.read_text()), json.loads(args.dpo_eval.read_text())
    if ev["reward_base"] != cmp["base"]["reward"]:
        sys.exit(f"{args.dpo_eval}: base reward {ev['reward_base']} differs from {args.compare}'s "
                 f"{cmp['base']['reward']} (other prompts, seeds or machine)")
    dpo_final = {"reward": ev["reward_trained"], "unet_fwd_eq": args.dpo_unet_fwd_eq, "train_seconds": None}
    pair_fwd_eq = cmp["methods"]["DPO"]["pair_production"]["unet_fwd_eq"]  # all 855 usable pairs by 400 steps
    out = summarize(cmp["methods"]["SPO"]["points"], [dpo_final], pair_fwd_eq)
    out.update({"dpo_margin": ev["margin"], "dpo_margin_se": ev["margin_se"], "dpo_win_rate": ev["win_rate"],
                "dpo_ties": ev["ties"], "base_seed_spread": ev["reward_base_seed_spread"],
                "compare": str(args.compare), "dpo_eval": str(args.dpo_eval)})
    text = jsonio.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
