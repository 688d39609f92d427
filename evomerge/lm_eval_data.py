"""A ``custom_dataset`` for lm-eval task YAMLs whose data files lie next to the YAML.

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset`` as written, so the
plain ``lm_eval`` CLI resolves relative paths against the *current directory*, while evomerge
resolves them against the *YAML's directory*. Both agree when run from the YAML's directory. A
task that should load the same files from anywhere, in both tools, names this function::

    custom_dataset: !function evomerge.lm_eval_data.load_dataset
    dataset_kwargs:
      data_files: {validation: data/dev.jsonl, test: data/test.jsonl}   # relative to this YAML
      # builder: json        # optional; default from the first file's suffix

lm-eval calls it with the task's metadata (which holds ``config_source``, the YAML's path, in
lm-eval and in evomerge alike) and its ``dataset_kwargs``. Importing this module loads nothing
of evomerge's evaluation stack (no offline switches are set in a plain ``lm_eval`` process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
            ".txt": "text", ".arrow": "arrow"}


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, (list, tuple)):
        return [_resolve(v, base) for v in value]
    if not isinstance(value, str) or "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _first_file(files: Any) -> str:
    while isinstance(files, (dict, list, tuple)):
        files = next(iter(files.values())) if isinstance(files, dict) else files[0]
    return str(files)


def load_dataset(data_files: Any = None, config_source: str | None = None, builder: str | None = None,
                 **_ignored: Any):
    """``datasets.load_dataset(builder, data_files=...)`` with relative paths taken from the YAML's directory."""
    import datasets

    if data_files is None:
        raise ValueError("evomerge.lm_eval_data.load_dataset needs dataset_kwargs.data_files")
    source = Path(config_source) if config_source and config_source != "inline" else None
    base = source.parent if source is not None else Path.cwd()
    if isinstance(data_files, dict):
        files = {split: _resolve(v, base) for split, v in data_files.items()}
    else:
        files = _resolve(data_files, base)
    if builder is None:
        suffix = Path(_first_file(files)).suffix.lower()
        if suffix not in BUILDERS:
            raise ValueError(f"cannot tell the format of {_first_file(files)!r}; set dataset_kwargs.builder "
                             f"({', '.join(sorted(set(BUILDERS.values())))})")
        builder = BUILDERS[suffix]
    return datasets.load_dataset(builder, data_files=files)
