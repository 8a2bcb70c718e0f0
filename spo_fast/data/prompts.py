"""Prompt sets and the deterministic, resumable prompt sampler."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from ..config import ConfigError
from ..scorers import COLORS

_SHAPES = ("circle", "square", "triangle", "star", "ball", "flower", "car", "house")


def builtin_toy_prompts() -> list[str]:
    """96 compositional prompts: 12 colours x 8 objects ("a red circle")."""
    return [f"a {c} {s}" for c, s in itertools.product(COLORS, _SHAPES)]


def load_prompts(spec: str) -> list[str]:
    """``builtin:toy``, ``toyworld:train|heldout|test|validation`` or a UTF-8 text file with one prompt per line
    (blank lines ignored). ``test`` (the first 64 held-out prompts) and ``validation`` (64 others) are the toy
    world's evaluation splits (``world.test_prompts``, ``world.validation_prompts``)."""
    if spec == "builtin:toy":
        return builtin_toy_prompts()
    if spec.startswith("toyworld:"):
        from ..toyworld import world

        name = spec.split(":", 1)[1]
        named = {"test": world.test_prompts, "validation": world.validation_prompts}
        if name not in ("train", "heldout", *named):
            raise ConfigError(f"prompts {spec!r}: unknown toy-world split; accepted: toyworld:train, toyworld:heldout, "
                              "toyworld:test, toyworld:validation")
        return named[name]() if name in named else world.prompts(name)
    if spec.startswith("builtin:"):
        raise ConfigError(f"data.prompts={spec!r}: unknown built-in prompt set; accepted: builtin:toy, toyworld:train, toyworld:heldout or a file path")
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "no such file"
        raise ConfigError(f"data.prompts={spec!r}: {what}; give a text file with one prompt per line "
                          "or builtin:toy")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ConfigError(f"data.prompts={spec!r}: cannot read it as UTF-8 text ({why}); give a UTF-8 text file "
                          "with one prompt per line") from e
    if not prompts:
        state = "is empty" if not path.stat().st_size else "holds only blank lines"
        raise ConfigError(f"data.prompts={spec!r}: the file {state}; write one prompt per line")
    return prompts


class PromptSampler:
    """Endless stream of prompt batches: epoch e is a permutation seeded by (seed, e).

    Batch ``i`` of process ``rank`` is a pure function of (i, rank), so resuming needs nothing but
    the iteration number: no data-loader replay.
    """

    def __init__(self, prompts: list[str], batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        self.prompts, self.batch_size, self.world, self.rank, self.seed = prompts, batch_size, world_size, rank, seed
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(len(self.prompts), generator=g).tolist()}
        return self._perm_cache[epoch]

    def batch(self, iteration: int) -> list[str]:
        """The prompts of this process for rollout ``iteration``."""
        n = len(self.prompts)
        start = (iteration * self.world + self.rank) * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, i = divmod(pos, n)
            out.append(self.prompts[self._perm(epoch)[i]])
        return out

    def iterations_for(self, epochs: float) -> int:
        """Rollout iterations that cover ``epochs`` passes over the prompts with all processes."""
        per_iter = self.batch_size * self.world
        return max(1, int(-(-epochs * len(self.prompts) // per_iter)))
