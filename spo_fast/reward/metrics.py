"""Real reward models for the evaluation, built from transformers and local files only (nothing is downloaded).

Each metric is given on the command line as ``KIND=PATH[,PATH...]``: the paths in the order of the metric's parts
(``METRICS[kind].parts``), or named as ``ROLE=PATH`` in any order (an optional part may be left out); paths must
not contain commas. :data:`HELP` lists them all::

    pickscore=PICKSCORE_DIR[,tokenizer=DIR]                 PickScore = logit_scale.exp() * cos
    hpsv2=HPS_v2_compressed.pt,VIT_H_14_DIR                 HPSv2 = 100 * cos
    hpsv21=HPS_v2.1_compressed.pt,VIT_H_14_DIR              HPSv2.1 = 100 * cos
    imagereward=ImageReward.pt,med_config.json,BERT_DIR     ImageReward = (head(text[CLS]) - mean) / std
    aesthetic=sac+logos+ava1-l14-linearMSE.pth,VIT_L_14_DIR Aesthetic = head(normalize(image embedding))
    clip=CLIP_DIR[,tokenizer=DIR]                           CLIP score = max(100 * cos, 0)
    spm=SPM_DIR[,tokenizer=DIR]                             SPM at t = 0 = logit_scale.exp() * cos at t = 0

The roles, in order: pickscore, clip, spm: model, tokenizer; hpsv2, hpsv21: weights, clip; imagereward: weights,
med_config, tokenizer; aesthetic: head, clip. E.g. ``hpsv2=/w/HPS_v2_compressed.pt,/m/CLIP-ViT-H-14`` or
``pickscore=/m/PickScore_v1,tokenizer=/m/CLIP-ViT-H-14``.

What each one is (architectures, file layouts and formulas as released by their authors):

- ``pickscore``: a transformers CLIPModel directory (PickScore_v1: ViT-H/14) + CLIP tokenizer files (PickScore's repo
  has none: give laion/CLIP-ViT-H-14-laion2B-s32B-b79K's with ``tokenizer=``).
- ``hpsv2`` / ``hpsv21``: the released ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (a torch zip holding
  ``{'state_dict': open_clip ViT-H-14 weights}``), converted here to a transformers CLIPModel (one table,
  ``_OPENCLIP_RULES``; strict: every weight present, none left over, shapes equal), whose architecture and tokenizer
  come from a CLIP ViT-H/14 directory (laion/CLIP-ViT-H-14-laion2B-s32B-b79K; its weights are not used). Score = 100
  * cos, the HPSv2 benchmark's convention (``hpsv2.score`` itself returns the plain cosine).
- ``imagereward``: ``ImageReward.pt`` (a plain state dict: BLIP ViT-L/16 ``blip.visual_encoder.*``, BERT with
  cross-attention ``blip.text_encoder.*``, head ``mlp.layers.{0,2,4,6,7}``) + ``med_config.json`` (the BERT config)
  + a bert-base-uncased tokenizer directory (``[DEC]`` and ``[ENC]`` are added as ImageReward does: 30524 ids).
  Built as transformers ``BlipVisionModel`` (renamed keys, ``_BLIP_RULES``; dims read from the file, 64-wide heads,
  LayerNorm eps 1e-6) + ``BlipTextModel`` (the same key names) + the 5-Linear head. Prompts padded/truncated to 35
  tokens; reward = (head(text_last_hidden[:, 0]) - 0.16717362830052426) / 1.0333394966054072.
- ``aesthetic``: the LAION improved aesthetic predictor: head file ``sac+logos+ava1-l14-linearMSE.pth`` (plain
  state dict ``layers.{0,2,4,6,7}``, 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations) on the L2-normalised
  image embedding of openai/clip-vit-large-patch14 (a CLIPModel directory).
- ``clip``: any CLIPModel directory; torchmetrics' CLIPScore convention max(100 * cos, 0).
- ``spm``: the step-aware preference model at t = 0 (:class:`spo_fast.reward.spm.SPMScorer` +
  :func:`spo_fast.evaluation.heldout.scorer_reward`).

Preprocessing, as the authors' code sees a generated image: the (N, 3, H, W) [-1, 1] images are first quantised to
uint8 levels, round((x + 1) / 2 * 255), as the PIL image a pipeline returns would hold them. Then, for all but HPS,
the shortest side is resized to the vision tower's ``image_size`` (224 for the released models; read from the
config, so tiny test models work) with antialiased bicubic (torch's antialias is designed to match PIL's resampling,
to about one grey level), re-quantised (PIL resizes uint8 to uint8) and centre-cropped; HPS (open_clip's
``ResizeMaxSize``) resizes the longest side on the float tensor and zero-pads (black) to a square. Both = a plain
resize for square images. Then the OpenAI CLIP mean/std. Rewards run in fp32 with autocast and TF32 off, under
``torch.no_grad``, ``batch_size`` images at a time; scores come back as (N,) fp32 CPU tensors.

Bad input: :func:`check_metric` does every cheap check before any model is built -- paths, config.json
architectures, complete weights files, .pt/.pth files that load as state dicts (``torch.load(weights_only=True,
mmap=True)``, no tensor data read) and convert to the expected architecture's exact key set and shapes, tokenizer
files and vocabulary size -- and raises :class:`RewardError` (an ``InputError``) naming the metric, the file and
what was expected.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spo_fast.core.errors import WEIGHT_SUFFIXES, InputError, WeightsFileError, check_weights_dir, check_weights_file
from spo_fast.reward.spm import CLIP_MEAN, CLIP_STD

__all__ = ["HELP", "METRICS", "Metric", "MetricSpec", "Reward", "RewardError", "RewardWeightsError", "check_metric",
           "load_metric", "parse_metric", "preprocess"]

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35
HEAD_LAYERS = (0, 2, 4, 6, 7)  # the Linear layers of the ImageReward / aesthetic head (1, 3, 5 were Dropouts)


class RewardError(InputError):
    """A reward-model spec or file that cannot be used; the message names the metric, the file and what was expected."""


class RewardWeightsError(RewardError, WeightsFileError):
    """A reward model's weights file that is truncated, not a state dict, or not the expected model's weights."""


# ----------------------------------------------------------------------------------------------- metrics and specs
@dataclass(frozen=True)
class Part:
    role: str  # the name in MetricSpec.paths (and of a ROLE=PATH item)
    kind: str  # "file" or "dir"
    what: str  # what is expected there
    optional: bool = False
    shown: str = ""  # its placeholder in the usage line (default: the role in capitals)


@dataclass(frozen=True)
class Metric:
    name: str  # the kind, as written in a spec
    label: str  # the paper's column name
    parts: tuple[Part, ...]
    score: str  # the formula, for the help text
    prepare: Callable = field(repr=False)  # spec -> what build needs (every cheap check; no model built)
    build: Callable = field(repr=False)  # (spec, prepared, device, batch_size) -> Reward

    @property
    def usage(self) -> str:
        """e.g. ``hpsv2=HPS_v2_compressed.pt,VIT_H_14_DIR`` or ``pickscore=PICKSCORE_DIR[,tokenizer=DIR]``."""
        return f"{self.name}=" + ",".join(p.shown or p.role.upper() for p in self.parts if not p.optional) + "".join(
            f"[,{p.role}={p.shown or p.role.upper()}]" for p in self.parts if p.optional)


@dataclass(frozen=True)
class MetricSpec:
    kind: str
    paths: dict[str, Path]

    @property
    def metric(self) -> Metric:
        return METRICS[self.kind]

    @property
    def label(self) -> str:
        return self.metric.label

    def __str__(self) -> str:
        return f"{self.kind}=" + ",".join(f"{r}={p}" for r, p in self.paths.items())


def _who(spec: MetricSpec | Metric) -> str:
    m = spec.metric if isinstance(spec, MetricSpec) else spec
    return f"metric {m.name} ({m.label})"


def _part(spec: MetricSpec, role: str) -> Part:
    return next(p for p in spec.metric.parts if p.role == role)


def parse_metric(spec: str) -> MetricSpec:
    """``KIND=PATH[,PATH...]`` (paths in the order of ``METRICS[KIND].parts``, or ``ROLE=PATH``) -> a MetricSpec.
    Only the syntax is checked here (see :func:`check_metric`); raises RewardError."""
    kind, _, rest = spec.partition("=")
    kind = kind.strip().lower()
    if kind not in METRICS:
        raise RewardError(f"unknown reward metric {kind!r} in {spec!r}; known: {', '.join(METRICS)} (syntax: {HELP})")
    m = METRICS[kind]
    paths: dict[str, Path] = {}
    roles = [p.role for p in m.parts]
    for item in rest.split(",") if rest.strip() else []:
        role, eq, value = item.strip().partition("=")
        if eq and re.fullmatch(r"[a-z_]+", role) and role not in roles:
            raise RewardError(f"{_who(m)}: no part named {role!r} in {spec!r} (its parts: {', '.join(roles)}); "
                              f"expected {m.usage}")
        if not (eq and role in roles):
            role, value = next((r for r in roles if r not in paths), None), item.strip()
            if role is None:
                raise RewardError(f"{_who(m)}: too many paths in {spec!r}; expected {m.usage}")
        if not value or role in paths:
            raise RewardError(f"{_who(m)}: {'an empty path' if not value else f'{role} given twice'} in {spec!r}; "
                              f"expected {m.usage}")
        paths[role] = Path(value).expanduser()
    missing = [p for p in m.parts if not p.optional and p.role not in paths]
    if missing:
        raise RewardError(f"{_who(m)}: {spec!r} lacks the {missing[0].role} path ({missing[0].what}); expected "
                          f"{m.usage}")
    return MetricSpec(kind, {p.role: paths[p.role] for p in m.parts if p.role in paths})


def check_metric(spec: MetricSpec | str) -> MetricSpec:
    """Every cheap check of a metric's files before any model is built (see the module docstring); returns the
    parsed spec. Raises RewardError."""
    spec = parse_metric(spec) if isinstance(spec, str) else spec
    _prepare(spec)
    return spec


def load_metric(spec: MetricSpec | str, device: torch.device | str = "cpu", batch_size: int = 16) -> Reward:
    """The reward callable ``reward(images, prompts) -> ((N,) fp32 CPU scores, {})`` of a metric, with ``.label``
    (the paper's column name) and ``.name`` (the kind). Checks first (:func:`check_metric`)."""
    spec = parse_metric(spec) if isinstance(spec, str) else spec
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    return spec.metric.build(spec, _prepare(spec), torch.device(device), batch_size)


def _prepare(spec: MetricSpec):
    for role in spec.paths:  # every path first: a missing one is named before any other problem
        _path(spec, role)
    return spec.metric.prepare(spec)


# --------------------------------------------------------------------------------------------------- file checks
def _path(spec: MetricSpec, role: str) -> Path:
    """The part's path, checked to exist and to be a file or a directory as expected."""
    part, path = _part(spec, role), spec.paths[role]
    ok = path.is_file() if part.kind == "file" else path.is_dir()
    if not ok:
        found = "no such file or directory" if not path.exists() else \
            f"a {'directory' if path.is_dir() else 'file'}, not a {part.kind}"
        raise RewardError(f"{_who(spec)}: {role} {path}: {found}; expected {part.what}")
    return path


def _config(spec: MetricSpec, directory: Path, model_type: str, what: str) -> dict:
    """config.json of ``directory``, checked to be a ``model_type`` config."""
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise RewardError(f"{_who(spec)}: {directory} has no config.json; expected {what}")
    try:
        cfg = json.loads(cfg_file.read_text())
        if not isinstance(cfg, dict):
            raise TypeError("not a JSON object")
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise RewardError(f"{_who(spec)}: {cfg_file} does not parse ({e}); expected {what}") from e
    if cfg.get("model_type") != model_type:
        found = f"model_type {cfg['model_type']!r}" if cfg.get("model_type") else \
            f"a {cfg['_class_name']} config (diffusers)" if cfg.get("_class_name") else "no model_type"
        raise RewardError(f"{_who(spec)}: {cfg_file} is not a {model_type} config: found {found} "
                          f"{cfg.get('architectures') or ''}; expected {what}")
    return cfg


def _clip_dir(spec: MetricSpec, role: str, weights: bool = True) -> dict:
    """A CLIPModel directory: config.json of model_type clip and (``weights``) complete weights files."""
    path = _path(spec, role)
    cfg = _config(spec, path, "clip", _part(spec, role).what)
    if weights:
        if not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir() if f.is_file()):
            raise RewardError(f"{_who(spec)}: {path} holds no weights file (model.safetensors or pytorch_model.bin); "
                              f"expected {_part(spec, role).what}")
        try:
            check_weights_dir(path, f"{spec.label} weights")
        except WeightsFileError as e:
            raise RewardWeightsError(f"{_who(spec)}: {e}") from e
    return cfg


