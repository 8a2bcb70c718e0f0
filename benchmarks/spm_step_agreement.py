"""Does the SPM's choice inside a pool of one-step candidates predict where the candidates end up? (docs/toy_world.md)

    python benchmarks/spm_step_agreement.py [--model toyworld:base] [--spm toyworld:spm] [--steps 4,6,8,10,12,15]

What SPO trains on is the SPM's best and worst of k candidates x_{t-1} drawn from one shared x_t, scored on their
x0 estimate at t-1; the held-out pair accuracy (``spm_eval.json``) scores whole samples noised after the fact. This
measures the first: on the 64 probe prompts (``world.probe_prompts``,
the validation set of the time), a base-model trajectory (the rollout's sampler: 20 DDIM steps, eta
1, CFG 5, bf16) runs to step i; k candidates are drawn there, each is scored by the SPM as a rollout scores it, and
each is then sampled to the end with the *same* later noise as its pool-mates (common random numbers, so the final
images differ only by the candidate), and the finals are scored by the ground truth. Per step i: the mean SPM score
gap (max - min) of a pool, the ground truth's range in a pool, the share of pools the ground truth separates (best
and worst of the SPM differ by more than the tie margin) and, of those, how often the SPM's best ends above its
worst (``agree``); the within-pool correlation of the SPM score with the final ground truth (``corr_spm``), and of
the ground truth of the x0 estimate itself with it (``corr_gt_x0``: what a perfect judge of the picture the SPM
reads would reach). Near 0, the SPM's pick is noise to the ground truth and SPO's pairs carry only the SPM's biases.
``--thresholds`` adds, per step and over all steps, for each SPO threshold (``spo.threshold``: a pool gives a pair
only if tanh of half its SPM gap exceeds it, as in the rollout) the share of pools kept (``kept``) and the agreement
among the kept pools the ground truth separates (``agree``): what raising the threshold trades. Prints JSON (``--out FILE`` also writes it).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spo_fast.diffusion.models import decode_latents, encode_prompts, load_components, resolve_model_path
from spo_fast.diffusion.sampling import DDIMSchedule, cfg_model_output, ddim_step_stats
from spo_fast.reward.spm import SPMScorer
from spo_fast.toyworld import world
from spo_fast.toyworld.build import SAMPLER, TIE_MARGIN


def within_pool_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of (P, k) scores after removing each pool's mean (what a choice inside a pool sees)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum().item() / max((a.square().sum() * b.square().sum()).sqrt().item(), 1e-12)


class Sampler:
    """The rollout's DDIM step (eta, CFG, bf16 autocast) with the caller's noise."""

    def __init__(self, comp, steps: int, eta: float, guidance: float, bf16: bool):
        self.comp, self.eta, self.guidance, self.bf16 = comp, eta, guidance, bf16
        self.schedule = DDIMSchedule.from_scheduler(comp.scheduler, steps)
        self.ts = self.schedule.timesteps

    def out(self, x, t, cond, uncond):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return cfg_model_output(self.comp.unet, x, t, cond, uncond, self.guidance).float()

    def stats(self, x, i, cond, uncond):
        """x0_hat, mean and std (N, 1, 1, 1) of the step from x at step index i."""
        t = self.ts[i].expand(x.shape[0])
        x0, mean, std = ddim_step_stats(self.schedule, self.out(x, t, cond, uncond), x, t, self.eta)
        return x0, mean, std.view(-1, 1, 1, 1)

    def step(self, x, i, cond, uncond, noise):
        _, mean, std = self.stats(x, i, cond, uncond)
        return mean + std * noise


def pools_setup(comp, scorer: SPMScorer, prompts: list[str], k: int, seed: int, sampler: Sampler):
    """What a pool measurement starts from: the prompts' conditioning for n samples and for the n*k candidates
    (cond, uncond, cond_k, uncond_k), the SPM's prompt state and the candidates' prompt index, the generator, and a
    base-model trajectory of the n prompts (x at every step index)."""
    n, res = len(prompts), world.RESOLUTION
    cond, uncond = (encode_prompts(comp, q, "cpu", res) for q in (prompts, [""] * n))
    cond_k, uncond_k = (encode_prompts(comp, q, "cpu", res) for q in ([p for p in prompts for _ in range(k)],
                                                                        [""] * (n * k)))
    state, index = scorer.prepare(prompts), torch.arange(n).repeat_interleave(k)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *comp.latent_shape), generator=gen)
    trajectory = [x]
    for i in range(len(sampler.ts) - 1):
        x = sampler.step(x, i, cond, uncond, torch.randn(x.shape, generator=gen))
        trajectory.append(x)
    return (cond, uncond, cond_k, uncond_k), state, index, gen, trajectory


def emit(report: dict, out: Path | None) -> int:
    """Print the report as JSON (and write it to ``out`` if given); the exit status 0."""
    text = json.dumps(report, indent=1)
    if out:
        out.write_text(text + "\n")
    print(text)
    return 0


def add_pool_arguments(p: argparse.ArgumentParser, steps: str) -> None:
    """The command-line options shared by the pool measurements (``steps``: the default --steps)."""
    p.add_argument("--model", default="toyworld:base")
    p.add_argument("--spm", default="toyworld:spm")
    p.add_argument("--steps", default=steps, help="step indices i (0-based, of --num-steps) to branch at")
    p.add_argument("--k", type=int, default=4, help="candidates per pool (default 4, the toy recipe's)")
    p.add_argument("--prompts", type=int, default=64, help="probe prompts, one pool each (default 64)")
    p.add_argument("--num-steps", type=int, default=SAMPLER["num_steps"])
    p.add_argument("--cfg", type=float, default=SAMPLER["guidance_scale"],
                   help=f"guidance scale of the trajectories and pools (default {SAMPLER['guidance_scale']:g}, the "
                        "toy recipes'; >= 1)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--out", type=Path, help="also write the JSON here")


def by_threshold(gap: torch.Tensor, diff: torch.Tensor, thresholds: list[float]) -> dict:
    """Per threshold: the share of pools SPO keeps at it (``tanh(gap / 2) > threshold``, the pair-selection rule of
    ``spo_fast.kernels.pair_select``, for the SPM's best-worst gap), and among those the ground truth separates
    (|diff| > the tie margin), the share where the SPM's best ends above its worst (None if there are none)."""
    out = {}
    for th in thresholds:
        kept = torch.tanh(gap / 2) > th
        decided = kept & (diff.abs() > TIE_MARGIN)
        out[f"{th:g}"] = {"kept": kept.float().mean().item(), "decided": int(decided.sum()),
                          "agree": ((diff > 0) & decided).sum().item() / int(decided.sum()) if decided.any() else None}
    return out


@torch.no_grad()
def agreement(comp, scorer: SPMScorer, prompts: list[str], steps: list[int], k: int, seed: int,
              sampler: Sampler, thresholds: list[float] = ()) -> tuple[list[dict], dict]:
    n, T = len(prompts), len(sampler.ts)
    attrs = [world.parse_prompt(p) for p in prompts]
    pooled_attrs = [a for a in attrs for _ in range(k)]
    (cond, uncond, cond_k, uncond_k), state, index, gen, trajectory = pools_setup(comp, scorer, prompts, k, seed,
                                                                                  sampler)
    rows, gaps, diffs = [], [], []
    for i in steps:
        t0 = time.perf_counter()
        xi = trajectory[i]
        _, mean, std = sampler.stats(xi, i, cond, uncond)
        cand = (mean[:, None] + std[:, None] * torch.randn((n, k, *xi.shape[1:]), generator=gen)).flatten(0, 1)
        if i + 1 < T:  # scored as the rollout scores it: the x0 estimate at the candidate's own step
            x0_hat, _, _ = sampler.stats(cand, i + 1, cond_k, uncond_k)
            score_t = sampler.ts[i + 1].expand(n * k)
        else:  # the last step's candidates are final images, scored at t = 0
            x0_hat, score_t = cand, torch.zeros(n * k, dtype=torch.long)
        read = decode_latents(comp, x0_hat).clamp(-1, 1)
        spm = scorer.score(read, score_t, state, index).view(n, k)
        gt_read = world.score(read, pooled_attrs).view(n, k)
        y = cand
        for j in range(i + 1, T):  # common random numbers: one draw per pool, shared by its k candidates
            y = sampler.step(y, j, cond_k, uncond_k,
                             torch.randn((n, *xi.shape[1:]), generator=gen).repeat_interleave(k, 0))
        gt = world.score(decode_latents(comp, y).clamp(-1, 1), pooled_attrs).view(n, k)
        rows_n = torch.arange(n)
        diff = gt[rows_n, spm.argmax(1)] - gt[rows_n, spm.argmin(1)]
        decided = diff.abs() > TIE_MARGIN
        gap = spm.max(1).values - spm.min(1).values
        gaps.append(gap)
        diffs.append(diff)
        rows.append({"step": i, "t": int(sampler.ts[i]), "t_scored": int(score_t[0]),
                     "spm_gap": gap.mean().item(),
                     "gt_pool_range": (gt.max(1).values - gt.min(1).values).mean().item(),
                     "decided": decided.float().mean().item(),
                     "agree": ((diff > 0) & decided).sum().item() / max(int(decided.sum()), 1),
                     "gt_best_minus_worst": diff.mean().item(),
                     "corr_spm": within_pool_corr(spm, gt), "corr_gt_x0": within_pool_corr(gt_read, gt),
                     **({"by_threshold": by_threshold(gap, diff, thresholds)} if thresholds else {}),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    overall = by_threshold(torch.cat(gaps), torch.cat(diffs), thresholds) if thresholds else {}
    return rows, overall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pool_arguments(p, "4,6,8,10,12,15")
    p.add_argument("--fp32", action="store_true", help="sample in fp32 (default: bf16, as the toy recipes' rollouts)")
    p.add_argument("--thresholds", default="",
                   help="comma-separated SPO thresholds (e.g. 0.1,0.3,0.5): the pools each keeps and their agreement, "
                        "per step and over all steps")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s]
    bad = [s for s in steps if not 0 <= s < args.num_steps]
    try:
        thresholds = [float(g) for g in args.thresholds.split(",") if g]
    except ValueError:
        p.error(f"--thresholds must be comma-separated numbers, e.g. 0.1,0.3,0.5 (got {args.thresholds!r})")
    if bad or args.k < 2 or args.prompts < 1 or not args.cfg >= 1:
        p.error(f"--steps {bad} must lie in [0, {args.num_steps}), --k >= 2, --prompts >= 1 and --cfg >= 1 "
                f"(got --k {args.k}, --prompts {args.prompts}, --cfg {args.cfg:g})")
    comp = load_components(str(resolve_model_path(args.model)), "sd15")
    scorer = SPMScorer.from_pretrained(resolve_model_path(args.spm))
    sampler = Sampler(comp, args.num_steps, SAMPLER["eta"], args.cfg, not args.fp32)
    rows, overall = agreement(comp, scorer, world.probe_prompts()[:args.prompts], steps, args.k, args.seed, sampler,
                              thresholds)
    report = {"model": args.model, "spm": args.spm, "k": args.k, "prompts": args.prompts, "seed": args.seed,
              "cfg": args.cfg,
              "bf16": not args.fp32, "steps": rows,
              "mean_corr_spm": sum(r["corr_spm"] for r in rows) / len(rows),
              "mean_agree": sum(r["agree"] for r in rows) / len(rows),
              **({"by_threshold": overall} if thresholds else {})}
    return emit(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
