"""Typed configuration: nested dataclasses, strict YAML loading, dotted ``key=value`` overrides.

A run is described by one recipe (``configs/*.yaml``) plus overrides on the command line::

    python -m spo_fast.train configs/sd15_spo.yaml model.path=/ckpt/sd15 train.lr=3e-5

Every key must exist in the dataclasses below (an unknown key is an error that names it and
lists the accepted keys); values are converted to the field's type or rejected with a message
naming the key, the value and the accepted values. ``validate`` checks cross-field rules
before any model is built. ``save_config`` writes the resolved config next to the run.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from spo_fast.core.errors import InputError


class ConfigError(InputError):
    """A bad recipe, override or value; the message names it and says what is accepted."""


@dataclass
class ModelConfig:
    family: str = "sd15"
    """Pipeline family: ``sd15`` (one CLIP text encoder) or ``sdxl`` (two, pooled + time ids)."""
    path: str = "arch:tiny_sd15"
    """A local diffusers directory, or ``arch:<name>`` for a packaged architecture (configs/arch)."""
    init: str = "pretrained"
    """``pretrained`` loads weights from ``path``; ``random`` builds from its configs (benchmarks)."""
    seed: int = 0
    """Seed of the random initialisation when ``init=random``."""
    resolution: int = 0
    """Image resolution in pixels; 0 = the UNet's sample_size times the VAE factor."""
    vae_dtype: str = "auto"
    """The VAE's weights (rollout decode, sample grid, evaluation, Diffusion-DPO's encode): ``auto`` = the
    mixed-precision dtype (fp32 when the VAE's config says ``force_upcast``, as SDXL's does), run under the
    trainer's autocast, the behaviour before this key existed | ``fp32`` | ``bf16``: that dtype, with autocast off
    inside the VAE (so a bf16 VAE under an fp16 run is not cast back to fp16 call by call). ``bf16`` is the speed
    option for SDXL, whose VAE otherwise decodes in fp32 at 1024 px (bf16 has fp32's range, so the fp16 overflow
    that ``force_upcast`` guards against does not arise)."""
    vae_decode_batch: int = 0
    """Images the VAE decodes per call (the rollout's pools, grids, evaluation); 0 = the whole batch at once (the
    behaviour before this key existed). The decoder's activations at full resolution are most of the rollout's
    peak memory (``python -m spo_fast.estimate`` measures it: 26 GiB of SD1.5's 33 GiB at 40 images); a few
    images per call cut it to a fraction for a few extra kernel launches. The same images either way."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """LoRA on the UNet; false = full fine-tuning (a frozen copy then serves as reference)."""
    rank: int = 4
    alpha: float = 0.0
    """LoRA alpha; 0 = equal to rank (the official setting)."""
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class SamplingConfig:
    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    graphs: str = "off"
    """How the SPO rollout's fixed-shape calls (UNet on the pool, VAE decode, preference model, step ops) run:
    ``off`` (eager) | ``cuda_graphs`` (each call shape captured once as a CUDA graph, replayed with static
    buffers; CUDA only) | ``compile`` (``torch.compile(mode="reduce-overhead")``). ``off`` by default: the
    graph modes are tested for equality with eager on GPU by benchmarks/gpu_suite.sh but their speed has not been
    measured on a GPU yet (see docs/speed.md)."""
    merge_lora: bool = False
    """SPO: run the rollout on a plain copy of the UNet with the LoRA merged into its weights, refreshed before every
    rollout (``spo_fast.diffusion.merged``): no peft dispatch or rank-r matmuls in the rollout, at the price of a second UNet
    in memory (on in the toy recipes; off by default, where a second SD UNet costs GBs). Both methods: the sample
    grid and the end-of-run evaluation then sample plain copies too (the base's, then the merged policy's, one at a
    time). Under a bf16/fp16 sampling autocast the copies hold their Linear/Conv2d weights in that dtype
    (bit-identical under autocast, without its per-call weight casts). Needs ``lora.enabled``."""
    chunked_attention: bool = True
    """With ``merge_lora``: the attention of the copies that sample (the SPO rollout's, the sample grid's, the
    end-of-run evaluation's) is ``spo_fast.diffusion.cpu_attention.ChunkedAttnProcessor`` (on a CPU in bf16 without
    gradients: batched matmuls and softmax in cache-sized chunks: the toy UNet's forward 1.1-1.2x faster than with
    SDPA's CPU flash kernel; SDPA for other calls). Installed only on a CPU: on a GPU the copies keep
    ``train.attention``, as with False (tests/test_merged.py; not run on a GPU). It moved the default run's
    evaluations by at most 0.009 of margin; in the rollout its other rounding sends training on another course than
    SDPA's, with no systematic effect on the result over nine paired seeds, in a 1.10x faster default run
    (docs/speed.md). False: the copies keep ``train.attention``."""
    dtype: str = "auto"
    """Autocast dtype of the no-grad sampling (the SPO rollout, the sample grid, the end-of-run evaluation):
    ``auto`` = the run's ``train.mixed_precision`` | ``bf16`` | ``fp32`` (autocast off) | ``bf16_if_native``: bf16
    where the device computes it natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX), else fp32
    (``native_bf16``). Training is unaffected. The toy recipes set ``bf16_if_native``: on CPUs with AVX512-BF16 the
    toy UNet's sampling forward is ~1.6x faster in bf16 (its backward is slower, so training stays fp32), while on a
    CPU without them bf16 is emulated and the same forward took 17x longer than in fp32 (docs/speed.md)."""


@dataclass
class SPOConfig:
    k: int = 4
    """Candidates per pool (>= 2)."""
    divert_start_step: int = 4
    """Steps before this index are plain single-sample DDIM steps."""
    num_inner_steps: int = 0
    """SDXL variant: after branching, each candidate denoises this many more steps before scoring."""
    threshold: float = 0.3
    """A pair counts when softmax([s_win, s_lose]) gives p_win - p_lose > threshold; in [0, 1)."""
    beta: float = 10.0
    ratio_clip: float = 0.1
    """eps of the clamp of pi_theta / pi_ref to [1 - eps, 1 + eps]."""
    micro_batches: str = "split"
    """How the valid transitions of a rollout form micro-batches of ``train.train_batch_size``: ``split`` (ours)
    keeps the transitions whose win and lose share x_t (branching steps) and those that do not (SDXL inner steps)
    in micro-batches of their own, so a shared micro-batch runs one forward of the batch; ``mixed`` (the official
    code) shuffles all of them together: ceil(valid / train_batch_size) micro-batches, and one that holds a
    not-shared transition runs both sides (a forward of twice the batch). The same without inner steps (SD1.5)."""
    process_split: str = "own"
    """With several processes: ``own`` (ours): each process trains on its own rollout's valid transitions (the
    others pad to the busiest process's number of micro-batches; none is dropped); ``gather`` (the official code):
    every process's rollout is all-gathered, all valid transitions shuffled alike on every process, and each takes
    an equal share of total // processes (the remainder dropped; a rollout with fewer valid transitions than
    processes trains nothing). The same with one process."""


@dataclass
class DPOConfig:
    beta: float = 5000.0
    """Diffusion-DPO's beta in the official convention: the per-sample noise-prediction MSE is a mean over C*H*W
    and L = -log sigmoid(-beta/2 * ((mse_w - ref_w) - (mse_l - ref_l))); 5000 for SD1.5 and SDXL."""
    empty_prompt_prob: float = 0.2
    """Probability that a pair's caption is replaced by the empty prompt (the official script's default 0.2)."""


@dataclass
class ScorerConfig:
    name: str = "color"
    """``spm``: a step-aware preference model (spo_fast/reward/spm.py) loaded from ``path``; ``color``: the
    built-in prompt-colour scorer (spo_fast/reward/scorers.py), weightless and step-agnostic; ``ground_truth``: the
    toy world's ground truth of each candidate's x0 estimate, for diagnosis (toy-world prompts only;
    ``GroundTruthScorer``); ``none``: no scorer (Diffusion-DPO: only the sample grid and ``eval.reward=scorer``
    use one)."""
    path: str = ""
    """``spm``: a local SPM directory (CLIP/PickScore layout plus spm.safetensors) or ``toyworld:spm``."""
    scale: float = 10.0
    """Logit scale of the colour scorer (scores = -scale * RGB distance) and of ``ground_truth`` (scores = scale / 10
    * the ground truth in [0, 10]: the default 10 scores in its points)."""
    init: str = "pretrained"
    """``spm``: ``pretrained`` loads the weights at ``path``; ``random`` builds the SPM from ``path``'s config.json
    with random weights (seeded, on the run's device; benchmarks: ``path=arch:spm_vit_h14`` is PickScore's size,
    ``arch:tiny_spm`` a tiny one). A fresh SPM's time conditioning is the identity either way."""
    dtype: str = "autocast"
    """``spm``: how the preference model runs in the rollout: ``autocast`` = fp32 weights under the trainer's
    autocast (fp16/bf16 matmuls on a GPU with mixed precision; fp32 without), the behaviour before this key
    existed | ``fp32``: fp32 with autocast off inside the SPM, as the official code runs it | ``bf16``: bf16
    weights, autocast off inside the SPM (no per-call weight casts)."""


