"""Stable Diffusion 1.5 / SDXL components: model-directory checks, loading, prompt encoding.

A model directory uses the diffusers layout (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; SDXL adds ``text_encoder_2/`` and ``tokenizer_2/``).
``arch:<name>`` names a packaged config-only directory under ``configs/arch/`` for
``init="random"`` runs; its tokenizers are generated from ``configs/arch/words.txt`` by
``python -m spo_fast.diffusion.models write-tokenizers``. ``toyworld:<name>`` names a packaged, trained
toy-world model under ``spo_fast/toyworld/assets/`` (``python -m spo_fast.toyworld build``).

Pixel-space models: a directory without ``vae/`` whose UNet has 3 input channels is a pixel-space
model (the toy world's base model); its "latents" are RGB images in [-1, 1] and decoding is the
identity. Every latent model keeps the AutoencoderKL path.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import re
import shutil
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from spo_fast.core import jsonio
from spo_fast.core.config import ConfigError
from spo_fast.core.errors import InputError, check_loading_info, check_weights_dir

FAMILIES = ("sd15", "sdxl")
INITS = ("pretrained", "random")
ARCH_PREFIX = "arch:"
TOYWORLD_PREFIX = "toyworld:"

_TEXT_ENCODERS = {
    "sd15": (("text_encoder", "tokenizer", CLIPTextModel),),
    "sdxl": (
        ("text_encoder", "tokenizer", CLIPTextModel),
        ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection),
    ),
}
_SUBFOLDERS = {
    family: ("unet", "vae", *(name for pair in encs for name in pair[:2]), "scheduler")
    for family, encs in _TEXT_ENCODERS.items()
}
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_EOW = "</w>"
_NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")  # subfolders that hold weights
_REAL_CLIP_VOCAB = 49408


class ModelDirError(InputError):
    """A model directory is missing, incomplete or malformed."""


# --------------------------------------------------------------------------- quiet loading


class _EmptyFp32ListFilter(logging.Filter):
    """Drops exactly diffusers' "There are modules in X that should be kept in float32: []. Casting directly with
    `to()` ..." warning when the list is empty: ``ModelMixin.to(dtype)`` logs it on every dtype cast (its test
    ``fp32_modules is not None`` holds for ``[]``), though no module is kept in fp32 and the cast is exactly what
    mixed precision asks for. A non-empty list (a real fp32 module being cast) still gets through."""

    PATTERN = re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\. "
                         r"Casting directly with `to\(\)`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.PATTERN.match(record.getMessage())


def install_log_filters() -> None:
    """Install ``_EmptyFp32ListFilter`` on diffusers' modeling logger (idempotent; done on import)."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _EmptyFp32ListFilter) for f in logger.filters):
        logger.addFilter(_EmptyFp32ListFilter())


install_log_filters()


@contextlib.contextmanager
def quiet_loading():
    """Without transformers' and diffusers' weight-loading and -saving progress bars ("Loading weights: 100%|
    36/36", "Writing model shards"): our models are local and load or save in milliseconds. Uses the libraries'
    documented switches (``transformers.utils.logging.disable_progress_bar``,
    ``diffusers.utils.logging.disable_progress_bar``) and restores the previous state afterwards, huggingface_hub's
    bars included (transformers' switch flips those too)."""
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as d_log
    from transformers.utils import logging as t_log

    t_on, d_on, hub_off = t_log.is_progress_bar_enabled(), d_log.is_progress_bar_enabled(), \
        hub.are_progress_bars_disabled()
    t_log.disable_progress_bar()
    d_log.disable_progress_bar()
    try:
        yield
    finally:
        if t_on:
            t_log.enable_progress_bar()
        if d_on:
            d_log.enable_progress_bar()
        if hub_off != hub.are_progress_bars_disabled():
            (hub.disable_progress_bars if hub_off else hub.enable_progress_bars)()


# --------------------------------------------------------------------------- model dirs


def _arch_root() -> Path:
    from spo_fast.core.config import configs_dir

    return configs_dir() / "arch"


