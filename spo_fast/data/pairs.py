"""Preference pairs in the Pick-a-Pic schema, streamed from local parquet shards.

A row is ``caption`` (string), ``jpg_0`` / ``jpg_1`` (encoded images, any format PIL reads) and
``label_0`` / ``label_1``: (1, 0) image 0 preferred, (0, 1) image 1 preferred, (0.5, 0.5) a tie.
Other columns are ignored.

``PairDataset`` indexes the usable rows from the label columns alone (column projection: opening
a 1M-pair dataset never reads an image) and reads images only for the rows a batch asks for. The
index is grouped in blocks, one per (shard, row group), and the epoch order keeps a block's rows
together, so a batch touches one or two row groups. The order is a pure function of (step, rank,
seed): resuming needs the step number only, no data-loader replay.
"""
from __future__ import annotations

import glob
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from spo_fast.core import jsonio
from spo_fast.core.errors import InputError

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
TIES = ("drop", "keep")
BAD_ROWS = ("error", "skip")
_LABELS = (0.0, 0.5, 1.0)
_VERIFY_BATCH = 16  # pairs decoded at once by verify(): 2 x 16 x 3 x 1024^2 fp32 = 400 MB at SDXL size
# (what the column must be, the arrow type tests that accept it)
_COLUMN_TYPES = {
    "caption": ("a string", (pa.types.is_string, pa.types.is_large_string)),
    "jpg_0": ("binary (encoded image bytes)", (pa.types.is_binary, pa.types.is_large_binary)),
    "jpg_1": ("binary (encoded image bytes)", (pa.types.is_binary, pa.types.is_large_binary)),
    "label_0": ("a number", (pa.types.is_floating, pa.types.is_integer)),
    "label_1": ("a number", (pa.types.is_floating, pa.types.is_integer)),
}


class PairsError(InputError):
    """A preference-pairs problem: a missing or non-parquet file, a schema, label or image error.

    The message names the file (and the 0-based row within that file) and the fix."""


@dataclass
class Pairs:
    """Every usable pair in memory, images still encoded (what the SPM trainer samples from)."""

    captions: list[str]
    jpg_0: list[bytes]
    jpg_1: list[bytes]
    label_0: torch.Tensor  # (N,) float32 in {0, 0.5, 1}
    sources: list[tuple[Path, int]] | None = None
    """(file, 0-based row within it) of each pair, for error messages (``load_all`` fills it)."""

    def __len__(self) -> int:
        return len(self.captions)

    def _where(self, i: int) -> str:
        return f"{self.sources[i][0]} row {self.sources[i][1]}" if self.sources is not None else f"pair {i}"

    def image(self, i: int, column: str, size: int) -> torch.Tensor:
        """``decode_image`` of pair ``i``'s ``column`` (jpg_0 / jpg_1); an undecodable image raises PairsError
        naming the file, row and column."""
        data = (self.jpg_0 if column == "jpg_0" else self.jpg_1)[i]
        try:
            if data is None:
                raise OSError("the value is null")
            return decode_image(data, size)
        except _IMAGE_ERRORS as e:
            raise _bad_image(self._where(i), column, e, _FIX_ALL) from e

    def check_images(self, progress: bool = False, desc: str = "checking images") -> None:
        """Decode every pair's images once, cheaply (``check_decodable``), and check that each caption is a
        string: a bad row raises PairsError naming file, row and column now, not in the middle of training. A
        progress bar when ``progress`` and the check takes more than two seconds."""
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self)), desc=desc, unit="pair", disable=not progress, delay=2.0, mininterval=1.0):
            if not isinstance(self.captions[i], str):
                raise _bad_caption(self._where(i), self.captions[i], _FIX_ALL)
            for column in ("jpg_0", "jpg_1"):
                data = (self.jpg_0 if column == "jpg_0" else self.jpg_1)[i]
                try:
                    check_decodable(data)
                except _IMAGE_ERRORS as e:
                    raise _bad_image(self._where(i), column, e, _FIX_ALL) from e


@dataclass
class PairBatch:
    """Decoded pairs; ``win`` is the preferred image (for a tie: win = jpg_0, lose = jpg_1)."""

    captions: list[str]
    win: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    lose: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    label: torch.Tensor  # (n,) float32: the label of ``win``, 1.0 or 0.5 (a tie)
    ok: torch.Tensor  # (n,) bool: False for a row skipped as a bad image (its images are zeros)


