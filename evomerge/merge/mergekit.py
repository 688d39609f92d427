"""mergekit YAML ⇄ evomerge :class:`~evomerge.recipe.Recipe`, for the subset that maps exactly.

mergekit (https://github.com/arcee-ai/mergekit) is the de-facto format for merge configs.
evomerge's recipe already uses its shapes (``merge_method``, ``base_model``,
``models[].parameters``, scalar / gradient / ``{filter, value}`` parameter values), so most
configs translate one to one. What needs care, and is handled here:

* **Which inputs take part.** mergekit adds ``base_model`` to the inputs when it is not listed.
  For base-relative methods (task arithmetic, TIES, DARE, breadcrumbs, DELLA, SLERP, model
  stock) the base is evomerge's ``base_model`` and never one of ``models``; for ``linear`` it is
  an ordinary weighted input, so import lists it explicitly (export leaves ``base_model`` out).
* **Gradient positions.** mergekit 0.1.5 evaluates gradients at t = i/(L−1) for block i and at
  t = 0 for *all* other tensors (embeddings, final norm, lm_head — measured, see
  docs/operators.md). Where evomerge's own reading of a gradient differs at those tensors,
  import writes the value as :class:`GroupValues` and export adds filters for the exact tensor
  names (read from the model directory), so the weights are identical either way.
* **Scopes.** mergekit looks a parameter up in the model's ``parameters``, then the slice's,
  then the global ones; a filter list that matches nothing falls through. The engine does the
  same for model → global, so slice-level parameters are chained into the global ones.
* **Slices.** A passthrough stack of single-source slices becomes a ``layer_flow`` (and a layer
  flow whose scales are all 1 and whose blocks come from real models exports back as slices);
  one slice whose sources all span every layer is the ``models:`` form.

Anything that does not map exactly (``modules``, ``tokenizer_source: union``, added tokens,
LoRA references, per-slice merges, evomerge-only options such as ``sign_method: count`` or
layer-flow scales) raises a :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError
from evomerge.io import load_yaml
from evomerge.merge.methods import OPERATORS, Operator, get_operator
from evomerge.models import ModelDir
from evomerge.recipe import (MERGED, FilteredValue, GroupValues, InputModel, LayerFlow, LayerSlot,
                             Recipe, TensorSite, interpolate, resolve)

# Where mergekit 0.1.5 evaluates gradients outside the blocks (MergePlanner.plan_module uses a
# ConfigReader with t=0 for both pre- and post-weights).
MERGEKIT_T_EMBED = 0.0
MERGEKIT_T_HEAD = 0.0

_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "modules"}
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}
# Options evomerge adds to mergekit's methods, with the value that means "as mergekit".
_EVOMERGE_ONLY = {"sign_method": "sum", "rescale_mode": "l1"}
# Operators whose base is a reference point rather than a weighted input.
_BASE_RELATIVE = {name for name, op in OPERATORS.items() if op.needs_base}

# Sites used to read how evomerge resolves a value outside the blocks.
_EMBED_SITE = TensorSite(name="model.embed_tokens.weight", group="embed", num_blocks=2)
_HEAD_SITE = TensorSite(name="lm_head.weight", group="head", num_blocks=2)


# ====================================================================== mergekit → recipe
def load_mergekit(path: str | Path, base_dir: str | Path | None = None) -> Recipe:
    """Read a mergekit YAML file as a recipe."""
    return recipe_from_mergekit(load_yaml(path), base_dir=base_dir, where=str(path))


def recipe_from_mergekit(config: Any, base_dir: str | Path | None = None,
                         where: str = "mergekit config") -> Recipe:
    """Translate a parsed mergekit config (a dict) into a :class:`Recipe`.

    Relative model paths that exist under ``base_dir`` are joined to it; other references are
    kept as written (evomerge reads local directories only and will say so when merging).
    """
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(config).__name__}")
    for key in config:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown mergekit key `{key}`")
    if config.get("modules"):
        raise ConfigError(f"{where}: `modules` (per-module merges) is not supported by evomerge; "
                          "use `models` or `slices`")
    if config.get("chat_template") is not None:
        raise ConfigError(f"{where}: `chat_template` is not supported; set the template on the "
                          "exported tokenizer instead")
    method = config.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError(f"{where}: `merge_method` is missing")
    if method not in OPERATORS:
        raise ConfigError(f"{where}: mergekit merge_method {method!r} has no evomerge operator; "
                          f"supported: {', '.join(sorted(OPERATORS))}")
    op = get_operator(method)
    has_models, has_slices = bool(config.get("models")), bool(config.get("slices"))
    if has_models == has_slices:
        raise ConfigError(f"{where}: give exactly one of `models` or `slices`")

    ctx = _Importer(op, where, base_dir)
    base = ctx.path(config.get("base_model"), "base_model")
    global_params = ctx.params(config.get("parameters"), "parameters")

    layer_flow = None
    if has_models:
        entries = _as_list(config["models"], f"{where}: models")
        inputs = [(ctx.model_ref(e, f"models[{i}]"), ctx.params(_get(e, "parameters"), f"models[{i}].parameters"))
                  for i, e in enumerate(entries)]
        if method == "passthrough":
            if len(inputs) != 1:
                raise ConfigError(f"{where}: passthrough with `models` copies exactly one model, got {len(inputs)}")
            if "scale" in inputs[0][1] or "scale" in global_params:
                raise ConfigError(f"{where}: passthrough `scale` is not supported by evomerge recipes")
    else:
        slices = _as_list(config["slices"], f"{where}: slices")
        if method == "passthrough":
            inputs, layer_flow = ctx.passthrough_slices(slices, base)
            if "scale" in global_params:
                raise ConfigError(f"{where}: parameters.scale (passthrough scaling) is not supported")
        else:
            inputs, slice_params = ctx.merge_slice(slices, base)
            global_params = {k: _chain(v, global_params.get(k)) for k, v in slice_params.items()} | {
                k: v for k, v in global_params.items() if k not in slice_params}

    if method in _BASE_RELATIVE:
        if base is None:
            raise ConfigError(f"{where}: merge_method {method} needs `base_model`")
        inputs = [(p, params) for p, params in inputs if p != base]
    elif method == "linear" and base is not None and base not in [p for p, _ in inputs]:
        inputs.append((base, {}))  # mergekit adds the base as a weighted input

    models = _with_aliases(inputs, reserved={"base", MERGED} if base is not None else {MERGED})
    if layer_flow is not None:
        alias_of = {m.model: m.alias for m in models}
        alias_of[base] = "base"
        layer_flow = LayerFlow(embed_from=alias_of[layer_flow[0]],
                               slots=[LayerSlot(model=alias_of[p], layer=i) for p, i in layer_flow[1]])
        if base is not None:
            models = [m for m in models if m.model != base]

    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is not None:
        if dtype not in _DTYPES:
            key = "out_dtype" if config.get("out_dtype") else "dtype"
            raise ConfigError(f"{where}: {key} {dtype!r} is not one of {', '.join(sorted(set(_DTYPES.values())))}")
        dtype = _DTYPES[dtype]

    tok = ctx.tokenizer(config)
    if tok is not None and tok != "base":
        tok_path = ctx.path(tok, "tokenizer_source")
        if tok_path == base:
            tok = "base"
        else:
            tok = next((m.alias for m in models if m.model == tok_path), tok_path)

    data = {"merge_method": method, "base_model": base, "models": models,
            "parameters": global_params, "layer_flow": layer_flow, "dtype": dtype,
            "tokenizer_source": tok}
    return Recipe.from_dict(data, where)


class _Importer:
    def __init__(self, op: Operator, where: str, base_dir: str | Path | None):
        self.op, self.where = op, where
        self.base_dir = Path(base_dir) if base_dir is not None else None

    # ------------------------------------------------------------------ references
    def path(self, ref: Any, key: str) -> str | None:
        if ref is None:
            return None
        if isinstance(ref, dict):  # ModelReference as a mapping
            if ref.get("lora"):
                raise ConfigError(f"{self.where}: {key}: LoRA references are not supported; merge the adapter first")
            extra = set(ref) - {"model", "lora"}
            if extra:
                raise ConfigError(f"{self.where}: {key}.{sorted(extra)[0]} is not supported")
            ref = ref.get("model")
            if isinstance(ref, dict):
                ref = ref.get("path")
        if not isinstance(ref, str) or not ref:
            raise ConfigError(f"{self.where}: {key} must be a model path, got {ref!r}")
        if "+" in ref:
            raise ConfigError(f"{self.where}: {key} {ref!r}: LoRA references (model+lora) are not "
                              "supported; merge the adapter first")
        if self.base_dir is not None and not Path(ref).is_absolute() and (self.base_dir / ref).exists():
            return str(self.base_dir / ref)
        return ref

    def model_ref(self, entry: Any, key: str) -> str:
        if isinstance(entry, str):
            return self.path(entry, key)
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{self.where}: {key} must be a mapping with `model`")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"{self.where}: {key}.{sorted(extra)[0]} is not supported")
        return self.path(entry["model"], f"{key}.model")

    def tokenizer(self, config: dict) -> str | None:
        tok = config.get("tokenizer_source")
        if config.get("tokenizer") is not None:
            t = config["tokenizer"]
            if not isinstance(t, dict):
                raise ConfigError(f"{self.where}: tokenizer must be a mapping")
            for key in t:
                if key != "source" and t[key]:
                    raise ConfigError(f"{self.where}: tokenizer.{key} (vocabulary surgery) is not supported")
            tok = t.get("source")
        if tok == "union":
            raise ConfigError(f"{self.where}: tokenizer_source: union (vocabulary union) is not supported; "
                              "use `base` or one model")
        return tok

    # ------------------------------------------------------------------ parameters
    def check_name(self, name: str, key: str, per_model_only: bool) -> None:
        known = set(self.op.model_params) | (set() if per_model_only else set(self.op.global_params))
        if name not in known:
            raise ConfigError(f"{self.where}: {key} is not a parameter of {self.op.name} "
                              f"(known: {', '.join(sorted(known)) or 'none'})")

    def params(self, raw: Any, key: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.where}: {key} must be a mapping")
        out = {}
        for name, value in raw.items():
            self.check_name(name, f"{key}.{name}", per_model_only=key.startswith(("models", "slices[0].sources")))
            v = self.value(name, value, f"{key}.{name}")
            if v is not None:
                out[name] = v
        return out

    def value(self, name: str, value: Any, key: str) -> Any:
        """A mergekit parameter setting as an evomerge parameter value (same weights)."""
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, str) and name not in self.op.choices:
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{self.where}: {key} = {value!r} is not a number") from None
        if isinstance(value, (bool, int, float, str)):
            return value
        if not isinstance(value, list):
            raise ConfigError(f"{self.where}: {key}: unexpected value {value!r}")
        if not value:
            return None
        if all(isinstance(v, dict) for v in value):
            entries = []
            for i, cond in enumerate(value):
                extra = set(cond) - {"filter", "value"}
                if extra or "value" not in cond:
                    raise ConfigError(f"{self.where}: {key}[{i}] must be {{filter, value}}")
                inner = self.value(name, cond["value"], f"{key}[{i}].value")
                if isinstance(inner, list) and inner and isinstance(inner[0], FilteredValue):
                    raise ConfigError(f"{self.where}: {key}[{i}].value: nested filters are not supported")
                entries.append(FilteredValue(filter=cond.get("filter"), value=inner))
            return entries
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return gradient_from_mergekit([float(v) for v in value])
        raise ConfigError(f"{self.where}: {key}: only numeric gradients are supported, got {value!r}")

    # ------------------------------------------------------------------ slices
    def passthrough_slices(self, slices: list, base: str | None):
        """Single-source slices → (inputs, (embed model, [(model, layer), ...]))."""
        order: list[str] = []
        slots: list[tuple[str, int]] = []
        for i, s in enumerate(slices):
            key = f"slices[{i}]"
            self._plain_slice(s, key, base)
            sources = _as_list(s.get("sources"), f"{self.where}: {key}.sources")
            if len(sources) != 1:
                raise ConfigError(f"{self.where}: {key}.sources: passthrough takes one source per slice, "
                                  f"got {len(sources)}")
            src = sources[0]
            if _get(src, "parameters"):
                raise ConfigError(f"{self.where}: {key}.sources[0].parameters (e.g. scale) is not "
                                  "supported in layer flows")
            p = self.model_ref({k: v for k, v in src.items() if k != "layer_range"}, f"{key}.sources[0]")
            a, b = self._range(src, f"{key}.sources[0]")
            if p not in order:
                order.append(p)
            slots.extend((p, layer) for layer in range(a, b))
        first = slots[0][0]
        if slots[-1][0] != first:
            raise ConfigError(f"{self.where}: slices: the first slice ({first}) gives the embeddings and the "
                              f"last ({slots[-1][0]}) the final norm/head; an evomerge layer flow takes both "
                              "from one model")
        return [(p, {}) for p in order], (first, slots)

    def merge_slice(self, slices: list, base: str | None):
        """One slice whose sources span every layer → (inputs, slice parameters)."""
        if len(slices) != 1:
            raise ConfigError(f"{self.where}: slices: per-slice merges (several slices with "
                              f"{self.op.name}) are not supported; use one slice spanning all layers")
        s = slices[0]
        self._plain_slice(s, "slices[0]", base)
        inputs = []
        for j, src in enumerate(_as_list(s.get("sources"), f"{self.where}: slices[0].sources")):
            key = f"slices[0].sources[{j}]"
            p = self.model_ref({k: v for k, v in src.items() if k != "layer_range"}, key)
            a, b = self._range(src, key)
            n = _num_layers(p)
            if n is None:
                raise ConfigError(f"{self.where}: {key}: cannot check that layer_range [{a}, {b}] spans every "
                                  f"layer of {p} (no readable config.json); use `models:` instead")
            if (a, b) != (0, n):
                raise ConfigError(f"{self.where}: {key}.layer_range [{a}, {b}] does not span all {n} layers of "
                                  f"{p}; only whole-model merges map onto a recipe")
            inputs.append((p, self.params(_get(src, "parameters"), f"{key}.parameters")))
        slice_params = self.params(s.get("parameters"), "slices[0].parameters")
        return inputs, slice_params

    def _plain_slice(self, s: Any, key: str, base: str | None) -> None:
        if not isinstance(s, dict):
            raise ConfigError(f"{self.where}: {key} must be a mapping with `sources`")
        extra = set(s) - {"sources", "parameters", "base_model"}
        if s.get("residual_weight") is not None or extra - {"residual_weight"}:
            bad = "residual_weight" if s.get("residual_weight") is not None else sorted(extra)[0]
            raise ConfigError(f"{self.where}: {key}.{bad} is not supported")
        if s.get("base_model") is not None and self.path(s["base_model"], f"{key}.base_model") != base:
            raise ConfigError(f"{self.where}: {key}.base_model differs from base_model; per-slice bases are "
                              "not supported")

    def _range(self, src: dict, key: str) -> tuple[int, int]:
        r = src.get("layer_range")
        if (not isinstance(r, (list, tuple)) or len(r) != 2 or not all(isinstance(x, int) for x in r)
                or not 0 <= r[0] < r[1]):
            raise ConfigError(f"{self.where}: {key}.layer_range must be [start, end) with 0 ≤ start < end, got {r!r}")
        return int(r[0]), int(r[1])


def gradient_from_mergekit(values: list[float]) -> list[float] | GroupValues:
    """A mergekit gradient as a recipe value with the same per-tensor values.

    Blocks agree (t = i/(L−1) in both); outside the blocks mergekit reads the gradient at
    ``MERGEKIT_T_EMBED`` / ``MERGEKIT_T_HEAD``, so when evomerge's reading differs there the
    value becomes explicit :class:`GroupValues`.
    """
    if len(values) == 1:
        return values[0]
    embed, head = interpolate(values, MERGEKIT_T_EMBED), interpolate(values, MERGEKIT_T_HEAD)
    if resolve(values, _EMBED_SITE) == embed and resolve(values, _HEAD_SITE) == head:
        return values
    return GroupValues(embed=embed, layers=values, head=head)


def _chain(primary: Any, fallback: Any) -> Any:
    """A value resolving like ``primary``, or ``fallback`` where ``primary``'s filters miss."""
    if fallback is None or not (isinstance(primary, list) and primary and isinstance(primary[0], FilteredValue)):
        return primary
    if any(f.filter in (None, "*") for f in primary):
        return primary
    tail = fallback if isinstance(fallback, list) and fallback and isinstance(fallback[0], FilteredValue) \
        else [FilteredValue(filter=None, value=fallback)]
    return [*primary, *tail]


