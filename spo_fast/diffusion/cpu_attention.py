"""Attention for no-grad bf16 sampling on a CPU: batched matmuls and a softmax, in chunks that stay in cache.

On a CPU, PyTorch's SDPA runs a flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) that is
built for large head dims; at the toy UNet's head dim of 8 (8 heads of 64 channels, 144 image tokens, 16 text
tokens) it took 46% of a bf16 UNet forward (batch 64, 2-core AMD EPYC with AVX512-BF16: 108 ms of 240). Written as
``softmax(q k^T) v`` with ``torch.bmm`` over (batch x heads), a few dozen heads at a time so that the chunk's score
matrices (~1 MB) stay in cache while the softmax reads and rewrites them, the same forward took 1.1-1.2x less time
(``benchmarks/toy_unet_forward.py``, interleaved: 228 ms against 267 and 204 against 232; earlier one-off runs: 286
against 354 and 169 against 216; OMP_WAIT_POLICY=PASSIVE, which wakes sleeping threads for each of its many small
calls, takes most of that gain away: 246 against 264) and its output moved by nothing measurable (max |difference|
from an fp32 forward 0.024 and mean 0.0029 with either attention: the rest of the bf16 forward dominates).

``ChunkedAttnProcessor`` is a diffusers attention processor that takes this path only where it pays and is safe:
a CPU tensor in bf16 (i.e. under bf16 autocast), gradients off, and one head's score matrix within the chunk
budget (``L * S * 2`` bytes <= ``budget``; SD1.5's 4096 x 4096 does not fit and keeps SDPA). Anything else goes
through SDPA exactly as diffusers' ``AttnProcessor2_0`` would. The trainer installs it on the plain UNet
copies that sample (``sampling.merge_lora``, ``sampling.chunked_attention``), on a CPU only (elsewhere they keep
``train.attention``): the SPO rollout's, the sample grid's and the end-of-run evaluation's. In the evaluation, with the bf16 weights, it moved the default run's six
evaluations (three seeds, two splits) by at most 0.009 of margin. In the rollout its different rounding flips ~5%
of the SPM's picks, so training takes another course than with SDPA: over nine paired seeds with no systematic
effect on the result, in a 1.10x faster run (docs/speed.md). Not on the policy or the reference it trains against:
they keep one attention, so their log-ratio is exactly 0 where their weights agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

BUDGET = 1 << 20  # bytes of bf16 scores per chunk (measured on the toy UNet: 256 KB - 4 MB within noise, 1 MB best)


def _plain(attn, hidden_states: torch.Tensor, attention_mask) -> bool:
    """The configuration this processor computes itself: the SD UNet's self- and cross-attention (3-D hidden
    states, no mask, no group/spatial/q/k norms, no residual, no output rescale)."""
    return (hidden_states.ndim == 3 and attention_mask is None and attn.spatial_norm is None
            and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None
            and not attn.residual_connection and attn.rescale_output_factor == 1.0)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      budget: int = BUDGET) -> torch.Tensor:
    """softmax(scale * q k^T) v for (N, L, D) q and (N, S, D) k, v, over N in chunks of at most ``budget`` bytes of
    scores. Matmuls and softmax run in the inputs' dtype (the softmax accumulates in fp32 internally)."""
    n, length, _ = q.shape
    chunk = max(1, budget // (length * k.shape[1] * q.element_size()))
    q = q * scale
    kt = k.transpose(1, 2)
    out = torch.empty_like(q)
    with torch.autocast(q.device.type, enabled=False):  # the dtype is chosen by the caller, not autocast
        for i in range(0, n, chunk):
            torch.bmm(torch.bmm(q[i:i + chunk], kt[i:i + chunk]).softmax(-1), v[i:i + chunk], out=out[i:i + chunk])
    return out


class ChunkedAttnProcessor:
    """A diffusers attention processor: ``chunked_attention`` for no-grad bf16 calls on a CPU whose per-head score
    matrix fits ``budget``; SDPA otherwise (see the module docstring)."""

    def __init__(self, budget: int = BUDGET):
        self.budget = budget
        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if not _plain(attn, hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states
        if encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross \
                else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, length, inner = q.shape
        s, h = k.shape[1], attn.heads
        d = inner // h
        fits = length * s * q.element_size() <= self.budget
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not torch.is_grad_enabled() and fits:
            heads = (x.view(b, -1, h, d).transpose(1, 2).reshape(b * h, -1, d) for x in (q, k, v))
            out = chunked_attention(*heads, attn.scale, self.budget).view(b, h, length, d)
        else:
            out = F.scaled_dot_product_attention(*(x.view(b, -1, h, d).transpose(1, 2) for x in (q, k, v)),
                                                 scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, length, inner).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))  # projection, dropout
