"""The trainer's own code on fake tensors: memory, FLOPs and bytes of a real-size run without a GPU or weights.

``Placeholders`` is a ``torch._subclasses.fake_tensor.FakeTensorMode``: inside it every tensor carries shape, dtype
and device but no data, so the real SD1.5/SDXL architectures build in seconds and a whole SPO iteration runs in a
minute or two on a CPU. ``MemoryTracker``, a dispatch mode entered inside it (or alone, on real tensors: the tests
compare the two on the tiny architectures),

- **tracks memory**: every storage an op creates is counted until it is freed (a finalizer on its storage), so
  ``current`` is what ``torch.cuda.memory_allocated`` would say and each ``segment`` (build, rollout, train) keeps
  its peak and the live storages at that peak. ``tag`` names what a storage is (weights of a model, gradients,
  optimizer states, rollout buffers); what is left untagged at a peak is named after the segment that allocated it
  (the activations and temporaries of that phase).
- **counts FLOPs** with torch's flop counter formulas, op by op (the same numbers as
  ``torch.utils.flop_counter.FlopCounterMode``, without that mode: entering it changes what is live -- measured:
  the SD1.5 VAE decoder's peak grows from 3.0 to 5.25 GiB under it -- so the memory would be wrong);
- **counts bytes**: each op outside a view reads its tensor inputs and writes its outputs once (no fusion, no cache
  reuse: an upper bound of the traffic of an unfused run; the roofline uses it as is).

``Placeholders`` answers **host reads** with placeholders: a value read back to Python (``.item()``, ``bool(t)``,
``.tolist()``, ``nonzero``) has no data there. Scalars read as 1 (``True``, ``1``, ``1.0``: an optimizer's step counter
must not be 0, a finiteness check passes), ``nonzero`` as if every element were set (every SPO transition valid: the
training phase's largest shape). Each read is counted by its call site in ``reads``, so the estimate lists what it
assumed.

Attention: on CPU, ``scaled_dot_product_attention`` dispatches to ``_scaled_dot_product_flash_attention_for_cpu``,
which keeps the output and a log-sum-exp per query (O(N) per head), as flash / memory-efficient attention on a GPU
do; the N x N probabilities are never a tensor, so the estimate counts GPU flash attention's memory, not the math
backend's. Its FLOPs are registered with the flop counter in ``spo_fast.core.profiling``.

Known limits (the estimate's README section repeats them): no CUDA context, allocator caching or fragmentation, no
cuBLAS/cuDNN workspaces (``spo_fast.estimate`` adds a stated overhead); fp16 runs as bf16 (accelerate has no fp16
autocast on CPU; the same bytes; CPU and CUDA autocast cast nearly the same ops).
"""
from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import spo_fast.core.profiling  # noqa: F401  (registers the CPU flash attention's FLOPs)

aten = torch.ops.aten
_NO_TRAFFIC = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.detach.default,
               aten.lift_fresh.default, aten._local_scalar_dense.default}
_PKG = "spo_fast"


@dataclass
class Segment:
    """One phase of the run: live bytes at its start and end, its peak and the live storages (serial -> bytes) at
    that peak."""

    name: str
    start: int
    peak: int
    end: int = 0
    snapshot: dict[int, int] = field(default_factory=dict)
    pending: bool = False  # a new peak whose snapshot is not taken yet


def _call_site() -> str:
    """The innermost frame of this package (not this module) on the stack: ``path/file.py:line`` (a frame walk: the
    optimizer reads its step counter once per tensor, thousands of times per iteration)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if f"/{_PKG}/" in name and not name.endswith("core/fakerun.py"):
            return f"{name.rsplit(f'/{_PKG}/', 1)[1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "(outside spo_fast)"


class Placeholders(FakeTensorMode):
    """The fake mode, with host reads answered by placeholders (counted by call site in ``reads``)."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.reads: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._local_scalar_dense.default:
            self.reads[f"{_call_site()} (a scalar, read as 1)"] += 1
            x = args[0]
            return True if x.dtype == torch.bool else (1.0 if x.dtype.is_floating_point else 1)
        if func is aten.nonzero.default:
            self.reads[f"{_call_site()} (nonzero, as if every element were set)"] += 1
            x = args[0]
            with torch._C._DisableTorchDispatch():
                full = torch.zeros((x.numel(), x.dim()), dtype=torch.long)
            return self.from_tensor(full).to(x.device)
        return super().__torch_dispatch__(func, types, args, kwargs)

    def __deepcopy__(self, memo):
        """The mode itself: ``copy.deepcopy`` of a module with fake parameters (the trainer's frozen reference for full
        fine-tuning) copies each FakeTensor's ``__dict__``, which holds its mode; a copied mode would make the copy's
        tensors unusable with the original's."""
        return self

    @contextlib.contextmanager
    def active(self):
        """The mode, with ``torch.utils.swap_tensors`` able to swap fake parameters: ``Module.to`` swaps a fake
        parameter with its converted copy, which torch refuses while a weak reference points at it, and the fake
        mode's converter memo keeps such references (they only serve converting the same real tensor twice)."""
        orig = torch.utils.swap_tensors
        converter = self.fake_tensor_converter

        def swap(t1, t2):
            converter.meta_converter.tensor_memo.clear()
            converter.constant_storage_mapping.clear()
            return orig(t1, t2)

        torch.utils.swap_tensors = swap
        try:
            with self, warnings.catch_warnings():
                # copying a module with fake parameters reads their data pointers (all 0); torch warns each time
                warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
                yield self
        finally:
            torch.utils.swap_tensors = orig


