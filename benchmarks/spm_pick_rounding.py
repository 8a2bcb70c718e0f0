"""How often does the rounding of the UNet's attention change the SPM's pick inside a pool? (docs/toy_world.md)

    python benchmarks/spm_pick_rounding.py [--steps 4,8,12,15] [--prompts 64] [--out FILE]

On the build's probe prompts (``world.probe_prompts``, where settings were chosen before the toy world's evaluation
splits were stratified by colour), a base-model trajectory (the rollout's sampler: 20 DDIM steps, eta 1, CFG 5,
bf16) runs to step i and k candidates are drawn there from one shared x_t, as in the SPO rollout. Each candidate's
x0 estimate at its own step is computed twice, identical but for the attention kernel of the UNet (SDPA's CPU flash
kernel, the rollout's until it took the chunked one; the chunked kernel of ``spo_fast.diffusion.cpu_attention``, the
rollout's and the evaluation's now; both under bf16 autocast), and scored by the SPM. Per step: the mean
|difference| between the two scores of one candidate, against the mean score gap (max - min) of a pool; how often
the best, the worst, and whether the pool passes the rollout's threshold (``tanh(gap / 2) > threshold``) agree.
Where they disagree often, which pairs SPO trains on depends on the rounding of the kernel, so any change of kernel
sends training on another course. Prints JSON.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from spo_fast.diffusion.cpu_attention import ChunkedAttnProcessor
from spo_fast.diffusion.models import decode_latents, load_components, resolve_model_path
from spo_fast.reward.spm import SPMScorer
from spo_fast.toyworld import world
from spo_fast.toyworld.build import SAMPLER

_spec = importlib.util.spec_from_file_location("spm_step_agreement", Path(__file__).with_name("spm_step_agreement.py"))
_agreement = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_agreement)
Sampler = _agreement.Sampler


@torch.no_grad()
def pick_rounding(comp, scorer: SPMScorer, prompts: list[str], steps: list[int], k: int, seed: int,
                  threshold: float, sampler: Sampler) -> list[dict]:
    n = len(prompts)
    comp.unet.set_attn_processor(AttnProcessor2_0())
    (cond, uncond, cond_k, uncond_k), state, index, gen, trajectory = _agreement.pools_setup(
        comp, scorer, prompts, k, seed, sampler)
    rows = []
    for i in steps:
        xi = trajectory[i]
        comp.unet.set_attn_processor(AttnProcessor2_0())
        _, mean, std = sampler.stats(xi, i, cond, uncond)
        cand = (mean[:, None] + std[:, None] * torch.randn((n, k, *xi.shape[1:]), generator=gen)).flatten(0, 1)
        score_t = sampler.ts[i + 1].expand(n * k)
        scores = {}
        for name, proc in (("sdpa", AttnProcessor2_0()), ("chunked", ChunkedAttnProcessor())):
            comp.unet.set_attn_processor(proc)
            x0_hat, _, _ = sampler.stats(cand, i + 1, cond_k, uncond_k)
            read = decode_latents(comp, x0_hat).clamp(-1, 1)
            scores[name] = scorer.score(read, score_t, state, index).view(n, k).float()
        a, b = scores["sdpa"], scores["chunked"]
        gap_a, gap_b = a.max(1).values - a.min(1).values, b.max(1).values - b.min(1).values
        valid_a, valid_b = torch.tanh(gap_a / 2) > threshold, torch.tanh(gap_b / 2) > threshold
        rows.append({"step": i, "t_scored": int(score_t[0]),
                     "score_change": (a - b).abs().mean().item(), "pool_gap": gap_a.mean().item(),
                     "same_best": (a.argmax(1) == b.argmax(1)).float().mean().item(),
                     "same_worst": (a.argmin(1) == b.argmin(1)).float().mean().item(),
                     "same_valid": (valid_a == valid_b).float().mean().item(),
                     "valid_sdpa": valid_a.float().mean().item(), "valid_chunked": valid_b.float().mean().item()})
        print(json.dumps(rows[-1]), flush=True)
    comp.unet.set_attn_processor(AttnProcessor2_0())
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _agreement.add_pool_arguments(p, "4,8,12,15")
    p.add_argument("--threshold", type=float, default=0.1, help="the rollout's pair threshold (toy_spo: 0.1)")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s]
    bad = [s for s in steps if not 0 <= s < args.num_steps - 1]
    if bad or args.k < 2 or args.prompts < 1 or not args.cfg >= 1:
        p.error(f"--steps {bad} must lie in [0, {args.num_steps - 1}), --k >= 2, --prompts >= 1 and --cfg >= 1 "
                f"(got --k {args.k}, --prompts {args.prompts}, --cfg {args.cfg:g})")
    comp = load_components(str(resolve_model_path(args.model)), "sd15")
    scorer = SPMScorer.from_pretrained(resolve_model_path(args.spm))
    sampler = Sampler(comp, args.num_steps, SAMPLER["eta"], args.cfg, True)
    rows = pick_rounding(comp, scorer, world.probe_prompts()[:args.prompts], steps, args.k, args.seed,
                         args.threshold, sampler)
    report = {"model": args.model, "spm": args.spm, "k": args.k, "prompts": args.prompts, "seed": args.seed,
              "threshold": args.threshold, "steps": rows,
              **{f"mean_{key}": sum(r[key] for r in rows) / len(rows)
                 for key in ("score_change", "pool_gap", "same_best", "same_worst", "same_valid")}}
    return _agreement.emit(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
