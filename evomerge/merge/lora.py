"""LoRA (PEFT) adapters as merge inputs: a base model plus an adapter, read like a model directory.

A recipe's model may be

* a model directory (``config.json`` + safetensors) — a plain :class:`~evomerge.models.ModelDir`;
* a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) — its
  base is the adapter's ``base_model_name_or_path``, which must be a local model directory;
* mergekit's reference ``path/to/base+path/to/adapter`` — the adapter applied to that base.

:func:`open_model` turns any of them into something the engine reads tensor by tensor. For an
adapter that is :class:`AdaptedModel`: every tensor is the base's, except that a targeted module's
weight gains the adapter's scaled low-rank product — computed for that one tensor when it is read,
never a merged copy of the model::

    W' = W + s · B @ A            (transposed for fan_in_fan_out layers, e.g. GPT-2's Conv1D)
    E' = E + s · (B @ A)ᵀ         (embeddings: lora_embedding_A / lora_embedding_B)
    s  = lora_alpha / r           (lora_alpha / √r with use_rslora; alpha_pattern / rank_pattern
                                   per module, matched like PEFT: the pattern ends the module path)

which is exactly what PEFT's ``merge_and_unload()`` writes. Tensors the adapter stores in full
(``modules_to_save``, trained biases, base layers saved with ``save_embedding_layers``) replace
the base's before the low-rank change is added. DoRA (``use_dora``), adapters on
raw parameters (``target_parameters``, e.g. fused MoE experts) and other PEFT types are refused
with one line: their merged weights are not a low-rank sum of per-tensor terms this reads.

Adapter keys are module paths of the *loaded* model (``transformers`` parameter names); they are
mapped back to the base's checkpoint names with ``transformers``' own conversion rules
(:class:`~evomerge.architecture.ParameterMap`), so e.g. a GPT-NeoX adapter on ``lm_head``
reaches the checkpoint's ``embed_out``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from evomerge.architecture import ParameterMap
from evomerge.errors import ModelError
from evomerge.models import ModelDir
from evomerge.safety import check_weight_dtypes, contained, read_json_object, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def is_adapter(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def split_reference(ref: str) -> tuple[str, str | None]:
    """``base+adapter`` → ``(base, adapter)`` (mergekit's syntax); an existing path (even one
    with a ``+`` in it) or a plain path → ``(path, None)``."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise ModelError(f"{ref}: a model reference is PATH or BASE+ADAPTER (one '+')")
    return parts[0], parts[1]


