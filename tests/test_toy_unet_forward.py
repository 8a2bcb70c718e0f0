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


def test_heads_adds_a_variant_with_that_many_heads(capsys, bench_script):
    """``--heads 2``: a fourth variant, the shipped UNet's config with 2 attention heads (random weights); a head
    count that does not divide the attention's channels is refused before anything is timed."""
    mod = bench_script("toy_unet_forward")
    assert mod.main(["--batch", "2", "--rounds", "1", "--calls", "1", "--heads", "2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    name = "bf16 weights, chunked, 2 heads (random weights)"
    assert list(rep["median_ms"])[-1] == name and rep["median_ms"][name] > 0 and len(rep["median_ms"]) == 4
    try:
        mod.main(["--heads", "3"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--heads 3 was accepted")
    assert "--heads must divide the attention levels' channels [64], got 3" in capsys.readouterr().err


def test_variants_heads_config(bench_script):
    """The heads variant differs from the shipped UNet in its head count only."""
    import torch
    from diffusers import UNet2DConditionModel

    from spo_fast.diffusion.models import resolve_model_path

    mod = bench_script("toy_unet_forward")
    unet = UNet2DConditionModel.from_pretrained(resolve_model_path("toyworld:base") / "unet").eval()
    models = mod.variants(unet, heads=2)
    other = models["bf16 weights, chunked, 2 heads (random weights)"]
    diff = {k for k in unet.config if unet.config[k] != other.config[k]}
    assert diff == {"attention_head_dim"} and other.config.attention_head_dim == 2
    attn = [m for n, m in other.named_modules() if n.endswith("attn1")]
    assert attn and all(a.heads == 2 for a in attn)
    assert other.conv_in.weight.dtype == torch.bfloat16
