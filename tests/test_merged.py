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


def _bf16(unet, x, t, e):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return unet(x, t, encoder_hidden_states=e).sample


def _trained_policy():
    """A policy whose LoRA is not the identity (lora_B moved off zero), and a batch of inputs."""
    unet = _policy()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return unet, (torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 900]), torch.randn(3, 5, 16))


def test_weights_in_the_autocast_dtype_are_bit_identical_under_autocast():
    """Linear/Conv2d weights stored in bf16 give exactly what autocast's per-call casts of fp32 weights give."""
    unet, (x, t, e) = _trained_policy()
    fp32, bf16 = MergedLoRA(unet), MergedLoRA(unet, weight_dtype=torch.bfloat16)
    dtypes = {p.dtype for m in bf16.module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              for p in m.parameters()}
    norms = {p.dtype for m in bf16.module.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))
             for p in m.parameters()}
    assert dtypes == {torch.bfloat16} and norms == {torch.float32}
    assert torch.equal(_bf16(bf16.module, x, t, e), _bf16(fp32.module, x, t, e))
    with torch.no_grad():  # a refresh writes the new merge, rounded as autocast would round it
        for name, p in unet.named_parameters():
            if "lora_A" in name:
                p.mul_(1.5)
    fp32.refresh(), bf16.refresh()
    assert torch.equal(_bf16(bf16.module, x, t, e), _bf16(fp32.module, x, t, e))


def test_base_copy_and_sampling_unet():
    """adapter=None copies the base; the trainer's sampling_unet gives copies with merge_lora, the UNet without."""
    from types import SimpleNamespace

    from spo_fast.core.config import load_config
    from spo_fast.core.trainer import sampling_unet
    from spo_fast.diffusion.cpu_attention import ChunkedAttnProcessor

    unet, (x, t, e) = _trained_policy()
    unet.disable_adapters()
    base = _run(unet, x, t, e)
    unet.enable_adapters()
    trained = _run(unet, x, t, e)
    assert (base - trained).abs().max() > 1e-3
    s = SimpleNamespace(raw_unet=unet, ref_unet=None)
    plain = load_config(None, ["sampling.merge_lora=true", "sampling.dtype=fp32"])
    for row, want in (("base", base), ("trained", trained)):
        with sampling_unet(plain, s, row) as copy:
            assert copy is not unet and not lora_layers(copy)
            torch.testing.assert_close(_run(copy, x, t, e), want, atol=1e-5, rtol=1e-5)
    bf16 = load_config(None, ["sampling.merge_lora=true", "sampling.dtype=bf16"])
    with torch.autocast("cpu", dtype=torch.bfloat16), sampling_unet(bf16, s, "trained") as copy:
        # made inside the autocast: weights in its dtype, the merge itself still in fp32
        assert copy.conv_in.weight.dtype == torch.bfloat16
        assert all(isinstance(p, ChunkedAttnProcessor) for p in copy.attn_processors.values())
        torch.testing.assert_close(_bf16(copy, x, t, e).float(), _bf16(unet, x, t, e).float(), atol=5e-2, rtol=5e-2)
        layer = copy.get_submodule(next(iter(lora_layers(unet))))
    with sampling_unet(plain, s, "trained") as fp32_copy:
        want = fp32_copy.get_submodule(next(iter(lora_layers(unet)))).weight.to(torch.bfloat16)
    assert torch.equal(layer.weight, want)
    off = load_config(None, ["sampling.merge_lora=true", "sampling.dtype=bf16", "sampling.chunked_attention=false"])
    with sampling_unet(off, s, "trained") as copy:
        assert not any(isinstance(p, ChunkedAttnProcessor) for p in copy.attn_processors.values())
    with sampling_unet(load_config(None, ["sampling.merge_lora=false"]), s, "trained") as same:
        assert same is unet


@pytest.mark.parametrize("chunked", [True, False])
def test_the_spo_rollout_copy_follows_chunked_attention(tmp_path, chunked):
    """The SPO rollout's merged copy takes sampling.chunked_attention, as the grid's and the evaluation's copies do."""
    from accelerate import Accelerator

    from spo_fast.core import trainer
    from spo_fast.core.config import load_config
    from spo_fast.diffusion.cpu_attention import ChunkedAttnProcessor
    from spo_fast.methods.spo import SPO

    cfg = load_config("toy_spo", [f"log.output_dir={tmp_path}", "log.report_to=none",
                                  f"sampling.chunked_attention={str(chunked).lower()}"])
    method = SPO()
    method.preflight(cfg)
    acc = Accelerator(cpu=True)
    s = trainer.build(cfg, acc)
    method.setup(cfg, s, acc)
    kinds = {isinstance(p, ChunkedAttnProcessor) for p in method.merged.module.attn_processors.values()}
    assert kinds == {chunked}
    assert not any(isinstance(p, ChunkedAttnProcessor) for p in s.raw_unet.attn_processors.values())


def test_the_chunked_attention_is_installed_on_a_cpu_only(monkeypatch):
    """Off a CPU (here the meta device stands in for a GPU) the copy keeps the policy's own attention processors
    (train.attention: xformers or flash-attn there), which the chunked processor's SDPA fallback would replace."""
    from diffusers.models.attention_processor import AttnProcessor

    from spo_fast.diffusion.cpu_attention import ChunkedAttnProcessor

    unet = _policy()
    unet.set_attn_processor(AttnProcessor())  # a processor other than SDPA's, as train.attention may install
    on_cpu = MergedLoRA(unet, chunked_attention=True).module.attn_processors.values()
    assert all(isinstance(p, ChunkedAttnProcessor) for p in on_cpu)
    monkeypatch.setattr(MergedLoRA, "refresh", lambda self: None)  # the merge itself cannot run on meta tensors
    off_cpu = MergedLoRA(unet.to("meta"), chunked_attention=True).module.attn_processors.values()
    assert all(type(p) is AttnProcessor for p in off_cpu)
