"""The base-evaluation cache (spo_fast.evaluation.base_cache): a hit gives exactly what sampling gives; anything
that would change the base's images or their scores (weights, protocol, this machine's rounding, the reward) misses;
a damaged entry or an unwritable directory never fails an evaluation."""
from __future__ import annotations

import contextlib
import copy
import json
from types import SimpleNamespace

import pytest
import torch

from spo_fast.diffusion.models import load_components
from spo_fast.evaluation import heldout
from spo_fast.evaluation.base_cache import BaseEvalCache, cache_root
from spo_fast.toyworld import world


@pytest.fixture(scope="module")
def toy():
    comp = load_components("toyworld:base", "sd15")
    trained = copy.deepcopy(comp.unet)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)
    return comp, trained


SAMPLING = SimpleNamespace(num_steps=2, eta=1.0, guidance_scale=5.0, negative_prompt="")


def run(toy, out, cache, *, prompts=None, seeds=2, sampling=SAMPLING, base=None, reward=heldout.ground_truth_reward,
        metrics=()):
    comp, trained = toy
    prompts = prompts or world.prompts("heldout")[:4]
    return heldout.evaluate(comp, contextlib.nullcontext(base or comp.unet), contextlib.nullcontext(trained),
                            prompts, seeds, reward, out, sampling, 4, "cpu", progress=False, grid_prompts=3,
                            metrics=metrics, base_cache=cache)


def same_statistics(a: dict, b: dict) -> bool:
    drop = ("seconds", "base_cache")
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def test_a_hit_is_exactly_what_sampling_gives(toy, tmp_path):
    cache = BaseEvalCache(tmp_path / "c")
    plain = run(toy, tmp_path / "plain", None)
    first = run(toy, tmp_path / "first", cache)
    again = run(toy, tmp_path / "again", cache)
    assert (plain["base_cache"], first["base_cache"], again["base_cache"]) == ("off", "stored", "hit")
    assert same_statistics(plain, first) and same_statistics(first, again)
    assert plain["components_base"] and plain["reward_base_seed_spread"] > 0
    grids = [(tmp_path / d / "eval_grid.png").read_bytes() for d in ("plain", "first", "again")]
    assert grids[0] == grids[1] == grids[2]  # the grid's base row is rebuilt from the stored pixels exactly
    assert len(list((tmp_path / "c" / "base_eval").glob("*.pt"))) == 1
    saved = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert saved["base_cache"] == "hit"


def test_whatever_changes_the_base_half_misses(toy, tmp_path):
    comp, _ = toy
    cache = BaseEvalCache(tmp_path / "c")
    assert run(toy, tmp_path / "a", cache)["base_cache"] == "stored"
    moved = copy.deepcopy(comp.unet)
    with torch.no_grad():
        moved.conv_out.bias.add_(1e-3)
    other = world.prompts("heldout")[1:5]
    misses = {
        "weights": {"base": moved},
        "prompts": {"prompts": other},
        "seeds": {"seeds": 3},
        "guidance": {"sampling": SimpleNamespace(**{**vars(SAMPLING), "guidance_scale": 4.0})},
        "steps": {"sampling": SimpleNamespace(**{**vars(SAMPLING), "num_steps": 3})},
        "negative prompt": {"sampling": SimpleNamespace(**{**vars(SAMPLING), "negative_prompt": "blurry"})},
    }
    for what, kw in misses.items():
        assert run(toy, tmp_path / what, cache, **kw)["base_cache"] == "stored", what
    assert len(list((tmp_path / "c" / "base_eval").glob("*.pt"))) == 1 + len(misses)


def test_another_machines_rounding_misses(toy, tmp_path, monkeypatch):
    """The fingerprint is the first denoising step computed now: arithmetic that rounds differently (emulated here
    by a UNet output moved by one part in 10^6) finds no entry, though the key (weights, protocol) is the same."""
    comp, _ = toy
    cache = BaseEvalCache(tmp_path / "c")
    run(toy, tmp_path / "a", cache)
    forward = type(comp.unet).forward

    def rounded_otherwise(self, *a, **kw):
        out = forward(self, *a, **kw)
        out.sample.mul_(1 + 1e-6)
        return out

    monkeypatch.setattr(type(comp.unet), "forward", rounded_otherwise)
    assert run(toy, tmp_path / "b", cache)["base_cache"] == "stored"
    assert len(list((tmp_path / "c" / "base_eval").glob("*.pt"))) == 2


def test_no_cache_without_a_reward_identity_or_with_metrics(toy, tmp_path):
    cache = BaseEvalCache(tmp_path / "c")

    def reward(images, prompts):
        return images.mean((1, 2, 3)), {}

    reward.label = "mean"
    assert run(toy, tmp_path / "a", cache, reward=reward)["base_cache"] == "off"
    assert run(toy, tmp_path / "b", cache, metrics=(reward,))["base_cache"] == "off"
    assert not (tmp_path / "c").exists()


def test_damaged_entry_and_unwritable_dir_never_fail(toy, tmp_path):
    logs = []
    cache = BaseEvalCache(tmp_path / "c", log=logs.append)
    want = run(toy, tmp_path / "a", cache)
    (entry,) = (tmp_path / "c" / "base_eval").glob("*.pt")
    entry.write_bytes(b"not a torch file")
    r = run(toy, tmp_path / "b", cache)
    assert r["base_cache"] == "stored" and same_statistics(r, want)
    assert any("ignoring" in m and entry.name in m for m in logs)
    assert run(toy, tmp_path / "c2", cache)["base_cache"] == "hit"  # replaced by a good one
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache dir would be")
    logs.clear()
    r = run(toy, tmp_path / "d", BaseEvalCache(blocked, log=logs.append))
    assert r["base_cache"] == "stored" and same_statistics(r, want)
    assert any("could not write" in m for m in logs)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPO_FAST_CACHE", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x"
    monkeypatch.delenv("SPO_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "spo_fast"
