"""SPO rollout with the step-wise resampler (no gradients, fixed shapes).

For B prompts and pool size k, with T = num_steps, d = divert_start_step and segment length
L = 1 + num_inner_steps (L = 1 for SD1.5; the SDXL recipe uses L = 4)::

    steps 0 .. d-1      plain DDIM steps, one sample per prompt
    at each branching step i (d, d+L, d+2L, ...):
      out(x_t)          UNet output at the shared x_t (reused from the previous segment)
      candidates        k draws x_{t-1} from the shared mean                 (B, k, C, H, W)
      inner steps       each candidate denoises L-1 more steps on its own
      score             one UNet call on all B*k chain ends gives x0_hat, decoded and scored at
                        the chain end's timestep (final samples: x0 itself, t = 0)
      pair              win = argmax, lose = argmin; valid iff
                        softmax([s_win, s_lose]) gives p_win - p_lose = tanh((s_win - s_lose)/2) > threshold
      continue          from a uniformly random candidate, reusing its UNet output

Every transition of a segment (the branching one, whose x_t is shared by win and lose, and the
inner ones, whose x_t is the chain's own) inherits the segment's pair label and validity.
Invalid pairs stay in the buffers with valid = False: shapes never depend on the data.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import SamplingConfig, SPOConfig
from .kernels.ddim_step import pooled_ddim_step
from .kernels.pair_select import score_and_select, select_from_scores
from .models import Conditioning
from .sampling import DDIMSchedule, cfg_halves, guide, predict_x0_eps, step_seed
from .scorers import FeatureScorer, Scorer


@dataclass
class RolloutBuffer:
    """Transitions of one rollout; S = num_steps - divert_start_step slots of B transitions."""

    x_t: torch.Tensor  # (S, 2, B, C, H, W) x_t of the win chain and of the lose chain
    x_prev: torch.Tensor  # (S, 2, B, C, H, W) x_{t-1} of the win chain and of the lose chain
    t: torch.Tensor  # (S,) long timestep of x_t
    valid: torch.Tensor  # (S, B) bool
    score_win: torch.Tensor  # (S, B)
    score_lose: torch.Tensor  # (S, B)
    shared: list[bool]  # (S,) win and lose share x_t (branching steps); static for a config
    final_scores: torch.Tensor  # (B, k) scores of the last pool (final samples, t = 0)
    final: torch.Tensor  # (B, C, H, W) the continuation chain's final latents

    @property
    def num_slots(self) -> int:
        return self.t.shape[0]


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, k, ...), idx (B,) -> (B, ...)."""
    return x[torch.arange(x.shape[0], device=x.device), idx]


def select_pairs(scores: torch.Tensor, threshold: float, k: int, generator: torch.Generator | None):
    """Per pool: win/lose index, validity and the continuation index.

    scores (B, k) -> win (B,), lose (B,), valid (B,) bool, cont (B,) uniform in [0, k), from one uniform per
    pool drawn from ``generator`` (``spo_fast.kernels.pair_select.select_from_scores``'s rules).
    """
    u = torch.rand(scores.shape[0], generator=generator, device=scores.device)
    return select_from_scores(scores, threshold, u)


