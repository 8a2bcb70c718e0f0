"""The labelled grids (eval_grid.png, samples.png), samples.json's scores and a quiet default run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from spo_fast.evaluation import grids
from spo_fast.evaluation import heldout as evaluation
from spo_fast.toyworld import world

RED, BLUE = (255, 0, 0), (0, 0, 255)


def solid(colour, n: int, res: int = 24) -> torch.Tensor:
    """(n, 3, res, res) images in [-1, 1] of one colour."""
    return (torch.tensor(colour, dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1).expand(n, 3, res, res).clone()


def mask(img: Image.Image, colour) -> np.ndarray:
    return (np.asarray(img.convert("RGB")) == np.array(colour, dtype=np.uint8)).all(-1)


def grid(n: int, rows=("base", "trained"), colours=(RED, BLUE), res: int = 24, header="a header"):
    prompts = world.prompts("heldout")[:n]
    notes = [[f"{name} {i + 0.5:.2f}" for i in range(n)] for name in rows]
    return grids.labelled_grid([solid(c, n, res) for c in colours], list(rows), prompts, notes, header), prompts


def test_grid_layout_base_above_trained():
    img, prompts = grid(5)
    cell = grids.cell_size(24)
    assert cell >= 96 and cell % 24 == 0  # readable, every source pixel an integer block (NEAREST)
    lay = grids.layout(5, ["base", "trained"], prompts, [["x"] * 5] * 2, "a header", cell)
    assert img.size == (lay.width, lay.height)
    red, blue = mask(img, RED), mask(img, BLUE)
    # every image cell is whole: n cells of cell x cell pixels of its colour, nothing else in that colour
    assert red.sum() == blue.sum() == 5 * cell * cell
    ys_red, ys_blue = np.nonzero(red)[0], np.nonzero(blue)[0]
    assert ys_red.max() < ys_blue.min()  # the base row is above the trained row
    assert ys_red.min() == lay.cell_xy(0, 0)[1] and ys_blue.min() == lay.cell_xy(1, 0)[1]
    for c in range(5):  # one red square over one blue square in each column
        (x, y0), (_, y1) = lay.cell_xy(0, c), lay.cell_xy(1, c)
        assert red[y0:y0 + cell, x:x + cell].all() and blue[y1:y1 + cell, x:x + cell].all()
    arr = np.asarray(img.convert("L"))
    # text: the caption band above the first row, the notes under each image and the row labels are drawn
    top = lay.cell_xy(0, 0)[1]
    for c in range(5):
        x, _ = lay.cell_xy(0, c)
        assert (arr[top - lay.caption_h:top, x:x + cell] < 128).any(), f"caption of column {c}"
        for r in range(2):
            y = lay.cell_xy(r, c)[1] + cell
            assert (arr[y + 1:y + 1 + lay.note_h, x:x + cell] < 200).any(), f"note ({r}, {c})"
    assert (arr[top:, :lay.label_w] < 128).any()  # row labels
    assert (arr[:grids.PAD + lay.header_h, :] < 128).any()  # header


def test_grid_size_grows_by_one_column_per_prompt_and_one_row_per_model():
    cell = grids.cell_size(24)
    a, _ = grid(4)
    b, _ = grid(5)
    c, _ = grid(4, rows=("base", "trained", "third"), colours=(RED, BLUE, (0, 255, 0)))
    assert b.width - a.width == cell + grids.PAD and b.height == a.height  # same captions' line count
    lay = grids.layout(4, ["base", "trained", "third"], world.prompts("heldout")[:4], [["base 0.50"] * 4] * 3,
                       "a header", cell)
    assert c.height - a.height == lay.row_h > cell  # a row: the image plus its note
    big, _ = grid(2, res=512)  # large images are scaled down to MAX_CELL
    assert mask(big, RED).sum() == 2 * grids.MAX_CELL ** 2


def test_captions_wrap_to_the_column_width():
    fnt = grids.font()
    cell = grids.cell_size(24)
    prompt = "a large navy diamond at the bottom, white background"
    lines = grids.wrap(prompt, cell, fnt)
    assert len(lines) >= 2 and " ".join(lines) == prompt
    assert all(fnt.getlength(line) <= cell for line in lines)
    assert all(fnt.getlength(line) <= 40 for line in grids.wrap("averyveryverylongwordwithoutspaces", 40, fnt))


def test_eval_grid_is_capped_by_the_prompts_evaluated(tmp_path):
    prompts = world.prompts("heldout")[:3]
    base, trained = solid(RED, 3)[None], solid(BLUE, 3)[None]  # (seeds=1, P, 3, H, W)
    evaluation.save_grid(base, trained, tmp_path / "g.png", prompts, [1.0, 2.0, 3.0], [2.0, 2.0, 1.0], "header",
                         n=8)
    img = Image.open(tmp_path / "g.png")
    cell = grids.cell_size(24)
    assert mask(img, RED).sum() == mask(img, BLUE).sum() == 3 * cell * cell
    # the trained notes are coloured by the comparison: better, equal, worse
    assert grids.compare_colours([1.0, 2.0, 3.0], [2.0, 2.0, 1.0])[1] == [grids.BETTER, grids.MUTED, grids.WORSE]
    assert mask(img, grids.BETTER).any() and mask(img, grids.WORSE).any()


NOISE = ("requires torchvision", "falling back to", "should be kept in float32", "Loading weights",
         "Writing model shards")


def test_reduced_default_run_is_quiet_and_writes_scores(tmp_path):
    """A reduced `python -m spo_fast.train` (the toy world; bf16 training so that the UNet is cast) prints none of
    the libraries' noise; samples.json has the ground truth and the SPM's scores, eval_grid.png its columns."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "spo_fast.train", "train.max_iterations=1", "sampling.num_steps=4",
           "spo.divert_start_step=2", "train.batch_size=2", "train.train_batch_size=2", "eval.n_prompts=3",
           "eval.seeds=1", "eval.grid_prompts=2", "log.sample_prompts=2", "train.mixed_precision=bf16",
           "log.report_to=none", f"log.output_dir={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    both = done.stdout + done.stderr
    for msg in NOISE:
        assert msg not in both, f"{msg!r} in the output:\n{both[-3000:]}"
    assert "sample grid" in done.stderr and "evaluating base vs trained" in done.stderr  # the phases' bars
    samples = json.loads((out / "samples.json").read_text())
    assert {"prompts", "rows", "scores", "ground_truth"} <= samples.keys() and samples["rows"] == ["base", "trained"]
    for row in ("base", "trained"):
        assert len(samples["scores"][row]) == len(samples["ground_truth"][row]) == 2
        assert all(0 <= v <= 10 for v in samples["ground_truth"][row])
    cell = grids.cell_size(world.RESOLUTION)
    for name, cols in (("samples.png", 2), ("eval_grid.png", 2)):
        img = Image.open(out / name)
        assert img.width > cols * cell and img.height > 2 * cell
        assert img.width < (cols + 1) * cell + 100, f"{name}: more than {cols} columns"


