"""Fixtures and hooks for the pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``).

Unlike ``tests/``, nothing here sets ``TRITON_INTERPRET``: interpreted Triton timings mean nothing, so on a
machine without CUDA the Triton provider is skipped with a reason instead. Everything that describes the
run (device name, torch/triton versions, copy bandwidth) goes into the JSON's ``machine_info`` and into each
benchmark's ``extra_info``, so a saved result always says which device it was taken on. The helpers live in
``bench_utils.py``.
"""
import importlib.util
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load_bench_module(name: str = "bench_utils"):
    """A helper module of this folder (``bench_utils``, ``e2e``) under its name in ``sys.modules`` (the test modules
    ``from bench_utils import``), whatever ``--import-mode`` is in use."""
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_utils = _load_bench_module("bench_utils")
_load_bench_module("e2e")
bench_device, device_name = _utils.bench_device, _utils.device_name
measure_copy_bandwidth, triton_version = _utils.measure_copy_bandwidth, _utils.triton_version


def pytest_addoption(parser):
    parser.addoption("--e2e-json", default=None, metavar="PATH",
                     help="write the end-to-end suite's compact summary (test_bench_e2e.py) to PATH; also "
                          "SPO_FAST_E2E_JSON")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> dict:
    return measure_copy_bandwidth(device)


# ----------------------------------------------------------------------------- JSON machine_info
def pytest_benchmark_update_machine_info(config, machine_info):
    """Top-level ``machine_info`` of ``--benchmark-json``: the device the numbers belong to."""
    dev = bench_device()
    machine_info["bench_device"] = str(dev)
    machine_info["bench_device_name"] = device_name(dev)
    machine_info["torch_version"] = torch.__version__
    machine_info["triton_version"] = triton_version()
    machine_info["cuda_version"] = torch.version.cuda
    machine_info["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    machine_info["copy_bandwidth"] = measure_copy_bandwidth(dev)
