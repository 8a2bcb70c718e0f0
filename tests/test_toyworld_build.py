"""The toy-world build (smoke mode), SPM training CLI, evaluation CLI and the main job end to end."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch

from spo_fast import evaluate, train, train_spm
from spo_fast.diffusion.models import ModelDirError, check_model_dir, load_components, resolve_model_path
from spo_fast.evaluation import heldout as evaluation
from spo_fast.reward import spm_trainer
from spo_fast.toyworld import build, world


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_build")
    assert build.main(["build", "--out", str(out), "--smoke"]) == 0
    return out


def test_smoke_build_writes_every_artifact(smoke):
    meta = json.loads((smoke / "build.json").read_text())
    assert {"base", "pairs", "spm"} <= set(meta)
    assert meta["base"]["steps"] == build.BuildConfig.smoke().base_steps and math.isfinite(meta["base"]["final_loss"])
    comp = load_components(str(smoke / "base"), "sd15")
    assert comp.vae is None and comp.vae_scale_factor == 1 and comp.latent_shape == (3, world.RESOLUTION,
                                                                                      world.RESOLUTION)
    assert len(comp.tokenizers[0]) == comp.text_encoders[0].config.vocab_size
    ids = comp.tokenizers[0](world.prompts("train")[0]).input_ids
    assert len(ids) <= build.TEXT_MAX_LEN and ids[0] == comp.tokenizers[0].bos_token_id
    for name in ("train", "heldout"):
        table = pq.read_table(smoke / f"pairs_{name}.parquet")
        assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(table.column_names)
        rows = table.to_pylist()
        assert rows and all(r["label_0"] + r["label_1"] == 1 and r["label_0"] in (0, 0.5, 1) for r in rows)
        for r in rows:  # the label agrees with the ground truth of the stored JPEGs
            s0, s1 = (world.score_prompts(build.decode_jpeg(r[k])[None], [r["caption"]]).item()
                      for k in ("jpg_0", "jpg_1"))
            assert abs(s0 - r["score_0"]) < 1e-4 and abs(s1 - r["score_1"]) < 1e-4
            want = 0.5 if abs(s0 - s1) < build.TIE_MARGIN else float(s0 > s1)
            assert r["label_0"] == want
        assert {r["caption"] for r in rows} <= set(world.prompts(name))
    ev = json.loads((smoke / "spm" / "spm_eval.json").read_text())
    assert {"clean", "t0-250", "t250-500", "t500-750", "t750-1000"} <= set(ev["eval"])


def test_build_is_deterministic(smoke, tmp_path):
    build.build(tmp_path, build.BuildConfig.smoke(), stages=("base",))
    from safetensors.torch import load_file

    for sub, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a, b = load_file(smoke / "base" / sub / fname), load_file(tmp_path / "base" / sub / fname)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_cli_rejects_bad_stage_and_smoke_into_assets(capsys):
    with pytest.raises(SystemExit):
        build.main(["build", "--stages", "base,nope", "--out", "/tmp/x"])
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build.main(["build", "--smoke"])


def test_pixel_space_dir_needs_rgb_unet(smoke, tmp_path):
    import shutil

    check_model_dir(smoke / "base", "sd15", "pretrained")
    bad = tmp_path / "bad"
    shutil.copytree(smoke / "base", bad)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    cfg["in_channels"] = 4
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="vae"):
        check_model_dir(bad, "sd15", "pretrained")


def test_train_spm_cli(smoke, tmp_path):
    out = tmp_path / "spm2"
    rc = train_spm.main(["--pairs", str(smoke / "pairs_train.parquet"), "--eval-pairs",
                         str(smoke / "pairs_heldout.parquet"), "--model", str(smoke / "base"),
                         "--init", str(smoke / "spm"), "--out", str(out), "--steps", "2", "--batch-size", "2"])
    assert rc == 0
    assert (out / "spm.safetensors").is_file() and (out / "spm_eval.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and math.isfinite(rows[-1]["loss"])


def test_train_spm_rejects_bad_pairs(smoke, tmp_path, capsys):
    import pyarrow as pa

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b""]}), bad)
    rc = train_spm.main(["--pairs", str(bad), "--model", str(smoke / "base"), "--init", str(smoke / "spm"),
                         "--out", str(tmp_path / "o")])
    assert rc == 2 and "jpg_1" in capsys.readouterr().err
    rc = train_spm.main(["--pairs", str(tmp_path / "missing.parquet"), "--model", str(smoke / "base"),
                         "--init", str(smoke / "spm"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing.parquet" in capsys.readouterr().err


def test_noisy_x0_hat_is_clean_at_t0_and_shares_noise(smoke):
    comp = load_components(str(smoke / "base"), "sd15")
    gen = torch.Generator().manual_seed(0)
    attrs = world.split("train")[:3]
    imgs = world.render(attrs, gen)
    noise = torch.randn(imgs.shape, generator=gen)
    prompts = [a.prompt for a in attrs]
    clean = spm_trainer.noisy_x0_hat(comp, imgs, prompts, torch.zeros(3, dtype=torch.long), noise, 5.0)
    assert torch.allclose(clean, imgs.clamp(-1, 1))
    noisy = spm_trainer.noisy_x0_hat(comp, imgs, prompts, torch.full((3,), 900), noise, 5.0)
    assert not torch.allclose(noisy, clean, atol=1e-2)


def _stats(n_seeds=3):
    prompts = world.prompts("heldout")[:4]
    gen = torch.Generator().manual_seed(0)
    attrs = [world.parse_prompt(p) for p in prompts]
    good = torch.stack([world.render(attrs, gen) for _ in range(n_seeds)])
    bad = torch.stack([world.render(attrs, gen, torch.zeros(len(attrs), len(world.QUALITY_FIELDS)))
                       for _ in range(n_seeds)])
    return prompts, good, bad


def test_compare_statistics():
    prompts, good, bad = _stats()
    r = evaluation.compare(bad, good, prompts, evaluation.ground_truth_reward)
    assert r["n_prompts"] == 4 and r["n_seeds"] == 3
    assert r["reward_trained"] > r["reward_base"] and r["win_rate"] > 0.9
    assert r["margin"] == pytest.approx(r["reward_trained"] - r["reward_base"])
    per_seed = torch.tensor(r["reward_base_per_seed"], dtype=torch.float64)
    assert r["reward_base_seed_spread"] == pytest.approx(per_seed.std().item())
    same = evaluation.compare(good, good, prompts, evaluation.ground_truth_reward)
    assert same["win_rate"] == 0 and same["ties"] == 12 and same["margin"] == 0
    assert same["margin_se"] == 0 and r["margin_se"] > 0  # paired: identical images leave no error


def test_main_job_reduced_end_to_end(tmp_path):
    """The shipped toy world: SPO with the SPM, then the held-out evaluation, in a few seconds."""
    out = tmp_path / "run"
    summary = train.train(train.load_config(None, [
        f"log.output_dir={out}", "train.max_iterations=1", "sampling.num_steps=4", "spo.divert_start_step=2",
        "train.batch_size=2", "train.train_batch_size=2", "eval.n_prompts=4", "eval.seeds=2", "log.progress=false",
        "log.sample_prompts=2"]))
    ev = json.loads((out / "eval.json").read_text())
    for key in ("n_prompts", "reward_base", "reward_trained", "win_rate", "seconds", "reward_base_seed_spread"):
        assert key in ev, key
    assert ev["n_prompts"] == 4 and ev["n_seeds"] == 2 and 0 <= ev["win_rate"] <= 1 and ev["seconds"] > 0
    assert 0 <= ev["reward_base"] <= 10 and 0 <= ev["reward_trained"] <= 10
    assert set(ev["prompts"]) <= set(world.prompts("heldout"))
    for f in ("eval_grid.png", "samples.png", "metrics.jsonl", "config.yaml", "lora/pytorch_lora_weights.safetensors"):
        assert (out / f).is_file(), f
    assert summary["eval"]["n_prompts"] == 4
    # the evaluation CLI reproduces the end-of-run numbers from the saved LoRA
    rc = evaluate.main(["--lora", str(out / "lora"), "--n-prompts", "4", "--seeds", "2", "--num-steps", "4",
                        "--out", str(tmp_path / "ev")])
    assert rc == 0
    again = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert again["reward_base"] == pytest.approx(ev["reward_base"], abs=1e-5)
    assert again["reward_trained"] == pytest.approx(ev["reward_trained"], abs=1e-4)
    # a file of the same toy-world prompts is scored by the ground truth too (not the SPM)
    (tmp_path / "p.txt").write_text("\n".join(ev["prompts"]) + "\n")
    assert evaluate.main(["--lora", str(out / "lora"), "--prompts", str(tmp_path / "p.txt"), "--seeds", "2",
                          "--num-steps", "4", "--out", str(tmp_path / "ev2")]) == 0
    from_file = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert from_file["reward_base"] == pytest.approx(ev["reward_base"], abs=1e-5)


def test_shipped_assets_present():
    for name in ("base", "spm"):
        assert (resolve_model_path(f"toyworld:{name}") / ("unet" if name == "base" else "spm.safetensors")).exists()
    with pytest.raises(ModelDirError, match="toyworld:base"):
        resolve_model_path("toyworld:nope")


def test_rendered_pairs_are_labelled_by_ground_truth():
    caps, img0, img1, lab = build.rendered_pairs(64, torch.Generator().manual_seed(3))
    attrs = [world.parse_prompt(c) for c in caps]
    s0, s1 = world.score(img0, attrs), world.score(img1, attrs)
    want = torch.where((s0 - s1).abs() < build.TIE_MARGIN, 0.5, (s0 > s1).float())
    assert torch.equal(lab, want) and 0.3 < lab.mean() < 0.7  # both orders occur
    assert set(caps) <= set(world.prompts("train"))


def test_evaluation_splits_are_stratified_by_colour():
    """toyworld:test and toyworld:validation: 64 held-out prompts each, disjoint, the same count of every colour in
    both, each colour at its share of the held-out prompts (within one prompt), no probe prompt (where settings were
    chosen before) in the test set, and a prefix of 8 shows most colours."""
    held = world.prompts("heldout")
    test, validation = world.test_prompts(), world.validation_prompts()
    assert len(test) == len(set(test)) == len(validation) == len(set(validation)) == world.EVAL_PROMPTS == 64
    assert set(test) <= set(held) and set(validation) <= set(held) and not set(test) & set(validation)
    assert not set(test) & set(world.probe_prompts())

    def colours(prompts):
        return Counter(world.parse_prompt(p).color for p in prompts)

    assert colours(test) == colours(validation) and set(colours(test)) == set(world.COLORS)
    for colour, n in colours(held).items():
        assert abs(colours(test)[colour] - 64 * n / len(held)) < 1, colour
    assert len(colours(test[:8])) >= 6 and len(colours(validation[:8])) >= 6
    for field in ("shape", "size", "position", "background"):
        assert len({getattr(world.parse_prompt(p), field) for p in test}) == len(getattr(world, field.upper() + "S"))
    assert world.test_prompts() == test  # deterministic
    assert world._spread(list("abcdefghij"), 3) == ["b", "f", "i"] and world._spread(list("ab"), 2) == ["a", "b"]
    quotas = world._colour_quotas([world.parse_prompt(p) for p in held], 64)
    assert sum(quotas.values()) == 64 and quotas == dict(colours(test))


def test_toy_prompts_scorer_and_config_checks(tmp_path):
    from spo_fast.core.config import ConfigError, load_config
    from spo_fast.data import load_prompts
    from spo_fast.reward.scorers import build_scorer
    from spo_fast.reward.spm import SPMScorer

    assert load_prompts("toyworld:heldout") == world.prompts("heldout")
    assert load_prompts("toyworld:test") == world.test_prompts()
    assert load_prompts("toyworld:validation") == world.validation_prompts()
    with pytest.raises(ConfigError, match="toyworld:validation"):
        load_prompts("toyworld:tset")
    cfg = load_config(None)
    assert cfg.scorer.name == "spm" and cfg.eval.enabled and cfg.eval.n_prompts >= 64
    scorer = build_scorer(cfg.scorer)
    assert isinstance(scorer, SPMScorer)
    assert len(scorer.tokenizer) == scorer.model.clip.config.text_config.vocab_size
    with pytest.raises(ConfigError, match="scorer.path"):
        load_config(None, ["scorer.path="])
    with pytest.raises(ConfigError, match="eval.n_prompts"):
        load_config(None, ["eval.n_prompts=0"])
    bad = tmp_path / "p.txt"
    bad.write_text("a photo of a cat\n")
    with pytest.raises(ConfigError, match="a photo of a cat"):
        train.preflight(load_config(None, [f"eval.prompts={bad}", f"log.output_dir={tmp_path / 'o'}"]))
    with pytest.raises(ConfigError, match="scorer.path"):
        train.preflight(load_config(None, [f"scorer.path={tmp_path}", f"log.output_dir={tmp_path / 'o'}"]))


def test_ground_truth_scorer_is_the_world_s_score_and_refuses_other_prompts(tmp_path):
    """``scorer.name=ground_truth``: the world's score of each image for its prompt, times scale / 10; other prompts
    are refused in the preflight, naming the prompt and what is accepted."""
    from spo_fast.core.config import ConfigError, load_config
    from spo_fast.reward.scorers import GroundTruthScorer, build_scorer

    cfg = load_config(None, ["scorer.name=ground_truth"])
    scorer = build_scorer(cfg.scorer)
    assert isinstance(scorer, GroundTruthScorer)
    attrs = world.all_attributes()[:3]
    gen = torch.Generator().manual_seed(0)
    images = world.render([attrs[i] for i in (0, 1, 2, 0)], gen, world.sample_quality(4, gen))
    images[3] = -1  # an empty black frame for the first prompt: scored low
    state = scorer.prepare([a.prompt for a in attrs])
    got = scorer.score(images, torch.zeros(4, dtype=torch.long), state, torch.tensor([0, 1, 2, 0]))
    truth = world.score(images, [attrs[i] for i in (0, 1, 2, 0)])
    assert torch.allclose(got, truth) and got[0] > got[3] + 1
    half = GroundTruthScorer(scale=5.0).score(images, torch.zeros(4, dtype=torch.long), state, torch.arange(4) % 3)
    assert torch.allclose(half, truth / 2)
    bad = tmp_path / "p.txt"
    bad.write_text("a photo of a cat\n")
    with pytest.raises(ConfigError, match="scorer.name=ground_truth scores toy-world prompts only.*a photo of a cat"):
        train.preflight(load_config(None, ["scorer.name=ground_truth", f"data.prompts={bad}",
                                           f"log.output_dir={tmp_path / 'o'}"]))
    with pytest.raises(ConfigError, match="ground_truth"):
        load_config(None, ["scorer.name=oracle"])


def test_shipped_spm_beats_chance_near_t0():
    """The shipped SPM's recorded held-out accuracy (build.json) is above chance at small t."""
    meta = json.loads((resolve_model_path("toyworld:spm").parent / "build.json").read_text())
    ev = meta["spm"]["eval"]
    assert ev["pairs"] >= 100 and ev["clean"] > 0.7 and ev["t0-250"] > 0.7


