"""Base vs trained on the same noise: ``python -m spo_fast.evaluate --lora DIR [...]``.

For each of ``n_prompts`` evaluation prompts and each of ``seeds`` noise seeds, the base model and
the trained model (base + LoRA, or a fine-tuned UNet) sample from the *same* initial noise and
the same per-step DDIM noise. Rewards:

- toy world (``--reward ground_truth``, the default for toy prompts): the ground-truth score
  (``spo_fast.toyworld.world.score``), which no model was trained on;
- real models: the SPM at t = 0 (``--spm DIR``) and/or a plain CLIP-style reward model such as a
  local PickScore (``--clip-reward DIR``), both local directories.

``eval.json``: ``n_prompts``, ``n_seeds``, ``reward_base`` and ``reward_trained`` (means over
prompt x seed), ``win_rate`` (fraction of prompt/seed pairs where trained > base; exact ties
count as losses and are reported as ``ties``), ``reward_base_seed_spread`` (std over seeds of the
base model's per-seed mean reward) and ``margin`` = trained - base, ``seconds``; with the ground
truth also the mean of each score component. ``eval_grid.png``: base (top) vs trained (bottom),
seed 0, first prompts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .models import Components, ModelDirError, decode_latents, encode_prompts, load_components
from .sampling import DDIMSchedule, sample

GRID_PROMPTS = 8


@torch.no_grad()
def generate(comp: Components, unet, schedule: DDIMSchedule, prompts: list[str], seeds: int, guidance_scale: float,
             eta: float, batch_size: int, device, base_seed: int = 0, resolution: int | None = None,
             latent_shape=None, backend: str | None = None) -> torch.Tensor:
    """(seeds, P, 3, H, W) images in [-1, 1]. The noise of (seed s, prompt chunk c) is a pure function of
    (base_seed, s, c) (and of the step op's backend, ``backend``): two models called with the same arguments see
    identical noise."""
    latent_shape = latent_shape or comp.latent_shape
    res = resolution or latent_shape[1] * comp.vae_scale_factor
    out = []
    for s in range(seeds):
        rows = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            gen = torch.Generator(device=device).manual_seed((base_seed * 7919 + s) * 1_000_003 + start)
            cond = encode_prompts(comp, chunk, device, res)
            uncond = encode_prompts(comp, [""] * len(chunk), device, res)
            x = torch.randn((len(chunk), *latent_shape), generator=gen, device=device)
            rows.append(decode_latents(comp, sample(unet, schedule, cond, uncond, x, guidance_scale, eta, gen,
                                                           backend=backend)).cpu())
        out.append(torch.cat(rows))
    return torch.stack(out)


def ground_truth_reward(images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from .toyworld import world

    return world.score_prompts(images, prompts), world.score_components(
        images, [world.parse_prompt(p) for p in prompts])


def scorer_reward(scorer) -> Callable:
    """A training scorer (SPM, colour) as a reward: scored at t = 0."""
    def reward(images: torch.Tensor, prompts: list[str]):
        state = scorer.prepare(prompts)
        t0 = torch.zeros(len(prompts), dtype=torch.long)
        return scorer.score(images, t0, state, torch.arange(len(prompts))).float().cpu(), {}
    return reward


def compare(base: torch.Tensor, trained: torch.Tensor, prompts: list[str], reward: Callable) -> dict:
    """Rewards of (S, P, ...) images from both models -> the eval.json statistics."""
    seeds = base.shape[0]
    flat_prompts = prompts * seeds
    rb, comp_b = reward(base.flatten(0, 1), flat_prompts)
    rt, comp_t = reward(trained.flatten(0, 1), flat_prompts)
    rb, rt = rb.view(seeds, -1).double(), rt.view(seeds, -1).double()
    per_seed_base = rb.mean(1)
    spread = per_seed_base.std().item() if seeds > 1 else float("nan")
    result = {
        "n_prompts": len(prompts), "n_seeds": seeds,
        "reward_base": rb.mean().item(), "reward_trained": rt.mean().item(),
        "margin": (rt - rb).mean().item(),
        "win_rate": (rt > rb).double().mean().item(), "ties": int((rt == rb).sum()),
        "reward_base_seed_spread": spread,
        "reward_base_per_seed": per_seed_base.tolist(), "reward_trained_per_seed": rt.mean(1).tolist(),
    }
    if comp_b:
        result["components_base"] = {k: v.double().mean().item() for k, v in comp_b.items()}
        result["components_trained"] = {k: v.double().mean().item() for k, v in comp_t.items()}
    return result


def save_grid(base: torch.Tensor, trained: torch.Tensor, path: Path, n: int = GRID_PROMPTS) -> None:
    """Row 1: base, row 2: trained (seed 0, first n prompts), upscaled to >= 64 px per image."""
    from PIL import Image

    rows = []
    for imgs in (base[0, :n], trained[0, :n]):
        rows.append(np.concatenate(list(((imgs + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
                                        .numpy()), axis=1))
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 64 // base.shape[-1])
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def evaluate(comp: Components, base_ctx, trained_ctx, prompts: list[str], seeds: int, reward: Callable,
             out: Path, sampling, batch_size: int, device, latent_shape=None, backend: str | None = None) -> dict:
    """Run both models on the same noise, score, write eval.json and eval_grid.png into ``out``."""
    t0 = time.perf_counter()
    schedule = DDIMSchedule.from_scheduler(comp.scheduler, sampling.num_steps, device=device)
    images = {}
    for name, ctx in (("base", base_ctx), ("trained", trained_ctx)):
        with ctx as unet:
            images[name] = generate(comp, unet, schedule, prompts, seeds, sampling.guidance_scale, sampling.eta,
                                    batch_size, device, latent_shape=latent_shape, backend=backend)
    result = compare(images["base"], images["trained"], prompts, reward)
    result["seconds"] = time.perf_counter() - t0
    result["prompts"] = prompts
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    save_grid(images["base"], images["trained"], out / "eval_grid.png")
    return result


def summary_line(r: dict) -> str:
    return (f"{r['n_prompts']} prompts x {r['n_seeds']} seeds: reward base {r['reward_base']:.3f} -> trained "
            f"{r['reward_trained']:.3f} (margin {r['margin']:+.3f}, base seed spread "
            f"{r['reward_base_seed_spread']:.3f}), win rate {r['win_rate']:.3f}")


# ----------------------------------------------------------------------------- CLI
def _load_trained(comp: Components, weights: Path):
    """Attach LoRA weights (diffusers format dir) to comp.unet, or load a fine-tuned UNet dir."""
    from diffusers import UNet2DConditionModel

    if (weights / "config.json").is_file():
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


def _all_toy(prompts: list[str]) -> bool:
    """Every prompt is a toy-world prompt (so the ground truth can score it)."""
    from .toyworld import world

    try:
        for p in prompts:
            world.parse_prompt(p)
    except ValueError:
        return False
    return True


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
    parser.add_argument("--reward", choices=("ground_truth", "spm", "clip"), default=None,
                        help="default: ground_truth when the model is a toyworld: one and every prompt is a toy-world "
                             "prompt (toyworld:heldout or a file of them), else spm")
    parser.add_argument("--spm", default="toyworld:spm", help="SPM dir (reward at t = 0)")
    parser.add_argument("--clip-reward", default=None, help="a local CLIP-style reward model dir (e.g. PickScore)")
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: the LoRA dir's parent)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if args.n_prompts < 1 or args.seeds < 1:
            raise ConfigError(f"--n-prompts={args.n_prompts} and --seeds={args.seeds} must be >= 1")
        prompts = load_prompts(args.prompts)[:args.n_prompts]
        kind = args.reward or ("ground_truth" if args.model.startswith("toyworld:") and _all_toy(prompts) else "spm")
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
            reward = scorer_reward(scorer)
    except (ConfigError, ModelDirError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for m in (comp.unet, trained_unet, *comp.text_encoders, *([comp.vae] if comp.vae is not None else [])):
        m.to(device)
    base_ctx = _adapters_disabled(comp.unet) if base_unet is not None else contextlib.nullcontext(comp.unet)
    sampling = SimpleNamespace(num_steps=args.num_steps, eta=args.eta, guidance_scale=args.guidance_scale)
    out = args.out or args.lora.expanduser().resolve().parent
    result = evaluate(comp, base_ctx, contextlib.nullcontext(trained_unet), prompts, args.seeds, reward, out,
                      sampling, args.batch_size, device)
    print(f"[spo_fast.evaluate] {summary_line(result)}; wrote {out / 'eval.json'} and {out / 'eval_grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
