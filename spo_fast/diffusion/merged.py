"""A LoRA policy's weights merged into a plain copy of its UNet, for no-grad sampling (``sampling.merge_lora``).

The rollout runs the policy thousands of times without gradients. Through peft every adapted linear layer costs its
base matmul plus two rank-r matmuls, a dropout call and Python dispatch; with a copy of the UNet whose adapted
weights hold W + scaling * B @ A, the rollout runs plain ``nn.Linear`` layers. The copy is refreshed (the deltas
recomputed and written in place, ``refresh``) before every rollout, after the optimizer has moved the adapters, so it
always equals the current policy up to float rounding of the merge; the policy itself is never merged or unmerged
(an unmerge after each rollout would drift the base weights by rounding every iteration).

For a copy that only ever runs under autocast (``weight_dtype``), the weights and biases of its ``nn.Linear`` and
``nn.Conv2d`` layers are stored in the autocast dtype: autocast casts them to that dtype at every call anyway (a
frozen weight's cast is not cached), so the result is bit-identical and the per-call casts are gone. On the toy UNet
that saves little: its bf16 forward at batch 64 moved within noise on a 2-core CPU (``benchmarks/toy_unet_forward.py``,
interleaved: 269 -> 267 ms and 229 -> 232 ms with SDPA; a one-off run with the chunked attention, outside the
benchmark: 197 -> 182 ms); a model with larger weights per activation saves more. Norm layers keep fp32, as autocast
runs them. ``chunked_attention`` installs ``spo_fast.diffusion.cpu_attention.ChunkedAttnProcessor`` on the copy
(``sampling.chunked_attention``: the rollout's and the evaluation's copies; see that module).
``adapter=None`` gives a plain copy of the base model (the evaluation's base).

Costs: a second UNet in memory (the toy UNet: 4 MB; SD1.5: 1.7 GB in bf16, which is why it is off by default outside
the toy recipes) and, per rollout, one rank-r product per adapted layer. Writing in place keeps tensor identities,
so CUDA graphs captured on the copy stay valid.
"""
from __future__ import annotations

import contextlib
import copy

import torch


def lora_layers(unet) -> dict[str, torch.nn.Module]:
    """The peft LoRA layers of ``unet`` by module name (modules with ``lora_A``, ``lora_B`` and ``base_layer``)."""
    return {name: m for name, m in unet.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")}


class MergedLoRA:
    """A plain UNet equal to ``unet`` (a peft-adapted diffusers UNet) with its active adapter merged in.

    ``module`` is the copy (no adapters, frozen, same device; Linear/Conv2d in ``weight_dtype`` if given, for use
    under autocast of that dtype only); ``refresh()`` rewrites every adapted layer's weight as base + delta from the
    policy's current adapter weights (``adapter=None``: the base weights alone).
    """

    def __init__(self, unet, adapter: str | None = "default", weight_dtype: torch.dtype | None = None,
                 chunked_attention: bool = False):
        self.layers = lora_layers(unet)
        if not self.layers:
            raise ValueError("MergedLoRA: the UNet has no LoRA layers")
        self.adapter = adapter
        self.module = self._plain_copy(unet)
        if weight_dtype is not None:
            for m in self.module.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    m.to(weight_dtype)
        # only on a CPU, the one device where it can take its chunked path: elsewhere the copy keeps the policy's
        # processors (train.attention: SDPA, xformers or flash-attn), which its SDPA fallback would replace
        if chunked_attention and next(unet.parameters()).device.type == "cpu":
            from spo_fast.diffusion.cpu_attention import ChunkedAttnProcessor

            self.module.set_attn_processor(ChunkedAttnProcessor())
        own = dict(self.module.named_modules())
        self.targets = {name: own[name] for name in self.layers}
        self.refresh()

    def _plain_copy(self, unet):
        """Deep copy with every LoRA layer replaced by a copy of its base layer."""
        plain = copy.deepcopy(unet)
        for name in self.layers:
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name) if parent_name else plain
            setattr(parent, child, copy.deepcopy(getattr(parent, child).base_layer))
        # drop peft's bookkeeping so the copy behaves as a plain diffusers model
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in plain.__dict__:
                delattr(plain, attr)
        plain.requires_grad_(False)
        return plain.eval()

    @torch.no_grad()
    def refresh(self) -> None:
        """Write W_base + scaling * B @ A (the policy's current adapter) into the copy's layers, in place (the merge in
        fp32 even inside an autocast)."""
        device_type = next(iter(self.layers.values())).base_layer.weight.device.type
        with torch.autocast(device_type, enabled=False):
            self._refresh()

    def _refresh(self) -> None:
        for name, layer in self.layers.items():
            merged = layer.base_layer.weight.float()
            if self.adapter is not None and self.adapter in layer.lora_A:
                merged = merged + layer.get_delta_weight(self.adapter)
            self.targets[name].weight.copy_(merged)  # copy_ casts to the copy's dtype


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype the current autocast of ``device_type`` computes in; None outside an autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@contextlib.contextmanager
def plain_unet(unet, adapter: str | None = "default", chunked_attention: bool = False):
    """A ``MergedLoRA`` copy of ``unet`` for the duration of the block (its module), freed on exit. Enter it inside
    the autocast it will sample under: its Linear/Conv2d weights take that autocast's dtype (none: fp32)."""
    merged = MergedLoRA(unet, adapter, autocast_dtype(unet.device.type), chunked_attention)
    try:
        yield merged.module
    finally:
        del merged
