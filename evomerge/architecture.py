"""What each tensor of a transformer checkpoint is: the one home of tensor-name knowledge.

A model family (a config's ``model_type``) names its tensors in its own way: Llama's blocks are
``model.layers.N.``, GPT-2's ``transformer.h.N.``, OPT's ``model.decoder.layers.N.``; GPT-NeoX's
head is ``embed_out`` (not an embedding); the linear layers that write into the residual stream
are ``o_proj`` / ``down_proj``, ``attn.c_proj`` / ``mlp.c_proj``, ``attention.dense`` /
``mlp.dense_4h_to_h``, an expert's ``w2``… :data:`FAMILIES` is a table of those ROLES per family
and :class:`TensorRoles` answers every question the rest of evomerge asks about a name::

    roles = TensorRoles.for_config(config)       # a config dict or a transformers config
    roles.role(name)          # Role(kind="block", block=3, part="attn_out")
    roles.group_of(name)      # "embed" | "layers.3" | "head" (merge-parameter groups)
    roles.block_index(name)   # 3, or None outside the blocks
    roles.with_block_index(name, 7)
    roles.output_projections(names)  # the attention-out / MLP-out tensors (layer-flow folding)

Roles are read from **checkpoint names** — the names ``save_pretrained`` writes, which is what
evomerge reads and writes. ``transformers`` 5 names some parameters differently in memory
(GPT-NeoX's ``embed_out`` is the parameter ``lm_head``; Mixtral's and Qwen3-MoE's per-expert
``experts.E.w2`` / ``experts.E.down_proj`` tensors are fused parameters ``mlp.experts.down_proj``).
A family's :attr:`Family.head` lists both of GPT-NeoX's head names. The checkpoint → parameter
mapping itself is not a table here: :class:`ParameterMap` asks ``transformers`` for the very
conversion rules ``from_pretrained`` applies (``conversion_mapping`` / ``WeightConverter``), so a
future rename or fusion in ``transformers`` is followed without a change here.

Groups follow mergekit's reading: embeddings (token and position embeddings, and norms applied to
them) form ``embed``; each block ``layers.N``; the final norm and the LM head form ``head``.

A family missing from the table falls back to a generic rule (``layers|h|blocks|block.N``
blocks, ``embed``/``wte``/``wpe`` embeddings, ``lm_head`` / ``embed_out`` / ``output`` heads,
``norm`` / ``ln_f`` final norms); a tensor neither the family nor the generic rule knows is an
error naming the tensor, never a silent guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Literal

from evomerge.errors import ModelError
from evomerge.recipe import TensorSite

RoleKind = Literal["embedding", "head", "final_norm", "block"]
BlockPart = Literal["attn_out", "mlp_out"]

_PARAM = r"\.(?:weight|bias)$"


@dataclass(frozen=True)
class Family:
    """Tensor-name patterns of one model family (regular expressions over checkpoint names).

    ``blocks`` is the path of the block list (``model.layers``); ``embedding`` / ``head`` /
    ``final_norm`` are module paths outside the blocks; ``attn_out`` / ``mlp_out`` are module paths
    inside a block (``self_attn.o_proj``; MoE experts as ``experts\\.\\d+\\.w2``) of the linear
    layers that add into the residual stream. ``scale_foldable``: blocks read the stream only
    through a scale-invariant norm and add un-normalised outputs back (pre-norm, no norm after
    the block's output), so a layer flow may fold a residual scale into those projections.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    embedding: tuple[str, ...]
    head: tuple[str, ...]
    final_norm: tuple[str, ...]
    attn_out: tuple[str, ...]
    mlp_out: tuple[str, ...]
    scale_foldable: bool = False

    @cached_property
    def _block_re(self) -> re.Pattern:
        return re.compile(rf"^({self.blocks})\.(\d+)\.(.+)$")

    @cached_property
    def _outside(self) -> tuple[tuple[RoleKind, re.Pattern], ...]:
        return tuple((kind, re.compile(rf"^(?:{'|'.join(paths)}){_PARAM}")) for kind, paths in
                     (("embedding", self.embedding), ("head", self.head), ("final_norm", self.final_norm))
                     if paths)

    @cached_property
    def _parts(self) -> tuple[tuple[BlockPart, re.Pattern], ...]:
        return tuple((part, re.compile(rf"^(?:{'|'.join(paths)}){_PARAM}")) for part, paths in
                     (("attn_out", self.attn_out), ("mlp_out", self.mlp_out)) if paths)


@dataclass(frozen=True)
class Role:
    """What one tensor is: its kind, its block (blocks only) and, inside a block, whether it is an
    attention-out or MLP-out projection (``part``; ``None`` for every other block tensor)."""

    kind: RoleKind
    block: int | None = None
    part: BlockPart | None = None


_LLAMA_LIKE = dict(blocks=r"model\.layers", embedding=(r"model\.embed_tokens",), head=(r"lm_head",),
                   final_norm=(r"model\.norm",), attn_out=(r"self_attn\.o_proj",),
                   mlp_out=(r"mlp\.down_proj",))

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "granite",
                     "internlm2"), **_LLAMA_LIKE, scale_foldable=True),
    # Post-norms (gemma2/3's post_feedforward_layernorm, olmo2's norms after each sub-block)
    # normalise the block's output, so a scale folded into the projections would be undone.
    Family("llama-post-norm", ("gemma2", "gemma3_text", "olmo2"), **_LLAMA_LIKE),
    Family("stablelm", ("stablelm",), **_LLAMA_LIKE, scale_foldable=True),
    Family("starcoder2", ("starcoder2",), **{**_LLAMA_LIKE, "mlp_out": (r"mlp\.c_proj",)},
           scale_foldable=True),
    Family("mixtral", ("mixtral",), **{**_LLAMA_LIKE, "mlp_out": (r"block_sparse_moe\.experts\.\d+\.w2",)},
           scale_foldable=True),
    Family("qwen-moe", ("qwen2_moe", "qwen3_moe"),
           **{**_LLAMA_LIKE, "mlp_out": (r"mlp\.experts\.\d+\.down_proj", r"mlp\.shared_expert\.down_proj",
                                         r"mlp\.down_proj")},
           scale_foldable=True),
    Family("phi", ("phi",), blocks=r"model\.layers", embedding=(r"model\.embed_tokens",), head=(r"lm_head",),
           final_norm=(r"model\.final_layernorm",), attn_out=(r"self_attn\.dense",), mlp_out=(r"mlp\.fc2",),
           scale_foldable=True),
    Family("gpt2", ("gpt2",), blocks=r"transformer\.h", embedding=(r"transformer\.wte", r"transformer\.wpe"),
           head=(r"lm_head",), final_norm=(r"transformer\.ln_f",), attn_out=(r"attn\.c_proj",),
           mlp_out=(r"mlp\.c_proj",), scale_foldable=True),
    # The checkpoint's head is embed_out; transformers 5 calls the parameter lm_head.
    Family("gpt_neox", ("gpt_neox",), blocks=r"gpt_neox\.layers", embedding=(r"gpt_neox\.embed_in",),
           head=(r"embed_out", r"lm_head"), final_norm=(r"gpt_neox\.final_layer_norm",),
           attn_out=(r"attention\.dense",), mlp_out=(r"mlp\.dense_4h_to_h",), scale_foldable=True),
    Family("falcon", ("falcon",), blocks=r"transformer\.h", embedding=(r"transformer\.word_embeddings",),
           head=(r"lm_head",), final_norm=(r"transformer\.ln_f",), attn_out=(r"self_attention\.dense",),
           mlp_out=(r"mlp\.dense_4h_to_h",), scale_foldable=True),
    Family("bloom", ("bloom",), blocks=r"transformer\.h",
           embedding=(r"transformer\.word_embeddings", r"transformer\.word_embeddings_layernorm"),
           head=(r"lm_head",), final_norm=(r"transformer\.ln_f",), attn_out=(r"self_attention\.dense",),
           mlp_out=(r"mlp\.dense_4h_to_h",), scale_foldable=True),
    # OPT's folded model does not reproduce a scaled stream (measured in tests/test_architecture.py).
    Family("opt", ("opt",), blocks=r"model\.decoder\.layers",
           embedding=(r"model\.decoder\.embed_tokens", r"model\.decoder\.embed_positions",
                      r"model\.decoder\.project_in"),
           head=(r"lm_head", r"model\.decoder\.project_out"), final_norm=(r"model\.decoder\.final_layer_norm",),
           attn_out=(r"self_attn\.out_proj",), mlp_out=(r"fc2",)),
)

