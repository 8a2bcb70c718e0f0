"""Bad input to the data-side command lines (``train_spm``, ``python -m spo_fast.data cache``, ``python -m
spo_fast.toyworld build``) is one line ``error: ...`` on stderr naming the value, file (and row), exit code 2, no
traceback, and -- for every case below -- found before any model is built (the builders are replaced by ones
that fail the test)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spo_fast import train_spm
from spo_fast.core.errors import InputError
from spo_fast.data import __main__ as data_cli
from spo_fast.data import cache as cache_module
from spo_fast.data.pairs import PairsError, load_all
from spo_fast.data.prompts import load_prompts
from spo_fast.diffusion import models
from spo_fast.diffusion.models import toyworld_assets
from spo_fast.reward import spm, spm_trainer
from spo_fast.toyworld import build

ROWS = [1, 2, 4, 5, 7]  # of the toy train pairs: no ties (a tie-free file survives data.ties=drop)
BAD_ROW = 2  # the row (of the small files) whose jpg_1 is corrupted


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> SimpleNamespace:
    """Every bad input, built once: small parquet files (5 rows of the toy pairs), model and SPM copies with a
    truncated weights file, a regular file to put outputs under."""
    d = tmp_path_factory.mktemp("bad_inputs")
    assets = toyworld_assets()
    table = pq.read_table(assets / "pairs_train.parquet").take(ROWS)
    good = d / "good.parquet"
    pq.write_table(table, good)
    jpg = table.column("jpg_1").to_pylist()
    jpg[BAD_ROW] = jpg[BAD_ROW][: len(jpg[BAD_ROW]) // 3]  # a truncated JPEG
    i = table.schema.get_field_index("jpg_1")
    corrupt = d / "corrupt.parquet"
    pq.write_table(table.set_column(i, "jpg_1", pa.array(jpg, pa.binary())), corrupt)
    empty = d / "empty.parquet"
    pq.write_table(table.slice(0, 0), empty)
    schema = d / "schema.parquet"
    pq.write_table(table.drop(["label_1"]), schema)
    labels = d / "labels.parquet"
    l0 = table.column("label_0").to_pylist()
    l0[3] = 0.3
    pq.write_table(table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(l0)), labels)
    ties = d / "ties.parquet"
    half = pa.array([0.5] * len(ROWS))
    pq.write_table(table.set_column(table.schema.get_field_index("label_0"), "label_0", half)
                   .set_column(table.schema.get_field_index("label_1"), "label_1", half), ties)
    junk = d / "junk.parquet"
    junk.write_bytes(b"not a parquet file")
    no_parquet = d / "no_parquet_here"
    no_parquet.mkdir()
    base = d / "base_truncated"
    shutil.copytree(assets / "base", base)
    _truncate(base / "unet" / "diffusion_pytorch_model.safetensors")
    spm_dir = d / "spm_truncated"
    shutil.copytree(assets / "spm", spm_dir)
    _truncate(spm_dir / "model.safetensors")
    a_file = d / "a_file"
    a_file.write_text("a regular file\n")
    bad_manifest = d / "bad_manifest_cache"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text("{not json")
    # a toy-world build directory whose pairs are corrupt (for --stages spm)
    stage_dir = d / "stage_spm"
    shutil.copytree(assets / "base", stage_dir / "base")
    shutil.copy(corrupt, stage_dir / "pairs_train.parquet")
    shutil.copy(good, stage_dir / "pairs_heldout.parquet")
    return SimpleNamespace(d=d, good=good, corrupt=corrupt, empty=empty, schema=schema, labels=labels, ties=ties,
                           junk=junk, no_parquet=no_parquet, base=base, spm=spm_dir, a_file=a_file,
                           bad_manifest=bad_manifest, stage_dir=stage_dir)


@pytest.fixture
def no_models(monkeypatch):
    """Every model builder the three CLIs reach fails the test: the errors must come before them."""
    def built(*args, **kwargs):
        raise AssertionError("model built")

    for owner in (models, train_spm, build):
        monkeypatch.setattr(owner, "load_components", built)
    for cls in (spm.SPMScorer, spm.StepAwarePreferenceModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(built))
    for name in ("train_base", "build_pairs", "build_spm", "pretrain_clip", "build"):
        monkeypatch.setattr(build, name, built)


def _run(main, argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def _assert_one_line_error(rc: int, err: str, names: list[str]) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in err, (name, err)


# ----------------------------------------------------------------------------- train_spm
def _spm_argv(w, **over) -> list[str]:
    args = {"--pairs": str(w.good), "--model": "toyworld:base", "--init": "toyworld:spm",
            "--out": str(w.d / "spm_out"), **over}
    return [x for k, v in args.items() if v is not None for x in (k, v)] + ["--no-progress"]


TRAIN_SPM_CASES = {
    "corrupt-jpeg": (lambda w: _spm_argv(w, **{"--pairs": str(w.corrupt)}),
                     lambda w: [str(w.corrupt), f"row {BAD_ROW}", "jpg_1", "remove the row", "data.bad_rows=skip"]),
    "corrupt-jpeg-eval": (lambda w: _spm_argv(w, **{"--eval-pairs": str(w.corrupt)}),
                          lambda w: [str(w.corrupt), f"row {BAD_ROW}", "jpg_1"]),
    "missing-pairs": (lambda w: _spm_argv(w, **{"--pairs": str(w.d / "missing.parquet")}),
                      lambda w: ["missing.parquet", "does not exist"]),
    "directory-not-file": (lambda w: _spm_argv(w, **{"--pairs": str(w.no_parquet)}),
                           lambda w: [str(w.no_parquet), "directory without *.parquet"]),
    "not-parquet": (lambda w: _spm_argv(w, **{"--pairs": str(w.junk)}),
                    lambda w: [str(w.junk), "not a readable parquet file"]),
    "wrong-schema": (lambda w: _spm_argv(w, **{"--eval-pairs": str(w.schema)}),
                     lambda w: [str(w.schema), "label_1"]),
    "empty-parquet": (lambda w: _spm_argv(w, **{"--pairs": str(w.empty)}),
                      lambda w: [str(w.empty), "no rows"]),
    "bad-label": (lambda w: _spm_argv(w, **{"--pairs": str(w.labels)}),
                  lambda w: [str(w.labels), "row 3", "label_0=0.3"]),
    "lr-nan": (lambda w: _spm_argv(w, **{"--lr": "nan"}), lambda w: ["--lr", "nan", "finite"]),
    "lr-zero": (lambda w: _spm_argv(w, **{"--lr": "0"}), lambda w: ["--lr", "> 0"]),
    "steps-zero": (lambda w: _spm_argv(w, **{"--steps": "0"}), lambda w: ["--steps", ">= 1"]),
    "batch-size-zero": (lambda w: _spm_argv(w, **{"--batch-size": "0"}), lambda w: ["--batch-size", ">= 1"]),
    "seed-negative": (lambda w: _spm_argv(w, **{"--seed": "-1"}), lambda w: ["--seed", "-1"]),
    "guidance-inf": (lambda w: _spm_argv(w, **{"--guidance-scale": "inf"}), lambda w: ["--guidance-scale", "inf"]),
    "steps-not-int": (lambda w: _spm_argv(w, **{"--steps": "1.5"}), lambda w: ["--steps", "'1.5'", "integer"]),
    "out-under-file": (lambda w: _spm_argv(w, **{"--out": str(w.a_file / "spm")}),
                       lambda w: ["--out", str(w.a_file), "is a file"]),
    "out-is-file": (lambda w: _spm_argv(w, **{"--out": str(w.a_file)}), lambda w: ["--out", str(w.a_file)]),
    "model-truncated-weights": (lambda w: _spm_argv(w, **{"--model": str(w.base)}),
                                lambda w: [str(w.base / "unet" / "diffusion_pytorch_model.safetensors"),
                                           "truncated"]),
    "model-missing": (lambda w: _spm_argv(w, **{"--model": str(w.d / "no_model")}),
                      lambda w: [str(w.d / "no_model"), "does not exist"]),
    "model-unknown-toyworld": (lambda w: _spm_argv(w, **{"--model": "toyworld:nope"}),
                               lambda w: ["toyworld:nope", "toyworld:base"]),
    "model-wrong-family": (lambda w: _spm_argv(w, **{"--family": "sdxl"}), lambda w: ["text_encoder_2"]),
    "init-truncated-weights": (lambda w: _spm_argv(w, **{"--init": str(w.spm)}),
                               lambda w: [str(w.spm / "model.safetensors"), "truncated"]),
    "init-not-an-spm": (lambda w: _spm_argv(w, **{"--init": str(w.no_parquet)}),
                        lambda w: [str(w.no_parquet), "config.json"]),
    "missing-required": (lambda w: ["--pairs", str(w.good)], lambda w: ["--model", "--init", "--out"]),
}


@pytest.mark.parametrize("case", TRAIN_SPM_CASES, ids=list(TRAIN_SPM_CASES))
def test_train_spm_bad_input(case, w, no_models, capsys):
    argv, names = TRAIN_SPM_CASES[case]
    _assert_one_line_error(*_run(train_spm.main, argv(w), capsys), names(w))


def test_train_spm_undecodable_image_at_training_time_names_file_and_row(w, monkeypatch, capsys):
    """The lazy path: an image that passed the up-front check (here: the check is skipped) but cannot be decoded
    when a batch draws it fails with the same named error, not PIL's traceback."""
    monkeypatch.setattr(spm_trainer.Pairs, "check_images", lambda self, **kw: None)
    pairs = load_all(str(w.corrupt))
    with pytest.raises(PairsError, match=rf"corrupt\.parquet row {BAD_ROW}: jpg_1 cannot be decoded"):
        spm_trainer._batch_inputs(pairs, list(range(len(pairs))), 24)
    rc, err = _run(train_spm.main, _spm_argv(w, **{"--eval-pairs": str(w.corrupt), "--steps": "1"}), capsys)
    _assert_one_line_error(rc, err, [str(w.corrupt), f"row {BAD_ROW}", "jpg_1"])


