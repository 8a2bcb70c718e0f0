"""End-to-end benchmarks: one SPO iteration and one Diffusion-DPO optimizer step through the trainer's own pieces
(``trainer.preflight``/``build``, the method's ``setup``/``work``, ``trainer.train_iteration``), their stage split
(``spo_fast.core.profiling.StageTimer``), FLOPs, MFU and the projection of a full recipe's GPU-hours. The pytest cases
are in ``test_bench_e2e.py``; this module holds everything they measure with, so that ``tests/`` can check the
arithmetic without running a benchmark.

Cases run at the real architectures with random weights on CUDA (``arch:sd15`` / ``arch:sdxl``, the
step-aware preference model at PickScore's size, ``arch:spm_vit_h14``) and at the tiny ones on CPU
(``arch:tiny_sd15`` / ``arch:tiny_sdxl`` / ``arch:tiny_spm``, small shapes): see ``CASES``.

Decisions:

- **Every pair valid** (``spo.threshold=0``) in the SPO cases. With random weights the valid-pair ratio at the
  recipe's threshold is an accident of the initialisation, and the training stage's cost follows it; at
  threshold 0 every transition trains, so the per-valid-pair training time is measured over all of them, and
  the iteration at a realistic ratio is derived: rollout time + ratio x transitions x per-pair time. The ratio
  is the toy default's (``TOY_VALID_RATIO``, docs/toy_results_history.md: 2,132 valid transitions of 5,120).
- **Four passes per case**, each on its own iteration: a FLOP-counting pass (``StageTimer(count_flops=True)``,
  which is also the warm-up: its time is not used), a stage-timed pass (``StageTimer``: a device sync at every
  stage boundary, so stages are timed separately but overlap is lost), then the wall-time rounds that
  pytest-benchmark times, with no timer at all (one host sync between the rollout and training, which the
  trainer does anyway when it reads the valid mask).
- **MFU** = model FLOPs (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions, SDPA, forward and
  backward; elementwise ops count zero; with gradient checkpointing the recomputation is counted) / time / the
  matmul rate measured in the same session (``peak_matmul``: 8192^3 bf16 on CUDA, 1024^3 fp32 on CPU). Per
  stage: the stage's FLOPs per call x its calls / its seconds in the stage-timed pass. Custom kernels
  (xformers, flash-attn, our Triton ops) are invisible to the counter.
- **UNet-forward-equivalents** count samples through the UNet's forward (a forward hook on the policy UNet and
  the reference copy): a call on a CFG batch of 2N counts 2N; each sample of a forward that builds a graph adds
  2 more for its backward.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_utils import device_name, is_cuda, median_seconds, sync, triton_version

# The toy default's valid-pair ratio (docs/toy_results_history.md: 2,132 valid transitions trained of
# 5,120 in the 40-iteration run; mean valid-pair ratio 0.42): what the projection assumes.
TOY_VALID_PAIRS, TOY_TRANSITIONS = 2132, 5120
TOY_VALID_RATIO = TOY_VALID_PAIRS / TOY_TRANSITIONS

# The official full runs being projected (docs/method.md; configs/*_dpo.yaml for Diffusion-DPO).
SPO_RECIPES = {"sd15_spo": {"prompts": 4000, "epochs": 10, "batch_per_gpu": 10, "gpus": 4},
               "sdxl_spo": {"prompts": 4000, "epochs": 10, "batch_per_gpu": 2, "gpus": 4}}
DPO_RECIPES = {"sd15_dpo": {"steps": 2000, "pairs_per_step": 2048, "gpus": 8},
               "sdxl_dpo": {"steps": 2000, "pairs_per_step": 2048, "gpus": 8}}
ABLATION_ENV = "SPO_FAST_E2E_ABLATION"
SUMMARY_ENV = "SPO_FAST_E2E_JSON"

_COMMON = ("log.report_to=none", "log.progress=false", "log.sample_prompts=0", "checkpoint.resume=never",
           "model.init=random")
_SPO = (*_COMMON, "scorer.init=random", "data.prompts=builtin:toy", "spo.threshold=0.0")
_DPO = (*_COMMON, "data.pairs=toyworld:train", "data.cache_dir=", "scorer.name=none")


@dataclass(frozen=True)
class Case:
    """One end-to-end case: a recipe and its overrides on CUDA (the real architectures at the recipe's shapes)
    and on CPU (the tiny ones, small shapes)."""

    name: str
    recipe: str
    method: str  # "spo" | "dpo"
    gpu: tuple[str, ...]
    cpu: tuple[str, ...]
    note: str = ""

    def overrides(self, device: torch.device) -> list[str]:
        return list(self.gpu if is_cuda(device) else self.cpu)


CASES = {
    "sd15_spo": Case("sd15_spo", "sd15_spo", "spo",
                     gpu=(*_SPO, "model.path=arch:sd15", "scorer.path=arch:spm_vit_h14"),
                     cpu=(*_SPO, "model.path=arch:tiny_sd15", "scorer.path=arch:tiny_spm", "train.mixed_precision=no",
                          "train.batch_size=4", "train.train_batch_size=4"),
                     note="GPU: the official SD1.5 recipe (10 prompts, k=4, 20 steps, divert_start_step 4, 512 px, "
                          "LoRA rank 4, fp16); CPU: tiny_sd15 with 4 prompts, fp32"),
    "sdxl_spo": Case("sdxl_spo", "sdxl_spo", "spo",
                     gpu=(*_SPO, "model.path=arch:sdxl", "scorer.path=arch:spm_vit_h14"),
                     cpu=(*_SPO, "model.path=arch:tiny_sdxl", "scorer.path=arch:tiny_spm", "train.mixed_precision=no"),
                     note="GPU: the official SDXL recipe (2 prompts, k=2, 3 inner steps, 1024 px, LoRA rank 64, "
                          "grad-accum 2, gradient checkpointing, fp16); CPU: tiny_sdxl, fp32"),
    "sd15_dpo": Case("sd15_dpo", "sd15_dpo", "dpo",
                     gpu=(*_DPO, "model.path=arch:sd15", "train.batch_size=32", "train.train_batch_size=4",
                          "train.grad_accum=8"),
                     cpu=(*_DPO, "model.path=arch:tiny_sd15", "train.mixed_precision=no", "train.batch_size=8",
                          "train.train_batch_size=4", "train.grad_accum=2"),
                     note="the recipe's per-GPU micro-batch (4 pairs, full fine-tune, fp16) but 8 accumulation "
                          "steps per optimizer step instead of 64 (time); the recipe's step is extrapolated"),
    "sdxl_dpo": Case("sdxl_dpo", "sdxl_dpo", "dpo",
                     gpu=(*_DPO, "model.path=arch:sdxl", "train.batch_size=4", "train.train_batch_size=1",
                          "train.grad_accum=4"),
                     cpu=(*_DPO, "model.path=arch:tiny_sdxl", "train.mixed_precision=no", "train.batch_size=2",
                          "train.train_batch_size=1", "train.grad_accum=2"),
                     note="the recipe's per-GPU micro-batch (1 pair, full fine-tune, Adafactor, gradient "
                          "checkpointing, fp16) but 4 accumulation steps instead of 256 (time); extrapolated"),
}
RECIPE_ACCUM = {"sd15_dpo": 64, "sdxl_dpo": 256}  # configs/*_dpo.yaml's train.grad_accum

# The speed options, each switched alone against the default configuration (ablation), most promising first so
# that a time-limited GPU run measures those. (name, overrides, what it changes)
ABLATION = (
    ("default", (), "the recipe as the trainer runs it by default"),
    ("vae_bf16", ("model.vae_dtype=bf16",), "VAE in bf16, autocast off inside it"),
    ("scorer_bf16", ("scorer.dtype=bf16",), "preference model in bf16, autocast off inside it"),
    ("channels_last", ("train.channels_last=true",), "UNet and VAE weights channels-last"),
    ("fused_adamw", ("train.fused_adamw=true",), "torch.optim.AdamW(fused=True)"),
    ("gradient_checkpointing", ("train.gradient_checkpointing=true",), "recompute UNet activations in backward"),
    ("no_tf32", ("train.allow_tf32=false",), "TF32 off for fp32 matmuls/convolutions"),
    ("scorer_fp32", ("scorer.dtype=fp32",), "preference model in true fp32 (the official code's choice)"),
    ("graphs_cuda", ("sampling.graphs=cuda_graphs",), "the rollout's calls captured as CUDA graphs"),
    ("attention_xformers", ("train.attention=xformers",), "diffusers' xformers attention in the UNet"),
    ("attention_flash_attn", ("train.attention=flash_attn",), "flash-attn's flash_attn_func in the UNet"),
    ("adamw8bit", ("train.optimizer=adamw8bit",), "bitsandbytes' 8-bit AdamW"),
    ("graphs_compile", ("sampling.graphs=compile",), "the rollout's calls torch.compile'd (minutes of compiling)"),
)
CPU_ABLATION = ("default", "channels_last", "fused_adamw", "gradient_checkpointing")


def ablation_names(device: torch.device) -> tuple[str, ...]:
    """Which ablation rows run: ``SPO_FAST_E2E_ABLATION`` = ``all`` | ``0`` (none) | a comma list of names;
    unset: all of them on CUDA, ``CPU_ABLATION`` on CPU (their numbers are not the GPU's; the tiny models only
    check that each option runs)."""
    names = tuple(name for name, _, _ in ABLATION)
    choice = os.environ.get(ABLATION_ENV, "").strip()
    if choice in ("0", "none"):
        return ()
    if choice == "all" or (not choice and is_cuda(device)):
        return names
    if not choice:
        return CPU_ABLATION
    asked = tuple(c.strip() for c in choice.split(",") if c.strip())
    unknown = [c for c in asked if c not in names]
    if unknown:
        raise ValueError(f"{ABLATION_ENV}={choice!r}: unknown rows {unknown}; accepted: all, 0, or {', '.join(names)}")
    return asked


# ----------------------------------------------------------------------------- environment
@functools.cache
def git_commit() -> dict:
    """The checkout's commit and whether it had local changes (``SPO_FAST_GIT_COMMIT`` when there is no .git, as
    on a machine that received a copy of the working tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return {"git_commit": commit or os.environ.get("SPO_FAST_GIT_COMMIT") or None, "git_dirty": bool(dirty)}


def environment(device: torch.device) -> dict:
    """Device and versions for the JSON."""
    import diffusers

    return {"device": str(device), "device_name": device_name(device), "torch_version": torch.__version__,
            "triton_version": triton_version(), "diffusers_version": diffusers.__version__,
            "cuda_version": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), **git_commit()}