def _arch_names() -> list[str]:
    """Packaged architectures: diffusion pipelines (a ``unet/`` folder) and preference models (a CLIP
    ``config.json`` at the top: ``spm_vit_h14``, PickScore's size, and ``tiny_spm``)."""
    return sorted(p.name for p in _arch_root().iterdir() if (p / "unet").is_dir() or (p / "config.json").is_file())


def _spm_arch_dirs(arch_root: Path) -> list[Path]:
    """The preference-model architecture dirs under ``arch_root`` (a CLIPModel config.json, tokenizer beside it)."""
    return sorted(p for p in arch_root.iterdir() if (p / "config.json").is_file())


def toyworld_assets() -> Path:
    """The packaged toy-world weights (``spo_fast/toyworld/assets``)."""
    return Path(str(resources.files("spo_fast.toyworld") / "assets"))


def resolve_model_path(path: str) -> Path:
    """``"arch:<name>"`` -> the packaged ``configs/arch/<name>``; ``"toyworld:<name>"`` -> the packaged
    toy-world model ``spo_fast/toyworld/assets/<name>``; anything else -> ``Path(path)``."""
    path = str(path)
    if path.startswith(TOYWORLD_PREFIX):
        name, root = path[len(TOYWORLD_PREFIX):], toyworld_assets()
        names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if name not in names:
            raise ModelDirError(f"unknown toy-world model {path!r}; available: "
                                f"{', '.join(TOYWORLD_PREFIX + n for n in names) or 'none (run python -m spo_fast.toyworld build)'}")
        return root / name
    if not path.startswith(ARCH_PREFIX):
        return Path(path).expanduser()
    name = path[len(ARCH_PREFIX):]
    names = _arch_names()
    if name not in names:
        available = ", ".join(ARCH_PREFIX + n for n in names)
        raise ModelDirError(f"unknown architecture {path!r}; available: {available}")
    return _arch_root() / name


def _required_files(sub: str) -> tuple[tuple[str, ...], ...]:
    """Alternatives of file sets one of which ``sub/`` must hold."""
    if sub.startswith("tokenizer"):
        return (("vocab.json", "merges.txt"), ("tokenizer.json",))
    return (("scheduler_config.json",),) if sub == "scheduler" else (("config.json",),)


def check_model_dir(path: Path, family: str, init: str) -> None:
    """Fail fast, before building anything, if ``path`` is not a usable ``family`` model directory.

    Checks: the directory and the family's subfolders exist, each holds its config files, every
    ``*.json`` in them parses and, for ``init="pretrained"``, the networks have weights files that are complete
    (``spo_fast.core.errors.check_weights_file``: their headers only). Whether the weights are the networks' own is
    checked as they load (``load_components``).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if init not in INITS:
        raise ValueError(f"unknown model init {init!r}; expected one of {INITS}")
    path = Path(path)
    subs = _SUBFOLDERS[family]
    layout = f"a {family} diffusers directory ({', '.join(s + '/' for s in subs)})"
    fix = (f"Point model.path (--model on the other commands) at {layout}, or use model.init=random with "
           f"model.path={ARCH_PREFIX}{family}.")
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ModelDirError(f"model directory {path} {what}. {fix}")
    if is_pixel_space(path):
        subs = tuple(sub for sub in subs if sub != "vae")
    for sub in subs:
        d = path / sub
        if not d.is_dir():
            raise ModelDirError(f"{d} is missing: expected {layout}. {fix}")
        options = _required_files(sub)
        if not any(all((d / f).is_file() for f in files) for files in options):
            want = " or ".join("+".join(files) for files in options)
            raise ModelDirError(f"{d} lacks {want}: expected {layout}. {fix}")
        for f in sorted(d.glob("*.json")):
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelDirError(f"{f} is not valid JSON: {e}") from e
        has_weights = any(d.glob("*.safetensors")) or any(d.glob("*.bin"))
        if init == "pretrained" and sub in _NETWORKS and not has_weights:
            raise ModelDirError(
                f"{d} has no weights (*.safetensors or *.bin) but model.init=pretrained. Point "
                f"model.path at a directory with weights, or use model.init=random."
            )
        if init == "pretrained" and sub in _NETWORKS:
            check_weights_dir(d, f"{sub} weights")  # truncated or not a weights file: headers only


def is_pixel_space(path: Path) -> bool:
    """A directory without ``vae/`` whose UNet takes 3 channels: the model denoises RGB pixels."""
    cfg = Path(path) / "unet" / "config.json"
    if (Path(path) / "vae").exists() or not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("in_channels") == 3
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# --------------------------------------------------------------------------- components


@dataclass
class Components:
    """The networks, tokenizers and noise scheduler of one SD 1.5 / SDXL model."""

    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None  # None: a pixel-space model (latents are RGB images in [-1, 1])
    text_encoders: list  # [CLIPTextModel] (sd15) or [CLIPTextModel, CLIPTextModelWithProjection] (sdxl)
    tokenizers: list  # one CLIPTokenizer per text encoder
    scheduler: DDIMScheduler
    force_zeros_for_empty_prompt: bool = False
    """SDXL: an empty negative prompt is all zeros, not the encoded "" (the pipeline's model_index.json option,
    True by default in diffusers' SDXL pipeline); SD1.5 has no such option."""
    vae_autocast: bool = True
    """False: the VAE decodes and encodes in its own dtype with autocast off (``model.vae_dtype`` set explicitly);
    True: under whatever autocast the caller runs (the default)."""
    decode_batch: int = 0
    """Latents per VAE decoder call (``model.vae_decode_batch``); 0 = all at once."""

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for the real VAEs, 1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the UNet's native latent."""
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)


