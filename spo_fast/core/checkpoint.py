"""Atomic, resumable checkpoints.

Layout: ``<output_dir>/checkpoints/iter_<N>/`` with
  trainable.safetensors   the trained parameters only (LoRA, or the UNet for full fine-tuning)
  optimizer.pt, lr_scheduler.pt, scaler.pt (fp16 only)
  rng_rank<r>.pt          python/numpy/torch(/cuda) RNG states of each process
  pending_rank<r>.pt      only when an optimizer step is half accumulated (train.accumulate_across_iterations):
                          each process's accumulated gradients and the step's counts (state.json: pending_micro)
  state.json              iteration, optimizer step, world size
  config.yaml             the resolved config of the run that wrote it (compared on resume: spo_fast.core.trainer)
A checkpoint is written to ``iter_<N>.tmp`` and renamed when complete, so a crash or kill at any
moment leaves either the previous checkpoints or the new one, never a half-written one.
Batch contents and rollout noise are pure functions of (seed, iteration, rank), so the iteration
number is the whole data position: resuming replays nothing.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from spo_fast.core import jsonio
from spo_fast.core.errors import DivergedError, InputError, WeightsFileError, check_weights_file

_NAME = re.compile(r"^iter_(\d+)$")
CONFIG_FILE = "config.yaml"


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from: unreadable, incomplete, or made for another setup."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (``*.tmp`` leftovers of a crash are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise DivergedError when any tensor of ``state`` holds inf or NaN (one host sync for all of them)."""
    if state and not bool(torch.stack([torch.isfinite(t).all() for t in state.values()]).all()):
        bad = [n for n, t in state.items() if not torch.isfinite(t).all()]
        raise DivergedError(f"{len(bad)} of the {len(state)} trained tensors hold inf or NaN (e.g. {bad[0]}); "
                            f"{what} is not written. Lower train.lr or check the inputs, then resume from the last "
                            "checkpoint (checkpoint.resume=auto) or start again")


def save_checkpoint(accelerator, output_dir: str | Path, iteration: int, opt_step: int, model: torch.nn.Module,
                    optimizer, lr_scheduler, keep: int, config: dict | None = None, pending=None) -> Path:
    """Write checkpoint ``iter_<iteration>`` atomically (every process calls this); ``config``: the run's resolved
    config (``config.to_dict``), recorded for the comparison on resume. ``pending``: the trainer's ``Pending``
    step; when it holds micro-batches, each process's accumulated gradients (not yet all-reduced: DDP's no_sync)
    and counts are saved with it, so a resumed run completes that step as the uninterrupted run does. Weights with
    inf/NaN are never written (DivergedError, before anything is written)."""
    trainable = trainable_state(model)
    check_finite(trainable, f"checkpoint iter_{iteration:07d}")
    root = checkpoint_root(output_dir)
    final = root / f"iter_{iteration:07d}"
    tmp = root / f"iter_{iteration:07d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    pending_micro = pending.micro if pending is not None else 0
    if pending_micro:
        grads = {n: p.grad.detach().contiguous() for n, p in model.named_parameters()
                 if p.requires_grad and p.grad is not None}
        torch.save({"state": pending.state(), "grads": grads}, tmp / f"pending_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if config is not None:
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(jsonio.dumps(
            {"iteration": iteration, "opt_step": opt_step, "world_size": accelerator.num_processes,
             "pending_micro": pending_micro}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.iterdir():  # make the contents durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, checked; raises CheckpointError naming the file."""
    f = path / "state.json"
    try:
        state = json.loads(f.read_text())
        for key in ("iteration", "opt_step", "world_size"):
            int(state[key])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f} is unreadable or incomplete ({type(e).__name__}: {e}); resume from another "
                              "checkpoint (checkpoint.resume=<output_dir>/checkpoints/iter_N), delete this one, or "
                              "start afresh (checkpoint.resume=never)") from e
    return state


def read_config(path: Path) -> dict | None:
    """The config recorded in a checkpoint (None for a checkpoint written before configs were recorded)."""
    f = path / CONFIG_FILE
    if not f.is_file():
        return None
    try:
        data = yaml.safe_load(f.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{f} is unreadable ({e}); delete the checkpoint or use checkpoint.resume=never") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{f} is not a config mapping; delete the checkpoint or use checkpoint.resume=never")
    return data


def check_files(path: Path) -> dict:
    """Every cheap check of a checkpoint before any model is built: state.json, the recorded config, and the weights,
    optimizer and scheduler files complete (headers only). Returns state.json."""
    state = read_state(path)
    read_config(path)
    pending = [f"pending_rank{r}.pt" for r in range(int(state["world_size"]))] if state.get("pending_micro") else []
    for name in ("trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", *pending):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}; resume from another checkpoint, delete this one, "
                                  "or start afresh (checkpoint.resume=never)")
        try:
            check_weights_file(f, "checkpoint")
        except WeightsFileError as e:
            raise CheckpointError(f"{e}; resume from another checkpoint, delete this one, or start afresh "
                                  "(checkpoint.resume=never)") from e
    return state


