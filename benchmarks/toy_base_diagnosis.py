"""Does a toy base model follow its prompts, and where does the text act? (docs/toy_world.md, why the shipped base
ignores its prompts)

    python benchmarks/toy_base_diagnosis.py [--model toyworld:base] [--cfg 1,3,5,9] [--sampler 20,1;50,1;20,0]

On the 64 probe prompts (``world.probe_prompts``), one sample each (noise seed 300, the build's probe): the mean
ground truth, each component, the objectness and the share of empty frames (object contrast < 0.1) for each CFG
scale (20 DDIM steps, eta 1) and each ``steps,eta`` sampler (CFG 5); then the model's denoising MSE on renders of
the same prompts at t = 100, 400, 700, 900 with the right prompt, the empty prompt and another prompt (the list
rotated by one): where the three agree, the text does not change the prediction. Prints JSON.
"""
from __future__ import annotations

import argparse
import json

import torch

from spo_fast.diffusion.models import encode_prompts, load_components, resolve_model_path
from spo_fast.toyworld import build, world


def sample_stats(comp, prompts, num_steps: int, eta: float, guidance: float) -> dict:
    attrs = [world.parse_prompt(p) for p in prompts]
    images = build.sample_images(comp, prompts, 300, batch=len(prompts), num_steps=num_steps, eta=eta,
                                 guidance_scale=guidance)
    m = world.measure(images)
    out = {"steps": num_steps, "eta": eta, "cfg": guidance, "score": world.score(images, attrs).mean().item(),
           "objectness": m["objectness"].mean().item(), "empty": (m["contrast"] < 0.1).float().mean().item()}
    out.update({k: v.mean().item() for k, v in world.score_components(images, attrs).items()})
    return out


@torch.no_grad()
def text_effect(comp, prompts, ts=(100, 400, 700, 900)) -> list[dict]:
    x0 = world.render([world.parse_prompt(p) for p in prompts], torch.Generator().manual_seed(0))
    conds = {"right": prompts, "empty": [""] * len(prompts), "other": prompts[1:] + prompts[:1]}
    embeds = {k: encode_prompts(comp, v, "cpu", x0.shape[-1]).embeds for k, v in conds.items()}
    alphas = comp.scheduler.alphas_cumprod.float()
    v_pred = comp.scheduler.config.prediction_type == "v_prediction"
    rows = []
    for t in ts:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        a = alphas[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_pred else noise
        tt = torch.full((len(prompts),), t)
        rows.append({"t": t, **{k: ((comp.unet(x_t, tt, encoder_hidden_states=e).sample - target) ** 2).mean().item()
                                 for k, e in embeds.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toyworld:base")
    p.add_argument("--cfg", default="1,3,5,9", help="CFG scales at 20 steps, eta 1 (comma-separated)")
    p.add_argument("--sampler", default="20,1;50,1;20,0", help="steps,eta pairs at CFG 5 (semicolon-separated)")
    p.add_argument("--prompts", type=int, default=64, help="probe prompts (default 64)")
    args = p.parse_args(argv)
    comp = load_components(str(resolve_model_path(args.model)), "sd15")
    prompts = world.probe_prompts()[:args.prompts]
    runs = [(20, 1.0, float(g)) for g in args.cfg.split(",") if g]
    runs += [(int(n), float(e), 5.0) for n, e in (x.split(",") for x in args.sampler.split(";") if x)]
    report = {"samples": [sample_stats(comp, prompts, *r) for r in runs], "text_effect_mse": text_effect(comp, prompts)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