def _with_aliases(inputs: list[tuple[str, dict]], reserved: set[str]) -> list[InputModel]:
    """Input models; ``name`` is set only where directory names would collide."""
    names = [Path(p).name for p, _ in inputs]
    models = []
    used = set(reserved)
    for (p, params), n in zip(inputs, names):
        alias = n
        if names.count(n) > 1 or alias in reserved or alias in used:
            i = 1
            while f"{n}_{i}" in used:
                i += 1
            alias = f"{n}_{i}"
        used.add(alias)
        models.append(InputModel(model=p, name=None if alias == n else alias, parameters=params))
    return models


def _num_layers(path: str) -> int | None:
    cfg = Path(path) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in data:
            return int(data[key])
    return None


def _get(entry: Any, key: str) -> Any:
    return entry.get(key) if isinstance(entry, dict) else None


def _as_list(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list")
    return value


# ====================================================================== recipe → mergekit
def recipe_to_mergekit(recipe: Recipe) -> dict:
    """Translate a recipe into a mergekit config (a dict, ready for ``yaml.safe_dump``).

    Raises :class:`ConfigError` naming what mergekit cannot express. Names and ``seed`` have
    no mergekit counterpart and are dropped (mergekit's random methods are unseeded).
    """
    op = get_operator(recipe.merge_method)
    exp = _Exporter(recipe)
    out: dict[str, Any] = {}
    paths = recipe.model_paths()

    if recipe.layer_flow is not None:
        out["slices"] = exp.slices()
        out["merge_method"] = "passthrough"
    else:
        if recipe.merge_method == "passthrough":
            if len(recipe.models) != 1:
                raise ConfigError("passthrough without a layer_flow exports only with exactly one model")
            if recipe.models[0].parameters or recipe.parameters:
                raise ConfigError("passthrough parameters have no mergekit equivalent here")
        models = []
        if recipe.merge_method == "slerp":
            models.append({"model": recipe.base_model})
        for i, m in enumerate(recipe.models):
            entry: dict[str, Any] = {"model": m.model}
            for k in m.parameters:
                if k not in op.model_params:
                    raise ConfigError(f"models[{i}].parameters.{k} is not a per-model parameter of {op.name}")
            if m.parameters:
                entry["parameters"] = {k: exp.value(v, f"models[{i}].parameters.{k}") for k, v in m.parameters.items()}
            models.append(entry)
        out["models"] = models
        out["merge_method"] = recipe.merge_method
        if recipe.base_model is not None and recipe.merge_method in _BASE_RELATIVE:
            out["base_model"] = recipe.base_model
        params = {}
        for k, v in recipe.parameters.items():
            if k in _EVOMERGE_ONLY:
                if any(x != _EVOMERGE_ONLY[k] for x in _all_values(v)):
                    raise ConfigError(f"parameters.{k} = {v!r} has no mergekit equivalent "
                                      f"(mergekit always uses {_EVOMERGE_ONLY[k]!r})")
                continue
            if k not in op.global_params and k not in op.model_params:
                raise ConfigError(f"parameters.{k} is not a parameter of {op.name}")
            params[k] = exp.value(v, f"parameters.{k}")
        if params:
            out["parameters"] = params
    if recipe.dtype is not None:
        out["dtype"] = "float32"  # evomerge computes in float32 and casts on write
        out["out_dtype"] = recipe.dtype
    if recipe.tokenizer_source is not None:
        tok = recipe.tokenizer_source
        out["tokenizer_source"] = "base" if tok == "base" and "base_model" in out else paths.get(tok, tok)
    order = ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source"]
    return {k: out[k] for k in order if k in out}


def dump_mergekit(config: dict) -> str:
    """YAML text for a mergekit config (numeric gradients in flow style, like mergekit)."""

    class _Dumper(yaml.SafeDumper):
        pass

    def _list(dumper, data):
        flow = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    _Dumper.add_representer(list, _list)
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False)