def test_nudged_pairs_share_a_layout_and_differ_a_little(monkeypatch):
    """A nudged pair is one picture twice: with no nudge the two renders are equal (one layout, one texture); with
    the default nudge they differ by about what an SPO pool's candidates do, and the ground truth tells most apart;
    in ``rendered_pairs`` both sides of a nudged row share the layout."""
    train = world.split("train")
    attrs = [train[i] for i in range(0, 640, 10)]
    quality = world.sample_quality(len(attrs), torch.Generator().manual_seed(0))
    monkeypatch.setattr(build, "NUDGE_STD", 0.0)
    kept, nudged = build._nudged(attrs, quality, torch.Generator().manual_seed(1))
    assert torch.equal(kept, nudged)
    monkeypatch.undo()
    kept, nudged = build._nudged(attrs, quality, torch.Generator().manual_seed(1))
    gap = (world.score(kept, attrs) - world.score(nudged, attrs)).abs()
    assert 0.05 < gap.mean() < 0.6 and (gap > build.TIE_MARGIN).float().mean() > 0.5
    q_kept, q_nudged = (torch.stack([world.score_components(x, attrs)[f] for f in world.QUALITY_FIELDS], 1)
                        for x in (kept, nudged))
    assert (q_kept - q_nudged).abs().mean() > 0.03  # the picture quality moved
    monkeypatch.setattr(build, "NUDGE_STD", 0.0)  # in rendered_pairs the positive is re-rendered with that layout:
    _, img0, img1, label0 = build.rendered_pairs(16, torch.Generator().manual_seed(3), ("speckled", "nudged"))
    same = (img0 == img1).flatten(1).all(1)
    assert 0 < same.sum() < 16 and (label0[same] == 0.5).all()  # the nudged rows: one picture twice, a tie


