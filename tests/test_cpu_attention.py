"""ChunkedAttnProcessor: the sampling copies' attention on a CPU in bf16, and SDPA everywhere else."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from test_merged import TINY

from spo_fast.diffusion import cpu_attention
from spo_fast.diffusion.cpu_attention import ChunkedAttnProcessor, chunked_attention


def _qkv(n=12, length=20, s=7, d=8, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, m, d, generator=g).to(dtype) for m in (length, s, s)]


@pytest.mark.parametrize("s", [20, 7])
def test_chunked_attention_matches_fp64_sdpa_for_every_chunk_size(s):
    q, k, v = _qkv(s=s)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    outs = [chunked_attention(q, k, v, 0.3, budget) for budget in (1, 20 * s * 2 * 5, 1 << 20)]  # 1, 5, all heads
    for out in outs:
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        # bf16 inputs: the error of SDPA's own bf16 path on the same inputs sets the scale
        ref_err = (F.scaled_dot_product_attention(q, k, v, scale=0.3).double() - want).abs().max()
        assert (out.double() - want).abs().max() <= 2 * ref_err + 1e-2
    # chunks only split independent heads: the result does not depend on the chunk size
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def _attn(cross: bool):
    torch.manual_seed(1)
    return Attention(query_dim=32, cross_attention_dim=16 if cross else None, heads=4, dim_head=8).eval()


@pytest.mark.parametrize("cross", [False, True])
def test_processor_equals_diffusers_sdpa(cross):
    attn = _attn(cross)
    x = torch.randn(3, 36, 32)
    ctx = torch.randn(3, 5, 16) if cross else None

    def run(proc, grad=False, bf16=False):
        attn.set_processor(proc)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return attn(x, encoder_hidden_states=ctx)

    ours, theirs = ChunkedAttnProcessor(), AttnProcessor2_0()
    with mock.patch.object(cpu_attention, "chunked_attention", wraps=chunked_attention) as spy:
        # fp32, or with gradients: SDPA, bit for bit as diffusers' processor
        assert torch.equal(run(ours), run(theirs))
        assert torch.equal(run(ours, grad=True), run(theirs, grad=True))
        assert torch.equal(run(ours, grad=True, bf16=True), run(theirs, grad=True, bf16=True))
        assert spy.call_count == 0
        # no-grad bf16 on a CPU: the chunked path, equal to SDPA's bf16 up to bf16 rounding
        got, want = run(ours, bf16=True), run(theirs, bf16=True)
        assert spy.call_count == 1
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    # a score matrix larger than the budget keeps SDPA
    with mock.patch.object(cpu_attention, "chunked_attention", wraps=chunked_attention) as spy:
        run(ChunkedAttnProcessor(budget=36 * 4), bf16=True)
        assert spy.call_count == 0


def test_processor_hands_other_configurations_to_diffusers():
    attn = _attn(False)
    attn.set_processor(ChunkedAttnProcessor())
    x, mask = torch.randn(2, 10, 32), torch.zeros(2, 1, 10)
    with mock.patch.object(AttnProcessor2_0, "__call__", autospec=True, return_value=x) as fallback:
        attn(x, attention_mask=mask)
        attn(x.view(2, 32, 10, 1).contiguous())  # 4-D hidden states
    assert fallback.call_count == 2


def test_unet_with_chunked_attention_samples_like_sdpa():
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(TINY).eval()
    x, t, e = torch.randn(4, 3, 8, 8), torch.tensor([10, 300, 600, 900]), torch.randn(4, 5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = unet(x, t, encoder_hidden_states=e).sample
        unet.set_attn_processor(ChunkedAttnProcessor())
        got = unet(x, t, encoder_hidden_states=e).sample
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert not torch.equal(got, want)  # the chunked path ran (it rounds differently)
