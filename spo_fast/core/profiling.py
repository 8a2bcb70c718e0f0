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
counted inside each stage to it (``timer.flops[name]``); ``meters={name: fn}`` attributes the growth of any other
running count the same way (``timer.meters[name][stage]``: the estimator's bytes moved). The CPU's flash attention
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward, what SDPA runs on a CPU) is counted like the GPU's
flash attention; torch's counter leaves it out. Stages do not nest (an inner stage inside an outer one
would be counted in both): the names above are leaves.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # typing.Self is 3.11+; the package supports 3.10
    from typing_extensions import Self

STAGES = ("rollout/unet", "rollout/decode", "rollout/score", "rollout/step",
          "train/ref", "train/policy", "train/backward", "train/optimizer")

_active: StageTimer | None = None


def _register_cpu_attention_flops() -> None:
    """Count the CPU flash attention as torch counts the CUDA one (same formula: the two matmuls of attention;
    backward: the four of its gradient), so that FLOPs agree between a CPU (or fake) run and a GPU run."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:
        fc.register_flop_formula(fwd)(lambda q, k, v, *args, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
    if bwd is not None and bwd not in fc.flop_registry:
        fc.register_flop_formula(bwd)(
            lambda grad_out, q, k, v, *args, out_shape=None, **kw: fc.sdpa_backward_flop_count(grad_out, q, k, v))


_register_cpu_attention_flops()


class StageTimer:
    """Wall time (and optionally FLOPs) per stage while active; see the module docstring."""

    def __init__(self, device: torch.device | str | None = None, count_flops: bool = False,
                 meters: dict | None = None):
        self.device = torch.device(device) if device is not None else None
        self.count_flops = count_flops
        self._meters = dict(meters or {})
        self.meters: dict[str, dict[str, float]] = {m: defaultdict(float) for m in self._meters}
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._counter = None
        self._prev: StageTimer | None = None

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Self:
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
        m0 = {m: fn() for m, fn in self._meters.items()}
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0
            self.flops[name] += self.total_flops() - f0
            for m, fn in self._meters.items():
                self.meters[m][name] += fn() - m0[m]
            self.calls[name] += 1

    def summary(self) -> dict:
        """{stage: {"seconds", "flops", "calls", and each meter}} for the stages that ran."""
        return {k: {"seconds": self.seconds[k], "flops": self.flops[k], "calls": self.calls[k],
                    **{m: v[k] for m, v in self.meters.items()}} for k in self.calls}


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
