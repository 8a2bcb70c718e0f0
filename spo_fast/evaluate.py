"""Base vs trained on the same noise, from the command line: ``python -m spo_fast.evaluate --lora DIR [...]``.

The library half (sampling both models, the statistics, eval.json and the grid) is ``spo_fast.evaluation.heldout``; this
module loads the models and the reward from the command line. Rewards: the toy world's ground truth
(``--reward ground_truth``, the default for toy prompts), the SPM at t = 0 (``--spm DIR``) or a plain CLIP-style
reward model such as a local PickScore (``--clip-reward DIR``), all local directories. ``--seed-offset N`` samples
at the noise seeds N .. N + seeds - 1 (default 0 .. seeds - 1: the end-of-run evaluation's).

Bad input (``spo_fast.core.errors``): every argument, file and directory is checked before any model is built, and a
problem is one line ``error: ...`` naming it, with exit code 2. That includes the weights: the LoRA file's header
(a truncated or non-safetensors file), and whether its tensors fit the base model's UNet (``check_lora_fits``,
against the UNet's module tree built on the meta device from its config: diffusers' ``load_lora_adapter`` would
silently skip the LoRA weights of modules the UNet lacks), or for a fine-tuned UNet directory its config against
the base model's.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from spo_fast.core import jsonio
from spo_fast.core.errors import (
    ArgumentParser,
    InputError,
    WeightsFileError,
    check_weights_dir,
    check_writable_dir,
    report,
    safetensors_header,
)
from spo_fast.diffusion.models import (
    Components,
    ModelDirError,
    check_model_dir,
    load_components,
    quiet_loading,
    resolve_model_path,
)
from spo_fast.evaluation.base_cache import BaseEvalCache
from spo_fast.evaluation.heldout import (
    GRID_PROMPTS,
    all_toy_prompts,
    evaluate,
    ground_truth_reward,
    scorer_reward,
    summary_line,
)
from spo_fast.reward.metrics import METRICS, check_metric, load_metric

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights (spo_fast.train) writes
UNET_PREFIX = "unet."
# A LoRA tensor's key = <module name> + one of these (diffusers' save_lora_weights: lora.down/up; peft: lora_A/B)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora\.(?P<du>down|up)\.weight|lora_(?P<ab>[AB])\.weight|"
                       r"(?P<bias>lora_B\.bias)|(?P<mag>lora_magnitude_vector))$")


# ----------------------------------------------------------------------------- checks (nothing built)
@dataclass
class Trained:
    """What ``--lora`` names: a LoRA weights file (``prefix``: its keys' ``unet.`` prefix, or None) or a fine-tuned
    UNet directory (``file`` None)."""

    path: Path
    file: Path | None = None
    prefix: str | None = "unet"
    modules: int = 0  # the LoRA modules the file holds


def check_args(args) -> None:
    """The numeric arguments: counts >= 1, a seed offset >= 0, finite sampling settings."""
    for name in ("n_prompts", "seeds", "grid_prompts", "num_steps", "batch_size"):
        value = getattr(args, name)
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} {value}: expected a count >= 1; give {flag} 1 or more")
    if args.seed_offset < 0:
        raise InputError(f"--seed-offset {args.seed_offset}: expected the first noise seed, >= 0 (0 = the end-of-run "
                         "evaluation's seeds); give --seed-offset 0 or more")
    if args.eta is None:  # the toy world's runs sample with eta 1; real models are evaluated with plain DDIM
        args.eta = 1.0 if args.model.startswith("toyworld:") else 0.0
    if not math.isfinite(args.eta) or args.eta < 0:
        raise InputError(f"--eta {args.eta}: expected a finite DDIM eta >= 0 (0 = deterministic DDIM, 1 = the "
                         "default); give e.g. --eta 1.0")
    if not math.isfinite(args.guidance_scale):
        raise InputError(f"--guidance-scale {args.guidance_scale}: expected a finite classifier-free guidance scale; "
                         "give e.g. --guidance-scale 5.0")


def read_prompts(spec: str) -> list[str]:
    """``--prompts``: a named set (``toyworld:test``, ...), a UTF-8 file with one prompt per line or a table
    (``spo_fast.data.load_prompts``: Pick-a-Pic parquet, PartiPrompts tsv, HPSv2 json; ``FILE:COLUMN``)."""
    from spo_fast.data import load_prompts

    return load_prompts(spec, key="--prompts")


def reward_kind(args, prompts: list[str]) -> str:
    """``ground_truth``, ``spm`` or ``clip`` (see ``--reward``); the ground truth needs toy-world prompts."""
    if args.clip_reward and args.reward not in (None, "clip"):
        raise InputError(f"--clip-reward {args.clip_reward} with --reward {args.reward}: the CLIP reward is the "
                         f"reward; drop one of them")
    if args.reward == "clip" and not args.clip_reward:
        raise InputError("--reward clip needs --clip-reward DIR (a local CLIP-style reward model, e.g. PickScore)")
    if args.clip_reward:
        return "clip"
    if args.reward is not None:
        kind = args.reward
    elif args.model.startswith("toyworld:") and all_toy_prompts(prompts):
        kind = "ground_truth"
    else:  # real models: the first --metric leads (the grid shows it), else the SPM at t = 0
        kind = "metric" if args.metric else "spm"
    if kind == "ground_truth":
        from spo_fast.toyworld import world

        for i, p in enumerate(prompts):
            try:
                world.parse_prompt(p)
            except ValueError as e:
                raise InputError(f"--reward ground_truth: prompt {i + 1} of --prompts {args.prompts}: {e}; the ground "
                                 "truth scores toy-world prompts only: use --reward spm or --clip-reward DIR for other "
                                 "prompts") from e
    return kind


def check_model(args) -> Path:
    """``--model`` (and ``--family``) name a complete model directory; ``--num-steps`` fits its scheduler."""
    with _named(f"--model {args.model} (--family {args.family})"):
        root = resolve_model_path(args.model)
        check_model_dir(root, args.family, "pretrained")
    cfg_file = root / "scheduler" / "scheduler_config.json"
    try:
        train_steps = int(json.loads(cfg_file.read_text(encoding="utf-8")).get("num_train_timesteps", 1000))
    except (AttributeError, TypeError, ValueError) as e:  # check_model_dir has parsed it: not an object, or a bad value
        raise ModelDirError(f"--model {args.model}: {cfg_file} is not a scheduler config (a JSON object with an "
                            f"integer num_train_timesteps): {e}; re-download the model's scheduler/") from e
    if args.num_steps > train_steps:
        raise InputError(f"--num-steps {args.num_steps}: the scheduler of --model {args.model} has "
                         f"{train_steps} training timesteps; give --num-steps {train_steps} or fewer")
    return root


def _meta_unet(unet_dir: Path, what: str):
    """The UNet of ``unet_dir/config.json`` with its module tree on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    try:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        first = " ".join(str(e).split())[:200]
        raise ModelDirError(f"{unet_dir / 'config.json'} ({what}) is not a usable UNet2DConditionModel config "
                            f"({type(e).__name__}: {first}); re-download or re-export it") from e


def _run_model_path(weights: Path) -> str | None:
    """model.path of the training run that wrote ``weights`` (its config.yaml), for the error messages."""
    import yaml

    for cfg_file in (weights / "config.yaml", weights.resolve().parent / "config.yaml"):
        if cfg_file.is_file():
            try:
                run = yaml.safe_load(cfg_file.read_text())
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                return None
            model = run.get("model") if isinstance(run, dict) else None
            return str(model.get("path")) if isinstance(model, dict) and model.get("path") else None
    return None


def _shape_text(shape) -> str:
    return "none" if shape is None else "x".join(map(str, shape))


def check_lora_fits(file: Path, tensors: dict[str, dict], unet, model: str, family: str,
                    run_model: str | None = None) -> tuple[str | None, int]:
    """Every tensor of the LoRA file ``file`` (``tensors``: its safetensors header) must be a LoRA weight of a Linear
    or Conv2d module of ``unet`` (built on the meta device) with that module's input and output widths. Returns the
    keys' prefix (``"unet"`` as diffusers' ``save_lora_weights`` writes them, None for a bare peft state dict) and
    the number of LoRA modules. Raises WeightsFileError: diffusers' ``load_lora_adapter`` would skip the weights of
    missing modules without an error (and fail on other shapes only once the weights load)."""
    from torch import nn

    keys = sorted(tensors)
    if not keys:
        raise WeightsFileError(f"--lora {file} holds no tensors; expected a LoRA written by spo_fast.train (diffusers' "
                               "save_lora_weights)")
    other_parts = sorted({k.split(".", 1)[0] for k in keys if not k.startswith(UNET_PREFIX) and "." in k
                          and k.split(".", 1)[0] in ("text_encoder", "text_encoder_2", "transformer")})
    if other_parts:
        raise WeightsFileError(f"--lora {file} holds LoRA weights of {', '.join(other_parts)}, which "
                               "spo_fast.evaluate does not apply (it evaluates UNet LoRAs, as spo_fast.train writes "
                               "them); evaluating only the UNet part would misstate the LoRA")
    prefix = "unet" if any(k.startswith(UNET_PREFIX) for k in keys) else None
    modules: dict[str, dict[str, list[int]]] = {}
    foreign = []  # keys that are not <module>.<LoRA part>
    for k in keys:
        name = k[len(UNET_PREFIX):] if prefix and k.startswith(UNET_PREFIX) else (None if prefix else k)
        m = _LORA_KEY.match(name) if name is not None else None
        if m is None:
            foreign.append(k)
            continue
        part = ("down" if m["du"] == "down" or m["ab"] == "A" else "up") if (m["du"] or m["ab"]) \
            else ("bias" if m["bias"] else "magnitude")
        modules.setdefault(m["module"], {})[part] = tensors[k]["shape"]
    by_name = dict(unet.named_modules())
    missing, mismatched = [], []
    for name, parts in modules.items():
        mod = by_name.get(name)
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            missing.append(name if mod is None else f"{name} (a {type(mod).__name__})")
            continue
        if isinstance(mod, nn.Linear):
            fan_in, fan_out, kernel = mod.in_features, mod.out_features, []
        else:
            fan_in, fan_out, kernel = mod.in_channels, mod.out_channels, list(mod.kernel_size)
        down, up = parts.get("down"), parts.get("up")
        rank = down[0] if down else (up[1] if up and len(up) > 1 else None)
        want = {"down": [rank, fan_in, *kernel], "up": [fan_out, rank, *([1, 1] if kernel else [])]}
        bad = [p for p in ("down", "up") if p not in parts or parts[p] != want[p]]
        bad += [p for p in ("bias", "magnitude") if p in parts and math.prod(parts[p]) != fan_out]
        if bad or not rank:
            got = f"down {_shape_text(down)}, up {_shape_text(up)}" if down and up else \
                f"only its {'down' if down else 'up'} matrix"
            mismatched.append(f"{name} (LoRA {got}; the UNet's {type(mod).__name__} is {fan_in} -> {fan_out})")
    if not (missing or mismatched or foreign) and modules:
        return prefix, len(modules)
    parts = []
    if missing:
        parts.append(f"{len(missing)} of its {len(modules)} LoRA modules are not modules of that UNet (e.g. "
                     f"{', '.join(sorted(missing)[:3])})")
    if mismatched:
        parts.append(f"{len(mismatched)} of its {len(modules)} LoRA modules have other widths than that UNet's (e.g. "
                     f"{'; '.join(sorted(mismatched)[:2])})")
    if foreign:
        parts.append(f"{len(foreign)} tensors are not LoRA weights of a UNet module (e.g. {', '.join(foreign[:3])}; "
                     f"expected keys like {UNET_PREFIX}<module>.lora.down.weight, as diffusers' save_lora_weights "
                     "writes)")
    hint = f"; the run that wrote it trained on model.path={run_model}" if run_model and run_model != model else ""
    raise WeightsFileError(
        f"--lora {file} does not fit the UNet of --model {model} (--family {family}): {'; '.join(parts)}. Likely a LoRA of another model{hint}: check --model/--family (the base "
        "model the LoRA was trained on)")


def check_trained(args, root: Path) -> Trained:
    """``--lora``: a LoRA directory (its safetensors header complete, its tensors fitting the base UNet) or a
    fine-tuned UNet directory (config.json of the base UNet's architecture + complete weights)."""
    weights = args.lora.expanduser()
    expected = (f"expected a LoRA directory ({LORA_WEIGHTS}, as written by spo_fast.train) or a fine-tuned UNet "
                "directory (config.json + weights)")
    if not weights.exists():
        raise InputError(f"--lora {args.lora} does not exist; {expected}")
    if not weights.is_dir():
        hint = f"; pass the directory that holds it: --lora {weights.parent}" if weights.suffix == ".safetensors" \
            else ""
        raise InputError(f"--lora {args.lora} is a file, not a directory: {expected}{hint}")
    if (weights / "config.json").is_file():
        return _check_unet_dir(weights, root, args)
    if (weights / "model_index.json").is_file() and (weights / "unet" / "config.json").is_file():
        return _check_unet_dir(weights / "unet", root, args)  # a full pipeline (e.g. the authors' SPO checkpoints)
    files = sorted(weights.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in weights.iterdir())
        found = f"it holds {', '.join(others[:5])}" if others else "it is empty"
        hint = "; a .bin LoRA must be re-saved as safetensors (safe_serialization=True)" \
            if any(n.endswith(".bin") for n in others) else ""
        for sub in ("lora", "unet"):  # a training run's output directory: its weights are one level down
            if (weights / sub / LORA_WEIGHTS).is_file() or (weights / sub / "config.json").is_file():
                hint = f"; a training run's output directory? pass its weights: --lora {weights / sub}"
        raise InputError(f"--lora {args.lora}: {expected}; {found}{hint}")
    if len(files) > 1 and not (weights / LORA_WEIGHTS).is_file():
        raise InputError(f"--lora {args.lora} holds {len(files)} safetensors files ({', '.join(f.name for f in files)})"
                         f" and no {LORA_WEIGHTS}: keep the LoRA's file only, or name it {LORA_WEIGHTS}")
    file = weights / LORA_WEIGHTS if (weights / LORA_WEIGHTS).is_file() else files[0]
    tensors = safetensors_header(file, "--lora LoRA weights")  # truncated / not safetensors: WeightsFileError
    unet = _meta_unet(root / "unet", f"the UNet of --model {args.model}")
    prefix, n = check_lora_fits(file, tensors, unet, args.model, args.family, _run_model_path(weights))
    return Trained(weights, file, prefix, n)


# the config entries that decide whether a UNet fits a pipeline (latent channels, text conditioning)
_UNET_INTERFACE = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
                   "projection_class_embeddings_input_dim")