@torch.no_grad()
def rollout(unet, schedule: DDIMSchedule, cond: Conditioning, uncond: Conditioning, scorer: Scorer,
            score_state: object, decode: Callable[[torch.Tensor], torch.Tensor], noise: torch.Tensor,
            spo: SPOConfig, sampling: SamplingConfig, generator: torch.Generator | None,
            backend: str | None = None) -> RolloutBuffer:
    """Run one SPO rollout from initial noise (B, C, H, W); see the module docstring.

    ``decode`` maps latents (N, C, H, W) to images in [-1, 1]; ``scorer`` ranks them.
    Every DDIM step, plain or pooled, is one ``spo_fast.kernels.ddim_step.pooled_ddim_step`` call (guidance,
    x0_hat, mean/std and the candidates, their noise drawn inside the op). Its noise is keyed by one seed drawn
    from ``generator`` per rollout and a running offset; the continuation uniforms are drawn from ``generator``
    too, so the rollout is a pure function of ``generator``'s state (the op's torch and Triton backends draw
    different step noise for one seed: a CPU and a CUDA rollout differ, each reproducible).
    A ``FeatureScorer`` (the SPM) is scored and its pairs selected by the fused
    ``spo_fast.kernels.pair_select.score_and_select``; any other scorer by ``score`` then ``select_pairs``.
    ``backend`` (``torch`` | ``triton`` | ``auto`` | None) goes to both ops.
    """
    B, shape = noise.shape[0], tuple(noise.shape[1:])
    k, T, d, L = spo.k, len(schedule.timesteps), spo.divert_start_step, 1 + spo.num_inner_steps
    g, eta, ts, dev = sampling.guidance_scale, sampling.eta, schedule.timesteps, noise.device
    cond_k, uncond_k = cond.repeat_interleave(k), uncond.repeat_interleave(k)
    prompt_index = torch.arange(B, device=dev).repeat_interleave(k)  # (B*k,)
    fused = isinstance(scorer, FeatureScorer)
    seed, offset = step_seed(generator, dev), 0

    def step(x, halves, t, n):
        """One DDIM step from x (N, ...) at t (N,) given both CFG halves (2N, ...): (N, n, ...) candidates."""
        nonlocal offset
        st = pooled_ddim_step(x, halves.to(x.dtype), g, schedule.alpha(t), schedule.alpha(schedule.prev(t)), eta, n,
                              seed, offset, prediction_type=schedule.prediction_type, backend=backend)
        offset += st.x_prev.numel()
        return st.x_prev

    def select(images, score_t):
        """Score the B pools of k decoded images and pick the pairs: (scores (B, k), win, lose, valid, cont)."""
        u = torch.rand(B, generator=generator, device=dev)
        if fused:
            feats = scorer.image_features(images, score_t)
            txt = torch.as_tensor(score_state).to(feats.device)[:B]  # pool b scores against prompt b
            sel = score_and_select(feats, txt, scorer.logit_scale, k, spo.threshold, u=u.to(feats.device),
                                   backend=backend)
            return tuple(v.to(dev) for v in (sel.scores, sel.win, sel.lose, sel.valid, sel.cont))
        scores = scorer.score(images, score_t, score_state, prompt_index).float().view(B, k).to(dev)
        return (scores, *select_from_scores(scores, spo.threshold, u))

    S = T - d
    x_t_buf = torch.empty((S, 2, B, *shape), device=dev)
    x_prev_buf = torch.empty_like(x_t_buf)
    t_buf = ts[d:].clone()
    valid_buf = torch.empty((S, B), dtype=torch.bool, device=dev)
    sw_buf, sl_buf = torch.empty((S, B), device=dev), torch.empty((S, B), device=dev)
    shared: list[bool] = []

    x = noise.float()
    for i in range(d):
        t = ts[i].expand(B)
        x = step(x, cfg_halves(unet, x, t, cond, uncond), t, 1)[:, 0]

    halves = None  # both CFG halves at the shared x_t, reused from the previous segment's scoring call
    i = d
    while i < T:
        t = ts[i].expand(B)
        if halves is None:
            halves = cfg_halves(unet, x, t, cond, uncond)
        cands = step(x, halves, t, k)  # (B, k, C, H, W)
        seg_end = min(i + L, T)
        chain = [x[:, None].expand(B, k, *shape), cands]  # chain[j - i] = state at step j
        y = cands.reshape(B * k, *shape)
        for j in range(i + 1, seg_end):  # inner steps: each candidate on its own
            tj = ts[j].expand(B * k)
            y = step(y, cfg_halves(unet, y, tj, cond_k, uncond_k), tj, 1)[:, 0]
            chain.append(y.view(B, k, *shape))
        if seg_end < T:
            tj = ts[seg_end].expand(B * k)
            halves_y = cfg_halves(unet, y, tj, cond_k, uncond_k)  # (2Bk, ...): [uncond; cond]
            x0_hat, _ = predict_x0_eps(schedule, guide(halves_y, g), y, tj)
            score_t = tj
        else:
            halves_y, x0_hat, score_t = None, y, torch.zeros(B * k, dtype=torch.long, device=dev)
        scores, win, lose, valid, cont = select(decode(x0_hat), score_t)
        for j in range(i, seg_end):
            slot = j - d
            x_t_buf[slot, 0], x_t_buf[slot, 1] = _pick(chain[j - i], win), _pick(chain[j - i], lose)
            x_prev_buf[slot, 0], x_prev_buf[slot, 1] = _pick(chain[j - i + 1], win), _pick(chain[j - i + 1], lose)
            valid_buf[slot] = valid
            sw_buf[slot], sl_buf[slot] = _pick(scores, win), _pick(scores, lose)
            shared.append(j == i)
        x = _pick(chain[-1], cont)
        if halves_y is not None:  # the chosen candidate's two halves: (2, B, k, ...) -> (2B, ...) = [uncond; cond]
            h = halves_y.view(2, B, k, *halves_y.shape[1:])
            halves = torch.cat([_pick(h[0], cont), _pick(h[1], cont)])
        else:
            halves = None
        i = seg_end
    return RolloutBuffer(x_t_buf, x_prev_buf, t_buf, valid_buf, sw_buf, sl_buf, shared, scores, x)
