"""Training a step-aware preference model (SPM); the command is ``python -m spo_fast.train_spm``.

Each preference pair (caption, jpg_0, jpg_1, label_0, label_1 -- the Pick-a-Pic schema) is made
noisy the way the paper does it: both images are encoded (VAE, or identity for a pixel-space
model), noised at one t ~ U[0, T) with the *same* noise, one classifier-free-guided noise
prediction of the frozen base model gives x0_hat for each, which is decoded and scored by the SPM
at t. Loss: the Bradley-Terry two-way cross-entropy of the two scores against (label_0, label_1),
ties 0.5/0.5 (``spm.pair_loss``). Every parameter of the SPM trains (AdamW, constant lr after a
short warm-up).

Evaluation: pairwise accuracy on held-out pairs (ties excluded) per timestep bucket
[0, 250), [250, 500), [500, 750), [750, 1000) -- one fixed t and noise per pair and bucket --
plus ``clean`` (the stored images themselves at t = 0). Written to ``<out>/spm_eval.json``.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from spo_fast.core import jsonio
from spo_fast.data.pairs import Pairs, load_all
from spo_fast.diffusion.models import (
    Components,
    decode_latents,
    encode_images,
    encode_negative,
    encode_prompts,
)
from spo_fast.diffusion.sampling import cfg_model_output, predict_x0_eps

BUCKETS = ((0, 250), (250, 500), (500, 750), (750, 1000))


@dataclass
class SPMTrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    seed: int = 0
    guidance_scale: float = 5.0
    log_every: int = 100
    extra_fraction: float = 0.0
    """Share of each batch drawn from ``extra_pairs`` (a generator of labelled pairs) instead of the file."""
    anchor_weight: float = 0.0
    """Weight of the contrastive anchor (``train_spm``'s ``anchor_images``): 0 = none, the paper's SPM training."""
    anchor_batch: int = 64
    """Captioned images per step for the anchor."""
    sampling_dtype: str = "fp32"
    """Autocast of the base model's no-grad x0_hat prediction: ``fp32`` or ``bf16`` (the toy world's build uses its
    recipes' bf16 sampling, so the SPM learns on the x0_hat its rollouts will show it)."""


def image_resolution(comp: Components) -> int:
    return comp.latent_shape[1] * comp.vae_scale_factor


@torch.no_grad()
def noisy_x0_hat(comp: Components, images: torch.Tensor, prompts: list[str], t: torch.Tensor,
                 noise: torch.Tensor, guidance_scale: float, dtype: str = "fp32") -> torch.Tensor:
    """Images (N, 3, H, W) -> decoded x0_hat after noising at t (N,) with ``noise`` (N, C, h, w)
    and one CFG prediction of the base model (under bf16 autocast when ``dtype`` is ``bf16``). t = 0 entries are
    passed through clean."""
    z = encode_images(comp, images)
    alphas = comp.scheduler.alphas_cumprod.to(z.device, torch.float32)
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    res = image_resolution(comp)
    cond = encode_prompts(comp, prompts, z.device, res)
    uncond = encode_negative(comp, "", len(prompts), z.device, res)
    with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = cfg_model_output(comp.unet, x_t, t, cond, uncond, guidance_scale).float()
    schedule = _Alphas(alphas, comp.scheduler.config.prediction_type)
    x0, _ = predict_x0_eps(schedule, out, x_t, t)
    x0 = torch.where((t == 0).view(-1, 1, 1, 1), z, x0)
    return decode_latents(comp, x0)


@dataclass
class _Alphas:
    """The two fields of DDIMSchedule that ``predict_x0_eps`` reads (any t, not only DDIM steps)."""

    alphas_cumprod: torch.Tensor
    prediction_type: str

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t]


def _batch_inputs(pairs: Pairs, idx: list[int], res: int):
    """Captions, decoded images (an undecodable one raises PairsError naming file and row) and labels."""
    caps = [pairs.captions[i] for i in idx]
    img0 = torch.stack([pairs.image(i, "jpg_0", res) for i in idx])
    img1 = torch.stack([pairs.image(i, "jpg_1", res) for i in idx])
    return caps, img0, img1, pairs.label_0[idx]


