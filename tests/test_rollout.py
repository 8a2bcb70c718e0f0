"""Tests for spo_fast.diffusion.rollout: the step-wise resampler's buffers, its scorer calls, select_pairs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spo_fast.core.config import SamplingConfig, SPOConfig
from spo_fast.diffusion.models import encode_prompts, load_components
from spo_fast.diffusion.rollout import RolloutBuffer, rollout, select_pairs
from spo_fast.diffusion.sampling import DDIMSchedule, cfg_model_output, ddim_step_stats, predict_x0_eps
from spo_fast.kernels.philox import rng_state

B = 3
GUIDANCE = 5.0
PROMPTS = ["a red cat", "blue dog on grass", "green tree"]


class MeanScorer:
    """Deterministic toy scorer: a large multiple of the image mean (differences of a few 1e-3
    between candidates then give both valid and invalid pairs at threshold 0.3)."""

    def __init__(self, factor: float = 1000.0):
        self.factor = factor

    def prepare(self, prompts):
        return None

    def score(self, images, timesteps, state, prompt_index):
        return images.double().mean(dim=(1, 2, 3)).float() * self.factor


class ConstantScorer:
    def prepare(self, prompts):
        return None

    def score(self, images, timesteps, state, prompt_index):
        return torch.full((images.shape[0],), 0.75)


class Recorder:
    """Wraps a scorer and records every call (inputs cloned, and what was returned)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def prepare(self, prompts):
        return self.inner.prepare(prompts)

    def score(self, images, timesteps, state, prompt_index):
        out = self.inner.score(images, timesteps, state, prompt_index)
        self.calls.append({"images": images.clone(), "timesteps": timesteps.clone(), "state": state,
                           "prompt_index": prompt_index.clone(), "scores": out.clone()})
        return out


@pytest.fixture(scope="module")
def tiny():
    comp = load_components("arch:tiny_sd15", "sd15", "random", seed=0)
    cond = encode_prompts(comp, PROMPTS, "cpu", 16)
    uncond = encode_prompts(comp, [""] * B, "cpu", 16)
    noise = torch.randn(B, *comp.latent_shape, generator=torch.Generator().manual_seed(1234))

    def decode(z):
        return comp.vae.decode(z / comp.vae.config.scaling_factor).sample.clamp(-1, 1)

    def run(scorer, num_steps=6, k=2, divert=2, inner=0, seed=0, threshold=0.3, state=None):
        schedule = DDIMSchedule.from_scheduler(comp.scheduler, num_steps)
        spo = SPOConfig(k=k, divert_start_step=divert, num_inner_steps=inner, threshold=threshold)
        sampling = SamplingConfig(num_steps=num_steps, eta=1.0, guidance_scale=GUIDANCE)
        buf = rollout(comp.unet, schedule, cond, uncond, scorer, state, decode, noise.clone(), spo, sampling,
                      torch.Generator().manual_seed(seed))
        return buf, schedule

    return {"comp": comp, "cond": cond, "uncond": uncond, "decode": decode, "run": run, "noise": noise}


@torch.no_grad()
def _x0_image(tiny, schedule, y, t_scalar):
    """decode(x0_hat(y)) at timestep t for latents y (B, C, H, W), one row per prompt."""
    t = torch.full((y.shape[0],), int(t_scalar), dtype=torch.long)
    out = cfg_model_output(tiny["comp"].unet, y, t, tiny["cond"], tiny["uncond"], GUIDANCE)
    x0, _ = predict_x0_eps(schedule, out, y, t)
    return tiny["decode"](x0)


def _softmax_margin(sw, sl):
    """p_win - p_lose of softmax([s_win, s_lose]), computed in float64 without tanh."""
    e = torch.stack([sw.double(), sl.double()]).softmax(0)
    return e[0] - e[1]


def _in_rows(a, pool):
    """For each b: is a[b] bitwise equal to some pool[j][b]."""
    return [any(torch.equal(a[b], p[b]) for p in pool) for b in range(a.shape[0])]


