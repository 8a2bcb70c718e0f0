"""The toy world: prompts and split, renderer, ground-truth score (spo_fast.toyworld.world)."""
import dataclasses
import hashlib
import itertools
import re
import time

import pytest
import torch

from spo_fast.toyworld import world as w

VOCAB = {"color": w.COLORS, "shape": w.SHAPES, "size": w.SIZES, "position": w.POSITIONS, "background": w.BACKGROUNDS}
ATTRS = w.all_attributes()
HELDOUT_SHA256 = "e030ea418e834b0322705f27755b109b5d720a24279c96999d916774d507bc16"  # pins the split


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quality(n: int, field: str | None = None, value: float | torch.Tensor = 1.0) -> torch.Tensor:
    q = torch.ones(n, len(w.QUALITY_FIELDS))
    if field is not None:
        q[:, w.QUALITY_FIELDS.index(field)] = value
    return q


def _flat(rgb: torch.Tensor, size: int = w.RESOLUTION) -> torch.Tensor:
    """(N, 3) colours in [0, 1] -> flat (N, 3, size, size) images in [-1, 1]."""
    return (rgb * 2 - 1).view(-1, 3, 1, 1).expand(-1, 3, size, size).contiguous()


def _rgb(table: dict, keys) -> torch.Tensor:
    return torch.tensor([table[k] for k in keys], dtype=torch.float32)


# ----------------------------------------------------------------------------- prompts and split
def test_all_attributes_is_the_full_product_in_a_fixed_order():
    assert len(ATTRS) == 8 * 4 * 2 * 5 * 4 == 1280
    assert len(set(ATTRS)) == 1280 and len({a.prompt for a in ATTRS}) == 1280
    assert (len(w.COLORS), len(w.SHAPES), len(w.SIZES), len(w.POSITIONS), len(w.BACKGROUNDS)) == (8, 4, 2, 5, 4)
    assert w.all_attributes() == ATTRS
    assert ATTRS[0] == w.Attributes(w.COLORS[0], w.SHAPES[0], w.SIZES[0], w.POSITIONS[0], w.BACKGROUNDS[0])


def test_split_is_a_deterministic_hash_partition_with_every_value_on_both_sides():
    train, held = w.split("train"), w.split("heldout")
    assert len(train) + len(held) == 1280 and not set(train) & set(held)
    assert 160 <= len(held) <= 0.2 * 1280
    assert w.split("heldout") == held and w.prompts("heldout") == [a.prompt for a in held]
    # a stable hash: the same prompts in every process (Python's salted hash() would change them per process)
    digest = hashlib.sha256("\n".join(w.prompts("heldout")).encode()).hexdigest()
    assert (len(held), digest) == (192, HELDOUT_SHA256)
    for field, vocab in VOCAB.items():
        for part in (train, held):
            assert {getattr(a, field) for a in part} == set(vocab), field


def test_split_rejects_unknown_names_listing_the_accepted_ones():
    with pytest.raises(ValueError, match="x.*train.*heldout"):
        w.split("x")
    with pytest.raises(ValueError, match="train.*heldout"):
        w.prompts("test")


def test_prompt_template_and_round_trip():
    assert ATTRS[0].prompt == "a small red circle on the left, black background"
    assert w.Attributes("cyan", "diamond", "large", "center", "navy").prompt == \
        "a large cyan diamond in the center, navy background"
    for a in ATTRS:
        p = a.prompt
        assert re.fullmatch(r"[a-z ,]+", p) and p.count(",") == 1
        tokens = re.findall(r"[a-z]+", p)
        for field in VOCAB:
            assert tokens.count(getattr(a, field)) == 1, (p, field)
        assert w.parse_prompt(p) == a


@pytest.mark.parametrize("text", ["a small red circle", "a huge red circle on the left, black background",
                                  "a small white circle on the left, black background",
                                  "a small red circle on the left, red background",
                                  "A small red circle on the left, black background",
                                  "a small red circle on the left, black background ", ""])