def load_components(path: str, family: str, init: str = "pretrained", seed: int = 0,
                    device: torch.device | str | None = None) -> Components:
    """Load (``init="pretrained"``) or randomly initialise (``init="random"``, seeded) a model.

    The scheduler is always a ``DDIMScheduler`` built from the directory's scheduler config.
    Every network comes back in fp32, ``eval()`` mode and frozen (``requires_grad_(False)``).
    ``device`` (random init only): build the networks directly there. On a GPU this takes well under a second
    for SD1.5's or SDXL's billion-odd parameters, where the host's random init takes tens of seconds (it is what
    the end-to-end benchmarks and their ablation pay per configuration); the values then come from that device's
    generator, so a CUDA init and a CPU init of one seed differ. The global RNGs are left untouched either way.
    """
    root = resolve_model_path(path)
    check_model_dir(root, family, init)
    pixel = is_pixel_space(root)
    encoders = _TEXT_ENCODERS[family]
    if init == "random":
        dev = torch.device(device if device is not None else "cpu")
        with random_init(dev, seed):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
            vae = None if pixel else AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
            text_encoders = [cls(CLIPTextConfig.from_pretrained(root / e)) for e, _, cls in encoders]
    else:
        # Explicit fp32: transformers 5 defaults to dtype="auto" (the checkpoint's, often fp16).
        kw = {"local_files_only": True, "torch_dtype": torch.float32}
        with quiet_loading():
            unet = load_checked(UNet2DConditionModel, root / "unet", "unet", **kw)
            vae = None if pixel else load_checked(AutoencoderKL, root / "vae", "vae", **kw)
            text_encoders = [load_checked(cls, root / enc, enc, local_files_only=True, dtype=torch.float32)
                             for enc, _, cls in encoders]
    tokenizers = [CLIPTokenizer.from_pretrained(root / tok) for _, tok, _ in encoders]
    for (enc_name, tok_name, _), enc, tok in zip(encoders, text_encoders, tokenizers):
        if len(tok) > enc.config.vocab_size:
            raise ModelDirError(
                f"{root / tok_name} has {len(tok)} tokens but {root / enc_name} embeds only "
                f"vocab_size={enc.config.vocab_size}"
            )
    sched_cfg = dict(DDIMScheduler.load_config(root / "scheduler"))
    sched_cfg.setdefault("clip_sample", False)  # DDIM defaults to clipping x0, wrong for latents
    for module in (unet, *([vae] if vae is not None else []), *text_encoders):
        module.eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_config(sched_cfg)
    return Components(family, unet, vae, text_encoders, tokenizers, scheduler, force_zeros_for_empty_prompt(root, family))


