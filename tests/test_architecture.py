"""Tensor roles per model family, checked on the checkpoint names real ``transformers`` models save.

Each case builds a tiny random model of one family inside the test (``AutoConfig.for_model`` +
``AutoModelForCausalLM.from_config``), saves it with ``save_pretrained`` and checks the role of
every tensor in the checkpoint against names written out here by hand. The scale-folding test
checks the property ``layer_flow`` relies on for the families marked ``scale_foldable``: dividing
the output projections of blocks ≥ j by s equals multiplying the residual stream by s before
block j (and that it fails for a post-norm family).
"""

from __future__ import annotations

import glob

import pytest
import torch

from evomerge.architecture import FAMILIES, GENERIC, Role, TensorRoles, family_for
from evomerge.errors import ModelError

transformers = pytest.importorskip("transformers")

EPS = 1e-12  # norms' ε: small enough that the folding identity holds to float32 precision
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, n_embd=16, n_layer=2, n_head=2, n_positions=32,
            ffn_dim=32, word_embed_proj_dim=16, num_local_experts=2, num_experts=2, num_experts_per_tok=1,
            moe_intermediate_size=16, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=EPS,
            layer_norm_eps=EPS, layer_norm_epsilon=EPS, norm_eps=EPS, norm_epsilon=EPS)

A, M = Role("block", 0, "attn_out"), Role("block", 0, "mlp_out")
EMB, HEAD, NORM = Role("embedding"), Role("head"), Role("final_norm")
LLAMA_OUTSIDE = {"model.embed_tokens.weight": EMB, "lm_head.weight": HEAD, "model.norm.weight": NORM}
LLAMA_PARTS = {"self_attn.o_proj.weight": "attn_out", "mlp.down_proj.weight": "mlp_out"}

# model_type → (block prefix, every non-block tensor and its role, block tensors that are output projections)
CASES = {
    "llama": ("model.layers", LLAMA_OUTSIDE, LLAMA_PARTS),
    "mistral": ("model.layers", LLAMA_OUTSIDE, LLAMA_PARTS),
    "qwen2": ("model.layers", LLAMA_OUTSIDE, LLAMA_PARTS),
    "qwen3": ("model.layers", LLAMA_OUTSIDE, LLAMA_PARTS),
    "gemma": ("model.layers", LLAMA_OUTSIDE, LLAMA_PARTS),
    "gemma2": ("model.layers", LLAMA_OUTSIDE, LLAMA_PARTS),
    "gemma3_text": ("model.layers", LLAMA_OUTSIDE, LLAMA_PARTS),
    "phi3": ("model.layers", LLAMA_OUTSIDE, LLAMA_PARTS),
    "olmo2": ("model.layers", LLAMA_OUTSIDE, LLAMA_PARTS),
    "granite": ("model.layers", LLAMA_OUTSIDE, LLAMA_PARTS),
    "stablelm": ("model.layers", {**LLAMA_OUTSIDE, "model.norm.bias": NORM}, LLAMA_PARTS),
    "starcoder2": ("model.layers", {**LLAMA_OUTSIDE, "model.norm.bias": NORM},
                   {"self_attn.o_proj.weight": "attn_out", "self_attn.o_proj.bias": "attn_out",
                    "mlp.c_proj.weight": "mlp_out", "mlp.c_proj.bias": "mlp_out"}),
    "mixtral": ("model.layers", LLAMA_OUTSIDE,
                {"self_attn.o_proj.weight": "attn_out", "block_sparse_moe.experts.0.w2.weight": "mlp_out",
                 "block_sparse_moe.experts.1.w2.weight": "mlp_out"}),
    "qwen3_moe": ("model.layers", LLAMA_OUTSIDE,
                  {"self_attn.o_proj.weight": "attn_out", "mlp.experts.0.down_proj.weight": "mlp_out",
                   "mlp.experts.1.down_proj.weight": "mlp_out"}),
    "phi": ("model.layers", {"model.embed_tokens.weight": EMB, "lm_head.weight": HEAD, "lm_head.bias": HEAD,
                             "model.final_layernorm.weight": NORM, "model.final_layernorm.bias": NORM},
            {"self_attn.dense.weight": "attn_out", "self_attn.dense.bias": "attn_out",
             "mlp.fc2.weight": "mlp_out", "mlp.fc2.bias": "mlp_out"}),
    "gpt2": ("transformer.h", {"transformer.wte.weight": EMB, "transformer.wpe.weight": EMB, "lm_head.weight": HEAD,
                               "transformer.ln_f.weight": NORM, "transformer.ln_f.bias": NORM},
             {"attn.c_proj.weight": "attn_out", "attn.c_proj.bias": "attn_out",
              "mlp.c_proj.weight": "mlp_out", "mlp.c_proj.bias": "mlp_out"}),
    "gpt_neox": ("gpt_neox.layers", {"gpt_neox.embed_in.weight": EMB, "embed_out.weight": HEAD,
                                     "gpt_neox.final_layer_norm.weight": NORM, "gpt_neox.final_layer_norm.bias": NORM},
                 {"attention.dense.weight": "attn_out", "attention.dense.bias": "attn_out",
                  "mlp.dense_4h_to_h.weight": "mlp_out", "mlp.dense_4h_to_h.bias": "mlp_out"}),
    "falcon": ("transformer.h", {"transformer.word_embeddings.weight": EMB, "lm_head.weight": HEAD,
                                 "transformer.ln_f.weight": NORM, "transformer.ln_f.bias": NORM},
               {"self_attention.dense.weight": "attn_out", "mlp.dense_4h_to_h.weight": "mlp_out"}),
    "bloom": ("transformer.h", {"transformer.word_embeddings.weight": EMB,
                                "transformer.word_embeddings_layernorm.weight": EMB,
                                "transformer.word_embeddings_layernorm.bias": EMB, "lm_head.weight": HEAD,
                                "transformer.ln_f.weight": NORM, "transformer.ln_f.bias": NORM},
              {"self_attention.dense.weight": "attn_out", "self_attention.dense.bias": "attn_out",
               "mlp.dense_4h_to_h.weight": "mlp_out", "mlp.dense_4h_to_h.bias": "mlp_out"}),
    "opt": ("model.decoder.layers", {"model.decoder.embed_tokens.weight": EMB,
                                     "model.decoder.embed_positions.weight": EMB, "lm_head.weight": HEAD,
                                     "model.decoder.final_layer_norm.weight": NORM,
                                     "model.decoder.final_layer_norm.bias": NORM},
            {"self_attn.out_proj.weight": "attn_out", "self_attn.out_proj.bias": "attn_out",
             "fc2.weight": "mlp_out", "fc2.bias": "mlp_out"}),
}