def test_rendered_pairs_include_every_negative_kind_and_speckle_loses():
    """Each of the eight hard-negative kinds occurs; a speckled copy of a render loses to the render by the ground
    truth (its cleanliness falls), so the SPM is taught that high-frequency noise is worse. The default kinds are the
    shipped six, the build's default too."""
    gen = torch.Generator().manual_seed(5)
    caps, img0, img1, _ = build.rendered_pairs(200, gen, kinds=build.NEGATIVE_KINDS)
    assert len(build.NEGATIVE_KINDS) == 8
    six = build.rendered_pairs(8, torch.Generator().manual_seed(3))
    assert build.BuildConfig().spm_negatives == build.SHIPPED_NEGATIVES == build.NEGATIVE_KINDS[:6]
    assert torch.equal(six[1], build.rendered_pairs(8, torch.Generator().manual_seed(3), build.NEGATIVE_KINDS[:6])[1])
    with pytest.raises(ValueError, match="spm_negatives"):
        build.BuildConfig(spm_negatives=("speckle",))
    attrs = [world.parse_prompt(c) for c in caps]
    good = world.render(attrs[:16], torch.Generator().manual_seed(1))
    speckled = (good + torch.randn(good.shape, generator=torch.Generator().manual_seed(2)) * 0.2).clamp(-1, 1)
    c_good, c_sp = world.score_components(good, attrs[:16]), world.score_components(speckled, attrs[:16])
    assert (c_sp["cleanliness"] < c_good["cleanliness"] - 0.5).all()
    assert (world.score(speckled, attrs[:16]) < world.score(good, attrs[:16])).all()
    # pairs whose two sides differ only by per-pixel noise occur (the speckled kind): same layout, high-frequency
    # difference
    diff = (img0 - img1)
    hf = (diff - torch.nn.functional.avg_pool2d(diff, 3, 1, 1)).abs().mean((1, 2, 3))
    assert (hf > 0.05).sum() >= 10