def load_checked(cls, directory: Path, what: str, **kw):
    """``cls.from_pretrained(directory)``, failing with a ModelDirError / WeightsFileError naming the directory when
    its weights cannot be read or are not this network's (diffusers and transformers would initialise missing
    weights randomly and carry on). Their own missing-weights warnings are silenced: the check reports them."""
    from diffusers.utils import logging as d_log
    from transformers.utils import logging as t_log

    levels = t_log.get_verbosity(), d_log.get_verbosity()
    t_log.set_verbosity_error()
    d_log.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(directory, output_loading_info=True, **kw)
    except (OSError, RuntimeError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        first = " ".join(str(e).split())[:300]
        raise ModelDirError(f"{what} weights in {directory} could not be loaded ({type(e).__name__}: {first}); check "
                            "that the directory's config.json and weights come from the same model, or re-download "
                            "them") from e
    finally:
        t_log.set_verbosity(levels[0])
        d_log.set_verbosity(levels[1])
    check_loading_info(info, directory, what)
    return model


@contextlib.contextmanager
def random_init(device: torch.device, seed: int):
    """Modules built inside are created on ``device`` from its generator seeded with ``seed``; the global RNG
    state of the host (and of ``device`` when it is a GPU) is restored afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        yield


def force_zeros_for_empty_prompt(root: Path, family: str) -> bool:
    """SDXL: ``force_zeros_for_empty_prompt`` of the directory's model_index.json (diffusers' default, True, when
    the file or the key is absent); always False for SD1.5."""
    if family != "sdxl":
        return False
    index = Path(root) / "model_index.json"
    try:
        return bool(json.loads(index.read_text(encoding="utf-8")).get("force_zeros_for_empty_prompt", True))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return True


def native_resolution(root: Path) -> tuple[int, int]:
    """(image resolution in pixels, pixels per latent cell) read from a model directory's config files, without
    building anything: the UNet's sample_size times the VAE factor (1 in pixel space)."""
    root = Path(root)
    size = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8"))["sample_size"]
    vae = root / "vae" / "config.json"
    factor = 2 ** (len(json.loads(vae.read_text(encoding="utf-8"))["block_out_channels"]) - 1) if vae.is_file() else 1
    return size * factor, factor


def _vae_context(comp: Components, x: torch.Tensor):
    """Autocast off inside the VAE when it runs in its own dtype (``Components.vae_autocast``)."""
    return contextlib.nullcontext() if comp.vae_autocast else torch.autocast(x.device.type, enabled=False)