def _check_common(buf: RolloutBuffer, schedule, tiny, num_steps, divert, k, threshold=0.3):
    C, H, W = tiny["comp"].latent_shape
    S = num_steps - divert
    assert buf.num_slots == S
    assert buf.x_t.shape == (S, 2, B, C, H, W) and buf.x_prev.shape == (S, 2, B, C, H, W)
    assert buf.t.shape == (S,) and torch.equal(buf.t, schedule.timesteps[divert:])
    assert buf.valid.shape == (S, B) and buf.valid.dtype == torch.bool
    assert buf.score_win.shape == (S, B) and buf.score_lose.shape == (S, B)
    assert buf.final_scores.shape == (B, k) and buf.final.shape == (B, C, H, W)
    assert len(buf.shared) == S
    for name in ("x_t", "x_prev", "score_win", "score_lose", "final", "final_scores"):
        assert torch.isfinite(getattr(buf, name)).all(), name
    assert torch.all(buf.score_win >= buf.score_lose)
    assert torch.equal(buf.valid, _softmax_margin(buf.score_win, buf.score_lose) > threshold)
    for s in range(S):
        if buf.shared[s]:
            assert torch.equal(buf.x_t[s, 0], buf.x_t[s, 1]), s
        # a strictly better winner is a different candidate than the loser
        differ = buf.score_win[s] > buf.score_lose[s]
        for b in range(B):
            if differ[b]:
                assert not torch.equal(buf.x_prev[s, 0, b], buf.x_prev[s, 1, b]), (s, b)
    # last slot: win/lose come from the final pool, the continuation is the final sample
    assert torch.equal(buf.score_win[-1], buf.final_scores.max(1).values)
    assert torch.equal(buf.score_lose[-1], buf.final_scores.min(1).values)


@torch.no_grad()
def _check_transitions_are_ddim_steps(buf, schedule, tiny, unet=None):
    """x_prev is a draw from the DDIM step at (x_t, t): its standardized residual looks like N(0, 1).

    A transition whose x_t, t or side were mislabeled would have residuals far from N(0, 1)."""
    unet = tiny["comp"].unet if unet is None else unet
    for s in range(buf.num_slots):
        t = buf.t[s].expand(B)
        for side in (0, 1):
            x = buf.x_t[s, side]
            out = cfg_model_output(unet, x, t, tiny["cond"], tiny["uncond"], GUIDANCE)
            _, mean, std = ddim_step_stats(schedule, out, x, t, 1.0)
            z = (buf.x_prev[s, side] - mean) / std.view(-1, 1, 1, 1)
            assert abs(z.mean().item()) < 0.2, (s, side, z.mean().item())
            assert abs(z.std().item() - 1) < 0.2, (s, side, z.std().item())


# --------------------------------------------------------------------------- SD 1.5 style (no inner steps)


def test_buffer_invariants_sd15(tiny):
    num_steps, divert, k = 6, 2, 2
    seen_valid, cont_is_win = set(), []
    for seed in (0, 1, 2):
        buf, schedule = tiny["run"](MeanScorer(), num_steps=num_steps, k=k, divert=divert, seed=seed)
        _check_common(buf, schedule, tiny, num_steps, divert, k)
        assert buf.shared == [True] * (num_steps - divert)
        seen_valid |= set(buf.valid.flatten().tolist())
        for s in range(buf.num_slots - 1):
            # the next shared x_t is the continuation: one of this pool's two candidates
            assert all(_in_rows(buf.x_t[s + 1, 0], [buf.x_prev[s, 0], buf.x_prev[s, 1]])), (seed, s)
            cont_is_win += _in_rows(buf.x_t[s + 1, 0], [buf.x_prev[s, 0]])
        assert all(_in_rows(buf.final, [buf.x_prev[-1, 0], buf.x_prev[-1, 1]])), seed
        cont_is_win += _in_rows(buf.final, [buf.x_prev[-1, 0]])
        if seed == 0:
            _check_transitions_are_ddim_steps(buf, schedule, tiny)
    assert seen_valid == {True, False}  # the mask check above was not vacuous
    # the continuation is a uniformly random candidate, not the winner (or the loser) every time:
    # 36 pools, k=2 -> the number continuing from the winner is Binomial(36, 1/2)
    assert len(cont_is_win) == 3 * (num_steps - divert) * B
    assert 8 <= sum(cont_is_win) <= 28, sum(cont_is_win)


