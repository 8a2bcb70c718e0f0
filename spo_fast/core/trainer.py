"""The trainer core that SPO and Diffusion-DPO share: everything about running a preference-training job that does
not depend on how the method turns data into a loss.

``run(cfg, method)``: cheap checks (output dir, model dir, resolution, the method's inputs, the evaluation prompts)
-> accelerator -> models (policy UNet with LoRA or fully trainable, the reference as adapters-off or a frozen copy)
-> optimizer and lr schedule -> resume -> per iteration::

    work = method.work(it)                 # SPO: a rollout, its valid transitions; DPO: a batch of pairs
    for each group of grad_accum micro-batches (the last group may be shorter):
        loss of each micro-batch (method.loss) -> backward, weighted so that the optimizer step minimises the
        mean over the step's valid pairs -> clip -> optimizer step -> lr step
    -> metrics (JSONL, TensorBoard), progress bar, checkpoint cadence, signals

and at the end the weights in diffusers format, the before/after sample grid and the held-out evaluation.

A method (``Method``) only says what comes next and how a micro-batch becomes a loss: ``spo_fast.methods.spo.SPO`` and
``spo_fast.methods.dpo.DiffusionDPO``. Micro-batches have one fixed shape each; only their number follows the data, and
processes agree on it (a process with fewer runs padding micro-batches that carry no pair), so DDP's gradient
all-reduce stays in step. No optimizer step is taken for a group without a valid pair on any process.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from spo_fast.core import jsonio
from spo_fast.core.checkpoint import (
    CheckpointError,
    check_files,
    check_finite,
    list_checkpoints,
    load_checkpoint,
    read_config,
    read_state,
    save_checkpoint,
    trainable_state,
)
from spo_fast.core.config import (
    Config,
    ConfigError,
    flatten,
    native_bf16,
    report_to_names,
    sampling_dtype,
    save_config,
    to_dict,
)
from spo_fast.core.errors import DivergedError
from spo_fast.core.model_card import write_model_card
from spo_fast.core.profiling import stage
from spo_fast.data import load_prompts
from spo_fast.diffusion.models import (
    Components,
    check_attention,
    check_model_dir,
    decode_latents,
    encode_negative,
    encode_prompts,
    load_components,
    native_resolution,
    resolve_model_path,
    set_attention,
)
from spo_fast.diffusion.sampling import DDIMSchedule, sample


# ----------------------------------------------------------------------------- the method interface
@dataclass
class MicroBatch:
    """One micro-batch of a method's work: ``data`` is the method's own (fixed shape), ``n_valid`` the number of
    pairs in it that carry a training signal (0 for a padding micro-batch). A host int, known before training."""

    data: object
    n_valid: int


@dataclass
class Work:
    """What one iteration trains on: the micro-batches in order, the method's statistics of the iteration
    (scalars averaged over processes in the metrics) and how many samples it consumed (for samples/s)."""

    micro: list[MicroBatch]
    stats: dict[str, float | torch.Tensor] = field(default_factory=dict)
    samples: int = 0


class Method(Protocol):
    name: str  # "SPO" | "DPO": the progress bar, the TensorBoard project
    scorer: object | None  # scores the sample grid (and eval.reward=scorer); None: no scores

    def preflight(self, cfg: Config) -> None:
        """Cheap checks of the method's inputs (prompts, pairs, scorer directory), before any model is built."""

    def setup(self, cfg: Config, s: Setup, accelerator) -> None:
        """Build what the method needs beyond the models (scorer, prompt sampler, dataset, cache)."""

    def epoch_iterations(self, cfg: Config, world_size: int) -> int:
        """Iterations that cover ``train.epochs`` passes over the method's data with all processes."""

    def work(self, it: int) -> Work: ...

    def loss(self, mb: MicroBatch):
        """The loss of one micro-batch: a ``LossOutput`` whose ``loss`` and ``accuracy`` are means over its valid
        pairs (``spo_fast.kernels.spo_loss``)."""

    def padding(self) -> MicroBatch:
        """A micro-batch of the fixed shape with no valid pair (keeps processes' all-reduces in step)."""

    def grid_prompts(self, n: int) -> list[str]: ...


# ----------------------------------------------------------------------------- fast checks
def check_output_dir(path: str) -> Path:
    """Create the output dir and prove it is writable, before anything heavy happens."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"log.output_dir={path!r} is not writable ({e.strerror}); "
                          "choose a directory you can write to, e.g. log.output_dir=./outputs/run") from e
    return out


def check_model(cfg: Config) -> Path:
    """The model directory's layout and the requested resolution, from its config files (nothing is built)."""
    model_dir = resolve_model_path(cfg.model.path)
    check_model_dir(model_dir, cfg.model.family, cfg.model.init)
    if cfg.model.resolution:
        _, f = native_resolution(model_dir)
        if cfg.model.resolution % (8 * f):
            raise ConfigError(f"model.resolution={cfg.model.resolution} must be a multiple of {8 * f} for "
                              f"{cfg.model.path} (8 latent cells of {f} px); 0 uses the model's own resolution")
    return model_dir


def eval_prompts(cfg: Config) -> list[str]:
    """The evaluation prompts; with the ground-truth reward every one must be a toy-world prompt."""
    prompts = load_prompts(cfg.eval.prompts)[:cfg.eval.n_prompts]
    if cfg.eval.reward == "ground_truth":
        from spo_fast.toyworld import world

        for p in prompts:
            try:
                world.parse_prompt(p)
            except ValueError as e:
                raise ConfigError(f"eval.reward=ground_truth needs toy-world prompts (eval.prompts=toyworld:test); "
                                  f"{e}; use eval.reward=scorer for other prompts") from e
    return prompts


