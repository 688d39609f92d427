"""Real ``transformers`` families end to end: merge → export → reload → generate, in-place merging
equal to the export, layer flows, and a two-evaluation search through the public API.

Each case builds a tiny random model of one family inside the test (hidden 32, 2 blocks, vocab 96),
two "experts" by perturbing it, and saves all three with ``save_pretrained``. transformers 5
renames or fuses some checkpoint tensors when it loads them (GPT-NeoX's ``embed_out`` →
``lm_head``; Mixtral's and Qwen3-MoE's per-expert weights → fused 3-D parameters), so the
in-place checks are exactly the ones that catch a checkpoint name taken for a parameter name.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.architecture import TensorRoles
from evomerge.config import SearchConfig
from evomerge.merge.export import export_model
from evomerge.merge.materialize import apply_in_place, build_model
from evomerge.merge.sources import Sources
from evomerge.recipe import Recipe
from evomerge.search import run_search
from evomerge.store import RunStore

from conftest import char_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=4,
            n_positions=64, ffn_dim=64, word_embed_proj_dim=32, num_local_experts=4, num_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)

# case → (model_type, config overrides)
FAMILIES = {
    "llama": ("llama", {}), "llama-tied": ("llama", {"tie_word_embeddings": True}), "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}), "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}), "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}), "gemma2": ("gemma2", {}), "gemma3_text": ("gemma3_text", {}), "phi3": ("phi3", {}),
    "phi": ("phi", {}), "olmo2": ("olmo2", {}), "granite": ("granite", {}), "starcoder2": ("starcoder2", {}),
    "stablelm": ("stablelm", {}), "gpt2": ("gpt2", {}), "opt": ("opt", {}), "bloom": ("bloom", {}),
    "falcon": ("falcon", {"new_decoder_architecture": False}), "gpt_neox": ("gpt_neox", {}),
    "mixtral": ("mixtral", {}), "qwen3_moe": ("qwen3_moe", {"decoder_sparse_step": 1, "mlp_only_layers": []}),
}


def build_family(case: str, root) -> dict[str, str]:
    """base + two perturbed experts of one family, saved as Hugging Face directories."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, over = FAMILIES[case]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**TINY, **over}))
    paths = {}
    for k, name in enumerate(("base", "e0", "e1")):
        model = base
        if k:
            model = AutoModelForCausalLM.from_config(base.config)
            with torch.no_grad():
                for p, q in zip(model.parameters(), base.parameters()):
                    p.copy_(q + 0.05 * torch.randn_like(q))
        model.save_pretrained(root / name)
        char_tokenizer().save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def state(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().float() for n, t in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for n in sa:
        assert torch.equal(sa[n], sb[n]), n


def check_export_and_in_place(recipe: Recipe, out) -> None:
    """Export → reload → generate; the in-place merge into a model built from the reference gives
    exactly the exported weights."""
    from transformers import AutoModelForCausalLM

    sources = Sources.from_recipe(recipe)
    export_model(recipe, out, sources)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == (len(recipe.layer_flow.slots) if recipe.layer_flow else 2)
    ids = torch.tensor([[1, 5, 7, 9]])
    gen = loaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 7) and bool((gen >= 0).all() and (gen < VOCAB).all())
    resident = sources.resident("cpu")
    model = build_model(resident)
    apply_in_place(model, recipe, resident)
    assert_same_weights(model, loaded)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def fixed_sequence_logprob(model):
    """A cheap objective: per position, the log-probability of the next token of a fixed sequence."""
    ids = torch.tensor([[1, 4, 9, 16, 25, 36, 49, 64]]) % model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)
    return logp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0].tolist()


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_family_merge_layer_flow_and_search(case, tmp_path):
    paths = build_family(case, tmp_path)
    experts = [{"model": paths["e0"], "parameters": {"weight": 0.6, "density": 0.5}},
               {"model": paths["e1"], "parameters": {"weight": 0.4, "density": 0.7}}]
    check_export_and_in_place(Recipe(merge_method="ties", base_model=paths["base"], models=experts),
                              tmp_path / "ties")

    # a deeper layer flow over the merge and an expert; scales only where the family folds them
    roles = TensorRoles.for_model_type(FAMILIES[case][0])
    s = 0.5 if roles.scale_foldable else 1.0
    flow = {"slots": [{"model": "merge", "layer": 0}, {"model": "e1", "layer": 1, "scale": s},
                      {"model": "merge", "layer": 1, "scale": 1 / s}]}
    check_export_and_in_place(Recipe(merge_method="linear", base_model=paths["base"], layer_flow=flow,
                                     models=[{"model": paths["e0"], "parameters": {"weight": 0.5}},
                                             {"model": paths["e1"], "parameters": {"weight": 0.5}}]),
                              tmp_path / "flow")

    cfg = {"models": {"base": paths["base"], "experts": [paths["e0"], paths["e1"]]},
           "space": {"type": "ps", "granularity": "global"}, "optimizer": "random",
           "objectives": [{"task": f"python:{__name__}:fixed_sequence_logprob"}],
           "budget": {"evaluations": 2}, "executor": "local", "seed": 0}
    out = run_search(SearchConfig.from_dict(cfg), tmp_path / "run")
    assert out.evaluations == 2 and out.failures == 0, out
    with RunStore(tmp_path / "run") as store:
        trials = store.trials()
        assert len(trials) == 2 and all(t.ok and len(store.scores(t.id)) == 1 for t in trials)


def always_fails(model):
    raise RuntimeError("this objective always fails")


def test_a_search_whose_every_evaluation_fails_exits_2_with_the_reason(tmp_path, capsys):
    import yaml

    from evomerge.cli import main

    paths = build_family("llama", tmp_path)
    cfg = {"models": {"base": paths["base"], "experts": [paths["e0"], paths["e1"]]},
           "space": {"type": "ps", "granularity": "global"}, "optimizer": "random",
           "objectives": [{"task": f"python:{__name__}:always_fails"}],
           "budget": {"evaluations": 2}, "executor": "local", "seed": 0}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["search", str(tmp_path / "cfg.yaml"), "-r", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "all 2 evaluations failed (2 with:" in err and "this objective always fails" in err
    cfg["objectives"] = [{"task": f"python:{__name__}:fixed_sequence_logprob"}]
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["search", str(tmp_path / "ok.yaml"), "-r", str(tmp_path / "ok"), "-q"]) == 0