@pytest.mark.parametrize("k", [2, 3])
def test_scorer_calls_sd15(tiny, k):
    num_steps, divert = 6, 2
    rec = Recorder(MeanScorer())
    state = object()
    buf, schedule = tiny["run"](rec, num_steps=num_steps, k=k, divert=divert, seed=5, state=state)
    S = num_steps - divert
    assert len(rec.calls) == S  # one pool per slot
    ts = schedule.timesteps
    expect_index = torch.arange(B).repeat_interleave(k)
    images_scored = 0
    for s, call in enumerate(rec.calls):
        n = call["images"].shape[0]
        images_scored += n
        assert call["images"].shape == (B * k, 3, 16, 16)
        assert call["state"] is state
        assert torch.equal(call["prompt_index"], expect_index)
        t_end = int(ts[divert + s + 1]) if s + 1 < S else 0  # chain end's timestep; 0 for the final pool
        assert call["timesteps"].shape == (B * k,) and call["timesteps"].dtype == torch.long
        assert torch.all(call["timesteps"] == t_end), (s, call["timesteps"])
        sc = call["scores"].view(B, k)
        assert torch.equal(buf.score_win[s], sc.max(1).values)
        assert torch.equal(buf.score_lose[s], sc.min(1).values)
        imgs = call["images"].view(B, k, 3, 16, 16)
        win_img = imgs[torch.arange(B), sc.argmax(1)]
        lose_img = imgs[torch.arange(B), sc.argmin(1)]
        # the scored images are decode(x0_hat) of the chain ends (the final latents for the last pool)
        if s + 1 < S:
            exp_win = _x0_image(tiny, schedule, buf.x_prev[s, 0], t_end)
            exp_lose = _x0_image(tiny, schedule, buf.x_prev[s, 1], t_end)
            cont_img = _x0_image(tiny, schedule, buf.x_t[s + 1, 0], t_end)
        else:
            exp_win, exp_lose = tiny["decode"](buf.x_prev[s, 0]), tiny["decode"](buf.x_prev[s, 1])
            cont_img = tiny["decode"](buf.final)
        assert torch.allclose(win_img, exp_win, atol=1e-4), s
        assert torch.allclose(lose_img, exp_lose, atol=1e-4), s
        # the continuation is one of the pool (for any k): its image is one of the k scored ones
        dist = (imgs - cont_img[:, None]).flatten(2).abs().amax(2)  # (B, k)
        assert torch.all(dist.min(1).values < 1e-4), (s, dist)
    assert images_scored == S * B * k
    assert torch.equal(buf.final_scores, rec.calls[-1]["scores"].view(B, k))


# --------------------------------------------------------------------------- SDXL style (inner steps)


def test_inner_steps_sdxl_style(tiny):
    num_steps, divert, k, inner = 10, 4, 2, 2
    rec = Recorder(MeanScorer())
    buf, schedule = tiny["run"](rec, num_steps=num_steps, k=k, divert=divert, inner=inner, seed=3)
    _check_common(buf, schedule, tiny, num_steps, divert, k)
    assert buf.shared == [True, False, False, True, False, False]
    ts = schedule.timesteps
    assert len(rec.calls) == 2
    assert torch.all(rec.calls[0]["timesteps"] == ts[divert + 3])
    assert torch.all(rec.calls[1]["timesteps"] == 0)
    for seg in (0, 1):
        lo = 3 * seg
        sc = rec.calls[seg]["scores"].view(B, k)
        for s in range(lo, lo + 3):  # every transition of a segment carries the segment's label
            assert torch.equal(buf.valid[s], buf.valid[lo])
            assert torch.equal(buf.score_win[s], sc.max(1).values)
            assert torch.equal(buf.score_lose[s], sc.min(1).values)
        for s in range(lo + 1, lo + 3):  # inner steps: each chain continues on its own side
            for side in (0, 1):
                assert torch.equal(buf.x_t[s, side], buf.x_prev[s - 1, side]), (s, side)
            for b in range(B):
                if buf.score_win[s, b] > buf.score_lose[s, b]:
                    assert not torch.equal(buf.x_t[s, 0, b], buf.x_t[s, 1, b]), (s, b)
    # the second segment starts from the continuation chain's end: with k=2, win's or lose's
    assert all(_in_rows(buf.x_t[3, 0], [buf.x_prev[2, 0], buf.x_prev[2, 1]]))
    assert all(_in_rows(buf.final, [buf.x_prev[5, 0], buf.x_prev[5, 1]]))
    # the first pool was scored on x0_hat of the chain ends at their own timestep
    imgs = rec.calls[0]["images"].view(B, k, 3, 16, 16)
    sc = rec.calls[0]["scores"].view(B, k)
    exp_win = _x0_image(tiny, schedule, buf.x_prev[2, 0], ts[divert + 3])
    assert torch.allclose(imgs[torch.arange(B), sc.argmax(1)], exp_win, atol=1e-4)
    _check_transitions_are_ddim_steps(buf, schedule, tiny)


