"""The registry of search kinds: which :class:`~evomerge.search.loop.Search` class runs a config.

A kind claims space types (``spaces=``) and/or optimizer families (``optimizers=``); a config runs
with the kind that claims its space type, else the kind that claims its optimizer family, else
the default kind (``space``: a parameter or layer-flow space driven by any optimizer). Built-in
kinds: ``space`` (:mod:`.loop`), ``model_archive`` (M2N2 on whole weights, :mod:`.archive`),
``map`` (MAP and its predicted front, :mod:`.map`). Nothing in the loop tests for a kind.
"""

from __future__ import annotations

from typing import Callable

KINDS: dict[str, type] = {}
_BY_SPACE: dict[str, str] = {}
_BY_OPTIMIZER: dict[str, str] = {}
DEFAULT = "space"


def register_kind(name: str, *, spaces: tuple[str, ...] = (), optimizers: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: a search kind, and the space types / optimizer families it runs."""

    def deco(cls: type) -> type:
        if name in KINDS:
            raise ValueError(f"search kind {name!r} registered twice")
        for table, keys in ((_BY_SPACE, spaces), (_BY_OPTIMIZER, optimizers)):
            for k in keys:
                if k in table:
                    raise ValueError(f"{k!r} is claimed by search kinds {table[k]!r} and {name!r}")
                table[k] = name
        cls.kind = name
        KINDS[name] = cls
        return cls

    return deco


def kind_of(cfg) -> str:
    """The name of the kind that runs ``cfg`` (a :class:`~evomerge.config.SearchConfig`)."""
    space = getattr(cfg.space, "type", None)
    if space in _BY_SPACE:
        return _BY_SPACE[space]
    return _BY_OPTIMIZER.get(str(cfg.optimizer.name).partition(":")[0], DEFAULT)


def search_class(cfg) -> type:
    """The :class:`~evomerge.search.loop.Search` subclass registered for ``cfg``'s kind."""
    # the built-ins are registered: importing this module ran its package's __init__, which imports them
    return KINDS[kind_of(cfg)]
