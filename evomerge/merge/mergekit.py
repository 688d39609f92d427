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
* **Slices.** mergekit reads a gradient inside a slice of n layers at t = i/(n−1) (t = 1 when
  n = 1) and plans the embeddings with the first slice's sources and parameters and the final
  norm/head with the last slice's (both at t = 0). A passthrough stack of single-source slices
  becomes a ``layer_flow`` (embeddings from the first slice's model, ``head_from`` the last's;
  a source/slice ``scale`` becomes the slot's ``tensor_scale``). Slices merged with a method must
  merge the same models, each block with the same block of every model; their parameters become
  per-block :class:`GroupValues` and, when the slices are not the identity 0…L−1, the blocks are
  stacked by a layer flow of the recipe's own merge.
* **modules** with one module (text models) is the same config one level down; its parameters
  rank between the slices' and the global ones.
* **Ignored keys.** mergekit drops keys it does not know and never reads parameters a method
  does not define; import drops them too, with one warning line each.
* **Carried, not interpreted here:** ``chat_template``, ``tokenizer_source`` (``union`` included)
  and ``model+lora`` references go into the recipe as written; vocabulary alignment and LoRA
  experts are the tokenizer/LoRA support's job.

What does not map exactly (several modules, ``tokenizer.tokens`` surgery, ``residual_weight``,
per-slice bases, slices that merge different models or different blocks of them, evomerge-only
options such as ``sign_method: count`` or layer-flow scales on export) raises a
:class:`ConfigError` that names the key. Multi-document (mergekit-multi) files and format
detection for ``evomerge merge`` live in :mod:`evomerge.merge.mergekit_multi`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from evomerge.errors import ConfigError
from evomerge.io import load_yaml_documents
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
# mergekit 0.1.5's methods that evomerge implements with the same semantics (the others, e.g.
# LiNeS or Fisher averaging, cannot be exported).
MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "passthrough",
                    "sce", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion"}
# Options evomerge adds to mergekit's methods, with the value that means "as mergekit".
_EVOMERGE_ONLY = {"sign_method": "sum", "rescale_mode": "l1"}
# Operators whose base is a reference point rather than a weighted input (mergekit's
# ``non_base`` methods); for the others mergekit adds the base as an ordinary input.
_BASE_RELATIVE = {name for name, op in OPERATORS.items() if op.needs_base or op.optional_base}

# Sites used to read how evomerge resolves a value outside the blocks.
_EMBED_SITE = TensorSite(name="model.embed_tokens.weight", group="embed", num_blocks=2)
_HEAD_SITE = TensorSite(name="lm_head.weight", group="head", num_blocks=2)


# ====================================================================== mergekit → recipe
Warn = Callable[[str], None]


def _stderr_warning(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def load_mergekit(path: str | Path, base_dir: str | Path | None = None, warn: Warn | None = None) -> Recipe:
    """Read a (single-document) mergekit YAML file as a recipe."""
    docs = load_yaml_documents(path)
    if len(docs) > 1:
        raise ConfigError(f"{path}: {len(docs)} merges in one file (mergekit-multi); one recipe holds one merge — "
                          "run `evomerge merge` on the file, which merges them in order")
    return recipe_from_mergekit(docs[0] if docs else None, base_dir=base_dir, where=str(path), warn=warn)


def recipe_from_mergekit(config: Any, base_dir: str | Path | None = None,
                         where: str = "mergekit config", warn: Warn | None = None) -> Recipe:
    """Translate a parsed mergekit config (a dict) into a :class:`Recipe`.

    Relative model paths that exist under ``base_dir`` are joined to it; other references are
    kept as written (evomerge reads local directories only and will say so when merging).
    Keys mergekit itself ignores (its configuration models drop unknown keys, its methods never
    read parameters they do not define) are dropped with one warning line each through ``warn``
    (default: stderr).
    """
    warn = warn or _stderr_warning
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(config).__name__}")
    for key in config:
        if key not in _TOP_KEYS:
            warn(f"{where}: `{key}` is not a mergekit key; ignored (as mergekit does)")
    config = _flatten_modules(config, where, warn)
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

    ctx = _Importer(op, where, base_dir, warn)
    base = ctx.path(config.get("base_model"), "base_model")
    global_params = ctx.params(config.get("parameters"), "parameters")
    module_params = ctx.params(config.get("_module_parameters"), "modules.*.parameters")
    global_params = _chain_params(module_params, global_params)

    layer_flow = None
    if has_models:
        entries = _as_list(config["models"], f"{where}: models")
        inputs = [(ctx.model_ref(e, f"models[{i}]"), ctx.params(_get(e, "parameters"), f"models[{i}].parameters"))
                  for i, e in enumerate(entries)]
        if method == "passthrough" and len(inputs) != 1:
            raise ConfigError(f"{where}: passthrough with `models` copies exactly one model, got {len(inputs)}")
    else:
        slices = _as_list(config["slices"], f"{where}: slices")
        if method == "passthrough":
            inputs, layer_flow = ctx.passthrough_slices(
                slices, base, [config.get("_module_parameters"), config.get("parameters")])
            global_params = {}
        else:
            inputs, slice_params, layer_flow = ctx.merge_slices(slices, base)
            global_params = _chain_params(slice_params, global_params)

    if method in _BASE_RELATIVE:
        if base is None and op.needs_base:
            raise ConfigError(f"{where}: merge_method {method} needs `base_model`")
        inputs = [(p, params) for p, params in inputs if p != base]
    elif method != "passthrough" and base is not None and base not in [p for p, _ in inputs]:
        inputs.append((base, {}))  # mergekit adds the base as a weighted input

    models = _with_aliases(inputs, reserved={"base", MERGED} if base is not None else {MERGED})
    if layer_flow is not None:
        alias_of = {m.model: m.alias for m in models}
        alias_of[MERGED] = MERGED
        if base is not None:
            alias_of[base] = "base"
        embed, head, slots = layer_flow
        layer_flow = LayerFlow(
            embed_from=alias_of[embed] if embed != MERGED else None,
            head_from=alias_of[head] if head != embed else None,
            slots=[LayerSlot(model=alias_of[p], layer=i, tensor_scale=sc) for p, i, sc in slots])
        if base is not None and method == "passthrough":
            models = [m for m in models if m.model != base]

    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is not None:
        if dtype not in _DTYPES:
            key = "out_dtype" if config.get("out_dtype") else "dtype"
            raise ConfigError(f"{where}: {key} {dtype!r} is not one of {', '.join(sorted(set(_DTYPES.values())))}")
        dtype = _DTYPES[dtype]

    tok = ctx.tokenizer(config)
    if tok is not None and tok not in ("base", "union"):
        tok_path = ctx.path(tok, "tokenizer_source")
        if tok_path == base:
            tok = "base"
        else:
            tok = next((m.alias for m in models if m.model == tok_path), tok_path)
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{where}: chat_template must be a template name or Jinja text")

    data = {"merge_method": method, "base_model": base, "models": models,
            "parameters": global_params, "layer_flow": layer_flow, "dtype": dtype,
            "tokenizer_source": tok, "chat_template": template}
    return Recipe.from_dict(data, where)


def _flatten_modules(config: dict, where: str, warn: Warn) -> dict:
    """mergekit's ``modules`` form for single-module (text-only) models: the one module's
    ``models``/``slices`` become the top level; its ``parameters`` rank between the slices'
    and the global ones, as in mergekit's lookup."""
    modules = config.get("modules")
    if not modules:
        return config
    if not isinstance(modules, dict) or len(modules) != 1:
        names = sorted(modules) if isinstance(modules, dict) else modules
        raise ConfigError(f"{where}: modules {names}: evomerge merges single-module (text) models; "
                          "a config with several modules targets a multimodal architecture")
    (name, module), = modules.items()
    if not isinstance(module, dict):
        raise ConfigError(f"{where}: modules.{name} must be a mapping")
    if config.get("models") or config.get("slices"):
        raise ConfigError(f"{where}: give `models`/`slices` either at the top level or in modules.{name}, not both")
    for key in module:
        if key not in ("models", "slices", "parameters"):
            warn(f"{where}: modules.{name}.{key} is not a mergekit key; ignored (as mergekit does)")
    flat = {k: v for k, v in config.items() if k != "modules"}
    flat.update({k: module[k] for k in ("models", "slices") if module.get(k)})
    flat["_module_parameters"] = module.get("parameters")
    return flat


def _chain_params(primary: dict, fallback: dict) -> dict:
    """Parameters looked up in ``primary`` first, then (per tensor, where filters miss) ``fallback``."""
    return {k: _chain(v, fallback.get(k)) for k, v in primary.items()} | {
        k: v for k, v in fallback.items() if k not in primary}


class _Importer:
    def __init__(self, op: Operator, where: str, base_dir: str | Path | None, warn: Warn):
        self.op, self.where, self.warn = op, where, warn
        self.base_dir = Path(base_dir) if base_dir is not None else None

    # ------------------------------------------------------------------ references
    def path(self, ref: Any, key: str) -> str | None:
        """A model reference as a path; ``model+lora`` (string or mapping) is kept as written
        for the LoRA-expert support to resolve."""
        if ref is None:
            return None
        if isinstance(ref, dict):  # ModelReference as a mapping
            lora = ref.get("lora")
            ref = ref.get("model")
            if isinstance(ref, dict):
                ref = ref.get("path")
            if isinstance(lora, dict):
                lora = lora.get("path")
            if lora:
                if not isinstance(ref, str) or not isinstance(lora, str):
                    raise ConfigError(f"{self.where}: {key}: model and lora must be paths")
                ref = f"{ref}+{lora}"
        if not isinstance(ref, str) or not ref:
            raise ConfigError(f"{self.where}: {key} must be a model path, got {ref!r}")
        if self.base_dir is not None and not Path(ref).is_absolute():
            parts = ref.split("+")
            ref = "+".join(str(self.base_dir / p) if (self.base_dir / p).exists() else p for p in parts)
        return ref

    def model_ref(self, entry: Any, key: str) -> str:
        if isinstance(entry, str):
            return self.path(entry, key)
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{self.where}: {key} must be a mapping with `model`")
        for extra in sorted(set(entry) - {"model", "parameters", "layer_range"}):
            self.warn(f"{self.where}: {key}.{extra} is not a mergekit key; ignored (as mergekit does)")
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
        if isinstance(tok, dict):
            tok = self.path(tok, "tokenizer_source")
        return tok

    # ------------------------------------------------------------------ parameters
    def known(self, per_model_only: bool) -> set[str]:
        return set(self.op.model_params) | (set() if per_model_only else set(self.op.global_params))

    def params(self, raw: Any, key: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.where}: {key} must be a mapping")
        out = {}
        per_model = key.startswith("models") or ".sources[" in key
        for name, value in raw.items():
            if name not in self.known(per_model):
                known = ", ".join(sorted(self.known(per_model))) or "none"
                self.warn(f"{self.where}: {key}.{name} is not a parameter of {self.op.name} (known: {known}); "
                          "ignored (as mergekit does)")
                continue
            v = self.value(name, value, f"{key}.{name}")
            if v is not None:
                out[name] = v
        return out

    def value(self, name: str, value: Any, key: str, raw: bool = False) -> Any:
        """A mergekit parameter setting as an evomerge parameter value (same weights). With
        ``raw`` gradients stay plain lists (the caller resolves them at its own positions)."""
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
                inner = self.value(name, cond["value"], f"{key}[{i}].value", raw)
                if isinstance(inner, list) and inner and isinstance(inner[0], FilteredValue):
                    raise ConfigError(f"{self.where}: {key}[{i}].value: nested filters are not supported")
                entries.append(FilteredValue(filter=cond.get("filter"), value=inner))
            return entries
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            floats = [float(v) for v in value]
            return floats if raw else gradient_from_mergekit(floats)
        raise ConfigError(f"{self.where}: {key}: only numeric gradients are supported, got {value!r}")

    # ------------------------------------------------------------------ slices
    def _slice_sources(self, s: Any, key: str, base: str | None) -> list[tuple[str, int, int, Any]]:
        """(model, start, end, raw parameters) per source of one slice."""
        self._plain_slice(s, key, base)
        out = []
        for j, src in enumerate(_as_list(s.get("sources"), f"{self.where}: {key}.sources")):
            k = f"{key}.sources[{j}]"
            p = self.model_ref(src, k)
            a, b = self._range(src, k)
            out.append((p, a, b, _get(src, "parameters")))
        depths = {b - a for _, a, b, _ in out}
        if len(depths) != 1:
            raise ConfigError(f"{self.where}: {key}.sources: every source of a slice must span the same number "
                              f"of layers, got {sorted(depths)}")
        return out

    def passthrough_slices(self, slices: list, base: str | None, outer: list[Any]):
        """Single-source slices → (inputs, (embed model, head model, [(model, layer, tensor_scale)])).

        mergekit takes the embeddings from the first slice's model and the final norm/head from
        the last slice's, with those slices' ``scale`` read at t = 0; inside a slice of n layers
        a gradient is read at t = i/(n−1) (t = 1 when n = 1)."""
        order: list[str] = []
        slots: list[tuple[str, int, Any]] = []
        firsts, lasts = None, None
        for i, s in enumerate(slices):
            key = f"slices[{i}]"
            srcs = self._slice_sources(s, key, base)
            if len(srcs) != 1:
                raise ConfigError(f"{self.where}: {key}.sources: passthrough takes one source per slice, "
                                  f"got {len(srcs)}")
            p, a, b, raw = srcs[0]
            chain = [self._scale_entries(raw, f"{key}.sources[0].parameters"),
                     self._scale_entries(s.get("parameters"), f"{key}.parameters"),
                     *(self._scale_entries(o, "parameters") for o in outer)]
            if p not in order:
                order.append(p)
            n = b - a
            for layer in range(a, b):
                t = (layer - a) / (n - 1) if n > 1 else 1.0
                slots.append((p, layer, _scale_at(chain, t)))
            if firsts is None:
                firsts = (p, _scale_at(chain, 0.0), key)
            lasts = (p, _scale_at(chain, 0.0), key)
        for (p, sc, key), part in ((firsts, "embed"), (lasts, "head")):
            self._check_unscaled(p, sc, part, key)
        return [(p, {}) for p in order], (firsts[0], lasts[0], slots)

    def _scale_entries(self, raw: Any, key: str) -> list[FilteredValue]:
        if raw is None:
            return []
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.where}: {key} must be a mapping")
        for name in raw:
            if name != "scale":
                self.warn(f"{self.where}: {key}.{name} is not a parameter of passthrough (known: scale); "
                          "ignored (as mergekit does)")
        if raw.get("scale") is None:
            return []
        v = raw["scale"]
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) or (
                isinstance(v, list) and v and not all(isinstance(x, dict) for x in v)):
            v = [{"value": v}]
        v = self.value("scale", v, f"{key}.scale", raw=True)
        if isinstance(v, (int, float)):
            return [FilteredValue(filter=None, value=v)]
        return list(v)

    def _check_unscaled(self, path: str, scale: Any, part: str, key: str) -> None:
        """The embeddings (head) come from the first (last) slice with its ``scale``: refuse a
        scale ≠ 1 there, which a layer flow does not express."""
        if scale == 1.0:
            return
        if isinstance(scale, (int, float)):
            scale = [FilteredValue(filter=None, value=scale)]
        try:
            d = ModelDir(path)
            names = [n for n in d.tensor_names if d.roles.block_index(n) is None
                     and (d.roles.group_of(n) == "embed") == (part == "embed")]
        except Exception:  # noqa: BLE001 — unreadable: judge the filters alone
            names = None
        from evomerge.merge.layer_flow import slot_tensor_scale

        if names is None:
            hits = [c for c in scale if c.filter in (None, "*") and c.value != 1.0]
        else:
            hits = [n for n in names if slot_tensor_scale(scale, n) != 1.0]
        if hits:
            raise ConfigError(f"{self.where}: {key}: passthrough `scale` ≠ 1 would also scale the "
                              f"{'embeddings' if part == 'embed' else 'final norm/head'} (mergekit reads the "
                              f"{'first' if part == 'embed' else 'last'} slice's scale there); "
                              "evomerge scales block tensors only")

    def merge_slices(self, slices: list, base: str | None):
        """Slices merged with a method → (inputs, slice-level parameters, layer flow or None).

        Every slice must merge the same models; source and slice parameters become per-block
        values (:class:`GroupValues`, read at mergekit's slice-relative t = i/(n−1)), the
        embeddings take the first slice's values and the final norm/head the last slice's (both
        at t = 0, as mergekit plans them). When the slices' layer ranges are not the identity
        0…L−1 in order, the blocks are stacked by a layer flow of the merge."""
        parsed = [self._slice_sources(s, f"slices[{i}]", base) for i, s in enumerate(slices)]
        models = [p for p, *_ in parsed[0]]
        for i, srcs in enumerate(parsed[1:], 1):
            if sorted(p for p, *_ in srcs) != sorted(models):
                raise ConfigError(f"{self.where}: slices[{i}] merges {sorted(p for p, *_ in srcs)} but slices[0] "
                                  f"{sorted(models)}; evomerge merges the same models in every slice")
        ranges = []
        for i, srcs in enumerate(parsed):
            starts = {(a, b) for _, a, b, _ in srcs}
            if len(starts) != 1:
                raise ConfigError(f"{self.where}: slices[{i}].sources take different layer ranges {sorted(starts)}; "
                                  "evomerge merges a block with the same block of each model")
            ranges.append(starts.pop())
        depths = set()
        for p in models:
            n = _num_layers(p)
            if n is None:
                raise ConfigError(f"{self.where}: slices: cannot read the depth of {p} (no readable config.json) "
                                  "to place the slices; use `models:` instead")
            if any(b > n for _, b in ranges):
                raise ConfigError(f"{self.where}: slices: a layer_range exceeds the {n} layers of {p}")
            depths.add(n)
        if len(depths) != 1:
            raise ConfigError(f"{self.where}: slices: the models have different depths {sorted(depths)}")
        n_blocks = depths.pop()
        block_of: dict[int, list[tuple[int, float]]] = {}  # source block → [(slice, t)] where it is merged
        flow: list[int] = []
        for i, (a, b) in enumerate(ranges):
            for layer in range(a, b):
                block_of.setdefault(layer, []).append((i, (layer - a) / (b - a - 1) if b - a > 1 else 1.0))
                flow.append(layer)
        identity = flow == list(range(n_blocks))
        per_model = {}
        for p in models:
            raws = [next(r for q, _, _, r in srcs if q == p) for srcs in parsed]
            per_model[p] = self._combine([r or {} for r in raws], block_of, n_blocks, identity,
                                         f"slices[*].sources({Path(p).name}).parameters", per_model=True)
        slice_params = self._combine([s.get("parameters") or {} for s in slices], block_of, n_blocks, identity,
                                     "slices[*].parameters", per_model=False)
        layer_flow = None if identity else (MERGED, MERGED, [(MERGED, layer, 1.0) for layer in flow])
        return [(p, per_model[p]) for p in models], slice_params, layer_flow

    def _combine(self, raws: list[dict], block_of, n_blocks: int, identity: bool, key: str,
                 per_model: bool) -> dict[str, Any]:
        """One value per parameter from per-slice settings (see :meth:`merge_slices`). One slice
        spanning every block in order reads gradients exactly like a whole-model value."""
        names = []
        for r in raws:
            if not isinstance(r, dict):
                raise ConfigError(f"{self.where}: {key} must be a mapping")
            names += [n for n in r if n not in names]
        out = {}
        for name in names:
            if name not in self.known(per_model):
                known = ", ".join(sorted(self.known(per_model))) or "none"
                self.warn(f"{self.where}: {key}.{name} is not a parameter of {self.op.name} (known: {known}); "
                          "ignored (as mergekit does)")
                continue
            if len(raws) == 1 and identity:
                v = self.value(name, raws[0][name], f"{key}.{name}")
                if v is not None:
                    out[name] = v
                continue
            vals = [self.value(name, r[name], f"{key}.{name}", raw=True) if name in r else None for r in raws]
            if any(v is None for v in vals):
                raise ConfigError(f"{self.where}: {key}.{name} is set in some slices only; set it in every "
                                  "slice (or globally)")
            shapes = [[f.filter for f in v] if isinstance(v, list) and v and isinstance(v[0], FilteredValue)
                      else None for v in vals]
            if any(sh != shapes[0] for sh in shapes):
                raise ConfigError(f"{self.where}: {key}.{name}: the slices use different filter lists; "
                                  "evomerge combines per-slice values filter by filter")
            if shapes[0] is None:
                out[name] = self._per_block(vals, block_of, n_blocks, f"{key}.{name}")
            else:
                out[name] = [FilteredValue(filter=f, value=self._per_block([v[j].value for v in vals], block_of,
                                                                           n_blocks, f"{key}.{name}"))
                             for j, f in enumerate(shapes[0])]
        return out

    def _per_block(self, vals: list, block_of, n_blocks: int, key: str) -> Any:
        """Per-slice scalars/gradients → :class:`GroupValues` (or a scalar when all agree)."""
        def at(v, t):
            return interpolate(v, t) if isinstance(v, list) else v

        if all(not isinstance(v, list) for v in vals) and len({repr(v) for v in vals}) == 1:
            return vals[0]
        if any(isinstance(v, (bool, str)) for v in vals):
            raise ConfigError(f"{self.where}: {key}: per-slice values must be numbers")
        layers = []
        for b in range(n_blocks):
            uses = {at(vals[i], t) for i, t in block_of.get(b, [(0, 0.0)])}  # unused blocks: any value
            if len(uses) != 1:
                raise ConfigError(f"{self.where}: {key}: block {b} is merged in several slices with different "
                                  "values; a recipe merges each block once")
            layers.append(float(uses.pop()))
        return GroupValues(embed=at(vals[0], 0.0), layers=layers, head=at(vals[-1], 0.0))

    def _plain_slice(self, s: Any, key: str, base: str | None) -> None:
        if not isinstance(s, dict):
            raise ConfigError(f"{self.where}: {key} must be a mapping with `sources`")
        if s.get("residual_weight") is not None:
            raise ConfigError(f"{self.where}: {key}.residual_weight is not supported")
        for extra in sorted(set(s) - {"sources", "parameters", "base_model", "residual_weight"}):
            self.warn(f"{self.where}: {key}.{extra} is not a mergekit key; ignored (as mergekit does)")
        if s.get("base_model") is not None and self.path(s["base_model"], f"{key}.base_model") != base:
            raise ConfigError(f"{self.where}: {key}.base_model differs from base_model; per-slice bases are "
                              "not supported")

    def _range(self, src: dict, key: str) -> tuple[int, int]:
        r = src.get("layer_range")
        if (not isinstance(r, (list, tuple)) or len(r) != 2 or not all(isinstance(x, int) for x in r)
                or not 0 <= r[0] < r[1]):
            raise ConfigError(f"{self.where}: {key}.layer_range must be [start, end) with 0 ≤ start < end, got {r!r}")
        return int(r[0]), int(r[1])