def open_model(ref: str | Path, allow_pickle: bool = False) -> "ModelDir | AdaptedModel":
    """A model reference (directory, adapter directory, or ``base+adapter``) ready to read."""
    base, adapter = split_reference(str(ref))
    if adapter is None and is_adapter(base):
        base, adapter = None, base
    if adapter is None:
        return ModelDir(base, allow_pickle=allow_pickle)
    if not is_adapter(adapter):
        raise ModelError(f"{adapter}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    config = _read_config(Path(adapter).expanduser())
    if base is None:
        base = config.get("base_model_name_or_path")
        if not base or not Path(base).expanduser().is_dir():
            raise ModelError(f"{adapter}: its base model {base!r} is not a local directory; "
                             f"write the reference as BASE+{adapter}")
    return AdaptedModel(ModelDir(base, allow_pickle=allow_pickle), adapter, config)


def _read_config(adapter: Path) -> dict:
    return read_json_object(contained(adapter, ADAPTER_CONFIG, "adapter config"), ADAPTER_CONFIG)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first pattern that ends ``module`` (as a regex)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class AdaptedModel:
    """A base :class:`ModelDir` with a LoRA adapter applied per tensor on read.

    Everything but :meth:`get` (names, shapes, dtypes, config, roles…) is the base's; ``path`` is
    the base's directory too (its config, tokenizer and architecture are the model's).
    """

    def __init__(self, base: ModelDir, adapter: str | Path, config: dict):
        self.base = base
        self.adapter_path = Path(adapter).expanduser()
        where = self.adapter_path
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise ModelError(f"{where}: peft_type {config.get('peft_type')!r}; only LoRA adapters can be merged")
        for key, what in (("use_dora", "DoRA"), ("target_parameters", "LoRA on raw parameters"),
                          ("layer_replication", "layer replication"), ("use_bdlora", "block-diagonal LoRA")):
            if config.get(key):
                raise ModelError(f"{where}: {what} ({key}) adapters are not supported")
        weights = self.adapter_path / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = self.adapter_path / "adapter_model.bin"
            raise ModelError(f"{where}: no {ADAPTER_WEIGHTS}" + (
                " (only a pickled adapter_model.bin, which is refused: convert it to safetensors)"
                if pickled.is_file() else ""))
        weights = contained(self.adapter_path, ADAPTER_WEIGHTS, "adapter weights")
        check_weight_dtypes(weights, {k: v["dtype"] for k, v in read_safetensors_header(weights).items()})
        try:
            self._file = safe_open(str(weights), framework="pt")
        except Exception as e:  # noqa: BLE001  (the header was validated; this is a backstop)
            raise ModelError(f"{weights}: cannot open ({e})") from None
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        r, alpha, rslora = config.get("r", 8), config.get("lora_alpha", 8), bool(config.get("use_rslora", False))

        # adapter keys are in-memory module paths: map them back to checkpoint names
        to_checkpoint = ParameterMap.for_config(base.config).checkpoint_names(base.tensor_names)
        low_rank: dict[str, dict[str, str]] = {}
        self._full: dict[str, str] = {}  # checkpoint name → adapter key stored in full
        for key in self._file.keys():
            name = key.removeprefix(_PEFT_PREFIX)
            m = _LORA_KEY.match(name)
            if m:
                low_rank.setdefault(m.group("module"), {})[m.group("which")] = key
                continue
            if "lora_" in name or "magnitude" in name:
                raise ModelError(f"{where}: adapter tensor {key} is not supported (plain LoRA only)")
            full = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            self._full[self._resolve(to_checkpoint, full, key)] = key
        self._low_rank: dict[str, tuple[str, str, bool, float]] = {}  # name → (A, B, embedding, scale)
        for module, keys in low_rank.items():
            embedding = "lora_embedding_A" in keys
            a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if embedding
                            else ("lora_A.weight", "lora_B.weight"))
            if set(keys) != {a_key, b_key}:
                raise ModelError(f"{where}: module {module} has {sorted(keys)}, needs {a_key} and {b_key}")
            rank = _pattern_value(config.get("rank_pattern"), module, r)
            a = _pattern_value(config.get("alpha_pattern"), module, alpha)
            scale = a / math.sqrt(rank) if rslora else a / rank
            name = self._resolve(to_checkpoint, f"{module}.weight", keys[a_key])
            self._low_rank[name] = (keys[a_key], keys[b_key], embedding, scale)
            self._check_shape(name, keys[a_key], keys[b_key], embedding)

    def _resolve(self, to_checkpoint: dict[str, str], name: str, key: str) -> str:
        if name in self.base:
            return name
        if name in to_checkpoint:
            return to_checkpoint[name]
        raise ModelError(f"{self.adapter_path}: adapter tensor {key} targets {name}, which "
                         f"{self.base.path} does not have (is it the adapter's base model?)")

    def _check_shape(self, name: str, a_key: str, b_key: str, embedding: bool) -> None:
        a = tuple(self._file.get_slice(a_key).get_shape())
        b = tuple(self._file.get_slice(b_key).get_shape())
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ModelError(f"{self.adapter_path}: {a_key} {list(a)} and {b_key} {list(b)} are not a low-rank pair")
        want = (a[1], b[0]) if embedding or self.fan_in_fan_out else (b[0], a[1])
        if self.base.shape(name) != want:
            raise ModelError(f"{self.adapter_path}: the adapter of {name} gives shape {list(want)}, "
                             f"{self.base.path} has {list(self.base.shape(name))}")

    # ------------------------------------------------------------------ the ModelDir surface
    def __getattr__(self, item):
        return getattr(self.base, item)

    def __contains__(self, name: str) -> bool:
        return name in self.base

    @property
    def name(self) -> str:
        return self.adapter_path.name

    def delta(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor | None:
        """The adapter's float32 change to tensor ``name`` (``None`` where it changes nothing)."""
        lr = self._low_rank.get(name)
        if lr is None:
            return None
        a_key, b_key, embedding, scale = lr
        a = self._file.get_tensor(a_key).to(device=device, dtype=torch.float32)
        b = self._file.get_tensor(b_key).to(device=device, dtype=torch.float32)
        product = b @ a
        return (product.T if embedding or self.fan_in_fan_out else product) * scale

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor ``name`` of the adapted model (the base's dtype): the base's tensor — or the one
        the adapter stores in full (``modules_to_save``, trained biases, the base layers PEFT saves
        with ``save_embedding_layers``) — plus the low-rank change."""
        if name in self._full:
            t = self._file.get_tensor(self._full[name])
            expected = self.base.shape(name)
            if tuple(t.shape) != expected:
                raise ModelError(f"{self.adapter_path}: {self._full[name]} has shape {list(t.shape)}, "
                                 f"{name} of {self.base.path} has {list(expected)}")
            t = t.to(device=device, dtype=self.base.dtype(name))
        else:
            t = self.base.get(name, device)
        d = self.delta(name, t.device)
        return t if d is None else (t.float() + d).to(t.dtype)

    def __repr__(self) -> str:
        return f"AdaptedModel({str(self.base.path)!r} + {str(self.adapter_path)!r})"
