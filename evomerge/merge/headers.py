"""Safetensors headers: every tensor's dtype, shape and byte range, without reading a tensor.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON + the data. The JSON maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (relative to the data).
Reading only the header is what lets ``evomerge plan`` size a 70B model in milliseconds, and
what lets a placement read one tensor's bytes straight into a (pinned) buffer.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from evomerge.errors import ModelError

# safetensors dtype → (bytes per element, torch dtype or None when torch has none, floating?)
DTYPES: dict[str, tuple[int, torch.dtype | None, bool]] = {
    "F64": (8, torch.float64, True), "F32": (4, torch.float32, True), "F16": (2, torch.float16, True),
    "BF16": (2, torch.bfloat16, True), "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None), True),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None), True),
    "I64": (8, torch.int64, False), "I32": (4, torch.int32, False), "I16": (2, torch.int16, False),
    "I8": (1, torch.int8, False), "U8": (1, torch.uint8, False), "BOOL": (1, torch.bool, False),
}
MAX_HEADER = 100 * 1024 ** 2  # the format's own limit


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as its file describes it."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in ``file``
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def floating(self) -> bool:
        return DTYPES[self.dtype][2]

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = DTYPES[self.dtype][1]
        if dt is None:
            raise ModelError(f"{self.file}: tensor {self.name} has dtype {self.dtype}, which this torch cannot hold")
        return dt


def read_header(path: str | Path) -> dict[str, TensorHeader]:
    """Every tensor of one safetensors file (only the header is read; ranges are checked)."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise ModelError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
            meta = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: safetensors header is not a JSON object")
    out: dict[str, TensorHeader] = {}
    base = 8 + n
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: malformed header entry for tensor {name}") from None
        if dtype not in DTYPES:
            raise ModelError(f"{path}: tensor {name} has unknown dtype {dtype}")
        h = TensorHeader(name, dtype, shape, path, base + int(b), base + int(e))
        if h.nbytes != h.numel * h.itemsize or h.start < base or h.end > size:
            raise ModelError(f"{path}: tensor {name}: byte range [{b}, {e}) does not match shape "
                             f"{list(shape)} × {dtype} or the file size")
        out[name] = h
    return out


def _signature(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=256)
def _cached_header(sig: tuple) -> dict[str, TensorHeader]:
    return read_header(sig[0])


def model_headers(weight_files: dict[str, str], root: str | Path) -> dict[str, TensorHeader]:
    """Headers of a model's tensors, in weight-map order (``name → file`` relative to ``root``)."""
    root = Path(root)
    by_file: dict[str, dict[str, TensorHeader]] = {}
    out = {}
    for name, fname in weight_files.items():
        if fname not in by_file:
            p = root / fname
            if p.suffix != ".safetensors":
                raise ModelError(f"{p}: memory planning and placements read safetensors only")
            by_file[fname] = _cached_header(_signature(p))
        h = by_file[fname].get(name)
        if h is None:
            raise ModelError(f"{root / fname}: no tensor named {name} (the index says it is there)")
        out[name] = h
    return out


# ---------------------------------------------------------------------- header-only models
def llama_tensors(arch: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama-layout causal LM (llama, mistral, qwen2) from its config."""
    h, i, n = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads", heads)
    hd = arch.get("head_dim", h // heads)
    bias = arch.get("attention_bias", arch.get("model_type") == "qwen2")
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch["vocab_size"], h)}
    for b in range(n):
        p = f"model.layers.{b}."
        for proj, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
            out[f"{p}self_attn.{proj}_proj.weight"] = (rows, h)
            if bias:
                out[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
        out[f"{p}self_attn.o_proj.weight"] = (h, heads * hd)
        out[f"{p}mlp.gate_proj.weight"] = (i, h)
        out[f"{p}mlp.up_proj.weight"] = (i, h)
        out[f"{p}mlp.down_proj.weight"] = (h, i)
        out[f"{p}input_layernorm.weight"] = (h,)
        out[f"{p}post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not arch.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (arch["vocab_size"], h)
    return out


def write_sparse_model(path: str | Path, arch: dict, dtype: str = "BF16", shard_bytes: int = 5 * 10 ** 9) -> Path:
    """A model directory whose weights are real safetensors headers over *sparse* data regions
    (each shard is truncated to its full size: nothing is allocated, every byte reads as 0),
    sharded like the Hub's (``shard_bytes`` per file and an index). For planning models that are
    not on this machine (docs/scale.md); never for merging."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    size = DTYPES[dtype][0]
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    used = 0
    for name, shape in llama_tensors(arch).items():
        n = math.prod(shape) * size
        if shards[-1] and used + n > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = shape
        used += n
    weight_map = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        meta, at = {}, 0
        for name, shape in tensors.items():
            n = math.prod(shape) * size
            meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
            weight_map[name] = fname
            at += n
        blob = json.dumps(meta, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / fname, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
        os.truncate(path / fname, 8 + len(blob) + at)
    if len(shards) > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(arch, indent=2))
    return path