def tiny(model_type: str, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY, **over)
    if model_type == "falcon":
        kw["new_decoder_architecture"] = False
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()


def checkpoint_names(model, path) -> list[str]:
    from safetensors import safe_open

    model.save_pretrained(path)
    names = []
    for f in sorted(glob.glob(str(path / "*.safetensors"))):
        with safe_open(f, framework="pt") as h:
            names += list(h.keys())
    return names


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_roles_of_every_checkpoint_tensor(model_type, tmp_path):
    prefix, outside, parts = CASES[model_type]
    model = tiny(model_type)
    names = checkpoint_names(model, tmp_path)
    roles = TensorRoles.for_config(model.config)
    assert roles.known and roles.family is family_for(model_type)
    seen_outside, seen_parts = set(), set()
    for n in names:
        if n.startswith(prefix + "."):
            block, rest = n[len(prefix) + 1:].split(".", 1)
            want = Role("block", int(block), parts.get(rest))
            seen_parts.add(rest)
            assert roles.group_of(n) == f"layers.{block}"
            assert roles.with_block_index(n, 7) == f"{prefix}.7.{rest}"
            assert roles.block_template(n) == f"{prefix}.0.{rest}"
            assert roles.block_path(n) == prefix
        else:
            want = outside[n]
            seen_outside.add(n)
            assert roles.group_of(n) == ("embed" if want.kind == "embedding" else "head")
            assert roles.block_path(n) is None
        assert roles.role(n) == want, n
        site = roles.site(n, 2)
        assert (site.group, site.block) == (roles.group_of(n), want.block)
    assert seen_outside == set(outside)  # the table names every non-block tensor the family saves
    assert set(parts) <= seen_parts  # ... and output projections that exist
    assert [roles.block_index(n) for n in roles.output_projections(names, block=1)] == [1] * len(parts)
    assert isinstance(model.get_submodule(prefix), torch.nn.ModuleList)  # the block list lives where roles say


