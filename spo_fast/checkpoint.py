"""Atomic, resumable checkpoints.

Layout: ``<output_dir>/checkpoints/iter_<N>/`` with
  trainable.safetensors   the trained parameters only (LoRA, or the UNet for full fine-tuning)
  optimizer.pt, lr_scheduler.pt, scaler.pt (fp16 only)
  rng_rank<r>.pt          python/numpy/torch(/cuda) RNG states of each process
  state.json              iteration, optimizer step, world size
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
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^iter_(\d+)$")


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


def save_checkpoint(accelerator, output_dir: str | Path, iteration: int, opt_step: int, model: torch.nn.Module,
                    optimizer, lr_scheduler, keep: int) -> Path:
    """Write checkpoint ``iter_<iteration>`` atomically (every process calls this)."""
    root = checkpoint_root(output_dir)
    final = root / f"iter_{iteration:07d}"
    tmp = root / f"iter_{iteration:07d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"iteration": iteration, "opt_step": opt_step, "world_size": accelerator.num_processes}))
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


def load_checkpoint(accelerator, path: Path, model: torch.nn.Module, optimizer, lr_scheduler) -> dict:
    """Restore what ``save_checkpoint`` wrote; returns state.json. Raises ValueError on a mismatch."""
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                         f"{accelerator.num_processes}; resume with the same number of processes "
                         "(the data order and the per-rank noise depend on it)")
    saved = load_file(str(path / "trainable.safetensors"), device=str(next(model.parameters()).device))
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
    unknown = sorted(n for n in saved if n not in params)
    if missing or unknown:
        raise ValueError(f"checkpoint {path} does not match the model (LoRA rank/targets or full fine-tuning "
                         f"changed?): missing {missing[:3]}, unexpected {unknown[:3]}")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=False))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng = path / f"rng_rank{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state
