"""The wheel carries its data: build it, install it into a fresh venv outside the checkout, and
run the commands that need shipped spaces, zoo tasks and example configs from a foreign directory.

The fresh venv gets the wheel only (``--no-deps``); torch and the rest come from the running
environment through a ``.pth`` line, so the test checks packaging, not dependency resolution.
An editable install of the same tree must find the same files in the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from evomerge import __version__
from evomerge.paths import cache_root
from evomerge.store import RunStore

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                ".pytest_cache")


def sh(*cmd, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} → {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def fresh_venv(path: Path) -> Path:
    """A venv without pip whose imports fall back to this environment's packages (after its own)."""
    sh(sys.executable, "-m", "venv", "--without-pip", path)
    python = path / "bin" / "python"
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "zz_host_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def clean_env() -> dict[str, str]:
    """This process's environment without what would let the checkout leak into the fresh venv
    (other tests put ``tests/`` and the working directory on ``PYTHONPATH``)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def pip_install(python: Path, *args) -> None:
    """Install into the fresh venv only. ``--ignore-installed``: the evomerge that the borrowed host
    packages make visible must neither satisfy the requirement nor be uninstalled."""
    sh(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-build-isolation",
       "--ignore-installed", *args, env=clean_env())


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    from evomerge.zoo import build_zoo

    zoo = build_zoo("tiny")  # shared cache: built once
    src = tmp_path / "src"  # a clean copy: no stale build/ from earlier builds
    shutil.copytree(REPO, src, symlinks=True, ignore=IGNORE)
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src)
    (wheel,) = (tmp_path / "dist").glob("evomerge-*.whl")
    assert wheel.name == f"evomerge-{__version__}-py3-none-any.whl"

    python = fresh_venv(tmp_path / "venv")
    pip_install(python, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = clean_env()
    env.update(EVOMERGE_CACHE=str(cache_root()), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    evomerge = tmp_path / "venv" / "bin" / "evomerge"

    where = sh(python, "-c", "import evomerge, evomerge.paths as p; print(evomerge.__file__); print(p.evals_dir())",
               cwd=work, env=env).stdout.split()
    assert all(Path(w).is_relative_to(tmp_path / "venv") for w in where), where  # the wheel's copy, not the checkout
    assert sh(evomerge, "--version", cwd=work, env=env).stdout == f"evomerge {__version__}\n"

    out = sh(evomerge, "eval", zoo.experts["math"], "-t", "zoo_add", "--limit", "8", "--threads", "1", "--json",
             cwd=work, env=env).stdout
    doc = json.loads(out)
    assert [o["key"] for o in doc["objectives"]] == ["zoo_add:search"] and doc["objectives"][0]["docs"] == 8

    sh(evomerge, "search", "example:ps", "--zoo", "tiny", "--evaluations", "2", "-r", "runs/ps", "-q",
       cwd=work, env=env)
    res = sh(evomerge, "demo", "--zoo", "tiny", "--evaluations", "2", "-r", "runs/demo", "-q", cwd=work, env=env)
    assert "report written" in res.stdout
    for run in ("ps", "demo"):
        with RunStore(work / "runs" / run) as s:
            assert s.meta("status") == "finished" and len(s.trials(status="ok")) == 2
    assert (work / "runs" / "demo" / "report.html").stat().st_size > 100_000

    # An editable install of the same tree finds the checkout's own folders (their editable source).
    python_e = fresh_venv(tmp_path / "venv-editable")
    pip_install(python_e, "-e", src)
    found = sh(python_e, "-c", "import evomerge.paths as p; print(*(p.data_dir(n) for n in p.DATA_DIRS))",
               cwd=work, env=env).stdout.split()
    assert found == [str((src / n).resolve()) for n in ("search_spaces", "evals", "examples")]
