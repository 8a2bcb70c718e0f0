"""The base model's half of an evaluation, reused across runs.

An evaluation (``spo_fast.evaluation.heldout.evaluate``) samples the base model and the trained model on the same
noise. The base's half does not depend on the training: every run that evaluates the same base with the same
protocol on the same kind of machine samples the same images and scores them the same, so the first such run stores
what the evaluation needs of them and later runs read it instead of sampling again (half of the evaluation's UNet
calls). What is stored: the reward of every (seed, prompt) image and its components, and the first seed's images
of the grid's prompts as the 8-bit pixels the grid shows.

**Exact, or not used.** An entry is found by two digests, both computed with the models and settings of the run at
hand:

- the **key**: the base UNet's and the VAE's weights (LoRA weights excluded: the base of a LoRA run is its frozen
  weights), the prompt embeddings of every evaluated prompt and of the negative prompt, the DDIM schedule, the seeds,
  the sampling settings, the batch size, the latent shape, the kernel backend, the autocast dtype, the UNet's
  attention processors, the reward's identity (``reward.cache_id``: a reward without one is never cached), the grid's
  prompts, torch's version and the entry format;
- the **fingerprint** of this machine's arithmetic: the bytes of the first denoising step of the first prompt chunk
  at the first seed, sampled now (a CPU with another instruction set, or another GPU, rounds differently; then its
  entry has another name and nothing is reused).

A hit returns exactly what sampling would have given, on the same machine kind; a miss samples as before and then
writes the entry. Entries live in ``$SPO_FAST_CACHE/base_eval`` (default ``$XDG_CACHE_HOME/spo_fast``, else
``~/.cache/spo_fast``); ``eval.base_cache=false`` (``spo_fast.evaluate --no-base-cache``) neither reads nor writes
them. An unreadable or mismatching entry is ignored (and replaced); an unwritable directory only costs the reuse.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from spo_fast.core import jsonio

FORMAT = 1


def cache_root() -> Path:
    """``$SPO_FAST_CACHE``, else ``$XDG_CACHE_HOME/spo_fast``, else ``~/.cache/spo_fast``."""
    if os.environ.get("SPO_FAST_CACHE"):
        return Path(os.environ["SPO_FAST_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "spo_fast"


class Digest:
    """sha256 over tensors (dtype, shape and bytes) and JSON-able values, in the order they are added."""

    def __init__(self):
        self.h = hashlib.sha256()

    def value(self, v) -> Digest:
        self.h.update(jsonio.dumps(v, sort_keys=True, default=str).encode())
        return self

    def tensor(self, t: torch.Tensor) -> Digest:
        t = t.detach().cpu().contiguous()
        self.value([str(t.dtype), list(t.shape)])
        self.h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return self

    def module(self, m: torch.nn.Module | None, skip: str = "lora_") -> Digest:
        if m is None:
            return self.value(None)
        for name, t in sorted(m.state_dict().items()):
            if skip not in name:
                self.value(name).tensor(t)
        return self

    def hex(self) -> str:
        return self.h.hexdigest()


@dataclasses.dataclass
class Entry:
    """What the evaluation needs of the base's images: (S, P) float64 rewards, their components (flat (S * P,)
    tensors), and the first seed's images of the grid's prompts as uint8 (n, 3, H, W), in the grid's order (which
    prompts those are is part of the key)."""

    rewards: torch.Tensor
    components: dict
    grid_pixels: torch.Tensor

    def grid_images(self) -> torch.Tensor:
        """The grid's images in [-1, 1]: ``grids.to_uint8`` turns them back into exactly the stored pixels."""
        return self.grid_pixels.float() / 127.5 - 1.0


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) images in [-1, 1] -> (n, 3, H, W) uint8, exactly as the grid draws them (``grids.to_uint8``)."""
    import numpy as np

    from spo_fast.evaluation.grids import to_uint8

    return torch.from_numpy(np.stack(to_uint8(images))).permute(0, 3, 1, 2).contiguous()


class BaseEvalCache:
    """Lookup and store of base-model evaluations (module docstring). ``lookup`` computes the key and the
    fingerprint with the run's base UNet; ``store`` writes the entry under the name they give."""

    def __init__(self, root: Path | None = None, log: Callable[[str], None] | None = None):
        self.dir = (root or cache_root()) / "base_eval"
        self.log = log or (lambda msg: print(f"[spo_fast] {msg}", file=sys.stderr, flush=True))
        self.name: str | None = None  # the entry of the last lookup

    def lookup(self, sample_first_step: Callable[[], torch.Tensor], key_parts: Digest) -> Entry | None:
        """The entry for ``key_parts`` (the protocol's digest, ``protocol_digest``) and this machine's fingerprint
        (the bytes of ``sample_first_step()``), or None. Remembers the entry's name for ``store``."""
        fingerprint = Digest().tensor(sample_first_step()).hex()
        self.name = f"{key_parts.hex()[:32]}-{fingerprint[:16]}.pt"
        path = self.dir / self.name
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if data.get("format") != FORMAT:
                return None
            return Entry(data["rewards"], data["components"], data["grid_pixels"])
        except Exception as e:  # noqa: BLE001 - a damaged entry is a miss, never a failed evaluation
            self.log(f"base evaluation cache: ignoring {path} ({type(e).__name__}: {e})")
            return None

    def store(self, entry: Entry) -> Path | None:
        """Write ``entry`` under the last lookup's name (atomically); None if the directory is not writable."""
        if self.name is None:
            raise RuntimeError("store() before lookup()")
        path = self.dir / self.name
        data = {"format": FORMAT, "rewards": entry.rewards, "components": entry.components,
                "grid_pixels": entry.grid_pixels, "torch": str(torch.__version__)}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save(data, buf)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, path)
            return path
        except OSError as e:
            self.log(f"base evaluation cache: could not write {path} ({e}); the next run samples the base again")
            return None


def protocol_digest(comp, unet, schedule, cond: list[torch.Tensor], settings: dict, reward_id: str) -> Digest:
    """The key's digest: the base UNet's and the VAE's weights, the prompt (and negative-prompt) embeddings
    ``cond``, the schedule, the UNet's attention processors, ``settings`` (prompts, seeds, sampling, batch size,
    latent shape, backend, autocast dtype, grid prompts), the reward's identity, torch's version and the format."""
    d = Digest().value({"format": FORMAT, "torch": torch.__version__, "reward": reward_id, **settings})
    d.module(unet).module(comp.vae)
    procs = getattr(unet, "attn_processors", {})
    d.value(sorted({type(p).__name__ for p in procs.values()}))
    for c in cond:
        d.tensor(c)
    for t in (schedule.alphas_cumprod, schedule.timesteps):
        d.tensor(t)
    return d.value([schedule.step_ratio, schedule.prediction_type])
