"""Non-finite training (NaN injection): a step whose loss or gradient norm is not finite is skipped (no weight or
optimizer-state change), counted and the run continues; train.max_bad_steps in a row stop the run with the last
good checkpoint intact and no weights written; weights with inf/NaN are never written."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from test_train import FAST, cfg_for

from spo_fast.core import trainer
from spo_fast.core.checkpoint import check_files, list_checkpoints, save_checkpoint, trainable_state
from spo_fast.core.errors import DivergedError
from spo_fast.methods.spo import SPO
from spo_fast.train import main


@pytest.fixture
def poison(monkeypatch):
    """``poison["iters"]``: the iterations whose every micro-batch gets a NaN loss (``mode="loss"``) or a finite
    loss with NaN gradients (``mode="grad"``)."""
    state = {"iters": set(), "mode": "loss", "it": -1}
    work, loss = SPO.work, SPO.loss

    def tracked_work(self, it):
        state["it"] = it
        return work(self, it)

    def poisoned_loss(self, mb):
        lo = loss(self, mb)
        if state["it"] not in state["iters"]:
            return lo
        if state["mode"] == "loss":
            return dataclasses.replace(lo, loss=lo.loss * float("nan"))
        out = lo.loss.clone()
        out.register_hook(lambda g: g * float("nan"))  # the loss stays finite, every gradient is NaN
        return dataclasses.replace(lo, loss=out)

    monkeypatch.setattr(SPO, "work", tracked_work)
    monkeypatch.setattr(SPO, "loss", poisoned_loss)
    return state


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_bad_steps_are_skipped_and_the_run_continues(tmp_path, poison, mode):
    poison.update(iters={1}, mode=mode)
    snaps = []

    def hook(it, total, s, row):
        opt_state = [dict(st) for st in s.optimizer.state.values()]
        snaps.append(({k: v.clone() for k, v in trainable_state(s.raw_unet).items()},
                      [{k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for st in opt_state]))

    cfg = cfg_for(tmp_path, "train.max_iterations=4", "train.max_bad_steps=10", "checkpoint.resume=never")
    summary, _s = trainer.run(cfg, SPO(), hook=hook)
    rows = _rows(tmp_path)
    assert [r["bad_steps"] for r in rows][:2] == [0, rows[1]["bad_steps"]] and rows[1]["bad_steps"] >= 1
    assert rows[1]["opt_steps"] == 0 and rows[1]["loss"] is None  # nothing trained in the poisoned iteration
    assert all(r["bad_steps"] == 0 and r["opt_steps"] > 0 for r in (rows[0], *rows[2:]))
    (w0, o0), (w1, o1), (w2, _), _ = snaps
    for k in w0:  # the skipped steps changed no weight ...
        assert torch.equal(w0[k], w1[k]), k
    for a, b in zip(o0, o1):  # ... and no optimizer moment or step count
        for k in a:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # training went on afterwards
    assert summary["stopped"] is False and summary["iteration"] == 4
    final = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_repeated_bad_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, poison, capsys):
    poison.update(iters={2, 3}, mode="loss")
    code = main(["tiny_sd15_color", *FAST, f"log.output_dir={tmp_path}", "train.max_iterations=4",
                 "checkpoint.every=1", "train.max_bad_steps=3"])
    captured = capsys.readouterr()
    assert code == 1
    err = [x for x in captured.err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error: stopped at iteration 3: ")
    assert "train.max_bad_steps=3" in err[0] and "iter_0000002" in err[0] and "Traceback" not in captured.err
    assert "skipped" in captured.out  # each bad iteration is reported as it happens
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["iter_0000001", "iter_0000002"]  # nothing written after the bad steps
    check_files(ckpts[-1])
    weights = load_file(str(ckpts[-1] / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "lora").exists()  # no final weights from a diverged run
    rows = _rows(tmp_path)
    assert rows[-1]["iteration"] == 3 and rows[-1]["bad_steps"] >= 3 and rows[-1]["opt_steps"] == 0


def test_weights_with_inf_or_nan_are_never_written(tmp_path):
    acc = Accelerator()
    s = trainer.build(cfg_for(tmp_path), acc)
    lora = next(p for n, p in s.raw_unet.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora[0, 0] = float("inf")
    with pytest.raises(DivergedError, match="hold inf or NaN"):
        trainer.save_weights(s, tmp_path)
    assert not (tmp_path / "lora").exists()
    with pytest.raises(DivergedError, match="checkpoint iter_0000005 is not written"):
        save_checkpoint(acc, tmp_path, 5, 5, s.raw_unet, s.optimizer, s.lr_scheduler, keep=2)
    assert not (tmp_path / "checkpoints").exists()