def check_scorer(cfg: Config) -> None:
    """``scorer.path`` of an SPM scorer is a directory with a config.json; the ``ground_truth`` scorer's training
    prompts are toy-world prompts."""
    if cfg.scorer.name == "ground_truth" and cfg.method == "spo":
        from spo_fast.toyworld import world

        for p in load_prompts(cfg.data.prompts):
            try:
                world.parse_prompt(p)
            except ValueError as e:
                raise ConfigError(f"scorer.name=ground_truth scores toy-world prompts only (data.prompts="
                                  f"toyworld:train); data.prompts={cfg.data.prompts!r}: {e}") from e
    if cfg.scorer.name != "spm":
        return
    from spo_fast.reward.spm import SPMError, check_spm_dir

    spm_dir = resolve_model_path(cfg.scorer.path)
    if cfg.scorer.init == "pretrained" or not (spm_dir / "config.json").is_file():
        try:  # a missing directory's message says how to convert the official SPM into one
            check_spm_dir(spm_dir)
        except SPMError as e:
            raise ConfigError(f"scorer.path={cfg.scorer.path!r}: {e}") from e


def check_speed_options(cfg: Config) -> None:
    """The speed options that need a package or a GPU (``train.attention``, ``train.optimizer=adamw8bit``) can
    run here; checked before any model is built."""
    check_attention(cfg.train.attention, torch.cuda.is_available())
    if cfg.train.optimizer == "adamw8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes, which is not installed (pip install "
                              "bitsandbytes); or use train.optimizer=adamw (train.fused_adamw=true for the fused "
                              "kernel) or adafactor")


def preflight(cfg: Config, method: Method) -> Path:
    """Every check of the inputs that needs no model, cheapest first; returns the output dir. The method's own
    checks (prompts; pairs: schema, labels and, without a cache, every image) come last."""
    out = check_output_dir(cfg.log.output_dir)
    check_model(cfg)
    check_speed_options(cfg)
    trackers(cfg)
    ckpt = resume_path(cfg, out)
    if ckpt is not None:
        changed = check_resume(cfg, ckpt)
        if changed and int(os.environ.get("RANK", "0")) == 0:
            print(f"warning: resuming from {ckpt} with changed settings, used from here on: {'; '.join(changed)}",
                  file=sys.stderr, flush=True)
    check_scorer(cfg)
    if cfg.eval.enabled:
        eval_prompts(cfg)
    method.preflight(cfg)
    return out


def resume_path(cfg: Config, out: Path) -> Path | None:
    """The checkpoint to resume from (``checkpoint.resume``: auto | never | a path). The choice only: ``preflight``
    checks the checkpoint (``check_resume``)."""
    resume = cfg.checkpoint.resume
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    ckpt = Path(resume).expanduser()
    if not (ckpt / "state.json").is_file():
        raise ConfigError(f"checkpoint.resume={resume!r} is not a checkpoint directory (no state.json); "
                          "use auto, never, or a path like <output_dir>/checkpoints/iter_0000050")
    return ckpt


def finished_run(cfg: Config, out: Path) -> dict | None:
    """The summary of the finished run in ``out`` that ``cfg`` would only resume to redo its end phase, else None.
    Finished: ``summary.json`` says it was not stopped, the checkpoint it would resume from is at that summary's
    last iteration, and the run length (``train.max_iterations``, ``train.epochs``) is the one that checkpoint
    recorded (a longer run resumes and trains on). ``checkpoint.redo_end=true`` or ``resume=never``: None. Reads
    three small files; builds nothing."""
    if cfg.checkpoint.redo_end or cfg.checkpoint.resume == "never" or not (out / "summary.json").is_file():
        return None
    try:
        summary = json.loads((out / "summary.json").read_text())
        ckpt = resume_path(cfg, out)
        if ckpt is None or not isinstance(summary, dict) or summary.get("stopped") is not False:
            return None
        state, recorded = read_state(ckpt), read_config(ckpt) or {}
    except (OSError, ValueError, CheckpointError, ConfigError):
        return None  # unreadable: the resume checks that follow name the problem
    train = recorded.get("train") or {}
    same_length = all(train.get(k) == getattr(cfg.train, k) for k in ("max_iterations", "epochs"))
    return summary if same_length and state["iteration"] == summary.get("iterations") else None


# Keys whose change makes a checkpoint's state unusable or its meaning different: resuming across one is an error.
# Everything else (lr and the other optimizer settings, logging, evaluation, sampling speed options, run length...)
# is applied from the resumed step on, with a warning. Not compared at all: where the run is and how it resumes.
RESUME_UNSAFE = ("method", "model.family", "model.path", "model.init", "model.seed", "lora.enabled", "lora.rank",
                 "lora.alpha", "lora.targets", "train.optimizer", "train.batch_size", "train.train_batch_size",
                 "train.grad_accum", "train.accumulate_across_iterations", "train.loss_weighting",
                 "spo.micro_batches", "spo.process_split")
RESUME_IGNORED = ("checkpoint.resume", "checkpoint.redo_end", "log.output_dir")


def resume_changes(saved: dict, cfg: Config) -> tuple[list[tuple], list[tuple]]:
    """(unsafe, safe) differences between a checkpoint's recorded config and ``cfg``, as ``(key, old, new)``.
    ``model.seed`` only matters for random weights; keys that one side lacks (other versions) are not compared."""
    old, new = flatten(saved), flatten(to_dict(cfg))
    unsafe, safe = [], []
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key] or key in RESUME_IGNORED:  # 1 == 1.0: an int written as a float is no change
            continue
        if key == "model.seed" and cfg.model.init == "pretrained":
            continue
        (unsafe if key in RESUME_UNSAFE else safe).append((key, old[key], new[key]))
    return unsafe, safe