def test_inner_steps_partial_last_segment(tiny):
    """num_steps - divert not a multiple of the segment length: the last segment is shorter."""
    buf, schedule = tiny["run"](MeanScorer(), num_steps=9, k=2, divert=4, inner=2, seed=0)
    _check_common(buf, schedule, tiny, 9, 4, 2)
    assert buf.shared == [True, False, False, True, False]
    assert torch.equal(buf.x_t[4], buf.x_prev[3])


class SensitiveUNet:
    """A stand-in UNet whose output changes a lot with its input (the random tiny UNet barely reacts
    to the small differences between candidates), so a UNet output reused for the wrong latent
    shows up as a large residual."""

    def __call__(self, x, t, encoder_hidden_states, added_cond_kwargs=None):
        c = encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=torch.sin(7 * x + 3 * c + t.float().view(-1, 1, 1, 1) / 97))


@pytest.mark.parametrize("inner", [0, 2])
def test_transitions_are_steps_of_their_own_x_t(tiny, inner):
    """With an input-sensitive model every stored transition (x_t -> x_prev at t) must be the DDIM
    step at that very x_t: catches a UNet output reused from another candidate."""
    unet = SensitiveUNet()
    num_steps, divert, k = 9, 2, 3
    comp = tiny["comp"]
    schedule = DDIMSchedule.from_scheduler(comp.scheduler, num_steps)
    spo = SPOConfig(k=k, divert_start_step=divert, num_inner_steps=inner, threshold=0.3)
    sampling = SamplingConfig(num_steps=num_steps, eta=1.0, guidance_scale=GUIDANCE)
    noise = torch.randn(B, *comp.latent_shape, generator=torch.Generator().manual_seed(8))
    buf = rollout(unet, schedule, tiny["cond"], tiny["uncond"], MeanScorer(), None,
                  lambda z: z[:, :3].tanh(), noise, spo, sampling, torch.Generator().manual_seed(4))
    assert sum(buf.shared) == (num_steps - divert + inner) // (1 + inner)
    _check_transitions_are_ddim_steps(buf, schedule, tiny, unet=unet)


def test_divert_at_zero_starts_from_the_noise(tiny):
    buf, schedule = tiny["run"](MeanScorer(), num_steps=5, k=2, divert=0, seed=1)
    _check_common(buf, schedule, tiny, 5, 0, 2)
    assert torch.equal(buf.x_t[0, 0], tiny["noise"]) and torch.equal(buf.x_t[0, 1], tiny["noise"])


# --------------------------------------------------------------------------- determinism, honest mask


def _buffers_equal(a: RolloutBuffer, b: RolloutBuffer) -> bool:
    tensors = ("x_t", "x_prev", "t", "valid", "score_win", "score_lose", "final_scores", "final")
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in tensors) and a.shared == b.shared


@pytest.mark.parametrize("inner", [0, 2])
def test_seeded_determinism(tiny, inner):
    num_steps = 6 if inner == 0 else 7
    a, _ = tiny["run"](MeanScorer(), num_steps=num_steps, divert=1, inner=inner, seed=11)
    b, _ = tiny["run"](MeanScorer(), num_steps=num_steps, divert=1, inner=inner, seed=11)
    c, _ = tiny["run"](MeanScorer(), num_steps=num_steps, divert=1, inner=inner, seed=12)
    assert _buffers_equal(a, b)
    assert not _buffers_equal(a, c)
    assert (a.x_prev - c.x_prev).abs().max() > 1e-2
    assert (a.final - c.final).abs().max() > 1e-2
    # shapes and the shared pattern do not depend on the seed
    assert a.x_t.shape == c.x_t.shape and a.shared == c.shared and a.valid.shape == c.valid.shape


