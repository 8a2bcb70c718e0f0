"""Build the toy world's shipped weights: ``python -m spo_fast.toyworld build [--out DIR] [--smoke]``.

Stages (each deterministic for a given seed, torch version and thread count; run in order):

1. ``base``: a tiny pixel-space text-to-image model (CLIP BPE tokenizer over the toy vocabulary,
   a 2-layer CLIP text encoder, a ~1M-parameter UNet on 3x24x24 RGB, DDIM scheduler) trained
   jointly from scratch on rendered images of *all* toy prompts with mixed picture quality
   (``world.sample_quality``) and 10% empty-prompt dropout for classifier-free guidance. It is
   stopped early on purpose: its samples are recognisable but often wrong in colour, place,
   size or shape, and inherit the mixed quality of its data, so preference optimisation has
   room to improve it.
2. ``pairs``: two base-model samples per prompt (the SPO rollouts' sampler settings: DDIM, 20
   steps, eta 1, CFG 5 or ``BuildConfig.sample_guidance``; in fp32 with torch.randn step noise,
   ``BuildConfig.sample_noise``),
   JPEG-encoded and labelled by the ground-truth score of the stored (decoded) JPEGs, written in
   the Pick-a-Pic schema (``caption, jpg_0, jpg_1, label_0, label_1``; ties 0.5/0.5, plus
   ``score_0``, ``score_1``, ``split``) as ``pairs_train.parquet`` (train-split prompts) and
   ``pairs_heldout.parquet`` (held-out split).
3. ``spm``: a tiny CLIP (ViT on 24 px, 4 layers) pre-trained contrastively on rendered
   (image, caption) pairs -- the stand-in for PickScore's CLIP backbone -- then turned into a
   step-aware preference model and trained by ``spo_fast.reward.spm_trainer`` on the noisy train pairs plus
   rendered hard negatives (``rendered_pairs``, of the kinds ``BuildConfig.spm_negatives``: by default
   ``SHIPPED_NEGATIVES``); its held-out accuracy per timestep bucket is written to ``spm/spm_eval.json``.

The output directory (default: the packaged ``spo_fast/toyworld/assets``) holds ``base/`` (a
diffusers-layout model directory without ``vae/``: pixel space), ``spm/``, the two parquet
files and ``build.json`` (settings, timings, metrics). ``--smoke`` runs every stage with tiny
step counts into a scratch directory (the tests use it).

``--variant v_prediction`` (``BuildConfig.variant``) builds the world with a base that follows its prompts: it
predicts v with min-SNR weights on a three-level UNet conditioned by the frozen text tower of the contrastive CLIP
(pretrained once, in the base stage, and reused by the spm stage), its pairs are sampled as the rollouts sample
(bf16 where the CPU computes it natively, else fp32), and its SPM trains 1,200 steps. It needs
``--out``: the packaged assets are the shipped variant's (docs/toy_world.md says why).
"""
from __future__ import annotations

import functools
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spo_fast.core import jsonio
from spo_fast.diffusion.models import (
    encode_prompts,
    load_components,
    quiet_loading,
    toyworld_assets,
    write_clip_tokenizer,
)
from spo_fast.diffusion.sampling import DDIMSchedule, cfg_model_output, ddim_step_stats, sample
from spo_fast.toyworld import world

FAMILY = "sd15"
TEXT_MAX_LEN = 16  # "a small red circle on the left, black background" is 13 tokens with bos/eos

UNET_CONFIG = {  # the shipped base: two levels (24 and 12 px), cross-attention at 12 px
    "sample_size": world.RESOLUTION, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
    "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64,
    # diffusers reads attention_head_dim as the number of heads: 8 heads of 8 channels
    "attention_head_dim": 8, "norm_num_groups": 8,
}
# the v-prediction variant's UNet: three levels (24, 12, 6 px), cross-attention at 12 and 6 px and in the 6 px middle
# block, 2 heads of 32 channels
UNET_CONFIG_3LEVEL = {
    **UNET_CONFIG, "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 2,
}
UNETS = {"2level": UNET_CONFIG, "3level": UNET_CONFIG_3LEVEL}
# the contrastive CLIP's hidden size: a base on the ``clip`` text encoder reads its text tower by cross-attention
CLIP_WIDTH = UNET_CONFIG["cross_attention_dim"]
TEXT_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "max_position_embeddings": TEXT_MAX_LEN, "projection_dim": 64}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                    "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False,
                    "steps_offset": 1}
PREDICTION_TYPES = ("epsilon", "v_prediction")
# the toy recipes' sampler; the shipped pairs and SPM were made in fp32 (BuildConfig.sample_dtype; the recipes now
# sample in bf16: docs/speed.md)
SAMPLER = {"num_steps": 20, "eta": 1.0, "guidance_scale": 5.0, "dtype": "fp32"}
NEGATIVE_KINDS = ("mismatched", "requality", "flooded", "empty", "speckled", "recoloured", "drifted", "nudged")
# the shipped SPM's: the first four, plus speckled and recoloured (the failure modes SPO found with the first four
# alone; docs/toy_spm_six_kinds.json)
SHIPPED_NEGATIVES = NEGATIVE_KINDS[:6]
VARIANTS = ("shipped", "v_prediction")
# how the build's sampler draws each step's noise (BuildConfig.sample_noise, sample_batch)
SAMPLE_NOISE = ("torch", "step_op")
# each named attribute's values (the toy world's vocabularies), by Attributes field
FIELD_VALUES = {"color": world.COLORS, "shape": world.SHAPES, "size": world.SIZES, "position": world.POSITIONS,
                "background": world.BACKGROUNDS}
TEXT_ENCODERS = ("joint", "clip")  # BuildConfig.base_text_encoder


