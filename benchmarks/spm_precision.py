"""How much the rollout's scores and pair choices change when the step-aware preference model (SPM) runs under fp16
autocast (``scorer.dtype=autocast`` in an fp16 run) instead of fp32 (``scorer.dtype=fp32``, the official code's
choice), at the real ViT-H/14 size (``arch:spm_vit_h14``) with random weights.

    python benchmarks/spm_precision.py                    # 12 pools of k = 4 at 512 px, CPU: ~21 min on 2 cores
                                                          # (fp32 105 s; CPU fp16 autocast is slow: 1127 s)
    python benchmarks/spm_precision.py --pools 4 --json out.json

What it scores, so that the inputs look like a rollout's: per pool, one smooth random image (a few octaves of
bicubically upsampled noise, tanh-squashed to about [-1, 1], some pixels beyond it as the decoder's unclamped output)
plus k smooth perturbations whose size grows with the noise level (x0_hat candidates of a noisy step differ more); the
pools cycle through the SD1.5 rollout's scoring timesteps (DDIM 20 steps: t_{i+1} for the branching steps i = 4..18,
and 0 for the final pool). Random weights make no preference, so two things are set to what a trained SPM has: the
logit scale is PickScore's (exp = 100; a fresh CLIP's is 14.3, which would shrink every score gap sevenfold) and the
time conditioning's modulation weights are drawn at std ``--mod-std`` instead of zero (a fresh SPM's identity), so the
adaLN path is exercised. The prompts are toy-world prompts (the architecture directory's tokenizer).

Both precisions run the same model on the same inputs, as the rollout does (text features and image features under
the same context; the score head in fp32: ``logit_scale * cos``), and the pair rule is the rollout's:
``tanh((s_win - s_lose) / 2) > threshold`` (= p_win - p_lose of the softmax of the two scores). Reported: the score
differences, the gap (s_win - s_lose) differences, and how many pools change their validity at 0.3 (SD1.5) and 0.4
(SDXL) or their win/lose choice. CPU fp16 autocast is not a GPU's: the CPU's oneDNN kernels round inputs and outputs
to fp16 and accumulate in fp32, a GPU's cuBLAS/cuDNN may reduce in fp16 too (split-K) and pick other kernels, and its
SDPA is a flash kernel; so the GPU's numbers differ, in the same order of magnitude (both round every matmul's output
to fp16's 11-bit significand).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F


def smooth_noise(n: int, res: int, gen: torch.Generator, octaves=(4, 8, 16, 32)) -> torch.Tensor:
    """(n, 3, res, res) smooth noise: octaves of bicubically upsampled Gaussian noise, amplitude halving per octave."""
    out = torch.zeros(n, 3, res, res)
    amp = 1.0
    for o in octaves:
        out += amp * F.interpolate(torch.randn(n, 3, o, o, generator=gen), size=(res, res), mode="bicubic",
                                   align_corners=False)
        amp /= 2
    return out


def scoring_timesteps(num_steps: int = 20, divert: int = 4, train_steps: int = 1000) -> list[int]:
    """The timesteps the SD1.5 rollout scores at: t_{i+1} for each branching step i, then 0 (the final pool)."""
    ratio = train_steps // num_steps
    ts = [t + 1 for t in range(0, train_steps, ratio)][::-1]  # diffusers' DDIM "leading" with steps_offset 1
    return [ts[i + 1] for i in range(divert, num_steps - 1)] + [0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="arch:spm_vit_h14")
    ap.add_argument("--pools", type=int, default=12)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--res", type=int, default=512, help="decoder output size (SD1.5: 512)")
    ap.add_argument("--mod-std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4, help="images per SPM call")
    ap.add_argument("--json", default="", help="write the numbers here too")
    args = ap.parse_args(argv)

    from spo_fast.diffusion.models import resolve_model_path
    from spo_fast.reward.spm import SPMScorer
    from spo_fast.toyworld import world

    t_start = time.perf_counter()
    scorer = SPMScorer.random(resolve_model_path(args.arch), device="cpu", seed=args.seed, precision="autocast")
    model = scorer.model
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(100.0))  # PickScore's
        for name, p in model.time_cond.named_parameters():  # adaLN modulation away from the identity
            if p.dim() == 2 and ("layers" in name or "pooled" in name):
                p.copy_(torch.randn(p.shape, generator=gen) * args.mod_std)
    logit_scale = scorer.logit_scale

    P, k = args.pools, args.k
    prompts = world.prompts("train")[:P]
    ts_cycle = scoring_timesteps()
    t_pool = torch.tensor([ts_cycle[i % len(ts_cycle)] for i in range(P)])
    base = smooth_noise(P, args.res, gen)
    amp = 0.05 + 0.5 * t_pool.float() / 1000  # candidates of noisier steps differ more
    images = torch.tanh(base[:, None] + amp.view(P, 1, 1, 1, 1) * smooth_noise(P * k, args.res, gen).view(
        P, k, 3, args.res, args.res)) * 1.05  # slightly beyond [-1, 1], as unclamped decoder output
    images = images.reshape(P * k, 3, args.res, args.res)
    t_img = t_pool.repeat_interleave(k)

    def run(ctx) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        with ctx:
            txt = scorer.prepare(prompts).float()
            feats = torch.cat([scorer.image_features(images[i:i + args.batch], t_img[i:i + args.batch]).float()
                               for i in range(0, P * k, args.batch)])
        scores = logit_scale * torch.einsum("pkd,pd->pk", F.normalize(feats, dim=-1).view(P, k, -1), txt)
        return scores, time.perf_counter() - t0

    s32, sec32 = run(torch.autocast("cpu", enabled=False))
    s16, sec16 = run(torch.autocast("cpu", dtype=torch.float16))
    diff = (s16 - s32).abs()
    gap32 = s32.max(1).values - s32.min(1).values
    gap16 = s16.max(1).values - s16.min(1).values
    res = {
        "arch": args.arch, "pools": P, "k": k, "res": args.res, "mod_std": args.mod_std, "seed": args.seed,
        "logit_scale": logit_scale, "device": "cpu", "torch": torch.__version__,
        "score_fp32_mean": s32.mean().item(), "score_fp32_std": s32.std().item(),
        "score_abs_diff_max": diff.max().item(), "score_abs_diff_mean": diff.mean().item(),
        "gap_fp32_median": gap32.median().item(), "gap_fp32_min": gap32.min().item(),
        "gap_fp32_max": gap32.max().item(), "gap_abs_diff_max": (gap16 - gap32).abs().max().item(),
        "gap_abs_diff_mean": (gap16 - gap32).abs().mean().item(),
        "win_or_lose_changed": int(((s16.argmax(1) != s32.argmax(1)) | (s16.argmin(1) != s32.argmin(1))).sum()),
        "seconds_fp32": sec32, "seconds_fp16_autocast": sec16, "seconds_total": time.perf_counter() - t_start,
    }
    for thr in (0.3, 0.4):
        v32, v16 = torch.tanh(gap32 / 2) > thr, torch.tanh(gap16 / 2) > thr
        g_star = 2 * math.atanh(thr)
        res[f"valid_fp32@{thr}"] = int(v32.sum())
        res[f"validity_flips@{thr}"] = int((v32 != v16).sum())
        # a pool can flip only when its gap lies within the gap error of the threshold gap
        res[f"pools_within_max_gap_error_of_threshold@{thr}"] = int(((gap32 - g_star).abs()
                                                                     <= res["gap_abs_diff_max"]).sum())
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
