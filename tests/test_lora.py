"""LoRA adapters as merge inputs: weights equal PEFT's own ``merge_and_unload()``.

Each case builds a tiny model and a PEFT LoRA adapter on it with random (non-zero) factors inside
the test, saves both, and compares every tensor evomerge reads for the adapter — through the
adapter directory and through mergekit's ``base+adapter`` reference — and the weights of a merge
that uses it as an expert, with the checkpoint PEFT's merged model saves.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import EvomergeError, ModelError
from evomerge.merge.export import export_model
from evomerge.merge.lora import AdaptedModel, open_model, split_reference
from evomerge.models import ModelDir
from evomerge.recipe import Recipe

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, n_embd=16, n_layer=2, n_head=2, n_positions=32,
            tie_word_embeddings=False)

# case → (model_type, LoraConfig arguments)
CASES = {
    "llama": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])),
    "llama-rslora-patterns": ("llama", dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["o_proj", "up_proj"],
                                            rank_pattern={"up_proj": 2}, alpha_pattern={"layers.1.self_attn.o_proj": 3})),
    "llama-embedding-modules-to-save": ("llama", dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "k_proj"],
                                                      modules_to_save=["norm"])),
    "gpt2-fan-in-fan-out-bias": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "wte"],
                                              fan_in_fan_out=True, bias="lora_only")),
    "gpt_neox-head": ("gpt_neox", dict(r=2, lora_alpha=2, target_modules=["query_key_value", "lm_head"])),
}


def build(case: str, root):
    """(base dir, adapter dir, checkpoint of PEFT's merge_and_unload())."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, lora = CASES[case]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY)).save_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))  # random A and B
    with torch.no_grad():  # trained biases / modules_to_save must differ from the base to be seen
        for n, p in peft_model.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(root / "adapter")
    peft_model.merge_and_unload().save_pretrained(root / "merged")
    return root / "base", root / "adapter", load_file(str(root / "merged" / "model.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_weights_equal_peft_merge_and_unload(case, tmp_path):
    base, adapter, merged = build(case, tmp_path)
    by_dir, by_ref = open_model(adapter), open_model(f"{base}+{adapter}")
    assert isinstance(by_dir, AdaptedModel) and isinstance(by_ref, AdaptedModel)
    plain = ModelDir(base)
    assert by_dir.tensor_names == plain.tensor_names and sorted(merged) == sorted(plain.tensor_names)
    changed = 0
    for name in plain.tensor_names:
        for m in (by_dir, by_ref):
            got = m.get(name)
            assert got.dtype == merged[name].dtype and got.shape == merged[name].shape
            torch.testing.assert_close(got, merged[name], rtol=1e-6, atol=1e-6, msg=name)
        changed += not torch.equal(plain.get(name), merged[name])
        if by_dir.delta(name) is None and name not in by_dir._full:
            assert torch.equal(by_dir.get(name), plain.get(name))  # untargeted: exactly the base's
    assert changed >= len(by_dir._low_rank) >= 2  # every targeted tensor moved

    # as an expert: a task-arithmetic merge of weight 1 reproduces PEFT's merged model, and the
    # task vector at weight 0.5 is half the adapter's change
    for ref in (str(adapter), f"{base}+{adapter}"):
        for w in (1.0, 0.5):
            out = tmp_path / f"out-{w}-{'+' in ref}"
            export_model(Recipe(merge_method="task_arithmetic", base_model=str(base),
                                models=[{"model": ref, "parameters": {"weight": w}}]), out)
            got = load_file(str(out / "model.safetensors"))
            for name in plain.tensor_names:
                want = plain.get(name) + w * (merged[name] - plain.get(name))
                torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_rslora_and_pattern_scales(tmp_path):
    base, adapter, _ = build("llama-rslora-patterns", tmp_path)
    m = open_model(adapter)
    scales = {n: lr[3] for n, lr in m._low_rank.items()}
    assert scales["model.layers.0.self_attn.o_proj.weight"] == pytest.approx(6 / 2)  # alpha / sqrt(r)
    assert scales["model.layers.1.self_attn.o_proj.weight"] == pytest.approx(3 / 2)  # alpha_pattern
    assert scales["model.layers.0.mlp.up_proj.weight"] == pytest.approx(6 / 2 ** 0.5)  # rank_pattern


def test_reference_syntax():
    assert split_reference("a/base+b/lora") == ("a/base", "b/lora")
    assert split_reference("a/plain") == ("a/plain", None)
    with pytest.raises(ModelError, match=r"a\+b\+c: a model reference is PATH or BASE\+ADAPTER"):
        split_reference("a+b+c")


def test_refusals(tmp_path):
    base, adapter, _ = build("llama", tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())

    def variant(name: str, **changes) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        (d / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        return str(d)

    with pytest.raises(ModelError, match="DoRA"):
        open_model(variant("dora", use_dora=True))
    with pytest.raises(ModelError, match="peft_type 'IA3'; only LoRA"):
        open_model(variant("ia3", peft_type="IA3"))
    with pytest.raises(ModelError, match="base model '/nowhere' is not a local directory; write the reference as BASE"):
        open_model(variant("nobase", base_model_name_or_path="/nowhere"))
    (tmp_path / "nofile").mkdir()
    (tmp_path / "nofile" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="no adapter_model.safetensors"):
        open_model(tmp_path / "nofile")
    with pytest.raises(ModelError, match="not a PEFT adapter directory"):
        open_model(f"{base}+{base}")
    # an adapter made for another model: the targeted tensor is not in the base
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", **TINY)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelError, match=r"targets model\.layers\.0\.\S+\.weight, which .*gpt2 does not have"):
        open_model(f"{tmp_path / 'gpt2'}+{adapter}")


def _corrupt_weights(d):
    p = d / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-40])


def _int8_weights(d):
    from safetensors.torch import save_file

    p = d / "adapter_model.safetensors"
    save_file({k: (v * 100).round().to(torch.int8) for k, v in load_file(str(p)).items()}, str(p))


def _linked(d, fname):
    secret = d.parent / f"secret-{fname}"
    (d / fname).rename(secret)
    (d / fname).symlink_to(secret)


BAD_ADAPTERS = {
    "truncated weights": (_corrupt_weights, r"adapter_model\.safetensors: corrupt safetensors file .*re-download"),
    "int8 weights": (_int8_weights, r"adapter_model\.safetensors: tensor \S+ is i8 .*dequantize"),
    "config not json": (lambda d: (d / "adapter_config.json").write_text("{peft_type: LORA"),
                        r"adapter_config\.json: malformed JSON in adapter_config\.json"),
    "config is a list": (lambda d: (d / "adapter_config.json").write_text("[1]"),
                         r"adapter_config\.json must be a JSON object, not a list"),
    "config links outside": (lambda d: _linked(d, "adapter_config.json"),
                             r"adapter config 'adapter_config\.json' leads outside the model directory"),
    "weights link outside": (lambda d: _linked(d, "adapter_model.safetensors"),
                             r"adapter weights 'adapter_model\.safetensors' leads outside the model directory"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ADAPTERS))
def test_bad_adapter_files_are_one_clear_error(kind, tmp_path):
    """An adapter is read with the same guards as a model directory (evomerge.safety)."""
    base, adapter, _ = build("llama", tmp_path)
    damage, message = BAD_ADAPTERS[kind]
    damage(adapter)
    for ref in (adapter, f"{base}+{adapter}"):
        with pytest.raises(ModelError, match=message) as e:
            open_model(ref)
        assert "\n" not in str(e.value)


def test_merge_out_inside_an_adapter_is_refused(tmp_path):
    base, adapter, _ = build("llama", tmp_path)
    before = sorted((p.name, p.read_bytes()) for p in adapter.iterdir())
    recipe = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(base),
                               "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]})
    with pytest.raises(EvomergeError, match="input model"):
        export_model(recipe, adapter / "out", overwrite=True)
    with pytest.raises(EvomergeError, match="input model"):
        export_model(recipe, adapter, overwrite=True)
    assert sorted((p.name, p.read_bytes()) for p in adapter.iterdir()) == before


def test_search_with_an_adapter_expert(tmp_path):
    """A search over a base and a LoRA expert (adapter directory and base+adapter) runs on the
    real worker; the reference evaluation of the adapter expert is PEFT's merged model."""
    from evomerge.config import SearchConfig
    from evomerge.search import run_search
    from evomerge.store import RunStore

    base, adapter, _ = build("llama", tmp_path)
    from conftest import char_tokenizer

    char_tokenizer().save_pretrained(base)
    cfg = {"models": {"base": str(base), "experts": [{"model": str(adapter), "name": "dir"},
                                                     {"model": f"{base}+{adapter}", "name": "ref"}]},
           "space": {"type": "ps", "granularity": "global"}, "optimizer": "random",
           "objectives": [{"task": "python:test_families:fixed_sequence_logprob"}],
           "budget": {"evaluations": 2}, "executor": "local", "seed": 0}
    out = run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    assert out.evaluations == 2 and out.failures == 0
    with RunStore(tmp_path / "run") as s:
        refs = s.references()
        assert sorted(refs) == ["base", "dir", "ref"] and all(r.ok for r in refs.values())
        assert refs["dir"].fitness == refs["ref"].fitness != refs["base"].fitness