def test_parse_prompt_names_the_text_it_rejects(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        w.parse_prompt(text)


def test_attributes_reject_unknown_values():
    with pytest.raises(ValueError, match="color='white'"):
        w.Attributes("white", "circle", "small", "left", "black")
    with pytest.raises(ValueError, match="position='middle'"):
        w.Attributes("red", "circle", "small", "middle", "black")


def test_words_are_exactly_the_prompt_tokens():
    used = {t for a in ATTRS for t in re.findall(r"[a-z]+", a.prompt)}
    assert set(w.words()) == used and len(w.words()) == len(used)
    assert w.words() == sorted(w.words())


# ----------------------------------------------------------------------------- renderer
def test_render_is_deterministic_and_seed_dependent():
    a = ATTRS[::10]
    q = w.sample_quality(len(a), _gen(1))
    x1, x2 = w.render(a, _gen(7), q), w.render(a, _gen(7), q)
    assert torch.equal(x1, x2)
    x3 = w.render(a, _gen(8), q)
    assert not torch.equal(x1, x3)
    assert ((x1 - x3).abs().flatten(1).amax(1) > 0.1).float().mean() > 0.9  # nearly every image differs visibly
    assert torch.equal(w.sample_quality(5, _gen(3)), w.sample_quality(5, _gen(3)))


def test_render_shape_range_and_ideal_default():
    a = ATTRS[:64]
    x = w.render(a, _gen(0))
    assert x.shape == (64, 3, w.RESOLUTION, w.RESOLUTION) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, w.render(a, _gen(0), torch.ones(64, 3)))
    q = w.render(a, _gen(0), w.sample_quality(64, _gen(1)))
    assert q.min() >= -1 and q.max() <= 1
    assert w.render(a[:3], _gen(0), size=40).shape == (3, 3, 40, 40)
    with pytest.raises(ValueError, match="quality"):
        w.render(a, _gen(0), torch.ones(64, 2))


def test_render_colours_background_and_object_inside_the_image():
    x = (w.render(ATTRS, _gen(0)) + 1) / 2
    bg = _rgb(w.BACKGROUND_RGB, [a.background for a in ATTRS])
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)  # (N, 3, 4R)
    assert (border - bg.unsqueeze(-1)).abs().max() < 1e-6  # every object, large ones at the edges too, stays inside
    # the most object-like pixel carries the named colour (+- the 0.05 colour jitter)
    dist = (x - bg.view(-1, 3, 1, 1)).norm(dim=1).flatten(1)
    px = x.flatten(2).gather(2, dist.argmax(1).view(-1, 1, 1).expand(-1, 3, 1)).squeeze(2)
    assert (px - _rgb(w.COLOR_RGB, [a.color for a in ATTRS])).abs().max() <= 0.05 + 1e-5


def test_render_places_positions_and_sizes():
    x = (w.render(ATTRS, _gen(0)) + 1) / 2
    bg = _rgb(w.BACKGROUND_RGB, [a.background for a in ATTRS])
    m = ((x - bg.view(-1, 3, 1, 1)).norm(dim=1) > 0.2).float()
    area = m.sum((1, 2))
    c = torch.arange(w.RESOLUTION) + 0.5
    cx, cy = (m.sum(1) * c).sum(1) / area, (m.sum(2) * c).sum(1) / area

    def mean(values, field, value):
        return torch.stack([v for v, a in zip(values, ATTRS) if getattr(a, field) == value]).mean()

    assert mean(cx, "position", "left") + 3 < mean(cx, "position", "center") < mean(cx, "position", "right") - 3
    assert mean(cy, "position", "top") + 3 < mean(cy, "position", "center") < mean(cy, "position", "bottom") - 3
    for s in w.SHAPES:
        small = torch.stack([v for v, a in zip(area, ATTRS) if a.shape == s and a.size == "small"])
        large = torch.stack([v for v, a in zip(area, ATTRS) if a.shape == s and a.size == "large"])
        assert small.max() < large.min(), s  # the sizes never overlap, jitter included
    assert small.min() > 12  # radius >= ~4 px: even the smallest triangles have some area