def check_resume(cfg: Config, ckpt: Path) -> list[str]:
    """Check the checkpoint a run would resume from, before any model is built: its files (``checkpoint.check_files``),
    the number of processes, and its recorded config against ``cfg`` (``resume_changes``). Raises CheckpointError
    for an unsafe change; returns the safe changes (printed as a warning and used)."""
    state = check_files(ckpt)
    fix = f"use checkpoint.resume=never to start afresh in {cfg.log.output_dir}, or another log.output_dir"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(state["world_size"]) != world:
        raise CheckpointError(f"checkpoint {ckpt} was written by {state['world_size']} processes, this run has {world}; "
                              "resume with the same number of processes (the data order and the per-rank noise depend "
                              f"on it), or {fix}")
    saved = read_config(ckpt)
    if saved is None:
        return [f"{ckpt} records no config (written by an older version): the settings were not compared"]
    unsafe, safe = resume_changes(saved, cfg)
    if unsafe:
        changes = "; ".join(f"{k} was {old!r}, is now {new!r}" for k, old, new in unsafe)
        restore = " ".join(f"{k}={','.join(map(str, old)) if isinstance(old, list) else old}" for k, old, _ in unsafe)
        raise CheckpointError(f"cannot resume from {ckpt}: {changes}; the checkpoint's state does not carry over to "
                              f"the new value{'s' if len(unsafe) > 1 else ''}. Restore {restore}, or {fix}")
    return [f"{k}: {old!r} -> {new!r}" for k, old, new in safe]