def _check_unet_dir(weights: Path, root: Path, args) -> Trained:
    """A fine-tuned UNet directory: its config parses, is a UNet2DConditionModel's with the base UNet's parameter
    shapes (both built on the meta device), and its weights files are complete (headers)."""
    cfg_file = weights / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--lora {cfg_file} is not valid JSON ({e}); re-export the fine-tuned UNet") from e
    if not isinstance(cfg, dict) or cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        got = cfg.get("_class_name") if isinstance(cfg, dict) else type(cfg).__name__
        raise InputError(f"--lora {cfg_file}: expected a UNet2DConditionModel config (a fine-tuned UNet directory), "
                         f"got {got!r}; point --lora at a LoRA directory or a UNet directory")
    if not (any(weights.glob("*.safetensors")) or any(weights.glob("*.bin"))):
        raise InputError(f"--lora {weights}: a UNet directory (config.json) without weights (*.safetensors or *.bin)"
                         "; copy the fine-tuned UNet's weights there")
    check_weights_dir(weights, "--lora fine-tuned UNet")
    base = _meta_unet(root / "unet", f"the UNet of --model {args.model}")
    mine = _meta_unet(weights, "--lora fine-tuned UNet")
    differ = [f"{k} {mine.config.get(k)} (base {base.config.get(k)})" for k in _UNET_INTERFACE
              if mine.config.get(k) != base.config.get(k)]
    if not differ:
        mine = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in base.state_dict().items()}
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if diff:
            examples = ", ".join(f"{k} {_shape_text(mine.get(k))} (base {_shape_text(theirs.get(k))})"
                                 for k in diff[:2])
            differ = [f"{len(diff)} of its parameters differ from the base UNet's in shape or presence (e.g. {examples})"]
    if differ:
        raise WeightsFileError(f"--lora {weights}: a UNet of another architecture than the UNet of --model "
                               f"{args.model}: {'; '.join(differ)}. Likely a UNet of another model: check "
                               "--model/--family (the base model it was fine-tuned from)")
    return Trained(weights)