@pytest.mark.parametrize("inner", [0, 2])
def test_constant_scores_give_no_valid_pair(tiny, inner):
    buf, _ = tiny["run"](ConstantScorer(), num_steps=7, k=3, divert=1, inner=inner, seed=0,
                                threshold=0.0)
    assert not buf.valid.any()
    assert torch.equal(buf.score_win, buf.score_lose)
    # win == lose: both sides hold the same candidate
    assert torch.equal(buf.x_prev[:, 0], buf.x_prev[:, 1])
    assert torch.equal(buf.x_t[:, 0], buf.x_t[:, 1])
    assert torch.all(buf.final_scores == 0.75)


# --------------------------------------------------------------------------- select_pairs


def test_select_pairs_hand_made():
    scores = torch.tensor([
        [0.1, 2.0, -1.0],  # win 1, lose 2, tanh(1.5) = 0.905 > 0.3
        [3.0, 3.0, 3.0],  # all equal: win == lose, never valid
        [0.5, 0.4, 0.45],  # margin 0.1: tanh(0.05) = 0.05 < 0.3
        [-2.0, -1.0, 5.0],  # win 2, lose 0
        [0.0, 0.7, 0.1],  # margin 0.7: p_win - p_lose = tanh(0.35) = 0.336 > 0.3
        [0.0, 0.6, 0.1],  # margin 0.6: tanh(0.3) = 0.291 < 0.3
    ])
    win, lose, valid, cont = select_pairs(scores, 0.3, 3, rng_state(0))
    assert win.tolist() == [1, 0, 0, 2, 1, 1]
    assert lose.tolist() == [2, 0, 1, 0, 0, 0]
    assert valid.dtype == torch.bool
    assert valid.tolist() == [True, False, False, True, True, False]
    assert cont.shape == (6,) and cont.dtype == torch.long
    assert torch.all((cont >= 0) & (cont < 3))
    # threshold 0: any strict margin counts, ties never do
    _, _, valid0, _ = select_pairs(scores, 0.0, 3, rng_state(0))
    assert valid0.tolist() == [True, False, True, True, True, True]


def test_select_pairs_continuation_uniform_and_seeded():
    n, k = 4000, 5
    scores = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    win, _, _, cont = select_pairs(scores, 0.3, k, rng_state(2))
    counts = torch.bincount(cont, minlength=k).double()
    assert counts.shape == (k,)
    expected = n / k
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0, counts  # 4 dof: P(chi2 > 25) ~ 5e-5
    # the continuation does not follow the score (not the winner more often than 1/k)
    frac_win = (cont == win).double().mean().item()
    assert abs(frac_win - 1 / k) < 0.04, frac_win
    # the state advances by one draw per pool; same seed -> same draws; another seed -> others
    state = rng_state(2)
    select_pairs(scores, 0.3, k, state)
    assert state.tolist() == [2, n]
    _, _, _, again = select_pairs(scores, 0.3, k, rng_state(2))
    _, _, _, other = select_pairs(scores, 0.3, k, rng_state(3))
    assert torch.equal(cont, again)
    assert not torch.equal(cont, other)


# --------------------------------------------------------------------------- the fused score + select path
class ScoreOnly:
    """A scorer behind the plain interface only (no image_features / logit_scale): the unfused path."""

    def __init__(self, inner):
        self.inner = inner

    def prepare(self, prompts):
        return self.inner.prepare(prompts)

    def score(self, images, timesteps, state, prompt_index):
        return self.inner.score(images, timesteps, state, prompt_index)


