"""docs/extending.md stays true: every ```python block in it runs and its asserts hold.

Each block runs in a fresh namespace, in an empty temporary directory, with the zoo cache of the
session (``EVOMERGE_CACHE``). The registries a block may fill (operators, optimizers, spaces, search
kinds, executors, checkpoint classes) and ``sys.path`` / ``sys.modules`` are restored afterwards,
so an example never leaks into another test.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

import evomerge.executors.base as executors_base
import evomerge.merge.methods.registry as operators_registry
import evomerge.optimizers.base as optimizers_base
import evomerge.search.kinds as kinds
import evomerge.spaces.base as spaces_base

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)

# every module-level registry an extension may write to
REGISTRIES = [
    operators_registry.OPERATORS,
    optimizers_base.OPTIMIZERS,
    optimizers_base._CLASSES,
    spaces_base.SPACES,
    kinds.KINDS,
    kinds._BY_SPACE,
    kinds._BY_OPTIMIZER,
    executors_base.EXECUTORS,
]


def python_blocks() -> list[tuple[str, str]]:
    """(heading the block sits under, code) for every ```python block of the doc."""
    text = DOC.read_text()
    out = []
    for m in FENCE.finditer(text):
        heading = re.findall(r"^## (.+)$", text[: m.start()], re.M)
        # padded with blank lines so that a failing line number is the doc's own
        out.append((heading[-1] if heading else "top", "\n" * text[: m.start(1)].count("\n") + m.group(1)))
    return out


BLOCKS = python_blocks()


def test_the_doc_has_one_example_per_extension_point():
    assert [h for h, _ in BLOCKS] == ["A merge operator", "An optimizer", "A search space", "An objective",
                                      "An executor", "A model family"]


@pytest.fixture
def restored(tmp_path, monkeypatch):
    """An empty working directory; registries, sys.path and the example's modules as they were afterwards."""
    monkeypatch.chdir(tmp_path)
    saved = [dict(r) for r in REGISTRIES]
    path, modules = list(sys.path), set(sys.modules)
    yield tmp_path
    for registry, before in zip(REGISTRIES, saved):
        registry.clear()
        registry.update(before)
    sys.path[:] = path
    for name in set(sys.modules) - modules:  # the example's own modules (written into tmp_path)
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[h.lower().replace(" ", "_") for h, _ in BLOCKS])
def test_example_runs(code, restored):
    before = [set(r) for r in REGISTRIES]
    module = types.ModuleType("extending_example")  # a real module: pydantic resolves annotations there
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, str(DOC), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    # the example did what it documents: it added to a registry, or it needed none (objective, family)
    added = [set(r) - b for r, b in zip(REGISTRIES, before)]
    assert any(added) or "register" not in code


def test_examples_leave_no_trace():
    """Runs after the examples (file order): nothing they registered is still there."""
    assert "largest_delta" not in operators_registry.OPERATORS
    assert "pattern" not in optimizers_base.OPTIMIZERS
    assert "shared_weight" not in spaces_base.SPACES
    assert "threads" not in executors_base.EXECUTORS
    assert not any(k.startswith("extending_example:") for k in optimizers_base._CLASSES)
