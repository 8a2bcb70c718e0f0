"""Will it fit, how long will it take: ``python -m spo_fast.estimate [RECIPE] [key=value ...] [--gpu NAME] [--gpus N]
[--fit GIB] [--json FILE]``.

The estimate runs the trainer's own code -- ``trainer.build``, the method's ``setup``, one rollout (SPO) or one
step's pairs (Diffusion-DPO, ``DiffusionDPO.synthetic_work``), ``trainer.train_iteration`` -- at the recipe's real
architecture (``configs/arch``; no weights, no GPU) on fake tensors (``spo_fast.core.fakerun``), so a change to the
trainer changes the estimate. From that one run it reports:

- **peak memory per GPU**, per phase (rollout, training) and for the iteration, split by what is live at the peak:
  trainable and frozen weights of each model, gradients, optimizer states, rollout buffers, text embeddings, the
  activations and temporaries of each phase; and the modules whose forward grows memory the most;
- **FLOPs and bytes per stage** (the stage names of ``spo_fast.core.profiling``) per iteration, each stage's
  roofline lower bound on the named GPU (the larger of FLOPs / dense bf16 tensor rate and bytes / memory bandwidth,
  ``GPUS``) and the recipe's hours on N such GPUs at the roofline and at an MFU (the last GPU measurement in
  ``benchmarks/results/`` when there is one, else ``ASSUMED_MFU``, labelled as an assumption);
- with ``--fit GIB``: whether the iteration fits and which options (gradient checkpointing, a smaller micro-batch,
  VAE / preference model in bf16, a smaller LoRA rank, 8-bit AdamW) bring it under, each measured by another fake run
  (8-bit AdamW: computed, bitsandbytes does not run without CUDA).

Decisions (the README's "Will it fit? How long?" repeats them):

- Memory is what torch allocates for tensors (``torch.cuda.max_memory_allocated``); a GPU also holds the CUDA
  context, cuBLAS/cuDNN workspaces and the caching allocator's slack. ``OVERHEAD_GIB`` + ``OVERHEAD_FRACTION`` of the
  peak are added before comparing with a card (an assumption, stated in the output).
- Attention is counted as flash / memory-efficient attention (O(N) state per head; see ``spo_fast.core.fakerun``).
- Every SPO transition is valid in the fake run (the largest training phase, so the memory peak is the worst case);
  the time of the training stages is scaled to ``--valid-ratio`` of the transitions (default ``ASSUMED_VALID_RATIO``:
  the toy default's, docs/toy_results_history.md). The training phase runs 2 optimizer steps of at most 2
  micro-batches each (gradients accumulate in place and the optimizer's states exist from the first step on, so the
  peak is reached by then) and its FLOPs and bytes are scaled to the iteration's micro-batches and steps.
- fp16 recipes run as bf16 (accelerate has no fp16 autocast on a CPU): the same bytes, the same FLOPs.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from spo_fast.core.errors import ArgumentParser, InputError, number_arg, report

GIB = 2 ** 30
OVERHEAD_GIB = 1.0  # CUDA context + cuBLAS/cuDNN workspaces (assumption)
OVERHEAD_FRACTION = 0.10  # the caching allocator's reserved-but-unallocated slack (assumption)
CARDS_GIB = (24, 48, 80)
# The toy default's valid-pair ratio: docs/toy_results_history.md, 2,132 valid transitions of 5,120.
ASSUMED_VALID_RATIO = 2132 / 5120
# MFU when no GPU measurement exists: MosaicML's SD2 UNet training anchor (docs/method.md: ~36 images/s per A100
# at 512 px) x ~2.4 TFLOP per training image (3 x the ~0.8 TFLOP forward counted here for SD1.5's UNet, a close
# relative) / 312 TFLOP/s = 0.28.
ASSUMED_MFU = 0.28
# The official runs' process counts and the papers' GPU-hours (docs/method.md), for the defaults and the comparison.
RECIPE_GPUS = {"sd15_spo": 4, "sdxl_spo": 4, "sd15_dpo": 8, "sdxl_dpo": 8}
PAPER_GPU_HOURS = {"sd15_spo": (48, "SPO fine-tuning, 12 h on 4x A100 80GB"),
                   "sdxl_spo": (118, "SPO fine-tuning, 29.5 h on 4x A100"),
                   "sd15_dpo": (384, "Diffusion-DPO as the SPO paper quotes it, A100"),
                   "sdxl_dpo": (4800, "Diffusion-DPO as the SPO paper quotes it, A100")}
DEFAULT_PROMPTS = 4000  # the official SPO prompt set (4k Pick-a-Pic prompts), when data.prompts is not readable


@dataclass(frozen=True)
class GPU:
    """Dense (no sparsity) bf16/fp16 tensor-core rate with fp32 accumulation, memory bandwidth, memory size, and
    where the figures come from."""

    name: str
    tflops: float
    tb_per_s: float
    memory_gb: float
    source: str


GPUS = {g.name: g for g in (
    GPU("a100-40gb", 312, 1.555, 40, "NVIDIA A100 Tensor Core GPU datasheet (SXM): BF16 312 TFLOPS dense (624 is with "
                                     "sparsity), 1,555 GB/s HBM2"),
    GPU("a100-80gb", 312, 2.039, 80, "NVIDIA A100 datasheet (SXM 80GB): BF16 312 TFLOPS dense, 2,039 GB/s HBM2e"),
    GPU("h100-sxm", 989, 3.35, 80, "NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS is with sparsity, "
                                   "989 dense; 3.35 TB/s HBM3"),
    GPU("h100-pcie", 756, 2.0, 80, "NVIDIA H100 datasheet (PCIe): BF16 1,513 TFLOPS with sparsity, 756 dense; "
                                   "2.0 TB/s HBM2e"),
    GPU("h200", 989, 4.8, 141, "NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity, 989 "
                               "dense; 4.8 TB/s HBM3e, 141 GB"),
    GPU("l40s", 362, 0.864, 48, "NVIDIA L40S datasheet: BF16 733 TFLOPS with sparsity, 362 dense; 864 GB/s GDDR6"),
    GPU("rtx4090", 165.2, 1.008, 24, "NVIDIA Ada Lovelace architecture whitepaper, appendix table: FP16/BF16 tensor "
                                     "with FP32 accumulate 165.2 TFLOPS dense (330.3 with sparsity; 330.3 dense with "
                                     "FP16 accumulate); 1,008 GB/s GDDR6X"),
    GPU("rtx3090", 71, 0.936, 24, "NVIDIA Ampere GA102 GPU architecture whitepaper, RTX 3090 column: FP16/BF16 "
                                  "tensor with FP32 accumulate 71 TFLOPS dense (142 with sparsity); 936 GB/s GDDR6X"),
)}


# ----------------------------------------------------------------------------- configuration
def estimate_config(recipe: str | None, overrides: list[str], output_dir: str):
    """The recipe at its real architecture with random (fake) weights: ``model.path=arch:<family>`` and the SPM at
    ViT-H/14 size unless the overrides name other directories (only their configs are read), the toy prompts
    (their count does not change an iteration), no logging, fp16 as bf16, the fused ops' PyTorch references (the
    Triton kernels cannot run on fake tensors; each reference holds at least the kernel's tensors, so memory is not
    underestimated). Returns (cfg, notes)."""
    from spo_fast.core.config import ConfigError, load_config

    given = {o.split("=", 1)[0] for o in overrides}
    try:
        first = load_config(recipe, ["model.init=random", "scorer.init=random", *overrides])
    except ConfigError:  # a scorer without weights (scorer.name other than spm)
        first = load_config(recipe, ["model.init=random", *overrides])
    base = ["model.init=random", *(["scorer.init=random"] if first.scorer.name == "spm" else []), "log.report_to=none", "log.progress=false",
            "log.sample_prompts=0", "checkpoint.resume=never", "eval.enabled=false", f"log.output_dir={output_dir}"]
    notes = []
    if "model.path" not in given and not first.model.path.startswith(("arch:", "toyworld:")):
        base.append(f"model.path=arch:{first.model.family}")
    if first.method == "dpo" and "data.cache_dir" not in given:
        base.append("data.cache_dir=")  # the pairs are synthetic (DiffusionDPO.synthetic_work): no cache to open
    if first.method == "spo":
        if "scorer.path" not in given and first.scorer.name == "spm" and not first.scorer.path.startswith("arch:"):
            base.append("scorer.path=arch:spm_vit_h14")
        if "data.prompts" not in given:
            base.append("data.prompts=builtin:toy")
    base.append("train.kernels=torch")  # the PyTorch references of the fused ops: Triton does not run on fake tensors
    if first.train.mixed_precision == "fp16":
        base.append("train.mixed_precision=bf16")
        notes.append("fp16 runs as bf16 here (accelerate has no fp16 autocast on a CPU): the same bytes and FLOPs")
    return load_config(recipe, [*base, *overrides]), notes


def prompt_count(recipe: str | None, overrides: list[str]) -> tuple[int, str]:
    """Prompts of the SPO run's epoch: ``data.prompts`` when it can be read, else the official 4,000."""
    from spo_fast.core.config import load_config
    from spo_fast.data.prompts import load_prompts

    cfg = load_config(recipe, overrides)
    try:
        return len(load_prompts(cfg.data.prompts)), f"data.prompts={cfg.data.prompts}"
    except (InputError, OSError):
        return DEFAULT_PROMPTS, f"the official 4,000 prompts (data.prompts={cfg.data.prompts} is not readable here)"


