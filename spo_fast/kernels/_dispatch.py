"""Which implementation an op in ``spo_fast.kernels`` runs: its PyTorch reference or its Triton kernel.

Every op's public function calls ``resolve_backend(backend, tensors)`` once per call. Precedence:
the explicit ``backend`` argument, then the environment variable ``SPO_FAST_KERNELS``, then ``auto``.

- ``torch``: the plain-PyTorch reference, on any device.
- ``triton``: the Triton kernel; CUDA tensors compile it, CPU tensors run Triton's interpreter, which
  needs ``TRITON_INTERPRET=1`` (triton's rule: with it set, CUDA tensors run interpreted too). Anything
  else raises RuntimeError saying what to set.
- ``auto``: ``triton`` where it can run (CUDA tensors with triton importable; CPU tensors with
  ``TRITON_INTERPRET=1`` and triton importable), ``torch`` otherwise.

Nothing here queries a device or imports triton at import time: a CPU-only machine without triton
imports every op. triton is imported only when the tensors could run it.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import torch

ENV_VAR = "SPO_FAST_KERNELS"
BACKENDS = ("torch", "triton", "auto")


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is requested (``TRITON_INTERPRET=1``); triton reads the variable when
    a kernel is decorated, so it must be set before an op first runs (kernels are built on first use)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_import_error() -> str | None:
    """None when ``import triton`` works, else the error as text. Not cached: once triton is imported this
    is a dict lookup in sys.modules, and a failed import stays visible if the environment changes."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


def resolve_backend(backend: str | None, tensors: Iterable[torch.Tensor]) -> str:
    """``"torch"`` or ``"triton"`` for an op on ``tensors`` (see the module docstring for the rules).

    Raises ValueError for a value other than torch|triton|auto (naming where it came from), and
    RuntimeError when ``triton`` is asked for where it cannot run (naming the reason and the fix).
    """
    if backend is not None:
        choice, source = backend, "backend argument"
    else:
        choice, source = os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}"
    if choice not in BACKENDS:
        raise ValueError(f"{source} is {choice!r}; expected one of {'|'.join(BACKENDS)}")
    if choice == "torch":
        return "torch"

    device_types = sorted({t.device.type for t in tensors})
    # Mixed CPU/CUDA inputs go to the kernel, whose launcher names the tensor on the wrong device.
    on_cuda = "cuda" in device_types
    on_cpu = device_types == ["cpu"]
    if choice == "auto":
        if (on_cuda or (on_cpu and interpreter_enabled())) and triton_import_error() is None:
            return "triton"
        return "torch"

    # choice == "triton": say why it cannot run rather than fall back silently
    if not (on_cuda or on_cpu):
        raise RuntimeError(f"{source}=triton, but the tensors are on {', '.join(device_types) or 'no device'}; "
                           f"the Triton kernels run on CUDA (or on CPU under TRITON_INTERPRET=1). "
                           f"Use {ENV_VAR}=torch (or backend='torch') for this device")
    error = triton_import_error()
    if error is not None:
        raise RuntimeError(f"{source}=triton, but triton cannot be imported ({error}); "
                           f"install triton or use {ENV_VAR}=torch (or backend='torch')")
    if on_cpu and not interpreter_enabled():
        raise RuntimeError(f"{source}=triton, but the tensors are on CPU and Triton's interpreter is off; "
                           f"set TRITON_INTERPRET=1 before the first kernel call (slow: tests only), "
                           f"move the tensors to CUDA, or use {ENV_VAR}=torch (or backend='torch')")
    return "triton"


# ----------------------------------------------------------------------------- launcher helpers shared by the ops
MAX_INT63 = 2**63


def describe(name: str, t: torch.Tensor) -> str:
    """``name (shape) dtype on device``: how launcher errors name a tensor."""
    return f"{name} {tuple(t.shape)} {t.dtype} on {t.device}"


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1 inputs included)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_rng(seed: int, offset: int, n_draws: int) -> None:
    """Philox seed/offset ranges (int64 counters): 0 <= seed < 2**63, offset + n_draws < 2**63."""
    if not 0 <= seed < MAX_INT63:
        raise ValueError(f"seed is {seed}; expected 0 <= seed < 2**63")
    if offset < 0 or offset + n_draws >= MAX_INT63:
        raise ValueError(f"offset is {offset}; expected offset >= 0 and offset + {n_draws} draws < 2**63")
