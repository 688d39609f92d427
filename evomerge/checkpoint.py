"""Checkpoints as DATA: a versioned JSON tree plus numpy arrays in one ``.npz`` blob, never a pickle.

A run directory may come from someone else, so ``evomerge resume`` must not execute anything it
reads. :func:`encode` turns a tree of plain values into bytes: JSON for the structure, every
numpy array stored natively in an ``npz`` archive (read back with ``allow_pickle=False``).
Python floats survive exactly (JSON ``repr`` round-trips float64; NaN/inf are written as the
``NaN``/``Infinity`` literals Python's ``json`` reads back). Supported values:

``None``, ``bool``, ``int``, ``float``, ``str``, ``list``, ``tuple``, ``set``, ``dict`` (any of the
above as keys), numpy arrays of numeric/bool dtype, numpy scalars, :class:`numpy.random.Generator`
/ :class:`numpy.random.RandomState` (their bit-generator state, so a restored RNG continues
exactly), and the types registered with :func:`register_type` (asks and optimizers, each as its
own data, rebuilt by a whitelisted constructor). Anything else raises ``TypeError`` when *writing* — a checkpoint never silently drops
state. Reading builds only these types.

Old checkpoints (evomerge < this format) are pickles. :func:`decode` refuses them with one line
naming the opt-in (``evomerge resume --allow-pickle``); :func:`is_pickle` tells them apart.
Errors (unreadable, unknown format or version, refused pickle) are :class:`ConfigError`: bad
input, one line, exit code 2.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

from evomerge.errors import ConfigError

FORMAT = "evomerge-checkpoint"
VERSION = 2  # 1 was the pickled checkpoint
_JSON = "__tree__.json"


# tag -> (class, to_data, from_data): classes whose instances a checkpoint may hold, as data
_TYPES: dict[str, tuple[type, Any, Any]] = {}


def register_type(tag: str, cls: type, to_data, from_data) -> None:
    """Let checkpoints hold instances of ``cls`` (and subclasses) as ``to_data(obj)`` (a data tree);
    reading calls ``from_data(tree)``. Only registered tags are ever rebuilt."""
    _TYPES[tag] = (cls, to_data, from_data)


class PickleRefused(ConfigError):
    """A checkpoint in the old pickle format met a caller that did not opt in."""


def is_pickle(blob: bytes) -> bool:
    """Whether ``blob`` is a pickle (protocol 2+ starts with 0x80), i.e. an old-format checkpoint."""
    return bool(blob) and blob[:1] == b"\x80"


# modules renamed since pickled checkpoints were written (old module -> new module)
_RENAMED = {
    "evomerge.surrogate.map_search": "evomerge.optimizers.map",
    "evomerge.surrogate.prescreen": "evomerge.optimizers.prescreen",
    "evomerge.archive": "evomerge.optimizers.m2n2",
}


def _legacy_unpickler():
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return super().find_class(_RENAMED.get(module, module), name)

    return Unpickler


def _LegacyUnpickler(f):  # noqa: N802  (a class made on first use: pickle stays unimported otherwise)
    return _legacy_unpickler()(f)


# ---------------------------------------------------------------------- encoding
def _enc(x: Any, arrays: list[np.ndarray]) -> Any:
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int) and not isinstance(x, np.integer):
        return x
    if isinstance(x, float) and not isinstance(x, np.floating):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biufc":
            raise TypeError(f"checkpoint: cannot store an array of dtype {x.dtype}")
        arrays.append(np.ascontiguousarray(x))
        return {"$a": len(arrays) - 1}
    if isinstance(x, np.generic):
        return {"$s": [x.dtype.str, _enc(x.item(), arrays)]}
    if isinstance(x, list):
        return [_enc(v, arrays) for v in x]
    if isinstance(x, tuple):
        return {"$t": [_enc(v, arrays) for v in x]}
    if isinstance(x, (set, frozenset)):
        return {"$set": [_enc(v, arrays) for v in sorted(x, key=repr)]}
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _enc(v, arrays) for k, v in x.items()}
        return {"$d": [[_enc(k, arrays), _enc(v, arrays)] for k, v in x.items()]}
    if isinstance(x, np.random.Generator):
        return {"$gen": _enc(x.bit_generator.state, arrays)}
    if isinstance(x, np.random.RandomState):
        return {"$rs": _enc(x.get_state(legacy=False), arrays)}
    for tag, (cls, to_data, _) in _TYPES.items():
        if isinstance(x, cls):
            return {"$o": [tag, _enc(to_data(x), arrays)]}
    raise TypeError(f"checkpoint: cannot store a {type(x).__module__}.{type(x).__qualname__} as data")


def _dec(x: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(x, list):
        return [_dec(v, arrays) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) == 1:
        (tag, v), = x.items()
        if tag == "$a":
            return arrays[f"a{int(v)}"]
        if tag == "$s":
            return np.dtype(v[0]).type(_dec(v[1], arrays))
        if tag == "$t":
            return tuple(_dec(e, arrays) for e in v)
        if tag == "$set":
            return {_dec(e, arrays) for e in v}
        if tag == "$d":
            return {_dec(k, arrays): _dec(e, arrays) for k, e in v}
        if tag == "$gen":
            state = _dec(v, arrays)
            bitgen = getattr(np.random, str(state["bit_generator"]), None)
            if not (isinstance(bitgen, type) and issubclass(bitgen, np.random.BitGenerator)):
                raise ConfigError(f"checkpoint: unknown bit generator {state['bit_generator']!r}")
            g = np.random.Generator(bitgen())
            g.bit_generator.state = state
            return g
        if tag == "$o":
            if v[0] not in _TYPES:
                raise ConfigError(f"checkpoint: unknown object type {v[0]!r}")
            return _TYPES[v[0]][2](_dec(v[1], arrays))
        if tag == "$rs":
            rs = np.random.RandomState()
            rs.set_state(_dec(v, arrays))
            return rs
    return {k: _dec(v, arrays) for k, v in x.items()}


def encode(tree: Any) -> bytes:
    """Bytes of a data tree (see the module docstring for what it may hold)."""
    arrays: list[np.ndarray] = []
    doc = json.dumps({"format": FORMAT, "version": VERSION, "tree": _enc(tree, arrays)})
    buf = io.BytesIO()
    np.savez(buf, **{_JSON: np.frombuffer(doc.encode(), dtype=np.uint8)},
             **{f"a{i}": a for i, a in enumerate(arrays)})
    return buf.getvalue()


def decode(blob: bytes, *, allow_pickle: bool = False, where: str = "checkpoint") -> Any:
    """The tree of :func:`encode`. An old pickled checkpoint is unpickled only with ``allow_pickle``."""
    if is_pickle(blob):
        if not allow_pickle:
            raise PickleRefused(f"{where} is an old pickled checkpoint, and unpickling can run code; "
                                "if you trust this run directory, resume with --allow-pickle")
        return _LegacyUnpickler(io.BytesIO(blob)).load()  # the user's explicit opt-in (docs/search.md)
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        doc = json.loads(arrays.pop(_JSON).tobytes().decode())
    except (ValueError, KeyError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is unreadable ({type(exc).__name__}); the run store may be damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{where} has an unknown format; it was not written by evomerge")
    if doc.get("version") != VERSION:
        raise ConfigError(f"{where} has format version {doc.get('version')}; this evomerge reads {VERSION}")
    return _dec(doc["tree"], arrays)