@dataclass
class BuildConfig:
    """The build's settings. The defaults are the shipped world's; ``variant("v_prediction")`` the rebuilt one that
    follows its prompts (docs/toy_world.md: it is not shipped, because SPO degrades it)."""

    seed: int = 0
    base_steps: int = 1500
    base_batch: int = 48
    base_probe_every: int = 500  # ground truth of base samples on world.probe_prompts() every this many steps
    base_probe_prompts: int = 64  # probe prompts per probe (one sample each)
    base_lr: float = 2e-3
    cond_dropout: float = 0.1
    base_unet: str = "2level"  # a key of UNETS
    base_prediction: str = "epsilon"  # or "v_prediction" (the scheduler's prediction_type)
    # per-sample weight of the base model's MSE: "uniform" (the plain MSE) or "min_snr" (see loss_weight)
    base_loss_weighting: str = "uniform"
    base_min_snr_gamma: float = 5.0
    # the base's text encoder: "joint" (TEXT_CONFIG, trained from scratch with the UNet: the shipped base) or "clip"
    # (the text tower of the contrastive CLIP that the spm stage pretrains, ``pretrain_clip``, frozen: SD's recipe;
    # see train_base for why)
    base_text_encoder: str = "joint"
    pairs_per_train_prompt: int = 1
    heldout_pair_prompts: int = 0  # 0 = every held-out prompt, one pair each
    sample_batch: int = 128
    # the probes', the pairs' and the SPM's noisy pairs' sampling precision: fp32, bf16, or bf16_if_native (bf16
    # where the CPU or GPU computes it natively, else fp32: on an AVX2-only CPU bf16 is emulated, ~17x slower;
    # spo_fast.core.config.native_bf16); ``sampling_dtype`` resolves it
    sample_dtype: str = SAMPLER["dtype"]
    # the pairs' and the probes' step noise: "torch" (torch.randn from each batch's generator, in a plain DDIM loop:
    # the sampler the shipped pairs were made with, so that a rebuild reproduces them byte for byte) or "step_op"
    # (the rollouts' step op, spo_fast.kernels.ddim_step, with its own Philox noise: a different draw)
    sample_noise: str = "torch"
    # the probes', the pairs' and the SPM's noisy pairs' classifier-free guidance scale (the rollouts'
    # sampling.guidance_scale)
    sample_guidance: float = SAMPLER["guidance_scale"]
    clip_steps: int = 1000
    clip_batch: int = 128
    clip_lr: float = 1e-3
    spm_steps: int = 800
    spm_batch: int = 32
    spm_lr: float = 3e-4
    spm_rendered_fraction: float = 0.5
    spm_negatives: tuple[str, ...] = SHIPPED_NEGATIVES  # the rendered hard negatives' kinds (NEGATIVE_KINDS)
    # weight of the SPM's contrastive anchor on captioned renders (SPMTrainConfig.anchor_weight, captioned_renders); 0:
    # none (the shipped SPM)
    spm_anchor_weight: float = 0.0
    # the SPM's contrastive batches (``captioned_renders``: its CLIP's sharpening and its anchor) draw half of each
    # batch as groups of train-split captions that differ only in this field (one of FIELD_VALUES, or "any": each
    # group's field drawn at random), every value of it that the train split has: hard negatives for the field that
    # the pretrained CLIP reads worst (shape: docs/toy_world.md); None: no groups (the shipped SPM)
    spm_clip_field: str | None = None
    # contrastive steps that continue the SPM's CLIP from the pretrained one before its preference training
    # (``sharpen_clip``; the base's text tower is the pretrained one either way); 0: none (the shipped SPM)
    spm_clip_steps: int = 0
    # the SPM's CLIP width (hidden and projection size; 4 layers and 4 heads either way). The base's text tower is
    # always the width-64 pretraining at ``clip_lr``; another width, or another ``spm_clip_lr``, makes the spm stage
    # pretrain a CLIP of its own (kept in ``SPM_CLIP_CACHE`` on a build whose base reads the CLIP)
    spm_width: int = CLIP_WIDTH
    # the learning rate of the SPM's CLIP: its own pretraining and its sharpening; None: ``clip_lr``. A wider CLIP
    # needs a lower one: at width 128, 1,000 steps at 1e-3 reached top-1 0.49, at 5e-4 0.90 (docs/toy_spm_wide.json)
    spm_clip_lr: float | None = None

    def __post_init__(self):
        for name, value, accepted in (("base_unet", self.base_unet, tuple(UNETS)),
                                      ("base_prediction", self.base_prediction, PREDICTION_TYPES),
                                      ("base_loss_weighting", self.base_loss_weighting, ("uniform", "min_snr")),
                                      ("base_text_encoder", self.base_text_encoder, TEXT_ENCODERS),
                                      ("sample_dtype", self.sample_dtype, ("fp32", "bf16", "bf16_if_native")),
                                      ("sample_noise", self.sample_noise, SAMPLE_NOISE)):
            if value not in accepted:
                raise ValueError(f"BuildConfig.{name}={value!r}; accepted: {', '.join(accepted)}")
        if not (isinstance(self.sample_guidance, (int, float)) and self.sample_guidance >= 1):
            raise ValueError(f"BuildConfig.sample_guidance={self.sample_guidance!r}; accepted: a number >= 1")
        if not (isinstance(self.spm_anchor_weight, (int, float)) and self.spm_anchor_weight >= 0):
            raise ValueError(f"BuildConfig.spm_anchor_weight={self.spm_anchor_weight!r}; accepted: a number >= 0")
        if self.spm_clip_field is not None and self.spm_clip_field not in (*FIELD_VALUES, "any"):
            raise ValueError(f"BuildConfig.spm_clip_field={self.spm_clip_field!r}; accepted: None, any or one of "
                             f"{', '.join(FIELD_VALUES)}")
        if not (isinstance(self.spm_clip_steps, int) and self.spm_clip_steps >= 0):
            raise ValueError(f"BuildConfig.spm_clip_steps={self.spm_clip_steps!r}; accepted: an integer >= 0")
        if not (isinstance(self.spm_width, int) and self.spm_width >= 4 and self.spm_width % 4 == 0):
            raise ValueError(f"BuildConfig.spm_width={self.spm_width!r}; accepted: a positive multiple of 4 (4 heads)")
        if self.spm_clip_lr is not None and not (isinstance(self.spm_clip_lr, (int, float)) and self.spm_clip_lr > 0):
            raise ValueError(f"BuildConfig.spm_clip_lr={self.spm_clip_lr!r}; accepted: None or a number > 0")
        bad = [k for k in self.spm_negatives if k not in NEGATIVE_KINDS]
        if bad or not self.spm_negatives:
            raise ValueError(f"BuildConfig.spm_negatives={self.spm_negatives!r}; accepted: a non-empty subset of "
                             f"{', '.join(NEGATIVE_KINDS)}")

    @property
    def spm_clip_rate(self) -> float:
        """The SPM's CLIP's learning rate: ``spm_clip_lr``, or ``clip_lr`` where that is None."""
        return self.clip_lr if self.spm_clip_lr is None else self.spm_clip_lr

    @property
    def sampling_dtype(self) -> str:
        """``sample_dtype`` on this machine's CPU (the build samples on the CPU): fp32 or bf16."""
        from spo_fast.core.config import bf16_if_native

        return bf16_if_native("cpu") if self.sample_dtype == "bf16_if_native" else self.sample_dtype

    @classmethod
    def smoke(cls, **kw) -> BuildConfig:
        """Tiny step counts (over any ``kw``, e.g. a variant's settings)."""
        return cls(**{**kw, "base_steps": 3, "base_batch": 8, "base_probe_every": 2, "base_probe_prompts": 4,
                      "pairs_per_train_prompt": 0, "heldout_pair_prompts": 4, "sample_batch": 8, "clip_steps": 3,
                      "clip_batch": 8, "spm_steps": 3, "spm_batch": 4})

    @staticmethod
    def variant(name: str) -> dict:
        """The settings of a build variant (``--variant``): ``shipped`` (the defaults) or ``v_prediction``: a base
        predicting v with min-SNR-5 weights on the three-level UNet, conditioned by the contrastive CLIP's frozen
        text tower, trained 2,000 steps, pairs sampled by the rollouts' step op (bf16 where native), an SPM trained
        1,200 steps (with the shipped six kinds of negatives)."""
        if name not in VARIANTS:
            raise ValueError(f"unknown build variant {name!r}; accepted: {', '.join(VARIANTS)}")
        if name == "shipped":
            return {}
        return {"base_steps": 2000, "base_unet": "3level", "base_prediction": "v_prediction",
                "base_loss_weighting": "min_snr", "base_text_encoder": "clip", "sample_dtype": "bf16_if_native",
                "sample_noise": "step_op", "spm_steps": 1200}