def test_train_spm_process_exits_2_without_traceback(w):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "spo_fast.train_spm", *_spm_argv(w, **{"--pairs": str(w.corrupt)})],
                          check=False, capture_output=True, text=True, env=env, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {w.corrupt} row {BAD_ROW}: jpg_1"), proc.stderr


# ----------------------------------------------------------------------------- python -m spo_fast.data cache
def _cache_argv(w, **over) -> list[str]:
    args = {"--pairs": str(w.good), "--model": "toyworld:base", "--cache-dir": str(w.d / "cache"), **over}
    return ["cache", *(x for k, v in args.items() for x in (k, v))]


CACHE_CASES = {
    "corrupt-jpeg": (lambda w: _cache_argv(w, **{"--pairs": str(w.corrupt)}),
                     lambda w: [str(w.corrupt), f"row {BAD_ROW}", "jpg_1", "data.bad_rows=skip"]),
    "missing-pairs": (lambda w: _cache_argv(w, **{"--pairs": str(w.d / "missing.parquet")}),
                      lambda w: ["missing.parquet", "does not exist"]),
    "empty-parquet": (lambda w: _cache_argv(w, **{"--pairs": str(w.empty)}), lambda w: [str(w.empty), "no rows"]),
    "wrong-schema": (lambda w: _cache_argv(w, **{"--pairs": str(w.schema)}), lambda w: [str(w.schema), "label_1"]),
    "only-ties": (lambda w: _cache_argv(w, **{"--pairs": str(w.ties)}), lambda w: ["ties dropped", "ties=keep"]),
    "model-truncated-weights": (lambda w: _cache_argv(w, **{"--model": str(w.base)}),
                                lambda w: [str(w.base / "unet" / "diffusion_pytorch_model.safetensors")]),
    "cache-dir-under-file": (lambda w: _cache_argv(w, **{"--cache-dir": str(w.a_file / "c")}),
                             lambda w: ["--cache-dir", str(w.a_file), "is a file"]),
    "cache-dir-bad-manifest": (lambda w: _cache_argv(w, **{"--cache-dir": str(w.bad_manifest)}),
                               lambda w: [str(w.bad_manifest / "manifest.json"), "not a cache manifest"]),
    "resolution-zero": (lambda w: _cache_argv(w, **{"--resolution": "0"}),
                                lambda w: ["--resolution", "expected an integer >= 1"]),
    "batch-size-not-int": (lambda w: _cache_argv(w, **{"--batch-size": "x"}), lambda w: ["--batch-size", "'x'"]),
    "bad-rows-choice": (lambda w: _cache_argv(w, **{"--bad-rows": "ignore"}), lambda w: ["--bad-rows", "ignore"]),
}


