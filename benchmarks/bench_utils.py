"""Helpers for the benchmarks (device, timing, copy bandwidth, peak memory, ``extra_info``); the fixtures and
the ``machine_info`` hook that use them are in ``conftest.py``. Imported as a plain module (``benchmarks/`` is
on ``sys.path`` under pytest's default import mode), so its name must not clash with ``tests/conftest.py``."""
from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

# copy-bandwidth probe: bytes per buffer (the copy reads one and writes the other)
COPY_BYTES_CUDA = 1 << 30  # 1 GiB: far beyond any L2
COPY_BYTES_CPU = 64 << 20  # 64 MiB: beyond the last-level cache, quick on a shared 2-core box


# ----------------------------------------------------------------------------- device and environment
def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


@functools.cache
def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``, then ``platform.processor()``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.cache
def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def sync(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- providers and skips
COMPILE_ENV = "SPO_FAST_BENCH_COMPILE"


def skip_reason(provider: str, shape_name: str, where: str, dtype_name: str, device: torch.device) -> str | None:
    """Why a (provider, shape, dtype) case does not run on ``device``, or None. ``where``: the shape's
    ``any`` | ``gpu`` (the GPU-filling size) | ``cpu`` (its CPU stand-in, ``small``). The rules every op's
    benchmark shares: bf16 on GPU only; Triton on CUDA only and never interpreted; torch.compile on CPU only
    with SPO_FAST_BENCH_COMPILE=1 and at ``sd15``."""
    cuda = is_cuda(device)
    if where == "gpu" and not cuda:
        return f"'{shape_name}' is GPU-only (the CPU runs 'small' instead)"
    if where == "cpu" and cuda:
        return f"'{shape_name}' is the CPU stand-in for 'large'"
    if dtype_name != "fp32" and not cuda:
        return f"{dtype_name} is benchmarked on GPU only (CPU: fp32)"
    if provider == "triton":
        if not cuda:
            return "Triton needs a CUDA GPU"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 is set: interpreted Triton timings are meaningless; unset it"
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton cannot be imported ({e})"
    if provider == "compile" and not cuda:
        if os.environ.get(COMPILE_ENV) != "1":
            return f"torch.compile on CPU is slow (tens of seconds to compile); set {COMPILE_ENV}=1 to run it at 'sd15'"
        if shape_name != "sd15":
            return "torch.compile on CPU runs at 'sd15' only"
    return None


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, once per function: one compiled function serves every shape and dtype of a
    session, so dynamo's recompile limit is raised to allow them."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- timing
def median_seconds(fn: Callable[[], object], device: torch.device, *, reps: int = 5, inner: int = 1,
                   warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``reps`` repetitions of ``inner`` back-to-back calls.

    CUDA: ``torch.cuda.Event`` pairs around each repetition (device time, launches queued back to back, one
    sync per repetition); CPU: ``time.perf_counter``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if is_cuda(device):
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def _copy_seconds(nbytes: int, device: torch.device) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    cuda = is_cuda(device)
    return median_seconds(lambda: dst.copy_(src), device, reps=10 if cuda else 5, inner=5 if cuda else 1,
                          warmup=3 if cuda else 1)


@functools.cache
def measure_copy_bandwidth(device: torch.device | str) -> dict:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s, read + write counted), once per session and
    device: 1 GiB buffers on CUDA, 64 MiB on CPU."""
    device = torch.device(device)
    nbytes = COPY_BYTES_CUDA if is_cuda(device) else COPY_BYTES_CPU
    seconds = _copy_seconds(nbytes, device)
    if is_cuda(device):
        torch.cuda.empty_cache()
    return {"copy_buffer_bytes": nbytes, "copy_seconds": seconds, "copy_gbps": 2 * nbytes / seconds / 1e9}


# ----------------------------------------------------------------------------- memory
def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one call of ``fn``: ``torch.cuda.max_memory_allocated`` (absolute, and above what was
    allocated before the call) on CUDA; None on CPU (no allocator statistics there)."""
    if not is_cuda(device):
        return {"peak_mem_bytes": None, "peak_mem_extra_bytes": None}
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mem_bytes": peak, "peak_mem_extra_bytes": peak - before}


# ----------------------------------------------------------------------------- extra_info
def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def benchmark_seconds(benchmark) -> float | None:
    """pytest-benchmark's median for the run that just finished; None when benchmarking is disabled."""
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    median = getattr(inner, "median", None)
    return float(median) if median is not None and math.isfinite(median) and median > 0 else None


def fill_extra_info(benchmark, *, op: str, provider: str, shape_name: str, shape: dict, dtype: torch.dtype,
                    device: torch.device, bytes_moved: int, fn: Callable[[], object],
                    copy_bandwidth: dict, extra_bytes: dict[str, int] | None = None) -> dict:
    """Fill ``benchmark.extra_info`` after ``benchmark(fn)`` has run.

    ``bytes_moved`` is the op's minimal traffic (every input read once, every output written once). The
    achieved GB/s comes from a separate timing of ``fn`` (CUDA events, launches back to back: device
    throughput) on CUDA; on CPU from pytest-benchmark's median (falling back to a perf_counter median when
    benchmarking is disabled). ``extra_bytes``: other traffic models, each reported as ``<name>`` bytes with
    its own GB/s and copy fraction."""
    if is_cuda(device):
        seconds, source = median_seconds(fn, device, reps=7, inner=10, warmup=3), "cuda_events"
    else:
        seconds, source = benchmark_seconds(benchmark), "pytest_benchmark_median"
        if seconds is None:
            seconds, source = median_seconds(fn, device, reps=3), "perf_counter"
    copy_gbps = copy_bandwidth["copy_gbps"]
    info = {
        "op": op,
        "provider": provider,
        "shape_name": shape_name,
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "bytes_moved": bytes_moved,
        "time_s_median": seconds,
        "time_source": source,
        "achieved_gbps": bytes_moved / seconds / 1e9,
        "copy_gbps": copy_gbps,
        "copy_fraction": bytes_moved / seconds / 1e9 / copy_gbps,
    }
    for name, nbytes in (extra_bytes or {}).items():
        info[name] = nbytes
        info[f"{name}_gbps"] = nbytes / seconds / 1e9
        info[f"{name}_copy_fraction"] = nbytes / seconds / 1e9 / copy_gbps
    info.update(peak_memory(fn, device))
    benchmark.extra_info.update(info)
    return info
