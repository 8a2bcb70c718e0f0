"""benchmarks/spm_pick_rounding.py: a tiny run on the packaged toy world."""
import json


def test_tiny_run_reports_agreement_in_range(tmp_path, capsys, bench_script):
    mod = bench_script("spm_pick_rounding")
    out = tmp_path / "r.json"
    assert mod.main(["--prompts", "3", "--steps", "1,4", "--num-steps", "6", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [r["step"] for r in rep["steps"]] == [1, 4]
    for r in rep["steps"]:
        assert all(0.0 <= r[key] <= 1.0 for key in ("same_best", "same_worst", "same_valid", "valid_sdpa"))
        # the two kernels differ (by rounding), and only by rounding: far less than the SPM's gap within a pool
        assert 0.0 < r["score_change"] < r["pool_gap"]
    capsys.readouterr()
