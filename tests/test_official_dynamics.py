"""The recipes named after the paper (``sd15_spo``, ``sdxl_spo``) train as the official SPO code does wherever a
difference changes the update, and each of our improvements is one key away:

- gradient accumulation across rollouts (``train.accumulate_across_iterations``): the official accelerate counter
  runs across rollouts, so a gradient can stay pending into the next rollout;
- micro-batch weighting (``train.loss_weighting``): the official code divides each micro-batch's mean loss by the
  accumulation steps, whatever its number of pairs;
- SDXL micro-batches (``spo.micro_batches``): the official code shuffles shared and not-shared transitions together;
- gradient clipping (``train.max_grad_norm``): the official clipping is a no-op.

- several processes (``spo.process_split``): the official code gathers every process's valid transitions and gives
  each an equal share.

The reference for the accumulation is written out here from accelerate's documented semantics (the official trainer
wraps every micro-batch in ``accelerator.accumulate``, backpropagates ``loss / gradient_accumulation_steps`` and
steps when the counter, which its data-loader workaround never resets, reaches a multiple of the steps)."""
from types import SimpleNamespace

import pytest
import torch

from spo_fast.core.config import ConfigError, load_config
from spo_fast.core.trainer import MicroBatch, Work, train_iteration
from spo_fast.kernels.spo_loss import LossOutput


class _Method:
    """Micro-batches (x (m, d), mask (m,)) whose per-pair loss is softplus(x_i . w): nonlinear in w, so how the
    micro-batches are grouped into optimizer steps changes the result."""

    def __init__(self, w):
        self.w = w

    def loss(self, mb):
        x, m = mb.data
        per = torch.nn.functional.softplus(x @ self.w)
        return LossOutput((per * m).sum() / m.sum().clamp(min=1), torch.zeros(()), per, per)


def _rollouts(n_rollouts=2, n_micro=3, m=4, d=3, seed=0):
    """n_rollouts lists of n_micro (x, mask) micro-batches; masks with 1..m valid pairs (the last one short)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_rollouts):
        batches = []
        for j in range(n_micro):
            x = torch.randn(m, d, generator=g)
            n = m if j < n_micro - 1 else 1 + int(torch.randint(0, m - 1, (1,), generator=g))
            batches.append((x, (torch.arange(m) < n).float()))
        out.append(batches)
    return out


def _ours(cfg, rollouts, lr=0.1, d=3):
    """Train with our trainer (``train_iteration``, one call per rollout); returns (w, optimizer steps, s)."""
    from accelerate import Accelerator

    w = torch.nn.Parameter(torch.linspace(-0.5, 0.5, d))
    opt = torch.optim.Adam([w], lr=lr)
    s = SimpleNamespace(unet=torch.nn.Linear(1, 1), params=[w], optimizer=opt,
                        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    method = _Method(w)
    acc = Accelerator(cpu=True)
    steps = 0
    for batches in rollouts:
        micro = [MicroBatch((x, mk), int(mk.sum())) for x, mk in batches]
        steps += train_iteration(cfg, s, acc, method, Work(micro, {}, 1))["steps"]
    return w.detach().clone(), steps, s


def _official(rollouts, accum, lr=0.1, d=3):
    """The official accumulation: every micro-batch's mean loss / accum is backpropagated; the counter runs across
    rollouts; a step every accum micro-batches; no clipping; a gradient pending at the end is never applied."""
    w = torch.nn.Parameter(torch.linspace(-0.5, 0.5, d))
    opt = torch.optim.Adam([w], lr=lr)
    counter, steps = 0, 0
    for batches in rollouts:
        for x, mk in batches:
            per = torch.nn.functional.softplus(x @ w)
            ((per * mk).sum() / mk.sum() / accum).backward()
            counter += 1
            if counter % accum == 0:
                opt.step()
                opt.zero_grad()
                steps += 1
    return w.detach().clone(), steps


def test_sdxl_recipe_accumulates_across_rollouts_as_the_official_code():
    """2 rollouts of 3 micro-batches, grad-accum 2: the official code takes 3 optimizer steps (the second one
    spans the two rollouts); the official SDXL recipe here takes the same 3 steps and ends on the same weights."""
    cfg = load_config("sdxl_spo")
    assert cfg.train.grad_accum == 2
    rollouts = _rollouts()
    w_ref, steps_ref = _official(rollouts, 2)
    w, steps, s = _ours(cfg, rollouts)
    assert steps_ref == 3 and steps == 3
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
    assert s.pending.micro == 0  # 6 micro-batches, accumulation 2: nothing left over


def test_a_gradient_stays_pending_into_the_next_rollout():
    """3 micro-batches per rollout, accumulation 2: after the first rollout one micro-batch's gradient waits; the
    second rollout's first micro-batch completes that step. After 1 rollout: 1 step, 1 micro-batch pending."""
    cfg = load_config("sdxl_spo")
    rollouts = _rollouts(n_rollouts=1)
    w_ref, steps_ref = _official(rollouts, 2)
    w, steps, s = _ours(cfg, rollouts)
    assert steps == steps_ref == 1 and s.pending.micro == 1
    assert s.params[0].grad is not None and s.params[0].grad.abs().sum() > 0  # the pending gradient is kept
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)


