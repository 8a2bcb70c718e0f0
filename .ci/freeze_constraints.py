"""Print the exact installed versions of spo_fast's dependency tree, ``[dev]`` included, as a pip constraints file.

    python .ci/freeze_constraints.py > constraints.txt          # after the suite passed in this environment
    python .ci/freeze_constraints.py --diff constraints.txt     # what this environment has that the file does not

torch and triton are left out: they differ between the CPU wheel (torch 2.13 + triton 3.7) and a GPU image (its own
CUDA build of torch and the triton that build pins); install torch first, as the README says.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LEFT_OUT = {"torch", "triton", "spo-fast"}
EXTRAS = ("dev",)


def closure(root: str = "spo_fast", extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of every distribution ``root[extras]`` needs here, transitively."""
    seen: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, extra = todo.pop()
        dist = md.distribution(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (*extra, "")):
                continue
            key = canonicalize_name(req.name)
            if key in seen:
                continue
            try:
                seen[key] = md.version(req.name)
            except md.PackageNotFoundError:
                sys.exit(f"error: {req.name} (required by {name}) is not installed; install the project first")
            todo.append((req.name, tuple(req.extras)))
    return {k: v for k, v in sorted(seen.items()) if k not in LEFT_OUT}


def read(path: str) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diff", metavar="FILE", help="list the differences from FILE instead of printing")
    args = parser.parse_args()
    pins = closure()
    if args.diff:
        old = read(args.diff)
        for name in sorted(old.keys() | pins.keys()):
            if old.get(name) != pins.get(name):
                print(f"{name}: {old.get(name, '-')} -> {pins.get(name, '-')}")
        return 0
    print("# The exact versions of spo_fast's dependencies (with [dev]) that the whole test suite last passed with,\n"
          f"# on Python {platform.python_version()} with torch {md.version('torch')} and triton "
          f"{md.version('triton') if _installed('triton') else '-'} (both left out: install torch first).\n"
          "# Written by `python .ci/freeze_constraints.py`; `bash .ci/newest` tests the newest releases.")
    for name, version in pins.items():
        print(f"{name}=={version}")
    return 0


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
