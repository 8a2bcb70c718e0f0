"""SPO as a method of the trainer core (``spo_fast.core.trainer``): what an iteration trains on and how a micro-batch of
transitions becomes a loss.

Per iteration: B prompts (``data.prompts``, a pure function of (seed, iteration, rank)) -> text embeddings once per
prompt -> one rollout with the step-wise resampler (``spo_fast.diffusion.rollout``: no grad, fixed shapes, invalid pairs kept
with valid = False) -> the VALID transitions only, shuffled and compacted into micro-batches of
``train.train_batch_size`` (the last one padded with masked entries), so the number of micro-batches follows the
data (the official code's ceil(valid / micro-batch); per kind of transition with SDXL's inner steps unless
``spo.micro_batches=mixed``) while every micro-batch keeps one shape. A rollout without a
valid pair trains nothing: no forward, no optimizer step (AdamW's momentum and weight decay would otherwise move
the weights).

Per micro-batch: one reference forward (LoRA adapters disabled, or the frozen copy) and one policy forward, both
with CFG, serve win and lose, which share x_t on branching steps; the SPO loss (``spo_fast.kernels.spo_loss``)
compares the two DDIM means on both samples. SDXL inner steps (win and lose chains have their own x_t) run the
two sides in one forward of twice the batch; those transitions form micro-batches of their own
(``spo.micro_batches=split``), or share them with the branching steps' (``mixed``, the official code's count).
With several processes each trains on its own rollout's valid transitions (``spo.process_split=own``), or, as the
official code, on an equal share of all processes' (``gather``: ``gather_rollouts`` then ``compact_valid``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spo_fast.core.config import Config, ConfigError
from spo_fast.core.profiling import stage
from spo_fast.core.trainer import (
    MicroBatch,
    Setup,
    Work,
    decoder,
    kernel_backend,
    reference_unet,
    sampling_autocast,
    sampling_weight_dtype,
)
from spo_fast.data import PromptSampler, load_prompts
from spo_fast.diffusion.merged import MergedLoRA
from spo_fast.diffusion.models import Conditioning, encode_negative, encode_prompts
from spo_fast.diffusion.rollout import RolloutBuffer, RolloutCalls, rollout
from spo_fast.diffusion.sampling import cfg_model_output, ddim_step_stats
from spo_fast.kernels.spo_loss import spo_loss
from spo_fast.reward.scorers import build_scorer


@dataclass
class Transitions:
    """A micro-batch of transitions (slot[n], b[n]) of one rollout buffer; ``shared``: all of them share x_t (one
    forward serves both sides), else both sides run (``spo.micro_batches=mixed`` puts shared ones there too)."""

    buf: RolloutBuffer
    shared: bool
    slot: torch.Tensor  # (micro,) long
    b: torch.Tensor  # (micro,) long
    weight: torch.Tensor  # (micro,) 1 for a valid pair, 0 for padding


def compact_valid(buf: RolloutBuffer, micro: int, generator: torch.Generator, mixed: bool = False,
                  world: int = 1, rank: int = 0) -> list[tuple[bool, torch.Tensor, torch.Tensor, int]]:
    """The valid transitions of ``buf``, shuffled, in micro-batches of ``micro``: a list of (shared, slot (micro,),
    b (micro,), n_valid). ``mixed=False`` (``spo.micro_batches=split``): within a micro-batch all transitions are
    ``shared`` or all are not, and the last micro-batch of each kind is padded by repeating its first transition
    (its weight is 0). ``mixed=True`` (the official code's): all valid transitions are shuffled together, so there
    are ceil(valid / micro); a micro-batch is ``shared`` only when all of its transitions are (else its shared ones
    run as two sides with the same x_t). Without not-shared slots both give the same micro-batches.

    ``world`` > 1 (``spo.process_split=gather``; ``buf`` then holds every process's rollout): the official split.
    All valid transitions are shuffled together (``generator`` must be seeded alike on every process), process
    ``rank`` takes the ``rank``-th of ``world`` equal slices of total // world (the remainder is dropped; fewer
    than ``world`` valid transitions: none for anyone) and, with ``mixed=False``, keeps its slice's two kinds
    apart. One host read of the valid mask."""
    valid = buf.valid.cpu()  # (S, B)
    shared_slots = torch.tensor(buf.shared, dtype=torch.bool)
    orders = []  # the (slot, b) of each kind's transitions, shuffled
    if world > 1:
        idx = valid.nonzero()
        if len(idx) < world:
            return []
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n = len(idx) // world
        idx = idx[rank * n:(rank + 1) * n]
        orders = [idx] if mixed else [idx[shared_slots[idx[:, 0]]], idx[~shared_slots[idx[:, 0]]]]
    else:
        for shared in [None] if mixed else [True, False]:
            slots = torch.tensor([i for i, s in enumerate(buf.shared) if shared is None or s == shared],
                                 dtype=torch.long)
            if len(slots) == 0:
                continue
            idx = valid[slots].nonzero()  # (n, 2): (position in slots, b)
            idx = idx[torch.randperm(len(idx), generator=generator)]
            orders.append(torch.stack([slots[idx[:, 0]], idx[:, 1]], 1) if len(idx) else idx)
    out = []
    for idx in orders:
        for chunk in idx.split(micro):
            n = len(chunk)
            if n == 0:  # split of an empty tensor yields one empty chunk
                continue
            chunk = torch.cat([chunk, chunk[:1].expand(micro - n, 2)])
            out.append((bool(shared_slots[chunk[:, 0]].all()), chunk[:, 0], chunk[:, 1], n))
    return out


def gather_rollouts(accelerator, buf: RolloutBuffer, cond: Conditioning) -> tuple[RolloutBuffer, Conditioning]:
    """Every process's rollout buffer and prompt conditioning, concatenated along the prompt dim in rank order
    (``spo.process_split=gather``): fixed shapes, so plain all-gathers (the valid mask as uint8)."""

    def gather(x: torch.Tensor, dim: int) -> torch.Tensor:
        return accelerator.gather(x.movedim(dim, 0).contiguous()).movedim(0, dim)

    valid = gather(buf.valid.to(torch.uint8), 1).bool()
    out = RolloutBuffer(gather(buf.x_t, 2), gather(buf.x_prev, 2), buf.t, valid, gather(buf.score_win, 1),
                        gather(buf.score_lose, 1), buf.shared, gather(buf.final_scores, 0), gather(buf.final, 0))
    fields = (cond.embeds, cond.pooled, cond.time_ids)
    return out, Conditioning(*(None if v is None else gather(v, 0) for v in fields))


def iteration_cost(batch: int, k: int, num_steps: int, divert_start_step: int, num_inner_steps: int,
                   micro_shared: list[bool], micro_size: int, gradient_checkpointing: bool = False) -> dict[str, int]:
    """The compute of one SPO iteration on one process, in model forwards (``Work.stats``, so ``metrics.jsonl``):

    - ``unet_fwd_eq``: UNet forward-equivalents. One UNet forward of one sample = 1, so a CFG call on N samples
      (both halves in one batch of 2N) = 2N, and a backward counts as two forwards (gradient checkpointing adds
      one more forward of the policy: diffusers recomputes its down/mid/up blocks).
    - ``spm_fwd``: images scored by the preference model (the scorer's image forwards).

    Rollout (``spo_fast.diffusion.rollout``, B = ``batch`` prompts, T = ``num_steps``, d = ``divert_start_step``,
    L = 1 + ``num_inner_steps``):

    - the d plain steps: one CFG call on B each -> 2B * d;
    - the shared x_t of the first branching step: one CFG call on B -> 2B (every later segment reuses the
      continuation's halves from the previous segment's scoring call);
    - each segment from step i to e = min(i + L, T): e - i - 1 inner steps on the B*k chains (2Bk each) and, unless
      e = T, the scoring call at the chain ends (2Bk); the last segment (e = T) scores the final samples with no
      UNet call. Every segment scores B*k images (``spm_fwd``).

    Training, per micro-batch of the padded size m (``micro_size``; ``micro_shared`` says for each micro-batch
    whether its transitions share x_t): a reference forward and a policy forward, both with CFG, and the policy's
    backward. Shared (branching steps): the forwards see m samples -> 2m + 2m + 2 * 2m = 8m. Not shared (SDXL inner
    steps: win and lose chains have their own x_t): a batch of 2m -> 16m. Gradient checkpointing: + 2m (4m).
    Padding micro-batches the trainer adds when processes hold different numbers (several processes) are not
    counted. Text encoders and the VAE are not counted."""
    T, d, L = num_steps, divert_start_step, 1 + num_inner_steps
    B, Bk = batch, batch * k
    unet = 2 * B * d + (2 * B if d < T else 0)
    spm = 0
    for i in range(d, T, L):
        e = min(i + L, T)
        unet += (e - i - 1) * 2 * Bk + (2 * Bk if e < T else 0)
        spm += Bk
    per_sample = 8 + (2 if gradient_checkpointing else 0)  # ref CFG 2, policy CFG 2, backward 4 (+ recompute 2)
    for shared in micro_shared:
        unet += per_sample * micro_size * (1 if shared else 2)
    return {"unet_fwd_eq": unet, "spm_fwd": spm}


class SPO:
    """Step-aware Preference Optimization (see the module docstring)."""

    name = "SPO"

    def __init__(self):
        self.scorer = None

    # -- checks and setup
    def preflight(self, cfg: Config) -> None:
        if cfg.sampling.graphs == "cuda_graphs" and not torch.cuda.is_available():
            raise ConfigError("sampling.graphs=cuda_graphs needs a CUDA GPU (none is visible); use sampling.graphs=off "
                              "(or compile)")
        self.prompts = load_prompts(cfg.data.prompts)
        if cfg.train.batch_size > len(self.prompts):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(self.prompts)} prompts of "
                              f"data.prompts={cfg.data.prompts!r}; lower the batch size or add prompts")

    def setup(self, cfg: Config, s: Setup, accelerator) -> None:
        self.cfg, self.s, self.acc = cfg, s, accelerator
        self.scorer = build_scorer(cfg.scorer, accelerator.device)
        self.sampler = PromptSampler(self.prompts, cfg.train.batch_size, accelerator.num_processes,
                                     accelerator.process_index, cfg.train.seed)
        # the negative prompt is the same every iteration: encode it once
        self.uncond = encode_negative(s.comp, cfg.sampling.negative_prompt, cfg.train.batch_size, accelerator.device,
                                      s.resolution)
        self.decode = decoder(s.comp, clamp=False)  # the scorer clamps as its preprocessing says (official: late)
        # made once: with sampling.graphs the rollout's calls are captured (or compiled) at the first rollout and
        # replayed at every later one
        # sampling.merge_lora: the rollout runs a plain copy of the UNet with the LoRA merged in (spo_fast.diffusion.merged)
        # (weights in the sampling dtype: bit-identical under its autocast), with sampling.chunked_attention like the
        # evaluation's copies: its rounding sends SPO on another course than SDPA's, with no systematic effect on the
        # result over nine paired seeds, and the default run is 1.10x faster (docs/speed.md)
        self.merged = MergedLoRA(s.raw_unet, weight_dtype=sampling_weight_dtype(cfg, accelerator),
                                 chunked_attention=cfg.sampling.chunked_attention) if cfg.sampling.merge_lora else None
        rollout_unet = self.merged.module if self.merged is not None else s.raw_unet
        self.calls = RolloutCalls(rollout_unet, self.decode, self.scorer, cfg.sampling.graphs, accelerator.device)

    def epoch_iterations(self, cfg: Config, world_size: int) -> int:
        return self.sampler.iterations_for(cfg.train.epochs)

    def grid_prompts(self, n: int) -> list[str]:
        """``n`` training prompts that cover the set's words (``grids.covering``), for the sample grid."""
        from spo_fast.evaluation.grids import covering

        return [self.prompts[i] for i in covering(self.prompts, n)]

    def rollout_generator(self, it: int) -> torch.Generator:
        """Noise of rollout ``it`` on this process: a pure function of (seed, iteration, rank)."""
        seed = (self.cfg.train.seed * 1_000_003 + it) * 4099 + self.acc.process_index
        return torch.Generator(device=self.acc.device).manual_seed(seed)

    # -- one iteration
    def work(self, it: int) -> Work:
        cfg, s, dev = self.cfg, self.s, self.acc.device
        prompts = self.sampler.batch(it)
        gen = self.rollout_generator(it)
        self.cond = encode_prompts(s.comp, prompts, dev, s.resolution)
        noise = torch.randn((len(prompts), *s.latent_shape), generator=gen, device=dev)
        s.raw_unet.eval()
        if self.merged is not None:
            self.merged.refresh()  # the adapters moved since the last rollout
        with torch.no_grad(), sampling_autocast(cfg, self.acc):
            buf = rollout(s.raw_unet, s.schedule, self.cond, self.uncond, self.scorer, self.scorer.prepare(prompts),
                          self.decode, noise, cfg.spo, cfg.sampling, gen, backend=kernel_backend(cfg), calls=self.calls)
        stats = {"valid_ratio": buf.valid.float().mean(), "reward": buf.final_scores.float().mean()}  # this process's
        # the transitions to train on: this process's own (ours), or a share of every process's (official)
        world, rank = self.acc.num_processes, self.acc.process_index
        self.train_cond, self.train_uncond = self.cond, self.uncond
        if cfg.spo.process_split == "gather" and world > 1:
            buf, self.train_cond = gather_rollouts(self.acc, buf, self.cond)
            self.train_uncond = Conditioning.cat([self.uncond] * world)
        else:
            world, rank = 1, 0
        shuffle = torch.Generator().manual_seed(cfg.train.seed * 7919 + it)  # the same on every process
        micro = []
        for shared, slot, b, n in compact_valid(buf, cfg.train.train_batch_size, shuffle,
                                                mixed=cfg.spo.micro_batches == "mixed", world=world, rank=rank):
            weight = (torch.arange(len(slot)) < n).float()
            micro.append(MicroBatch(Transitions(buf, shared, slot.to(dev), b.to(dev), weight.to(dev)), n))
        self.buf = buf
        stats.update(iteration_cost(len(prompts), cfg.spo.k, cfg.sampling.num_steps, cfg.spo.divert_start_step,
                                    cfg.spo.num_inner_steps, [mb.data.shared for mb in micro],
                                    cfg.train.train_batch_size, cfg.train.gradient_checkpointing))
        return Work(micro, stats, samples=len(prompts))

    def padding(self) -> MicroBatch:
        m = self.cfg.train.train_batch_size
        first_shared = self.buf.shared.index(True)
        zeros = torch.zeros(m, dtype=torch.long, device=self.acc.device)
        return MicroBatch(Transitions(self.buf, True, zeros + first_shared, zeros, zeros.float()), 0)

    def loss(self, mb: MicroBatch):
        """SPO loss of the transitions (slot[n], b[n]): one reference and one policy forward serve win and lose."""
        cfg, s, tr = self.cfg, self.s, mb.data
        buf, slot, b = tr.buf, tr.slot, tr.b
        n = len(slot)
        x_t = buf.x_t[slot, :, b]  # (n, 2, C, H, W)
        x_prev = buf.x_prev[slot, :, b]  # (n, 2, C, H, W)
        t = buf.t[slot]
        c, u = self.train_cond[b], self.train_uncond[b]
        if tr.shared:
            x_in, t_in = x_t[:, 0], t
        else:  # SDXL inner steps: win and lose chains have their own x_t
            x_in, t_in = torch.cat([x_t[:, 0], x_t[:, 1]]), torch.cat([t, t])
            c, u = type(c).cat([c, c]), type(u).cat([u, u])
        g, eta = cfg.sampling.guidance_scale, cfg.sampling.eta
        with stage("train/ref"), torch.no_grad(), reference_unet(s) as ref:
            _, mu_ref, _ = ddim_step_stats(s.schedule, cfg_model_output(ref, x_in, t_in, c, u, g), x_in, t_in, eta)
        with stage("train/policy"):
            _, mu_pol, std = ddim_step_stats(s.schedule, cfg_model_output(s.unet, x_in, t_in, c, u, g), x_in, t_in,
                                             eta)
        if not tr.shared:
            mu_pol, mu_ref, std = mu_pol.view(2, n, *mu_pol.shape[1:]), mu_ref.view(2, n, *mu_ref.shape[1:]), std[:n]
        return spo_loss(mu_pol, mu_ref, x_prev[:, 0], x_prev[:, 1], std, tr.weight, cfg.spo.beta, cfg.spo.ratio_clip,
                        backend=kernel_backend(cfg))
