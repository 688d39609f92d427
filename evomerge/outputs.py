"""Where evomerge may write: output locations checked up front, OS errors turned into one line.

Every file or directory evomerge produces goes through :mod:`evomerge.io`'s atomic writers,
which call into this module:

* :func:`check_output_dir` / :func:`check_output_file` before anything is written: an output
  directory that is a file, a symbolic link (never followed or replaced, even with ``--force``),
  a parent that is a file, or a location that equals, contains or lies inside a path the command
  reads from (an input model, the run directory) is refused with one line. ``--force`` replaces
  an output; it never destroys an input.
* :func:`os_error` maps the ``OSError`` of a failed write (read-only file system, disk full,
  permission denied, ...) to one :class:`~evomerge.errors.EvomergeError` line naming the path
  and what to do. The atomic writers have already removed their temporary files by then, so a
  failed write leaves nothing behind.
* :func:`public_mode` / :func:`publish_modes`: outputs follow the umask like any other tool
  (``mkstemp``/``mkdtemp`` and some third-party writers create 0600/0700, and that mode would
  otherwise survive the atomic rename).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from pathlib import Path
from typing import Iterable

from evomerge.errors import EvomergeError

_ADVICE = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted; free space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied; write elsewhere or fix the permissions",
    errno.EPERM: "operation not permitted; write elsewhere or fix the permissions",
    errno.ENOTDIR: "a parent of it is a file, not a directory; choose another path",
    errno.EISDIR: "it is a directory; name a file instead",
    errno.EEXIST: "something already exists there; choose another path or remove it",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.ELOOP: "it is a symbolic-link loop; choose another path",
    errno.ENOENT: "a parent directory is missing or vanished; choose an existing location",
}


def os_error(e: OSError, path: Path | str, action: str = "write") -> EvomergeError:
    """One line for a failed write of ``path``: what, where, what to do."""
    advice = _ADVICE.get(e.errno or -1, "check the path and try again")
    reason = e.strerror or str(e)
    return EvomergeError(f"{path}: cannot {action} ({reason}); {advice}")


def sqlite_error(e: sqlite3.Error, where: Path | str | None = None) -> EvomergeError | None:
    """One line for an SQLite error caused by the environment (full disk, read-only), else None."""
    text = str(e)
    for marker, advice in (("disk is full", "the disk is full; free space or use another --run-dir"),
                           ("readonly database", "the file system or file is read-only; use another --run-dir"),
                           ("unable to open database", "check that the directory exists and is writable"),
                           ("disk I/O error", "the disk failed or is full; check it or use another --run-dir")):
        if marker in text:
            return EvomergeError(f"{where or 'run store'}: SQLite error ({text}); {advice}")
    return None


def public_mode(kind: str) -> int:
    """The mode a new file (``"file"``) or directory (``"dir"``) gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if kind == "dir" else 0o666) & ~umask


def publish_modes(root: Path) -> None:
    """Give every directory and regular file under ``root`` (itself included) the umask's mode
    before it appears as an output: ``mkdtemp`` creates 0700 and third-party writers may create
    0600 files (safetensors' ``save_file`` does). Symbolic links are neither followed nor changed."""
    fmode, dmode = public_mode("file"), public_mode("dir")
    for d, _, files in os.walk(root):  # never descends into a linked directory
        os.chmod(d, dmode)
        for f in files:
            p = os.path.join(d, f)
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.chmod(p, fmode)


def _overlap(out: Path, other: Path) -> str | None:
    a, b = out.resolve(), Path(other).resolve()
    if a == b:
        return "is"
    if b.is_relative_to(a):
        return "contains"
    if a.is_relative_to(b):
        return "is inside"
    return None


def check_protected(out: Path, protect: Iterable[tuple[str, Path | str]]) -> None:
    """Refuse ``out`` when it equals, contains or lies inside a protected path (``(what, path)``)."""
    for what, p in protect:
        rel = _overlap(Path(out), Path(p))
        if rel is not None:
            raise EvomergeError(f"{out}: the output {rel} the {what} {p}; writing there would destroy "
                                "an input (even with --force). Choose an output outside it")


def _check_parent(out: Path) -> None:
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise EvomergeError(f"{out}: {parent} is a file, not a directory; choose another output path")
            return


def check_output_dir(out: Path | str, *, overwrite: bool = False,
                     protect: Iterable[tuple[str, Path | str]] = ()) -> Path:
    """Raise one line unless ``out`` can become a (new or replaced) output directory."""
    out = Path(out)
    if out.is_symlink():
        raise EvomergeError(f"{out}: is a symbolic link; evomerge neither follows nor replaces links "
                            "(not even with --force). Remove it or choose another path")
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"{out}: exists and is a file, not a directory; choose another output path")
    _check_parent(out)
    check_protected(out, protect)
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise EvomergeError(f"{out}: output directory exists and is not empty; pass --force to replace it")
    return out


def check_run_dir(run_dir: Path | str, option: str = "--run-dir") -> Path:
    """Raise one line unless ``run_dir`` can hold files written into it (a directory, new or
    existing, possibly a link to one): a run directory, ``--png-dir``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EvomergeError(f"{run_dir}: {option} exists and is a file, not a directory; choose another path")
    _check_parent(run_dir)
    return run_dir


def check_output_file(out: Path | str, *, protect: Iterable[tuple[str, Path | str]] = ()) -> Path:
    """Raise one line unless ``out`` can become a (new or replaced) output file."""
    out = Path(out)
    if out.is_dir():
        raise EvomergeError(f"{out}: is a directory; name a file to write")
    _check_parent(out)
    check_protected(out, protect)
    return out