def test_drifted_negatives_change_one_named_attribute_at_higher_quality_and_the_ground_truth_labels_both_ways():
    """A drifted negative keeps the prompt's background, moves its object's colour part of the way to another named
    colour (or changes its size or shape), and raises its picture quality: the ground truth prefers it sometimes
    (the quality gained outweighs the attribute lost) and the render mostly, so the SPM learns the trade-off, not a
    rule."""
    gen = torch.Generator().manual_seed(7)
    attrs = [world.split("train")[i] for i in torch.randint(len(world.split("train")), (400,), generator=gen)]
    quality = world.sample_quality(400, gen)
    good = world.render(attrs, gen, quality)
    drifted = build._drifted(attrs, quality, gen)
    cg, cd = world.score_components(good, attrs), world.score_components(drifted, attrs)
    assert (cg["background"] - cd["background"]).abs().mean() < 0.03
    for k in world.QUALITY_FIELDS:
        assert (cd[k] - cg[k]).mean() > 0.1, k
    fidelity_lost = sum(world.WEIGHTS[k] * (cg[k] - cd[k]) for k in ("color", "size", "shape"))
    assert (fidelity_lost > 0.3).float().mean() > 0.8
    # colour drifts are partial: some land between the named colour and the other (colour closeness in (0.2, 0.8))
    assert ((cd["color"] > 0.2) & (cd["color"] < 0.8)).sum() >= 20
    wins = world.score(drifted, attrs) > world.score(good, attrs) + build.TIE_MARGIN
    assert 0.1 < wins.float().mean() < 0.45
    with pytest.raises(ValueError, match="spm_negatives"):
        build.BuildConfig(spm_negatives=("drift",))
    assert build.BuildConfig(**build.BuildConfig.variant("v_prediction")).spm_negatives == build.NEGATIVE_KINDS[:6]