def test_ours_ends_each_iteration_with_a_short_step():
    """``train.accumulate_across_iterations=false`` (ours): 2 rollouts of 3 micro-batches, accumulation 2, give 4
    steps (the last of each rollout has one micro-batch), and differ from the official trajectory."""
    cfg = load_config("sdxl_spo", ["train.accumulate_across_iterations=false"])
    rollouts = _rollouts()
    w, steps, s = _ours(cfg, rollouts)
    w_ref, _ = _official(rollouts, 2)
    assert steps == 4 and s.pending.micro == 0 and s.params[0].grad is None
    assert not torch.allclose(w, w_ref, atol=1e-5)


def test_pairs_weighting_across_rollouts_is_the_mean_over_the_steps_pairs():
    """``train.loss_weighting=pairs`` with accumulation across rollouts: a step that spans two rollouts minimises the
    mean over its valid pairs (the gradient is rescaled once the step's pairs are known). SGD with lr 1 from 0 and a
    loss linear in w: each step moves w by minus the mean of its valid pairs' x."""
    from accelerate import Accelerator

    cfg = load_config("sdxl_spo", ["train.loss_weighting=pairs", "train.max_grad_norm=0"])
    rollouts = _rollouts(n_rollouts=2, n_micro=3)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=1.0)
    s = SimpleNamespace(unet=torch.nn.Linear(1, 1), params=[w], optimizer=opt,
                        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))

    class Linear(_Method):
        def loss(self, mb):
            x, m = mb.data
            per = x @ self.w
            return LossOutput((per * m).sum() / m.sum().clamp(min=1), torch.zeros(()), per, per)

    method, acc, expected = Linear(w), Accelerator(cpu=True), torch.zeros(3)
    for batches in rollouts:
        train_iteration(cfg, s, acc, method, Work([MicroBatch((x, mk), int(mk.sum())) for x, mk in batches], {}, 1))
    flat = [b for r in rollouts for b in r]
    for i in range(0, len(flat), 2):  # steps of 2 micro-batches across the rollouts
        expected -= torch.cat([x[mk.bool()] for x, mk in flat[i:i + 2]]).mean(0)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)


def test_optimizer_groups_with_pending_micro_batches():
    from spo_fast.core.trainer import optimizer_groups

    mbs = list(range(5))
    assert optimizer_groups(mbs, 2) == [[0, 1], [2, 3], [4]]
    assert optimizer_groups(mbs, 2, pending=1) == [[0], [1, 2], [3, 4]]
    assert optimizer_groups(mbs, 3, pending=2) == [[0], [1, 2, 3], [4]]
    assert optimizer_groups([], 2, pending=1) == []


def test_paper_recipes_are_the_official_dynamics_and_ours_is_one_key_away():
    for name in ("sd15_spo", "sdxl_spo"):
        c = load_config(name)
        assert c.train.max_grad_norm == 0  # the official clipping is a no-op
        assert c.train.loss_weighting == "micro_batches" and c.train.accumulate_across_iterations
        assert c.spo.micro_batches == "mixed" and c.spo.process_split == "gather"
        assert c.scorer.dtype == "fp32"  # the official SPM runs in fp32 (benchmarks/spm_precision.py)
    toy = load_config("toy_spo")  # our defaults elsewhere
    assert toy.train.max_grad_norm == 1.0 and toy.train.loss_weighting == "pairs"
    assert not toy.train.accumulate_across_iterations and toy.spo.micro_batches == "split"
    assert toy.spo.process_split == "own"


