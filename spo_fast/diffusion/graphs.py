"""The rollout's fixed-shape calls, run eagerly, as captured CUDA graphs, or compiled (``sampling.graphs``).

An SPO rollout makes the same few calls over and over with the same shapes: the UNet on the B samples (plain
steps) or on the B*k pool (inner steps, the scoring call), the VAE decode of the B*k chain ends and the preference
model on the decoded images. On a GPU each such call is hundreds of small kernel launches, whose overhead capture
removes; how much that buys at the recipe shapes is not measured yet (the ``graphs_cuda`` / ``graphs_compile`` rows
of benchmarks/gpu_suite.sh's ablation measure it). Three modes:

- ``off``: plain eager calls.
- ``cuda_graphs``: ``GraphedCall`` captures each call once per input signature (shapes, dtypes, autocast state)
  after a warm-up on a side stream, then copies new inputs into its static input buffers, replays the graph and
  returns CLONES of the static outputs (a later replay overwrites them; the rollout keeps some outputs across
  calls). All graphs share one memory pool: safe because every graph's inputs live outside the pool and its
  outputs are cloned before any other graph replays, so whatever one graph's replay overwrites in the pool is dead.
  Under autocast the capture runs with ``cache_enabled=False``: with the cache on, a graph would replay the casts
  of the LoRA weights made at capture time and never see the optimizer's updates.
- ``compile``: ``torch.compile(mode="reduce-overhead")`` of the same calls (inductor kernels + CUDA graph trees
  on CUDA; inductor only on CPU).

**LoRA under graphs.** The rollout runs the policy UNet with its adapters enabled and never toggles
``disable_adapters`` (the reference is used in training only, outside any captured region). The optimizer updates
the LoRA parameters in place, so a graph captured at the first rollout reads the current weights at every later
replay: no re-capture, no merge. Merging the LoRA into the base weights for the rollout would save the LoRA
matmuls (rank 4: ~0.1% of the UNet's parameters, so about that share of its FLOPs; an estimate from the
parameter count, not measured) but needs an unmerge after each rollout, which in bf16 drifts the
base weights by rounding every iteration; a separate merged copy would cost a second UNet's memory. By that
estimate neither pays at rank 4; see docs/speed.md.

The calls must be free of host reads and data-dependent shapes (checked on CPU by
tests/test_rollout.py::test_rollout_segment_compiles_fullgraph) and of random draws (the UNet, VAE decode and
preference model in eval mode have none; the step ops, which draw, stay outside and read their RNG state from
device memory).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

MODES = ("off", "cuda_graphs", "compile")


def _signature(args: tuple) -> tuple:
    dev = next((a.device for a in args if a is not None), torch.device("cpu"))
    autocast = torch.is_autocast_enabled(dev.type)
    return (tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args),
            torch.is_grad_enabled(), autocast, torch.get_autocast_dtype(dev.type) if autocast else None)


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    return type(out)(_clone(o) for o in out)


class GraphedCall:
    """``fn(*args)`` (tensors or None; returns a tensor or a tuple of tensors) replayed from one CUDA graph per input
    signature. See the module docstring for the rules that make this safe."""

    def __init__(self, fn: Callable, pool=None, warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.pool = pool
        self.graphs: dict[tuple, tuple] = {}

    def _capture(self, args: tuple) -> tuple:
        static_in = tuple(None if a is None else a.clone() for a in args)
        dev = next(a.device for a in args if a is not None)
        autocast = torch.is_autocast_enabled(dev.type)
        amp = torch.get_autocast_dtype(dev.type)

        def run():
            if not autocast:
                return self.fn(*static_in)
            with torch.autocast(dev.type, dtype=amp, cache_enabled=False):
                return self.fn(*static_in)

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream(dev).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = run()
        return static_in, static_out, graph

    def __call__(self, *args):
        for i, a in enumerate(args):
            if a is not None and not isinstance(a, torch.Tensor):
                raise TypeError(f"sampling.graphs=cuda_graphs: argument {i} of {getattr(self.fn, '__name__', self.fn)} "
                                f"is a {type(a).__name__}; a captured call takes tensors (or None) only, so a scorer's "
                                f"prepared prompts must be a tensor. Use sampling.graphs=off or compile")
        key = _signature(args)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(args)
        static_in, static_out, graph = entry
        for s, a in zip(static_in, args):
            if s is not None and s.data_ptr() != a.data_ptr():
                s.copy_(a)
        graph.replay()
        return _clone(static_out)


class CallWrapper:
    """Wraps the rollout's calls for one ``sampling.graphs`` mode; all ``cuda_graphs`` calls share one pool."""

    def __init__(self, mode: str, device: torch.device | str):
        if mode not in MODES:
            raise ValueError(f"sampling.graphs={mode!r}; expected one of {'|'.join(MODES)}")
        if mode == "cuda_graphs" and torch.device(device).type != "cuda":
            raise ValueError(f"sampling.graphs=cuda_graphs needs a CUDA device (the rollout runs on {device}); "
                             f"use sampling.graphs=off or compile")
        self.mode = mode
        self.pool = torch.cuda.graph_pool_handle() if mode == "cuda_graphs" else None

    def __call__(self, fn: Callable) -> Callable:
        if self.mode == "cuda_graphs":
            return GraphedCall(fn, self.pool)
        if self.mode == "compile":
            return torch.compile(fn, mode="reduce-overhead", dynamic=False)
        return fn
