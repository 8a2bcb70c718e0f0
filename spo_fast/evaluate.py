"""Base vs trained on the same noise, from the command line: ``python -m spo_fast.evaluate --lora DIR [...]``.

The library half (sampling both models, the statistics, eval.json and the grid) is ``spo_fast.evaluation``; this
module loads the models and the reward from the command line. Rewards: the toy world's ground truth
(``--reward ground_truth``, the default for toy prompts), the SPM at t = 0 (``--spm DIR``) or a plain CLIP-style
reward model such as a local PickScore (``--clip-reward DIR``), all local directories.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from .evaluation import GRID_PROMPTS, all_toy_prompts, evaluate, ground_truth_reward, scorer_reward, summary_line
from .models import Components, ModelDirError, load_components, quiet_loading


# ----------------------------------------------------------------------------- CLI
def _load_trained(comp: Components, weights: Path):
    """Attach LoRA weights (diffusers format dir) to comp.unet, or load a fine-tuned UNet dir."""
    from diffusers import UNet2DConditionModel

    if (weights / "config.json").is_file():
        with quiet_loading():
            return None, UNet2DConditionModel.from_pretrained(weights, local_files_only=True,
                                                              torch_dtype=torch.float32).eval()
    files = sorted(weights.glob("*.safetensors")) if weights.is_dir() else []
    if not files:
        raise ModelDirError(f"--lora {weights}: expected a LoRA directory (pytorch_lora_weights.safetensors, as "
                            "written by spo_fast.train) or a fine-tuned UNet directory (config.json + weights)")
    comp.unet.load_lora_adapter(str(weights), weight_name=files[0].name, prefix="unet", adapter_name="trained")
    return comp.unet, comp.unet


@contextlib.contextmanager
def _adapters_disabled(unet):
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def _run_sampling_dtype(weights: Path) -> str:
    """``bf16`` or ``fp32``: the sampling dtype of the run that wrote ``weights`` (its output dir's config.yaml),
    fp32 when there is none."""
    import yaml

    for cfg_file in (weights / "config.yaml", weights.resolve().parent / "config.yaml"):
        if cfg_file.is_file():
            try:
                run = yaml.safe_load(cfg_file.read_text()) or {}
            except yaml.YAMLError:
                return "fp32"
            sampling, train = run.get("sampling") or {}, run.get("train") or {}
            dtype = sampling.get("dtype", "auto")
            if dtype == "auto":
                return "bf16" if train.get("mixed_precision") == "bf16" else "fp32"
            return dtype
    return "fp32"


def main(argv: list[str] | None = None) -> int:
    from types import SimpleNamespace

    from .config import ConfigError
    from .data import load_prompts

    parser = argparse.ArgumentParser(prog="python -m spo_fast.evaluate", description=__doc__.splitlines()[0],
                                     epilog="Example: python -m spo_fast.evaluate --lora outputs/toy_spo/lora")
    parser.add_argument("--lora", required=True, type=Path, help="LoRA dir written by spo_fast.train (or a UNet dir)")
    parser.add_argument("--model", default="toyworld:base", help="base model dir (default: toyworld:base)")
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--prompts", default="toyworld:heldout", help="prompt file or toyworld:heldout")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--grid-prompts", type=int, default=GRID_PROMPTS,
                        help=f"prompts in eval_grid.png (default {GRID_PROMPTS}; at most --n-prompts)")
    parser.add_argument("--reward", choices=("ground_truth", "spm", "clip"), default=None,
                        help="default: ground_truth when the model is a toyworld: one and every prompt is a toy-world "
                             "prompt (toyworld:heldout or a file of them), else spm")
    parser.add_argument("--spm", default="toyworld:spm", help="SPM dir (reward at t = 0)")
    parser.add_argument("--clip-reward", default=None, help="a local CLIP-style reward model dir (e.g. PickScore)")
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--negative-prompt", default="", help="the unconditional prompt (default empty: zeros on an "
                                                             "SDXL pipeline with force_zeros_for_empty_prompt)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="autocast dtype of the sampling; auto (default) = the run's (sampling.dtype in the "
                             "config.yaml next to --lora, as the end-of-run evaluation used), else fp32")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: the LoRA dir's parent)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if args.n_prompts < 1 or args.seeds < 1 or args.grid_prompts < 1:
            raise ConfigError(f"--n-prompts={args.n_prompts}, --seeds={args.seeds} and --grid-prompts="
                              f"{args.grid_prompts} must be >= 1")
        prompts = load_prompts(args.prompts)[:args.n_prompts]
        toy = args.model.startswith("toyworld:") and all_toy_prompts(prompts)
        kind = args.reward or ("ground_truth" if toy else "spm")
        if args.clip_reward:
            kind = "clip"
        comp = load_components(args.model, args.family)
        base_unet, trained_unet = _load_trained(comp, args.lora.expanduser())
        if kind == "ground_truth":
            from .toyworld import world

            for p in prompts:
                world.parse_prompt(p)  # a clear error for non-toy prompts
            reward = ground_truth_reward
        else:
            from .models import resolve_model_path
            from .spm import SPMScorer

            path = args.clip_reward if kind == "clip" else args.spm
            # a plain CLIP/PickScore dir loads with identity (zero) time conditioning: its score at t = 0
            # is exactly the plain CLIP score
            scorer = SPMScorer.from_pretrained(resolve_model_path(path), device=device)
            reward = scorer_reward(scorer, "CLIP reward" if kind == "clip" else "SPM at t = 0")
    except (ConfigError, ModelDirError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for m in (comp.unet, trained_unet, *comp.text_encoders, *([comp.vae] if comp.vae is not None else [])):
        m.to(device)
    base_ctx = _adapters_disabled(comp.unet) if base_unet is not None else contextlib.nullcontext(comp.unet)
    sampling = SimpleNamespace(num_steps=args.num_steps, eta=args.eta, guidance_scale=args.guidance_scale,
                               negative_prompt=args.negative_prompt)
    out = args.out or args.lora.expanduser().resolve().parent
    dtype = args.dtype if args.dtype != "auto" else _run_sampling_dtype(args.lora.expanduser())
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with autocast:
        result = evaluate(comp, base_ctx, contextlib.nullcontext(trained_unet), prompts, args.seeds, reward, out,
                          sampling, args.batch_size, device, grid_prompts=args.grid_prompts)
    result["sampling_dtype"] = dtype  # recorded next to the statistics evaluate() wrote
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"[spo_fast.evaluate] {summary_line(result)}; wrote {out / 'eval.json'} and {out / 'eval_grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
