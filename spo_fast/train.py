"""Preference training from the command line: ``python -m spo_fast.train [RECIPE] [key=value ...]``.

The recipe's ``method`` picks the method: ``spo`` (Step-aware Preference Optimization, ``spo_fast.methods.spo``) or ``dpo``
(Diffusion-DPO, ``spo_fast.methods.dpo``); both run on the trainer core (``spo_fast.core.trainer``: models, LoRA, optimizer,
accumulation, resume, signals, metrics, profiler, export, sample grid, evaluation). With no arguments it trains the
embedded default recipe (``toy_spo``) on CPU.

Multi-process: ``accelerate launch -m spo_fast.train RECIPE ...`` (any accelerate config).
"""
from __future__ import annotations

import sys
from pathlib import Path

from spo_fast.core.config import Config, available_recipes, load_config, smoke_overrides
from spo_fast.core.errors import ArgumentParser, DivergedError, InputError, report
from spo_fast.core.trainer import Method, Setup, clip_gradients
from spo_fast.core.trainer import preflight as _preflight
from spo_fast.core.trainer import run as run_method

__all__ = ["clip_gradients", "load_config", "main", "make_method", "preflight", "run", "train"]


def make_method(cfg: Config) -> Method:
    """The method object of ``cfg.method``."""
    if cfg.method == "dpo":
        from spo_fast.methods.dpo import DiffusionDPO

        return DiffusionDPO()
    from spo_fast.methods.spo import SPO

    return SPO()


def preflight(cfg: Config) -> Path:
    """Every cheap check of the run's inputs (no model is built); returns the output dir."""
    return _preflight(cfg, make_method(cfg))


def run(cfg: Config) -> tuple[dict, Setup]:
    """Train as configured; returns (summary, the trained models: for tests and notebooks)."""
    return run_method(cfg, make_method(cfg))


def train(cfg: Config) -> dict:
    """Train as configured; returns the summary dict. Bad input raises an ``InputError`` (ConfigError, ModelDirError,
    PairsError, CheckpointError, ...) before any model is built wherever it can be seen without one; a run whose steps
    keep going non-finite raises ``DivergedError``."""
    return run(cfg)[0]


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str], bool, bool]:
    parser = ArgumentParser(
        prog="python -m spo_fast.train",
        description="Preference optimisation of Stable Diffusion 1.5 / SDXL: SPO (Step-aware Preference "
                    "Optimization) or the Diffusion-DPO baseline, picked by the recipe's method key. With no "
                    "arguments it trains the embedded default recipe (toy_spo) on CPU.",
        epilog="recipes: " + ", ".join(available_recipes()) + ". Examples: python -m spo_fast.train sd15_spo "
               "model.path=/models/sd15 scorer.path=/models/sd15_spm; python -m spo_fast.train toy_dpo; "
               "python -m spo_fast.train sdxl_spo --smoke",
    )
    parser.add_argument("items", nargs="*", metavar="RECIPE | key=value",
                        help="a recipe (name in configs/ or .yaml path), then dotted overrides like train.lr=3e-5")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="a smoke run of the recipe: the whole pipeline (training, checkpoint, export, sample grid, "
                             "evaluation) in seconds, real-model recipes on their family's tiny random architecture, "
                             "into <output_dir>_smoke (your overrides still apply)")
    args = parser.parse_intermixed_args(argv)  # --smoke may come after the overrides
    recipe = args.items[0] if args.items and "=" not in args.items[0] else None
    overrides = args.items[1:] if recipe else args.items
    return recipe, overrides, args.print_config, args.smoke


def main(argv: list[str] | None = None) -> int:
    recipe, overrides, print_only, smoke = parse_args(argv)
    try:
        cfg = load_config(recipe, overrides)
        if smoke:
            import torch

            cfg = load_config(recipe, [*smoke_overrides(cfg, torch.cuda.is_available()), *overrides])
        if print_only:
            import yaml

            from spo_fast.core.config import to_dict
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        train(cfg)
    except InputError as e:  # what the user gave: one line, exit code 2 (tracebacks are for bugs)
        return report(e)
    except DivergedError as e:  # the run went non-finite: one line, exit code 1; its checkpoints are intact
        report(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