def decode_latents(comp: Components, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Latents (N, C, h, w) -> images (N, 3, H, W), fp32 (identity in pixel space), clamped to [-1, 1] unless
    ``clamp`` is false: the rollout scores the decoder's raw output, as the official SPO pipeline does, and each
    scorer clamps where its preprocessing says (a converted official SPM: after resizing; ``reward.spm``)."""
    if comp.vae is None:
        x = latents.float()
    else:
        z = latents.to(comp.vae.dtype) / comp.vae.config.scaling_factor
        n = comp.decode_batch or len(z)
        with _vae_context(comp, z):
            x = torch.cat([comp.vae.decode(z[i:i + n]).sample for i in range(0, len(z), n)]).float()
    return x.clamp(-1, 1) if clamp else x


def encode_images(comp: Components, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> latents (the posterior mean, scaled; identity in pixel space)."""
    if comp.vae is None:
        return images.float()
    with _vae_context(comp, images):
        z = comp.vae.encode(images.to(comp.vae.dtype)).latent_dist.mean
    return z.float() * comp.vae.config.scaling_factor


# --------------------------------------------------------------------------- speed options

ATTENTION_PACKAGES = {"xformers": "xformers", "flash_attn": "flash-attn"}


def check_attention(backend: str, cuda: bool) -> None:
    """Fail fast (before any model is built) when ``train.attention=backend`` cannot run here."""
    if backend == "sdpa":
        return
    if backend not in ATTENTION_PACKAGES:
        raise ConfigError(f"train.attention={backend!r} is not known; accepted: sdpa, {', '.join(ATTENTION_PACKAGES)}")
    import importlib.util

    module, package = backend, ATTENTION_PACKAGES[backend]
    missing = [why for why, bad in ((f"the {package} package is not installed (pip install {package})",
                                     importlib.util.find_spec(module) is None),
                                    ("there is no CUDA device (it has GPU kernels only)", not cuda)) if bad]
    if missing:
        raise ConfigError(f"train.attention={backend} cannot run here: {' and '.join(missing)}; use "
                          "train.attention=sdpa (PyTorch's scaled_dot_product_attention, which picks a flash kernel "
                          "itself on CUDA for fp16/bf16)")


class FlashAttnProcessor:
    """A diffusers attention processor that calls flash-attn's ``flash_attn_func`` on (B, L, heads, head_dim)
    q/k/v: the UNet's self- and cross-attention (3-D hidden states, no mask, no group or spatial norm), which is
    every attention of the SD1.5/SDXL UNet. fp16/bf16 only, as flash-attn; an fp32 call (a UNet run without
    mixed precision) goes through SDPA. ``attn_fn`` replaces flash-attn (the tests check the reshapes on CPU
    with an SDPA stand-in of the same (B, L, H, D) signature)."""

    def __init__(self, attn_fn=None):
        if attn_fn is None:
            from flash_attn import flash_attn_func

            attn_fn = flash_attn_func
        self.attn_fn = attn_fn

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None \
                or hidden_states.ndim != 3:
            raise ValueError("FlashAttnProcessor handles unmasked attention on (B, L, C) hidden states without group "
                             "or spatial norm (the SD UNet's); use train.attention=sdpa for this model")
        residual = hidden_states
        context = hidden_states
        if encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross \
                else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, h = q.shape[0], attn.heads
        d = k.shape[-1] // h
        q, k, v = (x.view(b, -1, h, d) for x in (q, k, v))  # (B, L, H, D)
        if attn.norm_q is not None or attn.norm_k is not None:
            raise ValueError("FlashAttnProcessor does not apply q/k norms; use train.attention=sdpa for this model")
        if q.dtype in (torch.float16, torch.bfloat16):
            out = self.attn_fn(q, k, v, dropout_p=0.0, softmax_scale=attn.scale, causal=False)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 scale=attn.scale).transpose(1, 2)
        out = attn.to_out[1](attn.to_out[0](out.reshape(b, -1, h * d).to(q.dtype)))  # projection, dropout
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def set_attention(unet: torch.nn.Module, backend: str) -> None:
    """``train.attention`` on the UNet (``check_attention`` has ruled out what cannot run): ``sdpa`` keeps
    diffusers' default processor (SDPA), ``xformers`` installs diffusers' xformers processor, ``flash_attn``
    ``FlashAttnProcessor``."""
    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif backend == "flash_attn":
        unet.set_attn_processor(FlashAttnProcessor())


# --------------------------------------------------------------------------- conditioning


