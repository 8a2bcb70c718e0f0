"""Diffusion-DPO (Wallace et al. 2023) as a method of the trainer core (``spo_fast.core.trainer``): the baseline SPO is
compared with, on the same models, the same CLI, outputs, checkpoints and LoRA export.

Per iteration: ``train.batch_size`` preference pairs per process (``data.pairs``, Pick-a-Pic schema, read by
``spo_fast.data.pairs``; the batch is a pure function of (seed, iteration, rank), so resuming replays nothing),
their latents and caption embeddings from the on-disk cache (``data.cache_dir``, ``spo_fast.data.cache``) or
encoded on the fly, captions replaced by the empty prompt with probability ``dpo.empty_prompt_prob`` (the official
0.2), one t ~ U[0, T) and one noise per pair SHARED by winner and loser; split into micro-batches of
``train.train_batch_size`` pairs.

Per micro-batch: winner and loser noised to x_t, one policy forward and one reference forward (LoRA adapters
disabled, or the frozen copy for full fine-tuning) over both sides (a batch of 2n), no classifier-free guidance
(the official training), and the loss through the fused kernel's DPO mode (``spo_fast.kernels.spo_loss.dpo_loss``):

    mse_* = mean_CHW (pred - target)^2      (target: the noise; the velocity for v-prediction models)
    L = -log sigmoid(-beta/2 * ((mse_pol_w - mse_ref_w) - (mse_pol_l - mse_ref_l))),   beta = dpo.beta (5000)

Decisions: the cached latents are the VAE posterior's mean (the official script samples the posterior at every
step; a cache fixes one draw, so we use the mean), and there is no random horizontal flip (the official default
flips; a flip of cached latents is not a flip of the image). A dropped caption is the empty prompt "" encoded
through the text encoder(s), as the official training script does, on SDXL too (not the zeros that SDXL's
pipeline and SPO use for an empty *negative* prompt: on the tests' tiny SDXL the two differ by up to 1.57 in the
embeddings, ``tests/test_dpo.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spo_fast.core.config import Config
from spo_fast.core.profiling import stage
from spo_fast.core.trainer import MicroBatch, Setup, Work, kernel_backend, reference_unet
from spo_fast.data.cache import LatentCache, cache_key, encoders_for
from spo_fast.data.pairs import PairDataset, PairsError
from spo_fast.diffusion.models import (
    Conditioning,
    encode_images,
    encode_negative,
    encode_prompts,
    native_resolution,
    resolve_model_path,
    unet_forward,
)
from spo_fast.kernels.spo_loss import dpo_loss
from spo_fast.reward.scorers import build_scorer


@dataclass
class PairMicroBatch:
    """n pairs: clean latents of the winner and the loser, their conditioning, the shared noise and timestep."""

    latents_win: torch.Tensor  # (n, C, h, w)
    latents_lose: torch.Tensor  # (n, C, h, w)
    cond: Conditioning  # n rows
    noise: torch.Tensor  # (n, C, h, w), shared by winner and loser
    t: torch.Tensor  # (n,) long, shared
    weight: torch.Tensor  # (n,) 1 for a usable pair, 0 for a skipped bad row or padding


def iteration_cost(micro_sizes: list[int], gradient_checkpointing: bool = False) -> dict[str, int]:
    """The compute of one Diffusion-DPO iteration on one process (``Work.stats``, so ``metrics.jsonl``):
    ``unet_fwd_eq``, UNet forward-equivalents (one UNet forward of one sample = 1, a backward = two forwards).

    Per micro-batch of n pairs (``micro_sizes``: the micro-batches the trainer runs; one made only of skipped bad
    rows is not run): the winners and losers (2n) through one reference forward and one policy forward, without
    classifier-free guidance, and the policy's backward -> 2n + 2n + 2 * 2n = 8n (gradient checkpointing: + 2n, the
    recomputed forward). Not counted: producing the pairs (offline; ``spo_fast.compare`` reports it separately),
    the VAE and text encoders (no cache: the images and captions are encoded every iteration), and the padding
    micro-batches the trainer adds when processes hold different numbers (several processes)."""
    per_pair = 8 + (2 if gradient_checkpointing else 0)
    return {"unet_fwd_eq": per_pair * sum(micro_sizes)}


class DiffusionDPO:
    """Diffusion-DPO (see the module docstring)."""

    name = "DPO"

    def __init__(self):
        self.scorer = None
        self.cache = None

    # -- checks and setup
    def preflight(self, cfg: Config) -> None:
        """The pairs' schema and labels (every shard), and with data.check_images and no cache every image."""
        self.ds = PairDataset(cfg.data.pairs, ties=cfg.data.ties, bad_rows=cfg.data.bad_rows)
        if len(self.ds) < cfg.train.batch_size:
            raise PairsError(f"data.pairs={cfg.data.pairs!r} has {len(self.ds)} usable pairs, fewer than "
                             f"train.batch_size={cfg.train.batch_size}; lower the batch size or add pairs")
        if cfg.data.check_images and not cfg.data.cache_dir:
            res = cfg.model.resolution or native_resolution(resolve_model_path(cfg.model.path))[0]
            self.ds.verify(res, progress=cfg.log.progress)

    def setup(self, cfg: Config, s: Setup, accelerator) -> None:
        self.cfg, self.s, self.acc = cfg, s, accelerator
        dev = accelerator.device
        if cfg.scorer.name != "none":
            self.scorer = build_scorer(cfg.scorer, dev)
        self.alphas = s.comp.scheduler.alphas_cumprod.to(dev, torch.float32)
        self.num_train_timesteps = s.comp.scheduler.config.num_train_timesteps
        # the official dropped caption: "" through the text encoder(s), not SDXL's zero negative prompt
        self.empty = encode_negative(s.comp, "", 1, dev, s.resolution, zeros_for_empty=False)
        if cfg.data.cache_dir:
            model_id, enc_images, enc_text = encoders_for(s.comp, cfg.model.path, s.resolution, dev)
            # the encoders see one micro-batch of pairs at a time (SDXL at 1024 px: memory)
            self.cache = LatentCache.open(cfg.data.cache_dir, cache_key(model_id, s.resolution, self.ds), self.ds,
                                          enc_images, enc_text, batch_size=cfg.train.train_batch_size,
                                          progress=cfg.log.progress and accelerator.is_main_process,
                                          world_size=accelerator.num_processes, rank=accelerator.process_index,
                                          barrier=accelerator.wait_for_everyone)
            self.ds.shuffle = "global"  # random access into the cache is cheap: mix the whole dataset per batch

    def epoch_iterations(self, cfg: Config, world_size: int) -> int:
        return self.ds.iterations_for(cfg.train.epochs, cfg.train.batch_size, world_size)

    def grid_prompts(self, n: int) -> list[str]:
        """``n`` captions of the first ``4 n`` pairs that cover their words (``grids.covering``), for the sample
        grid (a pool of the first pairs, not the dataset: loading a pair decodes its images)."""
        from spo_fast.evaluation.grids import covering

        captions = self.ds.load(list(range(min(4 * n, len(self.ds)))), self.s.resolution).captions
        return [captions[i] for i in covering(captions, n)]

    # -- one iteration
    def _batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, Conditioning, torch.Tensor]:
        """Latents of winners and losers (n, C, h, w), their conditioning (on the device) and the usable mask (n,)
        on the host (counting valid pairs reads no device memory)."""
        s, dev = self.s, self.acc.device
        if self.cache is not None:
            cb = self.cache.load(indices)
            text = {k: v.to(dev, s.weight_dtype) for k, v in cb.text.items()}
            cond = Conditioning(text["embeds"], text.get("pooled"),
                                None if "pooled" not in text else self.empty.time_ids.expand(len(indices), -1))
            return cb.latents_win.to(dev), cb.latents_lose.to(dev), cond, cb.ok
        m = self.cfg.train.train_batch_size
        lw, ll, conds, ok = [], [], [], []
        with torch.no_grad():  # one micro-batch of images decoded and encoded at a time (memory at 1024 px)
            for i in range(0, len(indices), m):
                pb = self.ds.load(indices[i:i + m], s.resolution)
                lw.append(encode_images(s.comp, pb.win.to(dev)))
                ll.append(encode_images(s.comp, pb.lose.to(dev)))
                conds.append(encode_prompts(s.comp, pb.captions, dev, s.resolution))
                ok.append(pb.ok)
        return torch.cat(lw), torch.cat(ll), Conditioning.cat(conds), torch.cat(ok)

    def work(self, it: int) -> Work:
        cfg = self.cfg
        indices = self.ds.batch_indices(it, cfg.train.batch_size, self.acc.num_processes, self.acc.process_index,
                                        cfg.train.seed)
        return self._work(it, *self._batch(indices))

    def synthetic_work(self, it: int) -> Work:
        """What ``work`` hands the trainer, from random latents and the empty caption instead of a dataset: the same
        shapes and the same steps after loading (the estimator and the end-to-end benchmarks run this)."""
        n, dev = self.cfg.train.batch_size, self.acc.device
        gen = torch.Generator(device=dev).manual_seed(1000 + it)
        lw, ll = (torch.randn((n, *self.s.latent_shape), generator=gen, device=dev) for _ in range(2))
        return self._work(it, lw, ll, self.empty.repeat_interleave(n), torch.ones(n, dtype=torch.bool))

    def _work(self, it: int, lw: torch.Tensor, ll: torch.Tensor, cond: Conditioning, ok: torch.Tensor) -> Work:
        """Caption dropout, shared noise and t per pair, micro-batches of ``train.train_batch_size`` pairs."""
        cfg, dev = self.cfg, self.acc.device
        n = len(lw)
        gen = torch.Generator(device=dev).manual_seed((cfg.train.seed * 1_000_003 + it) * 4099 + self.acc.process_index)
        drop = torch.rand(n, generator=gen, device=dev) < cfg.dpo.empty_prompt_prob
        cond = Conditioning(*(None if v is None else torch.where(drop.view(-1, *[1] * (v.dim() - 1)), e.to(v.dtype), v)
                              for v, e in ((cond.embeds, self.empty.embeds), (cond.pooled, self.empty.pooled))),
                            cond.time_ids)  # the time ids do not depend on the prompt
        noise = torch.randn(lw.shape, generator=gen, device=dev)
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=gen, device=dev)
        weight = ok.float().to(dev)
        micro, m = [], cfg.train.train_batch_size
        for i in range(0, n, m):
            part = slice(i, i + m)
            batch = PairMicroBatch(lw[part], ll[part], cond[part], noise[part], t[part], weight[part])
            if i == 0:
                self.last = batch  # the shape padding() copies
            n_valid = int(ok[part].sum())
            if n_valid:  # a micro-batch of skipped bad rows only trains nothing
                micro.append(MicroBatch(batch, n_valid))
        stats = iteration_cost([len(mb.data.t) for mb in micro], cfg.train.gradient_checkpointing)
        return Work(micro, stats, samples=n)

    def padding(self) -> MicroBatch:
        d = self.last
        return MicroBatch(PairMicroBatch(d.latents_win, d.latents_lose, d.cond, d.noise, d.t,
                                         torch.zeros_like(d.weight)), 0)

    def loss(self, mb: MicroBatch):
        """DPO loss of n pairs: one policy and one reference forward over winners and losers (2n)."""
        s, p = self.s, mb.data
        n = len(p.t)
        a = self.alphas[p.t].view(-1, 1, 1, 1)
        sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
        x_t = torch.cat([sqrt_a * p.latents_win + sqrt_1ma * p.noise, sqrt_a * p.latents_lose + sqrt_1ma * p.noise])
        t2, c2 = torch.cat([p.t, p.t]), Conditioning.cat([p.cond, p.cond])
        with stage("train/ref"), torch.no_grad(), reference_unet(s) as ref:
            pred_ref = unet_forward(ref, x_t, t2, c2).float().view(2, n, *p.noise.shape[1:])
        with stage("train/policy"):
            pred_pol = unet_forward(s.unet, x_t, t2, c2).float().view(2, n, *p.noise.shape[1:])
        if s.schedule.prediction_type == "epsilon":
            target_w = target_l = p.noise
        else:  # v-prediction: v = sqrt(a) * noise - sqrt(1 - a) * x0
            target_w = sqrt_a * p.noise - sqrt_1ma * p.latents_win
            target_l = sqrt_a * p.noise - sqrt_1ma * p.latents_lose
        return dpo_loss(pred_pol, pred_ref, target_w, target_l, p.weight, self.cfg.dpo.beta,
                        backend=kernel_backend(self.cfg))
