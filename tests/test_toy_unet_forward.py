"""benchmarks/toy_unet_forward.py: a tiny interleaved run on the packaged toy UNet."""
import json


def test_tiny_run_reports_three_variants(capsys, bench_script):
    mod = bench_script("toy_unet_forward")
    assert mod.main(["--batch", "2", "--rounds", "1", "--calls", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["median_ms"]) == 3 and all(v > 0 for v in rep["median_ms"].values())
    assert rep["bf16_weights_bit_identical"] is True  # the weights' dtype is exact under autocast
    assert 0 < rep["chunked_max_abs_diff"] < 0.1  # another rounding, of bf16 size
