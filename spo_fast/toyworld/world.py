"""The toy world: compositional prompts, a renderer of matching images and a ground-truth score.

World
    One object on a plain background. A prompt names five attributes, one word each::

        a {size} {color} {shape} {where}, {background} background
        e.g. "a small red circle on the left, black background"
             "a large cyan diamond in the center, navy background"

    where ``{where}`` is "on the left", "on the right", "at the top", "at the bottom" or "in the
    center". Vocabularies: 8 object colours (COLORS), 4 shapes (SHAPES), 2 sizes (SIZES), 5
    positions (POSITIONS), 4 backgrounds (BACKGROUNDS): 8*4*2*5*4 = 1280 prompts (all_attributes).
    Colour and background words are disjoint, so every prompt parses unambiguously (parse_prompt).

Split
    ``split("heldout")`` holds a prompt out when the first 8 bytes of sha256(prompt), read as a
    big-endian integer, fall in the lowest 15% of their range (a stable hash, not Python's salted
    ``hash``): 192 held-out and 1088 train prompts. Every attribute value occurs in both splits.

Renderer (``render``)
    Images are float32 (N, 3, R, R) RGB in [-1, 1] (-1 = black), R = RESOLUTION = 24 by default.
    Shapes are signed distance functions with a 1-px linear anti-aliased edge: a circle of radius
    r, an axis-aligned square of half-side 0.88 r (about the circle's area), a diamond (square
    turned 45 deg) of vertex distance 1.2 r and an upward equilateral triangle of circumradius
    1.2 r, each placed by its area centroid; r = 0.17 R (small, 4.1 px) or 0.27 R (large, 6.5 px).
    Position anchors: left (0.27 R, 0.5 R), right (0.73 R, 0.5 R), top (0.5 R, 0.27 R), bottom
    (0.5 R, 0.73 R), center (0.5 R, 0.5 R). Nuisance variation drawn from the generator: position
    jitter uniform +-1.5 px (at R = 24) per axis, radius jitter +-15%, object colour jitter +-0.05
    per channel. The centre is then clamped so the whole shape, anti-aliased edge included, stays inside the image (so a
    large object at an edge sits a little further in; ``anchor`` gives the un-jittered centre).
    Every random draw is made whatever the quality, so a seed fixes the layout and the quality
    changes only the look; the same generator state and inputs give bit-identical images.

    Picture quality, per image, the columns of ``quality`` (N, Q) in [0, 1], 1 = best
    (QUALITY_FIELDS):
      * sharpness:   Gaussian blur of the whole picture, sigma = 1.5 (1 - q) px (at R = 24);
      * saturation:  the object colour mixed 0.6 (1 - q) of the way to the gray of its own luminance;
      * cleanliness: Gaussian noise of std 0.15 (1 - q) per pixel and channel (RGB in [0, 1] units)
                     added to the background after the blur.
    ``quality=None`` is the ideal render (all ones); ``sample_quality`` draws training-image
    quality with each field independently uniform in [0, 1], so the data mixes good and bad pictures.

Ground-truth score (``score``, ``score_components``)
    The stand-in for human raters, a function of the pixels and the prompt's attributes only:
    ``score = sum(WEIGHTS[k] * components[k])`` in [0, 10], every component in [0, 1].
    ``measure`` first reads the picture without the prompt: the background colour and noise level
    (median and 75th-percentile deviation of the 2-px border ring), the object colour (the pixels
    most different from the background), a soft object mask (the unmixing coefficient
    x = b + a (c - b) of a lightly blurred copy, ramped over a in 0.3..0.7, raised above the
    background's noise), its area and centroid, the soft IoU with each shape placed at that
    centroid with that area, and the edge width (fraction of mixed pixels around the edge).
    Distances are turned into closeness by ``0.8 exp(-(d/s)^2) + 0.2 exp(-d/t)`` (``_closeness``:
    the long tail keeps far-off attempts ranked). Components (weight):

      fidelity (7)
        background (1.0)  measured vs named background colour (RGB distance; s 0.2, t 0.5).
        color      (1.5)  measured object colour vs the segment from the named colour to its
                          60%-desaturated version (desaturation is the saturation term's business).
        position   (1.5)  centroid vs ``anchor`` (px; s 0.13 R, t 0.25 R).
        size       (1.5)  |ln(area / nominal area of the named shape and size)| (s 0.5, t 1.0);
                          the two sizes differ by ln 2.5 = 0.92 in area.
        shape      (1.5)  soft IoU with the named shape, linear from 0.7 -> 0 to 0.9 -> 1 (ideal
                          renders: 0.9-0.99 for their own shape, <= 0.86 for any other), times
                          clamp(0.5 + (IoU_named - best other IoU) / 0.1, 0, 1).
      aesthetic (3)
        sharpness  (1.0)  edge width, linear from 0.85 -> 0 to 0.30 -> 1 (crisp renders 0.2-0.4,
                          sigma 1.5 px blur about 0.8).
        saturation (1.0)  chroma (norm of the colour minus its channel mean) of the object colour
                          relative to the named colour's, linear from 0.4 -> 0 to 0.9 -> 1.
        cleanliness (1.0) 1 / (1 + (noise / 0.05)^2) of the border ring's noise std.

    Every object term (all but background and cleanliness) is multiplied by the *objectness* gate
    of ``measure``: 1 for a visible (contrast >= 0.23), compact (the best shape IoU >= 0.8) object
    of plausible area (0.3x the smallest to 2x the largest nominal area), falling to 0 for an empty
    picture, a picture of one colour or noise: those score about 2 (a clean, right background),
    1 and 0.3. Ideal renders score 9.5 on average, renders of ``sample_quality`` 7.7, and an
    ideal render with one attribute wrong 7.6-8.6 against the true prompt.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RESOLUTION = 24

COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "orange": (0.95, 0.50, 0.05),
    "purple": (0.60, 0.10, 0.80),
    "cyan": (0.05, 0.80, 0.85),
    "pink": (0.95, 0.45, 0.70),
}
BACKGROUND_RGB: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
    "navy": (0.05, 0.05, 0.30),
}
COLORS = tuple(COLOR_RGB)
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = tuple(BACKGROUND_RGB)
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}

QUALITY_FIELDS = ("sharpness", "saturation", "cleanliness")
WEIGHTS: dict[str, float] = {"background": 1.0, "color": 1.5, "position": 1.5, "size": 1.5, "shape": 1.5,
                             "sharpness": 1.0, "saturation": 1.0, "cleanliness": 1.0}

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.15

# geometry, in units of the image side R (pixel centres at (i + 0.5))
RADIUS = {"small": 0.17, "large": 0.27}
ANCHOR = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
# per shape: its scale (half-side, vertex distance, circumradius) in units of r, area in units of r^2, and
# extents from the centroid (half-width, up, down) in units of r
_SCALE = {"circle": 1.0, "square": 0.88, "triangle": 1.2, "diamond": 1.2}
_AREA = {"circle": math.pi, "square": (2 * 0.88) ** 2, "triangle": 3 * math.sqrt(3) / 4 * 1.2 ** 2,
         "diamond": 2 * 1.2 ** 2}
_EXTENT = {"circle": (1.0, 1.0, 1.0), "square": (0.88, 0.88, 0.88), "triangle": (1.2 * math.sqrt(3) / 2, 1.2, 0.6),
           "diamond": (1.2, 1.2, 1.2)}
_POS_JITTER = 1.5 / 24  # +-, in units of R
_SIZE_JITTER = 0.15
_COLOR_JITTER = 0.05
_MARGIN = 1.0  # px between the shape and the image border: its anti-aliased edge stays off the border pixels
_MAX_BLUR = 1.5 / 24  # sigma at sharpness 0, in units of R
_DESATURATE = 0.6
_TEXTURE_STD = 0.15
_LUMA = (0.299, 0.587, 0.114)

_PROMPT_RE = re.compile(
    r"a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) (?P<where>on the left|on the right|at the top|at the bottom"
    r"|in the center), (?P<background>\w+) background")


@dataclass(frozen=True)
class Attributes:
    """One toy-world prompt's attributes (each a word of its vocabulary; ValueError otherwise)."""

    color: str
    shape: str
    size: str
    position: str
    background: str

    def __post_init__(self):
        for field, vocab in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS),
                             ("background", BACKGROUNDS)):
            if getattr(self, field) not in vocab:
                raise ValueError(f"Attributes.{field}={getattr(self, field)!r}: accepted: {', '.join(vocab)}")

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {POSITION_PHRASES[self.position]}, {self.background} background"