@functools.cache
def peak_matmul(device: torch.device) -> dict:
    """The matmul rate MFU is measured against, in the same session: an 8192^3 bf16 matmul on CUDA (CUDA events,
    median of 10 after warm-up), a 1024^3 fp32 matmul on CPU (the CPU cases run fp32; labelled as such)."""
    device = torch.device(device)
    cuda = is_cuda(device)
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    mats = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(3)]  # a, b, out
    seconds = median_seconds(lambda: torch.mm(mats[0], mats[1], out=mats[2]), device, reps=10 if cuda else 5,
                             inner=5 if cuda else 1, warmup=3 if cuda else 1)
    mats.clear()
    if cuda:
        torch.cuda.empty_cache()
    flops = 2 * n ** 3
    return {"label": f"{n}^3 {str(dtype).removeprefix('torch.')} matmul ({'CUDA' if cuda else 'CPU'})", "n": n,
            "dtype": str(dtype).removeprefix("torch."), "seconds": seconds, "flops_per_s": flops / seconds}


# ----------------------------------------------------------------------------- arithmetic (tested in tests/)
def project_spo_hours(rollout_s: float, train_s_per_valid_pair: float, transitions_per_iteration: int,
                      valid_ratio: float, prompts: int, epochs: float, batch_per_gpu: int, gpus: int = 1) -> dict:
    """GPU-hours of a full SPO run: ``iterations = ceil(prompts * epochs / batch_per_gpu)`` rollouts of one GPU
    (the GPU count only divides the wall time), each ``rollout_s + valid_ratio * transitions_per_iteration *
    train_s_per_valid_pair`` seconds (the rollout does not depend on the pairs; training scales with the valid
    ones)."""
    iterations = math.ceil(prompts * epochs / batch_per_gpu)
    valid_pairs = valid_ratio * transitions_per_iteration
    iteration_s = rollout_s + valid_pairs * train_s_per_valid_pair
    gpu_hours = iterations * iteration_s / 3600
    return {"iterations": iterations, "valid_ratio": valid_ratio, "valid_pairs_per_iteration": valid_pairs,
            "iteration_s": iteration_s, "rollout_s": rollout_s, "train_s_per_valid_pair": train_s_per_valid_pair,
            "gpu_hours": gpu_hours, "gpus": gpus, "wall_hours": gpu_hours / gpus,
            "formula": "ceil(prompts*epochs/batch_per_gpu) * (rollout_s + valid_ratio*transitions*train_s_per_pair)"
                       " / 3600"}


