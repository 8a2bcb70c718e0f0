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

Capturable: the random draws (step noise, continuation uniforms) come from one RNG state tensor in device memory
(``spo_fast.kernels.philox``) that every op reads and advances on the device; nothing in the loop reads a device
value on the host and every shape is fixed by (B, k, the latent shape). So the model calls can be captured as CUDA
graphs or compiled (``RolloutCalls``, ``sampling.graphs``; ``spo_fast.diffusion.graphs``), and one segment compiles with
``torch.compile(fullgraph=True)`` (tests/test_rollout.py). Each stage is a ``spo_fast.core.profiling`` range:
rollout/unet, rollout/decode, rollout/score, rollout/step.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from spo_fast.core.config import SamplingConfig, SPOConfig
from spo_fast.core.profiling import stage
from spo_fast.diffusion.graphs import CallWrapper
from spo_fast.diffusion.models import Conditioning, unet_forward
from spo_fast.diffusion.sampling import DDIMSchedule, guide, predict_x0_eps
from spo_fast.kernels.ddim_step import pooled_ddim_step
from spo_fast.kernels.pair_select import score_and_select, select_from_scores
from spo_fast.kernels.philox import philox_uniform_torch, state_from_generator
from spo_fast.reward.scorers import FeatureScorer, Scorer


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


def select_pairs(scores: torch.Tensor, threshold: float, k: int, state: torch.Tensor):
    """Per pool: win/lose index, validity and the continuation index.

    scores (B, k) -> win (B,), lose (B,), valid (B,) bool, cont (B,) uniform in [0, k), from one uniform per
    pool drawn from the RNG state (advanced by B; ``spo_fast.kernels.pair_select.select_from_scores``'s rules).
    """
    b = scores.shape[0]
    u = philox_uniform_torch(state[0], state[1], (b,))
    state[1:].add_(b)
    return select_from_scores(scores, threshold, u)


def _halves(unet, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor | None,
            time_ids: torch.Tensor | None) -> torch.Tensor:
    """Both CFG halves (2N, ...) = [uncond; cond] from one UNet call; the conditioning is already [uncond; cond]."""
    return unet_forward(unet, torch.cat([x, x]), torch.cat([t, t]), Conditioning(embeds, pooled, time_ids))


def _score(scorer: Scorer, images: torch.Tensor, t: torch.Tensor, state: object,
           prompt_index: torch.Tensor) -> torch.Tensor:
    return scorer.score(images, t, state, prompt_index).float()


class RolloutCalls:
    """The rollout's model calls (UNet -> both CFG halves, VAE decode, the scorer), each a named stage and wrapped
    for a ``sampling.graphs`` mode (``spo_fast.diffusion.graphs``). Made once per run, so graphs captured at the first rollout
    are replayed at every later one. The scorer's ``logit_scale`` is read once here (the scorer is frozen): the
    loop never reads a device value on the host."""

    def __init__(self, unet, decode: Callable[[torch.Tensor], torch.Tensor], scorer: Scorer, mode: str = "off",
                 device: torch.device | str = "cpu"):
        wrap = CallWrapper(mode, device)
        self.scorer = scorer
        self.fused = isinstance(scorer, FeatureScorer)
        self._halves = wrap(functools.partial(_halves, unet))
        self._decode = wrap(decode)
        if self.fused:
            self._features = wrap(scorer.image_features)
            self.logit_scale = float(scorer.logit_scale)
        else:
            self._score = wrap(functools.partial(_score, scorer))

    def halves(self, x: torch.Tensor, t: torch.Tensor, cond2: Conditioning) -> torch.Tensor:
        """x (N, ...), t (N,), cond2 = [uncond; cond] (2N) -> (2N, ...) [uncond; cond] UNet outputs."""
        with stage("rollout/unet"):
            return self._halves(x, t, cond2.embeds, cond2.pooled, cond2.time_ids)

    def select(self, x0_hat: torch.Tensor, score_t: torch.Tensor, score_state: object, k: int,
               threshold: float, state: torch.Tensor, backend: str | None):
        """Decode, score and pick the pairs of the B pools of k: (scores (B, k), win, lose, valid, cont)."""
        with stage("rollout/decode"):
            images = self._decode(x0_hat)
        b = x0_hat.shape[0] // k
        if self.fused:
            with stage("rollout/score"):
                feats = self._features(images, score_t)
            with stage("rollout/step"):
                sel = score_and_select(feats, score_state[:b].to(feats.device), self.logit_scale, k, threshold,
                                       seed=state, backend=backend)
                return sel.scores, sel.win, sel.lose, sel.valid, sel.cont
        prompt_index = torch.arange(b, device=x0_hat.device).repeat_interleave(k)
        with stage("rollout/score"):
            scores = self._score(images, score_t, score_state, prompt_index).view(b, k)
        with stage("rollout/step"):
            return (scores, *select_pairs(scores, threshold, k, state))


