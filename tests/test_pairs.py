"""spo_fast.data.pairs (parquet preference pairs) and spo_fast.data.cache (the latent cache), on small
generated parquet files and the toy world's pairs."""
from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spo_fast.data import pairs as pairs_module
from spo_fast.data.__main__ import main as data_main
from spo_fast.data.cache import CacheError, LatentCache, cache_key
from spo_fast.data.pairs import PairDataset, PairsError, decode_image, load_all, resolve_shards
from spo_fast.diffusion.models import toyworld_assets

RES = 16


def jpeg(rng: np.random.Generator, size: int = 16) -> bytes:
    """A random size x size RGB image, JPEG-encoded (w != h half the time, to exercise the crop)."""
    w = size if rng.random() < 0.5 else size + 4
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_pairs(path: Path, labels: list[tuple[float, float]], seed: int = 0, row_group_size: int | None = None,
                captions: list[str] | None = None, drop: str | None = None) -> Path:
    """A Pick-a-Pic-schema parquet file, one row per (label_0, label_1); caption ``<stem>-r<row>`` by default."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    cols = {"caption": captions or [f"{path.stem}-r{i}" for i in range(n)],
            "jpg_0": [jpeg(rng) for _ in range(n)], "jpg_1": [jpeg(rng) for _ in range(n)],
            "label_0": [float(a) for a, _ in labels], "label_1": [float(b) for _, b in labels],
            "extra": list(range(n))}
    cols.pop(drop, None)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def set_cell(path: Path, column: str, row: int, value) -> None:
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = value
    i = table.schema.get_field_index(column)
    pq.write_table(table.set_column(i, column, pa.array(values, table.schema.field(i).type)), path)


PREFS = [(1, 0), (0, 1), (0.5, 0.5), (1, 0), (0, 1), (0, 1), (1, 0), (0.5, 0.5), (1, 0), (0, 1)]


# ----------------------------------------------------------------------------- reading


def test_reads_pairs_win_is_the_preferred_image_and_ties_follow_the_setting(tmp_path):
    f = write_pairs(tmp_path / "a.parquet", PREFS)
    ds = PairDataset(str(f))
    assert len(ds) == 8
    assert ds.counts == {"rows": 10, "ties_dropped": 2, "bad_labels_skipped": 0, "usable": 8, "bad_images_skipped": 0}
    raw = pq.read_table(f).to_pylist()
    batch = ds.load(list(range(len(ds))), RES)
    assert batch.win.shape == (8, 3, RES, RES) and batch.ok.all()
    assert batch.win.min() >= -1 and batch.win.max() <= 1 and batch.win.std() > 0.1
    for i in range(len(ds)):
        path, row = ds.location(i)
        assert path == f and batch.captions[i] == f"a-r{row}"
        win, lose = ("jpg_1", "jpg_0") if raw[row]["label_0"] == 0 else ("jpg_0", "jpg_1")
        assert torch.equal(batch.win[i], decode_image(raw[row][win], RES))
        assert torch.equal(batch.lose[i], decode_image(raw[row][lose], RES))
    assert torch.equal(batch.label, torch.ones(8))

    kept = PairDataset(str(f), ties="keep")
    assert len(kept) == 10 and kept.counts["ties_dropped"] == 0
    tie = kept.load([2], RES)
    assert tie.label.tolist() == [0.5]
    assert torch.equal(tie.win[0], decode_image(raw[2]["jpg_0"], RES))
    assert torch.equal(tie.lose[0], decode_image(raw[2]["jpg_1"], RES))


@pytest.mark.parametrize("bad", [(0.3, 0.7), (1, 1), (0, 0), (float("nan"), 1)])
def test_labels_that_are_not_a_preference_name_file_and_row(tmp_path, bad):
    labels = list(PREFS)
    labels[4] = bad
    f = write_pairs(tmp_path / "bad.parquet", labels, row_group_size=3)
    with pytest.raises(PairsError, match=r"bad\.parquet row 4: label_0=.*label_1=.*not a preference.*bad_rows=skip"):
        PairDataset(str(f))
    ds = PairDataset(str(f), bad_rows="skip")
    assert ds.counts["bad_labels_skipped"] == 1 and len(ds) == 7
    assert 4 not in [ds.location(i)[1] for i in range(len(ds))]


def test_corrupt_image_errors_with_file_row_column_or_is_skipped_and_counted(tmp_path):
    f = write_pairs(tmp_path / "c.parquet", PREFS)
    good = pq.read_table(f).column("jpg_1")[3].as_py()
    set_cell(f, "jpg_1", 3, good[: len(good) // 3])  # truncated JPEG
    ds = PairDataset(str(f))  # labels only: opening reads no image
    i = next(i for i in range(len(ds)) if ds.location(i)[1] == 3)
    ds.load([0], RES)
    pattern = r"c\.parquet row 3: jpg_1 cannot be decoded as an image .*data\.bad_rows=skip"
    with pytest.raises(PairsError, match=pattern):
        ds.load([0, i], RES)
    with pytest.raises(PairsError, match=pattern):
        ds.verify(RES, progress=False)

    skip = PairDataset(str(f), bad_rows="skip")
    batch = skip.load([i, 0], RES)
    assert batch.ok.tolist() == [False, True]
    assert not batch.win[0].any() and not batch.lose[0].any() and batch.win[1].any()
    assert skip.counts["bad_images_skipped"] == 1
    assert skip.verify(RES, progress=False) == 1 and skip.counts["bad_images_skipped"] == 1


def test_schema_and_spec_errors(tmp_path):
    with pytest.raises(PairsError, match=r"lacks column\(s\) label_1; it has caption, jpg_0, jpg_1, label_0, extra"):
        PairDataset(str(write_pairs(tmp_path / "m.parquet", PREFS, drop="label_1")))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PairsError, match=r"junk\.parquet is not a readable parquet file"):
        PairDataset(str(tmp_path / "junk.parquet"))
    with pytest.raises(PairsError, match=r"data\.pairs='.*nope\.parquet' does not exist; give a parquet file"):
        PairDataset(str(tmp_path / "nope.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairsError, match=r"is a directory without \*\.parquet files"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(PairsError, match=r"the glob matches no file"):
        resolve_shards(str(tmp_path / "train-*.parquet"))
    ties = write_pairs(tmp_path / "t.parquet", [(0.5, 0.5)] * 3)
    with pytest.raises(PairsError, match=r"no usable pairs .*3 rows, 3 ties dropped .*set data\.ties=keep"):
        PairDataset(str(ties))
    with pytest.raises(PairsError, match=r"data\.ties='none'; accepted: drop, keep"):
        PairDataset(str(ties), ties="none")
    with pytest.raises(PairsError, match=r"data\.bad_rows='ignore'; accepted: error, skip"):
        PairDataset(str(ties), bad_rows="ignore")


def test_shards_as_directory_and_glob_add_up_and_locate_rows(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    a = write_pairs(d / "train-0.parquet", PREFS, seed=1, row_group_size=3)  # row groups of 3, 3, 3, 1 rows
    b = write_pairs(d / "train-1.parquet", [(1, 0), (0, 1), (0.5, 0.5), (0, 1), (1, 0)], seed=2)
    (d / "notes.txt").write_text("ignored")
    for spec in (str(d), str(d / "train-*.parquet")):
        ds = PairDataset(spec)
        assert ds.shards == [a, b]
        assert ds.counts["rows"] == 15 and ds.counts["ties_dropped"] == 3 and len(ds) == 12
        assert ds.num_blocks == 5
        assert [ds.location(i) for i in (0, 7, 8, 11)] == [(a, 0), (a, 9), (b, 0), (b, 4)]
        batch = ds.load(list(range(len(ds)))[::-1], RES)
        assert batch.captions[::-1] == [f"{ds.location(i)[0].stem}-r{ds.location(i)[1]}" for i in range(len(ds))]
    fp = PairDataset(str(d)).fingerprint()
    assert fp == PairDataset(str(d / "*.parquet")).fingerprint() != PairDataset(str(d), ties="keep").fingerprint()


def test_batch_indices_cover_each_epoch_once_per_rank_split_and_keep_blocks_together(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    write_pairs(d / "a.parquet", [(1, 0), (0, 1)] * 10, row_group_size=4)
    write_pairs(d / "b.parquet", [(0, 1)] * 9, row_group_size=5)
    ds, again = PairDataset(str(d)), PairDataset(str(d))
    n = len(ds)
    assert n == 29 and ds.num_blocks == 7
    for world, bs in ((1, 3), (2, 3), (2, 4)):
        per_step = world * bs
        steps = -(-3 * n // per_step)
        order = np.empty(steps * per_step, dtype=np.int64)  # position -> index, from every rank's batches
        for step in range(steps):
            for rank in range(world):
                idx = ds.batch_indices(step, bs, world, rank, seed=5)
                assert idx == again.batch_indices(step, bs, world, rank, seed=5)
                start = (step * world + rank) * bs
                order[start:start + bs] = idx
        epochs = order[:3 * n].reshape(3, n)
        for e in epochs:
            assert sorted(e.tolist()) == list(range(n))
            assert (np.diff(ds.block_of(e)) != 0).sum() == ds.num_blocks - 1  # each block's rows together
        assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    r0, r1 = ds.batch_indices(1, 7, 2, 0), ds.batch_indices(1, 7, 2, 1)
    assert not set(r0) & set(r1)
    assert ds.batch_indices(0, 8, seed=1) != ds.batch_indices(0, 8, seed=2)
    assert ds.iterations_for(1, 4, 2) == 4 and ds.iterations_for(2.5, 3) == 25
    with pytest.raises(ValueError, match="rank=2"):
        ds.batch_indices(0, 4, world_size=2, rank=2)


def test_toy_world_pairs_file():
    path = str(toyworld_assets() / "pairs_train.parquet")
    ds = PairDataset(path)
    assert (ds.counts["rows"], ds.counts["ties_dropped"], len(ds)) == (1088, 233, 855)
    assert len(PairDataset(path, ties="keep")) == 1088
    pairs = load_all(path)
    assert len(pairs) == 1088 and int((pairs.label_0 == 0.5).sum()) == 233


# ----------------------------------------------------------------------------- latent cache


class FakeEncoders:
    """Counting stand-ins for the VAE (4x4 average pool plus a mean channel) and a text encoder
    (a caption-seeded random embedding)."""

    def __init__(self):
        self.image_calls = self.images = self.text_calls = 0
        self.captions: list[str] = []

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:  # (n, 3, 16, 16) -> (n, 4, 4, 4)
        self.image_calls += 1
        self.images += len(x)
        z = F.avg_pool2d(x, 4)
        return torch.cat([z, z.mean(1, keepdim=True)], dim=1)

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.text_calls += 1
        self.captions += captions
        gens = [torch.Generator().manual_seed(zlib.crc32(c.encode())) for c in captions]
        return {"embeds": torch.stack([torch.randn(5, 6, generator=g) for g in gens]),
                "pooled": torch.stack([torch.randn(3, generator=g) for g in gens])}


def open_cache(root, ds, enc, model="/models/a", **kw):
    key = cache_key({"path": model, "family": "sd15"}, RES, ds)
    return LatentCache.open(root, key, ds, enc.encode_images, enc.encode_text, batch_size=2, progress=False, **kw)


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "pairs"
    d.mkdir()
    captions = ["a red cat", "a blue dog", "a red cat"] * 3 + ["a green bird"]
    write_pairs(d / "x.parquet", PREFS, seed=3, row_group_size=4, captions=captions)
    write_pairs(d / "y.parquet", [(0, 1), (1, 0), (0, 1)], seed=4)
    return d


def test_cache_matches_direct_encoding_and_reopens_without_decoding_or_encoding(tmp_path, shards, monkeypatch):
    ds, enc = PairDataset(str(shards)), FakeEncoders()
    cache = open_cache(tmp_path / "cache", ds, enc)
    assert len(list(cache.path.glob("chunk_*.safetensors"))) == ds.num_blocks == 4
    assert not list(cache.path.glob("*.tmp")) and cache.skipped == 0
    assert enc.images == 2 * len(ds)
    per_chunk = [len({ds.load([i], RES).captions[0] for i in ds.block_range(b)}) for b in range(ds.num_blocks)]
    assert len(enc.captions) == sum(per_chunk)  # each caption once per chunk
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["skipped"] == 0 and manifest["key"]["model"]["path"] == "/models/a"

    idx = [10, 0, 7, 3, 8, 1]
    want = ds.load(idx, RES)
    ref = FakeEncoders()
    got = cache.load(idx)
    assert got.ok.all() and torch.equal(got.label, want.label)
    torch.testing.assert_close(got.latents_win, ref.encode_images(want.win), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got.latents_lose, ref.encode_images(want.lose), atol=1e-3, rtol=1e-3)
    text = ref.encode_text(want.captions)
    assert got.text.keys() == text.keys() and got.text["embeds"].dtype == torch.float32
    for k in text:
        torch.testing.assert_close(got.text[k], text[k], atol=4e-3, rtol=1e-3)

    def no_decode(*args):
        raise AssertionError("decode_image called on a complete cache")

    monkeypatch.setattr(pairs_module, "decode_image", no_decode)
    enc2 = FakeEncoders()
    again = open_cache(tmp_path / "cache", PairDataset(str(shards)), enc2)
    loaded = again.load(idx)
    assert enc2.image_calls == enc2.text_calls == 0
    assert torch.equal(loaded.latents_win, got.latents_win) and torch.equal(loaded.text["pooled"], got.text["pooled"])


def test_cache_with_another_key_is_refused_naming_the_difference(tmp_path, shards):
    ds = PairDataset(str(shards))
    open_cache(tmp_path / "c", ds, FakeEncoders())
    enc = FakeEncoders()
    with pytest.raises(CacheError, match=r"data\.cache_dir=.*model\.path: /models/a \(cache\) vs /models/b "
                                         r"\(this run\); use another data\.cache_dir, or delete it to rebuild"):
        open_cache(tmp_path / "c", ds, enc, model="/models/b")
    assert enc.image_calls == 0
    with pytest.raises(PairsError, match=r"data: [0-9a-f]{64} \(cache\) vs [0-9a-f]{64} \(this run\)"):
        open_cache(tmp_path / "c", PairDataset(str(shards), ties="keep"), enc)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match=r"data\.cache_dir=.*file.* cannot be created"):
        open_cache(tmp_path / "file" / "sub", ds, enc)


def test_killed_build_is_completed_by_the_next_open(tmp_path, shards):
    ds = PairDataset(str(shards))
    first = open_cache(tmp_path / "c", ds, FakeEncoders())
    want = first.load(list(range(len(ds))))
    chunk = tmp_path / "c" / "chunk_000002.safetensors"
    chunk.rename(chunk.with_name(chunk.name + ".tmp"))  # the state a kill during os.replace's write leaves
    enc = FakeEncoders()
    cache = open_cache(tmp_path / "c", ds, enc)
    assert enc.images == 2 * len(ds.block_range(2))
    assert chunk.is_file() and not list((tmp_path / "c").glob("*.tmp"))
    got = cache.load(list(range(len(ds))))
    assert torch.equal(got.latents_win, want.latents_win) and torch.equal(got.text["embeds"], want.text["embeds"])


def test_cache_build_is_split_across_ranks(tmp_path, shards):
    ds = PairDataset(str(shards))
    enc1 = FakeEncoders()
    with pytest.raises(CacheError, match=r"2 of 4 chunk files are missing after the build \(first: chunk_000000"):
        open_cache(tmp_path / "c", ds, enc1, world_size=2, rank=1)  # rank 0 has not built its chunks
    assert sorted(p.name for p in (tmp_path / "c").glob("chunk_*")) == ["chunk_000001.safetensors",
                                                                       "chunk_000003.safetensors"]
    calls = []
    cache = open_cache(tmp_path / "c", ds, FakeEncoders(), world_size=2, rank=0, barrier=lambda: calls.append(1))
    assert calls == [1] and cache.load(list(range(len(ds)))).ok.all()


def test_cache_bad_image_errors_before_training_or_is_skipped(tmp_path, shards):
    f = shards / "x.parquet"
    set_cell(f, "jpg_0", 5, b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(PairsError, match=r"x\.parquet row 5: jpg_0 cannot be decoded"):
        open_cache(tmp_path / "c", PairDataset(str(shards)), FakeEncoders())
    ds = PairDataset(str(shards), bad_rows="skip")
    bad = next(i for i in range(len(ds)) if ds.location(i) == (f, 5))
    cache = open_cache(tmp_path / "s", ds, FakeEncoders())
    assert cache.skipped == 1 and json.loads((cache.path / "manifest.json").read_text())["skipped"] == 1
    got = cache.load([bad, 0])
    assert got.ok.tolist() == [False, True]
    assert not got.latents_win[0].any() and not got.text["embeds"][0].any() and got.latents_win[1].any()


def test_cache_cli_on_the_toy_world(tmp_path, capsys):
    pairs = str(toyworld_assets() / "pairs_heldout.parquet")
    out = tmp_path / "cache"
    assert data_main(["cache", "--pairs", pairs, "--model", "toyworld:base", "--cache-dir", str(out),
                      "--batch-size", "64"]) == 0
    assert "cached 158 pairs (0 skipped as bad images) of 1 shard(s) at 24 px" in capsys.readouterr().out
    key = json.loads((out / "manifest.json").read_text())["key"]
    assert key["resolution"] == 24 and key["model"]["files"]["unet/diffusion_pytorch_model.safetensors"][0] > 0
    ds = PairDataset(pairs)
    got, want = LatentCache(out, ds).load([0, 57, 157]), ds.load([0, 57, 157], 24)
    torch.testing.assert_close(got.latents_win, want.win, atol=1e-3, rtol=1e-3)  # pixel space: latents = images
    # the toy tokenizer pads to 16 tokens
    assert got.text["embeds"].shape[:2] == (3, 16) and got.text["embeds"].std() > 0 and "pooled" not in got.text

    assert data_main(["cache", "--pairs", str(tmp_path / "missing.parquet"), "--model", "toyworld:base",
                      "--cache-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --pairs=") and "does not exist" in err and "Traceback" not in err  # the flag typed