def load_checkpoint(accelerator, path: Path, model: torch.nn.Module, optimizer, lr_scheduler, pending=None) -> dict:
    """Restore what ``save_checkpoint`` wrote; returns state.json. Raises CheckpointError on a mismatch.
    ``pending``: the trainer's ``Pending``, restored with the accumulated gradients when the checkpoint holds some.

    The optimizer's hyperparameters (lr, betas, eps, weight decay, ...) and the schedule's base lr stay those of the
    current config: the checkpoint supplies the moments and the step counts only, so a changed ``train.lr`` applies
    from the resumed step on."""
    state = read_state(path)
    if state["world_size"] != accelerator.num_processes:
        raise CheckpointError(f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                         f"{accelerator.num_processes}; resume with the same number of processes "
                         "(the data order and the per-rank noise depend on it)")
    saved = load_file(str(path / "trainable.safetensors"), device=str(next(model.parameters()).device))
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
    unknown = sorted(n for n in saved if n not in params)
    if missing or unknown:
        raise CheckpointError(f"checkpoint {path} does not match the model (LoRA rank/targets or full fine-tuning "
                         f"changed?): missing {missing[:3]}, unexpected {unknown[:3]}")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t)
    hparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=False))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"the optimizer state in {path} does not fit this run's optimizer ({e}); resume with the "
                              "same train.optimizer, or start afresh (checkpoint.resume=never)") from e
    for group, own in zip(optimizer.param_groups, hparams):
        group.update(own)
    base = [own.get("initial_lr", own["lr"]) for own in hparams]
    lr_scheduler.base_lrs = base
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if lambdas is not None:  # LambdaLR (diffusers' schedules): the lr at the resumed step, from the current base lr
        lrs = [b * fn(lr_scheduler.last_epoch) for b, fn in zip(base, lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        lr_scheduler._last_lr = lrs
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng = path / f"rng_rank{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    if state.get("pending_micro") and pending is not None:
        f = path / f"pending_rank{accelerator.process_index}.pt"
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {f.name} (an optimizer step it had half accumulated); "
                                  "resume from another checkpoint, or start afresh (checkpoint.resume=never)")
        saved_pending = torch.load(f, weights_only=False)
        grads = saved_pending["grads"]
        if not grads or any(n not in params or not params[n].requires_grad for n in grads):
            raise CheckpointError(f"the accumulated gradients in {f} do not match the model's trained parameters; "
                                  "resume from another checkpoint, or start afresh (checkpoint.resume=never)")
        for n, g in grads.items():
            params[n].grad = g.to(device=params[n].device, dtype=params[n].dtype)
        pending.load(saved_pending["state"])
    return state
