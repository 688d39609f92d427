"""``--json`` output: one document on stdout, nothing else there; non-finite numbers become null."""

from __future__ import annotations

import json
import math

import typer


def finite(x) -> float | None:
    """``x`` as a float, or ``None`` when it is missing, NaN or infinite (JSON has no NaN)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _plain(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def emit_json(doc) -> None:
    """Print ``doc`` as indented JSON on stdout (strict: a NaN is a bug, not a value)."""
    typer.echo(json.dumps(doc, indent=2, allow_nan=False, default=_plain))