PROGRESS = True  # tqdm bars (with the time left) per stage; --no-progress turns them off


def _log(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[toyworld build] {msg}")  # above any active progress bar
    sys.stdout.flush()


def _bar(total: int, desc: str, unit: str):
    """A stage's progress bar (display only: it draws no random numbers and changes no computation)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not PROGRESS, mininterval=1.0)


# ----------------------------------------------------------------------------- stage 1: base model
def write_base_configs(out: Path, cfg: BuildConfig | None = None) -> None:
    """Tokenizer, text-encoder, UNet and scheduler configs of the tiny base model (no weights)."""
    cfg = cfg or BuildConfig()
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    size = write_clip_tokenizer(out / "tokenizer", world.words(), max_length=TEXT_MAX_LEN)
    CLIPTextConfig(vocab_size=size, bos_token_id=size - 2, eos_token_id=size - 1, pad_token_id=size - 1,
                   **TEXT_CONFIG).save_pretrained(out / "text_encoder")
    UNet2DConditionModel.from_config(UNETS[cfg.base_unet]).save_config(out / "unet")
    DDIMScheduler.from_config({**SCHEDULER_CONFIG, "prediction_type": cfg.base_prediction}).save_config(out / "scheduler")


PROBE_PROMPTS = 64  # of world.probe_prompts()


def probe_base(comp, unet, seed: int, n: int = PROBE_PROMPTS, dtype: str = SAMPLER["dtype"],
               noise: str = "step_op", guidance_scale: float = SAMPLER["guidance_scale"]) -> dict:
    """Mean ground truth (and its components) of one sample per probe prompt (``world.probe_prompts``): how good the
    base is so far."""
    prompts = world.probe_prompts()[:n]
    was_training = unet.training
    unet.eval()
    images = sample_images(comp, prompts, seed, batch=len(prompts), unet=unet, dtype=dtype, noise=noise,
                           guidance_scale=guidance_scale)
    unet.train(was_training)
    comps = world.score_components(images, [world.parse_prompt(p) for p in prompts])
    result = {"score": world.score_prompts(images, prompts).mean().item()}
    result.update({k: v.mean().item() for k, v in comps.items()})
    return result


def loss_weight(alpha_bar: torch.Tensor, cfg: BuildConfig) -> torch.Tensor:
    """Per-sample weight of the base model's MSE at cumulative alphas ``alpha_bar``: 1 (``uniform``), or min-SNR-gamma
    (Hang et al. 2023; ``min_snr``): min(SNR, gamma) / SNR for an epsilon loss, min(SNR, gamma) / (SNR + 1) for a
    v loss, so the low-noise steps, whose loss is mostly the unpredictable background texture, do not dominate.

    Why the v-prediction variant predicts v: an epsilon model's estimate of the clean image, x0 = (x_t - sqrt(1 - a)
    eps) / sqrt(a), divides its error by sqrt(a) = 0.006 to 0.03 at t = 999 to 800, where the sampler decides the
    layout; the shipped (epsilon) base gives the sampler amplified noise there, its text barely changes the
    prediction at t >= 700, and half of its samples are empty frames (docs/toy_world.md). A v-model's x0 =
    sqrt(a) x_t - sqrt(1 - a) v is as well conditioned at every t."""
    if cfg.base_loss_weighting == "uniform":
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=cfg.base_min_snr_gamma) / (snr + 1 if cfg.base_prediction == "v_prediction" else snr)


def clip_text_encoder(tokenizer, cfg: BuildConfig, cache: Path | None = None):
    """The text tower of the contrastive CLIP that the spm stage pretrains (``pretrain_clip``, same seed: the same
    weights; ``cache`` as there), as a frozen ``CLIPTextModel``, and the pretraining's record."""
    from transformers import CLIPTextModel

    spm, info = pretrain_clip(tokenizer, cfg, cache)
    text = CLIPTextModel(spm.clip.config.text_config)
    text.load_state_dict(spm.clip.text_model.state_dict())
    return text.eval().requires_grad_(False), info


