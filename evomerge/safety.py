"""Guards for files handed to evomerge: model directories, safetensors headers, weight dtypes.

Every check raises :class:`~evomerge.errors.ModelError` with one line naming the file, what is
wrong with it and what to do, *before* a third-party reader (safetensors, transformers) gets a
chance to fail with a traceback or, worse, to succeed on garbage.

Decisions, written down:

* **Safetensors headers** are parsed here first (8-byte little-endian length, a header of at
  most :data:`MAX_HEADER_BYTES`, a UTF-8 JSON object, every tensor's dtype/shape/offsets
  consistent with each other and with the file size, the data section covered exactly).
* **Containment**: a file a model directory names (shard index entries, tokenizer files,
  anything copied into an output) must resolve inside that directory. Symlinks are followed and
  then checked, so a link to ``~/.ssh/id_rsa`` is refused, not copied. One exception, so that
  Hugging Face hub caches work: a directory ``…/snapshots/<rev>`` may link into the sibling
  ``…/blobs`` folder, which is how the hub stores files.
* **Dtypes**: evomerge merges floating-point weights. A quantized tensor (int8, uint8, int16,
  int32, ...) among the inputs is refused rather than merged as if its integers were weights.
  ``int64`` and ``bool`` tensors are index/mask buffers (``position_ids``, causal masks); they
  are copied, never merged, and must have the same dtype in every input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from evomerge.errors import ModelError

#: safetensors' own upper bound for a header; anything larger is corrupt or hostile.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
BUFFER_DTYPES = {"I64", "BOOL"}  # index / mask buffers: copied verbatim, never merged

_REDO = "re-download or re-export the model"


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The validated tensor table of a safetensors file: ``name → {dtype, shape, data_offsets}``."""
    return safetensors_layout(path)[1]


def safetensors_layout(path: Path) -> tuple[int, dict[str, dict]]:
    """``(data_start, tensors)``: the byte offset where the data section starts (``8 + header
    length``; ``data_offsets`` are relative to it) and the validated tensor table."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte "
                                 f"header length); {_REDO}")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise ModelError(f"{path}: corrupt safetensors file (header length {n} bytes, file size "
                                 f"{size} bytes); {_REDO}")
            raw = f.read(n)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelError(f"{path}: corrupt safetensors file (its header is not JSON); {_REDO}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors file (its header is not a JSON object); {_REDO}")
    data_len = size - 8 - n
    spans = []
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        bad = f"{path}: corrupt safetensors file (tensor {name!r}"
        if not isinstance(info, dict):
            raise ModelError(f"{bad} has no dtype/shape/offsets); {_REDO}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise ModelError(f"{bad} has unknown dtype {dtype!r}); {_REDO}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                for s in shape)):
            raise ModelError(f"{bad} has an invalid shape {shape!r}); {_REDO}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ModelError(f"{bad} has invalid data_offsets {offsets!r}); {_REDO}")
        if offsets[1] > data_len:
            raise ModelError(f"{bad} ends at byte {offsets[1]} of a {data_len}-byte data section: the file is "
                             f"truncated); {_REDO}")
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if need != offsets[1] - offsets[0]:
            raise ModelError(f"{bad}: shape {shape} of {dtype} needs {need} bytes, its offsets span "
                             f"{offsets[1] - offsets[0]}); {_REDO}")
        spans.append((offsets[0], offsets[1], name))
        tensors[name] = info
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise ModelError(f"{path}: corrupt safetensors file (tensor {name!r} starts at byte {start}, "
                             f"expected {end}: overlapping or missing data); {_REDO}")
        end = stop
    if end != data_len:
        raise ModelError(f"{path}: corrupt safetensors file ({data_len - end} stray bytes after the last "
                         f"tensor); {_REDO}")
    return 8 + n, tensors


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object (``config.json``, a shard index), or one clear line."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise ModelError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: {what} is not UTF-8 text; {_REDO}") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: malformed JSON in {what} ({e.msg}, line {e.lineno}); fix or "
                         f"re-download it") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} must be a JSON object, not a {type(data).__name__}; fix or "
                         f"re-download it")
    return data


def _roots(model_dir: Path) -> list[Path]:
    root = model_dir.resolve()
    roots = [root]
    if root.parent.name == "snapshots":  # hub cache: snapshots/<rev>/file -> ../../blobs/<hash>
        roots.append(root.parent.parent / "blobs")
    return roots


def contained(model_dir: Path, relative: str | Path, what: str) -> Path:
    """``model_dir / relative`` if it (after following symlinks) stays inside ``model_dir``."""
    model_dir = Path(model_dir)
    p = model_dir / relative
    target = p.resolve()
    if Path(relative).is_absolute() or not any(target.is_relative_to(r) for r in _roots(model_dir)):
        raise ModelError(f"{model_dir}: {what} {str(relative)!r} leads outside the model directory "
                         f"(to {target}); refusing to read it. Copy the file into the directory instead")
    return p


def contained_files(model_dir: Path, names: Iterable[str], what: str) -> list[Path]:
    """The files ``names`` that ``model_dir`` has, each :func:`contained` in it (a symbolic link
    is listed even when dangling, so that it is checked rather than silently skipped)."""
    model_dir = Path(model_dir)
    return [contained(model_dir, f, what) for f in names
            if (model_dir / f).is_file() or (model_dir / f).is_symlink()]


def check_weight_dtypes(path: Path, dtypes: dict[str, str]) -> None:
    """Refuse quantized (non-floating, non-buffer) tensors: evomerge merges floating-point weights."""
    for name, dtype in dtypes.items():
        if dtype not in FLOAT_DTYPES and dtype not in BUFFER_DTYPES:
            raise ModelError(f"{path}: tensor {name} is {dtype.lower()} (a quantized model?); evomerge "
                             "merges and evaluates floating-point weights only: dequantize it to "
                             "float16/bfloat16/float32 first")


def check_loading_info(path: Path, info: dict) -> None:
    """After ``from_pretrained(..., output_loading_info=True)``: every weight must have been loaded.

    A missing key means a parameter kept its random initialisation (a config of another
    architecture over these tensors); an unexpected key means weights were ignored.
    """
    for key, meaning in (("missing_keys", "has no tensor for parameter"),
                         ("unexpected_keys", "has tensor"), ("mismatched_keys", "has a wrongly shaped tensor")):
        keys = sorted(info.get(key) or [])
        if keys:
            first = keys[0][0] if isinstance(keys[0], tuple) else keys[0]
            tail = (" that its config.json's architecture does not use" if key == "unexpected_keys" else "")
            raise ModelError(f"{path}: the model {meaning} {first}{tail} ({len(keys)} such); config.json and "
                             "the weights do not belong together — fix config.json or the weights")
