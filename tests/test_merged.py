"""MergedLoRA: a plain UNet copy equal to the LoRA policy, refreshed after the adapters move."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from spo_fast.diffusion.merged import MergedLoRA, lora_layers

TINY = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
        "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 16,
        "attention_head_dim": 2, "norm_num_groups": 8}


def _policy():
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(TINY).eval()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet


def _run(unet, x, t, e):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=e).sample


def test_merged_copy_equals_policy_and_follows_updates():
    unet = _policy()
    x, t, e = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 900]), torch.randn(3, 5, 16)
    merged = MergedLoRA(unet)
    assert not lora_layers(merged.module) and lora_layers(unet)
    assert all(not p.requires_grad for p in merged.module.parameters())
    torch.testing.assert_close(_run(merged.module, x, t, e), _run(unet, x, t, e), atol=1e-5, rtol=1e-5)
    # move the adapters (lora_B starts at zero with gaussian init: a non-zero B makes the delta non-trivial)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    stale = _run(merged.module, x, t, e)
    want = _run(unet, x, t, e)
    assert (stale - want).abs().max() > 1e-3  # the copy does not follow by itself
    merged.refresh()
    torch.testing.assert_close(_run(merged.module, x, t, e), want, atol=1e-5, rtol=1e-5)
    # the policy's base weights are untouched (nothing merged into it)
    layer = next(iter(lora_layers(unet).values()))
    assert layer.merged_adapters == []


def test_merged_needs_lora():
    with pytest.raises(ValueError, match="no LoRA layers"):
        MergedLoRA(UNet2DConditionModel.from_config(TINY))


def test_merge_lora_config_needs_lora():
    from spo_fast.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="sampling.merge_lora"):
        load_config(None, ["sampling.merge_lora=true", "lora.enabled=false"])
