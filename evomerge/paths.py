"""Where evomerge finds what it ships and keeps what it can rebuild.

Shipped data — the search-space defaults (``search_spaces/``), the zoo's lm-eval tasks
(``evals/``) and the example configs (``examples/``) — is package data. Their editable source is
the repository's top-level folder of the same name; ``evomerge/<name>`` is a relative symlink to
it, so one lookup, ``importlib.resources.files("evomerge") / name``, finds them in a source
checkout (``PYTHONPATH=.``), an editable install and a wheel alike (the wheel build copies the
files behind the links). Code reaches them only through the functions below, never through the
repository's path. (Windows checkouts need ``git config core.symlinks true``.)

Rebuildable things (built zoos, dataset caches, benchmark models) live under :func:`cache_root`.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from evomerge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

#: The folders shipped as package data (each a symlink ``evomerge/<name> -> ../<name>``).
DATA_DIRS = ("search_spaces", "evals", "examples")

#: How a config argument names a shipped example: ``example:demo`` (see :func:`resolve_config`).
EXAMPLE_PREFIX = "example:"


def data_dir(name: str) -> Path:
    """The shipped folder ``name`` (one of :data:`DATA_DIRS`) as a real directory path."""
    if name not in DATA_DIRS:
        raise ValueError(f"unknown data folder {name!r}; one of {DATA_DIRS}")
    return Path(str(files("evomerge") / name)).resolve()


def search_spaces_dir() -> Path:
    return data_dir("search_spaces")


def evals_dir() -> Path:
    return data_dir("evals")


def examples_dir() -> Path:
    return data_dir("examples")


def example_names() -> list[str]:
    return sorted(p.stem for p in examples_dir().glob("*.yaml"))


def example_config(name: str) -> Path:
    """The shipped example config ``name`` (``demo`` or ``demo.yaml``)."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = examples_dir() / f"{stem}.yaml"
    if not path.is_file():
        raise ConfigError(f"no shipped example {name!r}; examples: {', '.join(example_names())}")
    return path


def resolve_config(arg: str | Path) -> Path:
    """A config argument → a file: ``example:NAME`` is a shipped example, anything else a path.

    A missing path that names a shipped example gets a hint, so that ``examples/ps.yaml`` typed
    outside a checkout says what to type instead.
    """
    text = str(arg)
    if text.startswith(EXAMPLE_PREFIX):
        return example_config(text[len(EXAMPLE_PREFIX):])
    path = Path(text).expanduser()
    if path.is_file():
        return path
    hint = ""
    if path.suffix in ("", ".yaml") and (examples_dir() / f"{path.stem}.yaml").is_file():
        hint = f"; the shipped example is `{EXAMPLE_PREFIX}{path.stem}`"
    raise ConfigError(f"{path}: no such config file{hint}")


def cache_root() -> Path:
    """``$EVOMERGE_CACHE``, else ``<repo>/.cache`` in a checkout, else ``~/.cache/evomerge``."""
    env = os.environ.get("EVOMERGE_CACHE")
    if env:
        return Path(env).expanduser()
    if (REPO / "pyproject.toml").is_file():
        return REPO / ".cache"
    return Path.home() / ".cache" / "evomerge"