# ----------------------------------------------------------------------------- the fake run
@dataclass
class Measurement:
    """One fake run: memory per phase (bytes), stages (FLOPs, bytes, calls), the counts to scale them by."""

    peaks: dict[str, int]
    breakdown: dict[str, dict[str, int]]
    modules: dict[str, int]
    stages: dict[str, dict]
    phase_totals: dict[str, dict]
    micro_run: int
    micro_total: int
    steps_run: int
    transitions: int
    reads: dict[str, int]
    params: dict[str, int] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)  # each category whole (not only what is live at a peak)


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


def _state(module) -> list:
    return [*module.parameters(), *module.buffers()]


def _modules_of(obj) -> list:
    import torch

    return [v for v in vars(obj).values() if isinstance(v, torch.nn.Module)] if obj is not None else []


def _weights(s, method) -> dict[str, list]:
    """What to name each model's tensors, trainable first (a tensor keeps its first name)."""
    merged = getattr(method, "merged", None)
    out = {"weights: trainable": list(s.params),
           "weights: UNet (frozen)": _state(s.raw_unet)}
    if s.ref_unet is not None:
        out["weights: reference UNet"] = _state(s.ref_unet)
    if merged is not None:
        out["weights: merged rollout UNet"] = _state(merged.module)
    if s.comp.vae is not None:
        out["weights: VAE"] = _state(s.comp.vae)
    out["weights: text encoders"] = [t for te in s.comp.text_encoders for t in _state(te)]
    out["weights: preference model"] = [t for m in _modules_of(method.scorer) for t in _state(m)]
    return out


