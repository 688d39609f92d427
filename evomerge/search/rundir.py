"""A run directory's life: created atomically, driven by exactly one process at a time.

* :func:`create_run_dir` builds the run directory under a hidden temporary name next to it (the
  driver lock taken, the run store written, its meta set) and renames it into place only when all
  of that succeeded: a run directory either holds a complete new run or does not exist. If
  anything fails midway, the temporary directory (and any parent directory it had to create) is
  removed again; nothing that existed before is touched.
* :class:`DriverLock` is an exclusive ``fcntl.flock`` on ``RUN_DIR/driver.lock``, held for the
  driver's whole life (``search``, ``resume``, ``map``). A second driver on the same directory
  is refused with one line naming the pid holding it. The operating system releases the lock when
  its process dies, kill -9 included, so a crashed run is never "stuck" as running.
  Readers (``runs show``, ``report``) take no lock: the store's WAL journal lets them read while
  a search writes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import secrets
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.store import RunStore

LOCK_FILE = "driver.lock"


class RunBusyError(EvomergeError):
    """Another process drives this run directory."""


class DriverLock:
    """An exclusive lock on a run directory for this process's lifetime (or until :meth:`release`)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, run_dir: str | Path, *, shown: str | Path | None = None) -> "DriverLock":
        """Lock ``run_dir`` (creating its lock file when an older evomerge wrote the directory) or
        raise :class:`RunBusyError` naming the holder; ``shown`` is the directory named in it."""
        path = Path(run_dir) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise EvomergeError(f"{shown or run_dir}: cannot open its lock file {LOCK_FILE} ({e.strerror}); "
                                "a run directory must be writable to drive a run") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunBusyError(_busy(shown or run_dir, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    @staticmethod
    def check_free(run_dir: str | Path) -> None:
        """Raise :class:`RunBusyError` when a process drives ``run_dir`` now; changes nothing."""
        path = Path(run_dir) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # written by an evomerge without driver locks, or by nobody
        except OSError:
            return  # unreadable: whoever drives it next reports that (acquire)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusyError(_busy(run_dir, _read_pid(fd))) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> "DriverLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _busy(run_dir, pid: int | None) -> str:
    who = f" (pid {pid})" if pid else ""
    return f"{run_dir}: another evomerge process{who} is driving this run; wait for it or stop it"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def refuse_existing(run_dir: Path) -> None:
    """One line when ``run_dir`` already holds a run (naming its driver when one runs now)."""
    if not RunStore.exists(run_dir):
        return
    DriverLock.check_free(run_dir)
    raise ConfigError(f"{run_dir}: already holds a run; continue it with `evomerge resume {run_dir}` "
                      "or choose another --run-dir")


def create_run_dir(run_dir: str | Path, meta: dict[str, Any]) -> tuple[RunStore, DriverLock]:
    """Create ``run_dir`` holding a new run store with ``meta``, atomically, and lock it.

    Refuses (one line) when ``run_dir`` holds a run already or is not an empty directory.
    Returns the open store and the held lock.
    """
    run_dir = Path(run_dir)
    refuse_existing(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: is a file, not a run directory; choose another --run-dir")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: exists and is not empty (and holds no run); choose another --run-dir")
    made = _missing_parents(run_dir.parent)
    tmp, lock = None, None
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = run_dir.parent / f".{run_dir.name}.creating-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()  # exclusive: the name is this call's own
        lock = DriverLock.acquire(tmp, shown=run_dir)
        with RunStore(tmp, create=True) as store:
            store.set_meta(**meta)
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the store is whole in one file now
        try:
            os.rename(tmp, run_dir)  # atomic; fails when another process created run_dir meanwhile
        except OSError:
            refuse_existing(run_dir)
            raise ConfigError(f"{run_dir}: was created by another process meanwhile; choose another --run-dir") from None
        return RunStore(run_dir), lock
    except BaseException:
        if lock is not None:
            lock.release()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # innermost first; only directories this call created, and only if still empty
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _missing_parents(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first."""
    out = []
    path = path.absolute()
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out
