"""Step-aware preference model (SPM) of Step-aware Preference Optimization (SPO).

The SPM is PickScore -- a CLIP ViT-H/14 dual encoder at 224 px -- whose *vision* tower is conditioned on the
diffusion timestep ``t`` the image ``x0_hat`` was predicted at; the text tower is plain CLIP::

    temb              = Linear(SiLU(Linear(sinusoidal(t, time_freq_dim))))             # (N, Hv)
    per layer i:      (b1, s1, gate1, b2, s2, gate2) = Linear_i(SiLU(temb))           # 6 x (N, Hv)
                      h = h + (1 + gate1) * attn(LN1(h) * (1 + s1) + b1)
                      h = h + (1 + gate2) * mlp(LN2(h) * (1 + s2) + b2)
    pooled            = post_layernorm(h[:, 0]);  (b, s) = Linear_p(SiLU(temb));  pooled = pooled * (1 + s) + b
    image_features    = normalize(visual_projection(pooled))                           # (N, D)
    text_features     = normalize(text_projection(text_tower(prompt)))                 # (P, D)
    score(x0_hat, t, prompt) = logit_scale.exp() * <image_features, text_features>    # (N,)

The modulation Linears (``Linear_i``, ``Linear_p``) are zero-initialised, so a fresh SPM is exactly the CLIP it wraps
(at any ``t``); ``timesteps=None`` skips the modulation altogether. Training (not here) uses :func:`pair_loss`, the
Bradley-Terry two-way cross-entropy on preference pairs.

Weights: the CLIP part is a transformers ``CLIPModel`` directory (e.g. PickScore_v1, or CLIP ViT-H/14 laion2B), loaded
with ``local_files_only=True`` -- nothing is ever downloaded. The time-conditioning parameters live in
``spm.safetensors`` (+ ``spm_config.json``) next to it, written by :meth:`StepAwarePreferenceModel.save_pretrained`.
:class:`SPMScorer` adapts the model to the rollout's scorer interface (see :mod:`spo_fast.reward.scorers`).

``spm_config.json`` also holds the image preprocessing (``"resize"``, see :data:`RESIZE_KEYS`): an SPM trained here
resizes as spo_fast always has (:data:`RESIZE_SPO_FAST`, also the default when the key is absent); an official
checkpoint converted with ``python -m spo_fast.spm convert`` (:mod:`spo_fast.reward.convert`) resizes as the official
code does (:data:`RESIZE_OFFICIAL`).
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, PreTrainedTokenizerBase

from spo_fast.core import jsonio
from spo_fast.core.errors import InputError, check_weights_dir, safetensors_header

__all__ = ["RESIZE_OFFICIAL", "RESIZE_SPO_FAST", "SPMScorer", "StepAwarePreferenceModel", "TimeConditioning",
           "check_spm_dir", "convert_hint", "pair_loss", "read_spm_config", "timestep_embedding"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPM_WEIGHTS = "spm.safetensors"
SPM_CONFIG = "spm_config.json"


_TIME_PREFIXES = ("layers.", "pooled.", "time_mlp.")  # TimeConditioning's parameters


class SPMError(InputError, FileNotFoundError):
    """A step-aware preference model directory or weights file that cannot be used; the message names the file."""


# ----------------------------------------------------------------------------- preprocessing (spm_config.json)
# "resize" in spm_config.json: how (N, 3, H, W) images in [-1, 1] become S x S pixels (S = the vision image_size).
#   mode           "bicubic" | "bilinear"        F.interpolate mode (align_corners=False)
#   antialias      true | false                  F.interpolate antialias (downsampling filter)
#   clamp_first    true:  clamp to [-1, 1], map to [0, 1], resize, clamp to [0, 1]      (spo_fast)
#                  false: resize the unclamped [-1, 1] image, x / 2 + 0.5, clamp to [0, 1] (official SPO)
#   size_rounding  "round":   short side -> S, long side -> max(S, round(long * S / short))  (Python round)
#                  "half_up": scale = S / short, each side -> int(side * scale + 0.5)      (official SPO)
#   crop_offset    "floor": top = (new_h - S) // 2      "round": top = int(round((new_h - S) / 2))  (torchvision)
# An image already S x S is not resized (for bicubic without antialias a same-size resize is the identity).
RESIZE_KEYS = {"mode": ("bicubic", "bilinear"), "antialias": (True, False), "clamp_first": (True, False),
               "size_rounding": ("round", "half_up"), "crop_offset": ("floor", "round")}
RESIZE_SPO_FAST = {"mode": "bicubic", "antialias": True, "clamp_first": True, "size_rounding": "round",
                   "crop_offset": "floor"}
# RockeyCoss/SPO StepAwarePreferenceModel.get_preference_score: F.interpolate(bicubic) on the VAE output, CenterCrop,
# (x / 2 + 0.5).clamp(0, 1), CLIP normalisation
RESIZE_OFFICIAL = {"mode": "bicubic", "antialias": False, "clamp_first": False, "size_rounding": "half_up",
                   "crop_offset": "round"}


def convert_hint(out: str | Path = "/models/spo_spm_sd15") -> str:
    """The command that makes an SPM directory ``out`` from the official checkpoint (for error messages)."""
    return (f"python -m spo_fast.spm convert --official sd-v1-5_step-aware_preference_model.bin (or "
            f"sdxl_step-aware_preference_model.bin) --clip /models/CLIP-ViT-H-14-laion2B-s32B-b79K --out {out}")


def _check_resize(raw, file: Path | str) -> dict:
    """The validated resize settings of ``spm_config.json`` (absent: :data:`RESIZE_SPO_FAST`; keys left out keep
    their spo_fast value). Raises SPMError naming the file and the key."""
    if raw is None:
        return dict(RESIZE_SPO_FAST)
    if not isinstance(raw, dict):
        raise SPMError(f"{file}: resize must be an object like {jsonio.dumps(RESIZE_SPO_FAST)}, got {raw!r}")
    unknown = sorted(set(raw) - set(RESIZE_KEYS))
    if unknown:
        raise SPMError(f"{file}: unknown key resize.{unknown[0]}; accepted: "
                       f"{', '.join('resize.' + k for k in RESIZE_KEYS)}")
    out = dict(RESIZE_SPO_FAST)
    for key, value in raw.items():
        allowed = RESIZE_KEYS[key]
        # bools are ints in Python: compare types too, so resize.antialias=1 is refused
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise SPMError(f"{file}: resize.{key}={jsonio.dumps(value)} is not accepted; use one of "
                           f"{', '.join(jsonio.dumps(a) for a in allowed)}")
        out[key] = value
    return out


def read_spm_config(path: str | Path) -> dict:
    """``path/spm_config.json`` parsed and checked (``{}`` + defaults when absent): ``time_freq_dim`` (an integer
    >= 2, default 256) and ``resize`` (validated, see :data:`RESIZE_KEYS`). Raises SPMError naming the file."""
    file = Path(path) / SPM_CONFIG
    cfg = {}
    if file.is_file():
        try:
            cfg = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SPMError(f"{file} is not a valid JSON file ({e}); re-export the SPM") from e
        if not isinstance(cfg, dict):
            raise SPMError(f"{file}: expected a JSON object, got {type(cfg).__name__}; re-export the SPM")
    dim = cfg.get("time_freq_dim", 256)
    if type(dim) is not int or dim < 2:
        raise SPMError(f"{file}: time_freq_dim={jsonio.dumps(dim)} is not accepted; expected an integer >= 2 (the "
                       "official SPM: 256)")
    return {**cfg, "time_freq_dim": dim, "resize": _check_resize(cfg.get("resize"), file)}


def check_spm_dir(path: str | Path) -> None:
    """Every cheap check of an SPM (or plain CLIP / PickScore) directory, before anything is built: config.json
    exists, parses and is a CLIPModel's, tokenizer files are there, every weights file is complete (headers only) and
    ``spm.safetensors``, when present, holds time-conditioning weights. Raises SPMError."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        if path.exists() and not path.is_dir():
            raise SPMError(f"{path}: expected a local step-aware preference model or CLIP/PickScore directory with "
                           "config.json and model.safetensors; a file, not a directory")
        why = "no config.json there" if path.is_dir() else "no such directory"
        raise SPMError(f"{path}: expected a local step-aware preference model or CLIP/PickScore directory with "
                       f"config.json and model.safetensors; {why}. To make one from the official SPM checkpoint: "
                       f"{convert_hint(path)}")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise SPMError(f"{cfg} is not a valid JSON object ({e}); re-download or re-export the directory") from e
    if model_type != "clip":
        raise SPMError(f"{cfg}: expected model_type 'clip' (a CLIPModel: an SPM, PickScore or CLIP), got "
                       f"{model_type!r}; point at a step-aware preference model directory")
    if not (path / "tokenizer.json").is_file() and not ((path / "vocab.json").is_file()
                                                          and (path / "merges.txt").is_file()):
        raise SPMError(f"{path}: expected CLIPTokenizer files (tokenizer.json, or vocab.json + merges.txt); copy the "
                       "tokenizer of the CLIP the model was trained from (PickScore's repo has none: use CLIP ViT-H/14's)")
    read_spm_config(path)
    check_weights_dir(path, "preference model weights")
    if (path / SPM_WEIGHTS).is_file():
        names = safetensors_header(path / SPM_WEIGHTS, "SPM time-conditioning weights")
        foreign = sorted(k for k in names if not k.startswith(_TIME_PREFIXES))
        if foreign or not names:
            raise SPMError(f"{path / SPM_WEIGHTS} is not an spo_fast SPM time-conditioning file: expected tensors "
                           f"named {', '.join(p + '*' for p in _TIME_PREFIXES)}, found "
                           f"{', '.join(foreign[:3]) or 'none'}; re-export the SPM (python -m spo_fast.train_spm)")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (DiT / ADM convention, ``[cos, sin]``): (N,) float timesteps -> (N, dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimeConditioning(nn.Module):
    """All the parameters the SPM adds to CLIP: timestep MLP, per-layer adaLN Linears, pooled-output Linear."""

    def __init__(self, hidden: int, num_layers: int, time_freq_dim: int = 256):
        super().__init__()
        self.time_freq_dim = time_freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(nn.Linear(hidden, 6 * hidden) for _ in range(num_layers))
        self.pooled = nn.Linear(hidden, 2 * hidden)
        for lin in [*self.layers, self.pooled]:  # identity init: the SPM starts as plain CLIP
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps -> (N, hidden) SiLU(temb), the input of every modulation Linear."""
        dtype = self.time_mlp[0].weight.dtype
        return F.silu(self.time_mlp(timestep_embedding(timesteps, self.time_freq_dim).to(dtype)))


class StepAwarePreferenceModel(nn.Module):
    """CLIP (``self.clip``, a transformers ``CLIPModel``) + timestep-conditioned vision tower (``self.time_cond``).

    Gradient checkpointing: ``model.clip.gradient_checkpointing_enable()`` is honoured by the modulated vision forward
    (per layer, in training mode with grad enabled).
    """

    def __init__(self, clip: CLIPModel, time_freq_dim: int = 256, resize: dict | None = None):
        super().__init__()
        self.clip = clip
        self.resize = _check_resize(resize, "StepAwarePreferenceModel(resize=...)")  # RESIZE_KEYS; in spm_config
        vcfg = clip.config.vision_config
        ref = clip.visual_projection.weight
        self.time_cond = TimeConditioning(vcfg.hidden_size, vcfg.num_hidden_layers, time_freq_dim).to(
            device=ref.device, dtype=ref.dtype
        )

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def tiny(
        cls,
        vocab_size: int | PreTrainedTokenizerBase,
        image_size: int = 24,
        patch_size: int = 4,
        hidden: int = 64,
        layers: int = 4,
        heads: int = 4,
        projection_dim: int = 64,
        max_text_len: int = 32,
        seed: int = 0,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        time_freq_dim: int = 256,
    ) -> StepAwarePreferenceModel:
        """A small randomly initialised SPM (deterministic in ``seed``; the global RNG is left untouched).

        ``vocab_size`` is an int or a tokenizer. With a tokenizer the vocab size is ``len(tokenizer)`` and the
        bos/eos/pad ids are the tokenizer's; with an int they default to CLIP's layout (bos = vocab_size - 2,
        eos = pad = vocab_size - 1). Explicit ``*_token_id`` arguments override both. The text tower pools at the
        first ``eos_token_id`` (transformers' CLIP; argmax of ids if eos == 2), so it must match the tokenizer.
        Text and vision towers share ``hidden``/``layers``/``heads``; MLP width is ``4 * hidden``.
        """
        if isinstance(vocab_size, int):
            n_vocab, ids = vocab_size, (vocab_size - 2, vocab_size - 1, vocab_size - 1)
        else:
            tok = vocab_size
            n_vocab, ids = len(tok), (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        bos, eos, pad = (a if a is not None else d for a, d in zip((bos_token_id, eos_token_id, pad_token_id), ids))
        for name, v in (("bos", bos), ("eos", eos), ("pad", pad)):
            if v is None or not 0 <= v < n_vocab:
                raise ValueError(f"{name}_token_id={v} is not in the vocabulary [0, {n_vocab})")
        common = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
                  "num_attention_heads": heads}
        config = CLIPConfig(
            text_config={**common, "vocab_size": n_vocab, "max_position_embeddings": max_text_len,
                         "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad},
            vision_config={**common, "image_size": image_size, "patch_size": patch_size},
            projection_dim=projection_dim,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(CLIPModel(config), time_freq_dim=time_freq_dim)
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, spm_weights: str | Path | None = None) -> StepAwarePreferenceModel:
        """Load the CLIPModel from local directory ``path`` (fp32, never downloads) and, if given, the
        time-conditioning weights from ``spm_weights``; ``path/spm.safetensors`` is used when present and
        ``spm_weights`` is None. ``path/spm_config.json`` (if present) supplies ``time_freq_dim`` and the
        preprocessing (``resize``; default :data:`RESIZE_SPO_FAST`).

        Without SPM weights the result is the identity-initialised SPM (= plain CLIP/PickScore) with a randomly
        initialised timestep MLP.
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            why = "no config.json there" if path.is_dir() else "no such directory"
            raise SPMError(f"{path}: expected a local transformers CLIPModel directory with config.json "
                                    f"(and model.safetensors / pytorch_model.bin); {why}")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "clip":
            raise SPMError(f"{path / 'config.json'}: expected model_type 'clip' (a CLIPModel), got {model_type!r}")
        spm_cfg = read_spm_config(path)
        from spo_fast.diffusion.models import load_checked, quiet_loading

        check_weights_dir(path, "preference model weights")
        with quiet_loading():  # no "Loading weights" bar for a local directory
            clip = load_checked(CLIPModel, path, "preference model (CLIP)", local_files_only=True, dtype=torch.float32)
        model = cls(clip, time_freq_dim=spm_cfg["time_freq_dim"], resize=spm_cfg["resize"])
        if spm_weights is None and (path / SPM_WEIGHTS).is_file():
            spm_weights = path / SPM_WEIGHTS
        if spm_weights is not None:
            model.load_time_weights(spm_weights)
        return model

    def load_time_weights(self, file: str | Path) -> None:
        """Load ``time_cond`` parameters from a safetensors file; strict, with missing/unexpected/shape-mismatched
        keys listed in the error."""
        from safetensors.torch import load_file

        file = Path(file)
        if not file.is_file():
            raise SPMError(f"{file}: expected a safetensors file of SPM time-conditioning weights")
        safetensors_header(file, "SPM time-conditioning weights")  # complete, before reading the tensors
        sd = load_file(str(file))
        own = self.time_cond.state_dict()
        missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
        shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(own.keys() & sd.keys()) if sd[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise SPMError(f"{file}: SPM time-conditioning weights do not match the model "
                           f"(missing={missing}, unexpected={unexpected}, shape mismatches={shapes})")
        self.time_cond.load_state_dict(sd)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the CLIPModel (safetensors), ``spm.safetensors`` (time-conditioning params only) and
        ``spm_config.json`` (with the preprocessing, ``resize``)."""
        from safetensors.torch import save_file

        from spo_fast.diffusion.models import quiet_loading

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with quiet_loading():  # no "Writing model shards" bar
            self.clip.save_pretrained(out_dir)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.time_cond.state_dict().items()},
                  str(out_dir / SPM_WEIGHTS), metadata={"format": "pt"})
        vcfg = self.clip.config.vision_config
        cfg = {"time_freq_dim": self.time_cond.time_freq_dim, "vision_hidden_size": vcfg.hidden_size,
               "num_layers": vcfg.num_hidden_layers, "modulation": "adaLN shift/scale/gate per layer + pooled",
               "resize": _check_resize(self.resize, out_dir / SPM_CONFIG)}
        (out_dir / SPM_CONFIG).write_text(jsonio.dumps(cfg, indent=2) + "\n")

    # ----------------------------------------------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.clip.visual_projection.weight.device

    def time_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the SPM adds to CLIP (for optimizers / freezing)."""
        return self.time_cond.parameters()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] (any float dtype) -> (N, 3, S, S) CLIP pixel_values in the model's dtype.

        Resize so the short side is S = vision image_size and centre-crop (= a plain resize for square images;
        skipped when already S x S), map to [0, 1] and clamp, CLIP mean/std normalise; how exactly is ``self.resize``
        (see :data:`RESIZE_KEYS`). spo_fast's default: clamp, map to [0, 1], bicubic with antialias, clamp, floor
        crop offsets. The official SPM's (converted checkpoints): bicubic without antialias on the unclamped image,
        then ``x / 2 + 0.5`` clamped to [0, 1], torchvision's rounded crop offsets.
        """
        r = self.resize
        x = images.float()
        if r["clamp_first"]:
            x = (x.clamp(-1, 1) + 1) / 2
        s = self.clip.config.vision_config.image_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            if r["size_rounding"] == "round":
                nh, nw = (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)
            else:  # half_up, as the official code: int(side * scale + 0.5)
                scale = s / min(h, w)
                nh, nw = max(s, int(h * scale + 0.5)), max(s, int(w * scale + 0.5))
            x = F.interpolate(x, size=(nh, nw), mode=r["mode"], antialias=r["antialias"], align_corners=False)
            if r["clamp_first"]:
                x = x.clamp(0, 1)
            if r["crop_offset"] == "floor":
                top, left = (nh - s) // 2, (nw - s) // 2
            else:  # torchvision CenterCrop
                top, left = round((nh - s) / 2.0), round((nw - s) / 2.0)
            x = x[..., top:top + s, left:left + s]
        if not r["clamp_first"]:
            x = (x / 2 + 0.5).clamp(0, 1)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        x = (x - mean) / std
        return x.to(self.dtype)

    # ---------------------------------------------------------------------------------------------------- forward
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(P, L) token ids -> (P, D) L2-normalised text features (plain CLIP text tower, no t)."""
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns a ModelOutput
        return F.normalize(feats, dim=-1)

    @staticmethod
    def _block(layer: nn.Module, h: torch.Tensor, mod: torch.Tensor | None) -> torch.Tensor:
        """One CLIP encoder layer with optional adaLN modulation ``mod`` (N, 1, 6 * Hv)."""
        if mod is None:
            h = h + layer.self_attn(layer.layer_norm1(h), attention_mask=None)[0]
            return h + layer.mlp(layer.layer_norm2(h))
        b1, s1, g1, b2, s2, g2 = mod.chunk(6, dim=-1)
        h = h + (1 + g1) * layer.self_attn(layer.layer_norm1(h) * (1 + s1) + b1, attention_mask=None)[0]
        return h + (1 + g2) * layer.mlp(layer.layer_norm2(h) * (1 + s2) + b2)

    def image_features(self, pixel_values: torch.Tensor, timesteps: torch.Tensor | float | None = None,
                       normalize: bool = True) -> torch.Tensor:
        """(N, 3, S, S) pixel_values (see :meth:`preprocess`), timesteps (N,) / scalar in [0, 1000) or None ->
        (N, D) image features, L2-normalised unless ``normalize=False`` (the projection's raw output, which the
        fused scoring op normalises itself). ``None`` timesteps skip the modulation (= plain CLIP)."""
        vm = self.clip.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(self.device, self.dtype)))
        c = None
        if timesteps is not None:
            t = torch.as_tensor(timesteps, device=h.device).float().reshape(-1).expand(h.shape[0])
            c = self.time_cond(t)
        for i, layer in enumerate(vm.encoder.layers):
            mod = None if c is None else self.time_cond.layers[i](c).unsqueeze(1)
            if getattr(layer, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
                h = checkpoint(self._block, layer, h, mod, use_reentrant=False)
            else:
                h = self._block(layer, h, mod)
        pooled = vm.post_layernorm(h[:, 0])  # CLS pooling, as CLIP
        if c is not None:
            b, s = self.time_cond.pooled(c).chunk(2, dim=-1)
            pooled = pooled * (1 + s) + b
        proj = self.clip.visual_projection(pooled)
        return F.normalize(proj, dim=-1) if normalize else proj

    def scores(self, pixel_values: torch.Tensor, timesteps: torch.Tensor | float | None, text_feats: torch.Tensor,
               prompt_index: torch.Tensor) -> torch.Tensor:
        """(N,) ``logit_scale.exp() * cos(image_features(pixel_values, t), text_feats[prompt_index])``."""
        img = self.image_features(pixel_values, timesteps)
        txt = text_feats.to(img.device, img.dtype)[prompt_index.to(img.device)]
        return self.clip.logit_scale.exp() * (img * txt).sum(-1)

    def forward(self, pixel_values: torch.Tensor, timesteps: torch.Tensor | float | None, text_feats: torch.Tensor,
                prompt_index: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`scores` (so DDP / accelerate wrappers see a forward)."""
        return self.scores(pixel_values, timesteps, text_feats, prompt_index)


def pair_loss(scores_0: torch.Tensor, scores_1: torch.Tensor,
              label_0: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry two-way cross-entropy on (N,) score pairs.

    ``label_0`` (N,) or scalar: probability that image 0 is preferred -- 1, 0, or 0.5 for a tie (target 0.5/0.5);
    any value in [0, 1] works as a soft target. Returns ``(loss, correct)``: the scalar fp32 loss
    ``mean(-(label_0 * log_softmax([s0, s1])[0] + (1 - label_0) * log_softmax([s0, s1])[1]))`` and ``correct`` (N,)
    fp32: 1 where the higher score agrees with the label, 0 where it disagrees, 0.5 where the scores are exactly
    equal, NaN for ties (label 0.5) -- so accuracy is ``correct.nanmean()``.
    """
    s0, s1 = scores_0.float(), scores_1.float()
    label = torch.as_tensor(label_0, dtype=torch.float32, device=s0.device).expand_as(s0)
    logp = torch.stack([s0, s1], dim=-1).log_softmax(-1)
    loss = -(label * logp[..., 0] + (1 - label) * logp[..., 1]).mean()
    with torch.no_grad():
        agree = torch.where(label > 0.5, (s0 > s1).float(), (s1 > s0).float())
        correct = torch.where(s0 == s1, torch.full_like(agree, 0.5), agree)
        correct = torch.where(label == 0.5, torch.full_like(agree, float("nan")), correct)
    return loss, correct


PRECISIONS = {"autocast": None, "fp32": torch.float32, "bf16": torch.bfloat16}  # None: the model's own dtype


class SPMScorer:
    """The SPM behind the rollout's scorer interface (:mod:`spo_fast.reward.scorers`).

    ``prepare(prompts)`` runs the text tower once per prompt batch and returns the (P, D) text features;
    ``score(images, timesteps, state, prompt_index)`` runs only the vision tower. Both under ``torch.no_grad``;
    the model's train/eval mode is left as it is (CLIP has no active dropout).

    ``precision`` (``scorer.dtype``): ``autocast`` keeps the model's weights as they are (fp32 when loaded) and
    runs under the caller's autocast (the rollout's mixed precision); ``fp32`` and ``bf16`` cast the weights to
    that dtype and turn autocast off inside the scorer, so ``fp32`` is really fp32 (the official code's choice)
    and ``bf16`` pays no per-call weight casts under an fp16 run.
    """

    def __init__(self, model: StepAwarePreferenceModel, tokenizer: PreTrainedTokenizerBase,
                 device: torch.device | str | None = None, precision: str = "autocast"):
        tcfg = model.clip.config.text_config
        if len(tokenizer) > tcfg.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the SPM text tower's vocab_size is "
                             f"{tcfg.vocab_size}: tokenizer and model do not match")
        if precision not in PRECISIONS:
            raise ValueError(f"SPM precision {precision!r} is not known; accepted: {', '.join(PRECISIONS)}")
        self.model = model.to(device=device, dtype=PRECISIONS[precision])
        self.precision = precision
        self.tokenizer = tokenizer
        self.max_length = min(tokenizer.model_max_length, tcfg.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None,
                        tokenizer_path: str | Path | None = None, precision: str = "autocast") -> SPMScorer:
        """SPM from ``path`` (see :meth:`StepAwarePreferenceModel.from_pretrained`) + ``CLIPTokenizer`` from
        ``tokenizer_path`` (default ``path``; PickScore's own repo has no tokenizer files -- copy the ViT-H/14 ones)."""
        model = StepAwarePreferenceModel.from_pretrained(path)
        return cls(model, _tokenizer(Path(tokenizer_path) if tokenizer_path is not None else Path(path)),
                   device=device, precision=precision)

    @classmethod
    def random(cls, path: str | Path, device: torch.device | str | None = None, seed: int = 0,
               precision: str = "autocast") -> SPMScorer:
        """An SPM with random weights built from ``path``'s config.json (a CLIPModel config, e.g. the packaged
        ``configs/arch/spm_vit_h14``: PickScore's ViT-H/14 size) and its tokenizer: for benchmarks. Built directly
        on ``device`` from its generator seeded with ``seed`` (the global RNGs are left untouched); the time
        conditioning starts at the identity, as a fresh SPM's does."""
        from spo_fast.diffusion.models import random_init

        path = Path(path)
        if not (path / "config.json").is_file():
            raise SPMError(f"{path}: expected a CLIPModel config.json (an SPM architecture directory)")
        spm_cfg = read_spm_config(path)
        dev = torch.device(device if device is not None else "cpu")
        with random_init(dev, seed):
            model = StepAwarePreferenceModel(CLIPModel(CLIPConfig.from_pretrained(path)),
                                             time_freq_dim=spm_cfg["time_freq_dim"], resize=spm_cfg["resize"])
        return cls(model.eval().requires_grad_(False), _tokenizer(path), device=dev, precision=precision)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _precision(self):
        """Autocast off inside the scorer unless it runs under the caller's (``precision="autocast"``)."""
        if self.precision == "autocast":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def prepare(self, prompts: list[str]) -> torch.Tensor:
        """(P, D) L2-normalised text features, one row per prompt."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        with self._precision():
            return self.model.text_features(tok.input_ids.to(self.device), tok.attention_mask.to(self.device))

    @torch.no_grad()
    def score(self, images: torch.Tensor, timesteps: torch.Tensor, state: torch.Tensor,
              prompt_index: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1], (N,) timesteps, prepared state, (N,) prompt index -> (N,) fp32 scores."""
        with self._precision():
            pixel_values = self.model.preprocess(images.to(self.device))
            t = torch.as_tensor(timesteps, device=self.device)
            return self.model.scores(pixel_values, t, state, torch.as_tensor(prompt_index)).float()

    # the feature-scorer interface (spo_fast.reward.scorers.FeatureScorer): the rollout then fuses the score head with
    # pair selection (spo_fast.kernels.pair_select.score_and_select)
    @property
    def logit_scale(self) -> float:
        """exp of the CLIP logit scale: score = logit_scale * cos(image features, text features)."""
        return float(self.model.clip.logit_scale.detach().exp())

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1], (N,) timesteps -> (N, D) un-normalised image features, such that
        ``score == logit_scale * <normalize(features), state[prompt_index]>``."""
        with self._precision():
            pixel_values = self.model.preprocess(images.to(self.device))
            return self.model.image_features(pixel_values, torch.as_tensor(timesteps, device=self.device),
                                             normalize=False)


def _tokenizer(tok_dir: Path) -> CLIPTokenizer:
    """The ``CLIPTokenizer`` in ``tok_dir`` (local files only)."""
    if not (tok_dir / "tokenizer.json").is_file() and not (
            (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file()):
        raise SPMError(f"{tok_dir}: expected CLIPTokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    return CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