@dataclass
class _Context:
    """What every segment of one rollout shares."""

    calls: RolloutCalls
    schedule: DDIMSchedule
    cond2: Conditioning  # [uncond; cond] (2B)
    cond2_k: Conditioning  # [uncond; cond] with each prompt repeated k times (2Bk)
    score_state: object  # the scorer's prepared prompts (a tensor on the device for the SPM)
    spo: SPOConfig
    sampling: SamplingConfig
    state: torch.Tensor  # the RNG state (2,) int64, advanced in place by every op
    backend: str | None

    def step(self, x: torch.Tensor, halves: torch.Tensor, t: torch.Tensor, n: int) -> torch.Tensor:
        """One DDIM step from x (N, ...) at t (N,) given both CFG halves (2N, ...): (N, n, ...) candidates."""
        s = self.schedule
        with stage("rollout/step"):
            return pooled_ddim_step(x, halves.to(x.dtype), self.sampling.guidance_scale, s.alpha(t),
                                    s.alpha(s.prev(t)), self.sampling.eta, n, self.state,
                                    prediction_type=s.prediction_type, backend=self.backend).x_prev


def segment(ctx: _Context, x: torch.Tensor, halves: torch.Tensor, i: int, seg_end: int):
    """One branching segment from the shared x (B, ...) at step i with its CFG halves (2B, ...): candidates, their
    inner steps to seg_end, scoring and pair selection, the continuation. Returns (x_next, halves_next or None at
    the last step, scores (B, k), chain (seg_end - i + 1 states (B, k, ...)), win, lose, valid). Free of host reads
    and data-dependent shapes (it compiles with ``fullgraph=True``)."""
    B, shape, k = x.shape[0], tuple(x.shape[1:]), ctx.spo.k
    ts, T, dev = ctx.schedule.timesteps, len(ctx.schedule.timesteps), x.device
    cands = ctx.step(x, halves, ts[i].expand(B), k)  # (B, k, C, H, W)
    chain = [x[:, None].expand(B, k, *shape), cands]  # chain[j - i] = state at step j
    y = cands.reshape(B * k, *shape)
    for j in range(i + 1, seg_end):  # inner steps: each candidate on its own
        tj = ts[j].expand(B * k)
        y = ctx.step(y, ctx.calls.halves(y, tj, ctx.cond2_k), tj, 1)[:, 0]
        chain.append(y.view(B, k, *shape))
    if seg_end < T:
        tj = ts[seg_end].expand(B * k)
        halves_y = ctx.calls.halves(y, tj, ctx.cond2_k)  # (2Bk, ...): [uncond; cond]
        with stage("rollout/step"):
            x0_hat, _ = predict_x0_eps(ctx.schedule, guide(halves_y, ctx.sampling.guidance_scale), y, tj)
        score_t = tj
    else:
        halves_y, x0_hat, score_t = None, y, torch.zeros(B * k, dtype=torch.long, device=dev)
    scores, win, lose, valid, cont = ctx.calls.select(x0_hat, score_t, ctx.score_state, k, ctx.spo.threshold,
                                                      ctx.state, ctx.backend)
    with stage("rollout/step"):
        x_next = _pick(chain[-1], cont)
        halves_next = None
        if halves_y is not None:  # the chosen candidate's two halves: (2, B, k, ...) -> (2B, ...) = [uncond; cond]
            h = halves_y.view(2, B, k, *halves_y.shape[1:])
            halves_next = torch.cat([_pick(h[0], cont), _pick(h[1], cont)])
    return x_next, halves_next, scores, chain, win, lose, valid