def _clip_tokenizer(spec: MetricSpec, directory: Path, text_config: dict):
    """The CLIPTokenizer in ``directory``, checked against the text tower (vocabulary size, pooling token)."""
    from transformers import CLIPTokenizer

    if not (directory / "tokenizer.json").is_file() and not ((directory / "vocab.json").is_file()
                                                               and (directory / "merges.txt").is_file()):
        raise RewardError(f"{_who(spec)}: {directory} has no CLIP tokenizer files (tokenizer.json, or vocab.json + "
                          "merges.txt); give the directory of the CLIP the model was trained from with tokenizer=DIR "
                          "(PickScore_v1 has none: use laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)")
    try:
        tok = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise RewardError(f"{_who(spec)}: the CLIP tokenizer in {directory} does not load ({e})") from e
    vocab, eos = text_config.get("vocab_size", 49408), text_config.get("eos_token_id", 2)
    if len(tok) > vocab:
        raise RewardError(f"{_who(spec)}: the tokenizer in {directory} has {len(tok)} tokens but the text tower's "
                          f"vocab_size is {vocab}: tokenizer and model do not match")
    if eos != 2 and eos != tok.eos_token_id:  # 2: transformers' legacy configs pool at the largest id (EOT)
        raise RewardError(f"{_who(spec)}: the text tower pools at token {eos} but the tokenizer in {directory} ends "
                          f"prompts with {tok.eos_token_id}: tokenizer and model do not match")
    return tok