@pytest.mark.parametrize("case", CACHE_CASES, ids=list(CACHE_CASES))
def test_data_cache_bad_input(case, w, no_models, capsys):
    argv, names = CACHE_CASES[case]
    _assert_one_line_error(*_run(data_cli.main, argv(w), capsys), names(w))


def test_data_cache_bad_image_found_by_the_build_names_file_and_row(w, monkeypatch, capsys):
    """A bad row past the rows checked up front fails the cache build (after the model loads) with the same
    one-line error."""
    monkeypatch.setattr(data_cli.PairDataset, "check_first", lambda self, n=16: None)
    argv = [*_cache_argv(w, **{"--pairs": str(w.corrupt), "--cache-dir": str(w.d / "c2")}), "--no-progress"]
    rc, err = _run(data_cli.main, argv, capsys)
    _assert_one_line_error(rc, err, [str(w.corrupt), f"row {BAD_ROW}", "jpg_1", "data.bad_rows=skip"])


def test_cache_dir_checks():
    with pytest.raises(InputError, match="is a file"):
        cache_module.check_writable_dir(Path(__file__), "--out")
    assert cache_module.check_writable_dir(Path(__file__).parent / "new" / "dir", "--out").name == "dir"


# ----------------------------------------------------------------------------- python -m spo_fast.toyworld build
BUILD_CASES = {
    "out-under-file": (lambda w: ["build", "--out", str(w.a_file / "toy")],
                       lambda w: ["--out", str(w.a_file), "is a file"]),
    "seed-negative": (lambda w: ["build", "--out", str(w.d / "toy"), "--seed", "-1"],
                      lambda w: ["--seed", "-1", ">= 0"]),
    "unknown-stage": (lambda w: ["build", "--out", str(w.d / "toy"), "--stages", "base,nope"],
                      lambda w: ["--stages", "nope", "base, pairs, spm"]),
    "no-stage": (lambda w: ["build", "--out", str(w.d / "toy"), "--stages", ","], lambda w: ["--stages", "no stage"]),
    "smoke-into-assets": (lambda w: ["build", "--smoke"], lambda w: ["--smoke needs --out"]),
    "pairs-without-base": (lambda w: ["build", "--out", str(w.d / "toy_empty"), "--stages", "pairs"],
                           lambda w: ["stage pairs needs", str(w.d / "toy_empty" / "base"), "add base to --stages"]),
    "spm-on-corrupt-pairs": (lambda w: ["build", "--out", str(w.stage_dir), "--stages", "spm"],
                             lambda w: [str(w.stage_dir / "pairs_train.parquet"), f"row {BAD_ROW}", "jpg_1"]),
}


