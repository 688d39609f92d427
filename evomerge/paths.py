"""Where evomerge keeps what it can rebuild: built zoos, dataset caches, benchmark models."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    """``$EVOMERGE_CACHE``, else ``<repo>/.cache`` in a checkout, else ``~/.cache/evomerge``."""
    env = os.environ.get("EVOMERGE_CACHE")
    if env:
        return Path(env).expanduser()
    if (REPO / "pyproject.toml").is_file():
        return REPO / ".cache"
    return Path.home() / ".cache" / "evomerge"