def _load_pt(spec: MetricSpec, role: str) -> dict[str, torch.Tensor]:
    """A .pt/.pth file as a dict, loaded with ``weights_only=True`` (memory-mapped when it is a zip: the tensors are
    not read until used)."""
    path, what = _path(spec, role), _part(spec, role).what
    try:
        check_weights_file(path, f"{spec.label} {role}")
    except WeightsFileError as e:
        raise RewardWeightsError(f"{_who(spec)}: {e}; expected {what}") from e
    with open(path, "rb") as fh:
        is_zip = fh.read(2) == b"PK"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        first = " ".join(str(e).split())[:200]
        raise RewardWeightsError(f"{_who(spec)}: {path} is not a PyTorch weights file (torch.load with "
                                 f"weights_only=True fails: {type(e).__name__}: {first}); expected {what}") from e
    if not isinstance(obj, dict):
        raise RewardWeightsError(f"{_who(spec)}: {path} holds a {type(obj).__name__}, not a state dict; expected "
                                 f"{what}")
    return obj


_SIGNATURES = {  # a key that identifies a known model's state dict -> what it is
    "visual.conv1.weight": "an open_clip CLIP state dict (as in the HPS files)",
    "blip.visual_encoder.cls_token": "an ImageReward (BLIP) state dict",
    "layers.7.weight": "an MLP head state dict (as the LAION aesthetic predictor's)",
    "vision_model.embeddings.patch_embedding.weight": "a transformers CLIPModel state dict",
    "model.t_embedder.mlp.0.weight": "an official SPO step-aware preference model",
    "state_dict": "a checkpoint wrapping {'state_dict': ...} (as the HPS files)",
}