_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def parse_prompt(text: str) -> Attributes:
    """The attributes of a toy prompt (the inverse of ``Attributes.prompt``); ValueError for any other text."""
    m = _PROMPT_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None or m["size"] not in SIZES or m["color"] not in COLORS or m["shape"] not in SHAPES \
            or m["background"] not in BACKGROUNDS:
        raise ValueError(f"not a toy-world prompt: {text!r} (expected e.g. {all_attributes()[0].prompt!r})")
    return Attributes(m["color"], m["shape"], m["size"], _PHRASE_TO_POSITION[m["where"]], m["background"])


def all_attributes() -> list[Attributes]:
    """All 1280 attribute combinations, in the fixed order of the vocabularies (colour slowest)."""
    return [Attributes(*a) for a in itertools.product(COLORS, SHAPES, SIZES, POSITIONS, BACKGROUNDS)]


def _is_heldout(prompt: str) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h < HELDOUT_FRACTION * 2 ** 64


def split(name: str) -> list[Attributes]:
    """The ``train`` or ``heldout`` prompts' attributes (deterministic, by a stable hash of the prompt)."""
    if name not in SPLITS:
        raise ValueError(f"unknown toy-world split {name!r}; accepted: {', '.join(SPLITS)}")
    held = name == "heldout"
    return [a for a in all_attributes() if _is_heldout(a.prompt) == held]


