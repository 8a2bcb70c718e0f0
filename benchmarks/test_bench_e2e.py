"""pytest-benchmark: the end-to-end cases, through the trainer's own pieces (see ``e2e.py`` for how each is
measured and why).

- ``test_e2e_spo_iteration[sd15_spo|sdxl_spo]``: one SPO iteration (rollout + training on its valid pairs) at the
  official recipe's shapes with random weights (CUDA: ``arch:sd15`` / ``arch:sdxl`` and the preference model at
  PickScore's size; CPU: the tiny architectures), its stage split, FLOPs, MFU and the projection of the full
  recipe's GPU-hours.
- ``test_e2e_dpo_step[sd15_dpo|sdxl_dpo]``: one Diffusion-DPO optimizer step on random cached latents at the same
  models and resolution, the recipe's micro-batch, fewer accumulation steps (extrapolated to the recipe's).
- ``test_e2e_ablation[ROW]``: the SD1.5 SPO iteration with one speed option switched against the default
  (``e2e.ABLATION``; which rows run: ``SPO_FAST_E2E_ABLATION``, all on CUDA, four on CPU).

The benchmark's own timing (pytest-benchmark's table) is the wall time of an iteration without any timer; every
derived number goes into ``extra_info`` (``--benchmark-json``) and into the compact summary (``--e2e-json PATH``
or ``SPO_FAST_E2E_JSON``). Rounds: ``SPO_FAST_E2E_ROUNDS`` (default 2 on CUDA, 3 on CPU; the ablation 1 and 2).
"""
from __future__ import annotations

import os

import pytest
import torch
from bench_utils import is_cuda
from e2e import (
    ABLATION,
    CASES,
    SUMMARY_ENV,
    Summary,
    ablation_names,
    build,
    dpo_work,
    environment,
    flop_pass,
    iteration,
    peak_matmul,
    peak_memory_bytes,
    release,
    summarize,
    timed_pass,
)

from spo_fast.core.config import ConfigError


@pytest.fixture(scope="session")
def e2e_summary(request, device) -> Summary:
    return Summary(request.config.getoption("--e2e-json", None) or os.environ.get(SUMMARY_ENV), device)


@pytest.fixture(scope="session")
def matmul_peak(device) -> dict:
    return peak_matmul(device)


def _rounds(device: torch.device, ablation: bool = False) -> int:
    if os.environ.get("SPO_FAST_E2E_ROUNDS"):
        return max(1, int(os.environ["SPO_FAST_E2E_ROUNDS"]))
    return (1 if is_cuda(device) else 2) if ablation else (2 if is_cuda(device) else 3)


def _reset_peak(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _measure(benchmark, run, device: torch.device, rounds: int, peak: dict) -> dict:
    """FLOP pass (also the warm-up), stage-timed pass, then ``rounds`` wall-time rounds timed by pytest-benchmark."""
    dpo = run.case.method == "dpo"
    step = iter(range(1_000_000))
    work = (lambda: dpo_work(run, next(step))) if dpo else (lambda: None)
    flops = flop_pass(run, work())
    timed = timed_pass(run, work())
    results = []
    _reset_peak(device)
    benchmark.pedantic(lambda w: results.append(iteration(run, work=w)), setup=lambda: ((work(),), {}),
                       rounds=rounds, iterations=1, warmup_rounds=0)
    return summarize(run, flops, timed, results, peak_memory_bytes(device), peak)


def _run_case(benchmark, device, matmul_peak, e2e_summary, name: str, group: str) -> dict:
    run = build(CASES[name], device)
    try:
        benchmark.group = f"{group} | {name}"
        info = _measure(benchmark, run, device, _rounds(device), matmul_peak)
    finally:
        release(run)
    benchmark.extra_info.update(info, environment=environment(device))  # device, versions, commit in every row
    e2e_summary.add("cases", name, info)
    return info


@pytest.mark.parametrize("name", ["sd15_spo", "sdxl_spo"])
def test_e2e_spo_iteration(benchmark, device, matmul_peak, e2e_summary, name):
    info = _run_case(benchmark, device, matmul_peak, e2e_summary, name, "e2e SPO iteration")
    assert info["valid_pairs"] > 0 and info["iteration_s"] > 0
    assert info["stages"]["train/policy"]["flops"] > 0  # the UNet's FLOPs are attributed


@pytest.mark.parametrize("name", ["sd15_dpo", "sdxl_dpo"])
def test_e2e_dpo_step(benchmark, device, matmul_peak, e2e_summary, name):
    info = _run_case(benchmark, device, matmul_peak, e2e_summary, name, "e2e Diffusion-DPO optimizer step")
    assert info["optimizer_steps"] == 1 and info["stages"]["train/backward"]["flops"] > 0


@pytest.mark.parametrize("row", [name for name, _, _ in ABLATION])
def test_e2e_ablation(benchmark, device, e2e_summary, row):
    if row not in ablation_names(device):
        pytest.skip(f"ablation row {row!r} not selected (SPO_FAST_E2E_ABLATION=all runs every row)")
    overrides, what = next((o, w) for n, o, w in ABLATION if n == row)
    try:
        run = build(CASES["sd15_spo"], device, extra=overrides, count_forwards=False)
    except ConfigError as e:  # an option this machine cannot run (a package, CUDA): named, not failed
        pytest.skip(f"{row}: {e}")
    try:
        benchmark.group = "e2e ablation | sd15_spo"
        iteration(run)  # warm-up
        results = []
        _reset_peak(device)
        benchmark.pedantic(lambda: results.append(iteration(run)), rounds=_rounds(device, ablation=True),
                           iterations=1, warmup_rounds=0)
        peak_mem = peak_memory_bytes(device)
    finally:
        release(run)
    sec = sorted(r.seconds for r in results)[len(results) // 2]
    pick = min(results, key=lambda r: abs(r.seconds - sec))
    info = {"row": row, "overrides": list(overrides), "what": what, "iteration_s": sec,
            "rollout_s": pick.work_s, "train_s": pick.train_s, "valid_pairs": pick.n_valid,
            "train_s_per_valid_pair": pick.train_s / pick.n_valid if pick.n_valid else None,
            "peak_mem_bytes": peak_mem, "rounds": len(results),
            "host_load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    default = e2e_summary.data["ablation"].get("default")
    if default and row != "default":
        info["speedup_vs_default"] = default["iteration_s"] / sec
        info["rollout_speedup_vs_default"] = default["rollout_s"] / pick.work_s
        if default.get("train_s_per_valid_pair") and info["train_s_per_valid_pair"]:
            info["train_speedup_vs_default"] = default["train_s_per_valid_pair"] / info["train_s_per_valid_pair"]
    benchmark.extra_info.update(info, environment=environment(device))
    e2e_summary.add("ablation", row, info)