# Unknown families: the shapes most checkpoints share.
GENERIC = Family(
    "generic", (), blocks=r"(?:.+?\.)?(?:layers|h|blocks|block)",
    embedding=(r"(?:.+\.)?(?:embed_tokens|embed_in|wte|wpe|word_embeddings|embed_positions|embeddings?)",),
    head=(r"lm_head", r"embed_out", r"output"),
    final_norm=(r"(?:.+\.)?(?:norm|ln_f|final_layer_?norm|final_layernorm)",),
    attn_out=(r"self_attn\.o_proj", r"attn\.c_proj", r"self_attn\.dense", r"attention\.dense",
              r"self_attention\.dense", r"self_attn\.out_proj", r"attention\.wo"),
    mlp_out=(r"mlp\.down_proj", r"mlp\.c_proj", r"mlp\.fc2", r"fc2", r"mlp\.dense_4h_to_h",
             r"feed_forward\.w2"),
)

_BY_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def family_for(model_type: str | None) -> Family:
    """The family of ``model_type`` (:data:`GENERIC` when the table does not have it)."""
    return _BY_TYPE.get(model_type or "", GENERIC)


@dataclass(frozen=True)
class TensorRoles:
    """Roles of the tensors of one model family; build with :meth:`for_config`."""

    family: Family
    model_type: str = "unknown"
    _cache: dict[str, Role] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_config(cls, config: Any) -> "TensorRoles":
        """From a ``config.json`` dict or a ``transformers`` config (its ``model_type``)."""
        mt = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
        return cls(family_for(mt), mt or "unknown")

    @classmethod
    def for_model_type(cls, model_type: str | None) -> "TensorRoles":
        return cls(family_for(model_type), model_type or "unknown")

    @property
    def known(self) -> bool:
        """Whether the family is in the table (not the generic fallback)."""
        return self.family is not GENERIC

    @property
    def scale_foldable(self) -> bool:
        return self.family.scale_foldable

    # ------------------------------------------------------------------ per tensor
    def role(self, name: str) -> Role:
        """The role of tensor ``name``; a :class:`ModelError` naming it when nothing matches."""
        r = self._cache.get(name)
        if r is None:
            r = self._cache[name] = self._classify(name)
        return r

    def _classify(self, name: str) -> Role:
        fam = self.family
        m = fam._block_re.match(name)
        if m:
            rest = m.group(3)
            part = next((p for p, rx in fam._parts if rx.match(rest)), None)
            return Role("block", int(m.group(2)), part)
        for kind, rx in fam._outside:
            if rx.match(name):
                return Role(kind)
        what = f"a {self.model_type} model" if self.known else f"an unknown model type ({self.model_type})"
        raise ModelError(
            f"tensor {name}: not a known tensor of {what} (not an embedding, block, final norm or head); "
            "add its family to evomerge.architecture.FAMILIES"
        )

    def block_index(self, name: str) -> int | None:
        return self.role(name).block

    def block_path(self, name: str) -> str | None:
        """The module path of the block list holding ``name`` (``model.layers``), else ``None``.
        Reads only the block pattern, so it accepts in-memory parameter names too."""
        m = self.family._block_re.match(name)
        return m.group(1) if m else None

    def with_block_index(self, name: str, index: int) -> str:
        """``model.layers.3.x`` → ``model.layers.<index>.x``."""
        m = self.family._block_re.match(name)
        if not m:
            raise ValueError(f"{name} is not a block tensor")
        return f"{m.group(1)}.{index}.{m.group(3)}"

    def group_of(self, name: str) -> str:
        """The merge-parameter group: ``embed``, ``layers.<i>``, or ``head`` (final norm and head)."""
        r = self.role(name)
        if r.kind == "block":
            return f"layers.{r.block}"
        return "embed" if r.kind == "embedding" else "head"

    def site(self, name: str, num_blocks: int) -> TensorSite:
        r = self.role(name)
        return TensorSite(name=name, group=self.group_of(name), block=r.block, num_blocks=num_blocks)

    def is_output_projection(self, name: str) -> bool:
        """An attention-out or MLP-out projection (weight or bias) inside a block."""
        return self.role(name).part is not None

    def output_projections(self, names: Iterable[str], block: int | None = None) -> list[str]:
        """The attention-out / MLP-out tensors among ``names`` (of block ``block`` when given)."""
        return [n for n in names if self.is_output_projection(n)
                and (block is None or self.role(n).block == block)]

    def block_template(self, name: str) -> str:
        """The name with its block index set to 0 (non-block names unchanged): block layouts of
        models of different depth compare equal."""
        return self.with_block_index(name, 0) if self.block_index(name) is not None else name