@dataclass
class DataConfig:
    prompts: str = "builtin:toy"
    """SPO: a text file with one prompt per line, ``toyworld:train`` / ``toyworld:heldout`` (the toy world's
    prompt splits) or ``builtin:toy`` (96 colour/object prompts)."""
    pairs: str = ""
    """Diffusion-DPO: preference pairs in the Pick-a-Pic schema (caption, jpg_0, jpg_1, label_0, label_1): a
    parquet file, a directory of parquet shards or a glob; ``toyworld:train`` is the toy world's shipped pairs."""
    ties: str = "drop"
    """Pairs labelled 0.5/0.5: ``drop`` (Diffusion-DPO, the official setting; ``keep`` is an error there, a tie has
    no preferred image) or ``keep`` (0.5/0.5 targets: the SPM trainer's reading of the same data)."""
    bad_rows: str = "error"
    """Diffusion-DPO: a row with an undecodable image or a label that is not a preference is an ``error``
    naming its file and row, or is skipped and counted (``skip``)."""
    cache_dir: str = ""
    """Diffusion-DPO: a directory for the cache of VAE latents and text embeddings (built before the first step;
    later epochs decode no image and run no encoder); empty = no cache."""
    check_images: bool = True
    """Diffusion-DPO without a cache: decode every image once before training so a bad one fails early."""


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 10
    """Prompts per process per rollout."""
    train_batch_size: int = 10
    """Transitions per micro-batch; must divide batch_size (fixed shapes)."""
    grad_accum: int = 1
    epochs: float = 10.0
    """Passes over the prompt set; the run length is derived from it unless max_iterations > 0."""
    max_iterations: int = 0
    """Cap on rollout iterations (0 = no cap)."""
    lr: float = 6e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables it (the official SPO code's clipping is a no-op: its recipes
    ``sd15_spo``/``sdxl_spo`` set 0)."""
    loss_weighting: str = "pairs"
    """How an optimizer step weights its micro-batches: ``pairs`` (ours): the step minimises the mean over its
    valid pairs, so a micro-batch of 3 pairs weighs 3/10 of one of 10; ``micro_batches`` (the official code,
    accelerate's convention): each micro-batch's mean loss divided by ``grad_accum``, whatever its number of pairs.
    The same when every micro-batch is full or ``grad_accum`` = 1 with one process."""
    accumulate_across_iterations: bool = False
    """With ``grad_accum`` > 1: ``false`` (ours): an optimizer step never spans two iterations (the last step of an
    iteration may have fewer micro-batches); ``true`` (the official code's accelerate counter): the micro-batches
    are counted across iterations, so a step may take micro-batches of two rollouts and a gradient can be pending at
    the end of an iteration (a checkpoint keeps it; the run's end drops it, as the official code does). E.g. 2
    rollouts of 3 micro-batches, ``grad_accum`` 2: 4 steps with ``false``, 3 with ``true``."""
    max_bad_steps: int = 3
    """An optimizer step whose loss or gradient norm is not finite is skipped (no weight or optimizer-state change),
    counted (``bad_steps`` in metrics.jsonl) and reported; this many in a row stop the run with an error, keeping
    the last checkpoint (no checkpoint or weights are written from that point)."""
    mixed_precision: str = "no"
    """``no`` | ``fp16`` | ``bf16`` (accelerate)."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward (diffusers' per-block checkpointing): less memory, one
    more forward of the policy per micro-batch."""
    allow_tf32: bool = True
    """TF32 for fp32 matmuls and convolutions on CUDA (``torch.backends.cuda.matmul.allow_tf32`` and
    ``torch.backends.cudnn.allow_tf32``, set both ways by ``trainer.build``); no effect on CPU."""
    attention: str = "sdpa"
    """The UNet's attention: ``sdpa`` (PyTorch's scaled_dot_product_attention, which on CUDA itself picks a flash
    or memory-efficient kernel for fp16/bf16) | ``xformers`` (diffusers' xformers processor) | ``flash_attn``
    (flash-attn's ``flash_attn_func``, fp16/bf16). The last two need CUDA and their package; asking for one
    without them is an error before any model is built. The VAE keeps SDPA (its one attention has head dim 512,
    beyond flash-attn's 256), and so does the preference model (transformers' SDPA)."""
    channels_last: bool = False
    """Channels-last (NHWC) memory format for the UNet's and the VAE's weights, so cuDNN's convolutions read
    NHWC without transposes (tensor cores prefer it); works on CPU too."""
    fused_adamw: bool = False
    """``torch.optim.AdamW(fused=True)``: one fused kernel for the whole parameter update instead of torch's
    per-tensor ``foreach`` ops. Only with ``optimizer=adamw`` (adafactor and adamw8bit have their own)."""
    optimizer: str = "adamw"
    """``adamw`` (torch) | ``adafactor`` (transformers; the official Diffusion-DPO SDXL setting) | ``adamw8bit``
    (bitsandbytes, when installed)."""
    kernels: str = "auto"
    """Op backend: ``torch`` | ``triton`` win over the env var SPO_FAST_KERNELS; ``auto`` defers to it
    (unset: Triton on CUDA, Triton's interpreter on CPU when TRITON_INTERPRET=1, else PyTorch)."""


@dataclass
class CheckpointConfig:
    every: int = 50
    """Write a checkpoint every N rollout iterations (and at the end); 0 = only at the end."""
    keep: int = 2
    """How many checkpoints to keep."""
    resume: str = "auto"
    """``auto``: resume from the newest checkpoint in output_dir if any; ``never``; or a path."""
    redo_end: bool = False
    """A finished run (its summary.json written, its last checkpoint the final one, its length unchanged) started
    again says so and exits; ``true`` redoes its end phase instead (weights, sample grid, evaluation)."""


@dataclass
class LogConfig:
    output_dir: str = "outputs/run"
    every: int = 1
    report_to: str = "auto"
    """Trackers to log metrics (and validation images) to, through accelerate, besides metrics.jsonl: ``auto``
    (tensorboard when it is installed), ``none``, ``all`` (every installed one), or a comma-separated list of
    ``tensorboard``, ``wandb``, ``comet_ml``, ``mlflow``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``,
    ``trackio`` (each must be installed)."""
    sample_prompts: int = 8
    """Prompts in the before/after sample grid written at the end (samples.png/json; 0 = none)."""
    sample_every: int = 0
    """Validation images: the sample grid every N iterations too (fixed prompts and noise: comparable across the
    run), as samples/iter_N.png/json and to the trackers (log.report_to); 0 = only at the end."""
    progress: bool = True


@dataclass
class EvalConfig:
    enabled: bool = False
    """After training: base vs trained on the same noise over held-out prompts -> eval.json + eval_grid.png."""
    prompts: str = "toyworld:test"
    """Evaluation prompts (same forms as data.prompts); the first n_prompts are used."""
    n_prompts: int = 64
    seeds: int = 4
    """Noise seeds per prompt; the seed-to-seed spread of the base reward is reported."""
    reward: str = "ground_truth"
    """``ground_truth``: the toy world's score (toy prompts only); ``scorer``: the training scorer at t = 0."""
    batch_size: int = 128
    grid_prompts: int = 8
    """Prompts (columns) in eval_grid.png, noise seed 0; at most n_prompts are shown."""
    base_cache: bool = True
    """Reuse the base model's half of the evaluation (its rewards and grid images) from an earlier run that
    evaluated the same base with the same protocol on the same kind of machine, exactly
    (``spo_fast.evaluation.base_cache``: entries in $SPO_FAST_CACHE/base_eval, default ~/.cache/spo_fast); a run
    without one stores it. The ground-truth reward only. False: sample the base every time, store nothing."""


@dataclass
class ProfileConfig:
    enabled: bool = False
    """Write torch.profiler traces of a few iterations to output_dir/profile."""
    wait: int = 1
    warmup: int = 1
    active: int = 2


@dataclass
class Config:
    method: str = "spo"
    """``spo`` (Step-aware Preference Optimization: online rollouts scored by ``scorer``, prompts from
    ``data.prompts``) or ``dpo`` (Diffusion-DPO: offline pairs from ``data.pairs``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    spo: SPOConfig = field(default_factory=SPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


DEFAULT_RECIPE = "toy_spo"
CHOICES = {
    "method": ("spo", "dpo"),
    "model.family": ("sd15", "sdxl"),
    "model.init": ("pretrained", "random"),
    "scorer.name": ("spm", "color", "ground_truth", "none"),
    "data.ties": ("drop", "keep"),
    "data.bad_rows": ("error", "skip"),
    "train.optimizer": ("adamw", "adafactor", "adamw8bit"),
    "eval.reward": ("ground_truth", "scorer"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.kernels": ("auto", "torch", "triton"),
    "sampling.graphs": ("off", "cuda_graphs", "compile"),
    "sampling.dtype": ("auto", "bf16", "fp32", "bf16_if_native"),
    "train.attention": ("sdpa", "xformers", "flash_attn"),
    "model.vae_dtype": ("auto", "fp32", "bf16"),
    "scorer.init": ("pretrained", "random"),
    "scorer.dtype": ("autocast", "fp32", "bf16"),
    "train.loss_weighting": ("pairs", "micro_batches"),
    "spo.micro_batches": ("split", "mixed"),
    "spo.process_split": ("own", "gather"),
}


# Keys that belong to one method only: giving one to the other method is an error (validate), and the resolved
# config written next to a run leaves the other method's keys out (save_config), so it loads back.
METHOD_KEYS = {
    "spo": ("spo", "data.prompts"),
    "dpo": ("dpo", "data.pairs", "data.ties", "data.bad_rows", "data.cache_dir", "data.check_images"),
}


def _owner(key: str) -> str | None:
    """The method a dotted key belongs to, or None for a shared key."""
    for method, keys in METHOD_KEYS.items():
        if any(key == k or key.startswith(k + ".") for k in keys):
            return method
    return None


# ----------------------------------------------------------------------------- loading
def configs_dir() -> Path:
    """The packaged recipes directory, ``spo_fast/configs/`` (package data, not an import package; the repository's
    root ``configs`` links to it)."""
    return Path(str(resources.files("spo_fast") / "configs"))


def available_recipes() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A YAML path, or a recipe name from configs/ (``sd15_spo``)."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file {str(path)!r} does not exist; packaged recipes: "
                              f"{', '.join(available_recipes())}")
        return path
    packaged = configs_dir() / f"{name_or_path}.yaml"
    if not packaged.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}; give a .yaml path or one of: "
                          f"{', '.join(available_recipes())}")
    return packaged


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or an override string) to field type ``tp`` or raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else \
                [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value}: must be a finite number (not inf or nan); e.g. {key}=1e-4")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _fields(obj: Any) -> dict[str, Any]:
    """Field name -> resolved type annotation."""
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def report_to_names(cfg: Config) -> list[str]:
    """``log.report_to`` split at commas: ``["auto"]``, ``["none"]``, ``["all"]`` or tracker names."""
    return [n.strip() for n in cfg.log.report_to.split(",")]


RENAMED = {"log.tensorboard": "log.report_to (auto, none, all, or tensorboard, wandb, ...)"}
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio")


def _unknown(key: str, accepted: list[str]) -> ConfigError:
    if key in RENAMED:
        return ConfigError(f"config key {key!r} was replaced by {RENAMED[key]}")
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], accepted, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; accepted keys here: {', '.join(accepted)}")


def _apply_mapping(obj: Any, data: dict, prefix: str = "", given: set | None = None) -> None:
    """Set the fields of ``data`` (a YAML mapping) on ``obj``; the dotted keys set are added to ``given``."""
    fields = _fields(obj)
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown(key, list(fields))
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            _apply_mapping(current, value, f"{key}.", given)
        else:
            setattr(obj, name, _coerce(key, value, fields[name]))
            if given is not None:
                given.add(key)


# top-level shorthands on the command line: output_dir=... is log.output_dir=...
ALIASES = {"output_dir": "log.output_dir"}


def apply_override(cfg: Config, item: str) -> str:
    """Apply one ``dotted.key=value`` override to ``cfg`` in place; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-5)")
    key, raw = item.split("=", 1)
    key = ALIASES.get(key.strip(), key.strip())
    obj: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            raise _unknown(".".join(parts[: i + 1]), list(fields))
        if i < len(parts) - 1:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section")
    last = parts[-1]
    if dataclasses.is_dataclass(getattr(obj, last)):
        first = next(iter(_fields(getattr(obj, last))))
        raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.{first}=...")
    value: Any = raw
    if raw.strip().startswith("["):
        value = yaml.safe_load(raw)
    setattr(obj, last, _coerce(key, value, _fields(obj)[last]))
    return key


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- recipe YAML <- overrides, then ``validate``. Raises ConfigError."""
    cfg = Config()
    path = resolve_recipe(recipe or DEFAULT_RECIPE)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
    given: set[str] = set()
    _apply_mapping(cfg, data, given=given)
    for item in overrides or []:
        given.add(apply_override(cfg, item))
    validate(cfg, given)
    return cfg


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` (``cuda`` or ``cpu``) computes bf16 natively: a CUDA GPU that supports bf16, a CPU
    with AVX512-BF16 or AMX tiles (torch.cpu's feature probes). On other CPUs bf16 matmuls and convolutions are
    emulated: the toy UNet's sampling forward (batch 64) took 5.8 s in bf16 against 0.34 s in fp32 on an AVX2-only
    AMD EPYC (benchmarks/results/cpu-2core-epyc-avx2-toy-default-fp32.json)."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None)
    return False


def bf16_if_native(device_type: str) -> str:
    """``bf16`` where ``device_type`` computes it natively (``native_bf16``), else ``fp32``."""
    return "bf16" if native_bf16(device_type) else "fp32"


def sampling_dtype(cfg: Config, device_type: str) -> str:
    """``sampling.dtype`` resolved on ``device_type``: ``bf16``, ``fp32``, or ``fp16`` (``auto`` follows
    ``train.mixed_precision``; ``bf16_if_native`` follows ``native_bf16``)."""
    dtype = cfg.sampling.dtype
    if dtype == "auto":
        return {"bf16": "bf16", "fp16": "fp16"}.get(cfg.train.mixed_precision, "fp32")
    if dtype == "bf16_if_native":
        return bf16_if_native(device_type)
    return dtype


# ----------------------------------------------------------------------------- validation
def validate(cfg: Config, given: set[str] | None = None) -> None:
    """Cross-field and range checks; cheap, runs before any model is built. ``given``: the dotted keys the recipe
    and the overrides set (a key of the other method among them is an error)."""
    for key, choices in CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not accepted; choose one of {', '.join(choices)}")
    foreign = sorted(k for k in given or () if _owner(k) not in (None, cfg.method))
    if foreign:
        other = _owner(foreign[0])
        raise ConfigError(f"{', '.join(foreign)}: {'these are' if len(foreign) > 1 else 'this is a'} method={other} "
                          f"key{'s' if len(foreign) > 1 else ''}, but the recipe says method={cfg.method}; remove "
                          f"{'them' if len(foreign) > 1 else 'it'}, or set method={other}")

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    s, t, sp = cfg.spo, cfg.train, cfg.sampling
    need(sp.num_steps >= 1, f"sampling.num_steps={sp.num_steps}: must be >= 1")
    need(sp.eta >= 0, f"sampling.eta={sp.eta}: must be >= 0")
    if cfg.method == "spo":
        need(s.k >= 2, f"spo.k={s.k}: a pool needs at least 2 candidates (official: 4 for SD1.5, 2 for SDXL)")
        need(0.0 <= s.threshold < 1.0,
             f"spo.threshold={s.threshold}: must be in [0, 1) (official: 0.3 SD1.5, 0.4 SDXL)")
        need(s.beta > 0, f"spo.beta={s.beta}: must be > 0 (official: 10)")
        need(0.0 < s.ratio_clip < 1.0, f"spo.ratio_clip={s.ratio_clip}: must be in (0, 1) (official: 0.1)")
        need(s.num_inner_steps >= 0, f"spo.num_inner_steps={s.num_inner_steps}: must be >= 0")
        need(0 <= s.divert_start_step < sp.num_steps,
             f"spo.divert_start_step={s.divert_start_step}: must be in [0, sampling.num_steps={sp.num_steps})")
        need(sp.eta > 0, f"sampling.eta={sp.eta}: SPO needs a stochastic sampler (eta > 0; official 1.0)")
        need(not sp.merge_lora or cfg.lora.enabled,
             "sampling.merge_lora=true needs lora.enabled=true (it merges the LoRA into a copy of the UNet); set "
             "sampling.merge_lora=false for full fine-tuning")
    need(sp.guidance_scale >= 1.0, f"sampling.guidance_scale={sp.guidance_scale}: must be >= 1")
    need(cfg.model.vae_decode_batch >= 0,
         f"model.vae_decode_batch={cfg.model.vae_decode_batch}: must be >= 0 (0 = decode the whole batch at once)")
    need(t.seed >= 0, f"train.seed={t.seed}: must be >= 0")
    need(t.batch_size >= 1, f"train.batch_size={t.batch_size}: must be >= 1")
    need(t.train_batch_size >= 1, f"train.train_batch_size={t.train_batch_size}: must be >= 1")
    need(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum}: must be >= 1")
    if cfg.method == "dpo":
        need(t.batch_size % t.train_batch_size == 0,
             f"train.train_batch_size={t.train_batch_size} must divide train.batch_size={t.batch_size} (the pairs "
             "of one iteration are split into micro-batches of one fixed shape)")
        micro = t.batch_size // t.train_batch_size
        need(micro % t.grad_accum == 0,
             f"train.grad_accum={t.grad_accum} must divide the {micro} micro-batches of one iteration "
             f"(train.batch_size={t.batch_size} / train.train_batch_size={t.train_batch_size}) so that optimizer "
             "steps end on iteration boundaries (checkpoints lose nothing)")
        need(cfg.data.ties == "drop", "data.ties=keep: Diffusion-DPO trains on a preferred and a rejected image and a "
                                      "tie has neither; use data.ties=drop (keep is for the SPM trainer, "
                                      "python -m spo_fast.train_spm, which learns ties as 0.5/0.5)")
        need(bool(cfg.data.pairs), "method=dpo needs data.pairs: a parquet file, a directory of parquet shards or a "
                                   "glob in the Pick-a-Pic schema (toyworld:train for the toy world's pairs)")
        need(cfg.dpo.beta > 0, f"dpo.beta={cfg.dpo.beta}: must be > 0 (official: 5000)")
        need(0.0 <= cfg.dpo.empty_prompt_prob < 1.0,
             f"dpo.empty_prompt_prob={cfg.dpo.empty_prompt_prob}: must be in [0, 1) (official: 0.2)")
    need(t.lr > 0, f"train.lr={t.lr}: must be > 0")
    need(t.epochs > 0 or t.max_iterations > 0, "set train.epochs > 0 or train.max_iterations > 0")
    need(t.max_iterations >= 0, f"train.max_iterations={t.max_iterations}: must be >= 0")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps={t.max_bad_steps}: must be >= 1 (consecutive non-finite "
         "optimizer steps that stop the run)")
    need(t.max_grad_norm >= 0, f"train.max_grad_norm={t.max_grad_norm}: must be >= 0 (0 disables clipping)")
    need(cfg.scorer.scale > 0, f"scorer.scale={cfg.scorer.scale}: must be > 0")
    need(cfg.scorer.name != "spm" or bool(cfg.scorer.path),
         "scorer.name=spm needs scorer.path: a local step-aware preference model directory, or toyworld:spm for the "
         "toy world")
    need(cfg.method != "spo" or cfg.scorer.name != "none",
         "scorer.name=none: SPO ranks its candidates with a scorer; use scorer.name=spm with scorer.path=DIR")
    need(cfg.eval.reward != "scorer" or cfg.scorer.name != "none",
         "eval.reward=scorer needs a scorer (scorer.name=spm, scorer.path=DIR), or use eval.reward=ground_truth")
    need(cfg.eval.n_prompts >= 1 and cfg.eval.seeds >= 1 and cfg.eval.batch_size >= 1,
         f"eval.n_prompts={cfg.eval.n_prompts}, eval.seeds={cfg.eval.seeds}, eval.batch_size="
         f"{cfg.eval.batch_size}: each must be >= 1")
    need(cfg.eval.grid_prompts >= 1, f"eval.grid_prompts={cfg.eval.grid_prompts}: must be >= 1 (the columns of "
         "eval_grid.png; at most eval.n_prompts are shown)")
    need(cfg.log.sample_prompts >= 0, f"log.sample_prompts={cfg.log.sample_prompts}: must be >= 0 (0 = no samples.png)")
    need(cfg.lora.rank >= 1, f"lora.rank={cfg.lora.rank}: must be >= 1")
    need(len(cfg.lora.targets) > 0, "lora.targets is empty; the official targets are to_q,to_k,to_v,to_out.0")
    need(cfg.model.resolution >= 0, f"model.resolution={cfg.model.resolution}: must be >= 0 (0 = model default)")
    need(cfg.checkpoint.every >= 0, f"checkpoint.every={cfg.checkpoint.every}: must be >= 0")
    need(cfg.checkpoint.keep >= 1, f"checkpoint.keep={cfg.checkpoint.keep}: must be >= 1")
    need(cfg.log.every >= 1, f"log.every={cfg.log.every}: must be >= 1")
    need(cfg.log.sample_every >= 0, f"log.sample_every={cfg.log.sample_every}: must be >= 0 (0 = only at the end)")
    names = report_to_names(cfg)
    need(names in (["auto"], ["none"], ["all"]) or all(n in TRACKERS for n in names),
         f"log.report_to={cfg.log.report_to!r} is not accepted; use auto, none, all, or a comma-separated list of "
         f"{', '.join(TRACKERS)}")
    need(cfg.profile.active >= 1 and cfg.profile.wait >= 0 and cfg.profile.warmup >= 0,
         "profile.wait/warmup must be >= 0 and profile.active >= 1")
    if cfg.model.path.startswith("arch:") and cfg.model.init == "pretrained":
        raise ConfigError(f"model.path={cfg.model.path} holds architecture files only, no weights; "
                          "add model.init=random, or point model.path at a local diffusers directory")
    if cfg.scorer.name == "spm" and cfg.scorer.path.startswith("arch:") and cfg.scorer.init == "pretrained":
        raise ConfigError(f"scorer.path={cfg.scorer.path} holds architecture files only, no weights; add "
                          "scorer.init=random, or point scorer.path at a local step-aware preference model directory")
    need(cfg.scorer.init == "pretrained" or cfg.scorer.name == "spm",
         f"scorer.init={cfg.scorer.init}: random weights are for scorer.name=spm only (the colour scorer has none)")
    need(not t.fused_adamw or t.optimizer == "adamw",
         f"train.fused_adamw=true applies to train.optimizer=adamw, not {t.optimizer!r} (adafactor and adamw8bit "
         "bring their own update kernels); set train.fused_adamw=false or train.optimizer=adamw")


# ----------------------------------------------------------------------------- output
def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a.b": leaf} (an empty dict is a leaf)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def get_key(cfg: Config, key: str) -> Any:
    """The value of a dotted key (``train.lr``, ``method``)."""
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(cfg: Config) -> dict:
    """The config as nested dicts, without the keys of the method it does not run (``METHOD_KEYS``)."""
    d = dataclasses.asdict(cfg)
    for method, keys in METHOD_KEYS.items():
        if method == cfg.method:
            continue
        for key in keys:
            *parents, last = key.split(".")
            node = d
            for p in parents:
                node = node[p]
            node.pop(last, None)
    return d


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with ``load_config(path)``)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- smoke runs
def smoke_overrides(cfg: Config, cuda: bool) -> list[str]:
    """Overrides that turn ``cfg`` (a recipe with the user's overrides) into a smoke run: the whole pipeline --
    preflight, build, rollout or pairs (SPO; DPO with its latent cache), training, checkpoint, export, sample grid,
    evaluation -- in seconds, written to ``<output_dir>_smoke`` from scratch. Real-model recipes run on the tiny
    random architecture of their family (``arch:tiny_sd15``/``arch:tiny_sdxl``) with a tiny random step-aware
    preference model, toy prompts (SPO) or the toy world's pairs (DPO); toy-world recipes keep their models.
    Without CUDA, fp16 becomes no mixed precision. Applied before the user's own overrides, which win."""
    toy = cfg.model.path.startswith("toyworld:")
    spo = cfg.method == "spo"
    smoke_dir = cfg.log.output_dir.rstrip("/") + "_smoke"
    out = [f"log.output_dir={smoke_dir}", "checkpoint.resume=never", "checkpoint.every=1",
           "train.epochs=0", "train.max_iterations=2", "train.batch_size=2", "train.train_batch_size=2",
           "train.grad_accum=1", "sampling.num_steps=4", "log.sample_prompts=2", "log.sample_every=1",
           "eval.enabled=true", "eval.n_prompts=4", "eval.seeds=2", "eval.grid_prompts=4", "eval.batch_size=8"]
    if spo:  # every pool a valid pair: the smoke run always takes optimizer steps
        out += ["spo.divert_start_step=2", "spo.threshold=0.0"]
    if not cuda and cfg.train.mixed_precision == "fp16":
        out.append("train.mixed_precision=no")
    if cfg.model.path.startswith("arch:tiny") or toy:
        return out
    out += [f"model.path=arch:tiny_{cfg.model.family}", "model.init=random", "model.resolution=0",
            "scorer.name=spm", "scorer.path=arch:tiny_spm", "scorer.init=random", "eval.reward=scorer"]
    if spo:
        out.append("data.prompts=builtin:toy")
    else:
        out += ["data.pairs=toyworld:train", f"data.cache_dir={smoke_dir}/latent_cache"]
    return out
