"""Named stages of an SPO iteration or a Diffusion-DPO step, for traces and for the end-to-end benchmarks.

Every stage is a ``torch.profiler.record_function`` range, so ``profile.enabled=true`` shows the split in the
trace (TensorBoard's profiler plugin, Perfetto or chrome://tracing), under these names::

    rollout/unet      UNet calls of the rollout (CFG on the pool, the scoring call at chain ends)
    rollout/decode    VAE decode of the chain ends' x0_hat
    rollout/score     the preference model's image tower (or any scorer's score)
    rollout/step      the DDIM step op and the pair selection (the fused kernels and their glue)
    train/ref         the reference forward (no grad)
    train/policy      the policy forward
    train/backward    backward through the policy
    train/optimizer   gradient clipping, optimizer and lr-scheduler step, zero_grad

Outside a ``StageTimer`` a stage is only the range (no device sync, no cost beyond the profiler's when one
is recording). Inside ``with StageTimer(device) as timer`` each stage synchronises the device on entry and on
exit and adds its wall time to ``timer.seconds[name]`` (so stages are timed separately, at the price of the
overlap the syncs remove: time the whole iteration without a timer for its true wall time); with
``count_flops=True`` the timer also runs ``torch.utils.flop_counter.FlopCounterMode`` and attributes the FLOPs
counted inside each stage to it (``timer.flops[name]``). Stages do not nest (an inner stage inside an outer one
would be counted in both): the names above are leaves.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

STAGES = ("rollout/unet", "rollout/decode", "rollout/score", "rollout/step",
          "train/ref", "train/policy", "train/backward", "train/optimizer")

_active: StageTimer | None = None


class StageTimer:
    """Wall time (and optionally FLOPs) per stage while active; see the module docstring."""

    def __init__(self, device: torch.device | str | None = None, count_flops: bool = False):
        self.device = torch.device(device) if device is not None else None
        self.count_flops = count_flops
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._counter = None
        self._prev: StageTimer | None = None

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> StageTimer:
        global _active
        if self.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._prev, _active = _active, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = self._prev
        if self._counter is not None:
            self._counter.__exit__(*exc)
            self._counter = None

    def total_flops(self) -> int:
        return self._counter.get_total_flops() if self._counter is not None else 0

    @contextlib.contextmanager
    def _time(self, name: str):
        self._sync()
        f0, t0 = self.total_flops(), time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0
            self.flops[name] += self.total_flops() - f0
            self.calls[name] += 1

    def summary(self) -> dict:
        """{stage: {"seconds", "flops", "calls"}} for the stages that ran."""
        return {k: {"seconds": self.seconds[k], "flops": self.flops[k], "calls": self.calls[k]} for k in self.calls}


@contextlib.contextmanager
def stage(name: str):
    """The named range (always) and, under an active ``StageTimer``, its timing."""
    with torch.profiler.record_function(name):
        timer = _active
        if timer is None:
            yield
        else:
            with timer._time(name):
                yield
