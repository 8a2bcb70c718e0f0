"""On-disk cache of VAE latents and text embeddings of a ``PairDataset``: after it is built, no
epoch decodes a JPEG or runs the VAE or a text encoder.

Decisions:

- Built in one pass over the data *before* training. That pass also checks every image before
  the first step: a corrupt image fails the run now (``data.bad_rows=error``, naming file and
  row) or is left out and counted (``skip``), not hours into training.
- One chunk file per block (= shard, row group) of the dataset, written to ``NAME.tmp`` and then
  ``os.replace``d: a killed build leaves whole chunks only, and the next ``open`` builds the
  missing ones. With several processes chunk c is built by rank ``c % world_size``.
- Latents and text embeddings are stored in fp16: half the disk (SD 1.5 at 512 px, 1M pairs:
  2 x 4x64x64 latents per pair, 64 GB instead of 128) at a 2^-11 relative rounding (its effect on
  training has not been measured; the tests compare cached runs with each other only). Loaded batches come back in fp32.
- Text is encoded once per unique caption of a chunk (SD 1.5: 77x768 fp16 = 118 KB each).

Chunk file ``chunk_NNNNNN.safetensors`` (NNNNNN = block), m = the block's pairs minus skipped ones:
``rows`` (m,) int64 usable-pair indices, ascending; ``latents`` (m, 2, C, h, w) fp16, [:, 0] = win,
[:, 1] = lose; ``label`` (m,) fp32 label of the win image; ``caption_index`` (m,) int64 into the
chunk's unique captions; ``text.<name>`` (U, ...) fp16, one per ``encode_text`` output. Metadata:
``block`` and ``skipped`` (rows left out as bad images). A chunk whose every row was skipped holds
only ``rows``, ``label`` and ``caption_index``, all empty.
``manifest.json`` holds the cache key (written before the build), and once complete ``skipped``.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from spo_fast.core import jsonio
from spo_fast.core.config import flatten
from spo_fast.core.errors import check_writable_dir
from spo_fast.data.pairs import PairDataset, PairsError

if TYPE_CHECKING:
    from spo_fast.diffusion.models import Components

FORMAT = 1  # chunk layout version, part of the key
MANIFEST = "manifest.json"
_OPEN_CHUNKS = 8  # memory-mapped chunk files kept open by load()
_WEIGHTS = (".safetensors", ".bin")


class CacheError(PairsError):
    """A latent cache directory is unusable: built for other inputs, unwritable or incomplete."""


@dataclass
class CachedBatch:
    """Cached pairs; rows skipped as bad images have ok=False and zeros everywhere."""

    latents_win: torch.Tensor  # (n, C, h, w) fp32
    latents_lose: torch.Tensor  # (n, C, h, w) fp32
    text: dict[str, torch.Tensor]  # name -> (n, ...) fp32, e.g. embeds (n, 77, 768)
    label: torch.Tensor  # (n,) fp32: label of the win image, 1.0 or 0.5 (a tie)
    ok: torch.Tensor  # (n,) bool


@dataclass
class _Chunk:
    file: object  # safetensors safe_open handle (memory-mapped)
    rows: np.ndarray  # (m,) int64, ascending
    label: torch.Tensor  # (m,)
    caption_index: torch.Tensor  # (m,) int64


def cache_key(model_id: dict, resolution: int, dataset: PairDataset) -> dict:
    """The JSON-able identity of a cache: chunk format, model (``encoders_for``), resolution, the
    dataset's fingerprint and the storage dtype. A cache directory serves one key only."""
    return {"format": FORMAT, "model": model_id, "resolution": int(resolution), "data": dataset.fingerprint(),
            "dtype": "float16"}


