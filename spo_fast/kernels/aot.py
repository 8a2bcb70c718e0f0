"""Ahead-of-time compilation of every Triton kernel variant the launchers of ``spo_fast.kernels`` can pick, for
real GPUs (sm_80: A100, sm_90: H100/H200), on a machine without one; per variant the registers, spills, stack
and shared memory that ptxas and Triton report. ``python -m spo_fast.kernels.aot`` writes them to
``benchmarks/results/kernel_resources.json``; ``tests/test_kernels_aot.py`` fails on a variant that does not
compile or that spills.

What a variant is. Triton compiles one binary per (kernel, signature, constexprs, specialisation attributes): the
signature is each argument's type (a tensor's element type, an int's i32/i64 width); Triton's JIT also turns an
int argument equal to 1 into a constexpr and marks ints that are multiples of 16, and pointers 16-byte aligned,
with a divisibility hint (``tt.divisibility``). None of that is written down here: the variants come from the
launchers themselves. ``enumerate_variants`` calls every public launcher on CPU tensors with each kernel replaced
by a stub that records the launch (``stub[grid](*args, **constexprs)``) instead of running it, and passes each
recorded launch through Triton's own argument binder and ``_pack_args`` (what ``JITFunction.run`` does before it
compiles; triton 3.6/3.7 API) for the cuda backend. So a new argument, a changed dtype rule or a new block choice
in a launcher reaches this table by itself, and a new kernel shows up as uncovered in the test.

What the launchers are driven with (``_OPS``), per op:
- **main axes**, crossed in full: every input dtype the launcher accepts (probed: fp32, fp16, bf16 and fp64 are
  offered, the combinations the launcher rejects with TypeError are skipped, so mixed dtypes are in where
  accepted), every constexpr switch (V_PRED through ``prediction_type``, SHARED_POL / SHARED_REF through the mean
  shapes, HAS_U through ``u``), and each public launcher of the op (``ddim_step`` is ``pooled_ddim_step`` with
  k = 1, which Triton compiles with K as a constexpr);
- **size classes**: candidate sizes (1..16, every power of two up to 2^23 and each plus 16; the launchers' block
  helpers round up to powers of two and multiply by small counts, so their choices change only at those
  boundaries) are each launched once at the axes' defaults, and the sizes are grouped by the constexprs of the
  launches they produce (BLOCK and BLOCKS_PER_PROGRAM, BLOCK_K and BLOCK_D, the log-density kernel's BLOCK_P):
  one size per group, crossed with every main-axis combination. The test checks the groups against an
  exhaustive scan of each module's ``_blocks``;
- **side axes**, per-sample scalars that a kernel loads once per program and upcasts (alpha_t and alpha_prev of
  the step, u of the pair selection; sigma, valid and the mode of the loss, which do not reach its kernels):
  every accepted dtype appears in a variant, one value at a time, at the smallest size class with the other axes
  at their defaults. Crossing them with the rest would multiply the variants (16 alpha dtype pairs per step
  variant) for a one-register difference at kernel entry.
- the int arguments Triton specialises on their value (sizes, strides) take one representative value per
  variant: the size of each class that is a multiple of 16 where the class has one (every size and stride then
  gets the divisibility hint: the vectorised, register-heaviest form, and the one SD latents take), no size 1
  where the class allows it, B = N = 2, k = 4 for the pooled step. Other values of those ints give other binaries
  (an unaligned size, a batch of 1), not enumerated. The Philox seed and offset reach the kernels in an int64
  device tensor (``spo_fast.kernels.philox``), so their values do not specialise anything.
- ``MANUAL_RTNE`` (the step's hand rounding to bf16) is for Triton's interpreter only: the launcher sets it only
  under TRITON_INTERPRET=1, so on a GPU, and here, it is always False.

How a variant is compiled: ``triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget(
"cuda", arch, 32), options)``, with the kernel object the module's own ``_kernels()`` builds, in worker processes
(a spawn pool, ``jobs`` of them) that import triton with TRITON_INTERPRET unset whatever the caller's environment
(tests set it; under it triton.language's helpers are interpreter functions that cannot be compiled) and that
compile into a private, temporary Triton cache: every variant is compiled, so ptxas runs for every variant and
its ``-v`` report (TRITON_DUMP_PTXAS_LOG) is read. Per (variant, arch): registers, spill stores and loads and the
stack frame (local memory per thread: spills plus local arrays, e.g. the 32 bytes of libdevice's sin/cos slow
path in ``tl.randn``'s Box-Muller cos) from that report, shared memory from Triton's metadata (the dynamic shared memory
the launch requests, scratch for reductions and layout conversions; ptxas reports no static shared memory for
Triton kernels, and any it did report is added), num_warps, and the compile time. ptxas is the one bundled with
the triton wheel, the one the JIT runs on a GPU, so the numbers are the ones a GPU run of this triton gets.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spo_fast.core import jsonio

from . import _dispatch, ddim_step, pair_select, spo_loss

ARCHS = (80, 90)
DEFAULT_OUT = Path("benchmarks/results/kernel_resources.json")
KERNEL_MODULES = (spo_loss, ddim_step, pair_select)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # offered to every dtype axis
_SEED, _OFFSET = 2**62 + 12345, 2**32  # the launchers put them in the RNG state tensor the kernels read
_SIZE_CANDIDATES = sorted({*range(1, 17), *(2**i for i in range(24)), *(2**i + 16 for i in range(24))})


# ----------------------------------------------------------------------------- recording the launches
@dataclass
class Launch:
    """One kernel launch as a launcher issued it: the jitted kernel (a ``triton.JITFunction``), its arguments."""

    kernel: Any
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a jitted kernel: ``stub[grid](*args, **kwargs)`` appends a Launch instead of running it."""

    def __init__(self, kernel: Any, sink: list[Launch]) -> None:
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid) -> Callable[..., None]:
        return lambda *args, **kwargs: self.sink.append(Launch(self.kernel, args, kwargs))