def test_quality_fields_degrade_what_they_name():
    a = ATTRS[::5]
    n = len(a)
    ideal = w.render(a, _gen(3))
    bg = _rgb(w.BACKGROUND_RGB, [x.background for x in a]).view(-1, 3, 1, 1) * 2 - 1

    def edge(x):  # steepest step between neighbouring pixels
        return torch.maximum(x.diff(dim=3).abs().flatten(1).amax(1), x.diff(dim=2).abs().flatten(1).amax(1))

    blurry = w.render(a, _gen(3), _quality(n, "sharpness", 0.0))
    assert (edge(ideal) > 2 * edge(blurry)).all()
    assert (edge(w.render(a, _gen(3), _quality(n, "sharpness", 0.5))) > edge(blurry)).all()
    pale = w.render(a, _gen(3), _quality(n, "saturation", 0.0))

    def chroma(x):  # of the most object-like pixel
        d = (x - bg).norm(dim=1).flatten(1).argmax(1)
        px = x.flatten(2).gather(2, d.view(-1, 1, 1).expand(-1, 3, 1)).squeeze(2)
        return (px - px.mean(1, keepdim=True)).norm(dim=1)

    assert (chroma(pale) < 0.6 * chroma(ideal)).all()
    noisy = w.render(a, _gen(3), _quality(n, "cleanliness", 0.0))
    corner = (noisy - bg)[:, :, :3, :3].flatten(1)
    assert (corner.std(1) > 0.05).all() and ((ideal - bg)[:, :, :3, :3] == 0).all()
    # the layout depends on the seed only: the object covers the same pixels whatever the quality
    assert ((ideal - bg).abs().sum(1) > 1e-3).ne((pale - bg).abs().sum(1) > 1e-3).float().mean() < 1e-3


def test_sample_quality_is_broad():
    q = w.sample_quality(4000, _gen(0))
    assert q.shape == (4000, len(w.QUALITY_FIELDS)) == (4000, 3)
    assert q.min() >= 0 and q.max() <= 1
    assert (q < 0.2).float().mean(0).min() > 0.1 and (q > 0.8).float().mean(0).min() > 0.1


def test_colours_are_distinguishable_from_each_other_and_from_every_background():
    col = {k: torch.tensor(v) for k, v in w.COLOR_RGB.items()}
    bgs = {k: torch.tensor(v) for k, v in w.BACKGROUND_RGB.items()}
    assert not set(col) & set(bgs)
    luma = torch.tensor([0.299, 0.587, 0.114])
    for (cn, c), (bn, b) in itertools.product(col.items(), bgs.items()):
        assert (c - b).norm() >= 0.45, (cn, bn)
        assert (c + 0.6 * (c @ luma - c) - b).norm() >= 0.2, (cn, bn)  # fully desaturated, too
    for (an, a), (bn, b) in itertools.combinations(col.items(), 2):
        assert (a - b).norm() >= 0.4, (an, bn)
    for (an, a), (bn, b) in itertools.combinations(bgs.items(), 2):
        assert (a - b).norm() >= 0.3, (an, bn)


# ----------------------------------------------------------------------------- ground truth
def _mismatch(field: str, seed: int) -> tuple[list, list]:
    g = _gen(seed)
    alt = []
    for a in ATTRS:
        others = [v for v in VOCAB[field] if v != getattr(a, field)]
        alt.append(dataclasses.replace(a, **{field: others[int(torch.randint(len(others), (1,), generator=g))]}))
    return ATTRS, alt


@pytest.mark.parametrize("field", list(VOCAB))
def test_score_prefers_the_matching_image_for_each_attribute(field):
    true, alt = _mismatch(field, seed=11)
    s_true = w.score(w.render(true, _gen(5)), true)
    s_alt = w.score(w.render(alt, _gen(5)), true)  # same seed: same jitter, one attribute changed
    win = (s_true > s_alt).float().mean().item()
    assert win >= 0.95, (field, win)
    assert s_true.mean() > s_alt.mean() + 0.5
    # the component of that attribute itself ranks them
    comp = {"color": "color", "shape": "shape", "size": "size", "position": "position", "background": "background"}
    c_true = w.score_components(w.render(true, _gen(5)), true)[comp[field]]
    c_alt = w.score_components(w.render(alt, _gen(5)), true)[comp[field]]
    assert (c_true > c_alt).float().mean() >= 0.95