def test_base_loss_weight_uniform_and_min_snr():
    a = torch.tensor([0.999, 0.9, 5 / 6, 0.5, 0.01])  # SNR 999, 9, 5, 1, 0.0101
    assert torch.equal(build.loss_weight(a, build.BuildConfig()), torch.ones(5))  # the shipped base: plain MSE
    v = build.BuildConfig(**build.BuildConfig.variant("v_prediction"))
    assert v.base_loss_weighting == "min_snr" and v.base_min_snr_gamma == 5.0
    assert torch.allclose(build.loss_weight(a, v), torch.tensor([5 / 1000, 5 / 10, 5 / 6, 1 / 2, 0.0101 / 1.0101]),
                          atol=1e-4)
    eps = build.BuildConfig(base_loss_weighting="min_snr")
    assert torch.allclose(build.loss_weight(a, eps), torch.tensor([5 / 999, 5 / 9, 1.0, 1.0, 1.0]), atol=1e-4)
    with pytest.raises(ValueError, match="base_prediction"):
        build.BuildConfig(base_prediction="x0")
    assert build.BuildConfig().base_text_encoder == "joint"  # the shipped base's, trained with its UNet
    with pytest.raises(ValueError, match="base_text_encoder='t5'; accepted: joint, clip"):
        build.BuildConfig(base_text_encoder="t5")


def test_sample_dtype_bf16_if_native_follows_the_cpu(monkeypatch):
    """The variant samples in bf16 only where the CPU computes it natively (emulated bf16 made its pairs stage
    ~17x slower on an AVX2-only CPU); fp32 and bf16 are taken as given."""
    from spo_fast.core import config

    v = build.BuildConfig(**build.BuildConfig.variant("v_prediction"))
    assert v.sample_dtype == "bf16_if_native" and build.BuildConfig().sampling_dtype == "fp32"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(config, "native_bf16", lambda device_type, native=native: native)
        assert v.sampling_dtype == expected
        assert build.BuildConfig(sample_dtype="bf16").sampling_dtype == "bf16"
    with pytest.raises(ValueError, match="sample_dtype='fp16'; accepted: fp32, bf16, bf16_if_native"):
        build.BuildConfig(sample_dtype="fp16")


