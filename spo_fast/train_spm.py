"""Train a step-aware preference model (SPM): ``python -m spo_fast.train_spm --pairs P.parquet ...``.

The command: its arguments and their checks. What it does (the noisy inputs, the loss, the per-timestep
evaluation) is :mod:`spo_fast.reward.spm_trainer`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from spo_fast.core.errors import ArgumentParser, InputError, check_writable_dir, number_arg, report
from spo_fast.diffusion.models import check_model_dir, load_components, resolve_model_path
from spo_fast.reward.spm import SPMScorer, check_spm_dir
from spo_fast.reward.spm_trainer import SPMTrainConfig, _load_checked, train_spm

_RANGES = {"steps": (int, 1, False), "batch_size": (int, 1, False), "lr": (float, 0, True), "seed": (int, 0, False),
           "guidance_scale": (float, 0, False)}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, check every input, train. Bad input: one line ``error: ...`` on stderr, returns 2.

    Checked before any model is built: the numbers (range, finite), ``--out`` (a directory that can be created
    and written), ``--model`` (layout, configs, weights-file headers), ``--init`` (``spm.check_spm_dir``) and the
    pairs files (parquet, schema, labels, every image decodable)."""
    parser = ArgumentParser(
        prog="python -m spo_fast.train_spm",
        description="Train a step-aware preference model on Pick-a-Pic-schema preference pairs.",
        epilog="Example (toy world, from any directory): python -m spo_fast.train_spm --pairs toyworld:train "
               "--eval-pairs toyworld:heldout --model toyworld:base "
               "--init toyworld:spm --out outputs/spm")
    parser.add_argument("--pairs", required=True, help="training pairs (parquet file, directory of shards or glob; "
                                                       "Pick-a-Pic schema), or toyworld:train")
    parser.add_argument("--eval-pairs", help="held-out pairs for per-timestep accuracy (same forms as --pairs)")
    parser.add_argument("--model", required=True, help="base diffusion model dir (or toyworld:base / arch:...) "
                                                       "used to make the noisy inputs")
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--init", required=True, help="CLIP / PickScore / SPM directory to start from "
                                                      "(or toyworld:spm)")
    parser.add_argument("--out", required=True, type=Path, help="output directory for the SPM")
    for f, (kind, low, strict) in _RANGES.items():
        default = getattr(SPMTrainConfig, f)
        parser.add_argument("--" + f.replace("_", "-"), type=number_arg(kind, low, strict), default=default,
                            help=f"(default {default})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the [train_spm] lines stay)")
    args = parser.parse_args(argv)

    try:
        out = check_writable_dir(args.out, "--out")
        check_model_dir(resolve_model_path(args.model), args.family, "pretrained")
        init = resolve_model_path(args.init)
        check_spm_dir(init)
        train_set, eval_set = (_load_checked(p, not args.no_progress, flag) if p is not None else None
                               for p, flag in ((args.pairs, "--pairs"), (args.eval_pairs, "--eval-pairs")))
        comp = load_components(args.model, args.family)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for m in (comp.unet, *comp.text_encoders, *([comp.vae] if comp.vae is not None else [])):
            m.to(device)
        scorer = SPMScorer.from_pretrained(init, device=device)
        cfg = SPMTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             guidance_scale=args.guidance_scale)
        train_spm(scorer.model, scorer.tokenizer, comp, train_set, eval_set, out, cfg,
                  progress=not args.no_progress)
    except InputError as e:  # PairsError, ModelDirError, WeightsFileError, SPMError, ...
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