def check_reward_dir(args, kind: str) -> Path | None:
    """The SPM / CLIP reward directory the reward ``kind`` uses (None for the ground truth and the metrics)."""
    if kind in ("ground_truth", "metric"):
        return None
    from spo_fast.reward.spm import check_spm_dir

    if kind == "spm" and args.spm is None:
        if not args.model.startswith("toyworld:"):
            raise InputError(f"--model {args.model}: no reward to evaluate with; give the paper's reward models with "
                             "--metric (e.g. --metric pickscore=/models/PickScore_v1,tokenizer=/models/CLIP-ViT-H-14), "
                             "or an SPM with --spm DIR")
        args.spm = "toyworld:spm"
    flag, value = ("--clip-reward", args.clip_reward) if kind == "clip" else ("--spm", args.spm)
    with _named(flag):
        path = resolve_model_path(value)
        check_spm_dir(path)
    return path


@contextlib.contextmanager
def _named(flag: str):
    """An InputError raised inside gets ``flag`` in front of its message (the libraries name files, not flags)."""
    try:
        yield
    except InputError as e:
        raise type(e)(f"{flag}: {e}") from e


# ----------------------------------------------------------------------------- loading
def _load_trained(comp: Components, trained: Trained):
    """Attach the LoRA to comp.unet (-> (comp.unet, comp.unet): the base is the same UNet with the adapter off), or
    load the fine-tuned UNet directory (-> (None, its UNet))."""
    from diffusers import UNet2DConditionModel

    from spo_fast.diffusion.models import load_checked

    if trained.file is None:
        with quiet_loading():
            unet = load_checked(UNet2DConditionModel, trained.path, "--lora fine-tuned unet", local_files_only=True,
                                torch_dtype=torch.float32)
        return None, unet.eval().requires_grad_(False)
    comp.unet.load_lora_adapter(str(trained.path), weight_name=trained.file.name, prefix=trained.prefix,
                                adapter_name="trained")
    # check_lora_fits matched every module; this is the guard against diffusers skipping some without a word
    from peft.tuners.lora import LoraLayer

    loaded = sum(1 for m in comp.unet.modules() if isinstance(m, LoraLayer) and "trained" in m.lora_A)
    if loaded != trained.modules:
        raise WeightsFileError(f"--lora {trained.file}: {trained.modules} LoRA modules in the file but {loaded} were "
                               f"applied to the UNet of the base model; check --model/--family")
    return comp.unet, comp.unet


