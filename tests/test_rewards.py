"""Reward models (spo_fast.reward.metrics): tiny random-weight files in the released layouts, scored by the loaders and by
hand-written reference forwards; score formulas; preprocessing; spec parsing; named errors for bad input."""
from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from spo_fast.reward.metrics import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    METRICS,
    RewardError,
    RewardWeightsError,
    check_metric,
    load_metric,
    parse_metric,
    preprocess,
)
from spo_fast.reward.spm import CLIP_MEAN, CLIP_STD, StepAwarePreferenceModel

CLIP_TOKENIZER = Path(__file__).resolve().parents[1] / "configs/arch/tiny_spm"  # a CLIP BPE tokenizer, 1549 ids
PROMPTS = ["a red cat", "a blue dog", "a red cat", "blue cats"]
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cat", "dog", "##s", "on", "the"]
IR = {"width": 128, "layers": 2, "patch": 16, "grid": 2, "hidden": 32, "text_layers": 2, "inter": 64, "max_pos": 40,
      "head": (32, 16, 8, 8, 4, 1)}  # ImageReward, tiny: ViT width 128 = two 64-wide heads, 32 px images


def images(n=4, h=40, w=48, seed=0):
    """Non-square [-1, 1] images (so crop and pad preprocessing differ)."""
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rand(*shape, g, std=0.05):
    return torch.randn(*shape, generator=g) * std


def ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def attend(q, k, v, heads, bias=None):
    """Plain multi-head attention on (N, L, D) projections."""
    n, lq, d = q.shape
    q, k, v = (t.reshape(n, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    a = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    a = (a if bias is None else a + bias).softmax(-1)
    return (a @ v).transpose(1, 2).reshape(n, lq, d)


# ----------------------------------------------------------------------------------------- CLIP-style directories
def clip_config(vision_hidden=48, act="gelu", image_size=32, patch=8) -> CLIPConfig:
    """Tiny CLIP: text 32 wide, vision 48 wide (so a tower mix-up fails), projection 24 (so a missing transpose
    fails); the tiny_spm tokenizer's ids (eos 1548 is the largest id, as CLIP's EOT)."""
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": 1549, "max_position_embeddings": 77, "bos_token_id": 1547, "eos_token_id": 1548,
            "pad_token_id": 1548, "hidden_act": act}
    vision = {"hidden_size": vision_hidden, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": patch, "hidden_act": act}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def clip_dir(path: Path, config: CLIPConfig | None = None, seed=0, weights=True) -> tuple[Path, CLIPModel]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config or clip_config()).eval()
        with torch.no_grad():  # fp16-representable weights (the HPS files are fp16) and a non-default logit scale
            for p in model.parameters():
                p.copy_(p.half().float())
            model.logit_scale.fill_(3.0)
    if weights:
        model.save_pretrained(path)
    else:
        path.mkdir(parents=True)
        model.config.save_pretrained(path)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(CLIP_TOKENIZER / f, path / f)
    return path, model


def clip_features(model: CLIPModel, tok_dir: Path, imgs, prompts, fit):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tok_dir)(prompts, padding="max_length", max_length=77, truncation=True,
                                                  return_tensors="pt")
    with torch.no_grad():
        pv = preprocess(imgs, model.config.vision_config.image_size, fit)
        img = model.visual_projection(model.vision_model(pixel_values=pv).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=tok.input_ids,
                                                     attention_mask=tok.attention_mask).pooler_output)
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), tok.input_ids, pv


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rewards")


@pytest.fixture(scope="module")
def clip(tmp):
    return clip_dir(tmp / "clip")


