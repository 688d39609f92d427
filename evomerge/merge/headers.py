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
from evomerge.safety import DTYPE_BYTES, FLOAT_DTYPES, safetensors_layout

# safetensors dtype → torch dtype (None when this torch has none); sizes and validation: evomerge.safety
TORCH_DTYPES: dict[str, torch.dtype | None] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None), "U64": getattr(torch, "uint64", None),
    "BOOL": torch.bool,
}


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
        return DTYPE_BYTES[self.dtype]

    @property
    def floating(self) -> bool:
        return self.dtype in FLOAT_DTYPES or self.dtype.startswith("F8")

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = TORCH_DTYPES.get(self.dtype)
        if dt is None:
            raise ModelError(f"{self.file}: tensor {self.name} has dtype {self.dtype}, which this torch cannot hold")
        return dt


def read_header(path: str | Path) -> dict[str, TensorHeader]:
    """Every tensor of one safetensors file, with absolute byte ranges (only the header is read;
    :func:`evomerge.safety.safetensors_layout` validates it)."""
    path = Path(path)
    base, table = safetensors_layout(path)
    return {name: TensorHeader(name, info["dtype"], tuple(info["shape"]), path,
                               base + info["data_offsets"][0], base + info["data_offsets"][1])
            for name, info in table.items()}


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
    size = DTYPE_BYTES[dtype]
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