def test_gpt_neox_head_is_embed_out_under_both_names():
    roles = TensorRoles.for_model_type("gpt_neox")
    assert roles.role("embed_out.weight") == HEAD  # checkpoint name (an output, not an embedding)
    assert roles.role("lm_head.weight") == HEAD  # transformers 5's parameter name for it
    assert roles.role("gpt_neox.embed_in.weight") == EMB


def test_tied_checkpoint_has_no_head_tensor(tmp_path):
    model = tiny("llama", tie_word_embeddings=True)
    names = checkpoint_names(model, tmp_path)
    roles = TensorRoles.for_config(model.config)
    assert "lm_head.weight" not in names
    assert {roles.group_of(n) for n in names} == {"embed", "layers.0", "layers.1", "head"}
    assert roles.role("model.norm.weight") == NORM


def test_moe_parameter_names_still_find_their_block():
    """transformers 5 fuses experts into ``mlp.experts.down_proj`` parameters: the block is found
    (resizing the block list needs it) even though the per-expert role is a checkpoint notion."""
    model = tiny("mixtral")
    roles = TensorRoles.for_config(model.config)
    fused = [n for n, _ in model.named_parameters() if n.endswith("experts.down_proj")]
    assert fused == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    assert [roles.block_path(n) for n in fused] == ["model.layers"] * 2


def test_unknown_family_uses_the_generic_rule():
    roles = TensorRoles.for_config({"model_type": "mystery"})
    assert not roles.known and roles.family is GENERIC and not roles.scale_foldable
    assert roles.role("transformer.h.3.attn.c_proj.weight") == Role("block", 3, "attn_out")
    assert roles.role("backbone.layers.0.mlp.down_proj.bias") == Role("block", 0, "mlp_out")
    assert roles.role("backbone.layers.0.mlp.up_proj.weight") == Role("block", 0)
    assert roles.role("model.embed_tokens.weight") == EMB
    assert roles.role("transformer.wpe.weight") == EMB
    assert roles.role("model.norm.weight") == NORM
    assert roles.role("output.weight") == HEAD
    assert roles.with_block_index("a.block.2.b.weight", 0) == "a.block.0.b.weight"
    with pytest.raises(ModelError, match=r"tensor rotary\.inv_freq: not a known tensor of an unknown "
                                         r"model type \(mystery\)"):
        roles.role("rotary.inv_freq")
    assert TensorRoles.for_config({}).model_type == "unknown"


def test_known_family_refuses_a_foreign_tensor_naming_it():
    roles = TensorRoles.for_config({"model_type": "llama"})
    with pytest.raises(ModelError, match=r"tensor transformer\.wte\.weight: not a known tensor of a llama model"):
        roles.group_of("transformer.wte.weight")
    with pytest.raises(ValueError, match="lm_head.weight is not a block tensor"):
        roles.with_block_index("lm_head.weight", 1)


def test_every_model_type_belongs_to_one_family():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))
    assert set(CASES) <= set(types)


