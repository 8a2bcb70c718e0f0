"""benchmarks/toy_unet_forward.py: a tiny interleaved run on the packaged toy UNet."""
import json


def test_tiny_run_reports_three_variants(capsys, bench_script):
    mod = bench_script("toy_unet_forward")
    assert mod.main(["--batch", "2", "--rounds", "1", "--calls", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["median_ms"]) == 3 and all(v > 0 for v in rep["median_ms"].values())
    assert rep["bf16_weights_bit_identical"] is True  # the weights' dtype is exact under autocast
    assert 0 < rep["chunked_max_abs_diff"] < 0.1  # another rounding, of bf16 size


def test_profile_splits_the_forward_by_op(capsys, bench_script):
    """``--profile``: shares of the self CPU time (ops above 1%, summing to at most 1, the convolution among them),
    the FLOPs by op (the convolutions' the most at this architecture) and their achieved rate."""
    mod = bench_script("toy_unet_forward")
    assert mod.main(["--batch", "2", "--rounds", "1", "--calls", "1", "--profile"]) == 0
    prof = json.loads(capsys.readouterr().out)["profile"]
    assert 0 < sum(prof["self_cpu_share"].values()) <= 1.0001 and "mkldnn_convolution" in prof["self_cpu_share"]
    flops = prof["gflop_per_forward"]
    assert max(flops, key=flops.get) == "convolution" and prof["gflop_per_s"]["convolution"] > 0
    assert prof["gflop_per_s"]["convolution"] < 10_000  # rated by mkldnn_convolution's time, not the dispatcher's
    assert prof["ms_per_forward"] > 0
