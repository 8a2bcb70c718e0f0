"""pytest-benchmark: batched reward scoring and pair selection (``score_and_select``): score the k candidates of
each pool against its prompt (cosine similarity times logit_scale) and pick win, lose, validity and the
continuation index.

Providers: ``eager`` (the PyTorch reference, ``score_and_select(..., backend="torch")``), ``compile``
(``torch.compile`` of ``score_and_select_reference``; on CPU only with ``SPO_FAST_BENCH_COMPILE=1`` and only at
the ``sd15`` shape, compiling takes tens of seconds there) and ``triton`` (``score_and_select(...,
backend="triton")``; CUDA only). The uniform draws u (B,) are passed in, so every provider computes the same
continuation indices.

Shapes (B pools of k candidates, D = 1024 features: the PickScore / CLIP ViT-H projection):

- ``sd15``: the SD1.5 recipe, B=10, k=4;
- ``sdxl``: the SDXL recipe, B=2, k=2;
- ``large``: B=8192, k=4, enough to fill a GPU: the bandwidth target (GPU only);
- ``small``: B=512, k=4, the CPU's stand-in for ``large`` (CPU only).

img (B * k, D) un-normalised image features, txt (B, D) L2-normalised text features, logit_scale 100, threshold
0.3. The features are built so that about half of the pools are valid (pool 0 valid and pool 1 invalid at every
shape) and no decision is within rounding of a tie or of the threshold, so every provider must match the
reference exactly. dtypes: fp32 and bf16 (img and txt) on GPU, fp32 on CPU. Every provider's scores (allclose)
and win/lose/valid/cont (equal) are checked against the reference once before timing, so a broken kernel
cannot post a fast number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from bench_utils import compiled, fill_extra_info, skip_reason, sync, tensor_bytes

from spo_fast.kernels.pair_select import score_and_select, score_and_select_reference

LOGIT_SCALE, THRESHOLD = 100.0, 0.3  # PickScore's logit scale; the recipes' selection threshold
D = 1024


@dataclass(frozen=True)
class Shape:
    b: int  # pools (prompts)
    k: int  # candidates per pool
    d: int  # features
    where: str  # "any" | "gpu" | "cpu"

    def as_dict(self) -> dict:
        return {"B": self.b, "k": self.k, "D": self.d, "img_shape": [self.b * self.k, self.d],
                "txt_shape": [self.b, self.d], "scores_shape": [self.b, self.k]}


SHAPES = {
    "sd15": Shape(10, 4, D, where="any"),
    "sdxl": Shape(2, 2, D, where="any"),
    "large": Shape(8192, 4, D, where="gpu"),
    "small": Shape(512, 4, D, where="cpu"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("eager", "compile", "triton")


# ----------------------------------------------------------------------------- providers


def _select_fn(provider: str):
    """fn(img, txt, logit_scale, k, threshold, u) -> PairSelection."""
    if provider == "eager":
        return lambda *a: score_and_select(*a, backend="torch")
    if provider == "compile":
        return compiled(score_and_select_reference)
    if provider == "triton":
        return lambda *a: score_and_select(*a, backend="triton")
    raise ValueError(provider)


# ----------------------------------------------------------------------------- inputs
def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    """(img, txt, u). Each pool shares a base image direction with cosine 0.2 to its prompt; candidate j adds
    delta_b * g_j * txt_b, g_j a per-pool permutation of k evenly spaced offsets (so win and lose move around),
    plus a little isotropic noise, and each row is scaled by a random norm (the op must normalise). delta_b sets
    the pool's score range R_b ~ logit_scale * delta_b * (k - 1): R in [0.1, 0.4] (tanh(R / 2) <= 0.2, invalid)
    or R in [1, 5] (tanh >= 0.44, valid), half the pools each. Adjacent scores in a pool are >= R / (k - 1)
    apart, orders of magnitude above fp32 summation error and bf16 input rounding: no near-ties."""
    g = torch.Generator(device=device).manual_seed(0)
    b, k, d = shape.b, shape.k, shape.d

    def randn(*size):
        return torch.randn(*size, generator=g, device=device)

    def rand(*size):
        return torch.rand(*size, generator=g, device=device)

    txt = F.normalize(randn(b, d), dim=-1)
    other = F.normalize(randn(b, d), dim=-1)
    other = F.normalize(other - (other * txt).sum(-1, keepdim=True) * txt, dim=-1)  # orthogonal to txt
    base = 0.2 * txt + math.sqrt(1 - 0.2**2) * other  # unit norm, cosine 0.2 with txt

    valid = rand(b) < 0.5
    valid[0] = True
    if b > 1:
        valid[1] = False
    frac = rand(b)  # log-uniform position inside the band
    score_range = torch.where(valid, 1.0 * 5.0**frac, 0.1 * 4.0**frac)  # [1, 5] or [0.1, 0.4]
    delta = score_range / (LOGIT_SCALE * max(k - 1, 1))
    offsets = torch.arange(k, device=device, dtype=torch.float32) - (k - 1) / 2
    g_j = offsets[rand(b, k).argsort(dim=1)]  # (B, k): a permutation of the offsets per pool
    img = base[:, None] + (delta[:, None] * g_j)[..., None] * txt[:, None]  # (B, k, D)
    img = img + 1e-4 * randn(b, k, d) / math.sqrt(d)
    img = img * (0.5 + 1.5 * rand(b, k, 1))  # un-normalised rows
    u = rand(b)
    return img.reshape(b * k, d).to(dtype), txt.to(dtype), u


# ----------------------------------------------------------------------------- correctness
def _check_against_reference(out, args, provider: str) -> None:
    img, txt, u = args
    k = img.shape[0] // txt.shape[0]
    ref = score_and_select_reference(img, txt, LOGIT_SCALE, k, THRESHOLD, u)
    n_valid = int(ref.valid.sum())
    assert 0 < n_valid < len(ref.valid) or len(ref.valid) == 1, \
        f"the inputs were meant to give valid and invalid pools; got {n_valid} of {len(ref.valid)} valid"
    # scores are fp32 math on the features as stored, whatever their dtype: one fp32 tolerance
    scale = ref.scores.abs().max().item()
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-5, atol=1e-5 * scale,
                               msg=lambda m: f"{provider}: scores differ from the reference\n{m}")
    for name in ("win", "lose", "valid", "cont"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == want.dtype and got.shape == want.shape, \
            f"{provider}: {name} is {got.dtype} {tuple(got.shape)}; the reference's is {want.dtype} {tuple(want.shape)}"
        bad = (got != want).nonzero().flatten()
        assert bad.numel() == 0, (f"{provider}: {name} differs from the reference in {bad.numel()} of {len(want)} "
                                  f"pools, first at pool {bad[0].item()}")


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_score_and_select(benchmark, device, copy_bandwidth, shape_name, dtype_name, provider):
    reason = skip_reason(provider, shape_name, SHAPES[shape_name].where, dtype_name, device)
    if reason:
        pytest.skip(reason)
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    select_fn = _select_fn(provider)
    args = _inputs(shape, dtype, device)
    img, txt, u = args

    def step():
        return select_fn(img, txt, LOGIT_SCALE, shape.k, THRESHOLD, u)

    def step_synced():  # pytest-benchmark times on the host: wait for the device
        out = step()
        sync(device)
        return out

    out = step_synced()  # also compiles (compile, triton)
    _check_against_reference(out, args, provider)
    benchmark.group = f"score_and_select | {shape_name} | {dtype_name}"
    benchmark(step_synced)

    # every input read once, every output written once: scores (B, k) fp32, win/lose/cont int64, valid bool
    inputs = tensor_bytes(img, txt, u)
    outputs = tensor_bytes(out.scores, out.win, out.lose, out.valid, out.cont)
    fill_extra_info(benchmark, op="score_and_select", provider=provider, shape_name=shape_name,
                    shape=shape.as_dict(), dtype=dtype, device=device, bytes_moved=inputs + outputs, fn=step,
                    copy_bandwidth=copy_bandwidth)
    benchmark.extra_info["params"] = {"logit_scale": LOGIT_SCALE, "threshold": THRESHOLD,
                                      "valid_fraction": out.valid.float().mean().item()}