@contextlib.contextmanager
def _without_interpreter() -> Iterator[None]:
    """TRITON_INTERPRET unset within, as on a GPU: the launchers read it (MANUAL_RTNE) and ``_kernels()`` builds
    compiled-mode JITFunctions without it. Only around launcher calls and ``_kernels()``: triton itself (and what it
    imports lazily, e.g. gluon from the argument binder) stays under the caller's setting, which a test session's
    interpreter tests need."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


@contextlib.contextmanager
def _recording() -> Iterator[list[Launch]]:
    """Within: every kernel launch of the three modules is appended to the yielded list and runs nothing, and CPU
    tensors take the Triton path as CUDA tensors do (``resolve_backend`` is told the interpreter is on, so that it
    accepts them)."""
    import triton  # noqa: F401  (under the caller's TRITON_INTERPRET)

    sink: list[Launch] = []
    saved_kernels = {m: m._kernels for m in KERNEL_MODULES}
    saved_interp = _dispatch.interpreter_enabled
    try:
        for m in KERNEL_MODULES:
            with _without_interpreter():
                stubs = tuple(_Recorder(k, sink) for k in m._kernels())
            m._kernels = lambda stubs=stubs: stubs
        _dispatch.interpreter_enabled = lambda: True
        yield sink
    finally:
        for m, f in saved_kernels.items():
            m._kernels = f
        _dispatch.interpreter_enabled = saved_interp


def _record(sink: list[Launch], call: Callable[[], None],
            rejected: tuple[type[Exception], ...] = (TypeError,)) -> list[Launch] | None:
    """The launches ``call()`` appends to ``sink`` (a ``_recording`` list), taken out of it (so the inputs they hold
    are freed with them), or None when the launcher rejects its inputs with one of ``rejected`` (TypeError: the
    launchers' answer to a dtype they do not take). The call runs without TRITON_INTERPRET."""
    start = len(sink)
    try:
        with _without_interpreter():
            call()
    except rejected:
        return None
    finally:
        launches = sink[start:]
        del sink[start:]
    return launches


# ----------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One binary Triton compiles: a kernel of one module with Triton's specialisation of one launch.

    ``signature``: (name, type) per argument in order, ``"constexpr"`` for constexprs (the declared ones and the
    ints Triton specialised to 1); ``constexprs``: (name, value); ``divisible``: names with the 16-divisibility
    hint; ``options``: the launch's compile options (num_warps etc., debug), passed to ``triton.compile``."""

    module: str
    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    divisible: tuple[str, ...]
    options: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return f"{self.module}.{self.kernel}"

    def describe(self) -> str:
        """``x_ptr:*bf16:16, ..., K=1, ..., BLOCK=1024``: type (``:16`` = divisibility hint) or constexpr value."""
        consts = dict(self.constexprs)
        parts = []
        for name, ty in self.signature:
            if ty == "constexpr":
                parts.append(f"{name}={consts[name]}")
            else:
                parts.append(f"{name}:{ty}:16" if name in self.divisible else f"{name}:{ty}")
        return ", ".join(parts)


def _specialise(launch: Launch, backend: Any) -> Variant:
    """The Variant Triton's JIT would compile for ``launch`` on ``backend`` (JITFunction.run's first steps)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = kernel.arg_names
    if any(len(path) != 1 for path in (*constexprs, *attrs)):
        raise NotImplementedError(f"{kernel.fn.__name__}: tuple arguments are not handled here")
    divisible = tuple(names[path[0]] for path, specs in attrs.items() if ["tt.divisibility", 16] in specs)
    unknown = [spec for specs in attrs.values() for spec in specs if spec != ["tt.divisibility", 16]]
    if unknown:
        raise NotImplementedError(f"{kernel.fn.__name__}: specialisation attributes {unknown} are not handled here")
    return Variant(module=kernel.fn.__module__.rsplit(".", 1)[-1], kernel=kernel.fn.__name__,
                   signature=tuple(signature.items()),
                   constexprs=tuple((names[path[0]], value) for path, value in constexprs.items()),
                   divisible=divisible, options=tuple(sorted(options.items())))


@dataclass
class _Op:
    """How to drive one op's launchers. ``call(size, **axes)`` makes one launcher call; ``sizes`` are the
    candidate sizes it takes; ``main`` axes are crossed in full with every size class, ``side`` axes (first value
    the default) are varied one at a time at the smallest size class (see the module docstring)."""

    name: str
    call: Callable[..., None]
    sizes: Sequence[tuple[int, ...]]
    main: dict[str, Sequence[Any]]
    side: dict[str, Sequence[Any]] = field(default_factory=dict)


def _call_spo_loss(size: tuple[int], dtype: torch.dtype, shared_pol: bool, shared_ref: bool,
                   sigma_dtype: torch.dtype = torch.float32, valid_dtype: torch.dtype = torch.bool,
                   mode: str = "spo") -> None:
    """spo_loss forward and backward on N = 2 samples of ``size`` elements (the trainer's strided win/lose views
    of one (N, 2, CHW) buffer)."""
    n, (chw,) = 2, size
    x = torch.empty(n, 2, chw, dtype=dtype)
    pol = torch.empty((n, chw) if shared_pol else (2, n, chw), dtype=dtype, requires_grad=True)
    ref = torch.empty((n, chw) if shared_ref else (2, n, chw), dtype=dtype)
    out = spo_loss.spo_loss(pol, ref, x[:, 0], x[:, 1], torch.ones(n, dtype=sigma_dtype),
                            torch.ones(n, dtype=valid_dtype), mode=mode, backend="triton")
    out.loss.backward()


def _call_ddim_step(size: tuple[int], dtype: torch.dtype, out_dtype: torch.dtype, prediction_type: str,
                    launcher: str, alpha_t_dtype: torch.dtype = torch.float32,
                    alpha_prev_dtype: torch.dtype = torch.float32) -> None:
    """``pooled_ddim_step`` (k = 4) or ``ddim_step`` (k = 1) on B = 2 samples of ``size`` elements."""
    b, (chw,) = 2, size
    x, out = torch.empty(b, chw, dtype=dtype), torch.empty(2 * b, chw, dtype=out_dtype)
    a_t, a_p = torch.full((b,), 0.5, dtype=alpha_t_dtype), torch.full((b,), 0.6, dtype=alpha_prev_dtype)
    if launcher == "pooled_ddim_step":
        ddim_step.pooled_ddim_step(x, out, 7.5, a_t, a_p, 1.0, 4, _SEED, _OFFSET, prediction_type=prediction_type,
                                   backend="triton")
    else:
        ddim_step.ddim_step(x, out, 7.5, a_t, a_p, 1.0, _SEED, _OFFSET, prediction_type=prediction_type,
                            backend="triton")


def _call_philox_normal(size: tuple[int]) -> None:
    ddim_step.philox_normal(_SEED, _OFFSET, size)


def _call_score_and_select(size: tuple[int, int], img_dtype: torch.dtype, txt_dtype: torch.dtype,
                           u_dtype: torch.dtype | None) -> None:
    """score_and_select on B = 2 pools of k candidates of D features (``size`` = (k, D)); u_dtype None: no u,
    the kernel draws it."""
    b, (k, d) = 2, size
    u = None if u_dtype is None else torch.full((b,), 0.5, dtype=u_dtype)
    pair_select.score_and_select(torch.empty(b * k, d, dtype=img_dtype), torch.empty(b, d, dtype=txt_dtype), 100.0,
                                 k, 0.3, u, _SEED, _OFFSET, backend="triton")


def _call_philox_uniform(size: tuple[int]) -> None:
    pair_select.philox_uniform(_SEED, _OFFSET, size[0])


_OPS = (
    _Op("spo_loss", _call_spo_loss, [(c,) for c in _SIZE_CANDIDATES],
        main={"dtype": _DTYPES, "shared_pol": (True, False), "shared_ref": (True, False)},
        side={"sigma_dtype": _DTYPES, "valid_dtype": (torch.bool, *_DTYPES), "mode": ("spo", "dpo")}),
    _Op("ddim_step", _call_ddim_step, [(c,) for c in _SIZE_CANDIDATES],
        main={"dtype": _DTYPES, "out_dtype": _DTYPES, "prediction_type": ddim_step.PREDICTION_TYPES,
              "launcher": ("pooled_ddim_step", "ddim_step")},
        side={"alpha_t_dtype": _DTYPES, "alpha_prev_dtype": _DTYPES}),
    _Op("philox_normal", _call_philox_normal, [(4096,)], main={}),
    _Op("score_and_select", _call_score_and_select,
        [(k, d) for k in _SIZE_CANDIDATES if k <= 2**11 for d in _SIZE_CANDIDATES if d <= 2**15],
        main={"img_dtype": _DTYPES, "txt_dtype": _DTYPES, "u_dtype": (None, torch.float32)},
        side={"u_dtype": (torch.float32, torch.float16, torch.bfloat16, torch.float64)}),
    _Op("philox_uniform", _call_philox_uniform, [(4096,)], main={}),
)


def _aligned_first(size: tuple[int, ...]) -> tuple:
    """Sort key for a size class's representative: most values multiples of 16, then fewest 1s (Triton makes an
    int equal to 1 a constexpr), then the smallest."""
    return (-sum(v % 16 == 0 for v in size), sum(v == 1 for v in size), size)


def _size_classes(op: _Op, sink: list[Launch], defaults: dict[str, Any]) -> list[tuple[int, ...]]:
    """One representative size per group of candidate sizes whose launches carry the same constexprs; sizes the
    launcher rejects (ValueError: e.g. k > 1024 candidates per pool) are skipped."""
    groups: dict[tuple, list[tuple[int, ...]]] = {}
    for size in op.sizes:
        launches = _record(sink, lambda size=size: op.call(size, **defaults), rejected=(ValueError,))
        if launches is not None:
            key = tuple((la.kernel.fn.__name__, tuple(sorted(la.kwargs.items()))) for la in launches)
            groups.setdefault(key, []).append(size)
    return sorted(min(sizes, key=_aligned_first) for sizes in groups.values())


def _op_calls(op: _Op, sink: list[Launch]) -> Iterator[Callable[[], None]]:
    """Every launcher call of ``op`` (module docstring): the accepted main-axis combinations x the size classes,
    then each further side value. Main-axis combinations are probed at the smallest candidate size."""
    combos = [dict(zip(op.main, values)) for values in itertools.product(*op.main.values())]
    accepted = [c for c in combos if _record(sink, lambda c=c: op.call(op.sizes[0], **c)) is not None]
    if not accepted:
        raise TypeError(f"{op.name}: the launcher rejects every main-axis combination")
    defaults = {**{name: values[0] for name, values in op.side.items()}, **accepted[0]}
    classes = _size_classes(op, sink, defaults)
    for size in classes:
        for combo in accepted:
            yield lambda size=size, combo=combo: op.call(size, **{**defaults, **combo})
    for name, values in op.side.items():
        for value in values[1:]:
            yield lambda name=name, value=value: op.call(classes[0], **{**defaults, name: value})


def enumerate_variants() -> list[Variant]:
    """Every variant the launchers pick (module docstring), deduplicated, in first-launch order. Needs triton, no
    GPU; restores the kernel modules and TRITON_INTERPRET (the modules keep the compiled-mode kernels their
    ``_kernels()`` built, unused unless TRITON_INTERPRET is unset)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", ARCHS[-1], 32))  # the cuda backend's specialisation rules
    variants: dict[Variant, None] = {}
    with _recording() as sink:
        for op in _OPS:
            for call in _op_calls(op, sink):
                for launch in _record(sink, call) or ():  # None: a side value the launcher rejects
                    variants.setdefault(_specialise(launch, backend))
    return list(variants)