class ParameterMap:
    """Checkpoint names → the parameters of an instantiated model, by ``transformers``' own rules.

    ``transformers`` 5 loads a checkpoint through a list of weight transforms (renamings such as
    GPT-NeoX's ``embed_out`` → ``lm_head``; converters such as Mixtral's per-expert ``w1``/``w3``
    → one fused ``experts.gate_up_proj``). This map uses the transforms ``from_pretrained``
    attached to the model (``model._weight_conversions``), else the ones
    ``get_model_conversion_mapping`` gives for it, and the same ``rename_source_key`` and
    ``WeightConverter.convert`` the loader runs — so an in-place write lands exactly where
    ``from_pretrained`` would have put the same checkpoint.

    :meth:`target` says where a checkpoint tensor goes: ``(parameter, None)`` for a plain or
    renamed tensor, ``(parameter, pattern)`` when a converter fuses it with others;
    :meth:`assemble` builds a fused parameter from all of its checkpoint tensors.
    """

    def __init__(self, transforms: list, model: Any = None):
        self.model = model
        self._renamings: list = []
        self._converters: list = []
        if transforms:
            from transformers.core_model_loading import WeightConverter, WeightRenaming

            self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
            self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        self._prefix = (getattr(model, "base_model_prefix", None) or None) if model is not None else None
        self._cache: dict[str, tuple[str, str | None]] = {}

    @classmethod
    def for_model(cls, model: Any) -> "ParameterMap":
        """The transforms ``from_pretrained`` used for ``model`` (else the registered ones)."""
        transforms = getattr(model, "_weight_conversions", None)
        if transforms is None:
            try:
                from transformers.conversion_mapping import get_model_conversion_mapping
            except ImportError:  # transformers 4 loads checkpoints by their own names
                return cls([], model)
            transforms = get_model_conversion_mapping(model)
        return cls(transforms, model)

    @classmethod
    def for_config(cls, config: dict) -> "ParameterMap":
        """Without a model: the transforms registered for the config's architecture class, else
        its ``model_type`` (enough for names; :meth:`assemble` needs :meth:`for_model`)."""
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        except ImportError:  # transformers 4
            return cls([])
        archs = config.get("architectures") or []
        transforms = (get_checkpoint_conversion_mapping(archs[0]) if archs else None) \
            or get_checkpoint_conversion_mapping(config.get("model_type")) or []
        return cls(transforms)

    def target(self, name: str, known: dict[str, Any] | None = None) -> tuple[str, str | None]:
        """``(parameter name, converter pattern or None)`` for checkpoint tensor ``name``;
        ``known`` maps the model's parameter (and buffer) names to tensors (``None``: no model)."""
        hit = self._cache.get(name)
        if hit is not None and (known is None or hit[0] in known):
            return hit
        if not self._renamings and not self._converters:
            return name, None
        from transformers.core_model_loading import rename_source_key

        renamed, pattern = rename_source_key(name, self._renamings, self._converters, self._prefix, known)
        if known is not None and renamed not in known and name in known:  # the loader's fallback
            renamed, pattern = name, None
        self._cache[name] = (renamed, pattern)
        return renamed, pattern

    def checkpoint_names(self, tensor_names: Iterable[str]) -> dict[str, str]:
        """Parameter name → checkpoint name for the tensors among ``tensor_names`` that are whole
        parameters (renamed or not; tensors ``transformers`` fuses are left out)."""
        out: dict[str, str] = {}
        for n in tensor_names:
            param, pattern = self.target(n)
            if pattern is None:
                out.setdefault(param, n)
        return out

    def assemble(self, param: str, parts: list[tuple[str, str, Any]]) -> Any:
        """The fused parameter ``param`` from ``(checkpoint name, pattern, tensor)`` triples."""
        from copy import deepcopy

        from transformers.core_model_loading import dot_natural_key

        converter = deepcopy(self._by_pattern[parts[0][1]])
        for name, pattern, tensor in sorted(parts, key=lambda p: dot_natural_key(p[0])):
            converter.add_tensor(param, name, pattern, tensor)
        out = converter.convert(param, model=self.model, config=self.model.config)
        if param not in out:
            raise ModelError(f"transformers' converter for {param} produced {sorted(out)} instead")
        value = out[param]
        return value[0] if isinstance(value, list) else value
