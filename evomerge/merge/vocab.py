"""Vocabularies and chat templates of a merge: ``tokenizer_source`` and ``chat_template``.

Models fine-tuned from one base often add tokens, so the same token can sit at different rows of
their embeddings (or they have different row counts). ``tokenizer_source`` says which vocabulary
the merged model has, with mergekit's meaning (0.1.5, read from its source):

* ``base`` — the base model's tokenizer (the first model's when the recipe has no base);
* ``union`` — the base's tokenizer plus every token another input has and it lacks (ordinary
  tokens first, by model then id; added/special tokens with their settings);
* a model alias or a path — that model's (or directory's) tokenizer.

Every token-indexed tensor — the parameters of the input-embedding and output-embedding modules,
found by asking ``transformers`` (``get_input_embeddings`` / ``get_output_embeddings`` on the
architecture instantiated on the meta device) — is then re-indexed by token before merging:
row ``i`` of each input is the row of output token ``i`` in that input. A token an input lacks
gets, in that input, mergekit's default row: the row of the only input that has it; the base's
row when the base has it; the mean of the rows of the inputs that have it otherwise; zeros when
none has it. The merged model's ``vocab_size`` is the output vocabulary's size.

When every input has the same vocabulary (same tokens at the same ids) and the same number of
rows, nothing is re-indexed: ``base`` or a model then only chooses whose tokenizer files are
written. (mergekit would also cut the embeddings to the tokenizer's length, dropping padding rows
that models such as Qwen keep on purpose; evomerge does not resize a model that needs no
alignment.)

``chat_template`` (written into the exported tokenizer, ``chat_template.jinja``) is ``auto`` (the
template most inputs share), a built-in name (:data:`TEMPLATES`), a model alias (its template), or
a literal Jinja template.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from evomerge.architecture import ParameterMap
from evomerge.errors import ConfigError, ModelError
from evomerge.safety import contained_files

UNION = "union"
BASE = "base"
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: Every file a Hugging Face tokenizer may read: copied verbatim into a merged model, and checked
#: to stay inside its model directory before a tokenizer is loaded from them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "vocab.txt", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")

# Built-in chat templates (written for evomerge; same conversation formats as mergekit's names).
TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
               " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "alpaca": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
               "{{ message['content'] + '\n\n' }}{% elif message['role'] == 'user' %}"
               "{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% else %}"
               "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"),
}


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_MARKERS)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    contained_files(path, TOKENIZER_FILES, "tokenizer file")  # a link out of the directory is refused
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


@lru_cache(maxsize=32)
def token_tensors(config_json: str) -> tuple[str, ...]:
    """Checkpoint names of the token-indexed tensors (input and output embeddings) of an
    architecture, asked of ``transformers`` on the meta device (no weights are allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(config_json)
    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, TypeError, ImportError, AttributeError):
        return ()  # an architecture transformers cannot build here (e.g. remote code): none known
    modules = {id(m): n for n, m in model.named_modules()}
    params = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None or id(module) not in modules:
            continue
        prefix = modules[id(module)]
        params += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
    return tuple(dict.fromkeys(params))


