"""Hugging Face model directories, read lazily and safely.

A :class:`ModelDir` opens ``config.json`` and the safetensors index (sharded or not) and reads
tensors one at a time, memory-mapped, so that merging never holds a whole model it does not
need. Pickled ``*.bin`` weights are refused unless the caller opts in (``allow_pickle``), and
then they are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from evomerge.architecture import TensorRoles
from evomerge.errors import ModelError
from evomerge.merge.headers import TORCH_DTYPES
from evomerge.recipe import TensorSite
from evomerge.safety import check_weight_dtypes, contained, read_json_object, read_safetensors_header

_ST_NAMES = {v: k for k, v in TORCH_DTYPES.items() if v is not None}  # torch dtype → safetensors code


class ModelDir:
    """A lazily read HF model directory (``config.json`` + safetensors weights)."""

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ModelError(f"{self.path}: model directory not found")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise ModelError(f"{self.path}: no config.json; is this a Hugging Face model directory?")
        self.config: dict = read_json_object(contained(self.path, "config.json", "config file"), "config.json")
        self.allow_pickle = allow_pickle
        self._handles: dict[str, object] = {}
        self._pickle_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._dtypes: dict[str, str] = {}  # tensor → safetensors dtype name, validated
        self._weight_map, self._pickled = self._find_weights()

    # ------------------------------------------------------------------ discovery
    def _find_weights(self) -> tuple[dict[str, str], bool]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json_object(contained(self.path, index.name, "shard index"),
                                          "the shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ModelError(f"{index}: the shard index has no `weight_map` object of tensor → file names; "
                                 "fix or re-download it")
            headers = {}
            for f in sorted(set(weight_map.values())):
                shard = contained(self.path, f, "shard")
                if not shard.is_file():
                    raise ModelError(f"{self.path}: shard {f} listed in the index is missing")
                headers[f] = read_safetensors_header(shard)
            for name, f in weight_map.items():
                if name not in headers[f]:
                    raise ModelError(f"{index}: tensor {name} is mapped to {f}, which does not hold it; "
                                     "fix or re-download the index")
                self._dtypes[name] = headers[f][name]["dtype"]
            check_weight_dtypes(self.path, self._dtypes)
            return dict(weight_map), False
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            weight_map = {}
            for f in files:
                for k, info in read_safetensors_header(contained(self.path, f.name, "weights file")).items():
                    weight_map[k] = f.name
                    self._dtypes[k] = info["dtype"]
            check_weight_dtypes(self.path, self._dtypes)
            return weight_map, False
        pickles = sorted(self.path.glob("*.bin")) + sorted(self.path.glob("*.pt"))
        if pickles:
            if not self.allow_pickle:
                raise ModelError(
                    f"{self.path}: only pickled weights ({pickles[0].name}); pickles can run code, so "
                    "they are refused. Convert to safetensors, or pass --allow-pickle if you trust them"
                )
            weight_map = {}
            for f in pickles:
                for k, t in self._load_pickle(contained(self.path, f.name, "weights file").name).items():
                    weight_map[k] = f.name
                    self._dtypes[k] = _ST_NAMES.get(t.dtype, str(t.dtype)) if isinstance(t, torch.Tensor) else "?"
            check_weight_dtypes(self.path, self._dtypes)
            return weight_map, True
        raise ModelError(f"{self.path}: no *.safetensors weights found")

    def _load_pickle(self, fname: str) -> dict[str, torch.Tensor]:
        if fname not in self._pickle_cache:
            try:
                sd = torch.load(self.path / fname, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001  (pickle/zip errors of every kind, incl. blocked globals)
                first = " ".join(str(e).split())[:160]
                raise ModelError(f"{self.path / fname}: refused to unpickle ({type(e).__name__}: {first}); "
                                 "it is corrupt or wants to run code. Convert trusted weights to safetensors"
                                 ) from None
            if not isinstance(sd, dict):
                raise ModelError(f"{self.path / fname}: not a state dict (a {type(sd).__name__}); "
                                 "convert the weights to safetensors")
            self._pickle_cache[fname] = sd
        return self._pickle_cache[fname]

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            try:
                h = safe_open(str(self.path / fname), framework="pt")
            except Exception as e:  # noqa: BLE001  (the header was validated; this is a backstop)
                raise ModelError(f"{self.path / fname}: cannot open ({e})") from None
            self._handles[fname] = h
        return h

    # ------------------------------------------------------------------ facts
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return archs[0]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "unknown")

    @property
    def num_blocks(self) -> int:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in self.config:
                return int(self.config[key])
        blocks = [self.roles.block_index(n) for n in self.tensor_names]
        return 1 + max((b for b in blocks if b is not None), default=-1)

    @cached_property
    def roles(self) -> TensorRoles:
        """What each tensor is (embedding, block i, head…), from the config's ``model_type``."""
        return TensorRoles.for_config(self.config)

    @cached_property
    def tensor_names(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    @property
    def pickled(self) -> bool:
        """Weights from pickled ``*.bin``/``*.pt`` files (opted into with ``allow_pickle``)."""
        return self._pickled

    @cached_property
    def headers(self):
        """``name → TensorHeader`` (dtype, shape, byte range) from the safetensors headers alone."""
        from evomerge.merge.headers import model_headers

        if self._pickled:
            raise ModelError(f"{self.path}: pickled weights have no safetensors header; convert to safetensors")
        return model_headers(self._weight_map, self.path)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled:
            return tuple(self.get(name).shape)
        return self._header_of(name).shape

    def dtype(self, name: str) -> torch.dtype:
        if self._pickled:
            return self.get(name).dtype
        return self._header_of(name).torch_dtype

    def _header_of(self, name: str):
        h = self.headers.get(name)
        if h is None:
            raise ModelError(f"{self.path}: no tensor named {name}")
        return h

    def site(self, name: str) -> TensorSite:
        return self.roles.site(name, self.num_blocks)

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor (memory-mapped for safetensors)."""
        fname = self._weight_map.get(name)
        if fname is None:
            raise ModelError(f"{self.path}: no tensor named {name}")
        if self._pickled:
            t = self._load_pickle(fname)[name]
        else:
            t = self._handle(fname).get_tensor(name)
        return t.to(device) if str(device) != "cpu" else t

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"


def check_compatible(base: ModelDir, others: list[ModelDir], same_depth: bool = True) -> None:
    """Raise on the first difference that makes tensor-wise merging meaningless.

    With ``same_depth=False`` (layer flows) models may differ in their number of blocks, but
    every block must have the same tensors and shapes.
    """
    def layout(m: ModelDir) -> dict[str, str]:
        if same_depth:
            return {n: n for n in m.tensor_names}
        return {m.roles.block_template(n): n for n in m.tensor_names}

    ours = layout(base)
    for other in others:
        if other.model_type != base.model_type:
            raise ModelError(
                f"architecture mismatch: {base.path} is {base.model_type} ({base.architecture}) "
                f"but {other.path} is {other.model_type} ({other.architecture})"
            )
        theirs = layout(other)
        if ours.keys() != theirs.keys():
            only_base = sorted(ours.keys() - theirs.keys())
            if only_base:
                raise ModelError(f"tensor {ours[only_base[0]]} is in {base.path} but not in {other.path}")
            only_other = sorted(theirs.keys() - ours.keys())
            raise ModelError(f"tensor {theirs[only_other[0]]} is in {other.path} but not in {base.path}")
        for key, name in ours.items():
            a, b = base.shape(name), other.shape(theirs[key])
            if a != b:
                raise ModelError(
                    f"shape mismatch for {name}: {list(a)} in {base.path} vs {list(b)} in {other.path}"
                )