def _watched(s, method) -> dict:
    """The modules whose forward growth is reported: the UNets' blocks, the VAE's decoder/encoder, the text
    encoders, the preference model."""
    out = {}
    unets = {"unet": s.raw_unet, "reference unet": s.ref_unet,
             "merged unet": getattr(getattr(method, "merged", None), "module", None)}
    for prefix, unet in unets.items():
        if unet is None:
            continue
        for name in ("down_blocks", "up_blocks"):
            for i, block in enumerate(getattr(unet, name, [])):
                out[f"{prefix}.{name}.{i}"] = block
        if getattr(unet, "mid_block", None) is not None:
            out[f"{prefix}.mid_block"] = unet.mid_block
    vae = s.comp.vae
    if vae is not None:
        out["vae.decoder"], out["vae.encoder"] = vae.decoder, vae.encoder
    for i, te in enumerate(s.comp.text_encoders):
        out[f"text_encoder{'' if i == 0 else '_' + str(i + 1)}"] = te
    for m in _modules_of(method.scorer):
        out[f"preference model ({type(m).__name__})"] = m
    return out


def measure(cfg, train_steps: int | None = 2, real: bool = False, count_flops: bool = True) -> Measurement:
    """Build, set up, one rollout (SPO) or one step's pairs (DPO), then ``train_iteration`` over the first
    ``train_steps`` optimizer steps' micro-batches (all of them when None), on fake tensors (``real=True``: on real
    CPU tensors, tracked the same way: the tests compare the two on the tiny architectures). ``count_flops=False``:
    no FLOPs (the fit options)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from spo_fast.core import trainer
    from spo_fast.core.fakerun import MemoryTracker, Placeholders
    from spo_fast.core.profiling import StageTimer
    from spo_fast.core.trainer import Work, optimizer_groups, train_iteration
    from spo_fast.train import make_method

    method = make_method(cfg)
    spo = cfg.method == "spo"
    if spo:
        trainer.preflight(cfg, method)
    else:  # the pairs are synthetic: only the output dir, the model and the speed options are checked
        trainer.check_output_dir(cfg.log.output_dir)
        trainer.check_model(cfg)
        trainer.check_speed_options(cfg)
    fake = None if real else Placeholders()
    tracker = MemoryTracker(count_flops=count_flops)
    AcceleratorState._reset_state(reset_partial_state=True)
    with (fake.active() if fake else contextlib.nullcontext()), tracker:
        accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=True)
        set_seed(cfg.train.seed)
        tracker.segment("build")
        s = trainer.build(cfg, accelerator)
        method.setup(cfg, s, accelerator)
        weights = _weights(s, method)
        for what, tensors in weights.items():
            tracker.tag(tensors, what)
        seen: set[int] = set()
        owned = {}  # each tensor once, under its first name
        for what, tensors in weights.items():
            owned[what] = list({id(t): t for t in tensors if id(t) not in seen}.values())
            seen.update(id(t) for t in tensors)
        params = {what: sum(t.numel() for t in ts) for what, ts in owned.items()}
        handles = tracker.watch_modules(_watched(s, method))
        grad_bytes: dict[int, int] = {}

        def grad_hook(p) -> None:
            tracker.tag([p.grad], "gradients")
            grad_bytes[id(p)] = p.grad.untyped_storage().nbytes()

        handles += [p.register_post_accumulate_grad_hook(grad_hook) for p in s.params]
        # FLOPs from the tracker (its "flops" meter fills the stages' "flops"): see spo_fast.core.fakerun
        timer = StageTimer(None, meters={"flops": lambda: tracker.flops, "bytes": lambda: tracker.bytes_moved})
        phase = "rollout" if spo else "pairs"
        tracker.segment(phase)
        with timer:
            f0, b0 = tracker.flops, tracker.bytes_moved
            work = method.work(0) if spo else method.synthetic_work(0)
            totals = {phase: {"flops": tracker.flops - f0, "bytes": tracker.bytes_moved - b0}}
        if spo:
            tracker.tag(_tensors(method.buf), "rollout buffers")
            tracker.tag([*_tensors(method.cond), *_tensors(method.uncond)], "text embeddings")
            transitions = method.buf.valid.numel()
        else:
            tracker.tag([t for mb in work.micro for t in _tensors(mb.data)], "pair batch (latents, noise)")
            transitions = cfg.train.batch_size
        # at most 2 micro-batches per optimizer step (the gradients accumulate in place: a third adds no memory;
        # the stages' FLOPs and bytes are scaled to the iteration's micro-batches and steps)
        run_cfg = cfg if train_steps is None else copy.deepcopy(cfg)
        run_cfg.train.grad_accum = cfg.train.grad_accum if train_steps is None else min(cfg.train.grad_accum, 2)
        groups = optimizer_groups(list(work.micro), run_cfg.train.grad_accum)
        kept = [mb for g in (groups if train_steps is None else groups[:train_steps]) for mb in g]
        tracker.segment("train")
        with timer:
            f0, b0 = tracker.flops, tracker.bytes_moved
            s.raw_unet.train()
            sums = train_iteration(run_cfg, s, accelerator, method, Work(kept, work.stats, work.samples))
            totals["train"] = {"flops": tracker.flops - f0, "bytes": tracker.bytes_moved - b0}
        opt_states = [t for st in s.optimizer.state.values() for t in _tensors(list(st.values()))]
        tracker.tag(opt_states, "optimizer states")
        state_bytes = {what: sum(t.untyped_storage().nbytes() for t in ts) for what, ts in owned.items()}
        state_bytes["gradients"] = sum(grad_bytes.values())
        state_bytes["optimizer states"] = sum(t.untyped_storage().nbytes() for t in opt_states)
        tracker.finish()
        for h in handles:
            h.remove()
        stages = timer.summary()
    AcceleratorState._reset_state(reset_partial_state=True)
    segs = {seg.name: seg for seg in tracker.segments}
    names = [n for n in ("build", phase, "train") if n in segs]
    return Measurement(peaks={n: segs[n].peak for n in names},
                       breakdown={n: tracker.breakdown(segs[n]) for n in names},
                       modules=dict(tracker.module_peaks), stages=stages, phase_totals=totals,
                       micro_run=len(kept), micro_total=len(work.micro), steps_run=int(sums["steps"]),
                       transitions=transitions, reads=dict(fake.reads) if fake else {}, params=params,
                       state_bytes=state_bytes)


# ----------------------------------------------------------------------------- time
def expected_micro(cfg, m: Measurement, valid_ratio: float) -> tuple[float, float]:
    """Micro-batches and optimizer steps of one real iteration: SPO trains ``valid_ratio`` of the transitions in
    micro-batches of ``train.train_batch_size``; Diffusion-DPO all of the step's pairs."""
    if cfg.method == "spo":
        micro = max(1, math.ceil(valid_ratio * m.transitions / cfg.train.train_batch_size))
    else:
        micro = m.micro_total
    return micro, math.ceil(micro / cfg.train.grad_accum)