@pytest.mark.parametrize("case", BUILD_CASES, ids=list(BUILD_CASES))
def test_toyworld_build_bad_input(case, w, no_models, capsys):
    argv, names = BUILD_CASES[case]
    _assert_one_line_error(*_run(build.main, argv(w), capsys), names(w))


# ----------------------------------------------------------------------------- prompt files
@pytest.mark.parametrize("text, state", [("", "is empty"), ("\n  \n\t\n", "only blank lines")])
def test_empty_prompt_file_is_a_named_error(tmp_path, text, state):
    f = tmp_path / "prompts.txt"
    f.write_text(text)
    with pytest.raises(InputError, match=rf"prompts\.txt'.*{state}; write one prompt per line"):
        load_prompts(str(f))
    with pytest.raises(InputError, match="is a directory"):
        load_prompts(str(tmp_path))


# ----------------------------------------------------------------------------- help examples, flag names
def _help_example(main, argv: list[str], capsys) -> list[str]:
    """The ``Example ...: python -m spo_fast.X ARGS`` of a command's --help, as an argument list."""
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    example = text[text.index("Example"):]
    return example.split(" python -m ", 1)[1].split()[1:]  # drop the module name


@pytest.mark.parametrize("which", ["train_spm", "data cache"])
def test_help_examples_pass_every_check_from_any_directory(which, tmp_path, monkeypatch, no_models, capsys):
    """Run from an empty directory, the example in --help passes every input check and reaches the model builder
    (which the fixture turns into an AssertionError): no repository-relative path in it."""
    main, prefix = (train_spm.main, []) if which == "train_spm" else (data_cli.main, ["cache"])
    argv = _help_example(main, prefix, capsys)
    assert argv[:len(prefix)] == prefix and not any("spo_fast/" in a for a in argv), argv
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="model built"):
        main(argv)


@pytest.mark.parametrize("which, flag", [("train_spm", "--pairs"), ("train_spm", "--eval-pairs"),
                                         ("data cache", "--pairs")])
def test_a_missing_pairs_file_is_named_by_the_flag_typed(which, flag, tmp_path, no_models, capsys):
    missing = str(tmp_path / "missing.parquet")
    if which == "train_spm":
        argv = ["--pairs", "toyworld:train", "--model", "toyworld:base", "--init", "toyworld:spm",
                "--out", str(tmp_path / "o"), flag, missing]
        main = train_spm.main
    else:
        argv, main = ["cache", "--pairs", missing, "--model", "toyworld:base", "--cache-dir", str(tmp_path / "c")], \
            data_cli.main
    rc, err = _run(main, argv, capsys)
    _assert_one_line_error(rc, err, [f"{flag}={missing!r}", "does not exist"])
    assert "data.pairs" not in err
