"""Convert the official SPO step-aware preference model checkpoint into an spo_fast SPM directory.

    python -m spo_fast.spm convert --official sd-v1-5_step-aware_preference_model.bin \\
        --clip /models/CLIP-ViT-H-14-laion2B-s32B-b79K --out /models/spo_spm_sd15

The official file (RockeyCoss/SPO, ``SPO-Diffusion-Models/Step-Aware_Preference_Models`` on the hub) is the state dict
of its ``StepAwarePreferenceModel`` wrapper: every key starts with ``model.``; the CLIP part has the names of
transformers' ``CLIPModel`` (the whole CLIP was fine-tuned, so every weight comes from this file) and the time
conditioning has its own names (:data:`KEY_MAP`). ``--clip`` supplies only config.json (the architecture) and the
tokenizer (``--tokenizer``, default ``--clip``: PickScore_v1's repo has no tokenizer, the laion CLIP-ViT-H-14 one
has both).

Two differences are converted, not just renamed:

* gate: the official block is ``h + gate * f(...)``, ours ``h + (1 + gate) * f(...)``; the gate is a slice of the
  adaLN Linear's output, so ``bias[2H:3H]`` (attention gate) and ``bias[5H:6H]`` (MLP gate) of every layer's
  modulation Linear get ``- 1`` (weights unchanged) -- exact up to fp32 rounding;
* preprocessing: ``spm_config.json`` records the official resize (:data:`spo_fast.reward.spm.RESIZE_OFFICIAL`: bicubic
  without antialias on the unclamped image, clamp after, torchvision's crop offsets).

``*.embeddings.position_ids`` buffers (saved by the transformers of the time) are dropped. Every other key must map
onto the model built from ``--clip``'s config.json, with its shape; anything missing, left over or of another shape
is an error listing every such key. The output is written next to ``--out`` and renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from spo_fast.core import jsonio
from spo_fast.core.errors import check_weights_file, safetensors_header
from spo_fast.reward.spm import RESIZE_OFFICIAL, SPM_CONFIG, SPMError, StepAwarePreferenceModel, check_spm_dir

# Official name <-> ours (``clip.*``: the CLIPModel saved as the HF directory; ``time_cond.*``: spm.safetensors).
# {i}: a layer / Sequential index, {p}: weight | bias, {rest}: anything. First match wins (time keys before CLIP).
KEY_MAP = (
    ("model.t_embedder.mlp.{i}.{p}", "time_cond.time_mlp.{i}.{p}"),  # Linear(F, H), SiLU, Linear(H, H)
    ("model.vision_model.encoder.layers.{i}.adaLN_modulation.1.{p}", "time_cond.layers.{i}.{p}"),  # [6H, H]
    ("model.vision_model.adaLN_modulation.1.{p}", "time_cond.pooled.{p}"),  # [2H, H], (shift, scale)
    ("model.{rest}", "clip.{rest}"),  # the CLIP part: transformers CLIPModel names
)
DROPPED = re.compile(r"^model\.(text|vision)_model\.embeddings\.position_ids$")  # buffers, not weights
_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
_OFFICIAL_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("^" + "".join(_FIELDS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts) + "$")


_FORWARD = [(_pattern(o), u) for o, u in KEY_MAP]
_BACKWARD = [(_pattern(u), o) for o, u in KEY_MAP]


def _translate(key: str, table) -> str | None:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict())
    return None


def to_ours(key: str) -> str | None:
    """Official key -> our key (``clip.*`` / ``time_cond.*``), None when it is not an official-layout name."""
    return _translate(key, _FORWARD)


def to_official(key: str) -> str:
    """Our key -> the official key."""
    return _translate(key, _BACKWARD)


# ----------------------------------------------------------------------------- reading the official file
def _unwrap(obj, file: Path) -> dict:
    """The state dict inside what ``torch.load`` returned: ``{"state_dict": sd}`` is unwrapped, a ``module.`` prefix
    on every key is stripped; anything but a mapping of tensors is an SPMError."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise SPMError(f"{file} holds a {type(obj).__name__}, not a state dict; expected the official SPO "
                       "StepAwarePreferenceModel checkpoint (a dict of tensors named model.vision_model...)")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad or not obj:
        what = f"non-tensor entries ({', '.join(bad[:5])})" if bad else "no tensors"
        raise SPMError(f"{file} is not a state dict: a dict with {what}; expected the official SPO "
                       "StepAwarePreferenceModel checkpoint (a dict of tensors named model.vision_model...)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _strip_module(shapes: dict) -> dict:
    if shapes and all(k.startswith("module.") for k in shapes):
        return {k[len("module."):]: v for k, v in shapes.items()}
    return shapes


def read_official(file: Path) -> tuple[dict[str, tuple], dict | None]:
    """(key -> shape, the tensors or None). Cheap: a safetensors file's header only (tensors None: read later by
    :func:`load_official`); a torch file memory-mapped (its tensors are read when used)."""
    if file.suffix == ".safetensors":
        header = safetensors_header(file, "official SPM checkpoint")
        return _strip_module({k: tuple(v["shape"]) for k, v in header.items()}), None
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a legacy (non-zip) torch file cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever unpickling raises, the file is not a checkpoint
        first = " ".join(str(e).split())[:200]
        raise SPMError(f"{file} is not a PyTorch checkpoint that can be read safely ({type(e).__name__}: {first}); "
                       "expected the official SPO StepAwarePreferenceModel .bin (torch.save of its state dict)") from e
    sd = _unwrap(obj, file)
    return {k: tuple(v.shape) for k, v in sd.items()}, sd


def load_official(file: Path, tensors: dict | None) -> dict[str, torch.Tensor]:
    if tensors is not None:
        return tensors
    from safetensors.torch import load_file

    return _strip_module(load_file(str(file)))


# ----------------------------------------------------------------------------- the key check
def expected_keys(clip_dir: Path, time_freq_dim: int) -> tuple[StepAwarePreferenceModel, dict[str, tuple]]:
    """Our SPM built on the meta device from ``clip_dir/config.json`` (nothing allocated) and the official keys it
    needs (-> shape); ``position_ids`` buffers are not needed (they are ``arange``)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_pretrained(clip_dir, local_files_only=True)
    with torch.device("meta"):
        model = StepAwarePreferenceModel(CLIPModel(config), time_freq_dim=time_freq_dim, resize=RESIZE_OFFICIAL)
    want = {to_official(k): tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("embeddings.position_ids")}
    return model, want


def check_keys(file: Path, shapes: dict[str, tuple], want: dict[str, tuple]) -> None:
    """Every key the model needs present with its shape, none left over; else an SPMError listing every missing,
    unexpected and mismatched key (a file of another model: what it holds and what was expected)."""
    have = {k: v for k, v in shapes.items() if not DROPPED.match(k)}
    common = have.keys() & want.keys()
    if len(common) < len(want) / 2:
        sample = ", ".join(repr(k) for k in sorted(shapes)[:3])
        raise SPMError(f"{file} is not the official SPO step-aware preference model: it has {len(shapes)} keys like "
                       f"{sample}; expected {len(want)} keys like 'model.vision_model.encoder.layers.0.adaLN_modulation"
                       f".1.weight', 'model.t_embedder.mlp.0.weight' and 'model.text_model...' of the official "
                       "StepAwarePreferenceModel (a state dict saved from sd-v1-5/sdxl_step-aware_preference_model)")
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    mismatched = [f"{k}: file {list(have[k])} vs model {list(want[k])}" for k in sorted(common) if have[k] != want[k]]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing: {', '.join(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {', '.join(unexpected)}" if unexpected else "",
                 f"{len(mismatched)} of another shape: {'; '.join(mismatched)}" if mismatched else ""]
        raise SPMError(f"{file} does not match the model of the --clip config.json: {' | '.join(p for p in parts if p)}"
                       "; check that --clip is the CLIP the SPM was trained from (PickScore_v1 / CLIP ViT-H/14 "
                       "laion2B) and that the file is a complete official checkpoint")


def _time_freq_dim(shapes: dict[str, tuple]) -> int:
    shape = shapes.get("model.t_embedder.mlp.0.weight")
    return int(shape[1]) if shape is not None and len(shape) == 2 else 256


# ----------------------------------------------------------------------------- cheap checks of the options
def check_clip_dir(clip: Path, tokenizer: Path, tokenizer_option: str) -> None:
    cfg = clip / "config.json"
    if not cfg.is_file():
        why = "a file, not a directory" if clip.is_file() else "no config.json there" if clip.is_dir() else \
            "no such directory"
        raise SPMError(f"--clip={clip}: expected the directory of the CLIP the SPM was trained from (PickScore_v1 or "
                       f"laion CLIP-ViT-H-14-laion2B-s32B-b79K) with its config.json; {why}")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise SPMError(f"--clip: {cfg} is not a valid JSON object ({e})") from e
    if model_type != "clip":
        raise SPMError(f"--clip: {cfg} has model_type {model_type!r}; expected 'clip' (a transformers CLIPModel "
                       "config: PickScore_v1 or laion CLIP-ViT-H-14)")
    if not (tokenizer / "tokenizer.json").is_file() and not ((tokenizer / "vocab.json").is_file()
                                                              and (tokenizer / "merges.txt").is_file()):
        raise SPMError(f"{tokenizer_option}={tokenizer}: no CLIPTokenizer files there (tokenizer.json, or vocab.json "
                       "+ merges.txt); PickScore_v1's repo has none: give --tokenizer the laion "
                       "CLIP-ViT-H-14-laion2B-s32B-b79K directory")


def check_out_dir(out: Path) -> Path:
    from spo_fast.core.errors import check_writable_dir

    out = check_writable_dir(out, "--out", SPMError)
    if out.is_dir() and any(out.iterdir()):
        raise SPMError(f"--out={out} is not empty; give a new or empty directory (nothing is overwritten)")
    return out


def check_official(file: Path) -> None:
    if not file.is_file():
        why = "a directory" if file.is_dir() else "no such file"
        raise SPMError(f"--official={file}: expected the official SPM checkpoint file "
                       f"(sd-v1-5_step-aware_preference_model.bin or sdxl_step-aware_preference_model.bin); {why}")
    if file.suffix not in _OFFICIAL_SUFFIXES:
        raise SPMError(f"--official={file}: expected a .bin / .pt / .safetensors checkpoint, got a "
                       f"{file.suffix or 'suffix-less'} file")
    check_weights_file(file, "official SPM checkpoint")


# ----------------------------------------------------------------------------- conversion
def convert(official: Path, clip: Path, out: Path, tokenizer: Path | None = None) -> str:
    """Convert; returns the one-line summary. All cheap checks (options, the file's keys against the model of
    ``clip``'s config) run before any tensor is read or anything written. Raises SPMError."""
    official, clip, out = Path(official).expanduser(), Path(clip).expanduser(), Path(out).expanduser()
    tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else clip
    check_official(official)
    check_clip_dir(clip, tok_dir, "--tokenizer" if tokenizer is not None else "--clip")
    out = check_out_dir(out)
    shapes, tensors = read_official(official)
    model, want = expected_keys(clip, _time_freq_dim(shapes))
    check_keys(official, shapes, want)

    # heavy part: read the tensors, map, offset the gates, materialise the model and save it
    sd = load_official(official, tensors)
    dropped = sorted(k for k in sd if DROPPED.match(k))
    ours = {to_ours(k): v.float() if v.is_floating_point() else v for k, v in sd.items() if not DROPPED.match(k)}
    hidden = model.clip.config.vision_config.hidden_size
    n_layers = len(model.time_cond.layers)
    for i in range(n_layers):  # official h + gate * f, ours h + (1 + gate) * f
        key = f"time_cond.layers.{i}.bias"
        bias = ours[key].clone()
        bias[2 * hidden:3 * hidden] -= 1
        bias[5 * hidden:6 * hidden] -= 1
        ours[key] = bias
    model.load_state_dict(ours, strict=False, assign=True)  # strictness: check_keys (position_ids are not in sd)
    for name, module in model.named_modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if bname != "position_ids":
                    raise RuntimeError(f"buffer {name}.{bname} was not materialised")  # a bug, not an input
                module.register_buffer(bname, torch.arange(buf.shape[-1]).expand(buf.shape).clone(),
                                       persistent=False)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left on the meta device: {leftover[:5]}")  # check_keys let a key through

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        cfg_file = tmp / SPM_CONFIG
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        cfg["converted_from"] = {"file": official.name, "format": "official SPO StepAwarePreferenceModel",
                                 "gate_offset": "bias[2H:3H] and bias[5H:6H] of every adaLN layer - 1"}
        cfg_file.write_text(jsonio.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        for name in _TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, tmp / name)
        check_spm_dir(tmp)
        if out.exists():
            out.rmdir()  # empty: check_out_dir
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_time = sum(k.startswith("time_cond.") for k in ours)
    return (f"converted {official} -> {out}: {len(ours)} tensors mapped ({len(ours) - n_time} CLIP under their "
            f"CLIPModel names, {n_time} time conditioning: model.t_embedder.mlp -> time_mlp, {n_layers} x "
            f"adaLN_modulation.1 -> layers.N, vision_model.adaLN_modulation.1 -> pooled), {len(dropped)} position_ids "
            f"buffers dropped; gate offset applied: bias[{2 * hidden}:{3 * hidden}] and bias[{5 * hidden}:{6 * hidden}] "
            f"-1 in each of {n_layers} layers (official h + gate*f, ours h + (1+gate)*f); preprocessing: bicubic, "
            "antialias=false, clamp after resize, torchvision centre crop; use it as scorer.path=" + str(out))