def encoders_for(comp: Components, model_path: str, resolution: int, device) -> tuple[dict, Callable, Callable]:
    """(model_id, encode_images, encode_text) for ``LatentCache.open`` from loaded components whose
    VAE and text encoders are on ``device``.

    model_id: the resolved model directory, family, encoder dtypes, and name, size and mtime_ns of
    each weights file in unet/, vae/, text_encoder*/. encode_images: (n, 3, H, W) in [-1, 1] ->
    (n, C, h, w) latents (identity for a pixel-space model). encode_text: captions -> {"embeds":
    (n, L, D)}, plus "pooled" (n, P) for SDXL; SDXL time_ids are not cached (they follow from the
    resolution). Raises CacheError (a ValueError) when ``resolution`` is not a positive multiple of the VAE's
    scale.
    """
    from spo_fast.diffusion.models import (  # diffusers: imported on use
        encode_images,
        encode_prompts,
        resolve_model_path,
    )

    scale = comp.vae_scale_factor
    if resolution < 1 or resolution % scale:
        raise CacheError(f"resolution {resolution} must be a positive multiple of {scale} (the VAE's scale factor); "
                         f"give a multiple of {scale}")
    root = resolve_model_path(model_path).resolve()
    files = {}
    for sub in sorted(p for p in root.iterdir() if p.name in ("unet", "vae") or p.name.startswith("text_encoder")):
        for f in sorted(p for p in sub.iterdir() if p.suffix in _WEIGHTS):
            st = f.stat()
            files[f"{sub.name}/{f.name}"] = [st.st_size, st.st_mtime_ns]
    dtypes = {"vae": None if comp.vae is None else str(comp.vae.dtype),
              "text_encoders": [str(enc.dtype) for enc in comp.text_encoders]}
    model_id = {"path": str(root), "family": comp.family, "dtypes": dtypes, "files": files}

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return encode_images(comp, images.to(device))

    @torch.no_grad()
    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        cond = encode_prompts(comp, captions, device, resolution)
        return {"embeds": cond.embeds} if cond.pooled is None else {"embeds": cond.embeds, "pooled": cond.pooled}

    return model_id, encode, encode_text


def check_cache_dir(cache_dir, name: str = "data.cache_dir") -> None:
    """The cheap checks of a cache directory, before any model is built: when it holds a manifest, the manifest
    parses (whether its key matches is checked by ``LatentCache.open``, which needs the model); otherwise the
    directory can be created and written. Raises CacheError."""
    path = Path(cache_dir).expanduser()
    if (path / MANIFEST).is_file():
        try:
            json.loads((path / MANIFEST).read_text(encoding="utf-8"))["key"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{path / MANIFEST} is not a cache manifest ({type(e).__name__}: {e}); use another "
                             f"{name}, or delete it to rebuild") from e
        return
    check_writable_dir(path, name, CacheError)


def _wait_for_chunks(path: Path, n_blocks: int, progress: bool, poll_s: float = 2.0) -> None:
    """Block until every chunk file of the cache exists (the other processes are building theirs)."""
    import time

    from tqdm.auto import tqdm

    missing = [b for b in range(n_blocks) if not _chunk_path(path, b).is_file()]
    with tqdm(total=n_blocks, initial=n_blocks - len(missing), desc="waiting for the other processes' cache chunks",
              disable=not progress or not missing) as bar:
        while missing:
            time.sleep(poll_s)
            still = [b for b in missing if not _chunk_path(path, b).is_file()]
            bar.update(len(missing) - len(still))
            missing = still