def _describe(obj: dict) -> str:
    for key, what in _SIGNATURES.items():
        if key in obj:
            return what
    keys = sorted(map(str, obj))
    return f"a dict of {len(keys)} entries ({', '.join(keys[:3]) or 'empty'})"


def _tensors(spec: MetricSpec, role: str, obj: dict, signature: str) -> dict[str, torch.Tensor]:
    """``obj`` checked to be a state dict holding ``signature`` (the expected model's)."""
    other = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if signature not in obj or other:
        found = f"non-tensor entries ({', '.join(other[:3])})" if signature in obj else _describe(obj)
        raise RewardWeightsError(f"{_who(spec)}: {spec.paths[role]} holds {found}, not the expected weights; "
                                 f"expected {_part(spec, role).what}")
    return obj


# ---------------------------------------------------------------------------------------------- key conversions
# (source key pattern, target key template or None to drop, op): "qkv" splits a fused in-projection into q/k/v
# ("{}" in the template), "T" transposes; each table is applied with re.fullmatch, first match wins.
_BLOCK = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
          ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
_TOWERS = [(r"visual\.", "vision_model"), ("", "text_model")]
_OPENCLIP_RULES = [  # open_clip CLIP (HPS) -> transformers CLIPModel
    (r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight", None),
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding", None),
    (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight", None),
    (r"visual\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1", None),
    (r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1", None),
    (r"visual\.proj", "visual_projection.weight", "T"),
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight", None),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight", None),
    (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1", None),
    (r"text_projection", "text_projection.weight", "T"),
    (r"logit_scale", "logit_scale", None),
    *[(rf"{src}transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
       rf"{dst}.encoder.layers.\1.self_attn.{{}}_proj.\2", "qkv") for src, dst in _TOWERS],
    *[(rf"{src}transformer\.resblocks\.(\d+)\.{re.escape(a)}\.(weight|bias)", rf"{dst}.encoder.layers.\1.{b}.\2",
       None) for src, dst in _TOWERS for a, b in _BLOCK],
]
VISUAL = "blip.visual_encoder."
_VE = re.escape(VISUAL)
_BLIP_RULES = [  # ImageReward.pt -> ImageRewardNet (vision: BlipVisionModel, text: BlipTextModel, head: MLPHead)
    (_VE + r"cls_token", "vision.embeddings.class_embedding", None),
    (_VE + r"pos_embed", "vision.embeddings.position_embedding", None),
    (_VE + r"patch_embed\.proj\.(weight|bias)", r"vision.embeddings.patch_embedding.\1", None),
    (_VE + r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm\2.\3", None),
    (_VE + r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.qkv.\2", None),
    (_VE + r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.projection.\2", None),
    (_VE + r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"vision.encoder.layers.\1.mlp.\2.\3", None),
    (_VE + r"norm\.(weight|bias)", r"vision.post_layernorm.\1", None),
    (r"blip\.text_encoder\.embeddings\.position_ids", None, None),  # a buffer (persistent in BLIP's med.py)
    (r"blip\.text_encoder\.(.+)", r"text.\1", None),  # BlipTextModel has med.py's key names
    (r"mlp\.layers\.(\d+)\.(weight|bias)", r"head.\1.\2", None),
    (r"blip\.(?!visual_encoder\.|text_encoder\.).+", None, None),  # vision_proj, text_proj: not used by the reward
]


def convert(sd: dict[str, torch.Tensor], rules) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename (and split / transpose) a state dict by a rule table -> (converted, target key -> source key,
    unmatched source keys). Views only: nothing is copied or cast."""
    out, origin, unmatched = {}, {}, []
    for key, t in sd.items():
        match = next(((m, target, op) for pattern, target, op in rules if (m := re.fullmatch(pattern, key))), None)
        if match is None:
            unmatched.append(key)
            continue
        m, target, op = match
        if target is None:
            continue
        name = m.expand(target)
        if op == "qkv":
            for part, chunk in zip("qkv", t.chunk(3)):
                out[name.format(part)], origin[name.format(part)] = chunk, key
            continue
        out[name], origin[name] = (t.t() if op == "T" and t.ndim == 2 else t), key
    return out, origin, unmatched


def _strict(spec: MetricSpec, role: str, converted, origin, unmatched, expected: dict[str, tuple], against: str):
    """The converted weights hold exactly ``expected``'s keys with its shapes; else RewardWeightsError naming the
    file and the first missing / mis-shaped / left-over keys."""
    missing = [k for k in expected if k not in converted]
    shapes = [f"{origin[k]} {tuple(converted[k].shape)} vs {expected[k]}" for k in expected
              if k in converted and tuple(converted[k].shape) != tuple(expected[k])]
    extra = unmatched + [origin[k] for k in converted if k not in expected]
    if missing or shapes or extra:
        parts = [f"{len(missing)} weights missing (transformers names, e.g. {', '.join(missing[:3])})" * bool(missing),
                 f"{len(shapes)} of another shape (file vs expected, e.g. {'; '.join(shapes[:3])})" * bool(shapes),
                 f"{len(extra)} left over (e.g. {', '.join(sorted(set(extra))[:3])})" * bool(extra)]
        raise RewardWeightsError(f"{_who(spec)}: {spec.paths[role]} does not fit {against}: "
                                 f"{'; '.join(p for p in parts if p)}; expected {_part(spec, role).what}")


def _meta_shapes(build: Callable[[], nn.Module]) -> dict[str, tuple]:
    with _empty_weights():
        return {k: tuple(v.shape) for k, v in build().state_dict().items()}


def _empty_weights():
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)  # parameters on the meta device, buffers real


def _materialise(build: Callable[[], nn.Module], weights: dict[str, torch.Tensor], device) -> nn.Module:
    """``build()`` with no parameter memory, then ``weights`` (cast to fp32) assigned strictly; eval, frozen."""
    with _empty_weights():
        model = build()
    model.load_state_dict({k: v.float().contiguous() for k, v in weights.items()}, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------------- preprocessing
def preprocess(images: torch.Tensor, size: int, fit: str = "crop") -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> (N, 3, size, size) CLIP-normalised pixel values, as the reward models'
    authors see a generated image: quantised to uint8 levels (round((x + 1) / 2 * 255), as PIL would hold it), then

    - ``fit="crop"`` (PickScore, ImageReward, aesthetic, CLIP): shortest side resized to ``size`` (long side
      ``int(size * long / short)``, as torchvision / transformers) with antialiased bicubic, re-quantised (PIL resizes
      uint8 to uint8), centre crop (torchvision's offsets);
    - ``fit="pad"`` (HPS, open_clip's ResizeMaxSize): longest side resized to ``size`` (short side rounded) with
      antialiased bicubic on the float image, zero (black) padding centred;

    no resize when the image already is ``size`` x ``size``; then the OpenAI CLIP mean/std."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if fit == "crop":
            nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            x = (x.clamp(0, 1) * 255).round() / 255
            top, left = round((nh - size) / 2), round((nw - size) / 2)
            x = x[..., top:top + size, left:left + size]
        elif fit == "pad":
            scale = size / max(h, w)
            nh, nw = round(h * scale), round(w * scale)
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            ph, pw = size - nh, size - nw
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        else:
            raise ValueError(f"fit={fit!r}: expected 'crop' or 'pad'")
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------------- the rewards
class Reward:
    """``reward(images, prompts) -> ((N,) fp32 CPU scores, {})`` for (N, 3, H, W) [-1, 1] images; ``.label`` (the
    paper's column name), ``.name`` (the metric kind). Subclasses implement ``prepare(unique prompts) -> state``
    (text features, tokens, ...) and ``score(images, state, index) -> (n,)`` (``index``: each image's prompt in
    the unique list)."""

    def __init__(self, name: str, device: torch.device, batch_size: int):
        self.name, self.label = name, METRICS[name].label
        self.device, self.batch_size = device, batch_size

    def prepare(self, prompts: list[str]):
        return prompts

    def score(self, images: torch.Tensor, state, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise ValueError(f"{self.label}: expected (N, 3, H, W) images and N prompts, got {tuple(images.shape)} "
                             f"and {len(prompts)} prompts")
        unique = list(dict.fromkeys(prompts))
        position = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([position[p] for p in prompts], dtype=torch.long)
        out = []
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False), _no_tf32():
            state = self.prepare(unique)
            for i in range(0, len(prompts), self.batch_size):
                batch = images[i:i + self.batch_size].to(self.device, torch.float32)
                out.append(self.score(batch, state, index[i:i + self.batch_size].to(self.device)).float().cpu())
        return (torch.cat(out) if out else torch.zeros(0)), {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.label})>"


_FORMULAS = {"pickscore": lambda m, cos: m.logit_scale.exp() * cos, "hpsv2": lambda m, cos: 100 * cos,
             "hpsv21": lambda m, cos: 100 * cos, "clip": lambda m, cos: (100 * cos).clamp(min=0)}


@contextlib.contextmanager
def _no_tf32():
    """fp32 really fp32 on CUDA: TF32 matmuls and convolutions off (a training run may have turned them on),
    restored afterwards."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


class ClipReward(Reward):
    """A CLIPModel dual encoder: PickScore (logit_scale.exp() * cos), HPS (100 * cos), CLIP score (max(100 cos, 0))."""

    def __init__(self, name: str, model, tokenizer, fit: str, device, batch_size: int):
        super().__init__(name, device, batch_size)
        self.model, self.tokenizer, self.fit = model.to(device), tokenizer, fit
        self.size = model.config.vision_config.image_size
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    def prepare(self, prompts):
        feats = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(prompts[i:i + self.batch_size], padding="max_length", max_length=self.max_length,
                                 truncation=True, return_tensors="pt").to(self.device)
            out = self.model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
            feats.append(F.normalize(self.model.text_projection(out), dim=-1))
        return torch.cat(feats)

    def score(self, images, text, index):
        pooled = self.model.vision_model(pixel_values=preprocess(images, self.size, self.fit)).pooler_output
        cos = (F.normalize(self.model.visual_projection(pooled), dim=-1) * text[index]).sum(-1)
        return _FORMULAS[self.name](self.model, cos)


class MLPHead(nn.Sequential):
    """The ImageReward / LAION aesthetic head: Linear layers at indices 0, 2, 4, 6, 7 (1, 3, 5 were Dropouts, inactive
    at inference), no activations; ``dims`` e.g. (768, 1024, 128, 64, 16, 1)."""

    def __init__(self, dims: tuple[int, ...]):
        lin = [nn.Linear(a, b) for a, b in itertools.pairwise(dims)]
        super().__init__(lin[0], nn.Identity(), lin[1], nn.Identity(), lin[2], nn.Identity(), lin[3], lin[4])


def _head_dims(spec: MetricSpec, role: str, sd: dict, prefix: str, in_dim: int) -> tuple[int, ...]:
    """The head's widths from its weights, checked: the five Linears, chained, ``in_dim`` -> ... -> 1."""
    dims, problem = [in_dim], None
    for i in HEAD_LAYERS:
        w, b = sd.get(f"{prefix}{i}.weight"), sd.get(f"{prefix}{i}.bias")
        if w is None or b is None:
            problem = f"no {prefix}{i}.weight/bias"
        elif w.ndim != 2 or w.shape[1] != dims[-1] or tuple(b.shape) != (w.shape[0],):
            problem = f"{prefix}{i}.weight is {tuple(w.shape)} (bias {tuple(b.shape)}), expected (*, {dims[-1]})"
        if problem:
            break
        dims.append(w.shape[0])
    if problem is None and dims[-1] != 1:
        problem = f"the head ends in {dims[-1]} outputs, expected 1"
    if problem:
        raise RewardWeightsError(f"{_who(spec)}: {spec.paths[role]} is not a {len(HEAD_LAYERS)}-Linear reward head on "
                                 f"{in_dim}-wide features ({problem}; the file holds {_describe(sd)}); expected "
                                 f"{_part(spec, role).what}")
    return tuple(dims)


class AestheticReward(Reward):
    """head(normalize(CLIP image embedding))."""

    def __init__(self, model, head: MLPHead, device, batch_size: int):
        super().__init__("aesthetic", device, batch_size)
        self.model, self.head = model.to(device), head.to(device)
        self.size = model.config.vision_config.image_size

    def score(self, images, state, index):
        pooled = self.model.vision_model(pixel_values=preprocess(images, self.size, "crop")).pooler_output
        return self.head(F.normalize(self.model.visual_projection(pooled), dim=-1)).squeeze(-1)


class ImageRewardNet(nn.Module):
    """ImageReward's scoring path: BLIP ViT (``vision``), BERT with cross-attention (``text``), 5-Linear ``head``."""

    def __init__(self, vision_config, text_config, head_dims):
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = MLPHead(head_dims)


class ImageRewardReward(Reward):
    def __init__(self, net: ImageRewardNet, tokenizer, device, batch_size: int):
        super().__init__("imagereward", device, batch_size)
        self.net, self.tokenizer = net.to(device), tokenizer
        self.size = net.vision.config.image_size

    def prepare(self, prompts):
        return self.tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS,
                              return_tensors="pt").to(self.device)

    def score(self, images, tok, index):
        img = self.net.vision(pixel_values=preprocess(images, self.size, "crop")).last_hidden_state
        text = self.net.text(input_ids=tok.input_ids[index], attention_mask=tok.attention_mask[index],
                             encoder_hidden_states=img, encoder_attention_mask=img.new_ones(img.shape[:2]),
                             is_decoder=False).last_hidden_state
        return (self.net.head(text[:, 0]).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


class SpmReward(Reward):
    """The SPM at t = 0 through :func:`spo_fast.evaluation.heldout.scorer_reward` (fp32, autocast off)."""

    def __init__(self, scorer, device, batch_size: int):
        from spo_fast.evaluation.heldout import scorer_reward

        super().__init__("spm", device, batch_size)
        self.fn = scorer_reward(scorer, self.label)

    def score(self, images, unique, index):
        return self.fn(images, [unique[i] for i in index.tolist()])[0]


# -------------------------------------------------------------------------------------- per-metric prepare / build
def _load_clip(cls, directory: Path, spec: MetricSpec):
    from spo_fast.diffusion.models import load_checked, quiet_loading

    try:
        with quiet_loading():
            return load_checked(cls, directory, spec.label, local_files_only=True, dtype=torch.float32)
    except InputError as e:
        raise RewardWeightsError(f"{_who(spec)}: {e}") from e


def _prepare_clip(spec: MetricSpec) -> dict:
    """pickscore / clip: a CLIPModel directory + its (or ``tokenizer=``'s) tokenizer."""
    cfg = _clip_dir(spec, "model")
    tok_dir = _path(spec, "tokenizer") if "tokenizer" in spec.paths else spec.paths["model"]
    return {"tokenizer": _clip_tokenizer(spec, tok_dir, cfg.get("text_config") or {})}


def _build_clip(spec, prep, device, batch_size):
    from transformers import CLIPModel

    model = _load_clip(CLIPModel, spec.paths["model"], spec).eval().requires_grad_(False)
    return ClipReward(spec.kind, model, prep["tokenizer"], "crop", device, batch_size)


def _prepare_hps(spec: MetricSpec) -> dict:
    from transformers import CLIPConfig, CLIPModel

    clip_dir = _path(spec, "clip")
    raw = _clip_dir(spec, "clip", weights=False)
    acts = {raw.get(c, {}).get("hidden_act", "gelu") for c in ("text_config", "vision_config")}
    if acts != {"gelu"}:
        raise RewardError(f"{_who(spec)}: {clip_dir / 'config.json'} uses {sorted(acts)} activations; HPS is open_clip "
                          f"ViT-H-14 (GELU); expected {_part(spec, 'clip').what}")
    try:
        config = CLIPConfig.from_pretrained(clip_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise RewardError(f"{_who(spec)}: {clip_dir / 'config.json'} is not a usable CLIPConfig ({e})") from e
    tokenizer = _clip_tokenizer(spec, clip_dir, raw.get("text_config") or {})
    obj = _load_pt(spec, "weights")
    sd = _tensors(spec, "weights", obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj,
                  "visual.conv1.weight")
    converted, origin, unmatched = convert(sd, _OPENCLIP_RULES)
    _strict(spec, "weights", converted, origin, unmatched, _meta_shapes(lambda: CLIPModel(config)),
            f"the CLIP architecture of {clip_dir / 'config.json'} (HPS needs CLIP ViT-H/14: "
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    return {"config": config, "tokenizer": tokenizer, "weights": converted}


def _build_hps(spec, prep, device, batch_size):
    from transformers import CLIPModel

    model = _materialise(lambda: CLIPModel(prep["config"]), prep["weights"], device)
    return ClipReward(spec.kind, model, prep["tokenizer"], "pad", device, batch_size)


def _prepare_imagereward(spec: MetricSpec) -> dict:
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig

    med_file = _path(spec, "med_config")
    try:
        med = json.loads(med_file.read_text())
        dims = {k: int(med[k]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "intermediate_size", "vocab_size", "max_position_embeddings")}
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise RewardError(f"{_who(spec)}: {med_file} is not a BERT config ({type(e).__name__}: {e}); expected "
                          f"{_part(spec, 'med_config').what}") from e
    if med.get("model_type", "bert") != "bert":
        raise RewardError(f"{_who(spec)}: {med_file} is a {med['model_type']!r} config, not BERT's; expected "
                          f"{_part(spec, 'med_config').what}")
    tok_dir = _path(spec, "tokenizer")
    if not (tok_dir / "vocab.txt").is_file() and not (tok_dir / "tokenizer.json").is_file():
        raise RewardError(f"{_who(spec)}: {tok_dir} has no BERT tokenizer files (vocab.txt or tokenizer.json); "
                          f"expected {_part(spec, 'tokenizer').what}")
    try:
        tokenizer = BertTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise RewardError(f"{_who(spec)}: the tokenizer in {tok_dir} does not load as BERT's ({e})") from e
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # as ImageReward's BLIP init_tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != dims["vocab_size"]:
        raise RewardError(f"{_who(spec)}: the tokenizer in {tok_dir} has {len(tokenizer)} tokens with [DEC] and "
                          f"[ENC] but {med_file.name} says vocab_size {dims['vocab_size']}; expected "
                          f"{_part(spec, 'tokenizer').what}")

    sd = _tensors(spec, "weights", _load_pt(spec, "weights"), "blip.visual_encoder.cls_token")
    keys = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if any(VISUAL + k not in sd for k in keys):
        raise RewardWeightsError(f"{_who(spec)}: {spec.paths['weights']} lacks the BLIP ViT's embeddings "
                                 f"({', '.join(keys)}); expected {_part(spec, 'weights').what}")
    ve = {k: sd[VISUAL + k].shape for k in keys}
    width, patch, positions = ve["cls_token"][-1], ve["patch_embed.proj.weight"][-1], ve["pos_embed"][-2]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1 or width % 64:
        raise RewardWeightsError(f"{_who(spec)}: {spec.paths['weights']}: a BLIP ViT of width {width} with "
                                 f"{positions} positions is not a square-image ViT with 64-wide heads; expected "
                                 f"{_part(spec, 'weights').what}")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(_VE + r"blocks\.(\d+)\.", k)))
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=ve["blocks.0.mlp.fc1.weight"][0],
                              num_hidden_layers=layers, num_attention_heads=width // 64, image_size=grid * patch,
                              patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu", attention_dropout=0.0)
    text = BlipTextConfig(**dims, encoder_hidden_size=width, layer_norm_eps=med.get("layer_norm_eps", 1e-12),
                          hidden_act=med.get("hidden_act", "gelu"), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, is_decoder=True,  # True: builds the cross-attention
                          pad_token_id=med.get("pad_token_id", 0), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=None, sep_token_id=tokenizer.sep_token_id)
    head = _head_dims(spec, "weights", sd, "mlp.layers.", dims["hidden_size"])
    converted, origin, unmatched = convert(sd, _BLIP_RULES)
    _strict(spec, "weights", converted, origin, unmatched, _meta_shapes(lambda: ImageRewardNet(vision, text, head)),
            f"ImageReward's BLIP (ViT width {width}, {layers} layers) with the BERT of {med_file}")
    return {"vision": vision, "text": text, "head": head, "tokenizer": tokenizer, "weights": converted}


def _build_imagereward(spec, prep, device, batch_size):
    net = _materialise(lambda: ImageRewardNet(prep["vision"], prep["text"], prep["head"]), prep["weights"], device)
    return ImageRewardReward(net, prep["tokenizer"], device, batch_size)


def _prepare_aesthetic(spec: MetricSpec) -> dict:
    cfg = _clip_dir(spec, "clip")
    sd = _tensors(spec, "head", _load_pt(spec, "head"), "layers.0.weight")
    dims = _head_dims(spec, "head", sd, "layers.", int(cfg.get("projection_dim", 512)))
    extra = sorted(set(sd) - {f"layers.{i}.{p}" for i in HEAD_LAYERS for p in ("weight", "bias")})
    if extra:
        raise RewardWeightsError(f"{_who(spec)}: {spec.paths['head']} holds more than the head ({', '.join(extra[:3])}"
                                 f"); expected {_part(spec, 'head').what}")
    return {"dims": dims, "head": {k.removeprefix("layers."): v for k, v in sd.items()}}


def _build_aesthetic(spec, prep, device, batch_size):
    from transformers import CLIPModel

    model = _load_clip(CLIPModel, spec.paths["clip"], spec).eval().requires_grad_(False)
    head = _materialise(lambda: MLPHead(prep["dims"]), prep["head"], device)
    return AestheticReward(model, head, device, batch_size)


def _prepare_spm(spec: MetricSpec) -> dict:
    from spo_fast.reward.spm import SPMError, check_spm_dir

    path = _path(spec, "model")
    if "tokenizer" in spec.paths:  # the tokenizer lives elsewhere: check_spm_dir would look for it in path
        cfg = _clip_dir(spec, "model")
        _clip_tokenizer(spec, _path(spec, "tokenizer"), cfg.get("text_config") or {})
        return {}
    try:
        check_spm_dir(path)
    except SPMError as e:
        raise RewardError(f"{_who(spec)}: {e}") from e
    return {}


def _build_spm(spec, prep, device, batch_size):
    from spo_fast.reward.spm import SPMScorer

    try:
        scorer = SPMScorer.from_pretrained(spec.paths["model"], device=device, precision="fp32",
                                           tokenizer_path=spec.paths.get("tokenizer"))
    except InputError as e:
        raise RewardError(f"{_who(spec)}: {e}") from e
    scorer.model.eval().requires_grad_(False)
    return SpmReward(scorer, device, batch_size)


_CLIP_TOKENIZER = Part("tokenizer", "dir", "a CLIP tokenizer directory (tokenizer.json, or vocab.json + merges.txt); "
                       "default: the model directory", optional=True, shown="DIR")
_VIT_H = "a CLIP ViT-H/14 directory (laion/CLIP-ViT-H-14-laion2B-s32B-b79K: config.json + tokenizer; its weights " \
         "are not used)"
METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("pickscore", "PickScore", (
        Part("model", "dir", "the PickScore_v1 CLIPModel directory (config.json + model.safetensors)",
             shown="PICKSCORE_DIR"),
        _CLIP_TOKENIZER), "logit_scale.exp() * cos(image, text)", _prepare_clip, _build_clip),
    Metric("hpsv2", "HPSv2", (
        Part("weights", "file", "HPS_v2_compressed.pt (the released HPSv2 weights, {'state_dict': open_clip "
             "ViT-H-14})", shown="HPS_v2_compressed.pt"),
        Part("clip", "dir", _VIT_H, shown="VIT_H_14_DIR")), "100 * cos(image, text) (the HPSv2 benchmark's convention)",
        _prepare_hps, _build_hps),
    Metric("hpsv21", "HPSv2.1", (
        Part("weights", "file", "HPS_v2.1_compressed.pt (the released HPSv2.1 weights, {'state_dict': open_clip "
             "ViT-H-14})", shown="HPS_v2.1_compressed.pt"),
        Part("clip", "dir", _VIT_H, shown="VIT_H_14_DIR")), "100 * cos(image, text) (the HPSv2 benchmark's convention)",
        _prepare_hps, _build_hps),
    Metric("imagereward", "ImageReward", (
        Part("weights", "file", "ImageReward.pt (THUDM/ImageReward's plain state dict: blip.visual_encoder.*, "
             "blip.text_encoder.*, mlp.layers.*)", shown="ImageReward.pt"),
        Part("med_config", "file", "med_config.json (ImageReward's BERT config)", shown="med_config.json"),
        Part("tokenizer", "dir", "a bert-base-uncased tokenizer directory (vocab.txt / tokenizer.json)",
             shown="BERT_DIR")),
        f"(head(text[CLS]) - {IMAGEREWARD_MEAN}) / {IMAGEREWARD_STD}", _prepare_imagereward, _build_imagereward),
    Metric("aesthetic", "Aesthetic", (
        Part("head", "file", "sac+logos+ava1-l14-linearMSE.pth (the LAION aesthetic head: layers.{0,2,4,6,7})",
             shown="sac+logos+ava1-l14-linearMSE.pth"),
        Part("clip", "dir", "the openai/clip-vit-large-patch14 CLIPModel directory (config.json + weights)",
             shown="VIT_L_14_DIR")),
        "head(normalize(CLIP image embedding))", _prepare_aesthetic, _build_aesthetic),
    Metric("clip", "CLIP score", (
        Part("model", "dir", "a CLIPModel directory (e.g. openai/clip-vit-large-patch14)", shown="CLIP_DIR"),
        _CLIP_TOKENIZER),
        "max(100 * cos(image, text), 0) (torchmetrics' CLIPScore)", _prepare_clip, _build_clip),
    Metric("spm", "SPM at t = 0", (
        Part("model", "dir", "a step-aware preference model directory (python -m spo_fast.train_spm), or a "
             "CLIP/PickScore one", shown="SPM_DIR"), _CLIP_TOKENIZER),
        "logit_scale.exp() * cos at t = 0", _prepare_spm, _build_spm),
]}

HELP = ("KIND=PATH[,PATH...] with the paths in this order, or named ROLE=PATH: " + "; ".join(
    f"{m.usage} ({m.label} = {m.score}; roles {', '.join(p.role for p in m.parts)})" for m in METRICS.values()))
