"""Reading and writing user files: YAML read into one clear error line, pydantic validation
reported as one line, and atomic file and directory writes (a reader never sees a
half-written result).

Outputs are checked up front and failed writes become one line (:mod:`evomerge.outputs`); a
failed write removes its temporary file or directory, so no partial output is ever left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import ConfigError
from evomerge.outputs import check_output_dir, check_output_file, os_error, public_mode, publish_modes


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path (same suffix) to write; it replaces ``path`` if the block
    succeeds (a block that deletes it writes nothing). On any error it is removed; an ``OSError``
    becomes one line."""
    path = check_output_file(Path(path))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        if tmp.exists():
            os.chmod(tmp, public_mode("file"))
            os.replace(tmp, path)
    except BaseException as e:
        if isinstance(e, OSError):
            raise os_error(e, path) from None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False,
                     protect: Iterable[tuple[str, Path | str]] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final`` only if the block succeeds.

    ``protect`` lists ``(what, path)`` that ``final`` must not equal, contain or lie inside (the
    inputs). On any error the temporary directory is removed, so no partial output is ever left
    behind; an ``OSError`` becomes one line naming ``final``.
    """
    final = check_output_dir(Path(final), overwrite=overwrite, protect=protect)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        yield tmp
        publish_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            where = e.filename if e.filename and tmp is not None and str(tmp) not in str(e.filename) else final
            raise os_error(e, where, "write" if where == final else "access") from None
        raise


def load_yaml(path: str | Path) -> Any:
    """Parse a user's YAML file; a missing, unreadable, binary or malformed file is one line."""
    return _load(path, yaml.safe_load)


def load_yaml_documents(path: str | Path) -> list[Any]:
    """Every non-empty document of a (multi-document) YAML file."""
    return [d for d in _load(path, lambda text: list(yaml.safe_load_all(text))) if d is not None]


def _load(path: str | Path, parse) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found")
    try:
        raw = p.read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{p}: line {line}, byte {e.start}: not a YAML text file (invalid UTF-8 "
                          f"{raw[e.start:e.start + 1]!r}); pass the YAML file, not a binary") from None
    try:
        return parse(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if mark is None and isinstance(e, yaml.reader.ReaderError):  # a control character
            loc = f" position {e.position}"
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}:{loc}: malformed YAML: {' '.join(str(problem).split())}; fix the file") from None


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