def _scale_at(chain: list[list[FilteredValue]], t: float) -> float | list[FilteredValue]:
    """A slot's ``tensor_scale``: the chained filter entries with gradients read at ``t``."""
    entries = []
    for part in chain:
        for f in part:
            v = interpolate(f.value, t) if isinstance(f.value, list) else float(f.value)
            entries.append(FilteredValue(filter=f.filter, value=v))
            if f.filter in (None, "*"):
                break
        if entries and entries[-1].filter in (None, "*"):
            break
    while entries and entries[-1].value == 1.0 and entries[-1].filter in (None, "*"):
        entries.pop()  # a trailing catch-all 1 is the default
    if not entries:
        return 1.0
    if len(entries) == 1 and entries[0].filter in (None, "*"):
        return float(entries[0].value)
    return entries


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
    if op.name not in MERGEKIT_METHODS:
        raise ConfigError(f"merge_method {op.name} is evomerge's own; mergekit has no such method")
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
    if recipe.chat_template is not None:
        out["chat_template"] = recipe.chat_template
    order = ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "chat_template"]
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
        from evomerge.merge.layer_flow import embed_source, head_source

        for i, s in enumerate(flow.slots):
            if s.scale != 1.0:
                raise ConfigError(f"layer_flow.slots[{i}].scale = {s.scale:g}: mergekit slices cannot scale "
                                  "the residual stream")
            if s.model == MERGED:
                raise ConfigError(f"layer_flow.slots[{i}].model is the recipe's own merge; mergekit would need "
                                  "a second config for it")
        embed, head = embed_source(r), head_source(r)
        if MERGED in (embed, head):
            raise ConfigError("layer_flow.embed_from/head_from is the recipe's own merge; mergekit cannot express it")
        if flow.slots[0].model != embed or flow.slots[-1].model != head:
            raise ConfigError(f"layer_flow: mergekit takes the embeddings from the first slice's model and the "
                              f"final norm/head from the last one's; they must be embed_from ({embed}) and "
                              f"head_from ({head})")
        for i in (0, len(flow.slots) - 1):
            if flow.slots[i].tensor_scale is not None:
                raise ConfigError(f"layer_flow.slots[{i}].tensor_scale: mergekit would apply the first/last slice's "
                                  "scale to the embeddings/head too")
        out: list[dict] = []
        for s in flow.slots:
            last = out[-1]["sources"][0] if out else None
            scale = 1.0 if s.tensor_scale is None else s.tensor_scale if isinstance(s.tensor_scale, (int, float)) \
                else [_filtered(f.filter, f.value) for f in s.tensor_scale]
            if (last is not None and last["model"] == paths[s.model] and last["layer_range"][1] == s.layer
                    and last.get("parameters", {}).get("scale", 1.0) == scale):
                last["layer_range"][1] += 1
            else:
                src = {"model": paths[s.model], "layer_range": [s.layer, s.layer + 1]}
                if scale != 1.0:
                    src["parameters"] = {"scale": scale}
                out.append({"sources": [src]})
        return out


def _filtered(flt: str | None, value: Any) -> dict:
    return {"value": value} if flt is None else {"filter": flt, "value": value}


def _all_values(v: Any) -> list:
    if isinstance(v, list) and v and isinstance(v[0], FilteredValue):
        return [x for f in v for x in _all_values(f.value)]
    return [v]