def project_dpo_hours(step_s: float, steps: int, gpus: int) -> dict:
    """GPU-hours of a full Diffusion-DPO run: ``steps`` optimizer steps of ``step_s`` seconds on each of ``gpus``."""
    return {"steps": steps, "gpus": gpus, "step_s": step_s, "gpu_hours": steps * step_s * gpus / 3600,
            "wall_hours": steps * step_s / 3600, "formula": "steps * step_s * gpus / 3600"}


def extrapolate_step(measured_step_s: float, optimizer_s: float, accum_measured: int, accum_target: int) -> float:
    """One optimizer step of ``accum_target`` micro-batches from one of ``accum_measured``: the micro-batch part
    scales, the optimizer update does not."""
    return (measured_step_s - optimizer_s) / accum_measured * accum_target + optimizer_s


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the measured matmul rate (None without time or FLOPs)."""
    if not seconds or seconds <= 0 or not peak_flops_per_s:
        return None
    return flops / seconds / peak_flops_per_s


def spo_scored_images(num_steps: int, divert_start_step: int, num_inner_steps: int, prompts: int, k: int) -> int:
    """Images decoded and scored by one rollout: one pool of ``prompts * k`` per segment of ``1 + num_inner_steps``
    steps from ``divert_start_step`` on."""
    return math.ceil((num_steps - divert_start_step) / (1 + num_inner_steps)) * prompts * k


def stage_split(flop_pass: dict, timed_pass: dict, peak_flops_per_s: float) -> dict:
    """Per stage: seconds and calls of the stage-timed pass, FLOPs scaled from the FLOP pass by calls (the
    passes are different iterations: the training stages' call counts may differ), MFU."""
    out = {}
    for name, t in timed_pass.items():
        f = flop_pass.get(name)
        per_call = f["flops"] / f["calls"] if f and f["calls"] else 0
        flops = per_call * t["calls"]
        out[name] = {"seconds": t["seconds"], "calls": t["calls"], "flops": flops,
                     "mfu": mfu(flops, t["seconds"], peak_flops_per_s) if flops else None}
    return out


# ----------------------------------------------------------------------------- running the trainer's pieces
@dataclass
class Run:
    """A built case: config, method, the trainer's Setup, the accelerator, its output dir."""

    case: Case
    cfg: object
    method: object
    s: object
    accelerator: object
    out: tempfile.TemporaryDirectory
    device: torch.device = None
    counter: UNetCounter = None
    iteration: int = 0


class UNetCounter:
    """Samples through the UNets' forward (policy and reference copy): ``forward`` all, ``grad`` those that build a
    graph (each of which also costs a backward: 2 forward-equivalents)."""

    def __init__(self, modules):
        self.forward = self.grad = 0
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules if m is not None]

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        self.forward += x.shape[0]
        if torch.is_grad_enabled():
            self.grad += x.shape[0]

    def reset(self) -> None:
        self.forward = self.grad = 0

    @property
    def equivalents(self) -> int:
        return self.forward + 2 * self.grad


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def build(case: Case, device: torch.device, extra: tuple[str, ...] = (), count_forwards: bool = True) -> Run:
    """Load the case's config (+ ``extra`` overrides), run the trainer's preflight, build the models and set the
    method up: what ``trainer.run`` does before its first iteration. Raises ConfigError (e.g. an attention backend
    that is not installed) before any model is built. ``count_forwards=False`` leaves the UNets without the
    counting hook (the ablation, whose ``sampling.graphs=compile`` row should trace the UNet as users run it)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from spo_fast.core import trainer
    from spo_fast.core.config import load_config
    from spo_fast.train import make_method

    out = tempfile.TemporaryDirectory(prefix=f"spo_e2e_{case.name}_")
    cfg = load_config(case.recipe, [*case.overrides(device), *extra, f"log.output_dir={out.name}"])
    method = make_method(cfg)
    if case.method == "spo":
        trainer.preflight(cfg, method)
    else:  # the pairs file is never read: random latents stand in for the cache (DPO's preflight reads parquet)
        trainer.check_output_dir(cfg.log.output_dir)
        trainer.check_model(cfg)
        trainer.check_speed_options(cfg)
    _reset_accelerate()
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not is_cuda(device))
    set_seed(cfg.train.seed)
    s = trainer.build(cfg, accelerator)
    method.setup(cfg, s, accelerator)
    run = Run(case, cfg, method, s, accelerator, out, accelerator.device)
    run.counter = UNetCounter([s.raw_unet, s.ref_unet] if count_forwards else [])
    return run


def release(run: Run | None) -> None:
    """Free a built case (GPU memory for the next one)."""
    if run is None:
        return
    for h in run.counter.handles:
        h.remove()
    run.out.cleanup()
    dev = run.device
    run.__dict__.clear()
    gc.collect()
    if is_cuda(dev):
        torch.cuda.empty_cache()
    _reset_accelerate()


def dpo_work(run: Run, step: int):
    """One optimizer step's worth of Diffusion-DPO work from random latents (``DiffusionDPO.synthetic_work``: the
    shapes and steps of ``work`` after loading, the empty caption's conditioning)."""
    return run.method.synthetic_work(step)


