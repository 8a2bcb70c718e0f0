"""The toy UNet's bf16 sampling forward, three ways, timed interleaved (docs/speed.md, "Sampling copies"):

    python benchmarks/toy_unet_forward.py [--batch 64] [--rounds 5] [--calls 4] [--profile] [--heads N]

``fp32 weights, SDPA`` (autocast casts every weight at every call; the rollout before the sampling copies),
``bf16 weights, SDPA`` (``MergedLoRA(weight_dtype=bf16)``: the rollout before the chunked attention) and ``bf16
weights, chunked`` (``sampling.chunked_attention``: the rollout's and the evaluation's copies now). Rounds alternate
the three (machines drift by 2x over minutes); prints the median ms per forward of each, the ratios to the first,
and whether the bf16 weights gave a bit-identical output. Run it with nothing else on the machine, and note
OMP_WAIT_POLICY (PASSIVE slows the chunked kernel's many small calls most). ``--profile`` adds where the last
variant's forward spends its time (``torch.profiler``: each aten op's share of the self CPU time over ``--calls``
forwards, the ops above 1%) and its FLOPs by op (``FlopCounterMode``), with the matmul ops' achieved GFLOP/s.
``--heads N`` adds a fourth variant: the same UNet but with N attention heads (diffusers' ``attention_head_dim``, which
this UNet reads as the number of heads: the shipped base has 8 of 8 channels) and random weights (a forward's time
does not depend on them), as the third: what a base rebuilt with fewer, wider heads would cost per forward.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from spo_fast.diffusion.cpu_attention import ChunkedAttnProcessor
from spo_fast.diffusion.models import resolve_model_path


def _bf16_weights(unet):
    for m in unet.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(torch.bfloat16)
    return unet


def variants(unet, heads: int | None = None) -> dict:
    bf16 = _bf16_weights(copy.deepcopy(unet))
    chunked = copy.deepcopy(bf16)
    chunked.set_attn_processor(ChunkedAttnProcessor())
    out = {"fp32 weights, SDPA": unet, "bf16 weights, SDPA": bf16, "bf16 weights, chunked": chunked}
    if heads is not None:
        torch.manual_seed(0)
        other = _bf16_weights(UNet2DConditionModel.from_config({**unet.config, "attention_head_dim": heads}).eval())
        other.set_attn_processor(ChunkedAttnProcessor())
        out[f"bf16 weights, chunked, {heads} heads (random weights)"] = other
    return out


def profile_forward(forward, calls: int) -> dict:
    """The forward's self CPU time by aten op (share of the total, ops above 1%), its GFLOP per forward by op, and
    the achieved GFLOP/s of each op that does FLOPs (its FLOPs over its self time)."""
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        forward()
    flops = {str(k).removeprefix("aten."): v for k, v in counter.get_flop_counts()["Global"].items()}
    with profile() as prof:
        for _ in range(calls):
            forward()
    self_us = {e.key.removeprefix("aten::"): e.self_cpu_time_total for e in prof.key_averages()
               if e.key.startswith("aten::")}
    total = sum(self_us.values())
    return {"self_cpu_share": {k: round(v / total, 3) for k, v in sorted(self_us.items(), key=lambda kv: -kv[1])
                               if v / total > 0.01},
            "ms_per_forward": round(total / calls / 1000, 1),
            "gflop_per_forward": {k: round(v / 1e9, 3) for k, v in flops.items()},
            "gflop_per_s": {k: round(v * calls / (self_us[op] * 1e3), 1) for k, v in flops.items()
                            for op in [_flop_op(k, self_us)] if op}}


def _flop_op(name: str, self_us: dict) -> str | None:
    """The profiler's op that does the counter's ``name`` FLOPs: on a CPU aten::convolution dispatches (its self time
    ~0) to mkldnn_convolution, which does them."""
    for op in (f"mkldnn_{name}", name):
        if self_us.get(op):
            return op
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="samples per forward (default 64: the rollout's pool, CFG)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=4, help="timed forwards per variant per round")
    p.add_argument("--profile", action="store_true", help="also profile the chunked variant by op (see above)")
    p.add_argument("--heads", type=int, help="also time a UNet with this many attention heads (see above)")
    args = p.parse_args(argv)
    if min(args.batch, args.rounds, args.calls) < 1:
        p.error("--batch, --rounds and --calls must be >= 1")
    unet = UNet2DConditionModel.from_pretrained(resolve_model_path("toyworld:base") / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 24, 24, generator=g)
    t = torch.full((args.batch,), 500)
    e = torch.randn(args.batch, 16, unet.config.cross_attention_dim, generator=g)

    def forward(m):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x, t, e).sample

    attn_channels = [c for c, kind in zip(unet.config.block_out_channels, unet.config.down_block_types)
                     if "CrossAttn" in kind]
    if args.heads is not None and (args.heads < 1 or any(c % args.heads for c in attn_channels)):
        p.error(f"--heads must divide the attention levels' channels {attn_channels}, got {args.heads}")
    models = variants(unet, args.heads)
    outs = {name: forward(m) for name, m in models.items()}  # also the warm-up
    ms = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                forward(m)
            ms[name].append((time.perf_counter() - t0) / args.calls * 1000)
    med = {name: statistics.median(v) for name, v in ms.items()}
    first = next(iter(med.values()))
    names = list(models)
    prof = {"profile": profile_forward(lambda: forward(models[names[2]]), args.calls)} if args.profile else {}
    print(json.dumps({"batch": args.batch, "threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
                      "median_ms": {k: round(v, 1) for k, v in med.items()},
                      "speedup_vs_first": {k: round(first / v, 3) for k, v in med.items()},
                      "bf16_weights_bit_identical": bool(torch.equal(outs[names[0]], outs[names[1]])),
                      "chunked_max_abs_diff": (outs[names[2]].float() - outs[names[1]].float()).abs().max().item(),
                      **prof}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