@torch.no_grad()
def rollout(unet, schedule: DDIMSchedule, cond: Conditioning, uncond: Conditioning, scorer: Scorer,
            score_state: object, decode: Callable[[torch.Tensor], torch.Tensor], noise: torch.Tensor,
            spo: SPOConfig, sampling: SamplingConfig, generator: torch.Generator | None,
            backend: str | None = None, *, calls: RolloutCalls | None = None,
            state: torch.Tensor | None = None) -> RolloutBuffer:
    """Run one SPO rollout from initial noise (B, C, H, W); see the module docstring.

    ``decode`` maps latents (N, C, H, W) to images in [-1, 1]; ``scorer`` ranks them. ``calls`` (made once per run
    from the same unet/decode/scorer, for ``sampling.graphs``) defaults to eager calls.
    Every DDIM step, plain or pooled, is one ``spo_fast.kernels.ddim_step.pooled_ddim_step`` call (guidance,
    x0_hat, mean/std and the candidates, their noise drawn inside the op). All draws (step noise, continuation
    uniforms) come from one RNG state tensor (``state``, or one whose seed is drawn from ``generator`` on the
    device): the rollout is a pure function of it, and the ops' torch and Triton backends draw the same numbers
    (up to float rounding of the Box-Muller transform), so a CPU and a CUDA rollout of one seed differ only by
    rounding. A ``FeatureScorer`` (the SPM) is scored and its pairs selected by the fused
    ``spo_fast.kernels.pair_select.score_and_select``; any other scorer by ``score`` then ``select_pairs``.
    ``backend`` (``torch`` | ``triton`` | ``auto`` | None) goes to both ops.
    """
    B, shape = noise.shape[0], tuple(noise.shape[1:])
    k, T, d, L = spo.k, len(schedule.timesteps), spo.divert_start_step, 1 + spo.num_inner_steps
    ts, dev = schedule.timesteps, noise.device
    calls = calls if calls is not None else RolloutCalls(unet, decode, scorer)
    state = state if state is not None else state_from_generator(generator, dev)
    cond2 = Conditioning.cat([uncond, cond])
    if isinstance(score_state, torch.Tensor):  # on the device before the loop (no copy inside a captured call)
        score_state = score_state.to(dev)
    ctx = _Context(calls, schedule, cond2, Conditioning.cat([uncond.repeat_interleave(k), cond.repeat_interleave(k)]),
                   score_state, spo, sampling, state, backend)

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
        x = ctx.step(x, calls.halves(x, t, cond2), t, 1)[:, 0]

    halves = None  # both CFG halves at the shared x_t, reused from the previous segment's scoring call
    i = d
    while i < T:
        if halves is None:
            halves = calls.halves(x, ts[i].expand(B), cond2)
        seg_end = min(i + L, T)
        x, halves, scores, chain, win, lose, valid = segment(ctx, x, halves, i, seg_end)
        with stage("rollout/step"):
            for j in range(i, seg_end):
                slot = j - d
                x_t_buf[slot, 0], x_t_buf[slot, 1] = _pick(chain[j - i], win), _pick(chain[j - i], lose)
                x_prev_buf[slot, 0], x_prev_buf[slot, 1] = _pick(chain[j - i + 1], win), _pick(chain[j - i + 1], lose)
                valid_buf[slot] = valid
                sw_buf[slot], sl_buf[slot] = _pick(scores, win), _pick(scores, lose)
                shared.append(j == i)
        i = seg_end
    return RolloutBuffer(x_t_buf, x_prev_buf, t_buf, valid_buf, sw_buf, sl_buf, shared, scores, x)