class MemoryTracker(TorchDispatchMode):
    """Live bytes, phase peaks, what is live at each peak, bytes moved: for real tensors or, inside a
    ``Placeholders`` mode, fake ones (see the module docstring)."""

    def __init__(self, count_flops: bool = True):
        super().__init__()
        self.count_flops = count_flops
        self.flops = 0  # torch's flop counter formulas (torch.utils.flop_counter.flop_registry), op by op
        self.live: dict[int, int] = {}  # serial -> bytes of the live storages
        self._serial_of: dict[int, int] = {}  # storage address -> serial (while alive)
        self.born: dict[int, str] = {}  # serial -> the segment that allocated it
        self.tags: dict[int, str] = {}  # serial -> what it is
        self.current = 0
        self.segments: list[Segment] = [Segment("start", 0, 0)]
        self.bytes_moved = 0
        self.module_frames: list[list] = []  # [name, live at entry, max live inside]
        self.module_peaks: dict[str, int] = {}  # "phase:name" -> largest growth of live bytes inside its forward
        self._next = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._account(func, args, kwargs, out)
        return out

    def _account(self, func, args, kwargs, out) -> None:
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        for t in outs:
            self._register(t)
        if self.count_flops:
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.flops += formula(*args, **kwargs, out_val=out)
        if func in _NO_TRAFFIC:
            return
        returns = func._schema.returns
        if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return  # a view: no data moves
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.bytes_moved += sum(t.numel() * t.element_size() for t in (*ins, *outs))

    def _register(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = st._cdata
        if key in self._serial_of:
            return
        n = st.nbytes()
        serial = self._next
        self._next += 1
        self._serial_of[key] = serial
        self.live[serial] = n
        self.born[serial] = self.segments[-1].name
        self.current += n
        seg = self.segments[-1]
        if self.current > seg.peak:
            seg.peak = self.current
            seg.pending = True
        for frame in self.module_frames:
            frame[2] = max(frame[2], self.current)
        weakref.finalize(st, self._free, key, serial)

    def _free(self, key: int, serial: int) -> None:
        seg = self.segments[-1]
        if seg.pending:  # the peak ends here: keep what was live at it
            seg.snapshot, seg.pending = dict(self.live), False
        self.current -= self.live.pop(serial, 0)
        if self._serial_of.get(key) == serial:
            del self._serial_of[key]

    # ------------------------------------------------------------------ phases, tags, modules
    def segment(self, name: str) -> None:
        """Start a new phase: its peak is measured from the live bytes now."""
        self._close()
        self.segments.append(Segment(name, self.current, self.current))

    def _close(self) -> None:
        seg = self.segments[-1]
        if seg.pending or not seg.snapshot:
            seg.snapshot, seg.pending = dict(self.live), False
        seg.end = self.current

    def finish(self) -> None:
        self._close()

    def serial(self, t: torch.Tensor) -> int | None:
        try:
            return self._serial_of.get(t.untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError):
            return None

    def tag(self, tensors, what: str, overwrite: bool = False) -> int:
        """Name the storages of ``tensors`` (an iterable of tensors, None skipped); returns the bytes newly named."""
        named = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            s = self.serial(t)
            if s is not None and (overwrite or s not in self.tags):
                self.tags[s] = what
                named += self.live.get(s, 0)
        return named

    def watch_modules(self, modules: dict[str, torch.nn.Module]) -> list:
        """Forward hooks that record each module's largest growth of live bytes during its forward (per phase)."""

        def pre(name):
            def hook(module, args):
                self.module_frames.append([name, self.current, self.current])
            return hook

        def post(name):
            def hook(module, args, output):
                if not self.module_frames or self.module_frames[-1][0] != name:
                    return
                _, start, top = self.module_frames.pop()
                key = f"{self.segments[-1].name}:{name}"
                self.module_peaks[key] = max(self.module_peaks.get(key, 0), top - start)
            return hook

        handles = []
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        return handles

    def breakdown(self, seg: Segment) -> dict[str, int]:
        """Bytes by what they are at ``seg``'s peak: tags first, else '<phase> activations and temporaries'."""
        out: Counter = Counter()
        for serial, n in seg.snapshot.items():
            what = self.tags.get(serial) or f"{self.born.get(serial, '?')} activations and temporaries"
            out[what] += n
        return dict(out)
