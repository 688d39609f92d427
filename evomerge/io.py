"""Atomic file and directory writes: a reader never sees a half-written result.

Outputs are checked up front and failed writes become one line (:mod:`evomerge.outputs`); a
failed write removes its temporary file or directory, so no partial output is ever left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from evomerge.outputs import check_output_dir, check_output_file, os_error, public_mode


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
        os.chmod(tmp, public_mode("dir"))
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