class _Exporter:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self._ref: ModelDir | None = None

    def reference(self, why: str) -> ModelDir:
        """The recipe's reference model (its tensor names are needed to write exact filters)."""
        if self._ref is None:
            ref = self.recipe.base_model or self.recipe.models[0].model
            try:
                self._ref = ModelDir(ref)
            except Exception as e:
                raise ConfigError(f"{why}: mergekit needs per-tensor filters for this value, and the tensor "
                                  f"names of {ref} could not be read ({e})") from None
        return self._ref

    def value(self, v: Any, key: str) -> Any:
        if isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, GroupValues):
            return self.grouped(v.embed, v.layers, v.head, None, key)
        if isinstance(v, list) and v and isinstance(v[0], FilteredValue):
            out = []
            for i, f in enumerate(v):
                inner = f.value
                if isinstance(inner, (GroupValues, list)) and not isinstance(inner, str):
                    out.extend(self.grouped_entries(inner, f.filter, f"{key}[{i}]"))
                else:
                    out.append(_filtered(f.filter, inner))
            return out
        if isinstance(v, list):
            return self.grouped(resolve(v, _EMBED_SITE), v, resolve(v, _HEAD_SITE), None, key)
        raise ConfigError(f"{key}: cannot export value {v!r}")

    def grouped(self, embed: float, layers: list[float], head: float, flt: str | None, key: str) -> Any:
        if (interpolate(layers, MERGEKIT_T_EMBED) == embed and interpolate(layers, MERGEKIT_T_HEAD) == head):
            return layers if len(layers) > 1 else layers[0]
        return self.grouped_entries(GroupValues(embed=embed, layers=layers, head=head), flt, key)

    def grouped_entries(self, v: GroupValues | list[float], flt: str | None, key: str) -> list[dict]:
        """Filter entries giving ``v`` to the tensors ``flt`` selects (mergekit's first match)."""
        if isinstance(v, list):
            v = GroupValues(embed=resolve(v, _EMBED_SITE), layers=v, head=resolve(v, _HEAD_SITE))
        layers = v.layers if len(v.layers) > 1 else v.layers[0]
        if (interpolate(v.layers, MERGEKIT_T_EMBED) == v.embed
                and interpolate(v.layers, MERGEKIT_T_HEAD) == v.head):
            return [_filtered(flt, layers)]
        ref = self.reference(key)
        names, roles = ref.tensor_names, ref.roles
        entries = []
        for n in names:
            if roles.block_index(n) is not None or (flt not in (None, "*") and flt not in n):
                continue
            clash = [m for m in names if n in m and m != n]
            if clash:
                raise ConfigError(f"{key}: tensor name {n} is part of {clash[0]}, so no mergekit filter "
                                  "selects it alone")
            is_embed = roles.group_of(n) == "embed"
            value = v.embed if is_embed else v.head
            if interpolate(v.layers, MERGEKIT_T_EMBED if is_embed else MERGEKIT_T_HEAD) != value:
                entries.append({"filter": n, "value": value})
        entries.append(_filtered(flt, layers))
        return entries

    def slices(self) -> list[dict]:
        r = self.recipe
        flow = r.layer_flow
        paths = r.model_paths()
        from evomerge.merge.layer_flow import embed_source

        for i, s in enumerate(flow.slots):
            if s.scale != 1.0:
                raise ConfigError(f"layer_flow.slots[{i}].scale = {s.scale:g}: mergekit slices cannot scale "
                                  "the residual stream")
            if s.model == MERGED:
                raise ConfigError(f"layer_flow.slots[{i}].model is the recipe's own merge; mergekit would need "
                                  "a second config for it")
        embed = embed_source(r)
        if embed == MERGED:
            raise ConfigError("layer_flow.embed_from is the recipe's own merge; mergekit cannot express it")
        if flow.slots[0].model != embed or flow.slots[-1].model != embed:
            raise ConfigError(f"layer_flow: mergekit takes the embeddings from the first slice's model and the "
                              f"final norm/head from the last one's; both must be embed_from ({embed})")
        out: list[dict] = []
        for s in flow.slots:
            last = out[-1]["sources"][0] if out else None
            if last is not None and last["model"] == paths[s.model] and last["layer_range"][1] == s.layer:
                last["layer_range"][1] += 1
            else:
                out.append({"sources": [{"model": paths[s.model], "layer_range": [s.layer, s.layer + 1]}]})
        return out


def _filtered(flt: str | None, value: Any) -> dict:
    return {"value": value} if flt is None else {"filter": flt, "value": value}


def _all_values(v: Any) -> list:
    if isinstance(v, list) and v and isinstance(v[0], FilteredValue):
        return [x for f in v for x in _all_values(f.value)]
    return [v]