@dataclass(frozen=True)
class _Block:
    """The usable rows of one (shard, row group)."""

    shard: int
    row_group: int
    first_row: int  # file row of the row group's row 0
    rows: np.ndarray  # (k,) int64 file rows, ascending
    label_0: np.ndarray  # (k,) float64 in {0, 0.5, 1}


TOYWORLD_PAIRS = ("train", "heldout")


def resolve_pairs(spec: str, option: str = "data.pairs") -> str:
    """``toyworld:train`` / ``toyworld:heldout`` -> the toy world's shipped pairs file; anything else unchanged.
    ``option``: how the user gave ``spec`` (the config key, or a command's flag), named in errors."""
    if not spec.startswith("toyworld:"):
        return spec
    name = spec.split(":", 1)[1]
    if name not in TOYWORLD_PAIRS:
        raise PairsError(f"{option}={spec!r}: unknown toy-world pairs; accepted: "
                         f"{', '.join('toyworld:' + n for n in TOYWORLD_PAIRS)}, or a parquet file/directory/glob")
    from spo_fast.diffusion.models import toyworld_assets

    return str(toyworld_assets() / f"pairs_{name}.parquet")


def resolve_shards(spec: str, option: str = "data.pairs") -> list[Path]:
    """The parquet files of ``spec``: one file, every ``*.parquet`` in a directory (not recursive), the files a
    glob matches, sorted, or ``toyworld:train|heldout`` (the shipped toy pairs). Raises PairsError when nothing is
    found, naming ``option`` (the config key or flag ``spec`` came from)."""
    hint = "give a parquet file, a directory of parquet shards or a glob"
    spec = resolve_pairs(spec, option)
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not files:
            raise PairsError(f"{option}={spec!r}: the glob matches no file; {hint}")
        return files
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if p.is_file())
        if not files:
            raise PairsError(f"{option}={spec!r} is a directory without *.parquet files; {hint}")
        return files
    if not path.is_file():
        raise PairsError(f"{option}={spec!r} does not exist; {hint}")
    return [path]


_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad bytes