def test_score_prefers_the_matching_image_under_mixed_quality_on_average():
    q = w.sample_quality(len(ATTRS), _gen(2))
    for field in VOCAB:
        true, alt = _mismatch(field, seed=12)
        s_true, s_alt = w.score(w.render(true, _gen(6), q), true), w.score(w.render(alt, _gen(6), q), true)
        assert (s_true > s_alt).float().mean() >= 0.85, field
        assert s_true.mean() > s_alt.mean() + 0.5, field


@pytest.mark.parametrize("size", w.SIZES)
def test_shape_component_separates_all_four_shapes(size):
    base = [a for a in ATTRS if a.size == size and a.shape == "circle"]  # 160 colour/position/background combos
    for true, other in itertools.permutations(w.SHAPES, 2):
        drawn = [dataclasses.replace(a, shape=true) for a in base]
        x = w.render(drawn, _gen(4))
        right = w.score_components(x, drawn)["shape"]
        wrong = w.score_components(x, [dataclasses.replace(a, shape=other) for a in base])["shape"]
        assert (right > wrong).all(), (size, true, other)
        assert right.mean() > 0.8 and wrong.mean() < 0.3, (size, true, other, right.mean(), wrong.mean())


@pytest.mark.parametrize("field", w.QUALITY_FIELDS)
def test_ideal_quality_scores_higher_than_degraded(field):
    n = len(ATTRS)
    ideal = w.score(w.render(ATTRS, _gen(8)), ATTRS)
    worst = w.score(w.render(ATTRS, _gen(8), _quality(n, field, 0.0)), ATTRS)
    partial = w.score(w.render(ATTRS, _gen(8), _quality(n, field, torch.rand(n, generator=_gen(9)) * 0.5)), ATTRS)
    for degraded in (worst, partial):
        assert (ideal > degraded).float().mean() >= 0.9, field
        assert ideal.mean() > degraded.mean() + 0.3, field
    assert partial.mean() > worst.mean(), field  # and less degradation is better


def test_degenerate_images_score_low():
    a = ATTRS[::4]
    n = len(a)
    ideal = w.score(w.render(a, _gen(0)), a)
    g = _gen(1)
    cases = {
        "uniform noise": torch.rand(n, 3, w.RESOLUTION, w.RESOLUTION, generator=g) * 2 - 1,
        "gaussian noise": torch.randn(n, 3, w.RESOLUTION, w.RESOLUTION, generator=g).clamp(-1, 1),
        "background only": _flat(_rgb(w.BACKGROUND_RGB, [x.background for x in a])),
        "object colour only": _flat(_rgb(w.COLOR_RGB, [x.color for x in a])),
        "gray": _flat(torch.full((n, 3), 0.5)),
    }
    for name, x in cases.items():
        s = w.score(x, a)
        assert (s < 0.5 * ideal).all() and s.mean() < 0.3 * ideal.mean(), (name, s.mean().item())
        comp = w.score_components(x, a)
        for k in ("color", "shape", "size", "position"):
            assert comp[k].max() < 0.2, (name, k)