def _fold(model, j: int, s: float, path):
    """``model`` saved, its checkpoint's output projections in blocks ≥ j divided by ``s`` (found
    by their checkpoint names, as layer flows do) and loaded back with ``transformers``."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model.save_pretrained(path)
    roles = TensorRoles.for_config(model.config)
    hit = []
    for f in sorted(glob.glob(str(path / "*.safetensors"))):
        sd = load_file(f)
        for n in sd:
            if roles.block_index(n) is not None and roles.block_index(n) >= j and roles.is_output_projection(n):
                sd[n] = sd[n] / s
                hit.append(n)
        save_file(sd, f, metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), hit


def _scaled_stream(model, j: int, s: float):
    """Hook: the residual stream entering block ``j`` is multiplied by ``s``."""
    roles = TensorRoles.for_config(model.config)
    path = next(p for p in (roles.block_path(n) for n, _ in model.named_parameters()) if p)

    def pre(module, args, kwargs):
        if args:
            return (args[0] * s, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}

    return model.get_submodule(path)[j].register_forward_pre_hook(pre, with_kwargs=True)


FOLDABLE = sorted(t for t in CASES if family_for(t).scale_foldable)


@pytest.mark.parametrize("model_type", FOLDABLE)
def test_scale_folding_identity_holds_for_foldable_families(model_type, tmp_path):
    model = tiny(model_type, num_hidden_layers=3)
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    folded, hit = _fold(model, 1, 3.0, tmp_path)
    assert len(hit) >= 4  # attention-out and MLP-out of blocks 1 and 2
    handle = _scaled_stream(model, 1, 3.0)
    with torch.no_grad():
        want = model(ids).logits
        handle.remove()
        got = folded(ids).logits
        plain = model(ids).logits
    assert (plain - want).abs().max() > 1e-3  # the scale changes the stream ...
    # ... and folding reproduces it (to float32 precision)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(set(CASES) - set(FOLDABLE)))
def test_scale_folding_fails_for_the_other_families(model_type, tmp_path):
    """gemma2/3 and olmo2 normalise each sub-block's output (folded projections are undone); OPT
    does not reproduce it either: layer flows refuse scales for them."""
    model = tiny(model_type, num_hidden_layers=3)
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    folded, _ = _fold(model, 1, 3.0, tmp_path)
    handle = _scaled_stream(model, 1, 3.0)
    with torch.no_grad():
        want = model(ids).logits
        handle.remove()
        got = folded(ids).logits
    assert (got - want).abs().max() > 1e-3


# ---------------------------------------------------------------------- roles in the merge engine
def _flow(path, model_type: str, scales) -> "Recipe":
    from evomerge.recipe import Recipe

    return Recipe(merge_method="passthrough", models=[{"model": str(path), "name": "m"}],
                  layer_flow={"slots": [{"model": "m", "layer": layer, "scale": s}
                                        for layer, s in zip((1, 0, 1), scales)]})


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox"])
def test_layer_flow_folds_scales_into_each_familys_projections(model_type, tmp_path):
    """A 3-block flow of a 2-block GPT-2 / GPT-NeoX (``transformer.h.N`` / ``gpt_neox.layers.N``,
    ``c_proj`` / ``dense`` projections with biases, NeoX's ``embed_out`` head) exports a plain model
    equal to the unscaled flow with its residual stream scaled; in place (GPT-2) it is the same net."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.export import export_model
    from evomerge.merge.materialize import apply_in_place, build_model
    from evomerge.merge.sources import Sources

    tiny(model_type).save_pretrained(tmp_path / "m")
    scales = (1.0, 2.0, 0.5)
    folded = AutoModelForCausalLM.from_pretrained(export_model(_flow(tmp_path / "m", model_type, scales),
                                                               tmp_path / "folded")).eval()
    plain = AutoModelForCausalLM.from_pretrained(export_model(_flow(tmp_path / "m", model_type, (1.0,) * 3),
                                                              tmp_path / "plain")).eval()
    assert plain.config.num_hidden_layers == 3
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unscaled = plain(ids).logits
        for j, s in enumerate(scales):
            _scaled_stream(plain, j, s)
        hooked = plain(ids).logits
        got = folded(ids).logits
    assert (hooked - unscaled).abs().max() > 1e-3
    torch.testing.assert_close(got, hooked, rtol=1e-5, atol=1e-6)
    if model_type == "gpt2":
        recipe = _flow(tmp_path / "m", model_type, scales)
        src = Sources.from_recipe(recipe).resident("cpu")
        resident = build_model(src)
        apply_in_place(resident, recipe, src)
        assert len(resident.transformer.h) == 3
        with torch.no_grad():
            torch.testing.assert_close(resident(ids).logits, got, rtol=1e-5, atol=1e-6)


def test_layer_flow_refuses_scales_for_a_family_that_cannot_fold_them(tmp_path):
    from evomerge.errors import ConfigError
    from evomerge.merge.materialize import validate
    from evomerge.merge.sources import Sources

    tiny("opt").save_pretrained(tmp_path / "m")
    recipe = _flow(tmp_path / "m", "opt", (1.0, 2.0, 1.0))
    with pytest.raises(ConfigError, match=r"layer_flow scales need a pre-norm architecture \(.*gpt2.*\); "
                                          r"opt is not known to be one"):
        validate(recipe, Sources.from_recipe(recipe))
    assert len(validate(_flow(tmp_path / "m", "opt", (1.0,) * 3), Sources.from_recipe(recipe))) > 0
