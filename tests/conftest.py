import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the base-evaluation cache (spo_fast.evaluation.base_cache) of the test session: never the user's ~/.cache
if "SPO_FAST_CACHE" not in os.environ:
    import tempfile

    os.environ["SPO_FAST_CACHE"] = tempfile.mkdtemp(prefix="spo_fast_test_cache_")
# Triton kernels are tested under the interpreter on CPU; it must be set before triton is first imported
# (diffusers imports it through torch). With it, `auto` runs every CPU kernel call through the interpreter.
# On a GPU machine the GPU tests need the compiled kernels: benchmarks/gpu_suite.sh sets SPO_FAST_TEST_GPU=1
# (and runs `pytest -m gpu`), which leaves TRITON_INTERPRET alone.
if os.environ.get("SPO_FAST_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_script():
    """``bench_script(name)``: benchmarks/NAME.py loaded as a module, each call a fresh one (benchmarks/ is no
    package, so that it cannot shadow an installed module when a command runs from the root)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision included); tests that run the trainer
    in-process with different settings need it cleared between them."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------- Triton kernel tests
@pytest.fixture
def triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 and no SPO_FAST_KERNELS for one test (the kernel test modules set it at import time
    only for their imports, so it does not leak into later modules' runs)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SPO_FAST_KERNELS", raising=False)


@pytest.fixture
def interpreted_kernels(request):
    """Skip unless the calling module's kernels (its ``triton_kernels()``) can run under the interpreter. Our
    kernels are decorated on first use, under TRITON_INTERPRET=1, but triton.language's own @jit helpers
    (tl.sum, tl.zeros) are decorated when triton is first imported: if an earlier import of triton happened
    without TRITON_INTERPRET=1, they are compiled-mode functions the interpreter cannot call."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    funcs = (*request.module.triton_kernels(), tl.standard.sum, tl.standard.zeros)
    if not all(isinstance(f, InterpretedFunction) for f in funcs):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (by an earlier test module), so "
                    "triton.language's helpers are not interpretable: set TRITON_INTERPRET=1 in tests/conftest.py")