# -------------------------------------------------------------------------------------------------- HPS (open_clip)
def to_openclip(model: CLIPModel) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel in open_clip's key layout (the layout of HPS_v2_compressed.pt's state_dict), fp16."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
    }
    for oc, hf, n in (("visual.", "vision_model", 2), ("", "text_model", 2)):
        for i in range(n):
            a, b = f"{oc}transformer.resblocks.{i}.", f"{hf}.encoder.layers.{i}."
            for p in ("weight", "bias"):
                out[f"{a}attn.in_proj_{p}"] = torch.cat([sd[f"{b}self_attn.{x}_proj.{p}"] for x in "qkv"])
                out[f"{a}attn.out_proj.{p}"] = sd[f"{b}self_attn.out_proj.{p}"]
                out[f"{a}ln_1.{p}"] = sd[f"{b}layer_norm1.{p}"]
                out[f"{a}ln_2.{p}"] = sd[f"{b}layer_norm2.{p}"]
                out[f"{a}mlp.c_fc.{p}"] = sd[f"{b}mlp.fc1.{p}"]
                out[f"{a}mlp.c_proj.{p}"] = sd[f"{b}mlp.fc2.{p}"]
    return {k: v.half() for k, v in out.items()}


def openclip_forward(sd, pv, ids, heads=2):
    """open_clip's CLIP forward written out from its state dict (torch's fused-in_proj attention, exact GELU,
    class-token / EOT (argmax id) pooling) -> normalised (image, text) features."""
    sd = {k: v.float() for k, v in sd.items()}

    def tower(x, prefix, causal):
        mask = torch.full((x.shape[1],) * 2, float("-inf")).triu(1) if causal else None
        i = 0
        while f"{prefix}transformer.resblocks.{i}.ln_1.weight" in sd:
            p = f"{prefix}transformer.resblocks.{i}."
            h = ln(x, sd, p + "ln_1", 1e-5).transpose(0, 1)
            a, _ = F.multi_head_attention_forward(
                h, h, h, x.shape[-1], heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None,
                False, 0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False,
                need_weights=False, attn_mask=mask)
            x = x + a.transpose(0, 1)
            x = x + lin(F.gelu(lin(ln(x, sd, p + "ln_2", 1e-5), sd, p + "mlp.c_fc")), sd, p + "mlp.c_proj")
            i += 1
        return x

    w = sd["visual.conv1.weight"]
    x = F.conv2d(pv, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = tower(ln(x, sd, "visual.ln_pre", 1e-5), "visual.", causal=False)
    img = ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    t = ln(tower(t, "", causal=True), sd, "ln_final", 1e-5)
    txt = t[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


@pytest.fixture(scope="module")
def hps(tmp):
    vit_dir, model = clip_dir(tmp / "CLIP-ViT-H-14", weights=False)  # the HPS recipe uses its config + tokenizer
    sd = to_openclip(model)
    torch.save({"state_dict": sd}, tmp / "HPS_v2_compressed.pt")
    return tmp / "HPS_v2_compressed.pt", vit_dir, model, sd


def test_hps_matches_clipmodel_and_openclip_forward(hps):
    pt, vit_dir, model, sd = hps
    imgs = images()
    reward = load_metric(f"hpsv2={pt},{vit_dir}", batch_size=3)
    assert (reward.label, reward.name) == ("HPSv2", "hpsv2")
    scores, comps = reward(imgs, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and comps == {}
    img, txt, ids, pv = clip_features(model, vit_dir, imgs, PROMPTS, "pad")  # HPS: longest side + zero padding
    torch.testing.assert_close(scores, 100 * (img * txt).sum(-1), atol=1e-4, rtol=1e-5)  # HPS benchmark: 100 * cos
    ref_img, ref_txt = openclip_forward(sd, pv, ids)
    torch.testing.assert_close(scores, 100 * (ref_img * ref_txt).sum(-1), atol=1e-4, rtol=1e-5)
    assert load_metric(f"hpsv21=weights={pt},clip={vit_dir}").label == "HPSv2.1"


def test_hps_strict_conversion(hps, tmp):
    _, vit_dir, _, sd = hps
    fewer = {k: v for k, v in sd.items() if k != "visual.transformer.resblocks.1.attn.in_proj_weight"}
    torch.save({"state_dict": fewer}, tmp / "fewer.pt")
    with pytest.raises(RewardWeightsError, match=r"fewer\.pt.*3 weights missing.*self_attn\.[qkv]_proj\.weight"):
        check_metric(f"hpsv2={tmp / 'fewer.pt'},{vit_dir}")
    torch.save({"state_dict": {**sd, "visual.ls_1.gamma": torch.ones(48)}}, tmp / "more.pt")
    with pytest.raises(RewardWeightsError, match=r"1 left over \(e\.g\. visual\.ls_1\.gamma"):
        check_metric(f"hpsv2={tmp / 'more.pt'},{vit_dir}")
    torch.save(sd, tmp / "unwrapped.pt")  # a bare open_clip state dict is accepted too
    check_metric(f"hpsv2={tmp / 'unwrapped.pt'},{vit_dir}")


def test_hps_with_a_clip_of_other_dims_names_the_shapes(hps, tmp):
    pt, _, _, _ = hps
    vit_b, _ = clip_dir(tmp / "vit_b", clip_config(vision_hidden=64), weights=False)
    with pytest.raises(RewardWeightsError, match=r"HPSv2.*HPS_v2_compressed\.pt does not fit the CLIP architecture of "
                                                 r".*vit_b.*ViT-H/14.*of another shape.*visual\.conv1\.weight "
                                                 r"\(48, 3, 8, 8\) vs \(64, 3, 8, 8\)"):
        check_metric(f"hpsv2={pt},{vit_b}")
    quick, _ = clip_dir(tmp / "quick", clip_config(act="quick_gelu"), weights=False)
    with pytest.raises(RewardError, match="quick_gelu.*GELU"):
        check_metric(f"hpsv2={pt},{quick}")


# ----------------------------------------------------------------------------------------------------- ImageReward
def imagereward_state_dict(seed=0) -> dict:
    """ImageReward.pt's layout (BLIP ViT + BERT with cross-attention + MLP head), tiny (``IR``) and random."""
    width, layers, patch, grid, hidden, inter, max_pos, head = (IR[k] for k in (
        "width", "layers", "patch", "grid", "hidden", "inter", "max_pos", "head"))
    vocab = len(BERT_WORDS) + 2  # + [DEC], [ENC]
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def linear(name, n_out, n_in):
        sd[name + ".weight"], sd[name + ".bias"] = rand(n_out, n_in, g=g), rand(n_out, g=g)

    def norm(name, n):
        sd[name + ".weight"], sd[name + ".bias"] = 1 + rand(n, g=g, std=0.1), rand(n, g=g)

    v = "blip.visual_encoder."
    # small embeddings (variance ~1e-6, near LayerNorm's eps): the ViT's eps of 1e-6 (not 1e-5) matters
    sd[v + "cls_token"], sd[v + "pos_embed"] = rand(1, 1, width, g=g, std=1e-3), rand(1, grid * grid + 1, width, g=g,
                                                                                       std=1e-3)
    sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"] = rand(width, 3, patch, patch, g=g, std=2e-5), \
        rand(width, g=g, std=1e-3)
    for i in range(layers):
        b = f"{v}blocks.{i}."
        norm(b + "norm1", width)
        linear(b + "attn.qkv", 3 * width, width)
        linear(b + "attn.proj", width, width)
        norm(b + "norm2", width)
        linear(b + "mlp.fc1", 2 * width, width)
        linear(b + "mlp.fc2", width, 2 * width)
    norm(v + "norm", width)
    t = "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = rand(vocab, hidden, g=g, std=0.5)
    sd[t + "embeddings.position_embeddings.weight"] = rand(max_pos, hidden, g=g, std=0.5)
    sd[t + "embeddings.position_ids"] = torch.arange(max_pos)[None]
    norm(t + "embeddings.LayerNorm", hidden)
    for i in range(IR["text_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", hidden), ("crossattention", width)):
            linear(b + att + ".self.query", hidden, hidden)
            linear(b + att + ".self.key", hidden, kv_width)
            linear(b + att + ".self.value", hidden, kv_width)
            linear(b + att + ".output.dense", hidden, hidden)
            norm(b + att + ".output.LayerNorm", hidden)
        linear(b + "intermediate.dense", inter, hidden)
        linear(b + "output.dense", hidden, inter)
        norm(b + "output.LayerNorm", hidden)
    linear("blip.vision_proj", 16, width)
    linear("blip.text_proj", 16, hidden)
    for i, (a, b) in zip((0, 2, 4, 6, 7), itertools.pairwise(head)):
        sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"] = rand(b, a, g=g, std=0.3), rand(b, g=g)
    return sd


def imagereward_forward(sd, pv, ids, mask, heads=2, text_heads=2):
    """ImageReward's score written out from its state dict: BLIP ViT (timm layout, LN eps 1e-6) -> BERT whose
    every layer self-attends (bidirectional, padding masked) then cross-attends to all image tokens -> head on
    [CLS] -> normalised."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    w = sd[v + "patch_embed.proj.weight"]
    x = F.conv2d(pv, w, sd[v + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), 1, -1), x], 1) + sd[v + "pos_embed"]
    n, L, d = x.shape
    for i in range(IR["layers"]):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").reshape(n, L, 3, d).unbind(2)
        x = x + lin(attend(q, k, val, heads), sd, b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    img = ln(x, sd, v + "norm", 1e-6)
    h = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    h = ln(h, sd, t + "embeddings.LayerNorm", 1e-12)
    pad = (1 - mask[:, None, None, :].float()) * -1e4  # BERT's additive padding mask
    for i in range(IR["text_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, src, bias in (("attention", h, pad), ("crossattention", img, None)):
            a = attend(lin(h, sd, b + att + ".self.query"), lin(src, sd, b + att + ".self.key"),
                       lin(src, sd, b + att + ".self.value"), text_heads, bias)
            h = ln(h + lin(a, sd, b + att + ".output.dense"), sd, b + att + ".output.LayerNorm", 1e-12)
        h = ln(h + lin(F.gelu(lin(h, sd, b + "intermediate.dense")), sd, b + "output.dense"), sd,
               b + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):  # no activations between the Linears
        r = lin(r, sd, f"mlp.layers.{i}")
    return (r.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def med_config(path: Path, **over) -> Path:
    cfg = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": IR["hidden"],
           "num_hidden_layers": IR["text_layers"], "num_attention_heads": 2, "intermediate_size": IR["inter"],
           "vocab_size": len(BERT_WORDS) + 2, "max_position_embeddings": IR["max_pos"], "layer_norm_eps": 1e-12,
           "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0,
           "type_vocab_size": 2, "encoder_width": 768, "add_cross_attention": True, **over}
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def imagereward(tmp):
    d = tmp / "ir"
    (d / "bert-base-uncased").mkdir(parents=True)
    (d / "bert-base-uncased/vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    sd = imagereward_state_dict()
    torch.save(sd, d / "ImageReward.pt")
    return d / "ImageReward.pt", med_config(d / "med_config.json"), d / "bert-base-uncased", sd


def test_imagereward_matches_the_written_out_forward(imagereward):
    from transformers import BertTokenizer

    pt, med, bert, sd = imagereward
    reward = load_metric(f"imagereward={pt},{med},{bert}", batch_size=3)
    assert (reward.label, reward.name) == ("ImageReward", "imagereward")
    prompts = ["a red cat on the blue dog " * 8, "a", "blue cats", "a red cat"]  # one longer than 35 tokens
    imgs = images()
    scores, _ = reward(imgs, prompts)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    tok = BertTokenizer(str(bert / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})  # in ImageReward's order: [DEC] 13, [ENC] 14
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    enc = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert enc.input_ids.shape == (4, 35) and enc.attention_mask[1].sum() == 3
    ref = imagereward_forward(sd, preprocess(imgs, 32, "crop"), enc.input_ids, enc.attention_mask)
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3  # the images and prompts make a difference


def test_imagereward_bad_files(imagereward, tmp):
    pt, med, bert, sd = imagereward
    bad = {**sd, "blip.visual_encoder.blocks.0.ls1.gamma": torch.ones(IR["width"])}
    torch.save(bad, tmp / "ir_extra.pt")
    with pytest.raises(RewardWeightsError, match=r"ir_extra\.pt.*1 left over.*blocks\.0\.ls1\.gamma"):
        check_metric(f"imagereward={tmp / 'ir_extra.pt'},{med},{bert}")
    torch.save({k: v for k, v in sd.items() if "crossattention.self.key" not in k}, tmp / "ir_fewer.pt")
    with pytest.raises(RewardWeightsError, match=r"ImageReward.*4 weights missing.*crossattention\.self\.key"):
        check_metric(f"imagereward={tmp / 'ir_fewer.pt'},{med},{bert}")
    with pytest.raises(RewardError, match=r"15 tokens with \[DEC\] and \[ENC\].*vocab_size 30524.*bert-base-uncased"):
        check_metric(f"imagereward={pt},{med_config(tmp / 'med_big.json', vocab_size=30524)},{bert}")
    with pytest.raises(RewardError, match=r"med_clip\.json is a 'clip' config, not BERT's"):
        check_metric(f"imagereward={pt},{med_config(tmp / 'med_clip.json', model_type='clip')},{bert}")
    with pytest.raises(RewardError, match=r"med_none\.json is not a BERT config \(KeyError"):
        (tmp / "med_none.json").write_text("{}")
        check_metric(f"imagereward={pt},{tmp / 'med_none.json'},{bert}")


# ---------------------------------------------------------------------------------- PickScore, CLIP score, aesthetic
def test_pickscore_and_clip_score_formulas(clip, tmp):
    path, model = clip
    imgs = torch.cat([images(), -images(seed=1)])
    prompts = PROMPTS + PROMPTS[::-1]
    img, txt, _, _ = clip_features(model, path, imgs, prompts, "crop")  # shortest side + centre crop
    cos = (img * txt).sum(-1)
    pick = load_metric(f"pickscore={path}", batch_size=5)
    assert (pick.label, pick.name) == ("PickScore", "pickscore")
    torch.testing.assert_close(pick(imgs, prompts)[0], math.exp(3.0) * cos, atol=1e-4, rtol=1e-5)
    clip_score = load_metric(f"clip={path},tokenizer={CLIP_TOKENIZER}")
    assert clip_score.label == "CLIP score"
    torch.testing.assert_close(clip_score(imgs, prompts)[0], (100 * cos).clamp(min=0), atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # the same CLIP with the text projection negated: every cosine changes sign
        model.text_projection.weight.neg_()
    model.save_pretrained(tmp / "clip_neg")
    model.text_projection.weight.data.neg_()
    assert (cos.abs() > 0.01).all()  # clearly on one side of the clamp or the other
    scores = load_metric(f"clip={tmp / 'clip_neg'},tokenizer={CLIP_TOKENIZER}")(imgs, prompts)[0]
    torch.testing.assert_close(scores, (-100 * cos).clamp(min=0), atol=1e-4, rtol=1e-5)
    assert ((scores == 0) | (clip_score(imgs, prompts)[0] == 0)).all()  # max(100 cos, 0): one of the two is 0


@pytest.fixture(scope="module")
def aesthetic_head(tmp):
    """The LAION aesthetic head's layout (layers.{0,2,4,6,7}), on the tiny CLIP's 24-wide embedding (768 for
    ViT-L/14)."""
    g = torch.Generator().manual_seed(3)
    dims = (24, 20, 12, 8, 4, 1)
    head = {}
    for i, (a, b) in zip((0, 2, 4, 6, 7), itertools.pairwise(dims)):
        head[f"layers.{i}.weight"], head[f"layers.{i}.bias"] = rand(b, a, g=g, std=0.5), rand(b, g=g)
    torch.save(head, tmp / "sac+logos+ava1-l14-linearMSE.pth")
    return tmp / "sac+logos+ava1-l14-linearMSE.pth", head


def test_aesthetic_uses_the_normalised_image_embedding(clip, aesthetic_head, tmp):
    path, model = clip
    head_file, head = aesthetic_head
    reward = load_metric(f"aesthetic={head_file},{path}", batch_size=2)
    assert (reward.label, reward.name) == ("Aesthetic", "aesthetic")
    imgs = images()
    img, _, _, _ = clip_features(model, path, imgs, PROMPTS, "crop")
    r = img
    for i in (0, 2, 4, 6, 7):
        r = lin(r, head, f"layers.{i}")
    torch.testing.assert_close(reward(imgs, PROMPTS)[0], r.squeeze(-1), atol=1e-5, rtol=1e-5)
    # the aesthetic head given as HPS weights: named as what it is
    with pytest.raises(RewardWeightsError, match=r"HPSv2.*sac\+logos.*holds an MLP head state dict.*not the expected "
                                                 r"weights; expected HPS_v2_compressed\.pt"):
        check_metric(f"hpsv2={head_file},{path}")
    torch.save({**head, "layers.0.weight": head["layers.0.weight"][:, :20]}, tmp / "head20.pth")
    with pytest.raises(RewardWeightsError, match=r"head20\.pth is not a 5-Linear reward head on 24-wide features"):
        check_metric(f"aesthetic={tmp / 'head20.pth'},{path}")


def test_spm_at_t0(tmp):
    from transformers import CLIPTokenizer

    from spo_fast.evaluation.heldout import scorer_reward
    from spo_fast.reward.spm import SPMScorer

    tok = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
    d = tmp / "spm"
    StepAwarePreferenceModel.tiny(tok).save_pretrained(d)
    reward = load_metric(f"spm={d},tokenizer={CLIP_TOKENIZER}", batch_size=3)
    assert (reward.label, reward.name) == ("SPM at t = 0", "spm")
    imgs = images()
    scores, _ = reward(imgs, PROMPTS)
    ref, _ = scorer_reward(SPMScorer.from_pretrained(d, tokenizer_path=CLIP_TOKENIZER, precision="fp32"))(imgs, PROMPTS)
    assert scores.shape == (4,)
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture
def tf32_on():
    """TF32 switched on for one test and restored by assignment: these flags are properties of torch's backend
    modules, which pytest's monkeypatch (9.2) undoes by deleting the attribute it did not find in the module's
    ``__dict__`` (an AttributeError at teardown)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_batched_fp32_without_autocast_or_tf32(clip, monkeypatch, tf32_on):
    """Scores do not depend on the batch size; inside, autocast and TF32 are off (restored afterwards)."""
    path, _ = clip
    reward = load_metric(f"pickscore={path}", batch_size=3)
    imgs = images(7)
    prompts = [PROMPTS[i % 4] for i in range(7)]
    seen, score = [], reward.score

    def spy(*a):
        seen.append((torch.is_autocast_enabled("cpu"), torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32, a[0].dtype, len(a[0])))
        return score(*a)

    monkeypatch.setattr(reward, "score", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = reward(imgs.bfloat16(), prompts)[0]
    assert seen == [(False, False, False, torch.float32, n) for n in (3, 3, 1)]
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    one = load_metric(f"pickscore={path}", batch_size=1)(imgs.bfloat16(), prompts)[0]
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, one, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_matches_cpu(clip, hps, imagereward, aesthetic_head):
    specs = [f"pickscore={clip[0]}", f"hpsv2={hps[0]},{hps[1]}", f"imagereward={','.join(map(str, imagereward[:3]))}",
             f"aesthetic={aesthetic_head[0]},{clip[0]}"]
    imgs = images()
    for spec in specs:
        cpu = load_metric(spec)(imgs, PROMPTS)[0]
        cuda = load_metric(spec, device="cuda")(imgs.cuda(), PROMPTS)[0]
        assert cuda.device.type == "cpu"
        torch.testing.assert_close(cuda, cpu, atol=1e-4, rtol=1e-4, msg=spec)


# ---------------------------------------------------------------------------------------------------- preprocessing
def test_preprocess_crop_vs_pad_on_a_non_square_image():
    x = torch.zeros(1, 3, 32, 64)
    x[..., :8] = 1.0  # the left eighth white, the rest mid-grey (0 in [-1, 1])
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    crop = preprocess(x, 16, "crop")[0]  # 32x64 -> 16x32 -> centre 16x16: the white strip is cut off
    grey = (round(127.5) / 255 - mean) / std
    torch.testing.assert_close(crop, grey.expand(3, 16, 16), atol=1e-6, rtol=0)
    pad = preprocess(x, 16, "pad")[0]  # 32x64 -> 8x16, 4 black rows above and below
    black = ((0 - mean) / std).expand(3, 4, 16)
    torch.testing.assert_close(pad[:, :4], black)
    torch.testing.assert_close(pad[:, 12:], black)
    assert (pad[:, 4:12, 0] > crop.max()).all()  # the white strip is kept
    # square input of the target size: only the uint8 quantisation, no resampling
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(preprocess(y, 16, "pad"), preprocess(y, 16, "crop"))
    torch.testing.assert_close(preprocess(y, 16), (((y + 1) * 127.5).round() / 255 - mean) / std)


def test_crop_preprocessing_matches_pil_within_one_grey_level():
    """The authors' path: a uint8 PIL image, PIL bicubic resize of the short side, centre crop."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 24, 30, generator=g) * 2 - 1, size=(96, 120), mode="bilinear")
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    for x in (smooth, torch.rand(1, 3, 120, 96, generator=g) * 2 - 1):
        im = Image.fromarray(((x[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
        w, h = im.size
        nw, nh = (int(32 * w / h), 32) if h <= w else (32, int(32 * h / w))
        top, left = round((nh - 32) / 2), round((nw - 32) / 2)
        ref = torch.tensor(np.asarray(im.resize((nw, nh), Image.BICUBIC)), dtype=torch.float32).permute(2, 0, 1)
        ours = (preprocess(x, 32, "crop")[0] * std + mean) * 255
        assert (ours - ref[:, top:top + 32, left:left + 32]).abs().max() < 1.01


# ------------------------------------------------------------------------------------------------ specs and errors
def test_parse_metric_syntax():
    s = parse_metric("hpsv2=/w/HPS_v2_compressed.pt,/m/CLIP-ViT-H-14")
    assert s.kind == "hpsv2" and s.paths == {"weights": Path("/w/HPS_v2_compressed.pt"),
                                             "clip": Path("/m/CLIP-ViT-H-14")}
    s = parse_metric("imagereward=med_config=/w/med.json,/w/ImageReward.pt,tokenizer=/m/bert")
    assert s.paths == {"weights": Path("/w/ImageReward.pt"), "med_config": Path("/w/med.json"),
                       "tokenizer": Path("/m/bert")}
    assert parse_metric("PickScore=/m/p").paths == {"model": Path("/m/p")}
    assert str(parse_metric("clip=/m/c,/m/t")) == "clip=model=/m/c,tokenizer=/m/t"
    assert METRICS["pickscore"].usage == "pickscore=PICKSCORE_DIR[,tokenizer=DIR]"
    assert METRICS["hpsv21"].usage == "hpsv21=HPS_v2.1_compressed.pt,VIT_H_14_DIR"
    assert [m.label for m in METRICS.values()] == ["PickScore", "HPSv2", "HPSv2.1", "ImageReward", "Aesthetic",
                                                   "CLIP score", "SPM at t = 0"]
    for bad, msg in [("fid=/x", "unknown reward metric 'fid'"), ("hpsv2=/w/a.pt", "lacks the clip path"),
                     ("aesthetic", "lacks the head path"), ("clip=/a,/b,/c", "too many paths"),
                     ("clip=/a,model=/b", "model given twice"), ("hpsv2=/a.pt,,/b", "an empty path"),
                     ("hpsv2=/a.pt,tokenizer=/b", "no part named 'tokenizer'.*its parts: weights, clip")]:
        with pytest.raises(RewardError, match=msg):
            parse_metric(bad)


def test_missing_and_wrong_kind_paths_name_metric_and_expected_file(tmp, clip, imagereward):
    path, _ = clip
    with pytest.raises(RewardError, match=r"metric hpsv2 \(HPSv2\): weights .*nope\.pt: no such file or directory; "
                                          r"expected HPS_v2_compressed\.pt"):
        check_metric(f"hpsv2={tmp / 'nope.pt'},{path}")
    with pytest.raises(RewardError, match=r"metric aesthetic \(Aesthetic\): head .*: a directory, not a file; "
                                          r"expected sac\+logos\+ava1-l14-linearMSE\.pth"):
        check_metric(f"aesthetic={path},{path}")
    with pytest.raises(RewardError, match=r"ImageReward.*weights .*x\.pt: no such file.*expected ImageReward\.pt"):
        check_metric(f"imagereward={tmp / 'x.pt'},{tmp / 'missing.json'},{path}")  # the first missing path
    with pytest.raises(RewardError, match=r"ImageReward.*med_config .*missing\.json: no such file.*med_config\.json"):
        check_metric(f"imagereward=tokenizer={path},weights={imagereward[0]},med_config={tmp / 'missing.json'}")


def test_files_that_are_not_state_dicts(tmp, clip):
    path, _ = clip
    (tmp / "text.pt").write_text("this is not a checkpoint\n")
    with pytest.raises(RewardWeightsError, match=r"HPSv2.*text\.pt is not a PyTorch weights file.*weights_only"):
        check_metric(f"hpsv2={tmp / 'text.pt'},{path}")
    torch.save([1, 2, 3], tmp / "list.pt")
    with pytest.raises(RewardWeightsError, match=r"list\.pt holds a list, not a state dict"):
        check_metric(f"hpsv2={tmp / 'list.pt'},{path}")
    good = tmp / "good.pt"
    torch.save({"a": torch.zeros(1000)}, good)
    (tmp / "cut.pt").write_bytes(good.read_bytes()[:-200])
    with pytest.raises(RewardWeightsError, match=r"cut\.pt is truncated or corrupt"):
        check_metric(f"hpsv2={tmp / 'cut.pt'},{path}")


def test_wrong_architecture_and_truncated_clip_dirs(tmp, clip, aesthetic_head):
    blip = tmp / "blip"
    blip.mkdir()
    (blip / "config.json").write_text(json.dumps({"model_type": "blip", "architectures": ["BlipModel"]}))
    with pytest.raises(RewardError, match=r"PickScore.*blip/config\.json is not a clip config: found model_type "
                                          r"'blip'"):
        check_metric(f"pickscore={blip}")
    unet = tmp / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}))
    with pytest.raises(RewardError, match=r"CLIP score.*found a UNet2DConditionModel config.*expected a CLIPModel"):
        check_metric(f"clip={unet}")
    src, _ = clip
    cut = tmp / "cut_clip"
    shutil.copytree(src, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(RewardWeightsError, match=r"metric aesthetic.*model\.safetensors is truncated"):
        check_metric(f"aesthetic={aesthetic_head[0]},{cut}")
    notok = tmp / "no_tokenizer"
    shutil.copytree(src, notok, ignore=shutil.ignore_patterns("vocab.json", "merges.txt"))
    with pytest.raises(RewardError, match=r"PickScore.*no CLIP tokenizer files.*tokenizer=DIR"):
        check_metric(f"pickscore={notok}")
    check_metric(f"pickscore={notok},tokenizer={CLIP_TOKENIZER}")
