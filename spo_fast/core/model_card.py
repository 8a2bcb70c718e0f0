"""The model card written beside the exported weights (``lora/README.md`` or ``unet/README.md``), in the Hugging Face
convention diffusers' training scripts follow: YAML metadata (base model, library, tags) and a short Markdown body
(what was trained and how, how to load it, the evaluation), with the files it refers to copied beside it
(``config.yaml``: the run's resolved config, loadable as a recipe; ``eval_grid.png``/``samples.png``), so the
folder can be shared as it is."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from spo_fast.core.config import Config
from spo_fast.diffusion.models import resolve_model_path

METHOD_NAMES = {"spo": "SPO (Step-aware Preference Optimization)", "dpo": "Diffusion-DPO"}
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def model_card(cfg: Config, weights: Path, summary: dict) -> str:
    """The card's text for weights in ``weights`` (a ``lora/`` or ``unet/`` directory) of a run that ended with
    ``summary`` (the last metrics, ``eval`` when the evaluation ran)."""
    lora = weights.name == "lora"
    family = "stable-diffusion-xl" if cfg.model.family == "sdxl" else "stable-diffusion"
    meta = {"base_model": cfg.model.path, "library_name": "diffusers",
            "tags": ["text-to-image", "diffusers", "diffusers-training", family, "lora" if lora else "full-fine-tune",
                     "spo" if cfg.method == "spo" else "diffusion-dpo", "spo_fast"]}
    what = f"LoRA (rank {cfg.lora.rank}) of the UNet" if lora else "fine-tuned UNet"
    pipe = PIPELINES[cfg.model.family]
    base = str(resolve_model_path(cfg.model.path)) if cfg.model.path.startswith("toyworld:") else cfg.model.path
    here = f"path/to/{weights.name}"  # this folder, wherever it is shared to
    load = ([f"pipe = {pipe}.from_pretrained({base!r})", f"pipe.load_lora_weights({here!r})"]
            if lora else ["from diffusers import UNet2DConditionModel",
                          f"unet = UNet2DConditionModel.from_pretrained({here!r})",
                          f"pipe = {pipe}.from_pretrained({base!r}, unet=unet)"])
    trained = (f"Trained with spo_fast for {summary.get('iterations')} iterations ({summary.get('opt_step')} "
               "optimizer steps). `config.yaml` beside this card is the run's whole resolved config, loadable as a "
               f"recipe: `python -m spo_fast.train {weights.name}/config.yaml log.output_dir=NEW_DIR` runs it again.")
    if cfg.model.init == "random":
        trained += " The base model had random weights (`model.init=random`): these weights fit only that base."
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {METHOD_NAMES[cfg.method]} {what} of `{cfg.model.path}`", "", trained, "",
             "## Use", "", "```python", f"from diffusers import {pipe}", "", *load,
             'image = pipe("a photo of a cat", num_inference_steps=20, guidance_scale=5.0).images[0]', "```", "",
             "## Training", "", "| setting | value |", "|---|---|"]
    rows = [("method", cfg.method), ("model family", cfg.model.family), ("learning rate", cfg.train.lr),
            ("optimizer", cfg.train.optimizer), ("batch size per process", cfg.train.batch_size),
            ("mixed precision", cfg.train.mixed_precision)]
    if cfg.method == "spo":
        rows += [("pool size k", cfg.spo.k), ("beta", cfg.spo.beta), ("pair threshold", cfg.spo.threshold),
                 ("prompts", cfg.data.prompts), ("scorer", f"{cfg.scorer.name} {cfg.scorer.path}".strip())]
    else:
        rows += [("beta", cfg.dpo.beta), ("pairs", cfg.data.pairs)]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    ev = summary.get("eval")
    if ev:
        protocol = (f"Base and trained on the same noise, {ev['n_prompts']} held-out prompts x {ev['n_seeds']} "
                    f"seeds (`{cfg.eval.prompts}`), reward: {cfg.eval.reward}.")
        row = (f"| {_fmt(ev['reward_base'])} | {_fmt(ev['reward_trained'])} | {_fmt(ev['margin'])} | "
               f"{_fmt(ev['win_rate'])} | {_fmt(ev.get('reward_base_seed_spread'))} |")
        lines += ["", "## Evaluation", "", protocol, "", "| base | trained | margin | win rate | base seed spread |",
                  "|---|---|---|---|---|", row]
    for image, caption in (("eval_grid.png", "Held-out prompts: base (top) and trained (bottom)"),
                           ("samples.png", "Training prompts: base (top) and trained (bottom)")):
        if (weights / image).is_file():
            lines += ["", f"![{caption}]({image})"]
    return "\n".join(lines) + "\n"


def write_model_card(cfg: Config, out: Path, weights: Path, summary: dict) -> Path:
    """Copy the run's ``config.yaml`` and grids from ``out`` into ``weights`` and write ``weights/README.md``."""
    for name in ("config.yaml", "eval_grid.png", "samples.png"):
        if (out / name).is_file():
            shutil.copyfile(out / name, weights / name)
    card = weights / "README.md"
    card.write_text(model_card(cfg, weights, summary), encoding="utf-8")
    return card