@pytest.mark.parametrize("value", [0, -1])
def test_grid_prompts_must_be_positive(value):
    from spo_fast.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.grid_prompts"):
        load_config(None, [f"eval.grid_prompts={value}"])


def test_covering_shows_every_attribute_of_the_toy_prompts():
    """The eval grid's 8 columns of toyworld:heldout's first 64 prompts (all of which start with small red circles)
    show every shape, position, size and background those 64 prompts have, and more than one colour."""
    prompts = world.prompts("heldout")[:64]
    idx = grids.covering(prompts, 8)
    assert len(idx) == len(set(idx)) == 8 and idx == grids.covering(prompts, 8)
    shown = [world.parse_prompt(prompts[i]) for i in idx]
    every = [world.parse_prompt(p) for p in prompts]
    for field in ("shape", "position", "size", "background"):
        assert {getattr(a, field) for a in shown} == {getattr(a, field) for a in every}, field
    assert len({a.color for a in shown}) >= 3
    assert len({a.color for a in [world.parse_prompt(p) for p in prompts[:8]]}) == 1  # what the first 8 would show
    assert grids.covering(["a", "b"], 5) == [0, 1] and grids.covering([], 3) == []


def test_eval_grid_columns_are_the_covering_prompts(tmp_path, monkeypatch):
    prompts = world.prompts("heldout")[:12]
    base = torch.arange(12.0).view(1, 12, 1, 1, 1).expand(1, 12, 3, 4, 4)  # image i is filled with i
    seen = {}

    def capture(images, rows, captions, notes, header, note_colours=None):
        seen.update(columns=images[0][:, 0, 0, 0].tolist(), captions=captions, notes=notes)
        return SimpleNamespace(save=lambda path: None)

    monkeypatch.setattr(grids, "labelled_grid", capture)
    rewards = [float(i) for i in range(12)]
    evaluation.save_grid(base, base, tmp_path / "g.png", prompts, rewards, rewards, "h", 4)
    idx = grids.covering(prompts, 4)
    assert seen["columns"] == [float(i) for i in idx] and seen["captions"] == [prompts[i] for i in idx]
    assert seen["notes"][0] == [f"base {float(i):.2f}" for i in idx]


def test_covering_is_the_same_in_every_process():
    """The picks do not depend on Python's per-process string hashing (set order): two processes with different
    PYTHONHASHSEEDs pick the same prompts, and ties go to the earlier prompt exactly."""
    import os
    import subprocess
    import sys

    code = ("from spo_fast.evaluation import grids; from spo_fast.toyworld import world; "
            "print(grids.covering(world.prompts('heldout')[:64], 8))")
    picks = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3", "4")}
    assert len(picks) == 1 and picks == {str(grids.covering(world.prompts("heldout")[:64], 8)) + "\n"}
    assert grids.covering(["red circle", "blue square", "red square", "blue circle"], 4)[:2] == [0, 1]