@pytest.mark.parametrize("inner", [0, 2])
def test_feature_scorer_goes_through_the_fused_op_with_the_same_pairs(tiny, monkeypatch, inner):
    """An SPM (a FeatureScorer) is scored by score_and_select on its features; the pairs, validity, continuation
    and so the whole rollout equal those of the same SPM scored through ``score`` + select_pairs."""
    from transformers import CLIPTokenizer

    import spo_fast.diffusion.rollout as rollout_mod
    from spo_fast.reward.scorers import FeatureScorer
    from spo_fast.reward.spm import SPMScorer, StepAwarePreferenceModel

    tok = CLIPTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "configs/arch/tiny_sd15/tokenizer")
    model = StepAwarePreferenceModel.tiny(tok, seed=3).eval()
    with torch.no_grad():  # a non-identity time conditioning, so scores depend on t
        for p in model.time_parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    spm = SPMScorer(model, tok)
    assert isinstance(spm, FeatureScorer) and not isinstance(ScoreOnly(spm), FeatureScorer)
    calls = []
    fused_op = rollout_mod.score_and_select

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return fused_op(*a, **kw)

    monkeypatch.setattr(rollout_mod, "score_and_select", spy)
    state = spm.prepare(PROMPTS)
    fused, _ = tiny["run"](spm, num_steps=8, k=3, divert=1, inner=inner, threshold=0.02, state=state)
    assert len(calls) == -(-(8 - 1) // (1 + inner)) and calls[0] == (B * 3, model.clip.config.projection_dim)
    plain, _ = tiny["run"](ScoreOnly(spm), num_steps=8, k=3, divert=1, inner=inner, threshold=0.02, state=state)
    assert len(calls) == -(-(8 - 1) // (1 + inner))  # the plain path did not call the op
    assert torch.allclose(fused.score_win, plain.score_win, atol=1e-5)
    assert torch.allclose(fused.final_scores, plain.final_scores, atol=1e-5)
    assert torch.equal(fused.valid, plain.valid) and 0 < fused.valid.float().mean() < 1
    assert torch.equal(fused.x_prev, plain.x_prev) and torch.equal(fused.final, plain.final)


def test_spm_image_features_give_its_scores():
    """SPMScorer.score == logit_scale * <normalize(image_features), state[prompt_index]> (the fused op's inputs)."""
    from transformers import CLIPTokenizer

    from spo_fast.reward.spm import SPMScorer, StepAwarePreferenceModel

    tok = CLIPTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "configs/arch/tiny_sd15/tokenizer")
    spm = SPMScorer(StepAwarePreferenceModel.tiny(tok, seed=1).eval(), tok)
    state = spm.prepare(PROMPTS)
    images = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t, idx = torch.tensor([0, 10, 200, 500, 900, 999]), torch.tensor([0, 1, 2, 2, 1, 0])
    feats = spm.image_features(images, t)
    assert feats.norm(dim=-1).sub(1).abs().max() > 1e-3  # un-normalised: the op normalises
    got = spm.logit_scale * (torch.nn.functional.normalize(feats, dim=-1) * state[idx]).sum(-1)
    assert torch.allclose(got, spm.score(images, t, state, idx), atol=1e-5)


# --------------------------------------------------------------------------- capturable: one segment compiles whole
def test_rollout_segment_compiles_fullgraph(tiny):
    """One branching segment (the candidates, an inner step, the scoring UNet call, decode, the SPM's features,
    the fused selection and the continuation) traces into ONE graph with torch.compile(fullgraph=True): no graph
    break, no host read (an ``.item()``/``int()`` of a device value breaks the graph), no data-dependent shape.
    aot_eager runs dynamo and AOT autograd's functionalisation (the RNG state's in-place advance included) without
    inductor's codegen (minutes on 2 cores; benchmarks/gpu_suite.sh compiles for real with sampling.graphs=compile).
    The compiled segment equals the eager one and advances the RNG state alike."""
    import functools

    from transformers import CLIPTokenizer

    from spo_fast.diffusion.models import Conditioning
    from spo_fast.diffusion.rollout import RolloutCalls, _Context, segment
    from spo_fast.reward.spm import SPMScorer, StepAwarePreferenceModel

    tok = CLIPTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "configs/arch/tiny_sd15/tokenizer")
    spm = SPMScorer(StepAwarePreferenceModel.tiny(tok, seed=3).eval(), tok)
    k, num_steps = 2, 6
    schedule = DDIMSchedule.from_scheduler(tiny["comp"].scheduler, num_steps)
    cond, uncond = tiny["cond"], tiny["uncond"]
    calls = RolloutCalls(tiny["comp"].unet, tiny["decode"], spm)
    text = spm.prepare(PROMPTS)

    def context(seed):
        return _Context(calls, schedule, Conditioning.cat([uncond, cond]),
                        Conditioning.cat([uncond.repeat_interleave(k), cond.repeat_interleave(k)]), text,
                        SPOConfig(k=k, divert_start_step=1, num_inner_steps=1, threshold=0.0),
                        SamplingConfig(num_steps=num_steps, eta=1.0, guidance_scale=GUIDANCE), rng_state(seed), "torch")

    x = tiny["noise"].clone()
    with torch.no_grad():
        halves = calls.halves(x, schedule.timesteps[1].expand(B), Conditioning.cat([uncond, cond]))
        eager_ctx, compiled_ctx = context(4), context(4)
        want = segment(eager_ctx, x, halves, 1, 3)
        compiled = torch.compile(functools.partial(segment, compiled_ctx), fullgraph=True, backend="aot_eager")
        got = compiled(x, halves, 1, 3)
    assert torch.equal(eager_ctx.state, compiled_ctx.state) and eager_ctx.state[1].item() > 0
    for a, b in zip(want[:3], got[:3]):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(want[4:], got[4:]):
        assert torch.equal(a, b)