# ----------------------------------------------------------------------------- compiling
_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack_bytes": r"(\d+) bytes stack frame",
}


def _parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, spill stores/loads, stack frame and static shared memory from ptxas ``-v`` output (one entry
    function: a Triton kernel). Raises ValueError when a field is missing."""
    out = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        found = re.findall(pattern, log)
        if len(found) != 1:
            raise ValueError(f"ptxas -v output has {len(found)} matches of {pattern!r}:\n{log}")
        out[key] = int(found[0])
    static = re.findall(r"(\d+) bytes smem", log)
    out["static_shared_bytes"] = sum(map(int, static))
    return out


def _init_worker(cache_dir: str) -> None:
    """Compile workers: triton not yet imported, so it is imported without the interpreter; a private cache (every
    variant is compiled, so ptxas runs); ptxas's -v report printed (TRITON_DUMP_PTXAS_LOG) for ``_compile``."""
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before the compile worker set its environment")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def _compile(job: tuple[Variant, int]) -> dict[str, Any]:
    """Compile one variant for sm_<arch> (in a worker, see ``_init_worker``): its record for the JSON, with
    ``error`` set (and no resources) when Triton or ptxas fails."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, arch = job
    record: dict[str, Any] = {"kernel": variant.name, "arch": f"sm_{arch}", "variant": variant.describe()}
    module = importlib.import_module(f"{__package__}.{variant.module}")
    kernel = next(k for k in module._kernels() if k.fn.__name__ == variant.kernel)
    names = kernel.arg_names
    src = ASTSource(kernel, dict(variant.signature),
                    {(names.index(n),): v for n, v in variant.constexprs},
                    {(names.index(n),): [["tt.divisibility", 16]] for n in variant.divisible})
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # make_cubin prints ptxas's report there
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(variant.options))
        resources = _parse_ptxas_log(log.getvalue())
    except Exception as e:  # noqa: BLE001  (a variant that does not compile is a result, reported per record)
        record["error"] = f"{type(e).__name__}: {e}"[:4000]
        return record
    static_shared = resources.pop("static_shared_bytes")
    record.update(resources, shared_bytes=compiled.metadata.shared + static_shared,
                  num_warps=compiled.metadata.num_warps, compile_s=round(time.perf_counter() - start, 3))
    return record


def compile_variants(variants: Sequence[Variant], archs: Sequence[int] = ARCHS,
                     jobs: int | None = None) -> list[dict]:
    """One record per (variant, arch), in that order, compiled in ``jobs`` spawned worker processes (default: one
    per usable CPU; see the module docstring): ``registers``, ``spill_stores``, ``spill_loads``, ``stack_bytes``
    (bytes per thread), ``shared_bytes``, ``num_warps``, ``compile_s``, or ``error``."""
    work = [(v, arch) for v in variants for arch in archs]
    with tempfile.TemporaryDirectory(prefix="spo_fast_aot_") as cache_dir, \
            ProcessPoolExecutor(max_workers=jobs or _cpus(), mp_context=multiprocessing.get_context("spawn"),
                                initializer=_init_worker, initargs=(cache_dir,)) as pool:
        return list(pool.map(_compile, work, chunksize=1))


# ----------------------------------------------------------------------------- report
_COMPARED = ("registers", "spill_stores", "spill_loads", "stack_bytes", "shared_bytes", "num_warps")


def toolchain_error() -> str | None:
    """None when triton, its NVIDIA backend and its bundled ptxas are here (all that compiling needs: no GPU, no
    driver), else why not."""
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", ARCHS[-1], 32))
        knobs.nvidia.ptxas  # noqa: B018  (raises RuntimeError when the binary is missing or does not run)
    except Exception as e:  # noqa: BLE001  (ImportError, RuntimeError: any reason makes compiling impossible)
        return f"{type(e).__name__}: {e}"
    return None


def toolchain_versions() -> dict[str, str]:
    """{"triton": version, "ptxas": full version of the ptxas the compiles run}."""
    import triton
    from triton import knobs

    text = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"\bV(\d+\.\d+\.\d+)", text)
    return {"triton": triton.__version__, "ptxas": match.group(1) if match else text.strip().splitlines()[-1]}


def _git_state() -> dict[str, Any]:
    """The commit the kernel sources (the other modules of this package) were read at and those of them
    (relative to the repository) that differ from it; None/[] outside a git checkout."""
    here = Path(__file__).resolve()
    root = here.parent.parent
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=False, capture_output=True, text=True)
    if head.returncode != 0:
        return {"git_commit": None, "modified_sources": []}
    sources = [str(f.relative_to(root)) for f in sorted(here.parent.glob("*.py")) if f != here]
    diff = subprocess.run([*git, "diff", "--name-only", "HEAD", "--", *sources], check=False, capture_output=True,
                          text=True)
    return {"git_commit": head.stdout.strip(), "modified_sources": diff.stdout.split()}


def build_report(archs: Sequence[int] = ARCHS, jobs: int | None = None) -> dict[str, Any]:
    """Enumerate, compile for every arch, and return the JSON's content: a header and the records."""
    variants = enumerate_variants()
    start = time.perf_counter()
    records = compile_variants(variants, archs, jobs)
    return {"generator": "python -m spo_fast.kernels.aot", **toolchain_versions(), **_git_state(),
            "archs": [f"sm_{a}" for a in archs], "num_variants": len(variants),
            "wall_s": round(time.perf_counter() - start, 1), "records": records}


