"""Optional dependencies (pip extras): one check, one message.

The core install scores and searches with the in-process executor and the CMA-ES / random /
M2N2 optimizers. Heavier features live behind extras (see pyproject.toml): ``ray`` (the Ray
executor), ``report`` (HTML report, PNG plots), ``map`` (MAP Pareto fronts: pymoo), ``optuna``,
``gguf`` and ``peft``; ``all`` pulls every one. Code imports such a module only inside the
function that needs it, after :func:`require_extra`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from evomerge.errors import EvomergeError


class MissingExtraError(EvomergeError):
    """An optional dependency is not installed; the message names the extra to install."""


def require_extra(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise one line naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        what = feature or f"this feature ({module})"
        raise MissingExtraError(f"{what} needs the '{extra}' extra: pip install 'evomerge[{extra}]'") from None