def test_rollout_calls_reused_across_rollouts_give_the_same_buffers(tiny):
    """The calls object the SPO method keeps for the whole run (eager here) changes nothing."""
    from spo_fast.diffusion.rollout import RolloutCalls
    from spo_fast.reward.scorers import ColorScorer

    scorer = ColorScorer()
    calls = RolloutCalls(tiny["comp"].unet, tiny["decode"], scorer)
    schedule = DDIMSchedule.from_scheduler(tiny["comp"].scheduler, 4)
    spo = SPOConfig(k=2, divert_start_step=2, threshold=0.0)
    sampling = SamplingConfig(num_steps=4, eta=1.0, guidance_scale=GUIDANCE)
    bufs = [rollout(tiny["comp"].unet, schedule, tiny["cond"], tiny["uncond"], scorer, scorer.prepare(PROMPTS),
                    tiny["decode"], tiny["noise"].clone(), spo, sampling, torch.Generator().manual_seed(2), calls=c)
            for c in (calls, calls, None)]
    for b in bufs[1:]:
        assert torch.equal(b.x_prev, bufs[0].x_prev) and torch.equal(b.valid, bufs[0].valid)


def test_rollout_loop_reads_nothing_on_host(tiny, monkeypatch):
    """No ``.item()``, ``.tolist()``, ``int()``, ``float()`` or ``bool()`` of a tensor anywhere in a whole rollout
    (with the RNG state made up front): what a captured CUDA graph could not replay and what would sync a GPU."""
    from spo_fast.reward.scorers import ColorScorer

    scorer = ColorScorer()
    schedule = DDIMSchedule.from_scheduler(tiny["comp"].scheduler, 4)
    spo = SPOConfig(k=2, divert_start_step=1, num_inner_steps=1, threshold=0.0)
    sampling = SamplingConfig(num_steps=4, eta=1.0, guidance_scale=GUIDANCE)
    prepared, state = scorer.prepare(PROMPTS), rng_state(3)
    reads = []

    def host_read(name):
        def read(self, *a, **kw):
            reads.append(name)
            raise AssertionError(f"host read: Tensor.{name}")
        return read

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read(name))
    try:
        buf = rollout(tiny["comp"].unet, schedule, tiny["cond"], tiny["uncond"], scorer, prepared, tiny["decode"],
                      tiny["noise"].clone(), spo, sampling, None, state=state)
    finally:
        monkeypatch.undo()
    assert reads == [] and buf.valid.shape == (3, B)


def test_the_rollout_scores_the_unclamped_decoder_output(tmp_path):
    """As the official SPO pipeline: the rollout's scorer gets the decoder's raw output, and clamps where its own
    preprocessing says (a converted official SPM clamps after resizing, spo_fast's own before). The grids and the
    evaluation still see images clamped to [-1, 1]."""
    from accelerate import Accelerator

    from spo_fast.core import trainer
    from spo_fast.core.config import load_config
    from spo_fast.methods.spo import SPO

    cfg = load_config("toy_spo", [f"log.output_dir={tmp_path}", "log.report_to=none"])
    method = SPO()
    method.preflight(cfg)
    acc = Accelerator(cpu=True)
    s = trainer.build(cfg, acc)
    method.setup(cfg, s, acc)
    x = torch.linspace(-2, 2, 3 * 24 * 24).view(1, 3, 24, 24)  # the toy base is pixel space: decode is identity
    assert torch.equal(method.decode(x), x)
    assert torch.equal(trainer.decoder(s.comp)(x), x.clamp(-1, 1))
