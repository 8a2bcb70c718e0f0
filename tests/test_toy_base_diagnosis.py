"""benchmarks/toy_base_diagnosis.py: the cross-attention's share per token group, on the shipped toy base."""
import pytest
import torch


@pytest.fixture
def mod(bench_script):
    return bench_script("toy_base_diagnosis")


@pytest.fixture(scope="module")
def comp():
    from spo_fast.diffusion.models import load_components, resolve_model_path

    return load_components(str(resolve_model_path("toyworld:base")), "sd15")


def test_token_groups_follow_the_prompt_template(comp, mod):
    from spo_fast.toyworld import world

    tok = comp.tokenizers[0]
    prompts = world.prompts("heldout")
    for prompt in prompts[::7]:
        groups = mod.token_groups(tok, prompt)
        a = world.parse_prompt(prompt)
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert len(groups) == len(ids) and groups[0] == "start" and groups[-1] == "end_and_padding"
        for group, text in (("color", a.color), ("shape", a.shape), ("background", a.background)):
            expected = tok(text, add_special_tokens=False).input_ids
            assert [i for i, g in zip(ids, groups) if g == group] == expected, (prompt, group)
        phrase = tok(world.POSITION_PHRASES[a.position], add_special_tokens=False).input_ids
        assert [i for i, g in zip(ids, groups) if g == "position"] == phrase

    class Merging:  # a tokenizer that tokenizes the whole prompt into one token more than its pieces
        eos_token_id, model_max_length = tok.eos_token_id, tok.model_max_length

        def __call__(self, text, **kw):
            out = tok(text, **kw)
            if "padding" in kw:
                out["input_ids"] = out.input_ids[:1] + out.input_ids[:-1]
            return out

    with pytest.raises(ValueError, match="template"):
        mod.token_groups(Merging(), prompts[0])