@pytest.mark.parametrize("override, accepted", [
    ("train.loss_weighting=mean", "pairs, micro_batches"),
    ("spo.micro_batches=shuffled", "split, mixed"),
    ("spo.process_split=scatter", "own, gather"),
    ("train.accumulate_across_iterations=maybe", "true or false"),
])
def test_new_keys_are_validated(override, accepted):
    with pytest.raises(ConfigError) as e:
        load_config("toy_spo", [override])
    assert override.split("=")[1] in str(e.value) and accepted in str(e.value)


def test_the_new_keys_cannot_change_on_resume():
    from spo_fast.core.config import to_dict
    from spo_fast.core.trainer import resume_changes

    saved = to_dict(load_config("sdxl_spo"))
    for override in ("train.accumulate_across_iterations=false", "train.loss_weighting=pairs",
                     "spo.micro_batches=split", "spo.process_split=own"):
        unsafe, _ = resume_changes(saved, load_config("sdxl_spo", [override]))
        assert [k for k, *_ in unsafe] == [override.split("=")[0]]


# ----------------------------------------------------------------------------- SDXL micro-batches
def _buffer(valid, shared):
    from spo_fast.diffusion.rollout import RolloutBuffer

    S, B = valid.shape
    x = torch.randn(S, 2, B, 1, 2, 2)
    x[torch.tensor(shared), 1] = x[torch.tensor(shared), 0]  # shared slots: both sides start at one x_t
    return RolloutBuffer(x, x.clone(), torch.arange(S) * 50 + 50, valid, torch.zeros(S, B), torch.zeros(S, B),
                         shared, torch.zeros(B, 2), torch.zeros(B, 1, 2, 2))


def test_mixed_micro_batches_give_the_official_count():
    """5 valid shared and 15 valid not-shared transitions in micro-batches of 2: split gives 3 + 8 = 11, the
    official (mixed) ceil(20 / 2) = 10; each valid transition is in exactly one micro-batch either way."""
    from spo_fast.methods.spo import compact_valid

    shared = [True, False, False, False] * 2  # the SDXL recipe's pattern: branch, 3 inner steps
    valid = torch.zeros(8, 5, dtype=torch.bool)
    valid[0, :3] = valid[4, :2] = True  # 5 shared
    valid[1, :5] = valid[2, :5] = valid[5, :5] = True  # 15 not shared
    buf = _buffer(valid, shared)
    split = compact_valid(buf, 2, torch.Generator().manual_seed(0))
    mixed = compact_valid(buf, 2, torch.Generator().manual_seed(0), mixed=True)
    assert len(split) == 11 and len(mixed) == 10
    for batches in (split, mixed):
        seen = [p for _, slot, b, n in batches for p in zip(slot[:n].tolist(), b[:n].tolist())]
        assert sorted(seen) == sorted(map(tuple, valid.nonzero().tolist()))
    for is_shared, slot, _, _ in mixed:  # shared only when every transition in it is
        assert is_shared == all(shared[int(i)] for i in slot)
    # without not-shared slots (SD1.5) the two are the same micro-batches
    sd15 = _buffer(valid, [True] * 8)
    a = compact_valid(sd15, 3, torch.Generator().manual_seed(1))
    b = compact_valid(sd15, 3, torch.Generator().manual_seed(1), mixed=True)
    assert [(s, x.tolist(), y.tolist(), n) for s, x, y, n in a] == [(s, x.tolist(), y.tolist(), n) for s, x, y, n in b]