@dataclass
class Vocabulary:
    """The output vocabulary and, per input (by model-directory identity), the source row of each
    output token (``-1``: the input lacks it)."""

    tokenizer: Any
    size: int
    rows: dict[int, torch.Tensor]  # id(model dir) → LongTensor [size]
    order: list[int]  # id(model dir) of each input, base first
    base: int | None
    names: frozenset[str]  # token-indexed checkpoint tensors
    _dirs: dict[int, Any] = field(default_factory=dict)
    _last: tuple[str, dict[int, torch.Tensor]] | None = None

    def aligned(self, name: str) -> dict[int, torch.Tensor]:
        """Tensor ``name`` of every input re-indexed by output token (mergekit's default rows)."""
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        raw = {k: self._dirs[k].get(name) for k in self.order}
        dtype = raw[self.order[0]].dtype
        for t in raw.values():
            dtype = torch.promote_types(dtype, t.dtype)
        rows = torch.stack([self.rows[k] for k in self.order])  # [models, size]
        present = rows >= 0
        count = present.sum(0)
        tail = raw[self.order[0]].shape[1:]
        gathered = torch.stack([raw[k].to(dtype)[rows[i].clamp(min=0)] * present[i].view(-1, *[1] * len(tail))
                                for i, k in enumerate(self.order)])  # [models, size, ...]
        default = gathered.sum(0) / count.clamp(min=1).view(-1, *[1] * len(tail)).to(dtype)  # mean, zeros if none
        if self.base is not None:
            b = self.order.index(self.base)
            use_base = present[b] & (count > 1)
            default[use_base] = gathered[b][use_base]
        out = {}
        for i, k in enumerate(self.order):
            mask = present[i].view(-1, *[1] * len(tail))
            out[k] = torch.where(mask, gathered[i], default).to(raw[k].dtype)
        self._last = (name, out)
        return out


class AlignedModel:
    """An input model whose token-indexed tensors are read re-indexed by the output vocabulary."""

    def __init__(self, inner: Any, vocabulary: Vocabulary):
        self.inner = inner
        self.vocabulary = vocabulary

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def shape(self, name: str) -> tuple[int, ...]:
        s = self.inner.shape(name)
        return (self.vocabulary.size, *s[1:]) if name in self.vocabulary.names else s

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if name not in self.vocabulary.names:
            return self.inner.get(name, device)
        return self.vocabulary.aligned(name)[id(self.inner)].to(device)

    def __repr__(self) -> str:
        return f"AlignedModel({self.inner!r})"


def _config_json(d) -> str:
    cfg = {k: v for k, v in d.config.items() if k not in ("architectures", "transformers_version", "dtype",
                                                          "torch_dtype", "auto_map")}
    return json.dumps(cfg, sort_keys=True)


def _vocab(tok, rows: int, where) -> dict[str, int]:
    v = tok.get_vocab()
    over = [t for t, i in v.items() if i >= rows]
    if over:
        raise ModelError(f"{where}: its tokenizer has token {over[0]!r} at id {v[over[0]]}, beyond its "
                         f"{rows} embedding rows; vocabulary alignment needs every token to have a row")
    return v


def align(recipe, dirs: dict[str, Any]) -> dict[str, Any]:
    """``dirs`` with every input wrapped in :class:`AlignedModel` when ``recipe.tokenizer_source``
    asks for a vocabulary the inputs do not already share; else ``dirs`` unchanged."""
    source = recipe.tokenizer_source
    distinct = list(dict.fromkeys(dirs.values()))
    if source is None and len({d.config.get("vocab_size") for d in distinct}) < 2:
        return dirs  # nothing to align and (by their configs) nothing to explain
    ref = dirs.get("base") or next(iter(dirs.values()))
    names = tuple(dict.fromkeys(n for d in distinct for n in _checkpoint_names(d)))
    if not names:
        if source is None:
            return dirs
        raise ModelError(f"{ref.path}: cannot find its token embeddings; tokenizer_source needs them")
    rows_of = {id(d): d.shape(names[0])[0] if names[0] in d else None for d in distinct}
    if source is None:
        other = next((d for d in distinct if rows_of[id(d)] not in (rows_of[id(ref)], None)), None)
        if other is not None:
            raise ModelError(f"{names[0]} has {rows_of[id(ref)]} rows in {ref.path} but {rows_of[id(other)]} "
                             f"in {other.path}: the vocabularies differ; set tokenizer_source (base, union "
                             "or a model) to align the models by token")
        return dirs
    base_tok = load_tokenizer(ref.path)
    toks = {id(d): (load_tokenizer(d.path) if d is not ref and has_tokenizer(d.path) else base_tok)
            for d in distinct}
    vocabs = {k: _vocab(t, rows_of[k], next(d.path for d in distinct if id(d) == k)) for k, t in toks.items()}

    if source == UNION:
        out_tok = _union(base_tok, [toks[id(d)] for d in distinct if d is not ref])
    elif source == BASE:
        out_tok = base_tok
    elif source in dirs:
        out_tok = toks[id(dirs[source])]
    elif Path(source).expanduser().is_dir():
        out_tok = load_tokenizer(Path(source).expanduser())
    else:
        raise ConfigError(f"tokenizer_source {source!r} is not `base`, `union`, a model alias "
                          f"({', '.join(dirs)}) or a directory")
    out_vocab = out_tok.get_vocab()
    same = all(v == out_vocab for v in vocabs.values()) and len(set(rows_of.values())) == 1
    if same:
        return dirs
    size = len(out_vocab)
    rows = {}
    for k, v in vocabs.items():
        r = torch.full((size,), -1, dtype=torch.long)
        for tok, i in out_vocab.items():
            if tok in v:
                r[i] = v[tok]
        rows[k] = r
    base = id(dirs["base"]) if "base" in dirs else None
    vocab = Vocabulary(out_tok, size, rows, [id(d) for d in distinct], base, frozenset(names),
                       {id(d): d for d in distinct})
    wrapped = {id(d): AlignedModel(d, vocab) for d in distinct}
    return {alias: wrapped[id(d)] for alias, d in dirs.items()}


