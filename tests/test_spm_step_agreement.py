"""benchmarks/spm_step_agreement.py: the within-pool statistics and a tiny run on the packaged toy world."""
import pytest
import torch


@pytest.fixture(scope="module")
def agreement_module(bench_script):
    return bench_script("spm_step_agreement")


def test_within_pool_corr_ignores_pool_means(agreement_module):
    corr = agreement_module.within_pool_corr
    a = torch.tensor([[1.0, 2.0, 3.0], [10.0, 11.0, 12.0]])
    assert corr(a, a + torch.tensor([[100.0], [-5.0]])) == pytest.approx(1.0)  # pool offsets do not count
    assert corr(a, -a) == pytest.approx(-1.0)
    assert corr(a, torch.tensor([[3.0, 1.0, 2.0], [11.0, 12.0, 10.0]])) == pytest.approx(-0.5)


def test_last_step_reads_the_final_image(agreement_module, capsys):
    """At the last step the candidates are the final images: the ground truth of what the SPM reads is the final
    ground truth (correlation 1), it is scored at t = 0, and every statistic is in its range."""
    from spo_fast.diffusion.models import load_components, resolve_model_path
    from spo_fast.reward.spm import SPMScorer
    from spo_fast.toyworld import world

    comp = load_components(str(resolve_model_path("toyworld:base")), "sd15")
    scorer = SPMScorer.from_pretrained(resolve_model_path("toyworld:spm"))
    sampler = agreement_module.Sampler(comp, 4, 1.0, 5.0, bf16=False)
    rows, overall = agreement_module.agreement(comp, scorer, world.validation_prompts()[:6], [2, 3], 3, 0, sampler,
                                               [0.0, 1.0])
    last = rows[-1]
    assert last["t_scored"] == 0 and rows[0]["t_scored"] == int(sampler.ts[3])
    assert last["corr_gt_x0"] == pytest.approx(1.0, abs=1e-5)
    for r in rows:
        assert 0 <= r["decided"] <= 1 and 0 <= r["agree"] <= 1 and -1 <= r["corr_spm"] <= 1
        assert r["spm_gap"] >= 0 and r["gt_pool_range"] >= 0
        assert r["by_threshold"]["1"] == {"kept": 0.0, "decided": 0, "agree": None}  # tanh never exceeds 1
    assert overall["1"]["kept"] == 0.0 and overall["0"]["decided"] <= 12


def test_by_threshold_keeps_the_pools_above_it_and_agrees_among_the_decided(agreement_module):
    """A pool counts for a threshold as SPO's pair selection counts it (tanh(gap / 2) > threshold, the same call);
    agreement is over the kept pools whose ground truth differs by more than the tie margin, None where none is left."""
    from spo_fast.kernels.pair_select import select_from_scores
    from spo_fast.toyworld.build import TIE_MARGIN

    gap = torch.tensor([0.1, 0.4, 1.2, 3.0])  # tanh(gap / 2): 0.05, 0.20, 0.54, 0.91
    diff = torch.tensor([1.0, -1.0, 1.0, TIE_MARGIN / 2])  # the last one: a tie to the ground truth
    out = agreement_module.by_threshold(gap, diff, [0.1, 0.5, 0.95])
    assert out["0.1"] == {"kept": 0.75, "decided": 2, "agree": 0.5}
    assert out["0.5"] == {"kept": 0.5, "decided": 1, "agree": 1.0}
    assert out["0.95"] == {"kept": 0.0, "decided": 0, "agree": None}
    scores = torch.stack([torch.zeros(4), gap], 1)  # pools of two whose best-worst gap is ``gap``
    for th in (0.1, 0.5, 0.95):
        valid = select_from_scores(scores, th, torch.zeros(4))[2]
        assert valid.float().mean().item() == out[f"{th:g}"]["kept"]


def test_cli_takes_the_guidance_scale_and_refuses_one_below_1(agreement_module, capsys):
    """``--cfg`` sets the trajectories' guidance (a world built at another scale is measured at its own); a scale
    below 1 is a usage error that names it, before any model loads."""
    import argparse

    p = argparse.ArgumentParser()
    agreement_module.add_pool_arguments(p, "4")
    assert p.parse_args([]).cfg == 5.0 and p.parse_args(["--cfg", "1.5"]).cfg == 1.5
    with pytest.raises(SystemExit) as e:
        agreement_module.main(["--cfg", "0.5", "--model", "no/such/dir"])
    assert e.value.code == 2 and "--cfg >= 1 (got --k 4, --prompts 64, --cfg 0.5)" in capsys.readouterr().err
