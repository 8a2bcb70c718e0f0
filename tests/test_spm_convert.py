"""Official SPM checkpoint -> spo_fast SPM directory (python -m spo_fast.spm convert) and the SPM resize config.

The official checkpoint is written here at tiny size from a key list written down in this file (the layout of the
official StepAwarePreferenceModel state dict: ``model.`` + transformers CLIPModel names, ``model.t_embedder.mlp``,
per-layer ``adaLN_modulation.1``, pooled ``vision_model.adaLN_modulation.1``, ``position_ids`` buffers). Its scores
are checked against an independent re-implementation of the official forward (``h + gate * f(...)``) and
preprocessing (bicubic without antialias on the unclamped image, clamp after, torchvision crop offsets).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from spo_fast.reward.spm import (
    CLIP_MEAN,
    CLIP_STD,
    RESIZE_OFFICIAL,
    RESIZE_SPO_FAST,
    SPM_CONFIG,
    SPMError,
    SPMScorer,
    StepAwarePreferenceModel,
    check_spm_dir,
)
from spo_fast.spm import main

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "configs/arch/tiny_sd15/tokenizer"
TOY_SPM = REPO / "spo_fast/toyworld/assets/spm"
PROMPTS = ["a red cat on a sofa", "blue sky", "a photo of a green dog in the park at night"]

# tiny official-layout dimensions
V, V_LAYERS, V_HEADS, V_MLP, IMG, PATCH = 32, 2, 4, 64, 24, 4      # vision tower
T, T_LAYERS, T_HEADS, T_MLP, CTX = 24, 2, 4, 48, 16                 # text tower
PROJ, FREQ = 16, 16                                                  # projection, time-embedding frequencies
NPOS = (IMG // PATCH) ** 2 + 1


def official_keys(vocab: int) -> dict[str, tuple]:
    """The official StepAwarePreferenceModel state dict's keys and shapes (written down, for the tiny dims)."""
    keys = {
        "model.logit_scale": (),
        "model.visual_projection.weight": (PROJ, V),
        "model.text_projection.weight": (PROJ, T),
        "model.vision_model.embeddings.class_embedding": (V,),
        "model.vision_model.embeddings.patch_embedding.weight": (V, 3, PATCH, PATCH),
        "model.vision_model.embeddings.position_embedding.weight": (NPOS, V),
        "model.vision_model.pre_layrnorm.weight": (V,),
        "model.vision_model.pre_layrnorm.bias": (V,),
        "model.vision_model.post_layernorm.weight": (V,),
        "model.vision_model.post_layernorm.bias": (V,),
        "model.vision_model.adaLN_modulation.1.weight": (2 * V, V),
        "model.vision_model.adaLN_modulation.1.bias": (2 * V,),
        "model.t_embedder.mlp.0.weight": (V, FREQ),
        "model.t_embedder.mlp.0.bias": (V,),
        "model.t_embedder.mlp.2.weight": (V, V),
        "model.t_embedder.mlp.2.bias": (V,),
        "model.text_model.embeddings.token_embedding.weight": (vocab, T),
        "model.text_model.embeddings.position_embedding.weight": (CTX, T),
        "model.text_model.final_layer_norm.weight": (T,),
        "model.text_model.final_layer_norm.bias": (T,),
    }
    for tower, n, h, m in (("vision_model", V_LAYERS, V, V_MLP), ("text_model", T_LAYERS, T, T_MLP)):
        for i in range(n):
            p = f"model.{tower}.encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                keys[p + f"self_attn.{proj}.weight"] = (h, h)
                keys[p + f"self_attn.{proj}.bias"] = (h,)
            for ln in ("layer_norm1", "layer_norm2"):
                keys[p + f"{ln}.weight"] = (h,)
                keys[p + f"{ln}.bias"] = (h,)
            keys[p + "mlp.fc1.weight"], keys[p + "mlp.fc1.bias"] = (m, h), (m,)
            keys[p + "mlp.fc2.weight"], keys[p + "mlp.fc2.bias"] = (h, m), (h,)
            if tower == "vision_model":
                keys[p + "adaLN_modulation.1.weight"] = (6 * V, V)
                keys[p + "adaLN_modulation.1.bias"] = (6 * V,)
    return keys


