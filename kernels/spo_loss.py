"""Win-lose log-ratio loss of SPO: the PyTorch reference (the specification of the fused kernel).

Formula (SPO, per transition n; all per-sample quantities are fp32)::

    log r_w[n] = mean_{CHW} ((x_w - mu_ref_w)^2 - (x_w - mu_pol_w)^2) / (2 sigma[n]^2)
    log r_l[n] = mean_{CHW} ((x_l - mu_ref_l)^2 - (x_l - mu_pol_l)^2) / (2 sigma[n]^2)
    (= log pi_theta(x | x_t) - log pi_ref(x | x_t) of the Gaussian DDIM step, averaged over CHW;
       the -log sigma terms cancel because policy and reference share sigma)
    c_w, c_l = clamp(log r_w | log r_l, log(1 - eps), log(1 + eps))     (clamped ratio)
    L[n]     = -log sigmoid(beta * (c_w - c_l))
    loss     = sum_n valid[n] * L[n] / max(sum_n valid[n], 1)            (0 when no pair is valid)
    accuracy = sum_n valid[n] * [log r_w > log r_l] / max(sum_n valid[n], 1)

Shapes: x_win, x_lose (N, C, H, W); policy_mean, ref_mean (N, C, H, W) when win and lose share
x_t (one forward serves both), or (2, N, C, H, W) = (win side, lose side) when they do not (the
SDXL inner steps); sigma (N,); valid (N,) bool or 0/1 float.
Dtypes: fp32/fp16/bf16 inputs; everything is computed in fp32. Gradients flow to policy_mean
only (the reference and the samples are constants).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor  # () masked mean over valid pairs
    accuracy: torch.Tensor  # () implicit accuracy over valid pairs
    log_ratio_win: torch.Tensor  # (N,) unclamped
    log_ratio_lose: torch.Tensor  # (N,) unclamped


def _sides(mean: torch.Tensor, like: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if mean.shape == like.shape:
        return mean, mean
    if mean.dim() == like.dim() + 1 and mean.shape[0] == 2 and mean.shape[1:] == like.shape:
        return mean[0], mean[1]
    raise ValueError(f"{name} has shape {tuple(mean.shape)}; expected {tuple(like.shape)} (shared x_t) "
                     f"or {(2, *like.shape)} (win side, lose side)")


def _log_ratio(x: torch.Tensor, mu_pol: torch.Tensor, mu_ref: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    x, mu_pol, mu_ref = x.float(), mu_pol.float(), mu_ref.float()
    d = ((x - mu_ref) ** 2 - (x - mu_pol) ** 2).flatten(1).mean(1)
    return d / (2 * sigma.float() ** 2)


def spo_loss_reference(policy_mean: torch.Tensor, ref_mean: torch.Tensor, x_win: torch.Tensor,
                       x_lose: torch.Tensor, sigma: torch.Tensor, valid: torch.Tensor, beta: float,
                       ratio_clip: float) -> LossOutput:
    """SPO's clamped-ratio loss in plain PyTorch, fp32 (see the module docstring)."""
    if x_win.shape != x_lose.shape:
        raise ValueError(f"x_win {tuple(x_win.shape)} and x_lose {tuple(x_lose.shape)} differ in shape")
    n = x_win.shape[0]
    if sigma.shape != (n,) or valid.shape != (n,):
        raise ValueError(f"sigma {tuple(sigma.shape)} and valid {tuple(valid.shape)} must both be ({n},)")
    pol_w, pol_l = _sides(policy_mean, x_win, "policy_mean")
    ref_w, ref_l = _sides(ref_mean.detach(), x_win, "ref_mean")
    lr_w = _log_ratio(x_win.detach(), pol_w, ref_w, sigma)
    lr_l = _log_ratio(x_lose.detach(), pol_l, ref_l, sigma)
    lo, hi = math.log(1 - ratio_clip), math.log(1 + ratio_clip)
    per_pair = -F.logsigmoid(beta * (lr_w.clamp(lo, hi) - lr_l.clamp(lo, hi)))
    v = valid.float()
    denom = v.sum().clamp(min=1)
    loss = (per_pair * v).sum() / denom
    accuracy = ((lr_w > lr_l).float() * v).sum() / denom
    return LossOutput(loss, accuracy.detach(), lr_w.detach(), lr_l.detach())


def spo_loss(policy_mean: torch.Tensor, ref_mean: torch.Tensor, x_win: torch.Tensor, x_lose: torch.Tensor,
             sigma: torch.Tensor, valid: torch.Tensor, beta: float = 10.0, ratio_clip: float = 0.1) -> LossOutput:
    """SPO loss over N transitions; the trainer's only entry point to it.

    Today this is the PyTorch reference; the fused Triton version dispatches from here.
    Raises ValueError on inconsistent shapes.
    """
    return spo_loss_reference(policy_mean, ref_mean, x_win, x_lose, sigma, valid, beta, ratio_clip)
