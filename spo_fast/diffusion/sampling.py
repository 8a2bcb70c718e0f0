"""DDIM sampling math: the stochastic step (eta), its Gaussian log-density, classifier-free guidance.

One DDIM step from x_t at timestep t to x_{t-1} at t_prev = t - 1000 // num_steps is

    x0_hat = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)                 (epsilon prediction)
    var    = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std    = eta * sqrt(var)
    mean   = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps
    x_prev = mean + std * z,   z ~ N(0, I)

with a = alphas_cumprod and a_prev = final_alpha_cumprod when t_prev < 0. This is exactly what
diffusers' ``DDIMScheduler.step`` computes (tests/test_sampling.py checks it for the same z).
The step's log-density log N(x_prev; mean, std^2 I) is *averaged* over C*H*W, as SPO does.

Timesteps may differ per sample: every function takes ``t`` as a (N,) long tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from spo_fast.diffusion.models import Conditioning, unet_forward
from spo_fast.kernels.ddim_step import ddim_step, step_coefficients, x0_and_eps
from spo_fast.kernels.philox import state_from_generator

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class DDIMSchedule:
    """The DDIM quantities of one scheduler configuration and number of inference steps."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) fp32
    final_alpha_cumprod: float
    timesteps: torch.Tensor  # (num_steps,) long, descending
    step_ratio: int
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler, num_steps: int, device=None) -> DDIMSchedule:
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={scheduler.config.prediction_type!r} is not supported; "
                             "use a scheduler with epsilon or v_prediction")
        if scheduler.config.thresholding or scheduler.config.clip_sample:
            raise ValueError("DDIM thresholding/clip_sample are not supported (Stable Diffusion uses neither); "
                             "set them false in the scheduler config")
        sched = DDIMScheduler.from_config(scheduler.config)
        sched.set_timesteps(num_steps)
        return cls(
            alphas_cumprod=sched.alphas_cumprod.to(device=device, dtype=torch.float32),
            final_alpha_cumprod=float(sched.final_alpha_cumprod),
            timesteps=sched.timesteps.to(device=device, dtype=torch.long),
            step_ratio=sched.config.num_train_timesteps // num_steps,
            prediction_type=sched.config.prediction_type,
        )

    def to(self, device) -> DDIMSchedule:
        return DDIMSchedule(self.alphas_cumprod.to(device), self.final_alpha_cumprod,
                            self.timesteps.to(device), self.step_ratio, self.prediction_type)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod at t (N,), with final_alpha_cumprod where t < 0."""
        a = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, a, torch.full_like(a, self.final_alpha_cumprod))

    def prev(self, t: torch.Tensor) -> torch.Tensor:
        return t - self.step_ratio

    def std(self, t: torch.Tensor, eta: float) -> torch.Tensor:
        """(N,) standard deviation of the step from t."""
        return step_coefficients(self.alpha(t), self.alpha(self.prev(t)), eta)[4]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def predict_x0_eps(schedule: DDIMSchedule, model_out: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
    """(x0_hat, eps) from the model output at (x, t). Shapes (N, C, H, W); fp32 math."""
    x32 = x.float()
    a = _bcast(schedule.alpha(t), x32)
    return x0_and_eps(x32, model_out.float(), a.sqrt(), (1 - a).sqrt(), schedule.prediction_type)


def ddim_step_stats(schedule: DDIMSchedule, model_out: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                    eta: float):
    """x0_hat (N, C, H, W), mean (N, C, H, W) and std (N,) of the DDIM step from x at t (fp32): the kernels'
    ``step_coefficients`` and ``x0_and_eps`` (one implementation of the DDIM math)."""
    x32 = x.float()
    coef = step_coefficients(schedule.alpha(t), schedule.alpha(schedule.prev(t)), eta)  # (5, N)
    sqrt_a, sqrt_1ma, sqrt_ap, direction = (_bcast(c, x32) for c in coef[:4])
    x0, eps = x0_and_eps(x32, model_out.float(), sqrt_a, sqrt_1ma, schedule.prediction_type)
    return x0, sqrt_ap * x0 + direction * eps, coef[4]


def ddim_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_prev; mean, std^2 I) averaged over all but the first dim: (N,)."""
    s = _bcast(std, mean).float()
    lp = -((x_prev.float() - mean.float()) ** 2) / (2 * s**2) - s.log() - _HALF_LOG_2PI
    return lp.flatten(1).mean(1)


def cfg_halves(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
    """Both CFG halves from one UNet call on the 2N batch: (2N, C, H, W) laid out as [uncond; cond] (the layout the
    step op ``spo_fast.kernels.ddim_step`` reads). x (N, C, H, W), t (N,)."""
    return unet_forward(unet, torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))


def guide(halves: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """[uncond; cond] (2N, ...) -> the guided output out_u + g * (out_c - out_u) (N, ...)."""
    out_u, out_c = halves.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


def cfg_model_output(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                     guidance_scale: float) -> torch.Tensor:
    """Guided model output: one UNet call on [uncond; cond] (2N batch). x (N, C, H, W), t (N,)."""
    return guide(cfg_halves(unet, x, t, cond, uncond), guidance_scale)


@torch.no_grad()
def sample(unet, schedule: DDIMSchedule, cond: Conditioning, uncond: Conditioning, x: torch.Tensor,
           guidance_scale: float, eta: float, generator: torch.Generator | None = None, *,
           backend: str | None = None) -> torch.Tensor:
    """Plain DDIM sampling from noise x (N, C, H, W) to latents x0.

    Every step is one ``spo_fast.kernels.ddim_step.ddim_step`` call (guidance, mean/std and the noise drawn
    inside the op; ``backend`` as for the kernels). Its noise comes from one RNG state tensor whose seed is drawn
    from ``generator`` on the device (no host read), advanced by N*C*H*W per step. The op's torch and Triton
    backends draw the same noise up to float rounding, so a CPU and a CUDA run of one seed differ by rounding only."""
    n = x.shape[0]
    state = state_from_generator(generator, x.device)
    for t_scalar in schedule.timesteps:
        t = t_scalar.expand(n)
        halves = cfg_halves(unet, x, t, cond, uncond)
        st = ddim_step(x, halves.to(x.dtype), guidance_scale, schedule.alpha(t), schedule.alpha(schedule.prev(t)),
                       eta, state, prediction_type=schedule.prediction_type, backend=backend)
        x = st.x_prev
    return x