def stage_table(cfg, m: Measurement, gpu: GPU, valid_ratio: float) -> dict[str, dict]:
    """Per stage per iteration: FLOPs, bytes (the training stages scaled from the run's micro-batches to the
    iteration's), and the roofline time on ``gpu`` with what bounds it."""
    micro, steps = expected_micro(cfg, m, valid_ratio)
    out = {}
    for name, st in m.stages.items():
        if name == "train/optimizer":
            scale = steps / max(m.steps_run, 1)
        elif name.startswith("train/"):
            scale = micro / max(m.micro_run, 1)
        else:
            scale = 1.0
        out[name] = {"flops": st["flops"] * scale, "bytes": st["bytes"] * scale, "calls": st["calls"] * scale}
    for phase, tot in m.phase_totals.items():  # what ran outside the named stages (text encoding, glue, the loss)
        prefix = f"{phase}/"
        scale = micro / max(m.micro_run, 1) if phase == "train" else 1.0
        named = [v for k, v in m.stages.items() if k.startswith(prefix)]
        out[f"{prefix}other"] = {"flops": max(tot["flops"] - sum(v["flops"] for v in named), 0) * scale,
                                 "bytes": max(tot["bytes"] - sum(v["bytes"] for v in named), 0) * scale,
                                 "calls": None}
    for row in out.values():
        compute, memory = row["flops"] / (gpu.tflops * 1e12), row["bytes"] / (gpu.tb_per_s * 1e12)
        row.update(roofline_s=max(compute, memory), compute_s=compute, memory_s=memory,
                   bound="compute" if compute >= memory else "memory")
    return out