def write_report(report: dict[str, Any], path: Path) -> None:
    """The JSON with one record per line (diffs of a regenerated file show the variants that changed)."""
    header = {k: v for k, v in report.items() if k != "records"}
    lines = [jsonio.dumps(r, sort_keys=False) for r in report["records"]]
    text = jsonio.dumps(header, indent=2)[:-2] + ',\n  "records": [\n    ' + ",\n    ".join(lines) + "\n  ]\n}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def resources(records: Sequence[dict]) -> dict[tuple[str, str, str], tuple]:
    """(kernel, arch, variant) -> the compared resources (registers, spills, stack, shared, num_warps), or the
    error: what the test compares between a fresh compile and the committed JSON."""
    return {(r["kernel"], r["arch"], r["variant"]): r.get("error") or tuple(r[k] for k in _COMPARED)
            for r in records}


def summarize(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Per (kernel, arch), sorted: variants, failed, registers min/max, spilling variants, the
    largest spill stores/loads, stack frame and shared memory (bytes), total compile seconds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    rows = []
    for (kernel, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if "error" not in r]
        top = {key: max((r[key] for r in ok), default=0)
               for key in ("registers", "spill_stores", "spill_loads", "stack_bytes", "shared_bytes")}
        rows.append({"kernel": kernel, "arch": arch, "variants": len(rs), "failed": len(rs) - len(ok),
                     "registers_min": min((r["registers"] for r in ok), default=0),
                     "registers_max": top["registers"],
                     "spilling": sum(r["spill_stores"] + r["spill_loads"] > 0 for r in ok),
                     "spill_stores_max": top["spill_stores"], "spill_loads_max": top["spill_loads"],
                     "stack_max": top["stack_bytes"], "shared_max": top["shared_bytes"],
                     "compile_s": round(sum(r["compile_s"] for r in ok), 1)})
    return rows


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (the CLI prints it; benchmarks/README.md carries it)."""
    lines = [("| kernel | arch | variants | failed | registers | spilling variants | max spill st/ld (B) "
              "| max stack (B) | max shared (B) | compile (s) |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['kernel']}` | {r['arch']} | {r['variants']} | {r['failed']} | {r['registers_min']}-"
                     f"{r['registers_max']} | {r['spilling']} | {r['spill_stores_max']}/{r['spill_loads_max']} | "
                     f"{r['stack_max']} | {r['shared_max']} | {r['compile_s']} |")
    return "\n".join(lines)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: compile every variant, write the JSON, print the summary. Exit status 1 when a variant failed to
    compile, 2 when the toolchain is missing; spills are reported, not an error here (the test fails on them)."""
    parser = argparse.ArgumentParser(prog="python -m spo_fast.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"JSON to write (default: {DEFAULT_OUT}, from the repository root)")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)),
                        help="compute capabilities, comma-separated (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=_cpus(), help="compile processes (default: the usable CPUs)")
    args = parser.parse_args(argv)
    error = toolchain_error()
    if error is not None:
        print(f"cannot compile here: {error}", file=sys.stderr)
        return 2
    report = build_report([int(a) for a in args.arch.split(",")], args.jobs)
    write_report(report, args.out)
    print(format_summary(summarize(report["records"])))
    failed = [r for r in report["records"] if "error" in r]
    for r in failed:
        print(f"FAILED {r['kernel']} {r['arch']} [{r['variant']}]: {r['error'].splitlines()[0]}", file=sys.stderr)
    print(f"{report['num_variants']} variants x {len(report['archs'])} archs in {report['wall_s']} s "
          f"(triton {report['triton']}, ptxas {report['ptxas']}) -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