METRIC_USAGE = [m.usage for m in METRICS.values()]


class LazyMetric:
    """A ``--metric`` reward model, loaded on its first call and freed by ``release()`` (the evaluation scores the
    metrics one after the other, so only one reward model is in memory at a time)."""

    def __init__(self, spec, device):
        self.spec, self.device, self.label, self._reward = spec, device, spec.label, None

    def __call__(self, images: torch.Tensor, prompts: list[str]):
        if self._reward is None:
            self._reward = load_metric(self.spec, self.device)
        return self._reward(images, prompts)

    def release(self) -> None:
        self._reward = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _adapters_disabled(unet):
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def _run_sampling(weights: Path) -> tuple[str, bool, bool]:
    """How the run that wrote ``weights`` (its output dir's config.yaml) sampled its own evaluation: the sampling
    dtype (``bf16`` or ``fp32``), ``sampling.merge_lora`` and ``sampling.chunked_attention``; (fp32, False, False)
    when there is no config."""
    import yaml

    for cfg_file in (weights / "config.yaml", weights.resolve().parent / "config.yaml"):
        if cfg_file.is_file():
            try:
                run = yaml.safe_load(cfg_file.read_text())
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                return "fp32", False, False
            run = run if isinstance(run, dict) else {}
            sampling, train = run.get("sampling"), run.get("train")
            sampling, train = (x if isinstance(x, dict) else {} for x in (sampling, train))
            dtype = sampling.get("dtype", "auto")
            if dtype == "auto":
                dtype = "bf16" if train.get("mixed_precision") == "bf16" else "fp32"
            elif dtype == "bf16_if_native":  # resolved on this machine, as the run resolved it on its own
                import torch

                from spo_fast.core.config import native_bf16
                dtype = "bf16" if native_bf16("cuda" if torch.cuda.is_available() else "cpu") else "fp32"
            return dtype, sampling.get("merge_lora") is True, sampling.get("chunked_attention", True) is True
    return "fp32", False, False