def measured_mfu(recipe: str | None) -> tuple[float, str]:
    """The MFU of the recipe's case in the newest GPU summary under benchmarks/results/, else the assumption."""
    import json

    root = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    found = []
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        env = data.get("environment", {}) if isinstance(data, dict) else {}
        case = data.get("cases", {}).get(recipe or "", {}) if isinstance(data, dict) else {}
        if str(env.get("device", "")).startswith("cuda") and case.get("mfu"):
            found.append((path.stat().st_mtime, case["mfu"], f"measured: {path.name} ({env.get('device_name')})"))
    if found:
        _, value, source = max(found)
        return value, source
    return ASSUMED_MFU, ("assumption (no GPU measurement in benchmarks/results/): MosaicML's SD2 training anchor, "
                         "~36 images/s per A100 at 512 px, is MFU ~0.28")


def hours(cfg, recipe: str | None, m: Measurement, table: dict, gpu: GPU, gpus: int, mfu: float,
          prompts: int) -> dict:
    """The run's length in iterations and its hours on ``gpus`` GPUs at the roofline and at ``mfu``."""
    t = cfg.train
    if cfg.method == "spo":
        if t.epochs:
            iterations = math.ceil(prompts * t.epochs / (t.batch_size * gpus))
            if t.max_iterations:
                iterations = min(iterations, t.max_iterations)
        else:
            iterations = t.max_iterations
        length = f"ceil({prompts} prompts x {t.epochs:g} epochs / ({t.batch_size} prompts x {gpus} GPUs))"
    else:
        iterations = t.max_iterations or math.ceil(prompts * t.epochs / (t.batch_size * gpus))
        length = f"train.max_iterations={t.max_iterations} optimizer steps of {t.batch_size} pairs per GPU"
    roof_s = sum(r["roofline_s"] for r in table.values())
    flops = sum(r["flops"] for r in table.values())
    mfu_s = flops / (gpu.tflops * 1e12 * mfu)
    worst = max(table.items(), key=lambda kv: kv[1]["roofline_s"])
    out = {"iterations_per_gpu": iterations, "run_length": length, "gpus": gpus,
           "iteration_flops": flops, "iteration_roofline_s": roof_s, "iteration_s_at_mfu": mfu_s, "mfu": mfu,
           "roofline_wall_hours": iterations * roof_s / 3600, "roofline_gpu_hours": iterations * roof_s * gpus / 3600,
           "wall_hours_at_mfu": iterations * mfu_s / 3600, "gpu_hours_at_mfu": iterations * mfu_s * gpus / 3600,
           "bounding_stage": worst[0], "bounding_stage_share": worst[1]["roofline_s"] / roof_s if roof_s else None,
           "bounding_stage_bound": worst[1]["bound"]}
    if recipe in PAPER_GPU_HOURS:
        out["paper_gpu_hours"], out["paper_source"] = PAPER_GPU_HOURS[recipe]
    return out


# ----------------------------------------------------------------------------- fit
def with_overhead(peak: int) -> float:
    """GiB a card needs for an allocated peak: the peak + the stated overhead."""
    return peak / GIB * (1 + OVERHEAD_FRACTION) + OVERHEAD_GIB


def peak_without(m: Measurement, saved_in_training: float) -> float:
    """The iteration's peak (bytes) when the training phase's peak holds ``saved_in_training`` bytes less."""
    return max(max(v for k, v in m.peaks.items() if k not in ("build", "train")), m.peaks["train"] - saved_in_training)