def _text_feats(spm, tokenizer, captions: list[str], device):
    """Unique captions -> (U, D) features and (N,) index; each caption's text runs once."""
    unique = sorted(set(captions))
    where = {c: i for i, c in enumerate(unique)}
    max_len = min(tokenizer.model_max_length, spm.clip.config.text_config.max_position_embeddings)
    ids = tokenizer(unique, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    feats = spm.text_features(ids.input_ids.to(device), ids.attention_mask.to(device))
    return feats, torch.tensor([where[c] for c in captions], device=device)


def _pair_scores(spm, tokenizer, comp, caps, img0, img1, t, noise, guidance_scale, dtype="fp32"):
    n = len(caps)
    x0 = noisy_x0_hat(comp, torch.cat([img0, img1]), caps + caps, torch.cat([t, t]), torch.cat([noise, noise]),
                      guidance_scale, dtype)
    feats, index = _text_feats(spm, tokenizer, caps, img0.device)
    s = spm.scores(spm.preprocess(x0), torch.cat([t, t]), feats, torch.cat([index, index]))
    return s[:n], s[n:]


@torch.no_grad()
def evaluate_spm(spm, tokenizer, comp: Components, pairs: Pairs, seed: int = 0, batch_size: int = 64,
                 guidance_scale: float = 5.0, progress: bool = False, desc: str = "SPM held-out accuracy",
                 sampling_dtype: str = "fp32") -> dict:
    """Held-out pairwise accuracy (ties excluded) per timestep bucket and on the clean images (a progress bar
    when ``progress``)."""
    from tqdm.auto import tqdm

    from spo_fast.reward.spm import pair_loss

    spm.eval()
    res, device = image_resolution(comp), comp.unet.device
    latent = comp.latent_shape
    gen = torch.Generator().manual_seed(seed + 777)
    keep = [i for i in range(len(pairs)) if pairs.label_0[i] != 0.5]
    result = {"pairs": len(keep), "ties_excluded": len(pairs) - len(keep)}
    buckets = [("clean", (0, 1)), *((f"t{lo}-{hi}", (lo, hi)) for lo, hi in BUCKETS)]
    with tqdm(total=len(buckets) * -(-len(keep) // batch_size), desc=desc, unit="batch",
              disable=not (progress and keep), mininterval=1.0) as bar:
        for name, (lo, hi) in buckets:
            correct = []
            for start in range(0, len(keep), batch_size):
                idx = keep[start:start + batch_size]
                caps, img0, img1, lab = _batch_inputs(pairs, idx, res)
                t = torch.randint(lo, hi, (len(idx),), generator=gen)
                noise = torch.randn((len(idx), *latent), generator=gen)
                s0, s1 = _pair_scores(spm, tokenizer, comp, caps, img0.to(device), img1.to(device), t.to(device),
                                      noise.to(device), guidance_scale, sampling_dtype)
                correct.append(pair_loss(s0, s1, lab.to(device))[1])
                bar.update(1)
            result[name] = torch.cat(correct).float().nanmean().item() if correct else float("nan")
    return result


def _load_checked(path, progress: bool = False, option: str = "data.pairs") -> Pairs:
    """``load_all`` (schema and labels) plus ``Pairs.check_images`` (every image decodes): a bad file or row
    raises PairsError now, naming the file and row (or ``option``, the flag the files came from), not when a
    training batch first draws the row."""
    pairs = load_all(str(path), ties="keep", option=option)
    pairs.check_images(progress=progress, desc=f"checking the images of {Path(str(path)).name}")
    return pairs


def anchor_loss(spm, tokenizer, captions: list[str], images: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """CLIP's symmetric contrastive loss between ``images`` (N, 3, H, W) in [-1, 1], read by the SPM at ``t`` (N,;
    None: as the plain CLIP, without the timestep), and their ``captions``: each image must score its own caption
    above the batch's others (a caption repeated in the batch counts as one text; every image of it is a match)."""
    feats, index = _text_feats(spm, tokenizer, captions, images.device)
    img = spm.image_features(spm.preprocess(images), t)
    logits = spm.clip.logit_scale.exp() * img @ feats.to(img.dtype).T  # (N, U)
    match = torch.nn.functional.one_hot(index, len(feats)).float()  # (N, U)
    image_to_text = torch.nn.functional.cross_entropy(logits, index)
    text_to_image = -(logits.T.log_softmax(-1) * match.T).sum(-1) / match.T.sum(-1)
    return (image_to_text + text_to_image.mean()) / 2


def train_spm(spm, tokenizer, comp: Components, train_pairs, eval_pairs, out: Path, cfg: SPMTrainConfig,
              extra_pairs=None, progress: bool = True, anchor_images=None) -> dict:
    """Train ``spm`` in place on ``train_pairs`` (path or Pairs); evaluate on ``eval_pairs``; save to ``out``.
    Pairs given as paths are checked first (``_load_checked``); a row whose image cannot be decoded raises
    PairsError naming file and row.

    ``extra_pairs(n, generator) -> (captions, img0, img1, label_0)``, when given, supplies
    ``cfg.extra_fraction`` of every batch (the toy world's rendered hard negatives).
    ``anchor_images(n, generator) -> (captions, images)``, when given with ``cfg.anchor_weight`` > 0, adds
    ``cfg.anchor_weight`` x ``anchor_loss`` on ``cfg.anchor_batch`` clean captioned images per step, each read at a
    t uniform in [0, T): it keeps the SPM's reading of what a caption names, which the toy world's SPM trained on
    its preference pairs alone lost. Read through the base model's x0_hat at t instead, as the pairs are, it did
    worse (docs/toy_world.md).
    ``progress``: tqdm bars (with the time left) for the held-out evaluations and the training steps, whose postfix
    is the running loss and accuracy; the ``[train_spm]`` lines (every ``cfg.log_every`` steps) are printed either
    way."""
    from tqdm.auto import tqdm

    from spo_fast.reward.spm import pair_loss

    train_set, eval_set = (p if isinstance(p, Pairs) or p is None else _load_checked(p, progress)
                           for p in (train_pairs, eval_pairs))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = comp.unet.device
    res, latent = image_resolution(comp), comp.latent_shape
    T = len(comp.scheduler.alphas_cumprod)
    params = [p for p in spm.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    gen = torch.Generator().manual_seed(cfg.seed + 31)
    before = evaluate_spm(spm, tokenizer, comp, eval_set, cfg.seed, guidance_scale=cfg.guidance_scale,
                          sampling_dtype=cfg.sampling_dtype,
                          progress=progress, desc="SPM held-out accuracy (before)") if eval_set is not None else None
    if before is not None:
        print(f"[train_spm] before: {jsonio.dumps(before)}", flush=True)
    log, t0 = [], time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="SPM training", unit="step", disable=not progress, mininterval=1.0)
    with open(out / "metrics.jsonl", "w") as metrics, bar:
        for step in range(cfg.steps):
            spm.train()
            n_extra = round(cfg.batch_size * cfg.extra_fraction) if extra_pairs is not None else 0
            n_file = min(cfg.batch_size - n_extra, len(train_set))
            idx = torch.randint(len(train_set), (n_file,), generator=gen).tolist()
            caps, img0, img1, lab = _batch_inputs(train_set, idx, res)
            if n_extra:
                e_caps, e0, e1, e_lab = extra_pairs(n_extra, gen)
                caps, img0, img1, lab = caps + e_caps, torch.cat([img0, e0]), torch.cat([img1, e1]), torch.cat([lab, e_lab])
            t = torch.randint(0, T, (len(caps),), generator=gen)
            noise = torch.randn((len(caps), *latent), generator=gen)
            s0, s1 = _pair_scores(spm, tokenizer, comp, caps, img0.to(device), img1.to(device), t.to(device),
                                  noise.to(device), cfg.guidance_scale, cfg.sampling_dtype)
            loss, correct = pair_loss(s0, s1, lab.to(device))
            if anchor_images is not None and cfg.anchor_weight > 0:
                a_caps, a_img = anchor_images(cfg.anchor_batch, gen)
                a_t = torch.randint(0, T, (len(a_caps),), generator=gen)
                loss = loss + cfg.anchor_weight * anchor_loss(spm, tokenizer, a_caps, a_img.to(device), a_t.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                spm.clip.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: exp(scale) <= 100
            log.append((loss.item(), correct.nanmean().item()))
            if (step + 1) % 10 == 0 or step + 1 == cfg.steps:  # running means over the last 10 steps
                recent = np.array(log[-10:])
                acc = recent[:, 1][~np.isnan(recent[:, 1])]
                acc_text = f"{acc.mean():.3f}" if len(acc) else "-"  # steps of ties only have no accuracy
                bar.set_postfix_str(f"loss {recent[:, 0].mean():.4f} acc {acc_text}", refresh=False)
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                recent = np.array(log[-cfg.log_every:])
                acc = recent[:, 1][~np.isnan(recent[:, 1])]  # steps of ties only have no accuracy
                row = {"step": step + 1, "loss": float(recent[:, 0].mean()),
                       "acc": float(acc.mean()) if len(acc) else None, "seconds": time.perf_counter() - t0}
                metrics.write(jsonio.dumps(row) + "\n")
                metrics.flush()
                (bar.write if progress else print)(f"[train_spm] {jsonio.dumps(row)}")
                sys.stdout.flush()
    spm.eval()
    for p in params:
        p.requires_grad_(False)
    spm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    after = evaluate_spm(spm, tokenizer, comp, eval_set, cfg.seed, guidance_scale=cfg.guidance_scale,
                         sampling_dtype=cfg.sampling_dtype,
                         progress=progress, desc="SPM held-out accuracy (after)") if eval_set is not None else None
    result = {"config": asdict(cfg), "train_pairs": len(train_set), "seconds": time.perf_counter() - t0,
              "eval_before": before, "eval": after}
    (out / "spm_eval.json").write_text(jsonio.dumps(result, indent=1) + "\n")
    print(f"[train_spm] held-out accuracy: {jsonio.dumps(after)}", flush=True)
    return result