def _why(e: BaseException) -> str:
    """A short reason for an undecodable image (without PIL's object addresses)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL knows"
    return f"{type(e).__name__}: {e}"


_FIX_ALL = ("fix or remove the row (every row is used here; Diffusion-DPO training can skip such rows with "
            "data.bad_rows=skip)")
_FIX_SKIP = "fix or remove the row, or set data.bad_rows=skip to skip such rows"


def _bad_image(where: str, column: str, e: BaseException, fix: str) -> PairsError:
    return PairsError(f"{where}: {column} cannot be decoded as an image ({_why(e)}); {fix}")


def _bad_caption(where: str, caption, fix: str) -> PairsError:
    return PairsError(f"{where}: caption is {caption!r}, expected a string; {fix}")


def check_decodable(data: bytes | None) -> None:
    """Decode ``data`` as cheaply as PIL allows (JPEG: at 1/8 scale, which still reads every byte of the image, so
    truncation is found); raises what PIL raises (see ``decode_image``), OSError for a null value."""
    if data is None:
        raise OSError("the value is null")
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (1, 1))
    img.load()


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> (3, size, size) float32 in [-1, 1]: RGB, centre crop to a square,
    bicubic resize when needed. Raises what PIL raises on bad bytes (OSError, SyntaxError, ...)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if w != h:
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


class PairDataset:
    """The usable pairs of ``spec`` (see ``resolve_shards``), indexed 0..len-1 in file order.

    ``ties``: ``drop`` leaves 0.5/0.5 rows out, ``keep`` keeps them. ``bad_rows``: ``error`` raises
    PairsError on a row with invalid labels or an undecodable image, ``skip`` leaves it out and
    counts it in ``counts``. Raises PairsError on a bad argument, a file that is not parquet, a
    missing column or when no usable pair remains.
    """

    def __init__(self, spec: str, ties: str = "drop", bad_rows: str = "error", option: str = "data.pairs"):
        if ties not in TIES:
            raise PairsError(f"data.ties={ties!r}; accepted: {', '.join(TIES)}")
        if bad_rows not in BAD_ROWS:
            raise PairsError(f"data.bad_rows={bad_rows!r}; accepted: {', '.join(BAD_ROWS)}")
        self.spec, self.ties, self.bad_rows, self.option = spec, ties, bad_rows, option
        self.shards = resolve_shards(spec, option)
        self.counts = {"rows": 0, "ties_dropped": 0, "bad_labels_skipped": 0, "usable": 0, "bad_images_skipped": 0}
        self._blocks: list[_Block] = []
        for shard, path in enumerate(self.shards):
            self._index_shard(shard, path)
        self._starts = np.cumsum([0] + [len(b.rows) for b in self._blocks], dtype=np.int64)  # (blocks + 1,)
        self.counts["usable"] = int(self._starts[-1])
        if not self.counts["rows"]:
            if len(self.shards) == 1:
                what = f"{self.shards[0]} has no rows (an empty parquet file)"
            else:
                what = f"{option}={spec!r}: all {len(self.shards)} files have no rows (empty parquet files)"
            raise PairsError(f"{what}; give preference pairs with columns {', '.join(PAIR_COLUMNS)} and at least "
                             "one row")
        if not len(self):
            c = self.counts
            fix = "; set data.ties=keep to train on ties" if c["ties_dropped"] else ""
            raise PairsError(f"{option}={spec!r}: no usable pairs in {len(self.shards)} file(s): {c['rows']} rows, "
                             f"{c['ties_dropped']} ties dropped (data.ties={ties}), {c['bad_labels_skipped']} rows with "
                             f"invalid labels skipped{fix}")
        self._bad_images: set[int] = set()
        self.shuffle = "block"
        """Epoch order: ``block`` (rows shuffled within shuffled row groups) or ``global`` (see ``_order``)."""
        self._orders: dict[tuple, np.ndarray] = {}  # (seed, epoch, shuffle) -> (len,) order of the current epoch
        self._file: tuple[int, pq.ParquetFile] | None = None  # the open shard
        self._group: tuple[tuple[int, int], pa.Table] | None = None  # the last row group read

    def _index_shard(self, shard: int, path: Path) -> None:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise PairsError(f"{path} is not a readable parquet file ({e}); {self.option} must name parquet files "
                             f"with columns {', '.join(PAIR_COLUMNS)}") from e
        names = pf.schema_arrow.names
        missing = [c for c in PAIR_COLUMNS if c not in names]
        if missing:
            raise PairsError(f"{path} lacks column(s) {', '.join(missing)}; it has {', '.join(names)}; expected the "
                             f"Pick-a-Pic schema {', '.join(PAIR_COLUMNS)}")
        for col, (what, accepts) in _COLUMN_TYPES.items():
            kind = pf.schema_arrow.field(col).type
            if not any(test(kind) for test in accepts):
                raise PairsError(f"{path}: column {col} has type {kind}; expected {what}")
        first = 0
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=["label_0", "label_1"])
            l0, l1 = (table.column(c).cast(pa.float64()).to_numpy() for c in ("label_0", "label_1"))  # (k,), null: nan
            valid = np.isin(l0, _LABELS) & np.isin(l1, _LABELS) & (l0 + l1 == 1)
            if not valid.all() and self.bad_rows == "error":
                r = int(np.flatnonzero(~valid)[0])
                raise PairsError(f"{path} row {first + r}: label_0={l0[r]}, label_1={l1[r]} is not a preference; "
                                 "expected (1, 0): image 0 preferred, (0, 1): image 1 preferred or (0.5, 0.5): a tie; "
                                 "fix the row, or set data.bad_rows=skip to skip such rows")
            keep = valid & ~(l0 == 0.5) if self.ties == "drop" else valid
            self.counts["rows"] += len(l0)
            self.counts["bad_labels_skipped"] += int((~valid).sum())
            self.counts["ties_dropped"] += int((valid & ~keep).sum())
            if keep.any():
                self._blocks.append(_Block(shard, rg, first, np.flatnonzero(keep) + first, l0[keep]))
            first += len(l0)

    def __len__(self) -> int:
        return int(self._starts[-1])

    # ------------------------------------------------------------------ index
    def fingerprint(self) -> str:
        """sha256 hex of every shard's resolved path, size and mtime_ns plus ``ties`` and ``bad_rows``."""
        shards = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.shards]
        text = jsonio.dumps({"shards": shards, "ties": self.ties, "bad_rows": self.bad_rows})
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def num_blocks(self) -> int:
        """Blocks = (shard, row group)s that hold at least one usable pair."""
        return len(self._blocks)

    def block_range(self, block: int) -> range:
        """The usable-pair indices of ``block`` (consecutive)."""
        return range(int(self._starts[block]), int(self._starts[block + 1]))

    def block_of(self, indices) -> np.ndarray:
        """Usable-pair indices (n,) -> their blocks (n,) int64. Raises IndexError when out of range."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (idx < 0) | (idx >= len(self))
        if bad.any():
            raise IndexError(f"pair index {int(idx[bad][0])} out of range; the dataset has {len(self)} pairs")
        return np.searchsorted(self._starts, idx, side="right") - 1

    def location(self, i: int) -> tuple[Path, int]:
        """(shard path, 0-based row within that file) of usable pair ``i``."""
        b = int(self.block_of([i])[0])
        blk = self._blocks[b]
        return self.shards[blk.shard], int(blk.rows[i - self._starts[b]])

    # ------------------------------------------------------------------ order
    def _order(self, seed: int, epoch: int) -> np.ndarray:
        """(len,) usable indices in the order of ``epoch``. ``shuffle="block"`` (reading images from parquet):
        blocks shuffled, rows shuffled within each block, so a batch reads one or two row groups;
        ``"global"`` (from the latent cache, where random access is cheap): one permutation of every pair, so a
        batch mixes the whole dataset as the official script's loader does."""
        key = (seed, epoch, self.shuffle)
        if key not in self._orders:
            if self.shuffle == "global":
                order = np.random.default_rng([seed, epoch, 1]).permutation(len(self))
            else:
                parts = []
                for b in np.random.default_rng([seed, epoch]).permutation(self.num_blocks):
                    r = self.block_range(int(b))
                    parts.append(r.start + np.random.default_rng([seed, epoch, int(b)]).permutation(len(r)))
                order = np.concatenate(parts)
            self._orders = {key: order}
        return self._orders[key]

    def batch_indices(self, step: int, batch_size: int, world_size: int = 1, rank: int = 0,
                      seed: int = 0) -> list[int]:
        """The ``batch_size`` usable-pair indices of process ``rank`` for optimizer iteration ``step``.

        Position p = (step * world_size + rank) * batch_size + j runs through epochs (epoch = p // len);
        a pure function of the arguments. Raises ValueError on a negative step or seed, a batch or world
        size below 1 or a rank outside [0, world_size)."""
        if step < 0 or seed < 0 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_indices(step={step}, batch_size={batch_size}, world_size={world_size}, "
                             f"rank={rank}, seed={seed}): expected step, seed >= 0, batch_size, world_size >= 1 "
                             "and 0 <= rank < world_size")
        start = (step * world_size + rank) * batch_size
        epochs, pos = np.divmod(np.arange(start, start + batch_size, dtype=np.int64), len(self))  # (batch_size,)
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._order(seed, int(epoch))[pos[sel]]
        return out.tolist()

    def iterations_for(self, epochs: float, batch_size: int, world_size: int = 1) -> int:
        """Optimizer iterations that cover ``epochs`` passes over the pairs with all processes (at least 1)."""
        return max(1, math.ceil(epochs * len(self) / (batch_size * world_size)))

    # ------------------------------------------------------------------ reading
    def _row_group(self, blk: _Block) -> pa.Table:
        """Row group of ``blk`` with PAIR_COLUMNS; the last one read stays cached."""
        key = (blk.shard, blk.row_group)
        if self._group is None or self._group[0] != key:
            path = self.shards[blk.shard]
            try:
                if self._file is None or self._file[0] != blk.shard:
                    self._file = (blk.shard, pq.ParquetFile(path))
                table = self._file[1].read_row_group(blk.row_group, columns=list(PAIR_COLUMNS))
            except (pa.ArrowException, OSError) as e:
                raise PairsError(f"{path}: row group {blk.row_group} cannot be read ({e}); the file changed or is "
                                 f"damaged: restore it or remove it from {self.option}") from e
            self._group = (key, table)
        return self._group[1]

    def _decode(self, data: bytes | None, size: int, path: Path, row: int, column: str) -> torch.Tensor | None:
        """(3, size, size), or None for an undecodable image with bad_rows=skip."""
        try:
            if data is None:
                raise OSError("the value is null")
            return decode_image(data, size)
        except _IMAGE_ERRORS as e:
            if self.bad_rows == "skip":
                return None
            raise _bad_image(f"{path} row {row}", column, e, _FIX_SKIP) from e

    def load(self, indices: list[int], resolution: int) -> PairBatch:
        """Read and decode usable pairs ``indices`` (n,) at ``resolution`` x ``resolution``.

        Each needed row group is read once. Raises PairsError on an undecodable image with
        bad_rows=error (naming file, row and column); with skip the row comes back ok=False."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (n,)
        blocks = self.block_of(idx)
        n = len(idx)
        captions = [""] * n
        images = torch.zeros(2, n, 3, resolution, resolution)  # [win, lose]
        label = torch.zeros(n)
        ok = torch.ones(n, dtype=torch.bool)
        for b in dict.fromkeys(blocks.tolist()):
            blk = self._blocks[b]
            sel = np.flatnonzero(blocks == b)  # output positions from this block
            local = idx[sel] - self._starts[b]
            rows = blk.rows[local]
            table = self._row_group(blk).take(rows - blk.first_row)
            cols = {c: table.column(c).to_pylist() for c in ("caption", "jpg_0", "jpg_1")}
            path = self.shards[blk.shard]
            for k, out in enumerate(sel.tolist()):
                l0 = float(blk.label_0[local[k]])
                captions[out] = cols["caption"][k]
                label[out] = max(l0, 1 - l0)
                if int(idx[out]) in self._bad_images:
                    ok[out] = False
                    continue
                if not isinstance(captions[out], str):  # a null caption
                    if self.bad_rows == "error":
                        raise _bad_caption(f"{path} row {int(rows[k])}", captions[out], _FIX_SKIP)
                    captions[out] = ""
                    self._bad_images.add(int(idx[out]))
                    ok[out] = False
                    continue
                pair = [self._decode(cols[c][k], resolution, path, int(rows[k]), c) for c in ("jpg_0", "jpg_1")]
                if pair[0] is None or pair[1] is None:
                    self._bad_images.add(int(idx[out]))
                    ok[out] = False
                    continue
                win, lose = (1, 0) if l0 == 0 else (0, 1)
                images[0, out], images[1, out] = pair[win], pair[lose]
        self.counts["bad_images_skipped"] = len(self._bad_images)
        return PairBatch(captions, images[0], images[1], label, ok)

    def check_first(self, n: int = 16) -> None:
        """Decode-check (``check_decodable``) the images and captions of the first ``n`` usable pairs, when bad rows
        are errors: a file whose images are all unreadable fails now, before any model is built (``verify``, or
        the cache build, checks every row). Raises PairsError naming file, row and column."""
        if self.bad_rows != "error" or not len(self):
            return
        for i in range(min(n, len(self))):
            b = int(self.block_of([i])[0])
            blk = self._blocks[b]
            row = int(blk.rows[i - self._starts[b]])
            table = self._row_group(blk).slice(row - blk.first_row, 1)
            path = self.shards[blk.shard]
            caption = table.column("caption")[0].as_py()
            if not isinstance(caption, str):
                raise _bad_caption(f"{path} row {row}", caption, _FIX_SKIP)
            for column in ("jpg_0", "jpg_1"):
                try:
                    check_decodable(table.column(column)[0].as_py())
                except _IMAGE_ERRORS as e:
                    raise _bad_image(f"{path} row {row}", column, e, _FIX_SKIP) from e

    def verify(self, resolution: int, progress: bool = True) -> int:
        """Decode every usable pair's images once (a tqdm bar when ``progress``). Raises PairsError on
        the first bad image with bad_rows=error; returns the number of bad rows skipped otherwise."""
        from tqdm import tqdm

        with tqdm(total=len(self), desc="checking images", unit="pair", disable=not progress) as bar:
            for b in range(self.num_blocks):
                r = self.block_range(b)
                for lo in range(r.start, r.stop, _VERIFY_BATCH):
                    hi = min(lo + _VERIFY_BATCH, r.stop)
                    self.load(list(range(lo, hi)), resolution)
                    bar.update(hi - lo)
        return len(self._bad_images)


def load_all(spec: str, ties: str = "keep", option: str = "data.pairs") -> Pairs:
    """Every usable pair of ``spec`` in memory, images still encoded, with each pair's file and row (bad labels
    raise PairsError; ``Pairs.check_images`` checks the images)."""
    ds = PairDataset(spec, ties=ties, option=option)
    captions, jpg_0, jpg_1, label_0, sources = [], [], [], [], []
    for blk in ds._blocks:
        table = ds._row_group(blk).take(blk.rows - blk.first_row)
        captions += table.column("caption").to_pylist()
        jpg_0 += table.column("jpg_0").to_pylist()
        jpg_1 += table.column("jpg_1").to_pylist()
        label_0.append(blk.label_0)
        sources += [(ds.shards[blk.shard], int(r)) for r in blk.rows]
    return Pairs(captions, jpg_0, jpg_1, torch.tensor(np.concatenate(label_0), dtype=torch.float32), sources)
