"""README.md and docs/*.md name only files, folders and modules that exist.

Checked mentions:

* ``evomerge/...`` paths (files and folders), relative to the repository root;
* other ``*.py`` paths and bare ``*.py`` names (``merge/vocab.py``, ``ray_exec.py``): some tracked
  file of the repository ends with that path;
* dotted ``evomerge.x.y[.Attr]`` names: the longest importable prefix is a module and the rest are
  attributes of it (``evomerge.store.RunStore``).

The "before" column of a ``## Module map`` table names modules that are gone on purpose and is
not checked. Paths with a placeholder (``evomerge/spaces/<name>.py``) are patterns, not mentions. ``ALLOWED``
lists the few names that are deliberately not in the repository (the extending guide's example
modules, the run store's file name).
"""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

ALLOWED = {
    "toy_objective.py", "sums_objective.py",  # written by docs/extending.md's examples
    "evomerge.sqlite",                         # the run store's file inside a run directory
}

EVOMERGE_PATH = re.compile(r"(?<![\w./-])evomerge/[\w./<>-]*")
PY_PATH = re.compile(r"(?<![\w./<>-])[\w-]+(?:/[\w-]+)*\.py\b")
MODULE = re.compile(r"(?<![\w./-])evomerge(?:\.[A-Za-z_]\w*)+")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()
    # not a git checkout (an unpacked sdist): every file under the root
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]


TRACKED = _tracked()


def checked_text(doc: Path) -> str:
    """The doc without the "before" column of a module map (names that are gone on purpose)."""
    out, in_map = [], False
    for line in doc.read_text().splitlines():
        if line.startswith("## "):
            in_map = line.startswith("## Module map")
        if in_map and line.startswith("| "):
            line = "|" + line[1:].split(" | ", 1)[-1]
        out.append(line)
    return "\n".join(out)


def mentions(pattern: re.Pattern) -> list[tuple[str, str]]:
    """(doc name, mention) for every match in README.md and docs/*.md, de-duplicated."""
    seen: dict[tuple[str, str], None] = {}
    for doc in DOCS:
        for m in pattern.finditer(checked_text(doc)):
            text = m.group(0).rstrip(".")
            if "<" not in text and text not in ALLOWED:
                seen[(doc.name, text)] = None
    return list(seen)


def path_exists(text: str) -> bool:
    if text.startswith("evomerge/"):
        return (ROOT / text).exists()
    return any(f == text or f.endswith("/" + text) for f in TRACKED)


def module_exists(text: str) -> bool:
    parts = text.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


PATHS = mentions(EVOMERGE_PATH) + [m for m in mentions(PY_PATH) if not m[1].startswith("evomerge/")]
MODULES = mentions(MODULE)


def test_the_docs_mention_paths_and_modules():
    """The patterns find what they should (so the checks below cannot pass by matching nothing)."""
    assert ("CONTRACTS.md", "evomerge/architecture.py") in PATHS
    assert ("CONTRACTS.md", "merge/vocab.py") in PATHS
    assert ("extending.md", "evomerge.merge.methods") in MODULES
    assert len(PATHS) > 40 and len(MODULES) > 20


@pytest.mark.parametrize("doc,path", PATHS, ids=[f"{d}:{p}" for d, p in PATHS])
def test_mentioned_path_exists(doc, path):
    assert path_exists(path), f"{doc} mentions {path}, which is not in the repository"


@pytest.mark.parametrize("doc,name", MODULES, ids=[f"{d}:{n}" for d, n in MODULES])
def test_mentioned_module_exists(doc, name):
    assert module_exists(name), f"{doc} mentions {name}, which does not import"


def test_a_stale_mention_is_caught():
    assert not path_exists("evomerge/search.py") and not path_exists("surrogate/map_search.py")
    assert not module_exists("evomerge.mergekit_compat") and not module_exists("evomerge.store.NoSuchThing")
    assert path_exists("evomerge/search/") and module_exists("evomerge.search.kinds.register_kind")


def test_a_module_map_names_the_old_modules_but_only_its_after_column_is_checked():
    contracts = ROOT / "docs" / "CONTRACTS.md"
    assert "`evomerge/search.py`" in contracts.read_text()
    assert "`evomerge/search.py`" not in checked_text(contracts)
    assert "`evomerge/search/`" in checked_text(contracts)


def test_readme_layout_names_every_package_and_module():
    """README's ``## Layout`` block lists every subpackage and top-level module of evomerge/."""
    text = (ROOT / "README.md").read_text()
    layout = re.search(r"^## Layout\n+```\n(.*?)^```", text, re.S | re.M).group(1)
    package = ROOT / "evomerge"
    expected = sorted([f"{d.name}/" for d in package.iterdir() if (d / "__init__.py").is_file()]
                      + [f.name for f in package.glob("*.py") if f.name not in ("__init__.py", "__main__.py")])
    missing = [name for name in expected if not re.search(rf"(?<![\w/]){re.escape(name)}", layout)]
    assert not missing, f"README.md's Layout does not mention {missing}"
