"""Streaming export: a recipe → a normal Hugging Face model directory.

The safetensors header is computed up front (names, shapes and dtypes are known before any
tensor is merged), then each merged tensor is written straight to disk and dropped, so peak
memory is about one tensor plus its inputs, not the model. The directory appears atomically
(temporary sibling + rename): an error or an interrupt leaves no partial output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from evomerge import __version__
from evomerge.io import atomic_directory
from evomerge.markdown import md_code, md_fence
from evomerge.merge import layer_flow as lf
from evomerge.merge.materialize import merged_tensors, validate
from evomerge.merge.sources import OutputTensor, Sources
from evomerge.merge.vocab import TOKENIZER_FILES, vocabulary_of, write_tokenizer
from evomerge.recipe import MERGED, Recipe
from evomerge.safety import contained_files

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
DEFAULT_SHARD_BYTES = 2 * 1024**3

Progress = Callable[[int, int], None]  # (tensors done, tensors total)


def _out_dtype(recipe: Recipe, sources: Sources, o: OutputTensor) -> torch.dtype:
    d = sources.reference if o.source == MERGED else sources.dirs[o.source]
    stored = d.dtype(o.source_name)
    if recipe.dtype is not None and stored.is_floating_point:
        return DTYPES[recipe.dtype]
    return stored


def _shape(sources: Sources, o: OutputTensor) -> tuple[int, ...]:
    d = sources.reference if o.source == MERGED else sources.dirs[o.source]
    return d.shape(o.source_name)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _header(entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[bytes, list[int]]:
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset, sizes = 0, []
    for name, shape, dtype in entries:
        size = _nbytes(shape, dtype)
        meta[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, sizes


def _write_tensor(f: BinaryIO, t: torch.Tensor, dtype: torch.dtype, size: int, name: str) -> None:
    data = t.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1).view(torch.uint8)
    if data.numel() != size:
        raise RuntimeError(f"{name}: produced {data.numel()} bytes, header promised {size}")
    f.write(memoryview(data.numpy()))


def export_model(recipe: Recipe, out_dir: str | Path, sources: Sources | None = None, *,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                 progress: Progress | None = None, card_extra: str = "",
                 extra_files: dict[str, str] | None = None,
                 protect: list[tuple[str, Path | str]] | None = None) -> Path:
    """Merge ``recipe`` and write it to ``out_dir`` as a Hugging Face model directory.

    ``extra_files`` (file name → text) are written into the directory before it appears, so
    they are part of the same atomic result. ``out_dir`` may not equal, contain or lie inside
    an input model directory or any ``protect`` path (``(what, path)``), even with ``overwrite``.
    """
    sources = sources or Sources.from_recipe(recipe)
    layout = validate(recipe, sources)  # every error surfaces before anything is written
    tokenizer_folder = _tokenizer_folder(recipe, sources)
    generation = contained_files(sources.reference.path, ["generation_config.json"], "generation config")
    tokenizer = contained_files(tokenizer_folder, TOKENIZER_FILES, "tokenizer file")
    entries = [(o.name, _shape(sources, o), _out_dtype(recipe, sources, o)) for o in layout]

    shards: list[list[int]] = [[]]
    used = 0
    for i, (_, shape, dtype) in enumerate(entries):
        size = _nbytes(shape, dtype)
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    out_dir = Path(out_dir)
    inputs = [("input model", p) for d in dict.fromkeys(sources.dirs.values())
              for p in (d.path, getattr(d, "adapter_path", None)) if p is not None]  # a LoRA adapter too
    inputs.append(("tokenizer source", tokenizer_folder))
    with atomic_directory(out_dir, overwrite=overwrite, protect=[*inputs, *(protect or [])]) as tmp:
        stream = merged_tensors(recipe, sources, layout)
        done, weight_map, total = 0, {}, 0
        for fname, idx in zip(names, shards):
            header, sizes = _header([entries[i] for i in idx])
            with open(tmp / fname, "wb") as f:
                f.write(header)
                for i, size in zip(idx, sizes):
                    name, tensor = next(stream)
                    assert name == entries[i][0]
                    _write_tensor(f, tensor, entries[i][2], size, name)
                    del tensor
                    weight_map[name] = fname
                    total += size
                    done += 1
                    if progress:
                        progress(done, len(entries))
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_config(recipe, sources, tmp)
        copy_files(generation, tmp)
        if not write_tokenizer(recipe, sources, tokenizer_folder, tmp):  # a re-indexed vocabulary or a chat template
            copy_files(tokenizer, tmp)
        (tmp / "evomerge_recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(model_card(recipe, card_extra))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return out_dir


def _write_config(recipe: Recipe, sources: Sources, out: Path) -> None:
    cfg = lf.output_config(recipe, sources)
    vocab = vocabulary_of(sources)
    if vocab is not None:
        cfg["vocab_size"] = vocab.size
    if recipe.dtype is not None:
        cfg["dtype"] = recipe.dtype
        if "torch_dtype" in cfg:  # older transformers' name for it
            cfg["torch_dtype"] = recipe.dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def _tokenizer_folder(recipe: Recipe, sources: Sources) -> Path:
    """Where the output's tokenizer comes from (``tokenizer_source``; the reference model by default)."""
    src = recipe.tokenizer_source or "base"
    if src in sources.dirs:
        return sources.dirs[src].path
    if src in ("base", "union"):
        return sources.reference.path
    return Path(src)


def copy_files(files: list[Path], out: Path) -> None:
    """Copy checked input files (:func:`~evomerge.safety.contained_files`) into output directory
    ``out``: contents only, so their modes follow the umask like every other output file."""
    for src in files:
        shutil.copyfile(src, out / src.name)


def model_card(recipe: Recipe, extra: str = "") -> str:
    """A Hugging Face model card: front matter, parents, method and the full recipe."""
    parents = list(recipe.model_paths().values())
    front = ["---", "library_name: transformers", "tags:", "- evomerge", "- merge"]
    if recipe.base_model:
        front.append(f"base_model: {json.dumps(recipe.base_model)}")
    front.append("---")
    lines = [
        *front, "", "# Merged model", "",
        f"Made with evomerge {__version__} using the "
        f"`{recipe.merge_method}` merge method"
        + (f" and a layer flow of {len(recipe.layer_flow.slots)} blocks" if recipe.layer_flow else "") + ".",
        "", "## Parents", "",
        *(f"- {md_code(p)}" + (" (base)" if p == recipe.base_model else "") for p in dict.fromkeys(parents)),
    ]
    if recipe.layer_flow is not None:
        lines += ["", "Layer-flow input scales are folded into each block's output projections, so this "
                  "is a standard checkpoint; the exact scales are in the recipe below."]
    if extra:
        lines += ["", extra.strip()]
    lines += ["", "## Recipe", "", *md_fence(recipe.to_yaml(), "yaml"), ""]
    return "\n".join(lines)