def _checkpoint_names(d) -> list[str]:
    """The token-indexed parameters of ``d``'s architecture, as names in its checkpoint."""
    by_param = ParameterMap.for_config(d.config).checkpoint_names(d.tensor_names)
    return [by_param[p] for p in token_tensors(_config_json(d)) if p in by_param]


def _union(base_tok, others: list):
    """mergekit's union: the base's tokenizer plus the tokens the others have and it lacks."""
    out = copy.deepcopy(base_tok)
    have = set(out.get_vocab())
    for tok in others:
        added = {t.content: t for t in tok.added_tokens_decoder.values()}
        for text, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if text in have:
                continue
            out.add_tokens([added.get(text, text)])
            have.add(text)
    return out


def vocabulary_of(sources) -> Vocabulary | None:
    """The output vocabulary a merge re-indexes to (``None`` when it re-indexes nothing)."""
    return getattr(sources.reference, "vocabulary", None)


def chat_template_text(recipe, sources) -> str | None:
    """The literal chat template ``recipe.chat_template`` asks for (``None``: leave it)."""
    value = recipe.chat_template
    if not value:
        return None
    if value == "auto":
        found = []
        for d in dict.fromkeys(sources.dirs.values()):
            if has_tokenizer(d.path):
                t = load_tokenizer(d.path).chat_template
                t = t.get("default") if isinstance(t, dict) else t
                if t:
                    found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if value in TEMPLATES:
        return TEMPLATES[value]
    if value in sources.dirs:
        t = load_tokenizer(sources.dirs[value].path).chat_template if has_tokenizer(sources.dirs[value].path) else None
        if not t:
            raise ConfigError(f"chat_template: model {value!r} has no chat template")
        return t
    if "{" not in value:
        raise ConfigError(f"chat_template {value!r} is not `auto`, a built-in template "
                          f"({', '.join(TEMPLATES)}), a model alias or a Jinja template")
    return value


def write_tokenizer(recipe, sources, folder: Path, out: Path) -> bool:
    """Write the merged model's tokenizer into ``out`` when it must be built (a re-indexed
    vocabulary or a chat template); ``folder`` is where the files would otherwise be copied from.
    Returns whether it wrote it."""
    vocab = vocabulary_of(sources)
    template = chat_template_text(recipe, sources)
    if vocab is None and template is None:
        return False
    if vocab is not None:
        tok = vocab.tokenizer
    elif has_tokenizer(folder):
        tok = load_tokenizer(folder)
    else:
        raise ConfigError(f"chat_template: {folder} has no tokenizer to put the template in")
    if template is not None:
        tok = copy.deepcopy(tok)
        tok.chat_template = template
    tok.save_pretrained(str(out))
    return True