RESULT_FILES = ("eval.json", "eval_grid.png", "eval.md")  # what an evaluation writes into its --out


def check_out(out: Path | None, lora: Path) -> Path:
    """The output directory: ``--out`` as given, which must be creatable and writable and must not hold any of
    :data:`RESULT_FILES` (results this call did not create are never replaced), or by default the first of
    ``evaluate-1``, ``evaluate-2``, ... next to ``--lora`` that does not exist yet. Raises InputError naming
    ``--out``."""
    if out is None:
        parent = lora.expanduser().resolve().parent
        out = next(parent / f"evaluate-{i}" for i in itertools.count(1) if not (parent / f"evaluate-{i}").exists())
    out = check_writable_dir(out, "--out")
    earlier = [name for name in RESULT_FILES if (out / name).exists()]
    if earlier:
        raise InputError(f"--out={out} already holds {', '.join(earlier)} of an earlier evaluation; give a new "
                         "directory as --out (or leave --out out: a new one is made next to --lora), or delete "
                         "those files")
    return out


def main(argv: list[str] | None = None) -> int:
    from types import SimpleNamespace

    parser = ArgumentParser(prog="python -m spo_fast.evaluate", description=__doc__.splitlines()[0],
                            epilog="Example: python -m spo_fast.evaluate --lora outputs/toy_spo/lora")
    parser.add_argument("--lora", "--trained", dest="lora", required=True, type=Path,
                        help="the trained model: a LoRA dir (written by spo_fast.train, or the authors' released SPO "
                             "LoRA), a fine-tuned UNet dir, or a full diffusers pipeline dir (its unet/ is used: the "
                             "authors' released SPO checkpoints)")
    parser.add_argument("--model", default="toyworld:base", help="base model dir (default: toyworld:base)")
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--prompts", default="toyworld:test",
                        help="prompt file, or a toy-world set: toyworld:test (default), toyworld:validation, "
                             "toyworld:heldout, toyworld:train")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="the first noise seed: sample at seeds N .. N + seeds - 1 (default 0, the end-of-run "
                             "evaluation's); another offset gives an evaluation on fresh noise")
    parser.add_argument("--grid-prompts", type=int, default=GRID_PROMPTS,
                        help=f"prompts in eval_grid.png (default {GRID_PROMPTS}; at most --n-prompts)")
    parser.add_argument("--reward", choices=("ground_truth", "spm", "clip"), default=None,
                        help="default: ground_truth when the model is a toyworld: one and every prompt is a toy-world "
                             "prompt (toyworld:heldout or a file of them), else spm")
    parser.add_argument("--spm", default=None, help="SPM dir (reward at t = 0; default toyworld:spm for toyworld: "
                                                     "models; a real model needs --spm DIR or a --metric)")
    parser.add_argument("--clip-reward", default=None, help="a local CLIP-style reward model dir (e.g. PickScore)")
    parser.add_argument("--metric", action="append", default=[], metavar="KIND=PATH[,PATH...]",
                        help="a reward model to score base and trained with (repeatable; local files only): "
                             + "; ".join(METRIC_USAGE) + ". With any, eval.json gets 'metrics' and eval.md the "
                             "paper's table layout")
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM eta (default: 1.0 for toyworld: models, as their runs sample; 0.0 = plain DDIM, the "
                             "paper's evaluation sampler, for real models)")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--negative-prompt", default="", help="the unconditional prompt (default empty: zeros on an "
                                                             "SDXL pipeline with force_zeros_for_empty_prompt)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="autocast dtype of the sampling; auto (default) = the run's (sampling.dtype in the "
                             "config.yaml next to --lora, as the end-of-run evaluation used), else fp32. A LoRA "
                             "whose run set sampling.merge_lora samples as that run's evaluation did: plain UNet "
                             "copies, LoRA merged in, sampling.chunked_attention")
    parser.add_argument("--no-base-cache", action="store_true",
                        help="sample the base model's half every time; by default an exact earlier result of the same "
                             "base, protocol and kind of machine is reused and a new one stored (ground-truth reward "
                             "only; spo_fast.evaluation.base_cache, $SPO_FAST_CACHE)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output dir, which must not hold an earlier evaluation's files (default: a new "
                             "directory next to --lora, evaluate-1, evaluate-2, ...)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # every check of what was given, before any model is built
        check_args(args)
        prompts = read_prompts(args.prompts)[:args.n_prompts]
        kind = reward_kind(args, prompts)
        root = check_model(args)
        trained = check_trained(args, root)
        reward_dir = check_reward_dir(args, kind)
        metrics = [check_metric(m) for m in args.metric]  # RewardError (an InputError) naming metric and file
        out = check_out(args.out, args.lora)
        # the models
        comp = load_components(args.model, args.family)
        base_unet, trained_unet = _load_trained(comp, trained)
        lazy = [LazyMetric(spec, device) for spec in metrics]
        if kind == "metric":
            reward, lazy = lazy[0], lazy[1:]
        elif reward_dir is None:
            reward = ground_truth_reward
        else:
            from spo_fast.reward.spm import SPMScorer

            # a plain CLIP/PickScore dir loads with identity (zero) time conditioning: its score at t = 0
            # is exactly the plain CLIP score
            scorer = SPMScorer.from_pretrained(reward_dir, device=device)
            reward = scorer_reward(scorer, "CLIP reward" if kind == "clip" else "SPM at t = 0")
    except InputError as e:
        return report(e)
    for m in (comp.unet, trained_unet, *comp.text_encoders, *([comp.vae] if comp.vae is not None else [])):
        m.to(device)
    run_dtype, merged, chunked = _run_sampling(args.lora.expanduser())
    dtype = args.dtype if args.dtype != "auto" else run_dtype
    base_ctx = _adapters_disabled(comp.unet) if base_unet is not None else contextlib.nullcontext(comp.unet)
    trained_ctx = contextlib.nullcontext(trained_unet)
    if merged and base_unet is not None:  # as the run's own evaluation: plain copies (spo_fast.diffusion.merged)
        from spo_fast.diffusion.merged import plain_unet

        base_ctx = plain_unet(comp.unet, None, chunked)  # entered inside the autocast below: its dtype
        trained_ctx = plain_unet(comp.unet, "trained", chunked)
    sampling = SimpleNamespace(num_steps=args.num_steps, eta=args.eta, guidance_scale=args.guidance_scale,
                               negative_prompt=args.negative_prompt)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    settings = (f"DDIM {args.num_steps} steps, eta {args.eta:g}, CFG {args.guidance_scale:g}, {dtype} sampling, "
                f"base {args.model}, trained {args.lora}")
    markdown = {"names": (f"base ({Path(args.model).name or args.model})", f"trained ({args.lora.name})"),
                "family": None if args.model.startswith("toyworld:") else args.family, "settings": settings}
    with autocast:
        result = evaluate(comp, base_ctx, trained_ctx, prompts, args.seeds, reward, out,
                          sampling, args.batch_size, device, grid_prompts=args.grid_prompts,
                          seed_offset=args.seed_offset, metrics=tuple(lazy),
                          markdown=markdown if args.metric else None,
                          base_cache=None if args.no_base_cache else BaseEvalCache(
                              log=lambda msg: print(f"[spo_fast.evaluate] {msg}", flush=True)))
    result["sampling_dtype"] = dtype  # recorded next to the statistics evaluate() wrote
    result["sampling"] = {"num_steps": args.num_steps, "eta": args.eta, "guidance_scale": args.guidance_scale,
                          "plain_copies": merged and base_unet is not None,
                          "chunked_attention": merged and base_unet is not None and chunked}
    (out / "eval.json").write_text(jsonio.dumps(result, indent=1) + "\n")
    print(f"[spo_fast.evaluate] {summary_line(result)}; wrote {out / 'eval.json'} and {out / 'eval_grid.png'}")
    for label, m in result.get("metrics", {}).items():
        print(f"[spo_fast.evaluate] {label}: base {m['base']:.4g} -> trained {m['trained']:.4g} (margin "
              f"{m['margin']:+.4g} ± {m['margin_se']:.2g}, win rate {m['win_rate']:.3f})")
    if "metrics" in result:
        print(f"[spo_fast.evaluate] wrote {out / 'eval.md'} (the paper's table layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
