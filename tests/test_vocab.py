"""``tokenizer_source`` (base / union / a model) and ``chat_template``, with exact row checks.

Three tiny Llama models with different WordLevel tokenizers are built inside the test: the
experts move tokens to other ids, add tokens, and lack some of the base's. Every row of the
merged embedding and head is checked against mergekit's rule computed here by hand, token by
token: an input's own row where it has the token, else the only holder's row, else the base's,
else the mean of the holders' rows.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.export import export_model
from evomerge.merge.materialize import apply_in_place, build_model
from evomerge.merge.placement import PLACEMENTS
from evomerge.merge.sources import Sources
from evomerge.merge.vocab import TEMPLATES
from evomerge.recipe import Recipe

transformers = pytest.importorskip("transformers")

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
TOKENS = {  # model → its tokens in id order (specials first)
    "base": SPECIAL + list("abcdefgh"),
    "e0": SPECIAL + list("hgfedcba") + ["x", "y"],  # same letters, other ids, two new tokens
    "e1": SPECIAL + list("abcd") + ["z", "x"],  # lacks e–h; z only here; x also in e0
}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def tokenizer(tokens: list[str], template: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if template is not None:
        fast.chat_template = template
    return fast


def build_vocab_models(root, templates: dict[str, str] | None = None) -> dict[str, str]:
    """base, e0, e1: tiny Llamas whose vocab_size is their tokenizer's length."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    paths = {}
    for seed, (name, tokens) in enumerate(TOKENS.items()):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                          tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        tokenizer(tokens, (templates or {}).get(name)).save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def expected_rows(paths, out_tokens: list[str], name: str, weights: dict[str, float]) -> torch.Tensor:
    """mergekit's alignment + a normalised linear merge, token by token, written out by hand."""
    raw = {m: load_file(f"{p}/model.safetensors")[name] for m, p in paths.items()}
    rows = []
    for tok in out_tokens:
        holders = [m for m in paths if tok in TOKENS[m]]
        if len(holders) == 1:
            default = raw[holders[0]][TOKENS[holders[0]].index(tok)]
        elif not holders:
            default = torch.zeros(raw["base"].shape[1:])
        elif "base" in holders:
            default = raw["base"][TOKENS["base"].index(tok)]
        else:
            default = sum(raw[m][TOKENS[m].index(tok)] for m in holders) / len(holders)
        aligned = {m: raw[m][TOKENS[m].index(tok)] if tok in TOKENS[m] else default for m in weights}
        rows.append(sum(w * aligned[m] for m, w in weights.items()) / sum(weights.values()))
    return torch.stack(rows)


def merge(paths, tmp_path, source, **extra):
    recipe = Recipe(merge_method="linear", base_model=paths["base"], tokenizer_source=source,
                    models=[{"model": paths["e0"], "parameters": {"weight": 0.7}},
                            {"model": paths["e1"], "parameters": {"weight": 0.3}}], **extra)
    out = tmp_path / f"out-{source}"
    export_model(recipe, out)
    return recipe, out


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_vocab_models(tmp_path_factory.mktemp("vocab"))


UNION = TOKENS["base"] + ["x", "y", "z"]


@pytest.mark.parametrize("source, out_tokens", [("base", TOKENS["base"]), ("union", UNION),
                                                ("e1", TOKENS["e1"])])