def test_score_range_components_and_batching():
    a = ATTRS[::16]
    n = len(a)
    g = _gen(2)
    x = torch.cat([w.render(a, _gen(0)), w.render(a, _gen(0), w.sample_quality(n, g)),
                   torch.rand(n, 3, w.RESOLUTION, w.RESOLUTION, generator=g) * 2 - 1,
                   torch.randint(0, 2, (n, 3, w.RESOLUTION, w.RESOLUTION), generator=g).float() * 2 - 1,
                   _flat(torch.rand(n, 3, generator=g))])
    attrs = a * 5
    s, comp = w.score(x, attrs), w.score_components(x, attrs)
    assert s.shape == (len(x),) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert s.min() >= 0 and s.max() <= 10
    assert set(comp) == set(w.WEIGHTS) and sum(w.WEIGHTS.values()) == pytest.approx(10)
    assert 6.5 <= sum(w.WEIGHTS[k] for k in ("background", "color", "position", "size", "shape")) <= 7.5
    for k, v in comp.items():
        assert v.shape == (len(x),) and v.min() >= 0 and v.max() <= 1, k
    assert torch.allclose(s, sum(w.WEIGHTS[k] * comp[k] for k in w.WEIGHTS), atol=1e-5)
    one_by_one = torch.cat([w.score(x[i:i + 1], attrs[i:i + 1]) for i in range(0, len(x), 7)])
    assert torch.allclose(one_by_one, s[::7], atol=1e-4)
    assert torch.allclose(w.score_prompts(x, [p.prompt for p in attrs]), s)
    assert torch.equal(w.score(x, attrs), s)  # deterministic
    assert torch.isfinite(w.score(torch.full((2, 3, w.RESOLUTION, w.RESOLUTION), float("nan")), attrs[:2])).all()
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        w.score_prompts(x[:1], ["a cat"])
    with pytest.raises(ValueError, match=r"\(N, 3, R, R\)"):
        w.score(x[0], attrs[:1])


def test_score_ignores_nuisance_and_sees_a_shifted_object():
    a = ATTRS[::8]
    x = w.render(a, _gen(0))
    s = w.score(x, a)
    # small global changes barely move it; moving the object away from its anchor costs
    assert (w.score((x + 0.02 * torch.randn(x.shape, generator=_gen(1))).clamp(-1, 1), a) - s).abs().mean() < 0.5
    bg = _rgb(w.BACKGROUND_RGB, [x.background for x in a]).view(-1, 3, 1, 1) * 2 - 1
    faded = bg + 0.15 * (x - bg)
    assert (w.score(faded, a) < s - 2).all()


def test_viewing_helpers():
    x = w.render(ATTRS[:5], _gen(0))
    img = w.to_pil(x[0])
    assert img.size == (w.RESOLUTION, w.RESOLUTION) and img.mode == "RGB"
    assert w.to_pil(torch.full((3, 2, 2), -1.0)).getpixel((0, 0)) == (0, 0, 0)
    assert w.to_pil(torch.ones(3, 2, 2)).getpixel((1, 1)) == (255, 255, 255)
    gr = w.grid(x, nrow=4)
    assert gr.size == (4 * (w.RESOLUTION + 2) + 2, 2 * (w.RESOLUTION + 2) + 2)
    assert w.grid(x, nrow=4, scale=3).size == (3 * gr.size[0], 3 * gr.size[1])


def test_report_score_statistics_and_timing():
    """Not an assertion of the numbers: prints them (pytest -s) for the README."""
    n = 1024
    a = [ATTRS[i] for i in torch.randperm(len(ATTRS), generator=_gen(0))[:n].tolist()]
    t0 = time.perf_counter()
    ideal = w.render(a, _gen(1))
    t1 = time.perf_counter()
    s_ideal = w.score(ideal, a)
    t2 = time.perf_counter()
    mixed = w.score(w.render(a, _gen(1), w.sample_quality(n, _gen(2))), a)
    noise = w.score(torch.rand(n, 3, w.RESOLUTION, w.RESOLUTION, generator=_gen(3)) * 2 - 1, a)
    mism = {f: w.score(w.render(alt, _gen(5)), true).mean().item()
            for f in VOCAB for true, alt in [_mismatch(f, seed=11)]}
    print(f"\ntoy-world GT score (0-10): ideal {s_ideal.mean():.2f} +- {s_ideal.std():.2f}, "
          f"sample_quality {mixed.mean():.2f} +- {mixed.std():.2f}, uniform noise {noise.mean():.2f}; "
          "one attribute wrong: " + ", ".join(f"{k} {v:.2f}" for k, v in mism.items()))
    print(f"render {n}: {t1 - t0:.3f} s, score {n}: {t2 - t1:.3f} s")
    assert s_ideal.mean() > mixed.mean() > noise.mean()
