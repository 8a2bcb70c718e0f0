"""benchmarks/toy_unet_forward.py: a tiny interleaved run on the packaged toy UNet."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_unet_forward.py"


def test_tiny_run_reports_three_variants(capsys):
    spec = importlib.util.spec_from_file_location("toy_unet_forward", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--batch", "2", "--rounds", "1", "--calls", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["median_ms"]) == 3 and all(v > 0 for v in rep["median_ms"].values())
    assert rep["bf16_weights_bit_identical"] is True  # the weights' dtype is exact under autocast
    assert 0 < rep["chunked_max_abs_diff"] < 0.1  # another rounding, of bf16 size
