"""``python -m spo_fast.compare``: the per-iteration cost counts against real UNet calls, the point evaluation
against the end-of-run one, the command end to end in its quick form, tune-dpo, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_fast import compare as cmp
from spo_fast.core.config import load_config
from spo_fast.core.trainer import run
from spo_fast.methods.dpo import DiffusionDPO
from spo_fast.methods.dpo import iteration_cost as dpo_cost
from spo_fast.methods.spo import SPO
from spo_fast.methods.spo import iteration_cost as spo_cost

QUIET = ["log.report_to=none", "log.progress=false", "log.sample_prompts=0", "train.kernels=torch",
         "checkpoint.every=0"]
# toy SPO: 2 plain steps, 2 branching steps, k = 2, 2 prompts; threshold 0 so that pairs are valid and train
TOY_SPO = QUIET + ["sampling.num_steps=4", "spo.divert_start_step=2", "spo.k=2", "spo.threshold=0.0",
                   "train.batch_size=2", "train.train_batch_size=2", "train.max_iterations=2"]
# toy DPO: 4 pairs per iteration in micro-batches of 2
TOY_DPO = QUIET + ["sampling.num_steps=4", "train.batch_size=4", "train.train_batch_size=2", "train.grad_accum=1",
                   "train.max_iterations=2"]


# ----------------------------------------------------------------------------- the cost formulas
def test_cost_formulas_by_hand():
    # toy_spo: B = 8, k = 4, T = 20, d = 4: plain 2*8*4 = 64, shared x_t 16, 15 scoring calls on 32 chains (64 each)
    # = 960, the last segment none; 16 segments score 32 images each
    assert spo_cost(8, 4, 20, 4, 0, [], 8) == {"unet_fwd_eq": 64 + 16 + 960, "spm_fwd": 16 * 32}
    # two micro-batches of 8 shared transitions: (ref 2 + policy 2 + backward 4) * 8 each
    assert spo_cost(8, 4, 20, 4, 0, [True, True], 8)["unet_fwd_eq"] == 1040 + 2 * 64
    # SDXL: k = 2, 3 inner steps (L = 4), T = 10, d = 2, B = 1: plain 4, shared 2, segments at 2 and 6: inner
    # 3 * 4 each, a scoring call (4) after the first only; an inner-step micro-batch runs 2m samples
    assert spo_cost(1, 2, 10, 2, 3, [True, False], 3) == {"unet_fwd_eq": 4 + 2 + 2 * 12 + 4 + 24 + 48, "spm_fwd": 4}
    assert spo_cost(1, 2, 10, 2, 3, [True], 3, gradient_checkpointing=True)["unet_fwd_eq"] == 34 + 30
    # DPO: 8 per pair (reference and policy on winner + loser, backward = 2 forwards), 10 with checkpointing
    assert dpo_cost([16]) == {"unet_fwd_eq": 128} and dpo_cost([2, 2], True) == {"unet_fwd_eq": 40}


class Counter:
    """Samples through every UNet2DConditionModel forward (policy, reference, the merged rollout copy) and through
    the backward of every output that requires grad (x2: a backward = two forwards); images through the SPM."""

    def __init__(self, monkeypatch):
        from diffusers import UNet2DConditionModel

        from spo_fast.reward.spm import SPMScorer

        self.fwd = self.bwd = self.spm = 0
        self.active = True
        unet_forward, spm_features = UNet2DConditionModel.forward, SPMScorer.image_features

        def forward(unet, sample, *a, **k):
            out = unet_forward(unet, sample, *a, **k)
            if self.active:
                self.fwd += sample.shape[0]
                res = out.sample if hasattr(out, "sample") else out[0]
                if res.requires_grad:
                    res.register_hook(self._backward)
            return out

        def features(scorer, images, *a, **k):
            if self.active:
                self.spm += images.shape[0]
            return spm_features(scorer, images, *a, **k)

        monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
        monkeypatch.setattr(SPMScorer, "image_features", features)

    def _backward(self, grad):
        self.bwd += grad.shape[0]

    def take(self) -> dict:
        got = {"unet_fwd_eq": self.fwd + 2 * self.bwd, "spm_fwd": self.spm}
        self.fwd = self.bwd = self.spm = 0
        return got


def _counted_run(monkeypatch, cfg, method, evaluator=None):
    """Train with the counter; per iteration (the logged counts, the counted ones, the row)."""
    counter = Counter(monkeypatch)
    seen = []

    def hook(it, total, s, row):
        seen.append((row, counter.take()))
        if evaluator is not None:
            counter.active = False  # the evaluation is not training
            evaluator(it, total, s, row)
            counter.take()
            counter.active = True

    summary, _ = run(cfg, method, hook=hook)  # HF_HUB_OFFLINE=1: tests/conftest.py
    return seen, summary


def test_spo_cost_counts_match_real_calls_and_points_match_the_end_of_run_eval(tmp_path, monkeypatch):
    cfg = load_config("toy_spo", TOY_SPO + [f"log.output_dir={tmp_path}", "eval.enabled=true",
                                            "eval.prompts=toyworld:test", "eval.n_prompts=2", "eval.seeds=2"])
    monkeypatch.setenv("SPO_FAST_CACHE", str(tmp_path / "cache"))  # an empty base-evaluation cache
    spec = cmp.RunSpec("SPO", "toy_spo", [], cfg, SPO())
    evaluator = cmp.PointEvaluator(spec, 1, cmp.BaseRewards())
    seen, _ = _counted_run(monkeypatch, cfg, spec.method, evaluator)
    assert len(seen) == 2 and any(row["valid_pairs"] > 0 for row, _ in seen)  # training ran, not only rollouts
    for row, got in seen:
        assert row["unet_fwd_eq"] == got["unet_fwd_eq"] and row["spm_fwd"] == got["spm_fwd"] == 2 * 2 * 2
    # the point at the end of the run is the end-of-run evaluation (same prompts, noise, sampler, reward)
    ev = json.loads((tmp_path / "eval.json").read_text())
    (point,) = evaluator.rows
    assert point["iteration"] == 2 and point["unet_fwd_eq"] == sum(r["unet_fwd_eq"] for r, _ in seen)
    assert point["reward"] == pytest.approx(ev["reward_trained"], abs=1e-9)
    assert point["win_rate"] == ev["win_rate"] and point["ties"] == ev["ties"]
    assert evaluator.base_stats["reward"] == pytest.approx(ev["reward_base"], abs=1e-9)
    # the point's base rewards went to the disk cache under the end-of-run evaluation's key: that one found them
    assert evaluator.base_stats["base_cache"] == "stored" and ev["base_cache"] == "hit"


def test_spo_cost_counts_sdxl_inner_steps(tmp_path, monkeypatch):
    cfg = load_config("tiny_sd15_color", QUIET + [
        f"log.output_dir={tmp_path}", "model.family=sdxl", "model.path=arch:tiny_sdxl", "spo.num_inner_steps=1",
        "sampling.num_steps=6", "spo.divert_start_step=1", "spo.k=2", "train.batch_size=2", "train.train_batch_size=2",
        "scorer.scale=1000", "spo.threshold=0.0", "train.max_iterations=1"])
    seen, _ = _counted_run(monkeypatch, cfg, SPO())
    (row, got), = seen
    assert row["valid_pairs"] > 0 and row["unet_fwd_eq"] == got["unet_fwd_eq"]


def test_dpo_cost_counts_match_real_calls(tmp_path, monkeypatch):
    cfg = load_config("toy_dpo", TOY_DPO + [f"log.output_dir={tmp_path}", "eval.enabled=false"])
    seen, _ = _counted_run(monkeypatch, cfg, DiffusionDPO())
    assert len(seen) == 2
    for row, got in seen:
        assert row["unet_fwd_eq"] == got["unet_fwd_eq"] == 8 * 4 and "spm_fwd" not in row


# ----------------------------------------------------------------------------- pure helpers
def test_eval_iterations_and_interpolated_cost():
    assert cmp.eval_iterations(40, 4) == [10, 20, 30, 40]
    assert cmp.eval_iterations(2, 4) == [1, 2] and cmp.eval_iterations(7, 1) == [7]
    pts = [{"c": 0, "reward": 3.0}, {"c": 10, "reward": 4.0}, {"c": 30, "reward": 5.0}]
    assert cmp.cost_to_reach(pts, "c", 4.5) == pytest.approx(20.0)
    assert cmp.cost_to_reach(pts, "c", 2.0) == 0.0 and cmp.cost_to_reach(pts, "c", 5.5) is None
    dpo = [{"unet_fwd_eq": 0, "train_seconds": 0.0, "reward": 3.0},
           {"unet_fwd_eq": 100, "train_seconds": 50.0, "reward": 4.5}]
    spo = [{"unet_fwd_eq": 0, "train_seconds": 0.0, "reward": 3.0},
           {"unet_fwd_eq": 40, "train_seconds": 10.0, "reward": 4.0},
           {"unet_fwd_eq": 80, "train_seconds": 30.0, "reward": 5.0}]
    s = cmp.summarize(spo, dpo, pair_fwd_eq=200)
    assert s["ratio_unet_fwd_eq"] == pytest.approx(0.6) and s["ratio_train_seconds"] == pytest.approx(0.4)
    assert s["ratio_unet_fwd_eq_incl_dpo_pairs"] == pytest.approx(0.2) and s["reason"] is None
    never = cmp.summarize(spo[:2], dpo)
    assert never["ratio_unet_fwd_eq"] is None and "stays below" in never["reason"]


def test_summary_text_gives_the_caveat_not_a_meaningless_ratio():
    """DPO ending at or below the base: SPO 'reaches' its final reward at cost 0, so the console gives the reason
    and no '0.00x' ratio; a real ratio is printed as a number."""
    base = {"unet_fwd_eq": 0, "train_seconds": 0.0, "reward": 3.0, "win_rate": 0.5, "iteration": 0}
    dpo = [base, {**base, "unet_fwd_eq": 100, "train_seconds": 50.0, "reward": 2.5, "iteration": 4}]
    spo = [base, {**base, "unet_fwd_eq": 80, "train_seconds": 30.0, "reward": 4.0, "iteration": 4}]
    report = {"protocol": {"n_prompts": 2, "split": "test", "seeds": 1}, "base": {"reward": 3.0},
              "methods": {"SPO": {"final": spo[-1]}, "DPO": {"final": dpo[-1]}}, "summary": cmp.summarize(spo, dpo)}
    text = cmp.summary_text(report)
    assert "not above the base model's" in text and "x DPO's UNet" not in text
    dpo[-1]["reward"] = 3.5
    report["summary"] = cmp.summarize(spo, dpo)
    assert "SPO reaches DPO's final reward at 0.40x DPO's UNet" in cmp.summary_text(report)


# ----------------------------------------------------------------------------- the command
def test_quick_compare_writes_json_and_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPO_FAST_CACHE", str(tmp_path / "cache"))  # an empty base-evaluation cache
    out = tmp_path / "cmp"
    assert cmp.main(["--quick", "--points", "2", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert {"protocol", "base", "methods", "summary", "notes", "dpo_settings_from"} <= report.keys()
    assert report["protocol"]["prompts"] == "toyworld:test" and report["protocol"]["n_prompts"] == 2
    assert set(report["methods"]) == {"SPO", "DPO"}
    for name, res in report["methods"].items():
        pts = res["points"]
        assert [p["iteration"] for p in pts] == [0, 1, 2]
        assert pts[0]["unet_fwd_eq"] == 0 and pts[0]["reward"] == report["base"]["reward"]
        for key in ("unet_fwd_eq", "spm_fwd", "train_seconds"):
            vals = [p[key] for p in pts]
            assert vals == sorted(vals), (name, key)
        assert pts[-1]["unet_fwd_eq"] > pts[1]["unet_fwd_eq"] > 0
        for p in pts[1:]:
            assert {"reward", "win_rate", "margin", "margin_se", "ties", "train_seconds", "spm_fwd"} <= p.keys()
            assert 0 <= p["win_rate"] <= 1
        # the logged costs are the trainer's own (metrics.jsonl)
        rows = [json.loads(x) for x in (Path(res["settings"]["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert pts[-1]["unet_fwd_eq"] == sum(r["unet_fwd_eq"] for r in rows)
    assert report["methods"]["SPO"]["points"][-1]["spm_fwd"] > 0 and report["methods"]["DPO"]["points"][-1][
        "spm_fwd"] == 0
    pp = report["methods"]["DPO"]["pair_production"]
    assert pp["unique_pairs_used"] == 8 and pp["unet_fwd_eq"] == 8 * 2 * 2 * 20
    s = report["summary"]
    assert {"dpo_final_reward", "ratio_unet_fwd_eq", "ratio_train_seconds", "reason"} <= s.keys()
    assert (s["ratio_unet_fwd_eq"] is None) == (s["reason"] is not None and "stays below" in s["reason"])
    assert (out / "compare.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
    assert report["base"]["base_cache"] == "stored"
    # a second comparison reads the base model's rewards from the disk cache: the same base statistics
    assert cmp.main(["--quick", "--points", "1", "--no-progress", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "compare.json").read_text())
    assert again["base"]["base_cache"] == "hit"
    assert {k: again["base"][k] for k in ("reward", "reward_per_seed")} == {
        k: report["base"][k] for k in ("reward", "reward_per_seed")}
    # and none with the cache off (either side's eval.base_cache=false)
    assert cmp.main(["--quick", "--points", "1", "--no-progress", "--out", str(tmp_path / "off"),
                     "--dpo", "eval.base_cache=false"]) == 0
    off = json.loads((tmp_path / "off" / "compare.json").read_text())
    assert off["base"]["base_cache"] == "off" and off["base"]["reward"] == report["base"]["reward"]


def test_tune_dpo_then_compare_reads_the_choice(tmp_path, monkeypatch):
    out = tmp_path / "tune"
    assert cmp.main(["tune-dpo", "--quick", "--no-progress", "--lrs", "1e-3", "--betas", "1000,5000",
                     "--dpo", "train.max_iterations=1", "--out", str(out)]) == 0
    report = json.loads((out / "tune_dpo.json").read_text())
    assert report["split"] == "validation" and report["protocol"]["prompts"] == "toyworld:validation"
    assert [(g["lr"], g["beta"]) for g in report["grid"]] == [(1e-3, 1000.0), (1e-3, 5000.0)]
    best = max(report["grid"], key=lambda g: g["reward"])
    assert (report["chosen"]["lr"], report["chosen"]["beta"]) == (best["lr"], best["beta"])
    # --dpo-from: the DPO run uses the choice (checked at the config, before anything is trained)
    seen = {}

    def stop(args, spo, dpo, out_dir):
        seen.update(lr=dpo.cfg.train.lr, beta=dpo.cfg.dpo.beta)
        raise KeyboardInterrupt

    monkeypatch.setattr(cmp, "run_compare", stop)
    assert cmp.main(["--quick", "--dpo-from", str(out / "tune_dpo.json"), "--out", str(tmp_path / "c")]) == 130
    assert seen == {"lr": best["lr"], "beta": best["beta"]}
    assert report["chosen"]["max_iterations"] == 1


def test_tune_dpo_chooses_a_run_length_over_seeds_and_from_records(tmp_path, monkeypatch):
    """Every point is a candidate run length: the model at iteration 1 of a 2-iteration run is the model of a run
    stopped at 1 (the same validation reward, bit for bit); the choice maximizes the lowest margin over the seeds,
    and --from-records makes the same choice from runs made separately; --dpo-from hands on the run length."""
    quick = ["tune-dpo", "--quick", "--no-progress", "--lrs", "1e-3", "--betas", "5000"]
    both = tmp_path / "both"
    assert cmp.main([*quick, "--points", "2", "--seeds", "0,1", "--out", str(both)]) == 0
    rep = json.loads((both / "tune_dpo.json").read_text())
    assert [(g["seed"], [p["iteration"] for p in g["points"]]) for g in rep["grid"]] == [(0, [0, 1, 2]), (1, [0, 1, 2])]
    cands = {c["max_iterations"]: c for c in rep["candidates"]}
    assert sorted(cands) == [1, 2]
    for it, c in cands.items():
        assert c["margins"] == [g["points"][it]["margin"] for g in rep["grid"]]
        assert c["min_margin"] == min(c["margins"])
    best = max(cands.values(), key=lambda c: (c["min_margin"], c["mean_margin"], -c["max_iterations"]))
    assert {k: rep["chosen"][k] for k in ("max_iterations", "margins")} == {
        k: best[k] for k in ("max_iterations", "margins")}
    # seed 1 for 2 iterations and seed 0 stopped at 1, made separately: only run length 1 has both seeds
    assert cmp.main([*quick, "--points", "2", "--dpo", "train.seed=1", "--out", str(tmp_path / "s1")]) == 0
    assert cmp.main([*quick, "--dpo", "train.seed=0", "--dpo", "train.max_iterations=1",
                     "--out", str(tmp_path / "s0")]) == 0
    merged = tmp_path / "merged"
    assert cmp.main(["tune-dpo", "--from-records", str(tmp_path / "s1" / "tune_dpo.json"),
                     str(tmp_path / "s0" / "tune_dpo.json"), "--out", str(merged)]) == 0
    rec = json.loads((merged / "tune_dpo.json").read_text())
    assert [c["max_iterations"] for c in rec["candidates"]] == [1]
    assert rec["chosen"]["margins"] == cands[1]["margins"]  # seed 0 stopped at 1 == seed 0's point at 1
    seen = {}

    def stop(args, spo, dpo, out_dir):
        seen.update(iters=dpo.cfg.train.max_iterations)
        raise KeyboardInterrupt

    monkeypatch.setattr(cmp, "run_compare", stop)
    dpo_from = ["--quick", "--dpo-from", str(merged / "tune_dpo.json"), "--out", str(tmp_path / "c")]
    assert cmp.main(dpo_from) == 130 and seen == {"iters": 1}
    assert cmp.main([*dpo_from, "--dpo", "train.max_iterations=3"]) == 130 and seen == {"iters": 3}
    # runs that were evaluated on another base cannot be chosen between
    other = json.loads((tmp_path / "s0" / "tune_dpo.json").read_text())
    other["base"]["reward"] += 1.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert cmp.main(["tune-dpo", "--from-records", str(tmp_path / "s1" / "tune_dpo.json"),
                     str(tmp_path / "other.json"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("argv, needle", [
    (["--points", "0"], "--points=0"),
    (["--spo", "train.nope=1"], "train.nope"),
    (["--dpo", "spo.beta=10"], "method=spo key"),
    (["--spo", "method=dpo"], "method is fixed"),
    (["--spo", "lr"], "expected KEY=VALUE"),
    (["--dpo-from", "/nonexistent/tune_dpo.json"], "no such file"),
    (["--spo", "data.prompts=/nonexistent.txt"], "/nonexistent.txt': does not exist"),
    (["--split", "train"], "invalid choice"),
    (["--points", "x"], "invalid int"),
    (["tune-dpo", "--lrs", "fast"], "comma-separated"),
    (["tune-dpo", "--seeds", "0,0"], "distinct integers"),
    (["tune-dpo", "--seeds", "0,1", "--dpo", "train.seed=3"], "--seeds only"),
    (["tune-dpo", "--from-records", "/nonexistent/tune_dpo.json"], "no such file"),
    (["tune-dpo", "--from-records", "a.json", "--lrs", "1e-3"], "would not apply"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_model(tmp_path, monkeypatch, capsys, argv, needle):
    from spo_fast.core import trainer

    def no_build(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(trainer, "build", no_build)
    try:
        rc = cmp.main([*argv, "--out", str(tmp_path / "o")])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err