@dataclass
class IterationStats:
    """One iteration (SPO: rollout + training; DPO: one optimizer step) as measured."""

    work_s: float
    train_s: float
    n_valid: int
    n_micro: int
    steps: int
    transitions: int
    fwd_equivalents: int
    fwd_rollout: int
    stages: dict = field(default_factory=dict)
    flops_total: int = 0

    @property
    def seconds(self) -> float:
        return self.work_s + self.train_s


def iteration(run: Run, timer=None, work=None) -> IterationStats:
    """One iteration through the trainer's pieces, as ``trainer.run``'s loop does it (without its metrics and
    checkpoint I/O): SPO ``method.work(it)`` (the rollout) then ``trainer.train_iteration``; DPO a prepared
    ``work`` (``dpo_work``) then ``train_iteration``. ``timer``: a ``StageTimer`` to run it under (its stages and,
    when it counts them, its FLOPs go into the result)."""
    from spo_fast.core.trainer import train_iteration

    dev = run.device
    run.counter.reset()
    with timer if timer is not None else contextlib.nullcontext():
        sync(dev)
        t0 = time.perf_counter()
        if work is None:
            work = run.method.work(run.iteration)
        sync(dev)  # the trainer syncs here too: compacting the valid pairs reads the valid mask on the host
        t1 = time.perf_counter()
        fwd_rollout = run.counter.equivalents
        run.s.raw_unet.train()
        sums = train_iteration(run.cfg, run.s, run.accelerator, run.method, work)
        sync(dev)
        t2 = time.perf_counter()
        flops_total = timer.total_flops() if timer is not None else 0
    run.iteration += 1
    transitions = run.method.buf.valid.numel() if run.case.method == "spo" else work.samples
    return IterationStats(t1 - t0, t2 - t1, int(sums["n_valid"]), len(work.micro), int(sums["steps"]), transitions,
                          run.counter.equivalents, fwd_rollout, timer.summary() if timer is not None else {},
                          flops_total)


