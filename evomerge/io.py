"""Reading and writing user files: YAML read into one clear error line, pydantic validation
reported as one line, and atomic file and directory writes (a reader never sees a
half-written result)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import ConfigError, EvomergeError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final`` only if the block succeeds.

    On any error the temporary directory is removed, so no partial output is ever left behind.
    """
    final = Path(final)
    if final.exists() and not overwrite and any(final.iterdir()):
        raise EvomergeError(f"{final}: output directory exists and is not empty; pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_yaml(path: str | Path) -> Any:
    return _load(path, yaml.safe_load)


def load_yaml_documents(path: str | Path) -> list[Any]:
    """Every non-empty document of a (multi-document) YAML file."""
    return [d for d in _load(path, lambda text: list(yaml.safe_load_all(text))) if d is not None]


def _load(path: str | Path, parse) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found")
    try:
        return parse(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}:{loc}: malformed YAML: {problem}") from None


def format_validation_error(e: ValidationError) -> str:
    """The first pydantic error as one line: ``field.path: message``, in a user's words."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = (err["msg"].removeprefix("Value error, ")
           .replace("Field required", "required key is missing")
           .replace("Extra inputs are not permitted", "unknown key (check the spelling)"))
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{loc}: {msg}{more}"


def parse_model(cls: type[BaseModel], data: Any, where: str):
    """Validate ``data`` as ``cls`` (a recipe, a search config, ...) or raise one clear line."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation_error(e)}") from None