def fit_options(cfg) -> list[tuple[str, list[str], str]]:
    """The documented options that lower memory and are not already on: (name, overrides, what it changes)."""
    t, out = cfg.train, []
    if not t.gradient_checkpointing:
        out.append(("gradient checkpointing", ["train.gradient_checkpointing=true"], "recompute UNet activations"))
    if t.train_batch_size > 1:
        half = max(1, t.train_batch_size // 2)
        out.append((f"micro-batch {half}", [f"train.train_batch_size={half}", f"train.grad_accum={t.grad_accum * 2}"]
                    if cfg.method == "dpo" else [f"train.train_batch_size={half}"],
                    f"train.train_batch_size {t.train_batch_size} -> {half}"
                    + (" (grad_accum doubled: the same pairs per step)" if cfg.method == "dpo" else "")))
    if not cfg.model.vae_decode_batch or cfg.model.vae_decode_batch > 2:
        out.append(("VAE decodes 2 images per call", ["model.vae_decode_batch=2"],
                    "the rollout's pool decoded 2 images at a time"))
    if cfg.model.vae_dtype != "bf16":
        out.append(("VAE in bf16", ["model.vae_dtype=bf16"], "the VAE's weights and activations in bf16"))
    if cfg.method == "spo" and cfg.scorer.name == "spm" and cfg.scorer.dtype != "bf16":
        out.append(("preference model in bf16", ["scorer.dtype=bf16"], "the SPM's weights in bf16"))
    if not cfg.lora.enabled:
        out.append(("LoRA (rank 64) instead of full fine-tuning", ["lora.enabled=true", "lora.rank=64"],
                    ("changes the method's trainable set: rank-64 adapters, no gradient or optimizer state for "
                     "the frozen UNet, no reference copy")))
    if cfg.lora.enabled and cfg.lora.rank > 4:
        out.append((f"LoRA rank {cfg.lora.rank // 2}", [f"lora.rank={cfg.lora.rank // 2}"],
                    f"lora.rank {cfg.lora.rank} -> {cfg.lora.rank // 2}"))
    return out


def fit_report(recipe, overrides, cfg, base: Measurement, fit_gib: float, output_dir: str, log) -> dict:
    """Each option's peak (a fake run each), then the options combined, largest saving first, until it fits."""
    base_peak = max(v for k, v in base.peaks.items() if k != "build")
    rows = []
    for name, extra, what in fit_options(cfg):
        log(f"  fit: measuring {name} ...")
        c, _ = estimate_config(recipe, [*overrides, *extra], output_dir)
        peak = max(v for k, v in measure(c, count_flops=False).peaks.items() if k != "build")
        rows.append({"option": name, "overrides": extra, "changes": what, "peak_gib": peak / GIB,
                     "saving_gib": (base_peak - peak) / GIB, "how": "measured (fake run)"})
    opt = base.breakdown["train"].get("optimizer states", 0)
    if cfg.train.optimizer == "adamw" and opt:
        rows.append({"option": "8-bit AdamW", "overrides": ["train.optimizer=adamw8bit"],
                     "changes": "AdamW's two fp32 states per weight as 8-bit (bitsandbytes, CUDA only)",
                     "peak_gib": peak_without(base, 0.75 * opt) / GIB,
                     "saving_gib": (base_peak - peak_without(base, 0.75 * opt)) / GIB,
                     "how": "computed: 3/4 of the optimizer states at the training peak (bitsandbytes needs CUDA)"})
    rollout_only = sum(v for k, v in base.breakdown["train"].items()
                       if k in ("weights: VAE", "weights: preference model", "weights: merged rollout UNet"))
    if rollout_only:
        rows.append({"option": "offload rollout-only models during training", "overrides": [],
                     "changes": "VAE, preference model and merged copy off the GPU while training",
                     "peak_gib": peak_without(base, rollout_only) / GIB,
                     "saving_gib": (base_peak - peak_without(base, rollout_only)) / GIB,
                     "how": "computed; NOT an option of the trainer today (the saving it would bring)"})
    fits = with_overhead(base_peak) <= fit_gib
    combined_row = None
    if not fits:  # the measured options, largest saving first, until their summed savings fit; then measured together
        # options that keep the method first (LoRA instead of full fine-tuning changes what trains), then by saving
        usable = sorted((r for r in rows if r["how"].startswith("measured") and r["saving_gib"] > 0),
                        key=lambda r: (r["option"].startswith("LoRA (rank"), -r["saving_gib"]))
        chosen, extra, predicted = [], [], base_peak / GIB
        for r in usable:
            chosen.append(r["option"])
            extra += r["overrides"]
            predicted -= r["saving_gib"]
            if with_overhead(predicted * GIB) <= fit_gib:
                break
        now = base
        if chosen:
            log(f"  fit: measuring {' + '.join(chosen)} ...")
            c, _ = estimate_config(recipe, [*overrides, *extra], output_dir)
            now = measure(c, count_flops=False)
        peak = max(v for k, v in now.peaks.items() if k != "build")
        opt_now = now.breakdown["train"].get("optimizer states", 0)
        if with_overhead(peak) > fit_gib and cfg.train.optimizer == "adamw" and opt_now:
            peak = peak_without(now, 0.75 * opt_now)
            extra.append("train.optimizer=adamw8bit")
            chosen.append("8-bit AdamW (computed)")
        combined_row = {"options": chosen, "overrides": extra, "peak_gib": peak / GIB,
                        "needs_gib": with_overhead(peak), "fits": with_overhead(peak) <= fit_gib,
                        "how": "measured together (one fake run)" + ("; 8-bit AdamW computed" if
                                                                     "train.optimizer=adamw8bit" in extra else "")}
    return {"fit_gib": fit_gib, "needs_gib": with_overhead(base_peak), "fits": fits, "options": rows,
            "recommended": combined_row}


# ----------------------------------------------------------------------------- report
def _gib(n) -> str:
    return f"{n / GIB:.2f}"


def _e(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def render(r: dict) -> str:
    lines = [(f"{r['recipe']} ({r['method']}): {r['model']} at {r['resolution']} px, {r['precision']}; "
              f"{r['gpus']} x {r['gpu']['name']}")]
    lines += [f"  note: {n}" for n in r["notes"]]
    mem = r["memory"]
    lines.append(f"Memory per GPU (GiB of allocated tensors; a card needs peak x {1 + OVERHEAD_FRACTION:g} + "
                 f"{OVERHEAD_GIB:g} GiB for the CUDA context, workspaces and allocator slack, an assumption):")
    for phase, peak in mem["peaks_gib"].items():
        if phase == "build":
            continue
        parts = sorted(mem["breakdown_gib"][phase].items(), key=lambda kv: -kv[1])
        lines.append(f"  {phase:8s} peak {peak:7.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts if v >= 0.005))
    lines.append(f"  iteration peak {mem['iteration_peak_gib']:.2f} GiB -> needs {mem['needs_gib']:.1f} GiB; "
                 + ", ".join(f"{c} GB card: {'fits' if ok else 'does not fit'}" for c, ok in mem["cards"].items()))
    top = sorted(mem["modules_gib"].items(), key=lambda kv: -kv[1])[:6]
    lines.append("  largest forward growth: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    lines.append(f"Per iteration on {r['gpu']['name']} ({r['gpu']['tflops']:g} TFLOP/s dense bf16, "
                 f"{r['gpu']['tb_per_s']:g} TB/s): stage, TFLOP, GB moved, roofline s, bound")
    for name, row in r["stages"].items():
        lines.append(f"  {name:16s} {row['flops'] / 1e12:10.2f} {row['bytes'] / 1e9:10.1f} {row['roofline_s']:9.3f}"
                     f"  {row['bound']}")
    h = r["hours"]
    lines.append(f"Run: {h['iterations_per_gpu']} iterations per GPU ({h['run_length']})")
    lines.append(f"  roofline: {h['iteration_roofline_s']:.2f} s/iteration, {h['roofline_wall_hours']:.2f} h on "
                 f"{h['gpus']} GPUs = {h['roofline_gpu_hours']:.1f} GPU-hours (a lower bound)")
    lines.append(f"  at MFU {h['mfu']:.2f} ({r['mfu_source']}): {h['iteration_s_at_mfu']:.2f} s/iteration, "
                 f"{h['wall_hours_at_mfu']:.2f} h = {h['gpu_hours_at_mfu']:.1f} GPU-hours")
    lines.append(f"  bounded by {h['bounding_stage']} ({h['bounding_stage_share']:.0%} of the roofline time, "
                 f"{h['bounding_stage_bound']}-bound)")
    if "paper_gpu_hours" in h:
        lines.append(f"  the paper: {h['paper_gpu_hours']} GPU-hours ({h['paper_source']})")
    if r.get("valid_ratio") is not None:
        lines.append(f"  SPO training at valid-pair ratio {r['valid_ratio']:.3f} ({r['valid_ratio_source']})")
    fit = r.get("fit")
    if fit:
        lines.append(f"Fit in {fit['fit_gib']:g} GiB: {'yes' if fit['fits'] else 'no'} (needs {fit['needs_gib']:.1f})")
        for o in fit["options"]:
            lines.append(f"  {o['option']:44s} peak {o['peak_gib']:6.2f} GiB, saves {o['saving_gib']:5.2f} "
                         f"({o['how']}) {' '.join(o['overrides'])}")
        rec = fit.get("recommended")
        if rec:
            lines.append(f"  recommended: {' + '.join(rec['options']) or '(none helps)'} -> peak {rec['peak_gib']:.2f}"
                         f" GiB, needs {rec['needs_gib']:.1f}: {'fits' if rec['fits'] else 'still does not fit'}; "
                         f"{' '.join(rec['overrides'])}")
    lines.append("Host reads answered with placeholders: " + "; ".join(f"{k} x{v}" for k, v in r["reads"].items()))
    return "\n".join(lines)


def estimate(recipe: str | None, overrides: list[str], gpu: str = "a100-80gb", gpus: int | None = None,
             fit: float | None = None, valid_ratio: float | None = None, mfu: float | None = None,
             train_steps: int = 2, log=print) -> dict:
    """The whole estimate as a dict (what ``--json`` writes). Raises InputError for bad input."""
    if gpu not in GPUS:
        raise InputError(f"--gpu {gpu!r} is not known; choose one of {', '.join(GPUS)}")
    g = GPUS[gpu]
    with tempfile.TemporaryDirectory(prefix="spo_estimate_") as tmp:
        out_dir = str(Path(tmp) / "run")
        cfg, notes = estimate_config(recipe, overrides, out_dir)
        name = recipe or "toy_spo"
        gpus = gpus or RECIPE_GPUS.get(Path(name).stem, 1)
        log(f"estimate: building {cfg.model.path} on fake tensors and running one iteration ...")
        try:
            m = measure(cfg, train_steps)
        except InputError:
            raise
        except Exception as e:  # a recipe the trainer cannot build at this size: the user's config, one line
            raise InputError(f"the recipe {name!r} with {' '.join(overrides) or 'no overrides'} could not run on "
                             f"fake tensors ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
        spo = cfg.method == "spo"
        ratio = (valid_ratio if valid_ratio is not None else ASSUMED_VALID_RATIO) if spo else None
        table = stage_table(cfg, m, g, ratio if spo else 1.0)
        mfu_value, mfu_source = (mfu, "given with --mfu") if mfu is not None else measured_mfu(Path(name).stem)
        prompts, prompts_source = prompt_count(recipe, overrides) if spo else (0, "")
        peak = max(v for k, v in m.peaks.items() if k != "build")
        result = {
            "recipe": name, "method": cfg.method, "model": cfg.model.path, "precision": cfg.train.mixed_precision,
            "resolution": (cfg.model.resolution or None) and cfg.model.resolution, "overrides": overrides,
            "gpu": vars(copy.copy(g)), "gpus": gpus, "notes": notes,
            "memory": {"peaks_gib": {k: v / GIB for k, v in m.peaks.items()},
                       "breakdown_gib": {k: {c: b / GIB for c, b in v.items()} for k, v in m.breakdown.items()},
                       "modules_gib": {k: v / GIB for k, v in m.modules.items()},
                       "iteration_peak_gib": peak / GIB, "needs_gib": with_overhead(peak),
                       "whole_gib": {k: v / GIB for k, v in m.state_bytes.items()},
                       "overhead": {"gib": OVERHEAD_GIB, "fraction": OVERHEAD_FRACTION, "label": "assumption"},
                       "cards": {c: with_overhead(peak) <= c for c in CARDS_GIB}},
            "parameters": m.params,
            "stages": table,
            "hours": hours(cfg, Path(name).stem, m, table, g, gpus, mfu_value, prompts),
            "mfu_source": mfu_source,
            "valid_ratio": ratio,
            "valid_ratio_source": ("given with --valid-ratio" if valid_ratio is not None else
                                   "assumption: the toy default's 2,132 of 5,120") if spo else None,
            "prompts": prompts or None, "prompts_source": prompts_source or None,
            "run": {"micro_batches_run": m.micro_run, "micro_batches_all_valid": m.micro_total,
                    "optimizer_steps_run": m.steps_run, "transitions": m.transitions},
            "reads": m.reads,
            "label": "estimated (fake tensors on a CPU; no GPU measured this)",
        }
        result["resolution"] = result["resolution"] or _resolution(cfg)
        if fit is not None:
            result["fit"] = fit_report(recipe, overrides, cfg, m, fit, out_dir, log)
    return result


def _resolution(cfg) -> int:
    from spo_fast.diffusion.models import native_resolution, resolve_model_path

    return native_resolution(resolve_model_path(cfg.model.path))[0]


def main(argv: list[str] | None = None) -> int:
    from spo_fast.core.config import available_recipes

    parser = ArgumentParser(
        prog="python -m spo_fast.estimate",
        description="Peak GPU memory and run time of a recipe at its real architecture, without a GPU or weights: "
                    "the trainer's own build, rollout and training step on fake tensors.",
        epilog="recipes: " + ", ".join(available_recipes()) + ". GPUs: " + ", ".join(GPUS) + ". Examples: "
               "python -m spo_fast.estimate sdxl_spo --fit 24; python -m spo_fast.estimate sd15_spo --gpu h200 "
               "--gpus 1; python -m spo_fast.estimate sd15_dpo --json est.json")
    parser.add_argument("items", nargs="*", metavar="RECIPE | key=value",
                        help="a recipe (default sd15_spo), then dotted overrides as for spo_fast.train")
    parser.add_argument("--gpu", default="a100-80gb", help="the GPU of the time estimate (default a100-80gb, the "
                                                           "papers'); one of " + ", ".join(GPUS))
    parser.add_argument("--gpus", type=number_arg(int, 1), default=None,
                        help="GPUs (processes) of the run (default: the official run's, else 1)")
    parser.add_argument("--fit", type=number_arg(float, 0, strict=True), default=None, metavar="GIB",
                        help="say whether an iteration fits in GIB per GPU and which options bring it under")
    parser.add_argument("--valid-ratio", type=number_arg(float, 0, strict=True), default=None,
                        help=f"SPO: the share of transitions that train (default {ASSUMED_VALID_RATIO:.3f}, "
                             "an assumption)")
    parser.add_argument("--mfu", type=number_arg(float, 0, strict=True), default=None,
                        help="model FLOPs utilisation of the hours estimate (default: the last GPU measurement in "
                             f"benchmarks/results/, else {ASSUMED_MFU})")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the estimate as JSON")
    args = parser.parse_intermixed_args(argv)
    recipe = args.items[0] if args.items and "=" not in args.items[0] else "sd15_spo"
    overrides = args.items[1:] if args.items and "=" not in args.items[0] else args.items
    if args.valid_ratio is not None and args.valid_ratio > 1:
        parser.error(f"--valid-ratio {args.valid_ratio} is out of range: expected a share in (0, 1]")
    if args.mfu is not None and args.mfu > 1:
        parser.error(f"--mfu {args.mfu} is out of range: expected a share in (0, 1]")
    try:
        if args.gpu not in GPUS:
            raise InputError(f"--gpu {args.gpu!r} is not known; choose one of {', '.join(GPUS)}")
        if args.json:
            from spo_fast.core.errors import check_writable_dir

            check_writable_dir(Path(args.json).resolve().parent, "--json's directory")
        result = estimate(recipe, overrides, args.gpu, args.gpus, args.fit, args.valid_ratio, args.mfu,
                          log=lambda msg: print(msg, file=sys.stderr))
    except InputError as e:
        return report(e)
    print(render(result))
    if args.json:
        from spo_fast.core.jsonio import dumps

        Path(args.json).write_text(dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