# ----------------------------------------------------------------------------- model setup
@dataclass
class Setup:
    comp: Components
    unet: torch.nn.Module  # the (DDP-)wrapped policy UNet
    raw_unet: torch.nn.Module  # the unwrapped policy UNet
    ref_unet: torch.nn.Module | None  # frozen copy, full fine-tuning only
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: DDIMSchedule
    latent_shape: tuple[int, int, int]
    weight_dtype: torch.dtype
    pending: Pending = field(default_factory=lambda: Pending())  # gradient accumulated towards the next step

    @property
    def resolution(self) -> int:
        """Image resolution in pixels."""
        return self.latent_shape[1] * self.comp.vae_scale_factor


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW (torch), Adafactor (transformers, the official Diffusion-DPO SDXL setting: fixed
    lr, no relative step, no parameter scaling) or 8-bit AdamW (bitsandbytes, when installed)."""
    t = cfg.train
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=t.lr, weight_decay=t.weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False, clip_threshold=1.0)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                              "or use train.optimizer=adafactor (no extra package) or adamw") from e
        return bnb.optim.AdamW8bit(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                                   eps=t.adam_eps)
    # fused: one kernel for the whole update (train.fused_adamw); None lets torch pick its foreach default
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                             eps=t.adam_eps, fused=True if t.fused_adamw else None)


def set_tf32(allow: bool) -> None:
    """``train.allow_tf32``, set both ways (a later run in the same process with it off really runs fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def build(cfg: Config, accelerator) -> Setup:
    """Load the model, place it, make the policy trainable (LoRA or all of the UNet), the optimizer and schedule.

    The speed options apply here: TF32 (``train.allow_tf32``), the UNet's attention (``train.attention``), the
    VAE's dtype (``model.vae_dtype``), channels-last weights (``train.channels_last``), gradient checkpointing and
    the fused AdamW (``make_optimizer``). Random weights (``model.init=random``) are built on the device."""
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    dev = accelerator.device
    if dev.type == "cuda":
        set_tf32(cfg.train.allow_tf32)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]
    comp = load_components(cfg.model.path, cfg.model.family, cfg.model.init, cfg.model.seed,
                           device=dev if cfg.model.init == "random" else None)
    if comp.vae is not None:
        auto = torch.float32 if comp.vae.config.get("force_upcast", False) else weight_dtype
        _place(comp.vae, dev, {"auto": auto, "fp32": torch.float32, "bf16": torch.bfloat16}[cfg.model.vae_dtype])
        comp.vae_autocast = cfg.model.vae_dtype == "auto"
        comp.decode_batch = cfg.model.vae_decode_batch
    for te in comp.text_encoders:
        _place(te, dev, weight_dtype)
    unet, ref_unet = comp.unet, None
    set_attention(unet, cfg.train.attention)
    if cfg.lora.enabled:
        _place(unet, dev, weight_dtype)
        try:
            unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha or cfg.lora.rank,
                                        init_lora_weights="gaussian", target_modules=list(cfg.lora.targets)))
        except ValueError as e:  # peft: no module matched the targets
            raise ConfigError(f"lora.targets={','.join(cfg.lora.targets)} matched no UNet module ({e}); use "
                              "attention projections such as to_q,to_k,to_v,to_out.0") from e
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable LoRA weights stay fp32 under mixed precision
    else:
        unet.to(dev)
        ref_unet = _place(copy.deepcopy(unet), dev, weight_dtype).eval().requires_grad_(False)
        unet.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.train.channels_last:
        for module in (unet, ref_unet, comp.vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"lora.targets={cfg.lora.targets} matched no UNet module; "
                          "use attention projections such as to_q,to_k,to_v,to_out.0")
    optimizer = make_optimizer(cfg, params)
    # Stepped by us once per optimizer step (accelerate would step it num_processes times).
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.train.warmup_steps)
    wrapped, optimizer = accelerator.prepare(unet, optimizer)
    schedule = DDIMSchedule.from_scheduler(comp.scheduler, cfg.sampling.num_steps, device=dev)
    latent_shape = comp.latent_shape
    if cfg.model.resolution:  # checked by check_model
        f = comp.vae_scale_factor
        latent_shape = (latent_shape[0], cfg.model.resolution // f, cfg.model.resolution // f)
    return Setup(comp, wrapped, unet, ref_unet, params, optimizer, lr_scheduler, schedule, latent_shape,
                 weight_dtype)


def _place(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move (components load in fp32; casting only when needed avoids diffusers' cast warning)."""
    return module.to(device) if dtype == torch.float32 else module.to(device, dtype)


@contextlib.contextmanager
def reference_unet(s: Setup):
    """The frozen reference: LoRA adapters disabled on the same UNet, or the frozen copy."""
    if s.ref_unet is not None:
        yield s.ref_unet
        return
    s.raw_unet.disable_adapters()
    try:
        yield s.raw_unet
    finally:
        s.raw_unet.enable_adapters()


def decoder(comp: Components, clamp: bool = True):
    """``decode_latents`` bound to ``comp`` (``clamp=False``: the raw decoder output, for the rollout's scorer)."""
    return functools.partial(decode_latents, comp, clamp=clamp)


def sampling_autocast(cfg: Config, accelerator):
    """The autocast of no-grad sampling (rollout, sample grid, evaluation): ``sampling.dtype`` (``auto`` = the run's
    mixed precision; ``bf16_if_native``: ``config.sampling_dtype``)."""
    if cfg.sampling.dtype == "auto":
        return accelerator.autocast()
    dev = accelerator.device.type
    if sampling_dtype(cfg, dev) == "fp32":
        return torch.autocast(dev, enabled=False)
    return torch.autocast(dev, dtype=torch.bfloat16)


def sampling_weight_dtype(cfg: Config, accelerator) -> torch.dtype | None:
    """The dtype ``sampling_autocast`` computes in (None: it does not autocast): the dtype the plain sampling copies
    of ``sampling.merge_lora`` hold their Linear/Conv2d weights in."""
    from spo_fast.diffusion.merged import autocast_dtype

    with sampling_autocast(cfg, accelerator):
        return autocast_dtype(accelerator.device.type)


def sampling_unet(cfg: Config, s: Setup, row: str):
    """A context that yields the UNet sampling ``row`` (``base`` or ``trained``) in a no-grad pass (sample grid,
    evaluation, ``spo_fast.compare``'s points); enter it inside the sampling autocast. With ``sampling.merge_lora`` a
    plain copy (``spo_fast.diffusion.merged.plain_unet``: the base weights, or the policy's LoRA merged in; weights in
    the autocast's dtype; ``sampling.chunked_attention``), made on entry and freed on exit; otherwise the UNet itself
    with its adapters off (base) or on (trained)."""
    if cfg.sampling.merge_lora:
        from spo_fast.diffusion.merged import plain_unet

        return plain_unet(s.raw_unet, None if row == "base" else "default", cfg.sampling.chunked_attention)
    return reference_unet(s) if row == "base" else contextlib.nullcontext(s.raw_unet)


def kernel_backend(cfg: Config) -> str | None:
    """The kernels' ``backend`` argument: ``torch``/``triton`` win over SPO_FAST_KERNELS; ``auto`` defers to it."""
    return None if cfg.train.kernels == "auto" else cfg.train.kernels


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by global norm (unscaling fp16 grads first; ``max_norm`` 0: no clipping, the official SPO code's
    behaviour); returns the norm before clipping (a tensor: no host sync)."""
    if max_norm > 0:
        return accelerator.clip_grad_norm_(params, max_norm)
    accelerator.unscale_gradients()  # fp16: the norm of the true gradient, as clip_grad_norm_ reports it
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


# ----------------------------------------------------------------------------- outputs
class StopFlag:
    """First SIGINT/SIGTERM: finish the iteration, checkpoint, exit. Second SIGINT: abort now."""

    def __init__(self):
        self.set = False
        self._old = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        print(f"\n[spo_fast] signal {signum}: stopping after this iteration (a checkpoint will be written); "
              "press Ctrl-C again to abort now", file=sys.stderr)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def save_weights(s: Setup, out: Path) -> Path:
    """LoRA weights in diffusers format (``pipe.load_lora_weights(dir)``), or the full UNet (``unet/``). Weights with
    inf/NaN are never written (DivergedError)."""
    check_finite(trainable_state(s.raw_unet), "the final weights")
    if s.ref_unet is not None:
        target = out / "unet"
        s.raw_unet.save_pretrained(target)
        return target
    # the pipelines' LoRA mixins (what StableDiffusion(XL)Pipeline.save_lora_weights is): importing the pipeline
    # classes would import transformers' image processors and warn that torchvision is missing
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(s.raw_unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    pipe_cls = StableDiffusionXLLoraLoaderMixin if s.comp.family == "sdxl" else StableDiffusionLoraLoaderMixin
    target = out / "lora"
    pipe_cls.save_lora_weights(save_directory=str(target), unet_lora_layers=layers, safe_serialization=True)
    return target


@torch.no_grad()
def sample_grid(cfg: Config, s: Setup, accelerator, prompts: list[str], scorer, out: Path, name: str = "samples",
                iteration: int | None = None) -> dict:
    """Base vs trained images for ``prompts``, same noise -> ``out/<name>.png``
    (``spo_fast.evaluation.grids.labelled_grid``: base row above trained row, prompt captions, the scores under
    each image) and ``<name>.json``: ``prompts``, ``rows``, ``scores`` (the scorer's at t = 0 per row; empty without a scorer) and, when every prompt is a
    toy-world prompt, ``ground_truth`` (the toy world's score per row). The noise is fixed by ``train.seed``, so
    grids of one run (the validation images every ``log.sample_every`` iterations, ``iteration`` in the header)
    compare image by image."""
    from tqdm.auto import tqdm

    from spo_fast.evaluation.grids import compare_colours, labelled_grid
    from spo_fast.evaluation.heldout import all_toy_prompts

    n = len(prompts)
    res = s.resolution
    cond = encode_prompts(s.comp, prompts, accelerator.device, res)
    uncond = encode_negative(s.comp, cfg.sampling.negative_prompt, n, accelerator.device, res)
    decode = decoder(s.comp)
    state = scorer.prepare(prompts) if scorer is not None else None
    images, scores = {}, {}
    with tqdm(total=2, desc="sample grid", unit="model", disable=not cfg.log.progress, mininterval=1.0) as bar:
        for row in ("base", "trained"):
            bar.set_postfix_str(row, refresh=False)
            gen = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed + 12345)
            x = torch.randn((n, *s.latent_shape), generator=gen, device=accelerator.device)
            with sampling_autocast(cfg, accelerator), sampling_unet(cfg, s, row) as unet:
                img = decode(sample(unet, s.schedule, cond, uncond, x, cfg.sampling.guidance_scale, cfg.sampling.eta,
                                    gen, backend=kernel_backend(cfg)))
            if scorer is not None:
                t0 = torch.zeros(n, dtype=torch.long, device=img.device)
                scores[row] = scorer.score(img, t0, state, torch.arange(n, device=img.device)).tolist()
            images[row] = img.float().cpu()
            bar.update(1)
    truth = {}
    if all_toy_prompts(prompts):
        from spo_fast.toyworld import world

        try:
            truth = {k: world.score_prompts(v, prompts).tolist() for k, v in images.items()}
        except ValueError:  # toy prompts on images the ground truth cannot read (too small)
            truth = {}
    scorer_name = "SPM" if cfg.scorer.name == "spm" else cfg.scorer.name
    main = truth or scores  # the numbers that colour the notes: the ground truth when there is one

    def note(row: str, i: int) -> str:  # "base 3.21 (SPM 20.52)", "base 3.21" or "base SPM 20.52"
        text = row + (f" {truth[row][i]:.2f}" if truth else "")
        if scores:
            text += f" ({scorer_name} {scores[row][i]:.2f})" if truth else f" {scorer_name} {scores[row][i]:.2f}"
        return text

    notes = [[note(row, i) for i in range(n)] for row in ("base", "trained")] if main else None
    what = ", ".join(filter(None, ("ground truth (0-10)" if truth else "",
                                   f"{scorer_name} score at t = 0" if scores else "")))
    when = f" at iteration {iteration}" if iteration is not None else ""
    header = f"before (base) vs after (trained{when}), same noise (seed {cfg.train.seed + 12345})"
    if main:
        header += "; under each image: " + what + "; means: " + "; ".join(
            f"{label} base {np.mean(d['base']):.2f} -> trained {np.mean(d['trained']):.2f}"
            for label, d in (("ground truth", truth), (scorer_name, scores)) if d)
    labelled_grid([images["base"], images["trained"]], ["base", "trained"], prompts, notes, header,
                  note_colours=compare_colours(main["base"], main["trained"]) if main else None).save(
        out / f"{name}.png")
    result = {"prompts": prompts, "rows": ["base", "trained"], "scores": scores}
    if truth:
        result["ground_truth"] = truth
    (out / f"{name}.json").write_text(jsonio.dumps(result, indent=1))
    return result


def validation_images(cfg: Config, s: Setup, accelerator, method: Method, prompts: list[str], it: int,
                      out: Path) -> None:
    """The sample grid of ``prompts`` at iteration ``it`` (main process): ``samples/iter_<it>.png/json`` and, to
    every tracker that takes images (tensorboard, W&B, ...), the grid as ``samples`` at step ``it``."""
    from PIL import Image

    (out / "samples").mkdir(exist_ok=True)
    name = f"samples/iter_{it:07d}"
    was_training = s.raw_unet.training
    s.raw_unet.eval()
    sample_grid(cfg, s, accelerator, prompts, method.scorer, out, name, it)
    s.raw_unet.train(was_training)
    grid = np.asarray(Image.open(out / f"{name}.png").convert("RGB"))
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_images"):
            kwargs = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({"samples": grid[None]}, step=it, **kwargs)


def run_eval(cfg: Config, s: Setup, accelerator, scorer, out: Path) -> dict:
    """The end-of-run evaluation: base (adapters off) vs trained on the same noise (``spo_fast.evaluation.heldout``)."""
    from spo_fast.evaluation.heldout import evaluate, ground_truth_reward, scorer_reward

    scorer_name = "SPM" if cfg.scorer.name == "spm" else cfg.scorer.name
    reward = ground_truth_reward if cfg.eval.reward == "ground_truth" else scorer_reward(
        scorer, f"{scorer_name} at t = 0")
    s.raw_unet.eval()
    base_cache = None
    if cfg.eval.base_cache:
        from spo_fast.evaluation.base_cache import BaseEvalCache

        base_cache = BaseEvalCache(log=lambda msg: print(f"[spo_fast] {msg}", flush=True))
    with sampling_autocast(cfg, accelerator):
        return evaluate(s.comp, sampling_unet(cfg, s, "base"), sampling_unet(cfg, s, "trained"),
                        eval_prompts(cfg),
                        cfg.eval.seeds, reward, out, cfg.sampling, cfg.eval.batch_size, accelerator.device,
                        latent_shape=s.latent_shape, backend=kernel_backend(cfg), progress=cfg.log.progress,
                        grid_prompts=cfg.eval.grid_prompts, base_cache=base_cache)


# ----------------------------------------------------------------------------- training
@dataclass
class Pending:
    """The optimizer step being accumulated: its micro-batches so far (their gradients are in the parameters'
    ``.grad``), their valid pairs on this process and on all processes, and their loss and accuracy sums (weighted
    by valid pairs). Empty (``micro == 0``) between iterations unless ``train.accumulate_across_iterations``; a
    checkpoint saves it with the gradients (``spo_fast.core.checkpoint``)."""

    micro: int = 0
    n_local: int = 0
    n_all: int = 0
    loss: float = 0.0
    acc: float = 0.0

    def state(self) -> dict:
        return {"micro": self.micro, "n_local": self.n_local, "n_all": self.n_all, "loss": self.loss,
                "acc": self.acc}

    def load(self, state: dict) -> None:
        self.micro, self.n_local, self.n_all = int(state["micro"]), int(state["n_local"]), int(state["n_all"])
        self.loss, self.acc = float(state["loss"]), float(state["acc"])


def optimizer_groups(micro: list[MicroBatch], accum: int, pending: int = 0) -> list[list[MicroBatch]]:
    """The micro-batches of one iteration in optimizer-step groups of ``accum``; the last group may be shorter.
    ``pending`` micro-batches of an earlier iteration (``train.accumulate_across_iterations``) already wait for the
    step that the first group completes, so the first group has ``accum - pending``."""
    groups, i = [], 0
    while i < len(micro):
        size = accum - pending if i == 0 else accum
        groups.append(micro[i:i + size])
        i += size
    return groups


def train_iteration(cfg: Config, s: Setup, accelerator, method: Method, work: Work) -> dict:
    """Forward/backward every micro-batch of ``work``, one optimizer step per ``train.grad_accum`` micro-batches.

    Each micro-batch's loss is its mean over its valid pairs. ``train.loss_weighting=pairs``: it is backpropagated
    with weight world * n_valid(micro-batch) / n_valid(step, all processes), so after DDP's average a step's
    gradient is that of the mean over the step's valid pairs on all processes; ``micro_batches`` (the official
    code): weight 1 / grad_accum (0 for a padding micro-batch). ``train.accumulate_across_iterations``: the
    micro-batch count runs across iterations, so a step may complete in the next iteration (``s.pending``); as the
    step's valid pairs are then not known in advance, the pairs weighting backpropagates world * n_valid /
    (train_batch_size * grad_accum * world) and rescales the gradient by that denominator over the step's valid
    pairs just before the step. Without it the last step of an iteration may have fewer micro-batches.
    A step whose loss (any micro-batch's, on any process) or gradient norm is not finite is skipped: no optimizer
    or schedule step, the gradients are dropped, nothing changes (fp16: the loss only, as the loss scaler handles
    overflowing gradients); ``bad`` records, per optimizer step in order,
    whether it was skipped (one host read per optimizer step decides it).
    Returns sums for the metrics (tensors) over the steps taken in this iteration (with their micro-batches of an
    earlier iteration): loss and accuracy weighted by valid pairs, valid pairs, optimizer steps, the sum of the
    steps' gradient norms; and ``bad``."""
    t = cfg.train
    micro = list(work.micro)
    world = accelerator.num_processes
    if world > 1:  # every process runs the same number of micro-batches (DDP all-reduces)
        most = _all_max(accelerator, torch.tensor([len(micro)], device=accelerator.device))
        micro += [method.padding() for _ in range(most - len(micro))]
    pending = getattr(s, "pending", None)
    if pending is None:  # a Setup has one; a stand-in gets one here, kept for its next iteration
        pending = s.pending = Pending()
    across = t.accumulate_across_iterations
    groups = optimizer_groups(micro, t.grad_accum, pending.micro if across else 0)
    # valid pairs of each micro-batch over all processes (one collective per iteration): the weights need the
    # step's total, since DDP averages the processes' gradients
    local_mb = [mb.n_valid for mb in micro]
    if world > 1 and micro:
        all_mb = [int(v) for v in accelerator.reduce(torch.tensor(local_mb, dtype=torch.long,
                                                                   device=accelerator.device), "sum").tolist()]
    else:
        all_mb = local_mb
    by_pairs = t.loss_weighting == "pairs"
    fixed = t.train_batch_size * t.grad_accum * world  # pairs weighting's denominator, a step spanning iterations
    dev = accelerator.device
    loss_sum, acc_sum, norm_sum = (torch.zeros((), device=dev) for _ in range(3))
    steps, n_valid, bad = 0, 0, []
    pos = 0
    for group in groups:
        n_mb = all_mb[pos:pos + len(group)]
        pos += len(group)
        carried = across and pending.micro > 0  # a step begun in an earlier iteration
        completes = (pending.micro if across else 0) + len(group) == t.grad_accum or not across
        g_loss = torch.full((), pending.loss if carried else 0.0, device=dev)
        g_acc = torch.full((), pending.acc if carried else 0.0, device=dev)
        # the denominator of the pairs weighting: the step's valid pairs when all of them are known now
        exact = not across or (not carried and completes)
        denom = sum(n_mb) if exact else fixed
        for j, mb in enumerate(group):
            sync = completes and j == len(group) - 1
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(s.unet)
            if by_pairs:
                weight = mb.n_valid * world / max(denom, 1)
            else:
                weight = 1.0 / t.grad_accum if mb.n_valid else 0.0
            with ctx:
                with accelerator.autocast():
                    lo = method.loss(mb)
                with stage("train/backward"):
                    accelerator.backward(lo.loss * weight)
            g_loss += lo.loss.detach().float() * mb.n_valid
            g_acc += lo.accuracy.detach().float() * mb.n_valid
        n_group = (pending.n_local if carried else 0) + sum(mb.n_valid for mb in group)
        n_all = (pending.n_all if carried else 0) + sum(n_mb)
        if not completes:  # across iterations: the step completes in a later iteration
            pending.micro += len(group)
            pending.n_local, pending.n_all = n_group, n_all
            pending.loss, pending.acc = float(g_loss), float(g_acc)
            continue
        pending.micro = pending.n_local = pending.n_all = 0
        pending.loss = pending.acc = 0.0
        with stage("train/optimizer"):
            if by_pairs and not exact:  # the gradient is of sum(loss * n_valid) / fixed: make it the step's mean
                grads = [p.grad for p in s.params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, fixed / max(n_all, 1))
            norm = clip_gradients(accelerator, s.params, t.max_grad_norm).float().to(dev)
            if accelerator.scaler is None:
                finite = torch.isfinite(norm) & torch.isfinite(g_loss)
            else:  # fp16: the loss scaler skips overflowing steps itself and lowers its scale; only the loss counts
                finite = torch.isfinite(g_loss)
                norm = torch.nan_to_num(norm, nan=0.0, posinf=0.0)
            if world > 1:  # the processes skip together (their losses differ; their reduced gradients do not)
                finite = accelerator.reduce((~finite).float().reshape(1), "sum")[0] == 0
            ok = bool(finite)  # the step's one host read
            if ok:
                s.optimizer.step()
                s.lr_scheduler.step()
                loss_sum += g_loss
                acc_sum += g_acc
                norm_sum += norm
                steps += 1
                n_valid += n_group
            bad.append(not ok)
            s.optimizer.zero_grad(set_to_none=True)
    return {"loss_sum": loss_sum, "acc_sum": acc_sum, "norm_sum": norm_sum, "steps": steps, "n_valid": n_valid,
            "bad": bad}


def run_length(cfg: Config, epoch_iterations: int) -> int:
    """Iterations of the run: ``train.epochs``' worth, capped by ``train.max_iterations`` (alone when epochs = 0)."""
    if not cfg.train.max_iterations:
        return epoch_iterations
    return min(epoch_iterations, cfg.train.max_iterations) if cfg.train.epochs > 0 else cfg.train.max_iterations


def _all_max(accelerator, n: torch.Tensor) -> int:
    """The largest value of a one-element tensor over all processes."""
    gathered = accelerator.gather(n)
    return int(gathered.max().item())


def iteration_metrics(accelerator, it: int, opt_step: int, work: Work, sums: dict, lr: float, dt: float) -> dict:
    """One metrics.jsonl row; sums over processes, then means. ``loss``/``implicit_acc`` are means over the
    iteration's valid pairs, ``grad_norm`` over its optimizer steps (null when there were none)."""
    keys = list(work.stats)
    local = torch.stack([sums["loss_sum"], sums["acc_sum"], torch.tensor(float(sums["n_valid"]), device=sums[
        "loss_sum"].device), sums["norm_sum"], torch.tensor(float(sums["steps"]), device=sums["loss_sum"].device),
                         *(torch.as_tensor(work.stats[k], dtype=torch.float32).to(sums["loss_sum"].device).reshape(())
                           for k in keys)]).float()
    total = accelerator.reduce(local, reduction="sum").tolist()
    world = accelerator.num_processes
    loss_sum, acc_sum, n_valid, norm_sum, steps = total[:5]
    row = {"iteration": it + 1, "opt_step": opt_step,
           "loss": loss_sum / n_valid if n_valid else None,
           "implicit_acc": acc_sum / n_valid if n_valid else None,
           "valid_pairs": int(n_valid), "opt_steps": round(steps / world),
           "grad_norm": norm_sum / steps if steps else None}
    row["bad_steps"] = sum(sums.get("bad", ()))
    row.update({k: v / world for k, v in zip(keys, total[5:])})
    row.update({"lr": lr, "samples_per_s": work.samples * world / dt, "seconds": dt})
    return row


def run(cfg: Config, method: Method, hook=None) -> tuple[dict, Setup]:
    """Train ``method`` as configured; returns (summary, the trained models). Raises ConfigError/ModelDirError
    (and the method's input errors) before any model is built. ``hook(it, total, s, row)``, when given, is called on
    every process after each iteration ``it`` (0-based) of ``total`` with the models and the iteration's metrics
    row, outside the iteration's timing (``spo_fast.compare`` evaluates there)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    done = finished_run(cfg, check_output_dir(cfg.log.output_dir))
    if done is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[spo_fast] {Path(cfg.log.output_dir).resolve()} holds a finished run ({done['iterations']} "
                  f"iterations; weights in {done.get('weights_dir')}): nothing to do. To redo its end phase (weights, "
                  "sample grid, evaluation): checkpoint.redo_end=true; to train again from the start: "
                  "checkpoint.resume=never or another log.output_dir", flush=True)
        return done, None
    out = preflight(cfg, method)
    tracked = trackers(cfg)
    # Several processes and no CUDA: accelerate only picks its gloo CPU backend when told cpu=True
    # (its own --cpu launch flag needs MPI), so say it here; `accelerate launch --multi_gpu` then works.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=tracked or None,
                              project_dir=str(out), cpu=multi_cpu)
    if cfg.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision=fp16 is not supported on CPU; use bf16 or no")
    set_seed(cfg.train.seed)
    main = accelerator.is_main_process
    say = (lambda *a: print("[spo_fast]", *a, flush=True)) if main else (lambda *a: None)
    say(f"output dir: {out.resolve()}")
    if tracked:
        where = f" and {', '.join(tracked)} (log.report_to={cfg.log.report_to})"
    else:
        why = ": tensorboard is not installed" if cfg.log.report_to == "auto" else ""
        where = f"; no tracker (log.report_to={cfg.log.report_to}{why})"
    say(f"metrics: {out / 'metrics.jsonl'}{where}")
    dev = accelerator.device.type
    if cfg.sampling.dtype == "bf16_if_native":
        say(f"sampling in {sampling_dtype(cfg, dev)} (sampling.dtype=bf16_if_native: this {dev} "
            f"{'computes bf16 natively' if native_bf16(dev) else 'has no native bf16 (AVX512-BF16 or AMX)'})")
    elif sampling_dtype(cfg, dev) == "bf16" and not native_bf16(dev):
        say(f"warning: sampling.dtype={cfg.sampling.dtype} samples in bf16, which this {dev} does not compute "
            "natively (no AVX512-BF16 or AMX): emulated, it can be many times slower than fp32 (the toy UNet's "
            "forward: 17x); sampling.dtype=bf16_if_native or fp32 avoid it")
    if main:
        save_config(cfg, out / "config.yaml")

    s = build(cfg, accelerator)
    method.setup(cfg, s, accelerator)
    total = run_length(cfg, method.epoch_iterations(cfg, accelerator.num_processes))

    start_iter, opt_step = 0, 0
    ckpt = resume_path(cfg, out)
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt, s.raw_unet, s.optimizer, s.lr_scheduler, pending=s.pending)
        start_iter, opt_step = state["iteration"], state["opt_step"]
        say(f"resumed from {ckpt} at iteration {start_iter}")
    if tracked:
        accelerator.init_trackers(method.name.lower(), config=_flat(cfg),
                                  init_kwargs={"wandb": {"dir": str(out)}} if "wandb" in tracked else {})

    stop = StopFlag()
    stop.install()
    metrics_file = open(out / "metrics.jsonl", "a") if main else None  # noqa: SIM115 (closed in finally)
    bar = tqdm(total=total, initial=start_iter, disable=not (main and cfg.log.progress), desc=method.name, unit="it")
    profiler = _profiler(cfg, out) if cfg.profile.enabled else contextlib.nullcontext()
    last = {}
    # the validation grids' prompts, chosen once (DPO's choice decodes pairs): the same prompts at every grid
    val_prompts = (method.grid_prompts(cfg.log.sample_prompts)
                   if main and cfg.log.sample_every and cfg.log.sample_prompts else None)
    bad_run, bad_total = 0, 0  # consecutive and total skipped (non-finite) optimizer steps
    try:
        with profiler as prof:
            for it in range(start_iter, total):
                t0 = time.perf_counter()
                work = method.work(it)
                s.raw_unet.train()
                sums = train_iteration(cfg, s, accelerator, method, work)
                opt_step += sums["steps"]
                for skipped in sums["bad"]:
                    bad_run = bad_run + 1 if skipped else 0
                    bad_total += skipped
                last = iteration_metrics(accelerator, it, opt_step, work, sums, s.lr_scheduler.get_last_lr()[0],
                                         time.perf_counter() - t0)
                if (it + 1) % cfg.log.every == 0 or it + 1 == total:
                    if main:
                        metrics_file.write(jsonio.dumps(last) + "\n")
                        metrics_file.flush()
                    if tracked:
                        accelerator.log({k: v for k, v in last.items() if k != "iteration" and v is not None},
                                        step=it + 1)
                if last["bad_steps"]:
                    say(f"iteration {it + 1}: skipped {last['bad_steps']} optimizer step(s) with a non-finite loss or "
                        f"gradient norm (no weight change; {bad_run} in a row, {bad_total} in all; the run stops at "
                        f"train.max_bad_steps={cfg.train.max_bad_steps} in a row)")
                if bad_run >= cfg.train.max_bad_steps:
                    found = list_checkpoints(out)
                    kept = f"the last checkpoint, {found[-1]}, is intact" if found else "no checkpoint was written"
                    raise DivergedError(
                        f"stopped at iteration {it + 1}: {bad_run} optimizer steps in a row had a non-finite loss or "
                        f"gradient norm (train.max_bad_steps={cfg.train.max_bad_steps}); {kept} and no weights were "
                        "written. Lower train.lr (or clip harder: a smaller train.max_grad_norm), check the data and the "
                        "model, then run again (checkpoint.resume=auto resumes from that checkpoint)")
                bar.update(1)
                bar.set_postfix({k: _short(last[k]) for k in ("loss", "implicit_acc", "valid_pairs", "reward",
                                                             "samples_per_s") if k in last})
                if val_prompts and (it + 1) % cfg.log.sample_every == 0 and it + 1 < total:
                    validation_images(cfg, s, accelerator, method, val_prompts, it + 1, out)  # the last: samples.png
                if hook is not None:
                    hook(it, total, s, last)
                if prof is not None:
                    prof.step()
                stopping = _agree(accelerator, stop.set)
                every = cfg.checkpoint.every
                if stopping or it + 1 == total or (every and (it + 1) % every == 0):
                    path = save_checkpoint(accelerator, out, it + 1, opt_step, s.raw_unet, s.optimizer,
                                           s.lr_scheduler, cfg.checkpoint.keep, config=to_dict(cfg),
                                           pending=s.pending)
                if stopping:
                    say(f"stopped at iteration {it + 1} (checkpoint {path}); run the same command again to resume")
                    return {"stopped": True, **last}, s
    finally:
        stop.restore()
        bar.close()
        if metrics_file:
            metrics_file.close()

    summary = {"stopped": False, "iterations": total, **last}
    if main:
        summary.update(finish(cfg, s, accelerator, method, out, say))
        (out / "summary.json").write_text(jsonio.dumps(summary, indent=1))
        write_model_card(cfg, out, Path(summary["weights_dir"]), summary)
        say(f"done: {total} iterations; weights in {summary['weights_dir']}; outputs in {out.resolve()}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary, s


def finish(cfg: Config, s: Setup, accelerator, method: Method, out: Path, say) -> dict:
    """The end of a run (main process): weights, sample grid, evaluation; each phase announced with its time."""
    result = {}
    t0 = time.perf_counter()
    result["weights_dir"] = str(save_weights(s, out))
    say(f"wrote the weights to {result['weights_dir']} ({time.perf_counter() - t0:.1f} s)")
    if cfg.log.sample_prompts:
        t0 = time.perf_counter()
        prompts = method.grid_prompts(cfg.log.sample_prompts)
        say(f"sampling the before/after grid: {len(prompts)} prompts x base, trained")
        result["samples"] = sample_grid(cfg, s, accelerator, prompts, method.scorer, out)
        say(f"wrote {out / 'samples.png'} and samples.json ({time.perf_counter() - t0:.1f} s)")
    if cfg.eval.enabled:
        from spo_fast.evaluation.heldout import summary_line

        t0 = time.perf_counter()
        say(f"evaluating base vs trained on {cfg.eval.n_prompts} x {cfg.eval.seeds} held-out prompt/seed pairs")
        ev = run_eval(cfg, s, accelerator, method.scorer, out)
        result["eval"] = {k: v for k, v in ev.items() if k != "prompts"}
        say(f"eval ({time.perf_counter() - t0:.1f} s): " + summary_line(ev))
        say(f"wrote {out / 'eval.json'} and {out / 'eval_grid.png'}")
    return result


def _short(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _agree(accelerator, flag: bool) -> bool:
    """All processes stop together when any of them was signalled."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


TRACKER_INSTALL = {"tensorboard": "pip install 'spo_fast[tensorboard]'", "wandb": "pip install 'spo_fast[wandb]'"}


def trackers(cfg: Config) -> list[str]:
    """``log.report_to`` as the tracker names accelerate logs to (``auto``: tensorboard when installed, else none;
    ``all``: every installed one). A tracker asked for by name but not installed raises ConfigError naming what to
    install; checked in ``preflight``, before any model is built."""
    from accelerate.tracking import get_available_trackers

    available = [str(getattr(t, "value", t)) for t in get_available_trackers()]
    names = report_to_names(cfg)
    if names == ["none"]:
        return []
    if names == ["auto"]:
        return ["tensorboard"] if "tensorboard" in available else []
    if names == ["all"]:
        return available
    for name in names:
        if name not in available:
            raise ConfigError(f"log.report_to={cfg.log.report_to!r}: {name} is not installed; "
                              f"{TRACKER_INSTALL.get(name, 'pip install ' + name)}, or use log.report_to=none")
    return names


def _flat(cfg: Config) -> dict:
    """The config as flat ``section.key`` scalars (TensorBoard's hparams)."""
    from spo_fast.core.config import flatten, to_dict

    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(to_dict(cfg)).items()}


def _profiler(cfg: Config, out: Path):
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    p = cfg.profile
    return profile(activities=acts, schedule=schedule(wait=p.wait, warmup=p.warmup, active=p.active, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(str(out / "profile")), record_shapes=True)