def train_base(out: Path, cfg: BuildConfig, clip_cache: Path | None = None) -> dict:
    """Train the UNet from scratch on renders (epsilon or v MSE, ``cfg.base_prediction``, weighted by
    ``loss_weight``), with the text encoder of ``cfg.base_text_encoder``; saves ``out`` (diffusers layout).
    ``clip_cache``: where the contrastive CLIP's pretraining is kept for the spm stage (``pretrain_clip``).

    Why the v-prediction variant's text encoder is the contrastive CLIP's, frozen: a text encoder trained from
    scratch with the UNet learns only the words the UNet already uses. Colour, size, shape and background change
    the picture wherever the object is, and their words grow distinct; a position word is useful only once the UNet
    can place an object by it, so its gradient stays near zero, and on a jointly trained base swapping it moves the
    encoder's output by 0.17 of a hidden state's norm (colour: 1.27) and changes the UNet's denoising error by
    under 0.2% at every t (``benchmarks/toy_base_diagnosis.py --parts attribute_swap``, docs/toy_world.md). A
    contrastive CLIP must tell renders that differ only in position apart, so its text tower separates the position
    words from the start, and the UNet learns to follow them (SD, too, conditions on a frozen contrastive CLIP text
    encoder)."""
    write_base_configs(out, cfg)
    torch.manual_seed(cfg.seed)
    comp = load_components(str(out), FAMILY, init="random", seed=cfg.seed)
    unet = comp.unet.train().requires_grad_(True)
    text_info = {"kind": cfg.base_text_encoder}
    if cfg.base_text_encoder == "clip":
        text, text_info["clip_pretrain"] = clip_text_encoder(comp.tokenizers[0], cfg, clip_cache)
        comp.text_encoders[0] = text  # the probes encode with it too
        params = [*unet.parameters()]
    else:
        text = comp.text_encoders[0].train().requires_grad_(True)
        params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.base_lr, weight_decay=1e-4)
    warmup = max(1, cfg.base_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.base_steps) / cfg.base_steps)))
    attrs = world.all_attributes()
    tok = comp.tokenizers[0]
    ids = tok([a.prompt for a in attrs] + [""], padding="max_length", max_length=TEXT_MAX_LEN, truncation=True,
              return_tensors="pt").input_ids
    alphas = comp.scheduler.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, losses, probes = time.perf_counter(), [], []
    bar = _bar(cfg.base_steps, "base model", "step")
    for step in range(cfg.base_steps):
        pick = torch.randint(len(attrs), (cfg.base_batch,), generator=gen)
        images = world.render([attrs[i] for i in pick.tolist()], gen, world.sample_quality(cfg.base_batch, gen))
        drop = torch.rand(cfg.base_batch, generator=gen) < cfg.cond_dropout
        tokens = torch.where(drop[:, None], ids[-1], ids[pick])
        t = torch.randint(0, len(alphas), (cfg.base_batch,), generator=gen)
        noise = torch.randn(images.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * images + (1 - a).sqrt() * noise
        pred = unet(x_t, t, encoder_hidden_states=text(tokens).last_hidden_state).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * images if cfg.base_prediction == "v_prediction" else noise
        loss = (loss_weight(alphas[t], cfg) * (pred - target).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix_str(f"loss {np.mean(losses[-100:]):.4f}", refresh=False)
        bar.update(1)
        if (step + 1) % 100 == 0 or step + 1 == cfg.base_steps:
            _log(f"base step {step + 1}/{cfg.base_steps} loss {np.mean(losses[-100:]):.4f} "
                 f"({time.perf_counter() - t0:.0f} s)")
        if cfg.base_probe_every and ((step + 1) % cfg.base_probe_every == 0 or step + 1 == cfg.base_steps):
            with torch.no_grad():  # its own generator: the training stream is unchanged by probing
                probes.append({"step": step + 1, **probe_base(comp, unet, cfg.seed + 300, cfg.base_probe_prompts,
                                                              cfg.sampling_dtype, cfg.sample_noise,
                                                              cfg.sample_guidance)})
            _log(f"base probe: {jsonio.dumps({k: round(v, 3) for k, v in probes[-1].items()})}")
    bar.close()
    with quiet_loading():  # no "Writing model shards" bar
        unet.save_pretrained(out / "unet")
        text.save_pretrained(out / "text_encoder")
    return {"steps": cfg.base_steps, "final_loss": float(np.mean(losses[-100:])), "probes": probes,
            "seconds": time.perf_counter() - t0,
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "text_encoder_params": sum(p.numel() for p in text.parameters()), "text_encoder": text_info}


# ----------------------------------------------------------------------------- stage 2: pairs
def jpeg_bytes(image: torch.Tensor, quality: int = 95) -> bytes:
    """(3, H, W) in [-1, 1] -> JPEG bytes."""
    from PIL import Image

    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: no chroma blur at 24 px
    return buf.getvalue()


def _ddim_torch_noise(unet, schedule: DDIMSchedule, cond, uncond, x: torch.Tensor, guidance_scale: float,
                      eta: float, gen: torch.Generator) -> torch.Tensor:
    """DDIM from x, each step's mean and std from ``ddim_step_stats`` (fp32) and its noise from torch.randn on
    ``gen``: the sampler the shipped pairs were made with, before the step op drew its own noise."""
    for t_scalar in schedule.timesteps:
        t = t_scalar.expand(x.shape[0])
        _, mean, std = ddim_step_stats(schedule, cfg_model_output(unet, x, t, cond, uncond, guidance_scale), x, t, eta)
        z = torch.randn(mean.shape, generator=gen, dtype=mean.dtype)
        x = mean + std.view(-1, *([1] * (mean.dim() - 1))) * z
    return x


@torch.no_grad()
def sample_batch(comp, prompts: list[str], gen_seed: int, num_steps: int = SAMPLER["num_steps"],
                 eta: float = SAMPLER["eta"], guidance_scale: float = SAMPLER["guidance_scale"], unet=None,
                 dtype: str = SAMPLER["dtype"], noise: str = "step_op") -> torch.Tensor:
    """One sample per prompt of one batch, (N, 3, R, R) in [-1, 1], every draw from one generator seeded
    ``gen_seed``. ``dtype``: fp32, or bf16 autocast (the toy recipes' rollouts); ``noise``: a SAMPLE_NOISE."""
    from spo_fast.diffusion.models import decode_latents

    unet = unet if unet is not None else comp.unet
    schedule = DDIMSchedule.from_scheduler(comp.scheduler, num_steps)
    gen = torch.Generator().manual_seed(gen_seed)
    cond = encode_prompts(comp, prompts, "cpu", world.RESOLUTION)
    uncond = encode_prompts(comp, [""] * len(prompts), "cpu", world.RESOLUTION)
    x = torch.randn((len(prompts), *comp.latent_shape), generator=gen)
    run = _ddim_torch_noise if noise == "torch" else sample
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        return decode_latents(comp, run(unet, schedule, cond, uncond, x, guidance_scale, eta, gen)).float()


def sample_images(comp, prompts: list[str], seed: int, batch: int, num_steps: int = SAMPLER["num_steps"],
                  eta: float = SAMPLER["eta"], guidance_scale: float = SAMPLER["guidance_scale"],
                  unet=None, bar=None, dtype: str = SAMPLER["dtype"], noise: str = "step_op") -> torch.Tensor:
    """One sample per prompt, (N, 3, R, R) in [-1, 1]; prompts[i] is in batch i // batch, whose generator is seeded
    seed * 1,000,003 + its first index. ``bar``: a progress bar advanced once per batch; the rest as sample_batch."""
    out = []
    for start in range(0, len(prompts), batch):
        out.append(sample_batch(comp, prompts[start:start + batch], seed * 1_000_003 + start, num_steps, eta,
                                guidance_scale, unet, dtype, noise))
        if bar is not None:
            bar.update(1)
    return torch.cat(out)


def decode_jpeg(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes -> (3, H, W) float in [-1, 1]."""
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


TIE_MARGIN = 0.05  # ground-truth scores closer than this (on the 0-10 scale) are a tie


def make_pairs(comp, prompts: list[str], seed: int, batch: int, split_name: str, bar=None,
               dtype: str = SAMPLER["dtype"], noise: str = "step_op",
               guidance_scale: float = SAMPLER["guidance_scale"]) -> dict[str, list]:
    """Two samples per prompt, labelled by the ground truth of their stored JPEGs (Pick-a-Pic schema)."""
    imgs0, imgs1 = (sample_images(comp, prompts, s, batch, bar=bar, dtype=dtype, noise=noise,
                                  guidance_scale=guidance_scale) for s in (seed, seed + 1))
    jpg0, jpg1 = [jpeg_bytes(x) for x in imgs0], [jpeg_bytes(x) for x in imgs1]
    s0 = world.score_prompts(torch.stack([decode_jpeg(b) for b in jpg0]), prompts)
    s1 = world.score_prompts(torch.stack([decode_jpeg(b) for b in jpg1]), prompts)
    label0 = torch.where((s0 - s1).abs() < TIE_MARGIN, 0.5, (s0 > s1).float())
    return {"caption": prompts, "jpg_0": jpg0, "jpg_1": jpg1, "label_0": label0.tolist(),
            "label_1": (1 - label0).tolist(), "score_0": s0.tolist(), "score_1": s1.tolist(),
            "split": [split_name] * len(prompts)}


def write_parquet(columns: dict[str, list], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64()), ("score_0", pa.float64()),
                        ("score_1", pa.float64()), ("split", pa.string())])
    pq.write_table(pa.table(columns, schema=schema), path)


def build_pairs(out: Path, cfg: BuildConfig) -> dict:
    comp = load_components(str(out / "base"), FAMILY)
    t0 = time.perf_counter()
    train_prompts = [p for p in world.prompts("train") for _ in range(cfg.pairs_per_train_prompt)]
    held = world.prompts("heldout")
    held = held[:cfg.heldout_pair_prompts] if cfg.heldout_pair_prompts else held
    info = {}
    for name, prompts, seed in (("train", train_prompts, cfg.seed + 100), ("heldout", held, cfg.seed + 200)):
        if not prompts:
            prompts = world.prompts(name)[:2]  # smoke mode: keep the file non-empty
        with _bar(2 * -(-len(prompts) // cfg.sample_batch), f"pairs {name}", "batch") as bar:
            cols = make_pairs(comp, prompts, seed, cfg.sample_batch, name, bar=bar, dtype=cfg.sampling_dtype,
                              noise=cfg.sample_noise, guidance_scale=cfg.sample_guidance)
        write_parquet(cols, out / f"pairs_{name}.parquet")
        s = torch.tensor(cols["score_0"] + cols["score_1"])
        lab = torch.tensor(cols["label_0"])
        info[name] = {"pairs": len(prompts), "ties": int((lab == 0.5).sum()), "gt_score_mean": s.mean().item(),
                      "gt_score_std": s.std().item() if len(s) > 1 else 0.0}
        _log(f"pairs {name}: {info[name]} ({time.perf_counter() - t0:.0f} s)")
    info["seconds"] = time.perf_counter() - t0
    return info


# ----------------------------------------------------------------------------- stage 3: SPM
def _clip_cache_key(cfg: BuildConfig, width: int, lr: float) -> dict:
    """What the contrastive CLIP's pretrained weights depend on: its settings (``width`` and ``lr`` as trained),
    torch and its thread count, and the code (the world's renders, the SPM's architecture, the pretraining loop), by
    hash."""
    import hashlib
    import inspect

    from spo_fast.reward import spm as spm_module

    code = hashlib.sha256()
    for source in (inspect.getsource(world), inspect.getsource(spm_module), inspect.getsource(pretrain_clip)):
        code.update(source.encode())
    return {"seed": cfg.seed, "width": width, "clip_steps": cfg.clip_steps, "clip_batch": cfg.clip_batch, "clip_lr": lr,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "code_sha256": code.hexdigest()}


def _contrastive_update(clip, opt, loss: torch.Tensor) -> float:
    """One optimizer step of ``clip`` on its contrastive ``loss``, the logit scale kept in [1, 100] as CLIP keeps
    it; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        clip.logit_scale.clamp_(0, math.log(100))
    return loss.item()


def _clip_progress(bar, what: str, step: int, steps: int, t0: float, losses: list, accs: list | None = None) -> None:
    """The bar's postfix (running loss, and top-1 accuracy when given) and, every 100 steps and at the last, a log
    line."""
    shown = f"loss {np.mean(losses[-100:]):.3f}" + (f" top1 {np.mean(accs[-100:]):.3f}" if accs else "")
    bar.set_postfix_str(shown, refresh=False)
    bar.update(1)
    if (step + 1) % 100 == 0 or step + 1 == steps:
        _log(f"{what} step {step + 1}/{steps} {shown} ({time.perf_counter() - t0:.0f} s)")


def pretrain_clip(tokenizer, cfg: BuildConfig, cache: Path | None = None, width: int = CLIP_WIDTH,
                  lr: float | None = None):
    """Tiny CLIP of hidden and projection size ``width``, contrastive on rendered (image, caption) pairs of mixed
    quality at ``lr`` (None: ``cfg.clip_lr``): the backbone.

    ``cache`` (a directory, or None): the weights are saved there after training (``clip.safetensors``, with
    ``clip.json``: ``_clip_cache_key`` and the record), and a later call whose key matches loads them instead of
    training again (the record then says ``reused``). A build on the ``clip`` text encoder pretrains in its base
    stage and reuses that in its spm stage: the same weights, once."""
    from safetensors.torch import load_file, save_file

    from spo_fast.reward.spm import StepAwarePreferenceModel

    lr = cfg.clip_lr if lr is None else lr
    spm = StepAwarePreferenceModel.tiny(tokenizer, image_size=world.RESOLUTION, hidden=width, projection_dim=width,
                                        max_text_len=TEXT_MAX_LEN, seed=cfg.seed)
    key = _clip_cache_key(cfg, width, lr) if cache is not None else None
    if cache is not None and (cache / "clip.json").is_file():
        saved = json.loads((cache / "clip.json").read_text())
        if saved.get("key") == key:
            spm.clip.load_state_dict(load_file(cache / "clip.safetensors"))
            _log(f"CLIP pretraining: reusing {cache} (same settings, torch, threads and code)")
            spm.clip.eval()  # as after training
            return spm, {**saved["record"], "reused": str(cache)}
        _log(f"CLIP pretraining: {cache} was made with other settings or code; training again")
    clip = spm.clip.train()
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=1e-4)
    attrs = world.all_attributes()
    ids = tokenizer([a.prompt for a in attrs], padding="max_length", max_length=TEXT_MAX_LEN, truncation=True,
                    return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    t0, losses, accs = time.perf_counter(), [], []
    bar = _bar(cfg.clip_steps, "CLIP pretraining", "step")
    for step in range(cfg.clip_steps):
        pick = torch.randperm(len(attrs), generator=gen)[:cfg.clip_batch]
        images = world.render([attrs[i] for i in pick.tolist()], gen, world.sample_quality(len(pick), gen))
        img = spm.image_features(spm.preprocess(images))  # timesteps=None: plain CLIP, normalised
        txt = spm.text_features(ids[pick])
        logits = clip.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(pick))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        losses.append(_contrastive_update(clip, opt, loss))
        accs.append((logits.argmax(1) == target).float().mean().item())
        _clip_progress(bar, "clip", step, cfg.clip_steps, t0, losses, accs)
    bar.close()
    clip.eval()
    record = {"steps": cfg.clip_steps, "width": width, "lr": lr, "final_loss": float(np.mean(losses[-100:])),
              "final_top1": float(np.mean(accs[-100:])), "seconds": time.perf_counter() - t0}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, cache / "clip.safetensors")
        (cache / "clip.json").write_text(jsonio.dumps({"key": key, "record": record}, indent=1) + "\n")
    return spm, record


def rendered_pairs(n: int, gen: torch.Generator, kinds: tuple[str, ...] = SHIPPED_NEGATIVES):
    """Labelled pairs of *rendered* images (train-split prompts): a render against a hard negative.

    The negative is, at random (each of ``kinds``, a subset of NEGATIVE_KINDS, equally often): the same prompt with one attribute changed,
    another render of different quality, the image flooded towards the object colour (partly or
    fully), the background alone with noise, the same render speckled (independent per-pixel
    noise over the whole frame, std 0.05-0.4 in [-1, 1] units: the high-frequency texture an SPO
    run on an SPM trained without it learned to add), or the same render recoloured (per-channel
    gain 0.7-1.3 and offset +-0.15, then saturation boosted 1-2x: the tinted backgrounds and
    over-saturated, shifted object colours an SPO run on an SPM trained without it drifted into), or the same
    prompt drifted: its object's colour moved partly towards another, or its size or shape changed, at higher
    quality (``_drifted``), or nudged: the same picture (one layout) with its quality moved a little (``_nudged``;
    the positive side of those rows is then re-rendered with that layout).
    Both sides are labelled by the ground truth like the sampled pairs; the order is random. This teaches the SPM the failure modes a policy
    drifts into (speckle, blobs of colour, empty frames) that base-model samples alone rarely show it.
    """
    attrs, quality, good = _train_renders(n, gen)
    kind = torch.randint(len(kinds), (n,), generator=gen)  # an index into kinds
    other = []
    fields = ("color", "shape", "size", "position", "background")
    choices = {"color": world.COLORS, "shape": world.SHAPES, "size": world.SIZES, "position": world.POSITIONS,
               "background": world.BACKGROUNDS}
    for a in attrs:
        f = fields[int(torch.randint(len(fields), (1,), generator=gen))]
        vals = [v for v in choices[f] if v != getattr(a, f)]
        other.append(replace(a, **{f: vals[int(torch.randint(len(vals), (1,), generator=gen))]}))
    mismatched = world.render(other, gen, world.sample_quality(n, gen))
    requality = world.render(attrs, gen, world.sample_quality(n, gen))
    colour = torch.tensor([world.COLOR_RGB[a.color] for a in attrs]).view(n, 3, 1, 1) * 2 - 1
    bg = torch.tensor([world.BACKGROUND_RGB[a.background] for a in attrs]).view(n, 3, 1, 1) * 2 - 1
    amount = torch.rand(n, 1, 1, 1, generator=gen) * 0.7 + 0.3
    noise = torch.randn(good.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.3
    flood = (good * (1 - amount) + colour * amount + noise).clamp(-1, 1)
    empty = (bg.expand_as(good) + noise).clamp(-1, 1)
    candidates = {"mismatched": mismatched, "requality": requality, "flooded": flood, "empty": empty}
    if "speckled" in kinds:  # drawn only when used: the first four kinds alone keep their random stream
        speckle_std = torch.rand(n, 1, 1, 1, generator=gen) * 0.35 + 0.05
        candidates["speckled"] = (good + torch.randn(good.shape, generator=gen) * speckle_std).clamp(-1, 1)
    if "recoloured" in kinds:
        x = (good + 1) / 2
        gain = 1 + (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * 0.3
        offset = (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * 0.15
        x = x * gain + offset
        grey = x.mean(1, keepdim=True)
        x = grey + (1 + torch.rand(n, 1, 1, 1, generator=gen)) * (x - grey)
        candidates["recoloured"] = x.clamp(0, 1) * 2 - 1
    if "drifted" in kinds:
        candidates["drifted"] = _drifted(attrs, quality, gen)
    if "nudged" in kinds:
        kept, candidates["nudged"] = _nudged(attrs, quality, gen)
        good = torch.where((kind == kinds.index("nudged")).view(n, 1, 1, 1), kept, good)
    neg = torch.stack([candidates[k] for k in kinds])[kind, torch.arange(n)]
    swap = torch.rand(n, generator=gen) < 0.5
    img0 = torch.where(swap.view(n, 1, 1, 1), neg, good)
    img1 = torch.where(swap.view(n, 1, 1, 1), good, neg)
    s0, s1 = world.score(img0, attrs), world.score(img1, attrs)
    label0 = torch.where((s0 - s1).abs() < TIE_MARGIN, 0.5, (s0 > s1).float())
    return [a.prompt for a in attrs], img0, img1, label0


def _drifted(attrs: list, quality: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The ``drifted`` negatives of ``rendered_pairs``: each prompt's render with its object's colour moved part of the
    way (a fraction uniform in [0.3, 1]) towards another named colour, or its size or its shape changed (each of the
    three equally often), and every quality field raised part of the way to 1 (a fraction uniform in [0, 1]): the
    vivid, crisp pictures whose named attributes drift that an SPO run optimising an SPM trained without them moved
    to. The partial colour is exact: the two colours are rendered with one layout (one generator state) and
    blended (a render is linear in its object colour but for the clamp to [0, 1])."""
    n = len(attrs)
    higher = quality + (1 - quality) * torch.rand(n, 1, generator=gen)
    field = torch.randint(3, (n,), generator=gen)
    amount = torch.rand(n, 1, 1, 1, generator=gen) * 0.7 + 0.3
    moved = []
    for a, f in zip(attrs, field.tolist()):
        name = ("color", "size", "shape")[f]
        vals = [v for v in FIELD_VALUES[name] if v != getattr(a, name)]
        moved.append(replace(a, **{name: vals[int(torch.randint(len(vals), (1,), generator=gen))]}))
    state = gen.get_state()
    kept = world.render(attrs, gen, higher)
    layout = torch.Generator().set_state(state)
    changed = world.render(moved, layout, higher)
    blend = torch.where((field == 0).view(n, 1, 1, 1), amount, torch.ones(()))
    return kept + blend * (changed - kept)


NUDGE_STD = 0.1  # the sd of each quality field's nudge (``_nudged``)


def _nudged(attrs: list, quality: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``nudged`` pairs of ``rendered_pairs``: each prompt rendered twice with one layout (one generator state),
    at its quality and at that quality with every field moved by a normal draw of sd ``NUDGE_STD`` (clamped to
    [0, 1]). Two candidates of one SPO pool differ about this little (ground-truth ranges of 0.2 to 0.4 points in a
    pool at the steps SPO judges; the sampled pairs by 0.74 on average: docs/toy_world.md). An SPM trained with
    them ranked such pairs no better there (0.73 against 0.71 without them)."""
    nudged = (quality + torch.randn(quality.shape, generator=gen) * NUDGE_STD).clamp(0, 1)
    state = gen.get_state()
    kept = world.render(attrs, gen, quality)
    return kept, world.render(attrs, torch.Generator().set_state(state), nudged)


def _train_renders(n: int, gen: torch.Generator):
    """``n`` train-split attributes drawn at random, their random picture quality (n, Q) and their renders."""
    train = world.split("train")
    attrs = [train[i] for i in torch.randint(len(train), (n,), generator=gen).tolist()]
    quality = world.sample_quality(n, gen)
    return attrs, quality, world.render(attrs, gen, quality)


def captioned_renders(n: int, gen: torch.Generator, field: str | None = None) -> tuple[list[str], torch.Tensor]:
    """``n`` captioned renders of train-split prompts at random picture quality (as the CLIP was pretrained), for
    the SPM's contrastive losses. ``field`` None: ``_train_renders``. A field (FIELD_VALUES): the first
    ``n // 2`` are groups, each a random train-split attribute set with ``field`` set to every value whose caption
    is in the train split (the last group cut to fit), so that a caption's negatives in the batch differ from it
    only there; the rest as with None. "any": each group's field drawn uniformly from FIELD_VALUES."""
    if field is None:
        attrs, _, images = _train_renders(n, gen)
        return [a.prompt for a in attrs], images
    train = world.split("train")
    allowed = set(train)
    grouped: list = []
    while len(grouped) < n // 2:
        seed = train[int(torch.randint(len(train), (1,), generator=gen))]
        name = field
        if field == "any":
            name = tuple(FIELD_VALUES)[int(torch.randint(len(FIELD_VALUES), (1,), generator=gen))]
        group = [g for g in (replace(seed, **{name: v}) for v in FIELD_VALUES[name]) if g in allowed]
        grouped += group[:n // 2 - len(grouped)]
    quality = world.sample_quality(len(grouped), gen)
    rest, rest_images = captioned_renders(n - len(grouped), gen)
    return [a.prompt for a in grouped] + rest, torch.cat([world.render(grouped, gen, quality), rest_images])


def sharpen_clip(spm, tokenizer, cfg: BuildConfig) -> dict:
    """Continue ``spm``'s pretrained CLIP (in place) for ``cfg.spm_clip_steps`` contrastive steps on
    ``cfg.clip_batch`` train-split ``captioned_renders`` grouped by ``cfg.spm_clip_field``, at ``cfg.spm_clip_rate``
    (``spm_trainer.anchor_loss`` at t = None: plain CLIP, as pretrained). Returns the record."""
    from spo_fast.reward.spm_trainer import anchor_loss

    clip = spm.clip.train()
    lr = cfg.spm_clip_rate
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    t0, losses = time.perf_counter(), []
    bar = _bar(cfg.spm_clip_steps, f"CLIP sharpening ({cfg.spm_clip_field or 'no'} groups)", "step")
    for step in range(cfg.spm_clip_steps):
        captions, images = captioned_renders(cfg.clip_batch, gen, cfg.spm_clip_field)
        loss = anchor_loss(spm, tokenizer, captions, images, None)
        losses.append(_contrastive_update(clip, opt, loss))
        _clip_progress(bar, "clip sharpening", step, cfg.spm_clip_steps, t0, losses)
    bar.close()
    clip.eval()
    return {"steps": cfg.spm_clip_steps, "field": cfg.spm_clip_field, "lr": lr,
            "final_loss": float(np.mean(losses[-100:])) if losses else None, "seconds": time.perf_counter() - t0}


def build_spm(out: Path, cfg: BuildConfig, clip_cache: Path | None = None) -> dict:
    from transformers import CLIPTokenizer

    from spo_fast.reward.spm_trainer import SPMTrainConfig, train_spm

    tokenizer = CLIPTokenizer.from_pretrained(out / "base" / "tokenizer")
    own = (cfg.spm_width, cfg.spm_clip_rate) != (CLIP_WIDTH, cfg.clip_lr)  # not the base's text tower
    if clip_cache is not None and own:
        clip_cache = clip_cache.with_name(SPM_CLIP_CACHE)
    spm, clip_info = pretrain_clip(tokenizer, cfg, clip_cache, cfg.spm_width, cfg.spm_clip_rate)
    sharpened = sharpen_clip(spm, tokenizer, cfg) if cfg.spm_clip_steps else None
    comp = load_components(str(out / "base"), FAMILY)
    tcfg = SPMTrainConfig(steps=cfg.spm_steps, batch_size=cfg.spm_batch, lr=cfg.spm_lr, seed=cfg.seed,
                          guidance_scale=cfg.sample_guidance, extra_fraction=cfg.spm_rendered_fraction,
                          anchor_weight=cfg.spm_anchor_weight, sampling_dtype=cfg.sampling_dtype)
    result = train_spm(spm, tokenizer, comp, out / "pairs_train.parquet", out / "pairs_heldout.parquet",
                       out / "spm", tcfg, extra_pairs=functools.partial(rendered_pairs, kinds=cfg.spm_negatives),
                       progress=PROGRESS, anchor_images=functools.partial(captioned_renders, field=cfg.spm_clip_field))
    return {"clip_pretrain": clip_info, **({"clip_sharpening": sharpened} if sharpened else {}), **result}


# ----------------------------------------------------------------------------- driver
STAGES = ("base", "pairs", "spm")
CLIP_CACHE = "clip_pretrain"  # under --out: the contrastive CLIP's pretrained weights, made once per build
SPM_CLIP_CACHE = "clip_pretrain_spm"  # under --out: the SPM's own CLIP (BuildConfig.spm_width / spm_clip_lr)


def build(out: Path, cfg: BuildConfig, stages: tuple[str, ...] = STAGES) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    meta_file = out / "build.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta.update(config=asdict(cfg), torch=torch.__version__, threads=torch.get_num_threads(),
                sampling_dtype=cfg.sampling_dtype)
    # only a build whose base reads the CLIP's text tower pretrains it twice; the shipped assets keep no copy
    clip_cache = out / CLIP_CACHE if cfg.base_text_encoder == "clip" else None
    for stage in stages:
        _log(f"stage {stage} -> {out}")
        if stage == "base":
            meta["base"] = train_base(out / "base", cfg, clip_cache)
        elif stage == "pairs":
            meta["pairs"] = build_pairs(out, cfg)
        elif stage == "spm":
            meta["spm"] = build_spm(out, cfg, clip_cache)
        meta_file.write_text(jsonio.dumps(meta, indent=1) + "\n")
    return meta


def check_inputs(out: Path, stages: tuple[str, ...]) -> None:
    """Before anything is trained: ``out`` can be created and written, and a stage run without the stages before
    it finds their outputs there (``pairs`` and ``spm`` need ``base/``, ``spm`` needs the two pairs files, schema,
    labels and images checked). Raises InputError naming the option, file or directory."""
    from spo_fast.core.errors import InputError, check_writable_dir
    from spo_fast.data.pairs import load_all
    from spo_fast.diffusion.models import check_model_dir

    check_writable_dir(out, "--out")
    needs = {"pairs": ("base",), "spm": ("base", "pairs")}
    for stage in stages:
        for before in needs.get(stage, ()):
            if before in stages:
                continue
            needed = out / "base" if before == "base" else out / "pairs_train.parquet"
            if not needed.exists():
                raise InputError(f"--stages {','.join(stages)}: stage {stage} needs {needed}, the {before} stage's "
                                 f"output, which does not exist; add {before} to --stages, or give the --out of an "
                                 "earlier build")
            try:
                if before == "base":
                    check_model_dir(out / "base", FAMILY, "pretrained")
                else:
                    for name in ("train", "heldout"):
                        load_all(str(out / f"pairs_{name}.parquet")).check_images()
            except InputError as e:
                raise InputError(f"--stages {','.join(stages)}: stage {stage} needs the {before} stage's output in "
                                 f"{out}, which is unusable: {e} (add {before} to --stages to rebuild it)") from e


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, check the inputs, build. Bad input: one line ``error: ...`` on stderr, exit code 2."""
    from spo_fast.core.errors import ArgumentParser, InputError, number_arg, report

    seed = number_arg(int, 0)
    parser = ArgumentParser(prog="python -m spo_fast.toyworld",
                            description="Toy world: rebuild the shipped base model, pairs and SPM.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the base model, sample labelled pairs, train the SPM")
    b.add_argument("--out", type=Path, default=None, help="output dir (default: the packaged assets dir)")
    b.add_argument("--smoke", action="store_true", help="tiny step counts (seconds; for tests)")
    b.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    b.add_argument("--seed", type=seed, default=0, help="(default 0; >= 0)")
    b.add_argument("--variant", choices=VARIANTS, default="shipped",
                   help="shipped (default: the packaged assets' settings) or v_prediction (a base that follows its "
                        "prompts, not shipped: docs/toy_world.md)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars (the [toyworld build] lines stay)")
    args = parser.parse_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        b.error(f"--stages: unknown stage(s) {', '.join(bad)}; accepted: {', '.join(STAGES)}")
    if not stages:
        b.error(f"--stages {args.stages!r} names no stage; accepted: a comma-separated subset of {','.join(STAGES)}")
    if args.smoke and args.out is None:
        b.error("--smoke needs --out (it must not overwrite the shipped weights)")
    stages = tuple(s for s in STAGES if s in stages)  # in build order, once each
    variant = BuildConfig.variant(args.variant)
    cfg = BuildConfig.smoke(**variant) if args.smoke else BuildConfig(**variant)
    cfg = replace(cfg, seed=args.seed)
    if args.variant != "shipped" and args.out is None:
        b.error(f"--variant {args.variant} needs --out (the packaged assets are the shipped variant's)")
    out = (args.out or toyworld_assets()).expanduser()
    global PROGRESS
    PROGRESS = not args.no_progress
    try:
        check_inputs(out, stages)
        meta = build(out, cfg, stages)
    except InputError as e:
        return report(e)
    _log(f"done: {jsonio.dumps({k: v for k, v in meta.items() if k != 'config'}, default=str)[:2000]}")
    return 0