def official_state_dict(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official layout, modulation far from the identity (gates around 1, as trained)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_keys(vocab).items():
        if k == "model.logit_scale":
            sd[k] = torch.tensor(math.log(20.0))
        elif "norm" in k and k.endswith(".weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif "adaLN" in k:
            sd[k] = 0.3 * torch.randn(shape, generator=g)
            if ".layers." in k and k.endswith(".bias"):
                sd[k][2 * V:3 * V] += 1  # official gates: x * gate, trained near 1
                sd[k][5 * V:6 * V] += 1
        else:
            sd[k] = 0.2 * torch.randn(shape, generator=g)
    sd["model.text_model.embeddings.position_ids"] = torch.arange(CTX)[None]  # transformers 4.27 buffers
    sd["model.vision_model.embeddings.position_ids"] = torch.arange(NPOS)[None]
    return sd


def tiny_config(tok: CLIPTokenizer) -> CLIPConfig:
    return CLIPConfig(
        text_config={"hidden_size": T, "intermediate_size": T_MLP, "num_hidden_layers": T_LAYERS,
                     "num_attention_heads": T_HEADS, "vocab_size": len(tok), "max_position_embeddings": CTX,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id, "hidden_act": "gelu"},
        vision_config={"hidden_size": V, "intermediate_size": V_MLP, "num_hidden_layers": V_LAYERS,
                       "num_attention_heads": V_HEADS, "image_size": IMG, "patch_size": PATCH, "hidden_act": "gelu"},
        projection_dim=PROJ)


# ----------------------------------------------------------------------------- the official forward, re-implemented
def official_preprocess(images: torch.Tensor) -> torch.Tensor:
    """RockeyCoss/SPO get_preference_score: resize the unclamped [-1, 1] image (short side -> 224 there, IMG here,
    int(x * scale + 0.5)), bicubic without antialias, torchvision CenterCrop, x / 2 + 0.5, clamp, normalise."""
    h, w = images.shape[-2:]
    scale = IMG / min(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    x = F.interpolate(images.float(), (nh, nw), mode="bicubic", align_corners=False)
    top, left = round((nh - IMG) / 2.0), round((nw - IMG) / 2.0)  # torchvision: int(round(...))
    x = x[..., top:top + IMG, left:left + IMG]
    x = (x / 2 + 0.5).clamp(0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def official_image_features(sd: dict, pixel_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """HFTimeConditionedCLIPModel.get_image_features on the official weights, written out (L2-normalised)."""
    def w(k):
        return sd["model." + k]

    def lin(x, p):
        return F.linear(x, w(p + ".weight"), sd.get("model." + p + ".bias"))

    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), w(p + ".weight"), w(p + ".bias"), eps=1e-5)

    def modulate(x, shift, scale):
        return x * (1 + scale[:, None]) + shift[:, None]

    n = pixel_values.shape[0]
    x = F.conv2d(pixel_values, w("vision_model.embeddings.patch_embedding.weight"), stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    h = torch.cat([w("vision_model.embeddings.class_embedding").expand(n, 1, V), x], dim=1)
    h = ln(h + w("vision_model.embeddings.position_embedding.weight")[None], "vision_model.pre_layrnorm")
    half = FREQ // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    c = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    d = V // V_HEADS
    for i in range(V_LAYERS):
        p = f"vision_model.encoder.layers.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), p + "adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(ln(h, p + "layer_norm1"), sh1, sc1)
        q, k, v = (lin(a, p + f"self_attn.{m}_proj").view(n, -1, V_HEADS, d).transpose(1, 2) for m in "qkv")
        att = torch.softmax((q * d ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(n, -1, V), p + "self_attn.out_proj")
        m = modulate(ln(h, p + "layer_norm2"), sh2, sc2)
        h = h + g2[:, None] * lin(F.gelu(lin(m, p + "mlp.fc1")), p + "mlp.fc2")
    pooled = ln(h[:, 0], "vision_model.post_layernorm")
    shift, scale = lin(F.silu(c), "vision_model.adaLN_modulation.1").chunk(2, dim=1)
    pooled = pooled * (1 + scale) + shift
    return F.normalize(lin(pooled, "visual_projection"), dim=-1)


def official_scores(sd, cfg, tok, images, t, prompt_index) -> torch.Tensor:
    """logit_scale.exp() * cos; the text tower (plain CLIP, no t) through transformers' CLIPModel, input_ids only."""
    clip = CLIPModel(cfg).eval()
    missing, unexpected = clip.load_state_dict(
        {k[len("model."):]: v for k, v in sd.items() if "adaLN" not in k and "t_embedder" not in k}, strict=False)
    assert not missing and set(unexpected) <= {"text_model.embeddings.position_ids",
                                                "vision_model.embeddings.position_ids"}
    ids = tok(PROMPTS, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = clip.get_text_features(input_ids=ids)
        txt = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
        img = official_image_features(sd, official_preprocess(images), t)
    return sd["model.logit_scale"].exp() * (img * txt[prompt_index]).sum(-1)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def files(tok, tmp_path_factory):
    """--clip dir (config.json + tokenizer, no weights), the official checkpoint as .bin and .safetensors."""
    root = tmp_path_factory.mktemp("official")
    clip = root / "clip"
    tiny_config(tok).save_pretrained(clip)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copyfile(f, clip / f.name)
    sd = official_state_dict(len(tok))
    torch.save(sd, root / "spm.bin")
    save_file(sd, root / "spm.safetensors")
    return {"root": root, "clip": clip, "sd": sd, "bin": root / "spm.bin", "st": root / "spm.safetensors"}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def images_and_t(size=(32, 36), n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *size, generator=g) * 0.8  # some pixels beyond [-1, 1]: clamp order matters
    return images, torch.tensor([0, 251, 701, 951])[:n], torch.tensor([0, 1, 2, 1])[:n]


# ----------------------------------------------------------------------------- conversion is exact
@pytest.mark.parametrize("kind", ["bin", "st"])
def test_converted_scores_equal_the_official_forward(files, tok, tmp_path, capsys, kind):
    out = tmp_path / "spm"
    rc, stdout, err = run_cli(capsys, "--official", files[kind], "--clip", files["clip"], "--out", out)
    assert rc == 0, err
    assert stdout.count("\n") == 1 and "gate offset applied" in stdout and str(out) in stdout
    assert "2 position_ids buffers dropped" in stdout
    check_spm_dir(out)  # scorer.path=out passes the trainer's cheap checks
    assert not list(tmp_path.glob(".spm.partial*"))
    scorer = SPMScorer.from_pretrained(out)
    assert scorer.model.resize == RESIZE_OFFICIAL
    # 32x36: crop offset round(1.5) = 2 (floor: 1); 48x53: width int(26.5 + 0.5) = 27 (Python round: 26)
    for size in ((32, 36), (IMG, IMG), (40, 30), (48, 53)):
        images, t, pi = images_and_t(size)
        got = scorer.score(images, t, scorer.prepare(PROMPTS), pi)
        want = official_scores(files["sd"], tiny_config(tok), tok, images, t, pi)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert want.std() > 0.1  # the scores really vary


def _hand_model(sd: dict, tok, offset: bool) -> StepAwarePreferenceModel:
    """The official weights placed into our model by hand (gate offset applied when ``offset``)."""
    model = StepAwarePreferenceModel(CLIPModel(tiny_config(tok)), time_freq_dim=FREQ).eval()
    clip_sd = {k[len("model."):]: v for k, v in sd.items()
               if "adaLN" not in k and "t_embedder" not in k and not k.endswith("position_ids")}
    model.clip.load_state_dict(clip_sd, strict=True)
    tc = model.time_cond
    with torch.no_grad():
        for j in (0, 2):
            tc.time_mlp[j].weight.copy_(sd[f"model.t_embedder.mlp.{j}.weight"])
            tc.time_mlp[j].bias.copy_(sd[f"model.t_embedder.mlp.{j}.bias"])
        for i in range(V_LAYERS):
            tc.layers[i].weight.copy_(sd[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"])
            bias = sd[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"].clone()
            if offset:
                bias[2 * V:3 * V] -= 1
                bias[5 * V:6 * V] -= 1
            tc.layers[i].bias.copy_(bias)
        tc.pooled.weight.copy_(sd["model.vision_model.adaLN_modulation.1.weight"])
        tc.pooled.bias.copy_(sd["model.vision_model.adaLN_modulation.1.bias"])
    return model


def test_converted_equals_hand_placed_weights_and_the_offset_matters(files, tok, tmp_path, capsys):
    out = tmp_path / "spm"
    assert run_cli(capsys, "--official", files["bin"], "--clip", files["clip"], "--out", out)[0] == 0
    converted = StepAwarePreferenceModel.from_pretrained(out).eval()
    hand = _hand_model(files["sd"], tok, offset=True)
    images, t, pi = images_and_t()
    pv = official_preprocess(images)
    ids = tok(PROMPTS, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt")
    with torch.no_grad():
        txt = hand.text_features(ids.input_ids, ids.attention_mask)
        torch.testing.assert_close(converted.text_features(ids.input_ids, ids.attention_mask), txt, atol=0, rtol=0)
        torch.testing.assert_close(converted.image_features(pv, t), hand.image_features(pv, t), atol=1e-6, rtol=0)
        a = converted.scores(pv, t, txt, pi)
        torch.testing.assert_close(a, hand.scores(pv, t, txt, pi), atol=1e-5, rtol=0)
        want = official_scores(files["sd"], tiny_config(tok), tok, images, t, pi)
        torch.testing.assert_close(a, want, atol=1e-5, rtol=0)
        # without the gate offset (x * (1 + gate) on the official gates) the scores are clearly different
        wrong = _hand_model(files["sd"], tok, offset=False).scores(pv, t, txt, pi)
        assert (wrong - want).abs().max() > 0.1


# ----------------------------------------------------------------------------- the resize config
def test_resize_config_round_trips_and_official_uses_no_antialias(files, tmp_path, capsys):
    out = tmp_path / "spm"
    assert run_cli(capsys, "--official", files["st"], "--clip", files["clip"], "--out", out)[0] == 0
    written = json.loads((out / SPM_CONFIG).read_text())
    assert written["resize"] == RESIZE_OFFICIAL and written["time_freq_dim"] == FREQ
    assert written["converted_from"]["file"] == "spm.safetensors"
    model = StepAwarePreferenceModel.from_pretrained(out)
    assert model.resize == RESIZE_OFFICIAL
    model.save_pretrained(tmp_path / "again")
    assert StepAwarePreferenceModel.from_pretrained(tmp_path / "again").resize == RESIZE_OFFICIAL
    images = torch.randn(2, 3, 64, 72, generator=torch.Generator().manual_seed(3)) * 0.9
    manual = F.interpolate(images, (24, 27), mode="bicubic", align_corners=False, antialias=False)
    manual = ((manual[..., :, 2:26] / 2 + 0.5).clamp(0, 1) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    got = model.preprocess(images)
    torch.testing.assert_close(got, manual, atol=1e-6, rtol=0)
    model.resize = RESIZE_SPO_FAST  # the spo_fast resize really is another one on this input
    assert (model.preprocess(images) - manual).abs().max() > 0.05


def _preprocess_before_resize_config(images: torch.Tensor, s: int) -> torch.Tensor:
    """spo_fast's preprocessing as it was before the resize config (frozen copy)."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    h, w = x.shape[-2:]
    if (h, w) != (s, s):
        nh, nw = (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[..., top:top + s, left:left + s]
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


def test_existing_spm_dirs_preprocess_and_score_as_before(tmp_path):
    # an SPM directory written before the resize config existed: the shipped one without its "resize" entry
    old = tmp_path / "old_spm"
    shutil.copytree(TOY_SPM, old)
    config = json.loads((old / SPM_CONFIG).read_text())
    config.pop("resize", None)
    (old / SPM_CONFIG).write_text(json.dumps(config))
    scorer = SPMScorer.from_pretrained(old)
    model = scorer.model.eval()
    assert model.resize == RESIZE_SPO_FAST
    s = model.clip.config.vision_config.image_size
    state = scorer.prepare(PROMPTS)
    for size in ((s, s), (32, 32), (32, 36), (48, 32)):
        images = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1)) * 1.2
        ref = _preprocess_before_resize_config(images, s)
        assert torch.equal(model.preprocess(images), ref)
        t, pi = torch.tensor([0, 500, 999]), torch.tensor([0, 1, 2])
        with torch.no_grad():
            assert torch.equal(scorer.score(images, t, state, pi), model.scores(ref, t, state, pi).float())
    # a save of it writes the spo_fast resize explicitly, and scores the same when loaded
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / SPM_CONFIG).read_text())["resize"] == RESIZE_SPO_FAST


@pytest.mark.parametrize("resize, needle", [
    ({"mode": "nearest"}, 'resize.mode="nearest"'),
    ({"antialias": 1}, "resize.antialias=1"),
    ({"clamp_first": "no"}, 'resize.clamp_first="no"'),
    ({"size_rounding": "ceil"}, "resize.size_rounding"),
    ({"crop_offset": "left"}, "resize.crop_offset"),
    ({"modee": "bicubic"}, "resize.modee"),
    ("bicubic", "resize must be an object"),
])
def test_bad_resize_config_names_the_file_and_key(tmp_path, resize, needle):
    spm = tmp_path / "spm"
    shutil.copytree(TOY_SPM, spm)
    cfg = json.loads((spm / SPM_CONFIG).read_text())
    (spm / SPM_CONFIG).write_text(json.dumps({**cfg, "resize": resize}))
    for load in (check_spm_dir, StepAwarePreferenceModel.from_pretrained):
        with pytest.raises(SPMError) as e:
            load(spm)
        assert str(spm / SPM_CONFIG) in str(e.value) and needle in str(e.value), str(e.value)


def test_missing_spm_dir_says_how_to_convert(tmp_path):
    with pytest.raises(SPMError) as e:
        check_spm_dir(tmp_path / "nope")
    msg = str(e.value)
    assert "no such directory" in msg and "python -m spo_fast.spm convert --official" in msg
    assert f"--out {tmp_path / 'nope'}" in msg


# ----------------------------------------------------------------------------- bad inputs: one line, exit 2
def _one_line_error(rc, out, err) -> str:
    assert rc == 2 and out == "", (rc, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _variant(files, tmp_path, name: str, edit) -> Path:
    sd = dict(files["sd"])
    edit(sd)
    path = tmp_path / name
    (torch.save(sd, path) if path.suffix == ".bin" else save_file(sd, path))
    return path


def test_missing_extra_and_mismatched_keys_are_all_listed(files, tmp_path, capsys):
    clip = files["clip"]
    gone = ["model.t_embedder.mlp.2.bias", "model.vision_model.encoder.layers.1.adaLN_modulation.1.weight",
            "model.text_model.encoder.layers.0.mlp.fc1.bias"]
    f = _variant(files, tmp_path, "missing.bin", lambda sd: [sd.pop(k) for k in gone])
    err = _one_line_error(*run_cli(capsys, "--official", f, "--clip", clip, "--out", tmp_path / "o1"))
    assert "3 missing" in err and all(k in err for k in gone)
    extra = ["model.vision_model.encoder.layers.2.adaLN_modulation.1.bias", "model.logit_bias"]
    f = _variant(files, tmp_path, "extra.safetensors", lambda sd: sd.update({k: torch.zeros(3) for k in extra}))
    err = _one_line_error(*run_cli(capsys, "--official", f, "--clip", clip, "--out", tmp_path / "o2"))
    assert "2 unexpected" in err and all(k in err for k in extra) and " missing:" not in err
    f = _variant(files, tmp_path, "shape.bin",
                 lambda sd: sd.update({"model.vision_model.adaLN_modulation.1.bias": torch.zeros(3 * V)}))
    err = _one_line_error(*run_cli(capsys, "--official", f, "--clip", clip, "--out", tmp_path / "o3"))
    assert f"model.vision_model.adaLN_modulation.1.bias: file [{3 * V}] vs model [{2 * V}]" in err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_foreign_and_broken_files(files, tmp_path, capsys):
    clip, out = files["clip"], tmp_path / "out"
    unet = {"conv_in.weight": torch.zeros(4, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3),
            "time_embedding.linear_1.weight": torch.zeros(8, 4)}
    save_file(unet, tmp_path / "unet.safetensors")
    err = _one_line_error(*run_cli(capsys, "--official", tmp_path / "unet.safetensors", "--clip", clip, "--out", out))
    assert "3 keys like 'conv_in.weight', 'down_blocks.0" in err and "expected" in err and "model.vision_model" in err
    torch.save({"state_dict": unet}, tmp_path / "unet.bin")  # a wrapped state dict is unwrapped first
    err = _one_line_error(*run_cli(capsys, "--official", tmp_path / "unet.bin", "--clip", clip, "--out", out))
    assert "keys like 'conv_in.weight'" in err
    (tmp_path / "notes.bin").write_text("these are not weights\n")
    err = _one_line_error(*run_cli(capsys, "--official", tmp_path / "notes.bin", "--clip", clip, "--out", out))
    assert "notes.bin is not a PyTorch checkpoint" in err
    torch.save([1, 2, 3], tmp_path / "list.bin")
    err = _one_line_error(*run_cli(capsys, "--official", tmp_path / "list.bin", "--clip", clip, "--out", out))
    assert "holds a list, not a state dict" in err
    data = files["st"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    err = _one_line_error(*run_cli(capsys, "--official", tmp_path / "cut.safetensors", "--clip", clip, "--out", out))
    assert "cut.safetensors is truncated" in err
    err = _one_line_error(*run_cli(capsys, "--official", tmp_path / "absent.bin", "--clip", clip, "--out", out))
    assert "absent.bin" in err and "no such file" in err
    assert not out.exists()


def test_bad_clip_tokenizer_and_out_dirs(files, tmp_path, capsys):
    no_tok = tmp_path / "pickscore"
    no_tok.mkdir()
    shutil.copyfile(files["clip"] / "config.json", no_tok / "config.json")
    args = ["--official", files["bin"], "--out", tmp_path / "out"]
    err = _one_line_error(*run_cli(capsys, *args, "--clip", no_tok))
    assert f"--clip={no_tok}: no CLIPTokenizer files" in err and "--tokenizer" in err
    err = _one_line_error(*run_cli(capsys, *args, "--clip", tmp_path / "nothing"))
    assert "--clip=" in err and "no such directory" in err
    # PickScore-like --clip without a tokenizer + --tokenizer: converts
    rc, _, err = run_cli(capsys, *args, "--clip", no_tok, "--tokenizer", files["clip"])
    assert rc == 0, err
    assert (tmp_path / "out" / "vocab.json").is_file()
    err = _one_line_error(*run_cli(capsys, *args, "--clip", files["clip"]))  # the same --out again
    assert "is not empty" in err
    (tmp_path / "a_file").write_text("x")
    err = _one_line_error(*run_cli(capsys, "--official", files["bin"], "--clip", files["clip"], "--out",
                                   tmp_path / "a_file" / "spm"))
    assert "--out=" in err and "a_file is a file" in err
    with pytest.raises(SystemExit) as e:  # argparse's own errors: the same one line, exit 2
        main(["convert", "--official", str(files["bin"]), "--clip", str(files["clip"])])
    assert e.value.code == 2
    err = _one_line_error(2, *capsys.readouterr())
    assert "required: --out" in err


def test_module_command_line(files, tmp_path):
    """python -m spo_fast.spm convert: the real entry point (bad input -> one line, exit 2)."""
    proc = subprocess.run([sys.executable, "-m", "spo_fast.spm", "convert", "--official", str(files["bin"]),
                           "--clip", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --clip=") and proc.stderr.count("\n") == 1, \
        proc.stderr