# ----------------------------------------------------------------------------- a pending gradient and checkpoints
def test_resume_with_a_pending_gradient_continues_the_same_trajectory(tmp_path):
    """Accumulation 3 across iterations of 8 micro-batches: after iteration 2, one micro-batch's gradient is
    pending. Its checkpoint keeps that gradient (each process's, with the step's counts), so stopping there and
    resuming gives bit for bit the weights, the pending gradient and the metrics of the uninterrupted run. The
    final weights never include a pending gradient (the official code drops it at the end)."""
    import json

    from safetensors.torch import load_file

    from spo_fast.train import run

    fast = ["sampling.num_steps=6", "spo.divert_start_step=2", "spo.k=2", "train.batch_size=2",
            "train.train_batch_size=1", "scorer.scale=1000", "spo.threshold=0.0", "train.lr=1e-2",
            "log.report_to=none", "log.progress=false", "log.sample_prompts=0", "train.grad_accum=3",
            "train.accumulate_across_iterations=true", "train.loss_weighting=micro_batches"]

    def cfg(out, n):
        return load_config("tiny_sd15_color", fast + [f"log.output_dir={out}", f"train.max_iterations={n}",
                                                      "checkpoint.every=1"])

    _, s_a = run(cfg(tmp_path / "a", 3))
    run(cfg(tmp_path / "b", 2))
    ck = tmp_path / "b" / "checkpoints" / "iter_0000002"
    state = json.loads((ck / "state.json").read_text())
    assert state["pending_micro"] > 0 and (ck / "pending_rank0.pt").is_file()
    # the final weights of the 2-iteration run are its checkpoint's: the pending gradient is not applied
    lora_b = load_file(str(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora_b
    summary, s_b = run(cfg(tmp_path / "b", 3))  # a longer run resumes and trains on
    assert summary["iteration"] == 3
    wa = load_file(str(tmp_path / "a" / "checkpoints" / "iter_0000003" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "iter_0000003" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert s_a.pending.micro == s_b.pending.micro
    ga = {n: p.grad for n, p in s_a.raw_unet.named_parameters() if p.requires_grad}
    gb = {n: p.grad for n, p in s_b.raw_unet.named_parameters() if p.requires_grad}
    assert all((ga[n] is None and gb[n] is None) or torch.equal(ga[n], gb[n]) for n in ga)

    def rows(out):
        return [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "samples_per_s")}
                for x in (out / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    # 8 micro-batches of 1 per iteration (2 prompts x 4 branching steps, all valid), accumulation 3 across
    # iterations: steps after micro-batches 3, 6 | 9, 12, 15 | 18, 21, 24 (per iteration: 8 // 3 = 2 ours + 1 short)
    assert [r["opt_steps"] for r in rows(tmp_path / "a")] == [2, 3, 3]


# ----------------------------------------------------------------------------- several processes
def test_the_official_split_gives_each_process_an_equal_share_of_all_valid_transitions():
    """``spo.process_split=gather``: the gathered rollouts' 21 valid transitions, 4 processes: each takes 5 of one
    shared shuffle (1 dropped), disjoint; with 3 valid transitions (< 4 processes) nobody trains; one process is
    ``own`` exactly."""
    from spo_fast.methods.spo import compact_valid

    shared = [True, False, False, False] * 2
    valid = torch.zeros(8, 12, dtype=torch.bool)
    valid.view(-1)[torch.randperm(96, generator=torch.Generator().manual_seed(3))[:21]] = True
    buf = _buffer(valid, shared)
    total = int(valid.sum())
    assert total == 21
    for mixed in (True, False):
        seen = []
        for rank in range(4):
            batches = compact_valid(buf, 2, torch.Generator().manual_seed(7), mixed=mixed, world=4, rank=rank)
            mine = [p for _, slot, b, n in batches for p in zip(slot[:n].tolist(), b[:n].tolist())]
            assert len(mine) == total // 4
            if mixed:
                assert len(batches) == -(-(total // 4) // 2)
            seen += mine
        assert len(set(seen)) == 4 * (total // 4) and set(seen) <= set(map(tuple, valid.nonzero().tolist()))
    few = torch.zeros(8, 12, dtype=torch.bool)
    few[0, :3] = True
    assert all(compact_valid(_buffer(few, shared), 2, torch.Generator().manual_seed(7), world=4, rank=r) == []
               for r in range(4))
    one = compact_valid(buf, 2, torch.Generator().manual_seed(7), mixed=True, world=1)
    assert sum(n for *_, n in one) == total


@pytest.mark.slow
def test_two_processes_gather_their_rollouts_as_the_official_code(tmp_path):
    """Two gloo processes with ``spo.process_split=gather``: each trains on total // 2 of both rollouts' valid
    transitions (``valid_pairs`` over both = total minus the odd one), in ceil(share / 2) micro-batches each: one
    optimizer step per micro-batch (accumulation 1)."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "gather"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spo_fast.train",
           "tiny_sd15_color", "sampling.num_steps=6", "spo.divert_start_step=2", "spo.k=2", "train.batch_size=2",
           "train.train_batch_size=2", "scorer.scale=1000", "spo.threshold=0.3", "log.report_to=none",
           "log.progress=false", "log.sample_prompts=0", "spo.process_split=gather", "train.max_iterations=3",
           f"log.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        total = round(r["valid_ratio"] * 2 * 8)  # the mean of the two processes' ratios; 8 transitions each
        share = total // 2 if total >= 2 else 0
        assert r["valid_pairs"] == 2 * share
        assert r["opt_steps"] == -(-share // 2)
