"""Step-aware preference model (spo_fast.reward.spm): identity init, t-conditioning, gradients, shapes, I/O, loss, scorer."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from spo_fast.reward.spm import CLIP_MEAN, CLIP_STD, SPMError, SPMScorer, StepAwarePreferenceModel, pair_loss

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "configs/arch/tiny_sd15/tokenizer"
PROMPTS = ["a red cat on a sofa", "blue sky", "a photo of a green dog in the park at night"]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    t = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    assert len(t) == 1549
    return t


@pytest.fixture
def model(tok) -> StepAwarePreferenceModel:
    return StepAwarePreferenceModel.tiny(tok).eval()


def _feats(out) -> torch.Tensor:
    """transformers 5 get_*_features return a ModelOutput whose pooler_output is the projected features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def plain_image(clip: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    f = _feats(clip.get_image_features(pixel_values=pixel_values))
    return f / f.norm(dim=-1, keepdim=True)


def plain_text(clip: CLIPModel, tok, prompts: list[str]) -> torch.Tensor:
    ids = tok(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    f = _feats(clip.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask))
    return f / f.norm(dim=-1, keepdim=True)


def tokens(tok, prompts: list[str]):
    return tok(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")


def perturb(model: StepAwarePreferenceModel, seed: int = 1, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.time_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def pix(n: int, seed: int = 0, size: int = 24) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ 1. identity
@torch.no_grad()
def test_identity_init_equals_plain_clip(model, tok):
    x, t = pix(4), torch.tensor([0, 17, 500, 999])
    ref_img = plain_image(model.clip, x)
    ref_txt = plain_text(model.clip, tok, PROMPTS)
    torch.testing.assert_close(model.image_features(x), ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.image_features(x, t), ref_img, atol=1e-5, rtol=0)
    ids = tokens(tok, PROMPTS)
    txt = model.text_features(ids.input_ids, ids.attention_mask)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)
    pi = torch.tensor([2, 0, 1, 2])
    ref_scores = model.clip.logit_scale.exp() * (ref_img * ref_txt[pi]).sum(-1)
    assert model.clip.logit_scale.exp() > 10  # the scale is really applied (CLIP init: exp(2.6592) = 14.3)
    torch.testing.assert_close(model.scores(x, t, txt, pi), ref_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.scores(x, None, txt, pi), ref_scores, atol=1e-5, rtol=0)
    # the prompts really differ (a scorer ignoring prompt_index would fail here)
    assert (ref_txt[0] - ref_txt[1]).abs().max() > 1e-2


def test_tiny_is_deterministic_and_token_ids(tok):
    a, b, c = (StepAwarePreferenceModel.tiny(tok), StepAwarePreferenceModel.tiny(len(tok)),
               StepAwarePreferenceModel.tiny(tok, seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["clip.visual_projection.weight"], sc["clip.visual_projection.weight"])
    tcfg = a.clip.config.text_config
    assert (tcfg.vocab_size, tcfg.bos_token_id, tcfg.eos_token_id, tcfg.pad_token_id) == (
        1549, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tcfg.max_position_embeddings == 32
    with pytest.raises(ValueError, match="eos_token_id"):
        StepAwarePreferenceModel.tiny(100, eos_token_id=100)


# ------------------------------------------------------------------------------------------ 2. t-conditioning matters
@torch.no_grad()
def test_perturbed_modulation_depends_on_t(model):
    perturb(model)
    x = pix(2)
    f0, f999 = model.image_features(x, 0), model.image_features(x, torch.tensor([999, 999]))
    assert (f0 - f999).abs().max() > 1e-3
    assert torch.equal(model.image_features(x, 0), f0)  # deterministic
    # per-sample timesteps: batch row i == single call at t_i; scalar t broadcasts
    mixed = model.image_features(x, torch.tensor([0, 999]))
    torch.testing.assert_close(mixed[0], f0[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], f999[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.image_features(x, 0.0), model.image_features(x, torch.zeros(2)))
    torch.testing.assert_close(model.image_features(x), plain_image(model.clip, x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_every_modulation_linear_is_wired(model):
    """Perturbing only one layer's (or the pooled) modulation Linear changes the output; the rest stays identity."""
    x, t = pix(2), torch.tensor([3, 800])
    base = model.image_features(x, t)
    for lin in [*model.time_cond.layers, model.time_cond.pooled]:
        lin.bias.add_(0.3)
        assert (model.image_features(x, t) - base).abs().max() > 1e-3
        lin.bias.sub_(0.3)
        torch.testing.assert_close(model.image_features(x, t), base, atol=1e-6, rtol=0)


@torch.no_grad()
def test_adaln_chunk_semantics(model):
    """(shift, scale, gate) order and g = 1 + gate, checked through closed-form special cases."""
    vm, hid, x, t = model.clip.vision_model, 64, pix(2), torch.tensor([5, 600])
    emb = vm.pre_layrnorm(vm.embeddings(x))

    def expect(h: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.clip.visual_projection(vm.post_layernorm(h[:, 0])), dim=-1)

    # gate1 = gate2 = -1 in every layer: all residual branches vanish
    for lin in model.time_cond.layers:
        lin.bias[2 * hid:3 * hid] = -1
        lin.bias[5 * hid:6 * hid] = -1
    torch.testing.assert_close(model.image_features(x, t), expect(emb), atol=1e-5, rtol=0)
    # scale = -1, shift = beta, gate = 0: each branch sees the constant beta, so h = emb + sum_i attn_i(beta) + mlp_i(beta)
    beta = torch.linspace(-1, 1, hid)
    delta = torch.zeros(hid)
    for lin, layer in zip(model.time_cond.layers, vm.encoder.layers):
        lin.bias.zero_()
        lin.bias[0:hid] = beta
        lin.bias[hid:2 * hid] = -1
        lin.bias[3 * hid:4 * hid] = beta
        lin.bias[4 * hid:5 * hid] = -1
        delta += layer.self_attn(beta.view(1, 1, hid))[0][0, 0] + layer.mlp(beta)
    torch.testing.assert_close(model.image_features(x, t), expect(emb + delta), atol=1e-5, rtol=0)
    # pooled: scale = -1, shift = b -> features independent of the image
    for lin in model.time_cond.layers:
        lin.bias.zero_()
    model.time_cond.pooled.bias[:hid] = beta
    model.time_cond.pooled.bias[hid:] = -1
    f = model.image_features(x, t)
    torch.testing.assert_close(f, F.normalize(model.clip.visual_projection(beta), dim=-1).expand(2, -1),
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------ 3. gradients
def _pair_backward(model, tok) -> None:
    ids = tokens(tok, PROMPTS)
    txt = model.text_features(ids.input_ids, ids.attention_mask)
    pi, t = torch.tensor([0, 1, 2]), torch.tensor([10, 400, 900])
    s0 = model.scores(pix(3, seed=1), t, txt, pi)
    s1 = model.scores(pix(3, seed=2), t, txt, pi)
    loss, _ = pair_loss(s0, s1, torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()


def test_gradients_reach_all_time_params(model, tok):
    model.train()
    perturb(model)
    _pair_backward(model, tok)
    for name, p in model.time_cond.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_init_does_not_block_learning(model, tok):
    model.train()
    _pair_backward(model, tok)
    for i, lin in enumerate([*model.time_cond.layers, model.time_cond.pooled]):
        assert lin.weight.grad.abs().sum() > 0 and lin.bias.grad.abs().sum() > 0, i
    # with zero modulation weights no gradient reaches the timestep MLP yet (it starts learning after one step)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.time_cond.time_mlp.parameters())
    assert model.clip.visual_projection.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_same_grads(tok):
    grads, mlp_calls = [], []
    for ckpt in (False, True):
        m = StepAwarePreferenceModel.tiny(tok).train()
        perturb(m)
        if ckpt:
            m.clip.gradient_checkpointing_enable()
        calls = []
        m.clip.vision_model.encoder.layers[0].mlp.register_forward_hook(lambda *_, c=calls: c.append(1))
        _pair_backward(m, tok)
        grads.append(torch.cat([p.grad.flatten() for p in m.time_parameters()]))
        mlp_calls.append(len(calls))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert mlp_calls == [2, 4]  # two scores() forwards; checkpointing recomputes each in backward


# ---------------------------------------------------------------------------------------------------------- 4. shapes
@torch.no_grad()
def test_shapes_tiny(model, tok):
    n, ids = 5, tokens(tok, PROMPTS)
    txt = model.text_features(ids.input_ids)
    img = model.image_features(pix(n), torch.randint(0, 1000, (n,)))
    assert txt.shape == (3, 64) and img.shape == (n, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(n))
    s = model.scores(pix(n), torch.randint(0, 1000, (n,)), txt, torch.tensor([0, 1, 2, 0, 1]))
    assert s.shape == (n,)


def test_vit_h14_dims_on_meta():
    hv, layers, patch, size, inter, proj, freq = 1280, 32, 14, 224, 5120, 1024, 256
    cfg = CLIPConfig(
        text_config={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "intermediate_size": 4096, "hidden_act": "gelu"},
        vision_config={"hidden_size": hv, "num_hidden_layers": layers, "num_attention_heads": 16,
                       "intermediate_size": inter, "patch_size": patch, "image_size": size, "hidden_act": "gelu"},
        projection_dim=proj)
    with torch.device("meta"):
        model = StepAwarePreferenceModel(CLIPModel(cfg))
    clip = model.clip
    n_pos = (size // patch) ** 2 + 1
    per_layer = 4 * (hv * hv + hv) + (hv * inter + inter) + (inter * hv + hv) + 2 * 2 * hv
    vision = hv + 3 * patch * patch * hv + n_pos * hv + 2 * hv + layers * per_layer + 2 * hv
    assert sum(p.numel() for p in clip.vision_model.parameters()) == vision == 630_766_080
    assert clip.visual_projection.weight.shape == (proj, hv)
    added = (freq * hv + hv + hv * hv + hv) + layers * (hv * 6 * hv + 6 * hv) + (hv * 2 * hv + 2 * hv)
    assert sum(p.numel() for p in model.time_parameters()) == added == 320_066_560
    # meta forward: shapes only
    pv = model.preprocess(torch.empty(2, 3, 512, 512, device="meta"))
    assert pv.shape == (2, 3, 224, 224)
    img = model.image_features(pv, torch.empty(2, device="meta"))
    txt = model.text_features(torch.zeros(3, 77, dtype=torch.long, device="meta"))
    s = model.scores(pv, torch.empty(2, device="meta"), txt, torch.zeros(2, dtype=torch.long, device="meta"))
    assert img.shape == (2, proj) and txt.shape == (3, proj) and s.shape == (2,)


# --------------------------------------------------------------------------------------------------------------- 5. io
def test_save_load_round_trip(tok, tmp_path):
    model = StepAwarePreferenceModel.tiny(tok, time_freq_dim=32).eval()
    perturb(model)
    model.save_pretrained(tmp_path / "spm")
    assert {"config.json", "model.safetensors", "spm.safetensors", "spm_config.json"} <= {
        p.name for p in (tmp_path / "spm").iterdir()}
    assert json.loads((tmp_path / "spm/spm_config.json").read_text())["time_freq_dim"] == 32
    assert set(load_file(tmp_path / "spm/spm.safetensors")) == set(model.time_cond.state_dict())
    loaded = StepAwarePreferenceModel.from_pretrained(tmp_path / "spm").eval()
    x, t, ids = pix(3), torch.tensor([0, 250, 999]), tokens(tok, PROMPTS)
    with torch.no_grad():
        for a, b in ((model, loaded),):
            txt_a, txt_b = a.text_features(ids.input_ids), b.text_features(ids.input_ids)
            assert torch.equal(txt_a, txt_b)
            assert torch.equal(a.image_features(x, t), b.image_features(x, t))
            pi = torch.tensor([1, 2, 0])
            assert torch.equal(a.scores(x, t, txt_a, pi), b.scores(x, t, txt_b, pi))
        # without spm.safetensors: the identity-initialised SPM over the same CLIP
        (tmp_path / "spm/spm.safetensors").rename(tmp_path / "weights.safetensors")
        bare = StepAwarePreferenceModel.from_pretrained(tmp_path / "spm")
        torch.testing.assert_close(bare.image_features(x, t), plain_image(model.clip, x), atol=1e-5, rtol=0)
        assert (bare.image_features(x, t) - model.image_features(x, t)).abs().max() > 1e-3
        explicit = StepAwarePreferenceModel.from_pretrained(tmp_path / "spm", tmp_path / "weights.safetensors")
        assert torch.equal(explicit.image_features(x, t), model.image_features(x, t))


def test_load_errors_name_the_path(tok, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*config.json"):
        StepAwarePreferenceModel.from_pretrained(missing)
    model = StepAwarePreferenceModel.tiny(tok)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        StepAwarePreferenceModel.from_pretrained(tmp_path / "m", tmp_path / "absent.safetensors")
    sd = load_file(tmp_path / "m/spm.safetensors")
    sd["extra.weight"] = sd.pop("pooled.weight")
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(SPMError, match=r"bad\.safetensors.*missing=\['pooled\.weight'\].*unexpected=\['extra"):
        StepAwarePreferenceModel.from_pretrained(tmp_path / "m", tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------------------- 6. pair_loss
def test_pair_loss_matches_hand_computation():
    s0 = torch.tensor([2.0, 0.0, 1.0, -1.0, 4.0])
    s1 = torch.tensor([1.0, 3.0, 1.0, -1.5, 4.0])
    label = torch.tensor([1.0, 1.0, 0.5, 0.0, 1.0])
    loss, correct = pair_loss(s0, s1, label)
    # -log sigmoid(s_win - s_lose); tie with equal scores -> log 2
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(3.0)), math.log(2.0), math.log1p(math.exp(0.5)),
                math.log(2.0)]
    torch.testing.assert_close(loss, torch.tensor(sum(expected) / 5))
    assert correct.dtype == torch.float32 and correct.shape == (5,)
    assert correct[[0, 1, 3, 4]].tolist() == [1.0, 0.0, 0.0, 0.5] and torch.isnan(correct[2])
    assert torch.nanmean(correct).item() == pytest.approx(1.5 / 4)


def test_pair_loss_tie_targets_half():
    s0, s1 = torch.tensor([3.0], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    loss, correct = pair_loss(s0, s1, 0.5)
    p0 = 1 / (1 + math.exp(-2.0))
    assert loss.item() == pytest.approx(-(0.5 * math.log(p0) + 0.5 * math.log(1 - p0)), rel=1e-6)
    loss.backward()
    assert s0.grad.item() == pytest.approx(p0 - 0.5, rel=1e-5)  # pulls the pair towards 0.5 / 0.5
    assert s1.grad.item() == pytest.approx(0.5 - p0, rel=1e-5)
    assert torch.isnan(correct).all()
    # a decisive label on the same pair: gradient p0 - 1, label flipped gives p0
    for lab, g in ((1.0, p0 - 1), (0.0, p0)):
        a = torch.tensor([3.0], requires_grad=True)
        pair_loss(a, torch.tensor([1.0]), lab)[0].backward()
        assert a.grad.item() == pytest.approx(g, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------- 7. scorer
def test_scorer_runs_text_tower_once(model, tok):
    calls = []
    model.clip.text_model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                                with_kwargs=True)
    scorer = SPMScorer(model, tok)
    state = scorer.prepare(PROMPTS)
    assert calls == [torch.Size([3, 32])]  # one batched call, max_length = min(77, 32)
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t, pi = torch.randint(0, 1000, (12,)), torch.arange(12) % 3
    s = scorer.score(images, t, state, pi)
    assert len(calls) == 1
    assert s.shape == (12,) and s.dtype == torch.float32 and not s.requires_grad
    # zero init: the scorer is plain CLIP on preprocessed images (independent reference preprocessing)
    x = F.interpolate((images + 1) / 2, size=(24, 24), mode="bicubic", antialias=True).clamp(0, 1)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model.clip.logit_scale.exp() * (plain_image(model.clip, x) * plain_text(model.clip, tok, PROMPTS)[pi]).sum(-1)
    torch.testing.assert_close(s, ref, atol=1e-4, rtol=0)
    # a bf16 model still returns fp32 scores
    model.to(torch.bfloat16)
    s16 = scorer.score(images[:2], t[:2], scorer.prepare(PROMPTS), pi[:2])
    assert s16.dtype == torch.float32 and s16.shape == (2,)


def test_preprocess(model):
    const = torch.full((2, 3, 32, 32), 0.2, dtype=torch.float64)  # -> 0.6 in [0, 1]
    pv = model.preprocess(const)
    assert pv.shape == (2, 3, 24, 24) and pv.dtype == torch.float32
    want = (0.6 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(pv, want.view(1, 3, 1, 1).expand_as(pv), atol=1e-5, rtol=0)
    # out-of-range values are clamped; the right size is not resized
    x = torch.rand(1, 3, 24, 24) * 4 - 2
    ref = ((x.clamp(-1, 1) + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.preprocess(x), ref, atol=1e-6, rtol=0)
    # non-square: short side to 24, centre crop
    assert model.preprocess(torch.zeros(1, 3, 32, 48)).shape == (1, 3, 24, 24)


def test_scorer_from_pretrained_and_vocab_check(tok, tmp_path):
    model = StepAwarePreferenceModel.tiny(tok).eval()
    perturb(model)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = SPMScorer.from_pretrained(tmp_path)
    direct = SPMScorer(model, tok)
    images, t, pi = torch.rand(4, 3, 24, 24) * 2 - 1, torch.tensor([0, 1, 500, 999]), torch.tensor([0, 1, 2, 0])
    assert torch.equal(scorer.score(images, t, scorer.prepare(PROMPTS), pi),
                       direct.score(images, t, direct.prepare(PROMPTS), pi))
    with pytest.raises(ValueError, match="1549 tokens.*1000"):
        SPMScorer(StepAwarePreferenceModel.tiny(1000), tok)