def flop_pass(run: Run, work=None) -> IterationStats:
    """The FLOP-counting pass (it doubles as the warm-up; its time is not used): FLOPs per stage and in total."""
    from spo_fast.core.profiling import StageTimer

    return iteration(run, StageTimer(run.accelerator.device, count_flops=True), work)


def timed_pass(run: Run, work=None) -> IterationStats:
    """The stage-timed pass: ``StageTimer`` (device syncs at every stage boundary), no FLOP counting."""
    from spo_fast.core.profiling import StageTimer

    return iteration(run, StageTimer(run.accelerator.device), work)


def peak_memory_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if is_cuda(device) else None


# ----------------------------------------------------------------------------- results
def _phase_other(stages: dict, prefix: str, phase_s: float) -> dict:
    """The phase's time outside its named stages (text encoding, compaction, the loss op, glue)."""
    named = sum(v["seconds"] for k, v in stages.items() if k.startswith(prefix))
    return {"seconds": max(phase_s - named, 0.0), "calls": None, "flops": None, "mfu": None}


def summarize(run: Run, flops: IterationStats, timed: IterationStats, rounds: list[IterationStats],
              peak_mem: int | None, peak: dict) -> dict:
    """The derived numbers of a case (``extra_info`` and the summary JSON)."""
    cfg, case = run.cfg, run.case
    rate = peak["flops_per_s"]
    med = statistics.median
    wall_s, work_s, train_s = (med([getattr(r, a) for r in rounds]) for a in ("seconds", "work_s", "train_s"))
    n_valid = med([r.n_valid for r in rounds])
    n_micro = med([r.n_micro for r in rounds])
    fwd_eq = med([r.fwd_equivalents for r in rounds])
    # FLOPs of a wall round: the FLOP pass's total with its training part scaled to the round's micro-batches
    train_flops = sum(v["flops"] for k, v in flops.stages.items() if k.startswith("train/"))
    other_flops = flops.flops_total - train_flops
    round_flops = other_flops + train_flops * (n_micro / flops.n_micro if flops.n_micro else 0)
    stages = stage_split(flops.stages, timed.stages, rate)
    if case.method == "spo":
        stages["rollout/other"] = _phase_other(timed.stages, "rollout/", timed.work_s)
    stages["train/other"] = _phase_other(timed.stages, "train/", timed.train_s)
    info = {
        "case": case.name, "method": case.method, "recipe": case.recipe, "note": case.note,
        "overrides": run.case.overrides(run.accelerator.device),
        "model": cfg.model.path, "resolution": run.s.resolution, "mixed_precision": cfg.train.mixed_precision,
        "lora": cfg.lora.enabled and {"rank": cfg.lora.rank},
        "rounds": len(rounds), "iteration_s": wall_s, "iteration_s_all": [r.seconds for r in rounds],
        "work_s": work_s, "train_s": train_s,
        "valid_pairs": n_valid, "micro_batches": n_micro, "optimizer_steps": med([r.steps for r in rounds]),
        "training_pairs_per_s": n_valid / wall_s,
        "unet_fwd_equivalents": fwd_eq, "unet_fwd_equivalents_per_s": fwd_eq / wall_s,
        "peak_mem_bytes": peak_mem, "peak_mem_gib": peak_mem / 2 ** 30 if peak_mem is not None else None,
        "flops_per_iteration": round_flops, "matmul_peak": peak, "mfu": mfu(round_flops, wall_s, rate),
        "stage_timed_pass": {"work_s": timed.work_s, "train_s": timed.train_s, "seconds": timed.seconds},
        "stages": stages,
        # other jobs on the host skew CPU timings (and the host side of GPU ones): the 1/5/15-minute load after it
        "host_load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if case.method == "spo":
        s, sp = cfg.spo, cfg.sampling
        transitions = rounds[0].transitions
        images = spo_scored_images(sp.num_steps, s.divert_start_step, s.num_inner_steps, cfg.train.batch_size, s.k)
        per_pair = train_s / n_valid if n_valid else None
        info.update({
            "prompts": cfg.train.batch_size, "k": s.k, "num_steps": sp.num_steps, "threshold": s.threshold,
            "transitions_per_iteration": transitions, "valid_ratio_measured": n_valid / transitions,
            "rollout_s": work_s, "rollout_images": images, "rollout_images_per_s": images / work_s,
            "rollout_unet_fwd_equivalents": med([r.fwd_rollout for r in rounds]),
            "train_s_per_valid_pair": per_pair,
            "toy_valid_ratio": TOY_VALID_RATIO,
            "toy_valid_ratio_source": f"docs/toy_results_history.md: {TOY_VALID_PAIRS} valid transitions of {TOY_TRANSITIONS} in the "
                                      "default toy run",
            "iteration_s_at_toy_ratio": work_s + TOY_VALID_RATIO * transitions * per_pair if per_pair else None,
        })
        if case.name in SPO_RECIPES and per_pair:
            info["projection"] = project_spo_hours(work_s, per_pair, transitions, TOY_VALID_RATIO,
                                                   **SPO_RECIPES[case.name])
    else:
        accum = cfg.train.grad_accum
        opt_s = timed.stages.get("train/optimizer", {}).get("seconds", 0.0) / max(timed.steps, 1)
        target = RECIPE_ACCUM.get(case.name, accum)
        step_s = extrapolate_step(train_s, opt_s, accum, target)
        info.update({"pairs_per_step": cfg.train.batch_size, "micro_batch": cfg.train.train_batch_size,
                     "grad_accum": accum, "rollout_images_per_s": None, "optimizer_s": opt_s,
                     "recipe_grad_accum": target, "recipe_step_s_extrapolated": step_s})
        if case.name in DPO_RECIPES:
            r = DPO_RECIPES[case.name]
            info["projection"] = project_dpo_hours(step_s, r["steps"], r["gpus"])
    return info


class Summary:
    """The compact summary JSON (``--e2e-json PATH`` or ``SPO_FAST_E2E_JSON``), rewritten after every case so that
    a run cut short by a time limit keeps what it measured. An existing file is added to (its cases and ablation
    rows are kept unless re-measured), so the stages of ``gpu_suite.sh``, each its own pytest process, fill one
    file."""

    def __init__(self, path: str | None, device: torch.device):
        self.path = Path(path) if path else None
        self.data = {"cases": {}, "ablation": {}}
        if self.path is not None and self.path.is_file():
            try:
                self.data.update(json.loads(self.path.read_text()))
            except (OSError, json.JSONDecodeError):
                pass
        self.data["environment"] = environment(device)

    def add(self, section: str, name: str, info: dict) -> None:
        """Record one case (``section="cases"``) or ablation row (``"ablation"``) and rewrite the file."""
        self.data[section][name] = info
        if "matmul_peak" in info:
            self.data["matmul_peak"] = info["matmul_peak"]
        self.data["targets"] = targets(self.data)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


# The project's GPU targets (on an H200), read off the summary.
TARGETS = {"sd15_spo_mfu": 0.45, "sd15_spo_recipe_gpu_hours": 8.0, "sdxl_spo_peak_mem_gib": 24.0}


def targets(data: dict) -> dict:
    """The targets next to this run's values, labelled by what they are: ``measured`` only when the run was on a
    CUDA device (the targets are an H200's at the real architectures); on a CPU the same figures come from the tiny
    architectures and are kept under ``cpu_tiny_architectures`` with ``comparable: false``."""
    cases = data.get("cases", {})
    sd15, sdxl = cases.get("sd15_spo", {}), cases.get("sdxl_spo", {})
    env = data.get("environment", {})
    on_gpu = str(env.get("device", "")).startswith("cuda")
    label = "measured" if on_gpu else "cpu_tiny_architectures"

    def row(bound: str, key: str, value) -> dict:
        return {bound: TARGETS[key], label: value, "comparable": on_gpu}

    return {
        "device_name": env.get("device_name"),
        "on_gpu": on_gpu,
        "sd15_spo_mfu": row("target_min", "sd15_spo_mfu", sd15.get("mfu")),
        "sd15_spo_recipe_gpu_hours": row("target_max", "sd15_spo_recipe_gpu_hours",
                                         sd15.get("projection", {}).get("gpu_hours")),
        "sdxl_spo_peak_mem_gib": row("target_max", "sdxl_spo_peak_mem_gib", sdxl.get("peak_mem_gib")),
    }


# ----------------------------------------------------------------------------- estimate beside measurement
def gpu_key(device_name: str | None, memory_gib: float | None = None) -> str | None:
    """The ``spo_fast.estimate.GPUS`` entry of a CUDA device name (None when the table has no such GPU)."""
    name = (device_name or "").lower().replace(" ", "")
    for key, needle in (("h200", "h200"), ("h100-pcie", "h100pcie"), ("h100-sxm", "h100"), ("l40s", "l40s"),
                        ("rtx4090", "4090"), ("rtx3090", "3090")):
        if needle in name:
            return key
    if "a100" in name:
        return "a100-40gb" if memory_gib is not None and memory_gib < 60 else "a100-80gb"
    return None


def estimate_case(case: Case, device_name: str | None, on_gpu: bool, train_steps: int = 2) -> dict:
    """The estimator (``spo_fast.estimate.measure``: the same trainer code on fake tensors) for the case's
    overrides of the device that measured it (GPU: the real architectures; CPU: the tiny ones): its peak memory
    and, per stage, FLOPs per call and the roofline seconds per call on the measured GPU. Labelled ``estimated``."""
    from spo_fast import estimate as est

    overrides = list(case.gpu if on_gpu else case.cpu)
    with tempfile.TemporaryDirectory(prefix=f"spo_est_{case.name}_") as tmp:
        cfg, notes = est.estimate_config(case.recipe, [*overrides, f"log.output_dir={tmp}/run"], f"{tmp}/run")
        m = est.measure(cfg, train_steps)
    key = gpu_key(device_name)
    gpu = est.GPUS.get(key) if key else None
    stages = {}
    for name, st in m.stages.items():
        calls = st["calls"] or 1
        row = {"flops_per_call": st["flops"] / calls, "bytes_per_call": st["bytes"] / calls}
        if gpu is not None:
            row["roofline_s_per_call"] = max(row["flops_per_call"] / (gpu.tflops * 1e12),
                                             row["bytes_per_call"] / (gpu.tb_per_s * 1e12))
        stages[name] = row
    peak = max(v for k, v in m.peaks.items() if k != "build")
    return {"label": "estimated", "gpu_table_entry": key, "notes": notes, "peak_mem_gib": peak / 2 ** 30,
            "breakdown_gib": {k: v / 2 ** 30 for k, v in m.breakdown.get("train", {}).items()},
            "stages": stages}


def side_by_side(path: str | Path) -> dict:
    """Add to every measured case of a summary JSON the estimate of the same config and the two side by side:
    peak memory (measured ``peak_mem_gib`` vs estimated), per stage the FLOPs per call and the seconds per call
    (measured in the stage-timed pass vs the estimator's roofline on this GPU). The first GPU run calibrates the
    estimator: ``measured / roofline`` per stage is the achieved fraction of the roofline."""
    path = Path(path)
    data = json.loads(path.read_text())
    env = data.get("environment", {})
    on_gpu = str(env.get("device", "")).startswith("cuda")
    for name, c in data.get("cases", {}).items():
        if name not in CASES:
            continue
        e = estimate_case(CASES[name], env.get("device_name"), on_gpu)
        rows = {}
        for stage_name, m in c.get("stages", {}).items():
            est_row = e["stages"].get(stage_name)
            if not est_row or not m.get("calls"):
                continue
            measured_s = m["seconds"] / m["calls"]
            roof = est_row.get("roofline_s_per_call")
            rows[stage_name] = {"measured_s_per_call": measured_s, "estimated_roofline_s_per_call": roof,
                                "measured_over_roofline": measured_s / roof if roof else None,
                                "measured_flops_per_call": (m["flops"] or 0) / m["calls"],
                                "estimated_flops_per_call": est_row["flops_per_call"]}
        c["estimate"] = {**e, "side_by_side": {
            "peak_mem_gib": {"measured" if on_gpu else "cpu_not_measured": c.get("peak_mem_gib"),
                             "estimated": e["peak_mem_gib"]},
            "stages": rows}}
    sdxl = data.get("cases", {}).get("sdxl_spo", {}).get("estimate")
    target = data.get("targets", {}).get("sdxl_spo_peak_mem_gib")
    if sdxl and target is not None and on_gpu:  # like with like: the estimate of the measured config, labelled
        target["estimated"] = sdxl["peak_mem_gib"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return data


# ----------------------------------------------------------------------------- report (gpu_suite.sh)
def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def report(path: str | Path) -> str:
    """A short text report of a summary JSON: per case time, throughput, MFU, stage split and projection; the
    ablation table; the targets."""
    data = json.loads(Path(path).read_text())
    env = data.get("environment", {})
    peak = data.get("matmul_peak") or next((c["matmul_peak"] for c in data.get("cases", {}).values()), {})
    lines = [(f"device: {env.get('device_name')} ({env.get('device')}), torch {env.get('torch_version')}, "
              f"triton {env.get('triton_version')}, diffusers {env.get('diffusers_version')}, "
              f"cuda {env.get('cuda_version')}, commit {env.get('git_commit')}"),
             f"matmul peak: {_fmt(peak.get('flops_per_s', 0) / 1e12)} TFLOP/s ({peak.get('label')})"]
    for name, c in data.get("cases", {}).items():
        mem = c.get("peak_mem_gib")
        lines.append(f"{name}: {_fmt(c['iteration_s'])} s/iteration, {_fmt(c['training_pairs_per_s'])} pairs/s, "
                     f"{_fmt(c['unet_fwd_equivalents_per_s'])} UNet-fwd-eq/s, rollout images/s "
                     f"{_fmt(c.get('rollout_images_per_s'))}, MFU {_fmt(c.get('mfu'))}, peak "
                     f"{_fmt(mem, '.1f') + ' GiB' if mem is not None else '-'}")
        split = ", ".join(f"{k} {_fmt(v['seconds'], '.3f')} s" + (f" ({_fmt(v['mfu'], '.2f')})" if v.get("mfu") else "")
                          for k, v in c.get("stages", {}).items())
        lines.append(f"  stages (s, MFU): {split}")
        proj = c.get("projection")
        if proj:
            unit = "GPU-hours" if env.get("device", "").startswith("cuda") else "CPU-hours (tiny models: not the GPU's)"
            lines.append(f"  projection of the full recipe: {_fmt(proj['gpu_hours'])} {unit} "
                         f"({proj.get('iterations', proj.get('steps'))} {'iterations' if 'iterations' in proj else 'steps'}"
                         + (f", valid ratio {proj['valid_ratio']:.3f}" if "valid_ratio" in proj else "") + ")")
    rows = data.get("ablation", {})
    if rows:
        lines.append("ablation (sd15_spo): row, s/iteration, speed-up, rollout s, train s/pair, peak GiB")
        for name, r in rows.items():
            mem = r.get("peak_mem_bytes")
            lines.append(f"  {name:24s} {_fmt(r['iteration_s'])} {_fmt(r.get('speedup_vs_default'))} "
                         f"{_fmt(r['rollout_s'])} {_fmt(r.get('train_s_per_valid_pair'))} "
                         f"{_fmt(mem / 2 ** 30 if mem is not None else None, '.1f')}")
    for name, c in data.get("cases", {}).items():
        sbs = c.get("estimate", {}).get("side_by_side")
        if sbs:
            mem = sbs["peak_mem_gib"]
            lines.append(f"{name} estimate vs measurement: peak GiB {mem} ; per stage s/call measured vs roofline: "
                         + ", ".join(f"{k} {_fmt(v['measured_s_per_call'])}/{_fmt(v['estimated_roofline_s_per_call'])}"
                                     for k, v in sbs["stages"].items()))
    tg = data.get("targets", {})
    if tg and not tg.get("on_gpu"):
        lines.append("targets (a GPU's at the real architectures; this run is not on one: its values are not comparable):")
    for name, t in tg.items():
        if isinstance(t, dict):
            lines.append(f"target {name}: {t}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a recipe's stage split
STAGE_OVERRIDES = ("log.report_to=none", "log.progress=false", "log.sample_prompts=0", "checkpoint.resume=never",
                   "eval.enabled=false")


def add_stages(total: dict, stats: IterationStats) -> None:
    """Adds one timed pass's stage seconds and calls to ``total`` ({stage: {"seconds", "calls"}})."""
    for name, v in stats.stages.items():
        t = total.setdefault(name, {"seconds": 0.0, "calls": 0})
        t["seconds"] += v["seconds"]
        t["calls"] += v["calls"]


def split_shares(total: dict, work_s: float, train_s: float, iterations: int) -> dict:
    """Per iteration: each stage's seconds and share of the iteration, plus each phase's time outside its named
    stages (``rollout/other``: text encoding, noise, compaction; ``train/other``: the loss op, data gathering)."""
    wall = work_s + train_s
    stages = {k: v["seconds"] for k, v in total.items()}
    for prefix, phase_s in (("rollout/", work_s), ("train/", train_s)):
        stages[f"{prefix}other"] = _phase_other(total, prefix, phase_s)["seconds"]
    return {"iterations": iterations, "seconds_per_iteration": wall / iterations,
            "rollout_s_per_iteration": work_s / iterations, "train_s_per_iteration": train_s / iterations,
            "stages": {k: {"seconds_per_iteration": round(v / iterations, 4), "share": round(v / wall, 4)}
                       for k, v in sorted(stages.items())}}


def recipe_stage_split(recipe: str, overrides: list[str], iterations: int) -> dict:
    """A recipe as it runs (its own models and shapes, on this machine's device), one warm-up iteration, then
    ``iterations`` stage-timed passes (``timed_pass``); the split per iteration (``split_shares``). SPO recipes
    only: the iteration is the method's rollout and training."""
    from spo_fast.core.config import load_config

    cfg = load_config(recipe, list(overrides))
    if cfg.method != "spo":
        raise SystemExit(f"stages: recipe {recipe!r} is a {cfg.method} recipe; the stage split is for SPO recipes")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = Case(recipe, recipe, "spo", gpu=(*STAGE_OVERRIDES, *overrides), cpu=(*STAGE_OVERRIDES, *overrides))
    run = build(case, device, count_forwards=False)
    try:
        iteration(run)  # warm-up (first-call allocations, lazy inits)
        total, work_s, train_s = {}, 0.0, 0.0
        for _ in range(iterations):
            stats = timed_pass(run)
            add_stages(total, stats)
            work_s, train_s = work_s + stats.work_s, train_s + stats.train_s
    finally:
        release(run)
    return {"recipe": recipe, "overrides": list(overrides), **environment(device),
            **split_shares(total, work_s, train_s, iterations)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python benchmarks/e2e.py", description="the end-to-end suite's summaries, and "
                                "the stage split of a recipe's SPO iterations")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, what in (("report", "print a summary JSON's text report"),
                       ("estimate", "add the estimator's figures to a summary JSON, then print its report")):
        sub.add_parser(name, help=what).add_argument("summary", help="the suite's summary JSON (--e2e-json)")
    st = sub.add_parser("stages", help="time a recipe's SPO iterations by stage (StageTimer) and print the split")
    st.add_argument("recipe", help="a recipe name or YAML path, e.g. toy_spo (the default run's)")
    st.add_argument("overrides", nargs="*", help="config overrides key=value")
    st.add_argument("--iterations", type=int, default=5, help="timed iterations after one warm-up (default 5)")
    st.add_argument("--out", help="also write the split to this JSON file")
    args = p.parse_args(argv)
    if args.cmd == "stages":
        if args.iterations < 1:
            p.error(f"--iterations must be >= 1, got {args.iterations}")
        from spo_fast.core import jsonio
        from spo_fast.core.config import ConfigError

        try:
            data = recipe_stage_split(args.recipe, args.overrides, args.iterations)
        except ConfigError as e:
            p.exit(2, f"error: {e}\n")
        text = jsonio.dumps(data, indent=1)
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(text)
        return 0
    if args.cmd == "estimate":
        side_by_side(args.summary)
    print(report(args.summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