def test_text_attention_shares_sum_to_one_and_leave_the_unet_unchanged(comp, mod):
    from spo_fast.toyworld import world

    prompts = world.probe_prompts()[:3]
    x = torch.randn(3, comp.unet.config.in_channels, world.RESOLUTION, world.RESOLUTION,
                    generator=torch.Generator().manual_seed(1))
    embeds = mod.encode_prompts(comp, prompts, "cpu", world.RESOLUTION).embeds
    t = torch.full((3,), 500)
    with torch.no_grad():
        before = comp.unet(x, t, encoder_hidden_states=embeds).sample
    rows = mod.text_attention(comp, prompts, ts=(100, 900))
    with torch.no_grad():
        after = comp.unet(x, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # processors restored
    assert [r["t"] for r in rows] == [100, 900]
    layers = [n for n, _ in comp.unet.named_modules() if n.endswith("attn2")]
    for r in rows:
        assert set(r) == {"t", "all", *layers}
        for name in ("all", *layers):
            shares = [r[name][g] for g in mod.TOKEN_GROUPS]
            assert sum(shares) == pytest.approx(1.0, abs=1e-3) and min(shares) > 0
            assert 0 < r[name]["entropy"] <= 1.0 + 1e-6 and 0 < r[name]["spatial_tv"] < 1.0
            assert 0 <= r[name]["location_tv"] <= r[name]["spatial_tv"] + 1e-6
            assert 0 <= r[name]["location_tv_chance"] <= r[name]["spatial_tv"] + 1e-6
            assert -1.0 <= r[name]["position_alignment"] <= 1.0 and 0 < r[name]["position_alignment_chance_sd"] < 1.0


@pytest.mark.parametrize("ts", ["", "100,x", "1000", "-1,5"])
def test_bad_timesteps_name_the_accepted_ones(ts, capsys, mod):
    with pytest.raises(SystemExit) as e:
        mod.main([f"--ts={ts}"])
    assert e.value.code == 2
    assert f"--ts={ts}" in capsys.readouterr().err


@pytest.mark.parametrize("parts", ["foo", "", "samples,attention"])
def test_bad_parts_name_the_accepted_ones(parts, capsys, mod):
    with pytest.raises(SystemExit) as e:
        mod.main(["--parts", parts])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--parts={parts}" in err and ",".join(mod.PARTS) in err and "layout" in err


def _record(mod, probs):
    """Run ``_AttentionRecorder`` on an attention module stand-in whose probabilities are ``probs`` (B, pixels, L),
    one head; its store and the wrapped processor's output."""

    class Attn:
        heads = 1
        to_q = to_k = staticmethod(lambda x: x)
        head_to_batch_dim = staticmethod(lambda x: x)
        get_attention_scores = staticmethod(lambda q, k, mask: probs)

    store, hidden = {}, torch.zeros(probs.shape[0], probs.shape[1], 4)
    out = mod._AttentionRecorder(lambda attn, h, e, m, t: "inner output", store, "x")(Attn(), hidden, hidden)
    return store, out


@pytest.mark.parametrize("rows, entropy, spatial", [
    ([[1.0, 0.0], [0.0, 1.0]], 0.0, 0.5),  # each pixel reads one token, a different one: all spatial
    ([[0.5, 0.5], [0.5, 0.5]], 1.0, 0.0),  # uniform everywhere
    ([[0.75, 0.25], [0.75, 0.25]], 0.8113, 0.0),  # peaked, but the same at every pixel
])
def test_attention_recorder_by_hand(rows, entropy, spatial, mod):
    probs = torch.tensor([rows])  # (B * heads = 1, pixels = 2, L = 2)

    store, out = _record(mod, probs)
    assert out == "inner output"
    mean, ent, tv, location, _, maps = store["x"]
    torch.testing.assert_close(maps, probs)
    torch.testing.assert_close(mean, probs.mean(dim=1))
    assert ent.item() == pytest.approx(entropy, abs=1e-4) and tv.item() == pytest.approx(spatial, abs=1e-6)
    assert location.item() == pytest.approx(spatial, abs=1e-6)  # one sample: its pattern is the batch's


def test_location_tv_keeps_what_every_sample_shares(mod):
    """Two samples whose pixels read opposite tokens: each varies between pixels (0.5), their mean does not (0)."""
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # (B = 2, pixels, L), heads = 1

    store, _ = _record(mod, probs)
    _, _, tv, location, chance, _ = store["x"]
    torch.testing.assert_close(tv, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(location, torch.zeros(2))
    assert 0 <= chance[0].item() <= 0.5


def test_position_alignment_by_hand(mod):
    """Maps that peak at each prompt's anchor align (0.80, not 1: subtracting the five maps' mean changes each one's
    shape), maps that peak away from it anti-align as much, and maps that ignore the word give 0."""
    from spo_fast.toyworld import world

    side = 6
    centres = (torch.arange(side) + 0.5) / side
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    positions = [p for p in world.ANCHOR for _ in range(3)]
    closeness = torch.stack([-((x - world.ANCHOR[p][0]) ** 2 + (y - world.ANCHOR[p][1]) ** 2).sqrt().flatten()
                             for p in positions])
    aligned = mod.position_alignment(closeness, positions)
    assert 0.75 < aligned < 0.85
    assert mod.position_alignment(-closeness, positions) == pytest.approx(-aligned, abs=1e-6)
    shuffled = [positions[(i + 3) % len(positions)] for i in range(len(positions))]  # each map under another word
    assert mod.position_alignment(closeness, shuffled) < 0.5 * aligned
    same = closeness[:1].expand_as(closeness)  # every prompt's map the same: the word changes nothing
    assert mod.position_alignment(same, positions) == 0.0
    with pytest.raises(ValueError, match="square"):
        mod.position_alignment(torch.zeros(2, 10), ["left", "right"])


def test_position_lean_by_hand(mod):
    from spo_fast.toyworld import world

    attrs = [world.Attributes("red", "circle", "small", p, "black") for p in world.POSITIONS]
    anchor = world.anchor(attrs)
    centre = torch.full_like(anchor, world.RESOLUTION / 2)
    sided = [a.position != "center" for a in attrs]
    for centroids, expected in ((anchor, 1.0), (centre, 0.0), (2 * centre - anchor, -1.0),
                                (centre + 0.5 * (anchor - centre), 0.5)):
        lean = mod.position_lean(centroids, attrs, world.RESOLUTION)
        assert torch.allclose(lean[sided], torch.full((4,), expected), atol=1e-5), (expected, lean)
        assert lean[[not s for s in sided]].isnan().all()
    # a move across the named direction does not count: left's direction is x, so a move in y leaves 1
    left = [a for a in attrs if a.position == "left"]
    moved = world.anchor(left) + torch.tensor([[0.0, 3.0]])
    assert mod.position_lean(moved, left, world.RESOLUTION).item() == pytest.approx(1.0)


def test_layout_ends_at_the_build_sampler_s_samples(comp, mod):
    from spo_fast.toyworld import build, world

    prompts = world.probe_prompts()[:6]
    rows = mod.layout(comp, prompts, num_steps=3, record=(0, 2))
    assert [r["step"] for r in rows] == [0, 2, "final"] and rows[0]["t"] > rows[1]["t"] > 0
    images = build.sample_batch(comp, prompts, 300, num_steps=3, noise="torch")  # fp32, torch.randn step noise
    m = world.measure(images)
    attrs = [world.parse_prompt(p) for p in prompts]
    final = rows[-1]
    assert final["anchor_distance"] == pytest.approx((m["centroid"] - world.anchor(attrs)).norm(dim=1).mean().item(),
                                                     rel=1e-5)
    assert final["lean"] == pytest.approx(mod.position_lean(m["centroid"], attrs, world.RESOLUTION).nanmean().item(),
                                          rel=1e-5, abs=1e-6)
    assert set(final["centroid_by_word"]) == {a.position for a in attrs}


def test_swapped_changes_one_attribute(mod):
    from spo_fast.toyworld import world

    prompts = world.probe_prompts()[:12]
    for field in mod.ATTRIBUTES:
        for before, after in zip(prompts, mod.swapped(prompts, field)):
            a, b = world.parse_prompt(before), world.parse_prompt(after)
            changed = [f for f in mod.ATTRIBUTES if getattr(a, f) != getattr(b, f)]
            assert changed == [field], (before, after)


def test_attribute_swap_sits_beside_the_right_prompt(comp, mod):
    from spo_fast.toyworld import world

    prompts = world.probe_prompts()[:4]
    out = mod.attribute_swap(comp, prompts, ts=(400,))
    right = mod.text_effect(comp, prompts, ts=(400,))[0]["right"]
    row = out["denoising_mse"][0]
    assert row["t"] == 400 and row["right"] == pytest.approx(right, rel=1e-6)
    assert set(row) == {"t", "right", *mod.ATTRIBUTES} and set(out["text_encoder_change"]) == set(mod.ATTRIBUTES)
    for field, change in out["text_encoder_change"].items():
        assert change["max_token"] >= change["end_token"] > 0, field  # a changed word moves its own token most


def test_quality_spread_separates_the_spread_within_a_prompt_from_the_spread_between_prompts(mod):
    from spo_fast.toyworld import world

    prompts = world.probe_prompts()[:6]
    attrs = [world.parse_prompt(p) for p in prompts]
    g = torch.Generator().manual_seed(0)
    q = world.sample_quality(len(attrs), g)
    once = world.render(attrs, torch.Generator().manual_seed(1), q)
    # the same six images under three seeds (seed-major): nothing varies within a prompt, much between prompts
    same = mod.spread(torch.cat([once] * 3), attrs * 3, 3)
    for k in world.QUALITY_FIELDS:
        assert same[k]["sd_within_prompt"] == 0 and same[k]["sd"] > 0.05, (k, same[k])
        assert same["present"][k]["sd_within_prompt"] == 0
    assert same["present"]["share"] == 1 and same["present"]["prompts"] == 6
    # each seed draws its own quality: the spread within a prompt is the data's
    mixed = torch.cat([world.render(attrs, torch.Generator().manual_seed(1), world.sample_quality(len(attrs), g))
                       for _ in range(3)])
    drawn = mod.spread(mixed, attrs * 3, 3)
    for k in world.QUALITY_FIELDS:
        assert drawn[k]["sd_within_prompt"] > 0.1, (k, drawn[k])
    # an empty frame has no object: it leaves the present-only statistics
    empty = mixed.clone()
    empty[:6] = empty[:6, :, :1, :1].clone()  # seed 0's images: one flat colour
    gone = mod.spread(empty, attrs * 3, 3)
    assert gone["present"]["share"] == round(2 / 3, 4)
    assert gone["present"]["prompts"] == 6