@dataclass
class Conditioning:
    """UNet text conditioning for a batch of B prompts (every field is batched along dim 0)."""

    embeds: torch.Tensor  # (B, L, D) encoder_hidden_states
    pooled: torch.Tensor | None = None  # (B, P) SDXL text_embeds
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL add_time_ids

    def __post_init__(self):
        if (self.pooled is None) != (self.time_ids is None):
            raise ValueError("Conditioning needs both pooled and time_ids (SDXL) or neither (SD 1.5)")

    def _map(self, fn) -> Conditioning:
        """Apply ``fn`` to every non-None field."""
        values = (getattr(self, f.name) for f in fields(self))
        return Conditioning(*(None if v is None else fn(v) for v in values))

    def added_cond_kwargs(self) -> dict | None:
        """SDXL's ``{"text_embeds": (B, P), "time_ids": (B, 6)}``; None for SD 1.5."""
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}

    def __getitem__(self, idx) -> Conditioning:
        """Select rows along dim 0 (slice, index tensor/list; an int keeps the batch dim: B=1)."""
        if isinstance(idx, int):
            idx = [idx]
        return self._map(lambda v: v[idx])

    def repeat_interleave(self, n: int) -> Conditioning:
        """(B, ...) -> (B * n, ...), each row repeated n times in place."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch dim."""
        columns = zip(*([getattr(c, f.name) for f in fields(Conditioning)] for c in items))
        return Conditioning(*(None if col[0] is None else torch.cat(col) for col in columns))

    def to(self, device=None, dtype=None) -> Conditioning:
        """Move every field to ``device``; ``dtype`` applies to floating fields only."""
        return self._map(lambda v: v.to(device, dtype if v.is_floating_point() else None))

    def __len__(self) -> int:
        return self.embeds.shape[0]


@torch.no_grad()
def encode_prompts(comp: Components, prompts: list[str], device, resolution: int) -> Conditioning:
    """Encode B prompts with every text encoder (already on ``device``).

    SD 1.5: embeds = last hidden state (B, 77, 768). SDXL: embeds = the penultimate hidden states
    of both encoders concatenated on features (B, 77, 768 + 1280), pooled = text_encoder_2's
    projected ``text_embeds`` (B, 1280), time_ids = [res, res, 0, 0, res, res] per prompt (B, 6).
    """
    sdxl = comp.family == "sdxl"
    hidden = []
    for tok, enc in zip(comp.tokenizers, comp.text_encoders):
        batch = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = enc(batch.input_ids.to(device), output_hidden_states=sdxl)
        hidden.append(out.hidden_states[-2] if sdxl else out.last_hidden_state)
    embeds = torch.cat(hidden, dim=-1)
    if not sdxl:
        return Conditioning(embeds)
    r = resolution
    time_ids = torch.tensor([r, r, 0, 0, r, r], dtype=embeds.dtype, device=device)
    # ``out`` is text_encoder_2's (CLIPTextModelWithProjection) output: its projected pooled state.
    return Conditioning(embeds, out.text_embeds, time_ids.repeat(len(prompts), 1))


@torch.no_grad()
def encode_negative(comp: Components, negative_prompt: str, n: int, device, resolution: int,
                    zeros_for_empty: bool | None = None) -> Conditioning:
    """The unconditional branch of classifier-free guidance for n samples: the encoded negative prompt, or, for an
    SDXL pipeline with ``force_zeros_for_empty_prompt`` and an empty negative prompt, zeros for the embeddings and
    the pooled embedding (the time ids stay), as diffusers' SDXL pipeline and the official SPO code do.
    ``zeros_for_empty=False``: the encoded "" whatever the pipeline says (Diffusion-DPO's dropped captions)."""
    cond = encode_prompts(comp, [negative_prompt] * n, device, resolution)
    zeros = comp.force_zeros_for_empty_prompt if zeros_for_empty is None else zeros_for_empty
    if negative_prompt or not zeros:
        return cond
    return Conditioning(torch.zeros_like(cond.embeds), None if cond.pooled is None else torch.zeros_like(cond.pooled),
                        cond.time_ids)


