"""Strict JSON for every file the project writes: a non-finite float (NaN, inf) becomes ``null``.

Python's ``json`` writes bare ``NaN``/``Infinity`` by default, which strict parsers (JavaScript, jq, most other
languages) reject; a value that is not a number here (the seed spread of one seed, a skipped step's gradient norm)
is "no value", so it is written as ``null``.
"""
from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (at any depth of dicts, lists and tuples) replaced by ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`finite` ``(obj)`` with ``allow_nan=False`` (anything non-finite left is a bug)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)

