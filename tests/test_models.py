"""Tests for spo_fast.diffusion.models: arch dirs, generated tokenizers, loading, conditioning, dir checks."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from spo_fast.diffusion.models import (
    Conditioning,
    ModelDirError,
    check_model_dir,
    decode_latents,
    encode_negative,
    encode_prompts,
    load_components,
    resolve_model_path,
    unet_forward,
    write_clip_tokenizer,
    write_tokenizers,
)

ARCH = resolve_model_path("arch:sd15").parent
WORDS = [ln.strip() for ln in (ARCH / "words.txt").read_text().splitlines() if ln.strip() and ln[0] != "#"]


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny():
    """Random tiny components per family (seed 0), built once for the module."""
    return {fam: load_components(f"arch:tiny_{fam}", fam, init="random", seed=0) for fam in ("sd15", "sdxl")}


# --------------------------------------------------------------------------- tokenizers


def test_packaged_tokenizer_vocab_and_encoding():
    tok_dir = ARCH / "tiny_sd15" / "tokenizer"
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(tok) == len(vocab) > 256  # transformers 5 can silently build a 2-token tokenizer
    assert tok.model_max_length == 77 and tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == len(vocab) - 1  # CLIP convention: <|endoftext|> is the largest id

    bos, eos = tok.bos_token_id, tok.eos_token_id
    for word in WORDS:  # every listed word is one token
        assert tok(word).input_ids == [bos, vocab[word + "</w>"], eos], word
    ids = tok("a zxqvbnm Café, 42!").input_ids  # unknown text falls back to in-vocab pieces
    assert ids[0] == bos and ids[-1] == eos and all(0 <= i < len(vocab) and i != eos for i in ids[1:-1])
    padded = tok(["red cube", "blue"], padding="max_length", max_length=77, truncation=True).input_ids
    assert [len(p) for p in padded] == [77, 77] and padded[1][3:] == [eos] * 74


def test_write_clip_tokenizer_words_and_errors(tmp_path):
    size = write_clip_tokenizer(tmp_path, ["red", "ed", "reed", "banana", "red"])  # overlapping merges
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tok) == size == len(json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")))
    assert (tmp_path / "merges.txt").read_text().startswith("#version")
    for word in ("red", "ed", "reed", "banana"):
        assert len(tok(word).input_ids) == 3, word
    with pytest.raises(ValueError, match="lowercase"):
        write_clip_tokenizer(tmp_path, ["Red"])


def test_write_tokenizers_matches_packaged_dirs(tmp_path):
    """Regenerating from words.txt reproduces the committed tokenizer dirs and text encoder configs."""
    copy = tmp_path / "arch"
    shutil.copytree(ARCH, copy)
    size = write_tokenizers(copy)
    changed = [
        str(f.relative_to(copy)) for f in sorted(copy.rglob("*")) if f.is_file()
        and f.read_bytes() != (ARCH / f.relative_to(copy)).read_bytes()
    ]
    assert changed == []
    for arch in ("sd15", "sdxl", "tiny_sd15", "tiny_sdxl"):
        for cfg_file in (ARCH / arch).glob("text_encoder*/config.json"):
            cfg = json.loads(cfg_file.read_text())
            assert cfg["eos_token_id"] == size - 1
            assert cfg["vocab_size"] == (size if arch.startswith("tiny") else 49408)


# --------------------------------------------------------------------------- components


def test_load_random_is_seeded_frozen_fp32(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_components("arch:tiny_sd15", "sd15", init="random", seed=0)
    assert torch.equal(torch.rand(3), expected)  # global RNG untouched
    other = load_components("arch:tiny_sd15", "sd15", init="random", seed=1)
    w = tiny["sd15"].unet.conv_in.weight
    assert torch.equal(w, again.unet.conv_in.weight) and not torch.equal(w, other.unet.conv_in.weight)
    for comp in tiny.values():
        for module in (comp.unet, comp.vae, *comp.text_encoders):
            assert not module.training
            assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters())
        assert type(comp.scheduler).__name__ == "DDIMScheduler" and not comp.scheduler.config.clip_sample
        assert comp.vae_scale_factor == 2 and comp.latent_shape == (4, 8, 8)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_encode_prompts_and_unet_forward(tiny, family):
    comp = tiny[family]
    cond = encode_prompts(comp, ["a red cube", "two blue cats on the left"], "cpu", resolution=16)
    dim = comp.unet.config.cross_attention_dim
    assert cond.embeds.shape == (2, 77, dim) and len(cond) == 2
    if family == "sd15":
        assert cond.pooled is None and cond.added_cond_kwargs() is None
    else:
        assert cond.pooled.shape == (2, 32)
        assert cond.time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 2
        assert set(cond.added_cond_kwargs()) == {"text_embeds", "time_ids"}
    x = torch.randn(2, *comp.latent_shape)
    out = unet_forward(comp.unet, x, torch.tensor(500), cond)
    assert out.shape == x.shape
    assert unet_forward(comp.unet, x, torch.tensor([1, 999]), cond).shape == x.shape
    assert not torch.equal(cond.embeds[0], cond.embeds[1])


def test_vae_decode_batch_gives_the_same_images(tiny):
    """``model.vae_decode_batch``: the decoder called on slices returns the images of one call on the batch."""
    comp = copy.copy(tiny["sd15"])
    z = torch.randn(5, *comp.latent_shape, generator=torch.Generator().manual_seed(0))
    whole = decode_latents(comp, z, clamp=False)
    comp.decode_batch = 2  # slices of 2, 2, 1
    torch.testing.assert_close(decode_latents(comp, z, clamp=False), whole, rtol=1e-5, atol=1e-5)


def test_conditioning_ops():
    embeds = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4)
    cond = Conditioning(embeds, torch.arange(3.0).view(3, 1), torch.arange(3).view(3, 1).expand(3, 6))
    assert cond[1].embeds.shape == (1, 2, 4) and cond[-1].pooled.item() == 2
    assert cond[1:].pooled.flatten().tolist() == [1, 2]
    assert cond[torch.tensor([2, 0])].time_ids[:, 0].tolist() == [2, 0]
    assert cond.repeat_interleave(2).pooled.flatten().tolist() == [0, 0, 1, 1, 2, 2]
    both = Conditioning.cat([cond[:1], cond[2:]])
    assert len(both) == 2 and both.time_ids[:, 0].tolist() == [0, 2]
    half = cond.to(dtype=torch.float16)
    assert half.embeds.dtype == half.pooled.dtype == torch.float16 and half.time_ids.dtype == torch.int64
    sd15 = Conditioning(embeds)
    assert sd15.added_cond_kwargs() is None and sd15[0].pooled is None and len(Conditioning.cat([sd15, sd15])) == 6
    with pytest.raises(ValueError):
        Conditioning(embeds, pooled=torch.zeros(3, 1))


def test_real_arch_parameter_counts():
    """sd15/sdxl carry the real dims: built on the meta device, parameter counts match the releases."""
    counts = {}
    with torch.device("meta"):
        for arch in ("sd15", "sdxl"):
            root = resolve_model_path(f"arch:{arch}")
            counts[arch] = _count(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet")))
            counts[arch + "_vae"] = _count(AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")))
            counts[arch + "_te"] = _count(CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")))
        te2 = CLIPTextConfig.from_pretrained(resolve_model_path("arch:sdxl") / "text_encoder_2")
        counts["sdxl_te2"] = _count(CLIPTextModelWithProjection(te2))
    expected = {
        "sd15": 859.52e6, "sdxl": 2567.46e6, "sd15_vae": 83.65e6, "sdxl_vae": 83.65e6,
        "sd15_te": 123.06e6, "sdxl_te": 123.06e6, "sdxl_te2": 694.66e6,
    }
    assert counts == pytest.approx(expected, rel=0.01)


def test_pretrained_round_trip(tiny, tmp_path):
    comp = tiny["sdxl"]
    comp.unet.save_pretrained(tmp_path / "unet")
    comp.vae.save_pretrained(tmp_path / "vae")
    for name, enc in zip(("text_encoder", "text_encoder_2"), comp.text_encoders):
        enc.save_pretrained(tmp_path / name)
    src = resolve_model_path("arch:tiny_sdxl")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(src / name, tmp_path / name)
    (tmp_path / "scheduler").mkdir()  # real SD dirs ship a PNDM config without clip_sample
    pndm = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(pndm))

    loaded = load_components(str(tmp_path), "sdxl", init="pretrained")
    pairs = [(comp.unet, loaded.unet), (comp.vae, loaded.vae), *zip(comp.text_encoders, loaded.text_encoders)]
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not b.training and not any(p.requires_grad for p in b.parameters())
    assert type(loaded.scheduler).__name__ == "DDIMScheduler" and not loaded.scheduler.config.clip_sample
    assert loaded.scheduler.config.steps_offset == 1


# --------------------------------------------------------------------------- errors


@pytest.fixture
def tiny_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(resolve_model_path("arch:tiny_sd15"), dst)
    return dst


def test_error_missing_dir(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist") as e:
        load_components(str(tmp_path / "nope"), "sd15", init="random")
    assert str(tmp_path / "nope") in str(e.value) and "model.init=random" in str(e.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelDirError, match="is not a directory"):
        check_model_dir(tmp_path / "file", "sdxl", "pretrained")


def test_error_missing_subfolder(tiny_copy):
    shutil.rmtree(tiny_copy / "unet")
    with pytest.raises(ModelDirError) as e:
        check_model_dir(tiny_copy, "sd15", "random")
    assert str(tiny_copy / "unet") in str(e.value) and "vae/" in str(e.value)


def test_error_sdxl_needs_second_encoder(tiny_copy):
    with pytest.raises(ModelDirError, match="text_encoder_2"):
        check_model_dir(tiny_copy, "sdxl", "random")


def test_error_malformed_json(tiny_copy):
    bad = tiny_copy / "vae" / "config.json"
    bad.write_text('{"block_out_channels": [16, 32,')
    with pytest.raises(ModelDirError, match="not valid JSON") as e:
        check_model_dir(tiny_copy, "sd15", "random")
    assert str(bad) in str(e.value)


def test_error_pretrained_without_weights():
    root = resolve_model_path("arch:tiny_sd15")
    with pytest.raises(ModelDirError, match="no weights") as e:
        load_components("arch:tiny_sd15", "sd15", init="pretrained")
    assert str(root / "unet") in str(e.value)


def test_error_text_encoder_smaller_than_tokenizer(tiny_copy):
    cfg_file = tiny_copy / "text_encoder" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "vocab_size": 300}))
    with pytest.raises(ModelDirError, match="vocab_size=300") as e:
        load_components(str(tiny_copy), "sd15", init="random")
    assert str(tiny_copy / "tokenizer") in str(e.value)


def test_error_unknown_arch():
    with pytest.raises(ModelDirError, match="arch:nope") as e:
        resolve_model_path("arch:nope")
    assert "arch:tiny_sdxl" in str(e.value)
    assert resolve_model_path("~/x") == Path("~/x").expanduser()


def test_sdxl_empty_negative_prompt_is_zeros(tiny, tmp_path):
    """SDXL with force_zeros_for_empty_prompt (diffusers' default): an empty negative prompt is all-zero embeddings
    and pooled embedding (time ids kept); a non-empty one, SD1.5 and force_zeros_for_empty_prompt=false are the
    encoded prompt."""
    from spo_fast.diffusion.models import force_zeros_for_empty_prompt

    sdxl, sd15 = tiny["sdxl"], tiny["sd15"]
    assert sdxl.force_zeros_for_empty_prompt and not sd15.force_zeros_for_empty_prompt
    neg = encode_negative(sdxl, "", 3, "cpu", 64)
    enc = encode_prompts(sdxl, [""] * 3, "cpu", 64)
    assert neg.embeds.shape == enc.embeds.shape and not neg.embeds.any() and not neg.pooled.any()
    assert enc.embeds.abs().sum() > 0 and torch.equal(neg.time_ids, enc.time_ids)
    ugly = encode_negative(sdxl, "red", 2, "cpu", 64)
    assert torch.equal(ugly.embeds, encode_prompts(sdxl, ["red"] * 2, "cpu", 64).embeds)
    assert torch.equal(encode_negative(sd15, "", 2, "cpu", 16).embeds, encode_prompts(sd15, ["", ""], "cpu", 16).embeds)
    (tmp_path / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": False}))
    assert not force_zeros_for_empty_prompt(tmp_path, "sdxl")
    assert force_zeros_for_empty_prompt(tmp_path / "absent", "sdxl")  # diffusers' SDXL default
