"""Labelled image grids: ``eval_grid.png`` (``spo_fast.evaluation.heldout``) and ``samples.png`` (``trainer.sample_grid``).

One column per prompt, one row per model (base above trained), PIL only::

    header line(s): what the grid shows, the mean rewards, the win rate
             | prompt 1 caption | prompt 2 caption | ...      (wrapped to the column width)
    base     | [image]          | [image]          | ...
             | base 3.21        | base 4.02        | ...      (the note under each image)
    trained  | [image]          | [image]          | ...
             | trained 5.08     | trained 3.90     | ...

Images smaller than ``MIN_CELL`` px are upscaled by an integer factor with NEAREST (the 24 px toy images become
144 px cells: every pixel a 6 x 6 block), larger than ``MAX_CELL`` px downscaled (LANCZOS). Text uses Pillow's
built-in font (``ImageFont.load_default``; nothing is downloaded).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


def covering(prompts: Sequence[str], n: int) -> list[int]:
    """Indices of ``n`` of ``prompts`` (in the order picked) that together show as many of their words as possible,
    so a grid of a prompt set's first columns does not show one colour and one shape ``n`` times: each pick is the
    prompt whose words have been shown least (the sum of ``1 / (1 + times shown)`` over its words), ties to the
    earlier prompt. Deterministic: the sums are exact fractions, so neither float rounding nor the order of a set
    (which varies from process to process with Python's string hashing) can break a tie another way; for the toy
    world's held-out prompts 8 picks show every shape, position, size and background of the first 64
    (``tests/test_grids.py``)."""
    words = [set(re.findall(r"[a-z0-9]+", p.lower())) for p in prompts]
    chosen: list[int] = []
    shown: Counter = Counter()
    left = set(range(len(prompts)))
    for _ in range(min(n, len(prompts))):
        best = max(left, key=lambda i: (sum(Fraction(1, 1 + shown[w]) for w in words[i]), -i))
        chosen.append(best)
        left.discard(best)
        shown.update(words[best])
    return chosen


MIN_CELL = 128  # px: smaller images are upscaled (NEAREST, integer factor) to at least this
MAX_CELL = 256  # px: larger images are downscaled to this
FONT_SIZE = 12
PAD = 6  # px between cells and around the grid
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (95, 95, 95)
FRAME = (175, 175, 175)  # 1 px outline around each image (white-background images stay visible)
BETTER = (0, 120, 40)  # a trained note whose reward beats the base's
WORSE = (185, 35, 35)


def cell_size(resolution: int) -> int:
    """The side in px of a grid cell for images of ``resolution`` px."""
    if resolution >= MIN_CELL:
        return min(resolution, MAX_CELL)
    return resolution * math.ceil(MIN_CELL / resolution)


def font(size: int = FONT_SIZE):
    """Pillow's built-in font (a scalable one from Pillow 10.1 on, else the fixed bitmap font)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def to_uint8(images) -> list[np.ndarray]:
    """(N, 3, H, W) float tensor in [-1, 1], or (N, H, W, 3) uint8 array / list of such images -> list of (H, W, 3)
    uint8 arrays."""
    if hasattr(images, "detach"):  # a torch tensor
        arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return list(arr)
    return [np.asarray(im, dtype=np.uint8) for im in images]


def _line_height(fnt) -> int:
    if hasattr(fnt, "getmetrics"):
        ascent, descent = fnt.getmetrics()
        return ascent + descent + 2
    box = fnt.getbbox("Ag|")
    return box[3] - box[1] + 3


def _width(fnt, text: str) -> float:
    return fnt.getlength(text) if hasattr(fnt, "getlength") else fnt.getbbox(text)[2]


def wrap(text: str, width: float, fnt) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` px (explicit newlines kept; a word wider than a line is split)."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if _width(fnt, cand) <= width:
                line = cand
                continue
            if line:
                lines.append(line)
            while _width(fnt, word) > width and len(word) > 1:  # too long alone: split by characters
                cut = 1
                while cut < len(word) and _width(fnt, word[:cut + 1]) <= width:
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


@dataclass
class GridLayout:
    """Where everything goes (px). Cell (r, c) has its top-left corner at ``cell_xy(r, c)``."""

    n_cols: int
    n_rows: int
    cell: int
    line_h: int
    label_w: int
    header_lines: list[str]
    caption_lines: list[list[str]]  # per column
    note_lines: list[list[list[str]]]  # per row, per column

    @property
    def header_h(self) -> int:
        return len(self.header_lines) * self.line_h + (PAD if self.header_lines else 0)

    @property
    def caption_h(self) -> int:
        most = max((len(c) for c in self.caption_lines), default=0)
        return most * self.line_h + (PAD // 2 if most else 0)

    @property
    def note_h(self) -> int:
        return max((len(n) for row in self.note_lines for n in row), default=0) * self.line_h

    @property
    def row_h(self) -> int:
        return self.cell + self.note_h + PAD

    @property
    def top(self) -> int:
        return PAD + self.header_h + self.caption_h

    @property
    def width(self) -> int:
        return self.label_w + self.n_cols * (self.cell + PAD)

    @property
    def height(self) -> int:
        return self.top + self.n_rows * self.row_h

    def cell_xy(self, row: int, col: int) -> tuple[int, int]:
        return self.label_w + col * (self.cell + PAD), self.top + row * self.row_h


def layout(n_cols: int, row_names: Sequence[str], captions: Sequence[str],
           notes: Sequence[Sequence[str]] | None, header: str | None, cell: int, fnt=None) -> GridLayout:
    """The grid's geometry: text wrapped to the column width (captions, notes) or the grid width (header)."""
    fnt = fnt if fnt is not None else font()
    label_w = math.ceil(max((_width(fnt, n) for n in row_names), default=0)) + 2 * PAD
    width = label_w + n_cols * (cell + PAD)
    header_lines = wrap(header, width - 2 * PAD, fnt) if header else []
    caption_lines = [wrap(c, cell, fnt) if c else [] for c in captions]
    note_lines = [[wrap(t, cell, fnt) if t else [] for t in row] for row in (notes or [])]
    return GridLayout(n_cols, len(row_names), cell, _line_height(fnt), label_w, header_lines, caption_lines,
                      note_lines)


def labelled_grid(rows: Sequence, row_names: Sequence[str], captions: Sequence[str],
                  scores_per_row: Sequence[Sequence[str]] | None = None, header: str | None = None,
                  note_colours: Sequence[Sequence[tuple[int, int, int]]] | None = None):
    """A PIL image: one row per entry of ``rows`` (each N images: a (N, 3, H, W) tensor in [-1, 1] or N uint8
    (H, W, 3) arrays), labelled ``row_names`` on the left; column ``c`` captioned ``captions[c]`` above the first
    row; ``scores_per_row[r][c]`` (free text, e.g. ``"base 3.21"``) written under image (r, c), in
    ``note_colours[r][c]`` when given; ``header`` on top. Every row must have ``len(captions)`` images of one
    square size."""
    from PIL import Image, ImageDraw

    imgs = [to_uint8(r) for r in rows]
    n = len(captions)
    if len(imgs) != len(row_names) or any(len(r) != n for r in imgs):
        raise ValueError(f"labelled_grid: {len(imgs)} rows of {[len(r) for r in imgs]} images for "
                         f"{len(row_names)} row names and {n} captions")
    if scores_per_row is not None and (len(scores_per_row) != len(imgs) or any(len(s) != n for s in scores_per_row)):
        raise ValueError("labelled_grid: scores_per_row must hold one text per image")
    res = imgs[0][0].shape[0] if n else 1
    cell = cell_size(res)
    fnt = font()
    lay = layout(n, row_names, captions, scores_per_row, header, cell, fnt)
    canvas = Image.new("RGB", (lay.width, lay.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = PAD
    for line in lay.header_lines:
        draw.text((PAD, y), line, fill=TEXT, font=fnt)
        y += lay.line_h
    for c, lines in enumerate(lay.caption_lines):  # captions bottom-aligned just above the first row
        x, _ = lay.cell_xy(0, c)
        y = lay.top - PAD // 2 - len(lines) * lay.line_h
        for line in lines:
            draw.text((x, y), line, fill=TEXT, font=fnt)
            y += lay.line_h
    resample = Image.NEAREST if cell >= res else Image.LANCZOS
    for r, row in enumerate(imgs):
        _, y0 = lay.cell_xy(r, 0)
        draw.text((PAD, y0 + (cell - lay.line_h) // 2), row_names[r], fill=TEXT, font=fnt)
        for c, im in enumerate(row):
            x, y = lay.cell_xy(r, c)
            pil = Image.fromarray(im)
            draw.rectangle((x - 1, y - 1, x + cell, y + cell), outline=FRAME)
            canvas.paste(pil if pil.size == (cell, cell) else pil.resize((cell, cell), resample), (x, y))
            if scores_per_row is not None:
                colour = note_colours[r][c] if note_colours is not None else MUTED
                ty = y + cell + 1
                for line in lay.note_lines[r][c]:
                    draw.text((x, ty), line, fill=colour, font=fnt)
                    ty += lay.line_h
    return canvas


def compare_colours(base: Sequence[float], trained: Sequence[float]) -> list[list[tuple[int, int, int]]]:
    """Note colours of a base row and a trained row: the trained note green where it beats the base, red where
    it is worse, the base notes muted."""
    return [[MUTED] * len(base),
            [BETTER if t > b else WORSE if t < b else MUTED for b, t in zip(base, trained)]]
