"""Prompt sets and the deterministic, resumable prompt sampler."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from spo_fast.core.config import ConfigError
from spo_fast.reward.scorers import COLORS

_SHAPES = ("circle", "square", "triangle", "star", "ball", "flower", "car", "house")


def builtin_toy_prompts() -> list[str]:
    """96 compositional prompts: 12 colours x 8 objects ("a red circle")."""
    return [f"a {c} {s}" for c, s in itertools.product(COLORS, _SHAPES)]


TABLE_SUFFIXES = (".parquet", ".tsv", ".csv", ".json")
_DEFAULT_COLUMNS = ("caption", "prompt", "Prompt", "text")  # Pick-a-Pic, HPSv2-style lists, PartiPrompts


def load_prompts(spec: str, key: str = "data.prompts") -> list[str]:
    """``builtin:toy``, ``toyworld:train|heldout|test|validation``, or a local file: UTF-8 text with one prompt per
    line (blank lines ignored), or a table: ``.parquet`` (e.g. Pick-a-Pic's captions), ``.tsv``/``.csv`` with a header
    (e.g. PartiPrompts' ``Prompt`` column) or ``.json`` (a list of prompts, e.g. HPSv2's benchmark files, or of
    objects). A table's column is ``FILE:COLUMN``, by default the first of caption, prompt, Prompt, text it has; its
    prompts are de-duplicated in order (Pick-a-Pic repeats a caption for every pair of it). ``test`` and ``validation``
    (64 held-out prompts each, the same count of every colour; ``world.test_prompts``) are the toy world's evaluation
    splits. ``key`` is how the
    errors name the option (``data.prompts``, ``--prompts``)."""
    if spec == "builtin:toy":
        return builtin_toy_prompts()
    if spec.startswith("toyworld:"):
        from spo_fast.toyworld import world

        name = spec.split(":", 1)[1]
        named = {"test": world.test_prompts, "validation": world.validation_prompts}
        if name not in ("train", "heldout", *named):
            raise ConfigError(f"{key}={spec!r}: unknown toy-world split; accepted: toyworld:train, toyworld:heldout, "
                              "toyworld:test, toyworld:validation")
        return named[name]() if name in named else world.prompts(name)
    if spec.startswith("builtin:"):
        raise ConfigError(f"{key}={spec!r}: unknown built-in prompt set; accepted: builtin:toy, toyworld:train, "
                          "toyworld:heldout or a file path")
    head, sep, column = spec.rpartition(":")
    if sep and head.lower().endswith(TABLE_SUFFIXES) and "/" not in column:
        spec_path = head
    else:
        spec_path, column = spec, ""
    path = Path(spec_path).expanduser()
    fix = ("give a UTF-8 text file with one prompt per line, a .parquet/.tsv/.csv/.json table of prompts, or "
           "builtin:toy / toyworld:heldout")
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{key}={spec!r}: {what}; {fix}")
    if path.suffix.lower() in TABLE_SUFFIXES:
        prompts = _table_prompts(path, column, f"{key}={spec!r}")
    else:
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise ConfigError(f"{key}={spec!r}: cannot read it as UTF-8 text ({why}); {fix}") from e
    if not prompts:
        table = path.suffix.lower() in TABLE_SUFFIXES
        state = "is empty" if not path.stat().st_size else \
            "holds no prompts (only empty cells)" if table else "holds only blank lines"
        raise ConfigError(f"{key}={spec!r}: the file {state}; write one prompt per line")
    return prompts


def _table_prompts(path: Path, column: str, what: str) -> list[str]:
    """The de-duplicated non-empty prompts of one column of a parquet, tsv/csv or json table."""
    import csv
    import json

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            rows = None
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ConfigError(f"{what}: expected a JSON list of prompts (or of objects), got a "
                                  f"{type(data).__name__}")
            if all(isinstance(x, str) for x in data):
                return list(dict.fromkeys(x.strip() for x in data if x.strip()))
            rows = [x for x in data if isinstance(x, dict)]
            names = list(dict.fromkeys(k for r in rows for k in r))
        else:
            with open(path, encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
            names = list(rows[0]) if rows else []
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:  # pyarrow's errors are ValueErrors/OSErrors
        raise ConfigError(f"{what}: cannot be read as a {suffix[1:]} table of prompts ({e})") from e
    col = column or next((c for c in _DEFAULT_COLUMNS if c in names), "")
    if col not in names:
        want = f"column {column!r}" if column else f"a column named one of {', '.join(_DEFAULT_COLUMNS)}"
        raise ConfigError(f"{what}: expected {want}; the table has {', '.join(map(str, names[:12])) or 'none'} "
                          "(choose one with FILE:COLUMN)")
    if rows is None:
        import pyarrow.parquet as pq

        values = pq.read_table(path, columns=[col]).column(col).to_pylist()
    else:
        values = [r.get(col) for r in rows]
    return list(dict.fromkeys(str(v).strip() for v in values if v is not None and str(v).strip()))


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