def test_v_prediction_variant_smoke_build(tmp_path, capsys):
    """``--variant v_prediction``: a v-predicting three-level base, its pairs, its SPM; refused into the assets. An
    SPM of another width (``spm_width``, ``spm_clip_lr``) pretrains a CLIP of its own, kept apart from the base's."""
    from spo_fast.toyworld.build import main

    assert main(["build", "--smoke", "--variant", "v_prediction", "--out", str(tmp_path), "--no-progress"]) == 0
    sched = json.loads((tmp_path / "base" / "scheduler" / "scheduler_config.json").read_text())
    unet = json.loads((tmp_path / "base" / "unet" / "config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and unet["block_out_channels"] == [32, 64, 64]
    meta = json.loads((tmp_path / "build.json").read_text())
    assert meta["config"]["spm_negatives"] == list(build.NEGATIVE_KINDS[:6]) and "eval" in meta["spm"]
    # its text encoder is the contrastive CLIP's text tower, pretrained as the spm stage does it and left frozen
    text_record = meta["base"]["text_encoder"]
    assert text_record["kind"] == "clip" and text_record["clip_pretrain"]["steps"] == 3
    comp = load_components(str(tmp_path / "base"), "sd15")
    cfg = build.BuildConfig.smoke(**build.BuildConfig.variant("v_prediction"))
    expected, _ = build.clip_text_encoder(comp.tokenizers[0], cfg)
    got = comp.text_encoders[0].state_dict()
    assert got.keys() == expected.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    assert comp.text_encoders[0].config.num_hidden_layers == 4  # the CLIP's, not TEXT_CONFIG's 2
    # pretrained once: the spm stage loads the base stage's CLIP from --out/clip_pretrain
    assert "reused" not in text_record["clip_pretrain"]
    assert meta["spm"]["clip_pretrain"]["reused"] == str(tmp_path / build.CLIP_CACHE)
    # another SPM width (or CLIP lr) pretrains the SPM's own CLIP, cached beside the base's, which stays as it was
    base_key = json.loads((tmp_path / build.CLIP_CACHE / "clip.json").read_text())["key"]
    wide = build.BuildConfig.smoke(**build.BuildConfig.variant("v_prediction"), spm_width=8, spm_clip_lr=2e-3,
                                   spm_clip_steps=2)
    for reused in (False, True):
        spm_record = build.build(tmp_path, wide, stages=("spm",))["spm"]
        assert ("reused" in spm_record["clip_pretrain"]) is reused
        assert spm_record["clip_pretrain"]["width"] == 8 and spm_record["clip_sharpening"]["lr"] == 2e-3
    assert spm_record["clip_pretrain"]["reused"] == str(tmp_path / build.SPM_CLIP_CACHE)
    own_key = json.loads((tmp_path / build.SPM_CLIP_CACHE / "clip.json").read_text())["key"]
    assert (own_key["width"], own_key["clip_lr"]) == (8, 2e-3)
    assert (base_key["width"], base_key["clip_lr"]) == (64, 1e-3)
    assert json.loads((tmp_path / build.CLIP_CACHE / "clip.json").read_text())["key"] == base_key
    from spo_fast.reward.spm import StepAwarePreferenceModel

    clip_config = StepAwarePreferenceModel.from_pretrained(tmp_path / "spm").clip.config
    widths = clip_config.text_config.hidden_size, clip_config.vision_config.hidden_size, clip_config.projection_dim
    assert widths == (8, 8, 8)
    for bad, match in (({"spm_width": 6}, r"spm_width=6; accepted: a positive multiple of 4"),
                       ({"spm_clip_lr": 0}, r"spm_clip_lr=0; accepted: None or a number > 0")):
        with pytest.raises(ValueError, match=match):
            build.BuildConfig(**bad)
    with pytest.raises(SystemExit):
        main(["build", "--variant", "v_prediction"])
    assert "--variant v_prediction needs --out" in capsys.readouterr().err


def test_pretrain_clip_cache_reuses_only_a_matching_pretraining(tmp_path):
    """``pretrain_clip(cache=...)`` saves the CLIP, a call with the same settings loads the same weights without
    training, and a call with other settings trains again (and overwrites)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(build.toyworld_assets() / "base" / "tokenizer")
    cfg = build.BuildConfig.smoke()
    fresh, record = build.pretrain_clip(tok, cfg)
    cache = tmp_path / build.CLIP_CACHE
    first, first_record = build.pretrain_clip(tok, cfg, cache)
    again, again_record = build.pretrain_clip(tok, cfg, cache)
    assert "reused" not in first_record and again_record["reused"] == str(cache)
    assert again_record["final_loss"] == first_record["final_loss"] == record["final_loss"]
    for model in (first, again):  # the cached weights are the uncached pretraining's, bit for bit
        got = model.clip.state_dict()
        assert all(torch.equal(got[k], v) for k, v in fresh.clip.state_dict().items())
        assert not model.clip.training
    other, other_record = build.pretrain_clip(tok, build.BuildConfig.smoke(clip_lr=3e-3), cache)
    assert "reused" not in other_record
    assert not torch.equal(other.clip.text_projection.weight, fresh.clip.text_projection.weight)
    assert json.loads((cache / "clip.json").read_text())["key"]["clip_lr"] == 3e-3


def test_build_sampler_reproduces_the_shipped_pairs():
    """The build's default sampler (``sample_noise="torch"``) remakes the shipped held-out pairs' last batch (64
    prompts, both samples) from the shipped base: byte for byte on the kind of CPU that built them (AVX512, as every earlier
    run of this test found), and on others within fp32 rounding. Measured on an AVX2-only AMD EPYC: 54 and 55 of the 64 JPEGs byte-identical, the
    rest within 6/255 of a pixel and 0.013 of ground-truth score (the pairs' tie margin is 0.05). A changed sampler
    or noise stream moves every image by far more."""
    cfg = build.BuildConfig()
    comp = load_components("toyworld:base", build.FAMILY)
    held = world.prompts("heldout")
    start = cfg.sample_batch  # the second batch of the held-out prompts: 64, the smallest one
    rows = pq.read_table(build.toyworld_assets() / "pairs_heldout.parquet").to_pylist()[start:]
    assert [r["caption"] for r in rows] == held[start:] and len(rows) == 64
    for j, key in enumerate(("jpg_0", "jpg_1")):  # make_pairs: the second sample's seed is the first's + 1
        gen_seed = (cfg.seed + 200 + j) * 1_000_003 + start
        images = build.sample_batch(comp, held[start:], gen_seed, dtype=cfg.sample_dtype, noise=cfg.sample_noise)
        made = [build.jpeg_bytes(x) for x in images]
        if made == [r[key] for r in rows]:
            continue
        assert sum(m == r[key] for m, r in zip(made, rows)) >= 48  # measured 54 and 55 of 64
        shipped = torch.stack([build.decode_jpeg(r[key]) for r in rows])
        remade = torch.stack([build.decode_jpeg(m) for m in made])
        assert (shipped - remade).abs().max() <= 8 / 127.5  # measured 6/255 of the [0, 255] range
        gt = world.score_prompts(shipped, held[start:]) - world.score_prompts(remade, held[start:])
        assert gt.abs().max() < build.TIE_MARGIN / 2  # measured 0.013
    with pytest.raises(ValueError, match="sample_noise"):
        build.BuildConfig(sample_noise="numpy")


def test_build_samples_its_pairs_and_spm_pairs_at_its_guidance_scale(smoke, tmp_path, monkeypatch):
    """``BuildConfig.sample_guidance`` reaches the pairs' sampler and the SPM trainer's noisy pairs (the rollouts'
    guidance scale must match what the SPM was trained on); a scale below 1 is refused by name."""
    import shutil

    seen = []
    real_sample_batch = build.sample_batch

    def spy(comp, prompts, gen_seed, num_steps=20, eta=1.0, guidance_scale=5.0, *args, **kw):
        seen.append(guidance_scale)
        return real_sample_batch(comp, prompts, gen_seed, num_steps, eta, guidance_scale, *args, **kw)

    monkeypatch.setattr(build, "sample_batch", spy)
    shutil.copytree(smoke / "base", tmp_path / "base")
    cfg = build.BuildConfig.smoke(sample_guidance=2.5)
    build.build_pairs(tmp_path, cfg)
    assert seen and set(seen) == {2.5}
    default = build.BuildConfig.smoke()
    assert default.sample_guidance == build.SAMPLER["guidance_scale"] == 5.0  # the shipped pairs' scale
    monkeypatch.setattr(build, "sample_batch", real_sample_batch)
    comp = load_components(str(smoke / "base"), "sd15")
    same, other = (build.make_pairs(comp, world.prompts("heldout")[:2], 7, 2, "heldout", guidance_scale=g)
                   for g in (2.5, 5.0))
    assert same["jpg_0"] != other["jpg_0"]  # the scale changes the samples
    trained = {}
    monkeypatch.setattr(spm_trainer, "train_spm", lambda *a, **kw: trained.setdefault("cfg", a[6]) and {})
    build.build_spm(smoke, cfg)
    assert trained["cfg"].guidance_scale == 2.5
    for bad in (0.5, "5"):
        with pytest.raises(ValueError, match=r"sample_guidance=.*a number >= 1"):
            build.BuildConfig(sample_guidance=bad)


def test_spm_anchor_is_clips_contrastive_loss_and_the_build_trains_with_it(smoke, tmp_path, monkeypatch):
    """``anchor_loss`` is CLIP's symmetric contrastive loss (a caption repeated in the batch: one text, each of its
    images a match); ``BuildConfig.spm_anchor_weight`` > 0 adds it to every SPM step on fresh captioned renders
    (each read at a random t), which changes the SPM; 0 draws none; a negative weight is refused by name."""
    import shutil

    import torch.nn.functional as F
    from transformers import CLIPTokenizer

    from spo_fast.reward.spm import StepAwarePreferenceModel

    tok = CLIPTokenizer.from_pretrained(smoke / "base" / "tokenizer")
    spm = StepAwarePreferenceModel.from_pretrained(smoke / "spm")
    caps, images = build.captioned_renders(6, torch.Generator().manual_seed(0))
    assert len(set(caps)) == 6 and images.shape == (6, 3, world.RESOLUTION, world.RESOLUTION)
    t = torch.tensor([0, 100, 200, 300, 400, 999])
    with torch.no_grad():
        img = spm.image_features(spm.preprocess(images), t)
        txt = spm_trainer._text_feats(spm, tok, caps, images.device)[0]
        order = [sorted(caps).index(c) for c in caps]
        logits = spm.clip.logit_scale.exp() * img @ txt[order].T
        want = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
        assert torch.allclose(spm_trainer.anchor_loss(spm, tok, caps, images, t), want, atol=1e-5)
        # images 0 and 1 under one caption: image-to-text as before with one column fewer; text-to-image averages
        dup = [caps[0]] + caps[:1] + caps[2:]
        got = spm_trainer.anchor_loss(spm, tok, dup, images, t)
        feats = spm_trainer._text_feats(spm, tok, dup, images.device)
        logits = spm.clip.logit_scale.exp() * img @ feats[0].T
        match = F.one_hot(feats[1], len(feats[0])).float()
        t2i = -(logits.T.log_softmax(-1) * match.T).sum(-1) / match.T.sum(-1)
        assert torch.allclose(got, (F.cross_entropy(logits, feats[1]) + t2i.mean()) / 2, atol=1e-5)
    drawn = []
    real = build.captioned_renders
    monkeypatch.setattr(build, "captioned_renders", lambda n, gen, **kw: drawn.append(n) or real(n, gen, **kw))
    weights = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"w{weight}"
        shutil.copytree(smoke, out, ignore=shutil.ignore_patterns("spm"))
        drawn.clear()
        build.build(out, build.BuildConfig.smoke(spm_anchor_weight=weight), stages=("spm",))
        assert drawn == ([] if weight == 0 else [64] * build.BuildConfig.smoke().spm_steps)
        weights[weight] = StepAwarePreferenceModel.from_pretrained(out / "spm").clip.visual_projection.weight
    assert not torch.equal(weights[0.0], weights[1.0])
    with pytest.raises(ValueError, match=r"spm_anchor_weight=-1.*a number >= 0"):
        build.BuildConfig(spm_anchor_weight=-1)


def test_clip_sharpening_groups_captions_that_differ_in_one_field_and_the_build_runs_it(smoke, tmp_path):
    """``captioned_renders`` with a field: the first half of the batch are groups of train-split captions equal but
    for that field, each group with every value the train split allows; without one it is the plain draw.
    ``BuildConfig.spm_clip_steps`` > 0 continues the SPM's CLIP on such batches before its preference training
    (recorded; the CLIP changes); bad settings are refused by name."""
    import shutil

    from spo_fast.reward.spm import StepAwarePreferenceModel

    train = set(world.split("train"))
    caps, images = build.captioned_renders(40, torch.Generator().manual_seed(0), "shape")
    assert len(caps) == 40 and images.shape == (40, 3, world.RESOLUTION, world.RESOLUTION)
    attrs = [world.parse_prompt(c) for c in caps]
    assert all(a in train for a in attrs)
    groups: dict = {}
    for a in attrs[:20]:
        groups.setdefault(dataclasses.replace(a, shape="circle"), []).append(a.shape)
    assert len(groups) < 20  # grouped, not 20 independent draws
    for key, shapes in list(groups.items())[:-1]:  # the last group may be cut to fit
        allowed = [s for s in world.SHAPES if dataclasses.replace(key, shape=s) in train]
        assert sorted(shapes) == sorted(allowed) and len(shapes) >= 2
    # "any": each group varies one field, drawn per group
    anyf = [world.parse_prompt(c) for c in build.captioned_renders(40, torch.Generator().manual_seed(1), "any")[0]]
    varied = [[f for f in build.FIELD_VALUES if getattr(a, f) != getattr(b, f)]
              for a, b in itertools.pairwise(anyf[:20])]
    assert sum(len(v) == 1 for v in varied) >= 10 and len({v[0] for v in varied if len(v) == 1}) >= 2
    plain = build.captioned_renders(8, torch.Generator().manual_seed(0))
    caps0, _, images0 = build._train_renders(8, torch.Generator().manual_seed(0))
    assert plain[0] == [a.prompt for a in caps0] and torch.equal(plain[1], images0)
    weights, records = {}, {}
    for steps in (0, 3):
        out = tmp_path / f"s{steps}"
        shutil.copytree(smoke, out, ignore=shutil.ignore_patterns("spm"))
        meta = build.build(out, build.BuildConfig.smoke(spm_clip_field="shape", spm_clip_steps=steps),
                           stages=("spm",))
        records[steps] = meta["spm"].get("clip_sharpening")
        weights[steps] = StepAwarePreferenceModel.from_pretrained(out / "spm").clip.vision_model.embeddings.\
            patch_embedding.weight
    assert records[0] is None and records[3]["steps"] == 3 and records[3]["field"] == "shape"
    assert not torch.equal(weights[0], weights[3])
    with pytest.raises(ValueError, match=r"spm_clip_field='hue'.*None, any or one of color, shape"):
        build.BuildConfig(spm_clip_field="hue")
    with pytest.raises(ValueError, match=r"spm_clip_steps=-1.*an integer >= 0"):
        build.BuildConfig(spm_clip_steps=-1)