def prompts(name: str) -> list[str]:
    """The prompts of split ``name`` (``train`` or ``heldout``), in the order of ``all_attributes``."""
    return [a.prompt for a in split(name)]


EVAL_PROMPTS = 64  # prompts in each of the evaluation splits (test, validation)


def probe_prompts() -> list[str]:
    """The base build's probe prompts (``BuildConfig.base_probe_prompts`` of them are sampled while the base trains):
    every other held-out prompt from the 65th on, 64 prompts of yellow, orange, purple, cyan and pink. Fixed, so a
    rebuild reproduces the shipped assets; settings were chosen on them before the evaluation splits below existed,
    so ``test_prompts`` holds none of them."""
    return prompts("heldout")[64:192:2]


def _spread(items: list[str], n: int) -> list[str]:
    """``n`` of ``items`` evenly spaced through the list (the middle of each of n equal stretches)."""
    return [items[(2 * i + 1) * len(items) // (2 * n)] for i in range(n)]


def _colour_quotas(held: list[Attributes], n: int) -> dict[str, int]:
    """Prompts per colour in an n-prompt split: n times the colour's share of the held-out prompts, rounded by largest
    remainder (ties to the colour listed first in COLORS)."""
    counts = {c: sum(a.color == c for a in held) for c in COLORS}
    quotas = {c: n * k // len(held) for c, k in counts.items()}
    by_remainder = sorted(COLORS, key=lambda c: (-(n * counts[c] % len(held)), COLORS.index(c)))
    for c in by_remainder[:n - sum(quotas.values())]:
        quotas[c] += 1
    return quotas


def _round_robin(groups: list[list[str]]) -> list[str]:
    """The groups' items interleaved, each placed at its fraction through its own group (ties in group order): every
    prefix of the result holds the groups in about their proportions."""
    keyed = [((i + 0.5) / len(g), k, p) for k, g in enumerate(groups) for i, p in enumerate(g)]
    return [p for *_, p in sorted(keyed)]


def _evaluation_splits() -> tuple[list[str], list[str]]:
    """(test, validation): EVAL_PROMPTS held-out prompts each, stratified by colour with the same count of every colour
    in both (``_colour_quotas``). Per colour, the test takes its quota evenly spaced (``_spread``, which also spreads
    the shapes, sizes and positions, listed after the colour) among the prompts that are not ``probe_prompts``; the
    validation set takes its quota evenly spaced among the colour's probe prompts where there are enough of them
    (every colour but red, green and blue), else among the colour's prompts the test did not take. Each list is
    ordered colour by colour in turn (``_round_robin``), so any prefix (``eval.n_prompts``, the grid's columns) mixes
    the colours."""
    held = split("heldout")
    probe = set(probe_prompts())
    quotas = _colour_quotas(held, EVAL_PROMPTS)
    test, validation = [], []
    for colour in COLORS:
        mine = [a.prompt for a in held if a.color == colour]
        fresh = [p for p in mine if p not in probe]
        chosen = _spread(fresh, quotas[colour])
        test.append(chosen)
        seen = [p for p in mine if p in probe]
        rest = seen if len(seen) >= quotas[colour] else [p for p in mine if p not in chosen]
        validation.append(_spread(rest, quotas[colour]))
    return _round_robin(test), _round_robin(validation)


def test_prompts() -> list[str]:
    """The reported evaluation's prompts (``toyworld:test``): 64 held-out prompts, every colour in its share of the
    held-out prompts, none of them a probe prompt (``_evaluation_splits``)."""
    return _evaluation_splits()[0]


def validation_prompts() -> list[str]:
    """Where settings are chosen (``toyworld:validation``): 64 other held-out prompts, with the same count of every
    colour as ``test_prompts`` (``_evaluation_splits``)."""
    return _evaluation_splits()[1]


def words() -> list[str]:
    """Every word the prompts use, sorted (the only punctuation in a prompt is one comma)."""
    out = {"a", "background", *COLORS, *SHAPES, *SIZES, *BACKGROUNDS}
    for phrase in POSITION_PHRASES.values():
        out.update(phrase.split())
    return sorted(out)


# ----------------------------------------------------------------------------- geometry
def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(size, dtype=torch.float32) + 0.5
    return c.view(1, 1, size), c.view(1, size, 1)  # x (1, 1, S), y (1, S, 1)


def _offsets(cx: torch.Tensor, cy: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gy = _grid(size)
    return gx - cx.view(-1, 1, 1), gy - cy.view(-1, 1, 1)  # (N, 1, S), (N, S, 1): broadcast to (N, S, S)


def _shape_sdf(shape: str, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (px, < 0 inside) to ``shape`` of scale r (N,) centred (area centroid) at the origin."""
    r = r.view(-1, 1, 1)
    if shape == "circle":
        return torch.sqrt(px * px + py * py) - r
    if shape == "square":
        h = _SCALE["square"] * r
        qx, qy = px.abs() - h, py.abs() - h
        return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    if shape == "triangle":  # equilateral, pointing up (image y points down), exact distance outside too
        k = math.sqrt(3)
        h = _SCALE["triangle"] * r * k / 2  # half the side
        qx, qy = px.abs() - h, -py + h / k
        fold = qx + k * qy > 0
        qx, qy = torch.where(fold, (qx - k * qy) / 2, qx), torch.where(fold, (-k * qx - qy) / 2, qy)
        qx = qx - torch.minimum(torch.maximum(qx, -2 * h), torch.zeros_like(qx))
        return -torch.sqrt(qx * qx + qy * qy) * torch.sign(qy)
    if shape == "diamond":  # a square turned 45 degrees
        u, v = (px + py).abs() / math.sqrt(2), (py - px).abs() / math.sqrt(2)
        h = _SCALE["diamond"] * r / math.sqrt(2)
        qx, qy = u - h, v - h
        return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    raise ValueError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES)}")


def _sdf(shape_idx: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int) -> torch.Tensor:
    """Signed distance of each image's own shape (index into SHAPES), (N, S, S)."""
    px, py = _offsets(cx, cy, size)
    out = torch.zeros(len(shape_idx), size, size)
    for k, s in enumerate(SHAPES):
        sel = shape_idx == k
        if sel.any():
            out[sel] = _shape_sdf(s, px[sel], py[sel], r[sel]).expand(-1, size, size)
    return out


def _coverage(sd: torch.Tensor) -> torch.Tensor:
    return (0.5 - sd).clamp(0, 1)


def _index(values, vocab) -> torch.Tensor:
    return torch.tensor([vocab.index(v) for v in values], dtype=torch.long)


def _table(d: dict, keys) -> torch.Tensor:
    return torch.tensor([d[k] for k in keys], dtype=torch.float32)


def _clamp_centre(cx, cy, r, shape_idx, size: int):
    ext = torch.tensor([_EXTENT[s] for s in SHAPES], dtype=torch.float32)[shape_idx]  # (N, 3)
    half, up, down = ext[:, 0] * r, ext[:, 1] * r, ext[:, 2] * r
    cx = torch.minimum(torch.maximum(cx, half + _MARGIN), size - half - _MARGIN)
    cy = torch.minimum(torch.maximum(cy, up + _MARGIN), size - down - _MARGIN)
    return cx, cy


def anchor(attrs: list[Attributes], size: int = RESOLUTION) -> torch.Tensor:
    """(N, 2) un-jittered object centre (x, y) in px: the position's anchor, clamped inside the image."""
    r = nominal_radius(attrs, size)
    a = torch.tensor([ANCHOR[x.position] for x in attrs], dtype=torch.float32).view(-1, 2) * size
    cx, cy = _clamp_centre(a[:, 0], a[:, 1], r, _index([x.shape for x in attrs], SHAPES), size)
    return torch.stack([cx, cy], 1)


def nominal_radius(attrs: list[Attributes], size: int = RESOLUTION) -> torch.Tensor:
    """(N,) the shape scale r in px of the named size (no jitter); see the module docstring for each shape's."""
    return torch.tensor([RADIUS[x.size] for x in attrs], dtype=torch.float32) * size


def nominal_area(attrs: list[Attributes], size: int = RESOLUTION) -> torch.Tensor:
    """(N,) area in px^2 of the named shape at the named size (no jitter)."""
    return _table(_AREA, [x.shape for x in attrs]) * nominal_radius(attrs, size) ** 2


# ----------------------------------------------------------------------------- renderer
def sample_quality(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, Q) quality of training images: each field independently uniform in [0, 1]."""
    return torch.rand(n, len(QUALITY_FIELDS), generator=generator)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(M, 2 radius + 1) normalised 1-D Gaussians; sigma 0 gives the identity."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma.clamp(min=1e-3).view(-1, 1)) ** 2)
    return k / k.sum(1, keepdim=True)


def _sep_conv(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Separable filter of (N, C, H, W) with per-image taps k (N, K) (or (K,)), replicate padding, as shifted sums."""
    n, _, h, w = x.shape
    taps = k.shape[-1]
    rad = taps // 2
    k = k.view(-1, 1, 1, 1, taps).expand(n, 1, 1, 1, taps)
    y = F.pad(x, (rad, rad, 0, 0), mode="replicate")
    y = sum(k[..., t] * y[..., t:t + w] for t in range(taps))
    y = F.pad(y, (0, 0, rad, rad), mode="replicate")
    return sum(k[..., t] * y[:, :, t:t + h, :] for t in range(taps))


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur of (N, C, H, W) with sigma (N,) px, replicate padding."""
    radius = max(1, math.ceil(3 * float(sigma.max())))
    return _sep_conv(x, _gaussian_kernels(sigma, radius))


def render(attrs: list[Attributes], generator: torch.Generator, quality: torch.Tensor | None = None,
           size: int = RESOLUTION) -> torch.Tensor:
    """(N, 3, size, size) float32 images in [-1, 1] of ``attrs``; ``quality`` (N, Q) in [0, 1] or None (ideal)."""
    n = len(attrs)
    if n == 0:
        return torch.zeros(0, 3, size, size)
    if quality is None:
        quality = torch.ones(n, len(QUALITY_FIELDS))
    quality = quality.detach().float().cpu().clamp(0, 1)
    if quality.shape != (n, len(QUALITY_FIELDS)):
        raise ValueError(f"quality must be ({n}, {len(QUALITY_FIELDS)}) {QUALITY_FIELDS}, got {tuple(quality.shape)}")
    # nuisance draws: always all of them, in this order, so the layout depends on the seed only
    jit_pos = (torch.rand(n, 2, generator=generator) * 2 - 1) * _POS_JITTER * size
    jit_size = 1 + (torch.rand(n, generator=generator) * 2 - 1) * _SIZE_JITTER
    jit_color = (torch.rand(n, 3, generator=generator) * 2 - 1) * _COLOR_JITTER
    texture = torch.randn(n, 3, size, size, generator=generator)

    shape_idx = _index([a.shape for a in attrs], SHAPES)
    r = nominal_radius(attrs, size) * jit_size
    a = torch.tensor([ANCHOR[x.position] for x in attrs], dtype=torch.float32).view(n, 2) * size + jit_pos
    cx, cy = _clamp_centre(a[:, 0], a[:, 1], r, shape_idx, size)
    alpha = _coverage(_sdf(shape_idx, cx, cy, r, size)).unsqueeze(1)  # (N, 1, S, S)

    color = (_table(COLOR_RGB, [x.color for x in attrs]).view(n, 3) + jit_color).clamp(0, 1)
    luma = color @ torch.tensor(_LUMA)
    mix = (_DESATURATE * (1 - quality[:, 1])).view(n, 1)
    color = color + mix * (luma.view(n, 1) - color)
    bg = _table(BACKGROUND_RGB, [x.background for x in attrs]).view(n, 3)

    img = bg.view(n, 3, 1, 1) + alpha * (color - bg).view(n, 3, 1, 1)
    sigma = _MAX_BLUR * size * (1 - quality[:, 0])
    if float(sigma.max()) > 0:
        img = _blur(img, sigma)
        alpha = _blur(alpha, sigma)
    img = img + (_TEXTURE_STD * (1 - quality[:, 2])).view(n, 1, 1, 1) * texture * (1 - alpha)
    return (img.clamp(0, 1) * 2 - 1).contiguous()


# ----------------------------------------------------------------------------- ground truth
def _ring(size: int) -> torch.Tensor:
    w = max(1, round(size / 12))
    m = torch.ones(size, size, dtype=torch.bool)
    m[w:size - w, w:size - w] = False
    return m


_B3 = torch.tensor([0.25, 0.5, 0.25])


def _blur3(x: torch.Tensor) -> torch.Tensor:
    """Fixed 3x3 binomial blur of (N, C, H, W), replicate padding."""
    return _sep_conv(x, _B3)


def _seg_dist(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of points p (N, 3) from segments a-b (N, 3)."""
    ab = b - a
    t = (((p - a) * ab).sum(1) / (ab * ab).sum(1).clamp(min=1e-8)).clamp(0, 1)
    return (p - (a + t.unsqueeze(1) * ab)).norm(dim=1)


def _chroma(c: torch.Tensor) -> torch.Tensor:
    return (c - c.mean(1, keepdim=True)).norm(dim=1)


def _check_images(images: torch.Tensor) -> tuple[int, int]:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (N, 3, R, R) in [-1, 1], got shape {tuple(images.shape)}")
    if images.shape[-1] < 8:
        raise ValueError(f"images of {images.shape[-1]} px are too small to score (at least 8 px)")
    return images.shape[0], images.shape[-1]


def measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the ground truth reads off the pixels, independent of any prompt (images (N, 3, R, R) in [-1, 1]).

    Keys: ``background_rgb`` (N, 3) and ``object_rgb`` (N, 3) in [0, 1]; ``noise`` (N,) background noise
    std; ``mask`` (N, R, R) soft object mask; ``area`` (N,) px^2; ``centroid`` (N, 2) (x, y) px;
    ``shape_iou`` (N, 4) soft IoU with each of SHAPES at the measured centroid and area; ``edge_width``
    (N,) mean mixed-pixel fraction around the edge (low = crisp); ``contrast`` (N,) object/background RGB
    distance; ``objectness`` (N,) in [0, 1]. NaNs read as mid-gray.
    """
    n, size = _check_images(images)
    x = ((torch.nan_to_num(images.detach().float().cpu()) + 1) / 2).clamp(0, 1)

    # background colour and noise level from the border ring, robustly (the object may touch it)
    ring = _ring(size)
    ring_px = x[:, :, ring]  # (N, 3, K)
    b_est = ring_px.median(-1).values
    # 75th percentile of the distance from the background colour: 2.0 sigma for Gaussian RGB noise
    noise = (ring_px - b_est.unsqueeze(-1)).norm(dim=1).quantile(0.75, dim=1) / 2.0

    # object colour: the pixels most different from the background (on a lightly blurred copy), above the
    # background's own fluctuation
    xs = _blur3(x)
    d = (xs - b_est.view(n, 3, 1, 1)).norm(dim=1)  # (N, S, S)
    floor = 0.05 + 1.9 * d[:, ring].quantile(0.75, dim=1)
    dmax = d.amax((1, 2)).clamp(min=1e-6).view(n, 1, 1)
    w1 = ((d - floor.view(n, 1, 1)) / 0.1).clamp(0, 1) * (d / dmax) ** 8
    c_est = ((x * w1.unsqueeze(1)).sum((2, 3)) + 1e-6 * b_est) / (w1.sum((1, 2)) + 1e-6).unsqueeze(1)
    contrast = (c_est - b_est).norm(dim=1)
    # soft mask from the unmixing coefficient a (x = b + a (c - b), projected) of the blurred copy: a ramp over
    # 0.3..0.7 (its 0.5 level is the edge, blurred or not), raised above the background's projected noise
    cb = (c_est - b_est).view(n, 3, 1, 1) / (contrast ** 2).clamp(min=1e-6).view(n, 1, 1, 1)
    a_s = ((xs - b_est.view(n, 3, 1, 1)) * cb).sum(1)  # (N, S, S)
    a_noise = a_s[:, ring].abs().quantile(0.75, dim=1) / 1.15
    lo = torch.maximum(torch.full_like(a_noise, 0.3), 2.5 * a_noise).view(n, 1, 1)
    m = ((a_s - lo) / 0.4).clamp(0, 1) * (contrast > 0.05).view(n, 1, 1)  # (N, S, S)
    area = m.sum((1, 2))
    a_safe = area.clamp(min=1e-6)
    gx, gy = _grid(size)
    cx, cy = (m * gx).sum((1, 2)) / a_safe, (m * gy).sum((1, 2)) / a_safe

    # agreement with each shape placed at the measured centroid with the measured area
    px, py = _offsets(cx, cy, size)
    ious = []
    for s in SHAPES:
        t = _coverage(_shape_sdf(s, px, py, torch.sqrt(area / _AREA[s])))
        ious.append(torch.minimum(m, t).sum((1, 2)) / torch.maximum(m, t).sum((1, 2)).clamp(min=1e-6))
    ious = torch.stack(ious, 1)  # (N, 4)

    # objectness: a visible, compact object (some shape fits) of plausible area
    all_areas = torch.tensor([_AREA[s] * (RADIUS[z] * size) ** 2 for s in SHAPES for z in SIZES])
    a_lo, a_hi = 0.3 * all_areas.min(), 2.0 * all_areas.max()
    plausible = (area / a_lo).clamp(max=1) * (a_hi / a_safe).clamp(max=1) ** 2
    visible = ((contrast - 0.03) / 0.2).clamp(0, 1)  # every object colour differs from every background by > 0.4
    objectness = ((ious.max(1).values - 0.4) / 0.4).clamp(0, 1) * plausible * visible

    # edge width: fraction of mixed pixels (unmixing coefficient between 0 and 1) in a band around the edge
    alpha = ((x - b_est.view(n, 3, 1, 1)) * cb).sum(1).clamp(0, 1)
    mb = _blur3(_blur3(m.unsqueeze(1))).squeeze(1)
    band = 4 * mb * (1 - mb)
    width = (band * 4 * alpha * (1 - alpha)).sum((1, 2)) / band.sum((1, 2)).clamp(min=1e-6)
    return {"background_rgb": b_est, "object_rgb": c_est, "noise": noise, "mask": m, "area": area,
            "centroid": torch.stack([cx, cy], 1), "shape_iou": ious, "edge_width": width, "objectness": objectness,
            "contrast": contrast}


def _closeness(dist: torch.Tensor, scale: float, tail: float) -> torch.Tensor:
    """1 at distance 0: 0.8 exp(-(dist / scale)^2) + 0.2 exp(-dist / tail) (a long tail keeps far-off attempts ranked)."""
    return 0.8 * torch.exp(-(dist / scale) ** 2) + 0.2 * torch.exp(-dist / tail)


def score_components(images: torch.Tensor, attrs: list[Attributes]) -> dict[str, torch.Tensor]:
    """Each ground-truth component, (N,) in [0, 1] (see the module docstring); images (N, 3, R, R) in [-1, 1]."""
    n, size = _check_images(images)
    if len(attrs) != n:
        raise ValueError(f"{n} images but {len(attrs)} attributes")
    if n == 0:
        return {k: torch.zeros(0) for k in WEIGHTS}
    ms = measure(images)
    target_c = _table(COLOR_RGB, [a.color for a in attrs]).view(n, 3)
    target_b = _table(BACKGROUND_RGB, [a.background for a in attrs]).view(n, 3)
    c_est, area = ms["object_rgb"], ms["area"].clamp(min=1e-6)

    background = _closeness((ms["background_rgb"] - target_b).norm(dim=1), 0.2, 0.5)
    cleanliness = 1 / (1 + (ms["noise"] / 0.05) ** 2)
    # colour: distance to the segment [named colour, its 60%-desaturated version]
    luma = target_c @ torch.tensor(_LUMA)
    desat = target_c + _DESATURATE * (luma.view(n, 1) - target_c)
    color = _closeness(_seg_dist(c_est, target_c, desat), 0.2, 0.5)
    saturation = ((_chroma(c_est) / _chroma(target_c) - 0.4) / 0.5).clamp(0, 1)
    position = _closeness((ms["centroid"] - anchor(attrs, size)).norm(dim=1), 0.09 * size * math.sqrt(2), 0.25 * size)
    size_c = _closeness(torch.log(area / nominal_area(attrs, size)).abs(), 0.35 * math.sqrt(2), 1.0)
    # shape: the named shape fits (soft IoU), and fits better than the other shapes
    ious = ms["shape_iou"]
    k = _index([a.shape for a in attrs], SHAPES).view(n, 1)
    named = ious.gather(1, k).squeeze(1)
    best_other = ious.scatter(1, k, -1.0).max(1).values
    shape = ((named - 0.7) / 0.2).clamp(0, 1) * (0.5 + (named - best_other) / 0.1).clamp(0, 1)
    sharpness = ((0.85 - ms["edge_width"]) / 0.55).clamp(0, 1)

    comp = {"background": background, "color": color, "position": position, "size": size_c, "shape": shape,
            "sharpness": sharpness, "saturation": saturation, "cleanliness": cleanliness}
    for k in ("color", "position", "size", "shape", "sharpness", "saturation"):
        comp[k] = comp[k] * ms["objectness"]
    return {k: v.clamp(0, 1).float() for k, v in comp.items()}


def score(images: torch.Tensor, attrs: list[Attributes]) -> torch.Tensor:
    """(N,) float32 ground-truth score in [0, 10]: sum(WEIGHTS[k] * score_components(images, attrs)[k])."""
    comp = score_components(images, attrs)
    return sum(WEIGHTS[k] * comp[k] for k in WEIGHTS).float()


def score_prompts(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``score`` for toy prompts (ValueError naming any prompt that is not one)."""
    return score(images, [parse_prompt(p) for p in prompts])


# ----------------------------------------------------------------------------- viewing
def to_pil(image: torch.Tensor):
    """(3, H, W) in [-1, 1] -> PIL RGB image."""
    from PIL import Image

    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, scale: int = 1):
    """(N, 3, H, W) in [-1, 1] -> one PIL image, ``nrow`` per row, ``padding`` px of dark gray between, then
    upscaled ``scale`` times (nearest neighbour)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = max(1, math.ceil(n / nrow))
    cols = min(n, nrow)
    canvas = Image.new("RGB", (cols * (w + padding) + padding, rows * (h + padding) + padding), (96, 96, 96))
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas.paste(to_pil(images[i]), (padding + c * (w + padding), padding + r * (h + padding)))
    if scale != 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    return canvas