def unet_forward(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Noise prediction (N, C, H, W) for latents x (N, C, H, W) at timestep t (scalar or (N,))."""
    added = cond.added_cond_kwargs()
    return unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable character map; printable bytes map to themselves."""
    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    keep = [b for lo, hi in ranges for b in range(ord(lo), ord(hi) + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word's symbols: repeatedly merge every occurrence of the best pair."""
    while len(symbols) > 1:
        pair = min(itertools.pairwise(symbols), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def write_clip_tokenizer(out_dir, words, max_length: int = 77) -> int:
    """Write a CLIP BPE tokenizer whose vocabulary holds every byte plus each of ``words`` as one token.

    Ids: the 256 byte characters, the same with ``</w>``, one token per merge (in merge order),
    then ``<|startoftext|>`` and ``<|endoftext|>`` (last, as in CLIP). Merges are added word by
    word until the word tokenizes to a single token; appending merges never changes how earlier
    words tokenize. Text outside ``words`` falls back to shorter pieces, down to bytes.
    Returns the vocabulary size.
    """
    byte_map = _bytes_to_unicode()
    vocab = [*byte_map.values(), *(c + _EOW for c in byte_map.values())]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not (word.isalpha() and word == word.lower()):
            raise ValueError(f"tokenizer words must be lowercase letters only, got {word!r}")
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += _EOW
        while len(pieces := _bpe(symbols, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.append(pieces[0] + pieces[1])
    vocab += [_BOS, _EOS]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token_ids = {tok: i for i, tok in enumerate(vocab)}
    vocab_text = jsonio.dumps(token_ids, ensure_ascii=False, indent=0)
    (out / "vocab.json").write_text(vocab_text + "\n", encoding="utf-8")
    merges = [f"{a} {b}" for a, b in ranks]  # dicts keep insertion (= rank) order
    (out / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    specials = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, **specials}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (out / name).write_text(jsonio.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return len(vocab)


def write_tokenizers(arch_root: Path | None = None) -> int:
    """Regenerate ``tokenizer*/`` of every ``configs/arch/*`` pipeline dir, and the tokenizer files beside the
    config.json of every preference-model dir (``spm_vit_h14``, ``tiny_spm``), from ``words.txt``.

    Also syncs each text encoder config (for a preference model: its ``text_config``): bos/eos/pad token ids,
    and ``vocab_size`` of the ``tiny_*`` archs (real archs keep CLIP's 49408). Returns the vocabulary size.
    """
    arch_root = Path(arch_root) if arch_root is not None else _arch_root()
    lines = (arch_root / "words.txt").read_text(encoding="utf-8").splitlines()
    words = [w.strip() for w in lines if w.strip() and not w.startswith("#")]

    def sync_ids(cfg: dict, size: int, tiny: bool) -> dict:
        cfg.update(bos_token_id=size - 2, eos_token_id=size - 1, pad_token_id=size - 1)
        cfg["vocab_size"] = size if tiny else _REAL_CLIP_VOCAB
        return cfg

    size = 0
    for arch in sorted(p for p in arch_root.iterdir() if (p / "unet").is_dir()):
        for enc_dir in sorted(arch.glob("text_encoder*")):
            tok_dir = arch / enc_dir.name.replace("text_encoder", "tokenizer")
            shutil.rmtree(tok_dir, ignore_errors=True)
            size = write_clip_tokenizer(tok_dir, words)
            cfg_file = enc_dir / "config.json"
            cfg = sync_ids(json.loads(cfg_file.read_text(encoding="utf-8")), size, arch.name.startswith("tiny_"))
            cfg_file.write_text(jsonio.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for arch in _spm_arch_dirs(arch_root):  # a CLIPModel: the tokenizer files sit beside its config.json
        size = write_clip_tokenizer(arch, words)
        cfg_file = arch / "config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        sync_ids(cfg["text_config"], size, arch.name.startswith("tiny_"))
        cfg_file.write_text(jsonio.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return size


def main(argv: list[str] | None = None) -> None:
    """``python -m spo_fast.diffusion.models write-tokenizers [--arch-root DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m spo_fast.diffusion.models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("write-tokenizers", help="regenerate configs/arch/*/tokenizer*/ from words.txt")
    cmd.add_argument("--arch-root", type=Path, help="arch directory (default: the packaged one)")
    args = parser.parse_args(argv)
    size = write_tokenizers(args.arch_root)
    print(f"wrote tokenizers with {size} tokens under {args.arch_root or _arch_root()}")


if __name__ == "__main__":
    main()
