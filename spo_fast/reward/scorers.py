"""Scorers: the preference signal the rollout ranks candidates with.

Interface (what the rollout calls)::

    state = scorer.prepare(prompts)                 # once per prompt batch (text features)
    scores = scorer.score(images, timesteps, state, prompt_index)
        images: (N, 3, H, W) decoded x0_hat in [-1, 1]; timesteps: (N,) long, the timestep the
        candidate's x0_hat was predicted at (0 for final samples); prompt_index: (N,) long into
        the prepared prompts. Returns (N,) fp32 scores: higher = preferred, on a logit scale
        (the pair threshold is applied to softmax([s_win, s_lose])).

The step-aware preference model implements the same two methods, and also the optional feature-scorer
interface (``FeatureScorer``): ``state`` is then the (P, D) L2-normalised text features and
``image_features(images, timesteps)`` (N, D) with ``logit_scale`` give the scores as
``logit_scale * <normalize(image_features), state[prompt_index]>``. For such a scorer the rollout runs the
fused score-head + pair-selection op (``spo_fast.kernels.pair_select.score_and_select``) on the features instead
of ``score``; any other scorer's scores go through the op's reference selection.
"""
from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import torch

from spo_fast.core.config import ScorerConfig

COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.25, 0.9),
    "yellow": (0.95, 0.9, 0.1), "orange": (0.95, 0.55, 0.1), "purple": (0.55, 0.15, 0.7),
    "pink": (0.95, 0.5, 0.7), "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05),
    "gray": (0.5, 0.5, 0.5), "brown": (0.5, 0.3, 0.1), "cyan": (0.1, 0.85, 0.9),
}


class Scorer(Protocol):
    def prepare(self, prompts: list[str]) -> object: ...

    def score(self, images: torch.Tensor, timesteps: torch.Tensor, state: object,
              prompt_index: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class FeatureScorer(Scorer, Protocol):
    logit_scale: float

    def image_features(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...


class ColorScorer:
    """Built-in, honest, step-agnostic scorer: how close the image's mean colour is to the colours
    the prompt names (the mean of those colours), as ``-scale * distance`` in RGB [0, 1].

    Prompts naming no colour are scored by colourfulness (mean per-pixel channel spread). It
    ignores the timestep; the step-aware preference model replaces it for real runs.
    """

    def __init__(self, scale: float = 10.0):
        self.scale = scale

    def prepare(self, prompts: list[str]) -> torch.Tensor:
        """(B, 4): target RGB and a has-colour flag per prompt."""
        rows = []
        for p in prompts:
            named = [COLORS[w] for w in re.findall(r"[a-z]+", p.lower()) if w in COLORS]
            if named:
                rgb = torch.tensor(named).mean(0)
                rows.append(torch.cat([rgb, torch.ones(1)]))
            else:
                rows.append(torch.zeros(4))
        return torch.stack(rows)

    def score(self, images, timesteps, state, prompt_index):
        img = (images.float().clamp(-1, 1) + 1) / 2  # (N, 3, H, W) in [0, 1]
        target = state.to(img.device)[prompt_index]  # (N, 4)
        dist = (img.mean((2, 3)) - target[:, :3]).norm(dim=1)
        colourful = (img.max(1).values - img.min(1).values).mean((1, 2))
        return self.scale * torch.where(target[:, 3] > 0, -dist, colourful)


class GroundTruthScorer:
    """The toy world's ground truth of the picture the rollout scores (``spo_fast.toyworld.world.score`` of each
    candidate's x0 estimate), as ``scale / 10`` x its score in [0, 10] (the default scale 10: score points).

    For diagnosis, not a preference model: a perfect judge of the picture a scorer reads, which is not a judge of
    where the candidate ends: at noisy steps the x0 estimate's ground truth and the final sample's can disagree
    (``benchmarks/spm_step_agreement.py``, ``corr_gt_x0``), and a step-aware SPM trained on the finals' labels can
    rank better (docs/toy_world.md). Toy-world prompts only."""

    def __init__(self, scale: float = 10.0):
        self.scale = scale

    def prepare(self, prompts: list[str]) -> list:
        from spo_fast.toyworld import world

        return [world.parse_prompt(p) for p in prompts]

    def score(self, images, timesteps, state, prompt_index):
        from spo_fast.toyworld import world

        attrs = [state[i] for i in prompt_index.tolist()]
        return (self.scale / 10 * world.score(images.detach().float().cpu(), attrs)).to(images.device)


def build_scorer(cfg: ScorerConfig, device=None) -> Scorer:
    """The configured scorer, on ``device``: for ``spm`` loaded from ``cfg.path`` (``init=pretrained``) or built
    from its config with random weights (``init=random``: seed 0, on ``device``), in ``cfg.dtype``."""
    if cfg.name == "color":
        return ColorScorer(cfg.scale)
    if cfg.name == "ground_truth":
        return GroundTruthScorer(cfg.scale)
    if cfg.name == "spm":
        from spo_fast.diffusion.models import resolve_model_path
        from spo_fast.reward.spm import SPMScorer

        path = resolve_model_path(cfg.path)
        if cfg.init == "random":
            return SPMScorer.random(path, device=device, seed=0, precision=cfg.dtype)
        return SPMScorer.from_pretrained(path, device=device, precision=cfg.dtype)
    raise ValueError(f"scorer.name={cfg.name!r} is not known; accepted: spm, color, ground_truth")
