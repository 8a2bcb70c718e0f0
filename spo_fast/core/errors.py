"""What every command line of spo_fast does with bad input, and the cheap checks of weights files.

The rule: a problem with what the user gave (config, files, directories, checkpoints, weights) raises an
``InputError`` whose message names the value or file (and row), what was expected and how to fix it. Each CLI's
``main`` catches ``InputError`` only, prints one line ``error: <message>`` on stderr and returns 2; anything else is
a bug and keeps its traceback. ``ArgumentParser`` gives argparse's own errors the same one-line form.

Weights files are checked from their headers before any model is built (``check_weights_file``): a safetensors file
must hold a parseable header whose tensors' byte ranges end exactly at the end of the file (a truncated download or
copy does not), a PyTorch ``.bin``/``.pt`` file must be a complete zip archive (``torch.save``'s format; the central
directory at its end is what a truncated file lacks). Whether the tensors are the ones the model needs is checked
when it loads (``check_loading_info``: missing keys and mismatched shapes name the file).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import zipfile
from pathlib import Path


class InputError(ValueError):
    """A problem with what the user gave; the message names it, says what was expected and how to fix it."""


class WeightsFileError(InputError):
    """A weights file that is truncated, not in the format its name claims, or not the model's weights."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line ``error: <prog>: <message> (see --help)`` and exit code 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def number_arg(kind: type, low: float, strict: bool = False):
    """An argparse ``type``: a finite ``kind`` >= ``low`` (> ``low`` when ``strict``), else a one-line usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {what} {'>' if strict else '>='} "
                                             f"{low:g}")
        return value
    return parse


def report(e: BaseException) -> int:
    """Print ``e`` as the one-line ``error: ...`` of the rule above; returns the exit code 2."""
    text = " ".join(str(e).split())  # one line, whatever the message holds
    print(f"error: {text}", file=sys.stderr)
    return 2


def check_writable_dir(path, name: str, error: type[InputError] = InputError) -> Path:
    """Fail before anything is built when directory ``path`` (the value of option ``name``) could not be created
    or written: it is a file, lies under a file, or its nearest existing ancestor is not writable. Creates
    nothing; returns the expanded path. Raises ``error`` naming the option and the path."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise error(f"{name}={path} is a file, not a directory; give a directory (it is created when missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"{name}={path} cannot be created: {existing} is a file, not a directory; give a path under "
                    "a writable directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == path else f"its parent {existing}"
        raise error(f"{name}={path} is not writable ({where} is not writable by this user); give a writable "
                    "directory")
    return path


# ----------------------------------------------------------------------------- weights files
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


def safetensors_header(path: str | Path, what: str = "weights") -> dict[str, dict]:
    """The tensors a safetensors file declares (name -> {"dtype", "shape", "data_offsets"}), after checking that the
    file is complete. Reads the header only. Raises WeightsFileError naming ``what`` and the file."""
    path = Path(path)
    fix = f"re-download or re-export {path.name}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WeightsFileError(f"{what} file {path} is not a safetensors file ({size} bytes, shorter than "
                                       f"its 8-byte header length); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise WeightsFileError(
                    f"{what} file {path} is truncated or not a safetensors file: its header claims {n} bytes but the "
                    f"file has {size}; {fix}")
            raw = fh.read(n)
    except OSError as e:
        raise WeightsFileError(f"{what} file {path} cannot be read ({e.strerror}); check the path and its "
                               "permissions") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("not a mapping")
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        for v in tensors.values():
            v["shape"] = list(v["shape"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise WeightsFileError(f"{what} file {path} is not a safetensors file (its header does not parse: {e}); "
                               f"{fix}") from e
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "longer than its header says"
        raise WeightsFileError(f"{what} file {path} is {state}: its tensors need {8 + n + end} bytes, the file has "
                               f"{size}; {fix}")
    return tensors


def check_weights_file(path: str | Path, what: str = "weights") -> None:
    """A cheap completeness check of one weights file (see the module docstring); raises WeightsFileError."""
    path = Path(path)
    if path.suffix == ".safetensors":
        safetensors_header(path, what)
        return
    if path.suffix in WEIGHT_SUFFIXES:
        try:
            with open(path, "rb") as fh:
                magic = fh.read(4)
        except OSError as e:
            raise WeightsFileError(f"{what} file {path} cannot be read ({e.strerror})") from e
        if magic[:2] != b"PK":
            return  # a legacy (pre-1.6) torch pickle: no cheap check; loading it reports problems
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise WeightsFileError(f"{what} file {path} is truncated or corrupt (not a complete PyTorch zip "
                                   f"archive: {e}); re-download or re-export {path.name}") from e


def check_weights_dir(directory: str | Path, what: str) -> None:
    """``check_weights_file`` on every weights file directly inside ``directory``."""
    for f in sorted(Path(directory).iterdir()):
        if f.is_file() and f.suffix in WEIGHT_SUFFIXES:
            check_weights_file(f, what)


def check_loading_info(info: dict, directory: str | Path, what: str) -> None:
    """After ``from_pretrained(..., output_loading_info=True)`` (diffusers or transformers): weights that the model
    needs but the file lacks, or of another shape, mean the file holds some other model's weights (the libraries
    would initialise them randomly and carry on). Raises WeightsFileError naming the directory and some keys."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys") or []]
    if not missing and not mismatched:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights the model needs are missing (e.g. {', '.join(missing[:3])})")
    if mismatched:
        parts.append(f"{len(mismatched)} have another shape (e.g. {', '.join(map(str, mismatched[:3]))})")
    unexpected = info.get("unexpected_keys") or []
    found = f"; it holds {len(unexpected)} other weights (e.g. {', '.join(sorted(unexpected)[:2])})" if unexpected \
        else ""
    raise WeightsFileError(f"{what} weights in {directory} are not this model's: {'; '.join(parts)}{found}. The "
                           "file may belong to another component or architecture; check that the directory's "
                           "config.json and weights come from the same model")


class DivergedError(RuntimeError):
    """Training stopped because its loss, gradients or weights went non-finite (``train.max_bad_steps``); the
    checkpoints written before are intact. The CLI prints it as one ``error: ...`` line and exits with code 1."""