def _chunk_path(root: Path, block: int) -> Path:
    return root / f"chunk_{block:06d}.safetensors"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(jsonio.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class LatentCache:
    """Cached latents and text embeddings of every usable pair of a dataset; build with ``open``."""

    def __init__(self, path: Path, dataset: PairDataset):
        """Attach to a complete cache (every chunk present); use ``open`` to build one."""
        self.path, self.dataset = path, dataset
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()
        missing = [b for b in range(dataset.num_blocks) if not _chunk_path(path, b).is_file()]
        if missing:
            raise CacheError(f"data.cache_dir={path}: {len(missing)} of {dataset.num_blocks} chunk files are missing "
                             f"after the build (first: {_chunk_path(path, missing[0]).name}); a process of the build "
                             "failed or was killed: run again to complete the cache")
        self.skipped = 0
        self._shapes: dict[str, tuple[int, ...]] = {}  # "latents" -> (2, C, h, w), "text.<name>" -> (...)
        for b in range(dataset.num_blocks):
            f = self._open_file(b)
            self.skipped += int(f.metadata()["skipped"])
            names = f.keys()
            if not self._shapes and "latents" in names:
                self._shapes = {k: tuple(f.get_slice(k).get_shape()[1:]) for k in names
                                if k == "latents" or k.startswith("text.")}
        if not self._shapes:
            raise CacheError(f"data.cache_dir={path}: every one of the {len(dataset)} pairs of data.pairs="
                             f"{dataset.spec!r} was skipped as a bad image; check the images")

    @classmethod
    def open(cls, cache_dir, key: dict, dataset: PairDataset, encode_images: Callable, encode_text: Callable,
             batch_size: int = 16, progress: bool = True, world_size: int = 1, rank: int = 0,
             barrier: Callable[[], None] | None = None) -> LatentCache:
        """Open the cache of ``dataset`` in ``cache_dir``, first building the chunks that are missing.

        ``key``: from ``cache_key`` (it carries the resolution). ``encode_images``: (n, 3, H, W) in
        [-1, 1] -> (n, C, h, w); ``encode_text``: captions (n) -> {name: (n, ...)}; both are called
        with at most ``2 * batch_size`` images / ``batch_size`` captions. This process builds chunk
        c when c % world_size == rank, then (with a ``barrier``) polls until every chunk file exists and calls
        ``barrier()``. Raises CacheError when the directory
        holds a cache with another key, cannot be created or written, or misses chunks after the
        barrier; PairsError on a bad image with data.bad_rows=error (every process must then stop).
        """
        path = Path(cache_dir).expanduser()
        key = json.loads(jsonio.dumps(key))  # tuples -> lists, as the manifest will read back
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"data.cache_dir={path} cannot be created ({e}); give a writable directory") from e
        manifest = cls._check_manifest(path, key)
        todo = [b for b in range(dataset.num_blocks) if b % world_size == rank and not _chunk_path(path, b).is_file()]
        if (todo or (manifest is None and rank == 0)) and not os.access(path, os.W_OK):
            raise CacheError(f"data.cache_dir={path} is not writable and the cache is incomplete; make it "
                             "writable or use another data.cache_dir")
        try:
            if manifest is None and rank == 0:
                _write_json(path / MANIFEST, {"key": key, "complete": False})
            _build(path, key["resolution"], dataset, todo, encode_images, encode_text, batch_size, progress)
        except OSError as e:
            raise CacheError(f"data.cache_dir={path}: cannot write the cache ({e}); free space or use another "
                             "data.cache_dir") from e
        if world_size > 1 and barrier is not None:  # wait on the files first, not in a collective: an uneven
            _wait_for_chunks(path, dataset.num_blocks, progress)  # build would pass the collective's timeout
        if barrier is not None:
            barrier()
        cache = cls(path, dataset)
        if rank == 0 and not (manifest or {}).get("complete"):
            _write_json(path / MANIFEST, {"key": key, "complete": True, "pairs": len(dataset),
                                          "skipped": cache.skipped, "chunks": dataset.num_blocks})
        return cache

    @staticmethod
    def _check_manifest(path: Path, key: dict) -> dict | None:
        """The manifest in ``path`` (None if absent); raises CacheError when its key differs from ``key``."""
        file = path / MANIFEST
        if not file.is_file():
            return None
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
            old = manifest["key"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{file} is not a cache manifest ({type(e).__name__}: {e}); use another "
                             "data.cache_dir, or delete it to rebuild") from e
        if old != key:
            a, b = flatten(old), flatten(key)
            diffs = [f"{k}: {a.get(k, '(absent)')} (cache) vs {b.get(k, '(absent)')} (this run)"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
            raise CacheError(f"data.cache_dir={path} holds a cache built for other inputs: {'; '.join(diffs[:4])}"
                             f"{more}; use another data.cache_dir, or delete it to rebuild")
        return manifest

    def _open_file(self, block: int):
        file = _chunk_path(self.path, block)
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CacheError(f"{file} cannot be read ({e}); delete it and run again to rebuild it") from e

    def _chunk(self, block: int) -> _Chunk:
        if block in self._chunks:
            self._chunks.move_to_end(block)
        else:
            f = self._open_file(block)
            self._chunks[block] = _Chunk(f, f.get_tensor("rows").numpy(), f.get_tensor("label"),
                                         f.get_tensor("caption_index"))
            if len(self._chunks) > _OPEN_CHUNKS:
                self._chunks.popitem(last=False)
        return self._chunks[block]

    def load(self, indices: list[int]) -> CachedBatch:
        """Cached latents, text and labels of usable pairs ``indices`` (n,); no image decode and no
        encoder call. Raises IndexError on an index outside the dataset."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (n,)
        blocks = self.dataset.block_of(idx)
        n = len(idx)
        latents = torch.zeros(n, *self._shapes["latents"])  # (n, 2, C, h, w)
        text = {k[len("text."):]: torch.zeros(n, *s) for k, s in self._shapes.items() if k.startswith("text.")}
        label = torch.zeros(n)
        ok = torch.zeros(n, dtype=torch.bool)
        for i in range(n):
            chunk = self._chunk(int(blocks[i]))
            pos = int(np.searchsorted(chunk.rows, idx[i]))
            if pos == len(chunk.rows) or chunk.rows[pos] != idx[i]:
                continue  # skipped as a bad image
            latents[i] = chunk.file.get_slice("latents")[pos:pos + 1][0]
            c = int(chunk.caption_index[pos])
            for name, value in text.items():
                value[i] = chunk.file.get_slice("text." + name)[c:c + 1][0]
            label[i] = chunk.label[pos]
            ok[i] = True
        return CachedBatch(latents[:, 0].contiguous(), latents[:, 1].contiguous(), text, label, ok)


def _build(path: Path, resolution: int, dataset: PairDataset, blocks: list[int], encode_images: Callable,
           encode_text: Callable, batch_size: int, progress: bool) -> None:
    """Encode and write the chunk of each of ``blocks``."""
    from tqdm import tqdm

    total = sum(len(dataset.block_range(b)) for b in blocks)
    with tqdm(total=total, desc="caching latents", unit="pair", disable=not progress or not blocks) as bar:
        for b in blocks:
            tensors, skipped = _encode_block(dataset, b, resolution, encode_images, encode_text, batch_size, bar)
            final = _chunk_path(path, b)
            tmp = final.with_name(final.name + ".tmp")
            save_file(tensors, str(tmp), metadata={"block": str(b), "skipped": str(skipped)})
            os.replace(tmp, final)


@torch.no_grad()
def _encode_block(dataset: PairDataset, block: int, resolution: int, encode_images: Callable,
                  encode_text: Callable, batch_size: int, bar) -> tuple[dict[str, torch.Tensor], int]:
    """The chunk tensors of ``block`` and how many of its rows were skipped as bad images."""
    r = dataset.block_range(block)
    rows, latents, labels, captions = [], [], [], []
    for lo in range(r.start, r.stop, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, r.stop))
        batch = dataset.load(idx.tolist(), resolution)
        m = int(batch.ok.sum())
        if m:
            z = encode_images(torch.cat([batch.win[batch.ok], batch.lose[batch.ok]]))  # (2m, C, h, w)
            latents.append(torch.stack([z[:m], z[m:]], dim=1).to("cpu", torch.float16))  # (m, 2, C, h, w)
            rows.append(idx[batch.ok])
            labels.append(batch.label[batch.ok])
            captions += [c for c, good in zip(batch.captions, batch.ok.tolist()) if good]
        bar.update(len(idx))
    skipped = len(r) - len(captions)
    if not captions:
        empty = torch.zeros(0, dtype=torch.int64)
        return {"rows": empty, "label": torch.zeros(0), "caption_index": empty.clone()}, skipped
    unique = list(dict.fromkeys(captions))
    where = {c: i for i, c in enumerate(unique)}
    text: dict[str, list[torch.Tensor]] = {}
    for lo in range(0, len(unique), batch_size):
        for name, value in encode_text(unique[lo:lo + batch_size]).items():  # value (u, ...)
            text.setdefault(name, []).append(value.to("cpu", torch.float16))
    tensors = {"rows": torch.cat(rows), "latents": torch.cat(latents), "label": torch.cat(labels).float(),
               "caption_index": torch.tensor([where[c] for c in captions], dtype=torch.int64)}
    tensors.update({f"text.{name}": torch.cat(values).contiguous() for name, values in text.items()})
    return tensors, skipped