def test_rows_are_aligned_by_token(paths, tmp_path, source, out_tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, out = merge(paths, tmp_path, source)
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert sorted(vocab, key=vocab.get) == out_tokens  # the output vocabulary, in id order
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(out_tokens)
    got = load_file(str(out / "model.safetensors"))
    for name in (EMBED, HEAD):
        want = expected_rows(paths, out_tokens, name, {"e0": 0.7, "e1": 0.3})
        assert got[name].shape == want.shape
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
    # non-vocabulary tensors are merged as usual
    torch.testing.assert_close(got["model.norm.weight"], 0.7 * load_file(f"{paths['e0']}/model.safetensors")[
        "model.norm.weight"] + 0.3 * load_file(f"{paths['e1']}/model.safetensors")["model.norm.weight"])
    # reload + generate, and the in-place merge (a resized resident model) equals the export
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("abcx" if "x" in vocab else "abc", return_tensors="pt").input_ids
    assert loaded.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
    lazy = Sources.from_recipe(recipe)
    for kind in PLACEMENTS:  # every placement serves the re-indexed rows (computed on read)
        placed = lazy.place(kind, "cpu")
        model = build_model(placed)
        apply_in_place(model, recipe, placed)
        placed.close()
        for n, t in loaded.state_dict().items():
            assert torch.equal(model.state_dict()[n], t), (kind, n)


def test_union_keeps_special_tokens_special(paths, tmp_path):
    extra = tmp_path / "special"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(paths["e1"]).save_pretrained(extra)
    tok = tokenizer(TOKENS["e1"])
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    model = AutoModelForCausalLM.from_pretrained(paths["e1"])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(extra)
    tok.save_pretrained(extra)
    recipe = Recipe(merge_method="linear", base_model=paths["base"], tokenizer_source="union",
                    models=[{"model": paths["base"], "parameters": {"weight": 0.5}},
                            {"model": str(extra), "parameters": {"weight": 0.5}}])
    export_model(recipe, tmp_path / "out")
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert "<|tool|>" in out.all_special_tokens or any(
        t.content == "<|tool|>" and t.special for t in out.added_tokens_decoder.values())
    assert out.tokenize("a<|tool|>b") == ["a", "<|tool|>", "b"]


def test_same_vocabulary_is_not_reindexed(tmp_path):
    """Inputs sharing one vocabulary keep their rows (and padding rows) whatever the source."""
    from conftest import make_model

    base = make_model(tmp_path / "b", 0)
    e = make_model(tmp_path / "e", 1, perturb_from=base)
    for source in ("base", "union", "e"):
        recipe = Recipe(merge_method="linear", base_model=str(base), tokenizer_source=source,
                        models=[{"model": str(base)}, {"model": str(e)}])
        sources = Sources.from_recipe(recipe)
        assert type(sources.reference).__name__ == "ModelDir"
        assert sources.reference.shape(EMBED) == (32, 32)


def test_chat_templates(tmp_path):
    from transformers import AutoTokenizer

    paths = build_vocab_models(tmp_path / "m", templates={"e0": "{{ 'E0:' }}{% for m in messages %}{{ m['content'] }}"
                                                                 "{% endfor %}", "e1": "{{ 'E0:' }}{% for m in messages %}"
                                                                 "{{ m['content'] }}{% endfor %}"})
    msgs = [{"role": "user", "content": "hi"}]

    def rendered(template, source="base"):
        recipe, out = merge(paths, tmp_path / str(abs(hash((template, source)))), source, chat_template=template)
        return AutoTokenizer.from_pretrained(out).apply_chat_template(msgs, tokenize=False)

    assert rendered("auto") == "E0:hi"  # the template the inputs share (base has none)
    assert rendered("chatml") == "<|im_start|>user\nhi<|im_end|>\n"
    assert rendered("{{ 'lit' }}{{ messages[0]['content'] }}", "union") == "lithi"
    assert rendered("e1") == "E0:hi"
    assert "llama3" in TEMPLATES and "alpaca" in TEMPLATES
    with pytest.raises(ConfigError, match="chat_template 'nope' is not `auto`, a built-in template"):
        rendered("nope")
    with pytest.raises(ConfigError, match="chat_template: model 'base' has no chat template"):
        rendered("base")


def test_different_vocabularies_without_tokenizer_source_are_refused_with_a_hint(paths):
    recipe = Recipe(merge_method="linear", models=[{"model": paths["e0"]}, {"model": paths["e1"]}])
    with pytest.raises(ModelError, match=r"model.embed_tokens.weight has 14 rows in \S+e0 but 10 in \S+e1: the "
                                         r"vocabularies differ; set tokenizer_source \(base, union or a model\)"):
        Sources.from_recipe(recipe)


def test_unknown_tokenizer_source(paths):
    recipe = Recipe(merge_method="linear", models=[{"model": paths["e0"]}, {"model": paths["e1"]}],
                    tokenizer_source="elsewhere")
    with pytest.raises(ConfigError, match="tokenizer_source 'elsewhere' is not `base`, `union`, a model alias"):
        Sources.from_recipe(recipe)
