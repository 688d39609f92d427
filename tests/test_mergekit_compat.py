"""mergekit YAML ⇄ recipe: translations, round trips, every refusal, and the CLI commands."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.architecture import TensorRoles
from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.merge.methods import get_operator
from evomerge.merge.mergekit import dump_mergekit, recipe_from_mergekit, recipe_to_mergekit
from evomerge.models import ModelDir
from evomerge.recipe import FilteredValue, GroupValues, Recipe, resolve

LLAMA = TensorRoles.for_model_type("llama")


def fake_model(path, layers=2):
    """A directory with just a config.json (enough for layer-range checks)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return str(path)


def effective(recipe: Recipe, names: list[str], num_blocks: int) -> dict:
    """Every parameter value the engine would use, per (model, parameter, tensor)."""
    op = get_operator(recipe.merge_method)
    out = {}
    for name in names:
        site = LLAMA.site(name, num_blocks)
        for k, m in enumerate(recipe.models):
            for p, d in op.model_params.items():
                v = resolve(m.parameters.get(p), site)
                v = resolve(recipe.parameters.get(p), site) if v is None else v
                out[(m.model, p, name)] = d if v is None else v
        for p, d in op.global_params.items():
            v = resolve(recipe.parameters.get(p), site)
            out[(None, p, name)] = d if v is None else v
    return out


# ---------------------------------------------------------------------- import
def test_import_models_form():
    r = recipe_from_mergekit({
        "merge_method": "ties", "base_model": "b", "dtype": "bf16", "tokenizer_source": "e1",
        "parameters": {"normalize": False, "density": "0.7"},
        "models": [{"model": "b"}, {"model": "e1", "parameters": {"weight": 0.4, "density": 0.5}},
                   {"model": "x/e2", "parameters": {"weight": {"filter": "mlp", "value": 0.2}}}],
    })
    assert r.merge_method == "ties" and r.base_model == "b" and r.dtype == "bfloat16"
    assert [m.model for m in r.models] == ["e1", "x/e2"]  # the base is the reference, not an input
    assert r.models[0].parameters == {"weight": 0.4, "density": 0.5}
    assert r.models[1].parameters["weight"] == [FilteredValue(filter="mlp", value=0.2)]
    assert r.parameters == {"normalize": False, "density": 0.7}  # numeric strings become numbers
    assert r.tokenizer_source == "e1"


def test_gradients_keep_mergekit_values_outside_the_blocks():
    # mergekit reads gradients at t = 0 for embeddings *and* head; when evomerge's own reading
    # differs there the value becomes GroupValues with the same numbers everywhere.
    r = recipe_from_mergekit({"merge_method": "task_arithmetic", "base_model": "b", "models": [
        {"model": "e", "parameters": {"weight": [0.2, 1.0], "density": [0.5, 0.5, 0.5]}}],
        "parameters": {"lambda": [{"filter": "mlp", "value": [1.0, 2.0]}, {"value": [3.0]}]}})
    w = r.models[0].parameters["weight"]
    head_differs = resolve([0.2, 1.0], _site("lm_head.weight")) != 0.2
    if head_differs:
        assert w == GroupValues(embed=0.2, layers=[0.2, 1.0], head=0.2)
    assert r.models[0].parameters["density"] == [0.5, 0.5, 0.5]  # flat: same everywhere
    lam = r.parameters["lambda"]
    assert lam[1] == FilteredValue(filter=None, value=3.0)  # one-point gradient = scalar
    for name, want in [("model.embed_tokens.weight", 0.2), ("model.layers.0.mlp.up_proj.weight", 0.2),
                       ("model.layers.3.mlp.up_proj.weight", 1.0), ("model.layers.1.mlp.up_proj.weight", 0.2 + 0.8 / 3),
                       ("lm_head.weight", 0.2), ("model.norm.weight", 0.2)]:
        assert resolve(w, _site(name)) == pytest.approx(want), name


def _site(name, blocks=4):
    return LLAMA.site(name, blocks)


def test_linear_takes_the_base_as_an_input_like_mergekit():
    r = recipe_from_mergekit({"merge_method": "linear", "base_model": "m/b", "parameters": {"weight": 0.1},
                              "models": [{"model": "m/e", "parameters": {"weight": 0.9}}]})
    assert [m.model for m in r.models] == ["m/e", "m/b"]
    r2 = recipe_from_mergekit({"merge_method": "linear", "base_model": "m/b", "models": [
        {"model": "m/b", "parameters": {"weight": 0.5}}, {"model": "m/e", "parameters": {"weight": 0.5}}]})
    assert [m.model for m in r2.models] == ["m/b", "m/e"]


def test_slerp_drops_the_base_from_models_and_aliases_collide():
    r = recipe_from_mergekit({"merge_method": "slerp", "base_model": "a/m", "parameters": {"t": 0.3},
                              "models": [{"model": "a/m"}, {"model": "b/m"}]})
    assert [m.model for m in r.models] == ["b/m"] and r.parameters == {"t": 0.3}
    r = recipe_from_mergekit({"merge_method": "ties", "base_model": "base", "models": [
        {"model": "x/m", "parameters": {"weight": 1}}, {"model": "y/m", "parameters": {"weight": 1}},
        {"model": "z/base", "parameters": {"weight": 1}}]})
    assert [m.alias for m in r.models] == ["m_1", "m_2", "base_1"]


def test_slices_spanning_all_layers_are_the_models_form(tmp_path):
    b, e = fake_model(tmp_path / "b"), fake_model(tmp_path / "e")
    r = recipe_from_mergekit({"merge_method": "ties", "base_model": b, "parameters": {"weight": 0.3},
                              "slices": [{"sources": [{"model": b, "layer_range": [0, 2]},
                                                      {"model": e, "layer_range": [0, 2],
                                                       "parameters": {"density": 0.5}}],
                                          "parameters": {"weight": [{"filter": "mlp", "value": 0.9}]}}]})
    assert [m.model for m in r.models] == [e]
    # slice parameters come before the global ones, falling through where their filters miss
    assert r.parameters["weight"] == [FilteredValue(filter="mlp", value=0.9), FilteredValue(value=0.3)]
    # a slice over part of the layers keeps just those blocks (as mergekit): a layer flow of the merge
    part = recipe_from_mergekit({"merge_method": "ties", "base_model": b, "slices": [{"sources": [
        {"model": b, "layer_range": [1, 2]}, {"model": e, "layer_range": [1, 2], "parameters": {"weight": 1}}]}]})
    assert [(s.model, s.layer) for s in part.layer_flow.slots] == [("merge", 1)]
    with pytest.raises(ConfigError, match="no readable config.json"):
        recipe_from_mergekit({"merge_method": "ties", "base_model": b, "slices": [{"sources": [
            {"model": str(tmp_path / "nope"), "layer_range": [0, 2]}]}]})


def test_passthrough_slices_become_a_layer_flow(tmp_path):
    r = recipe_from_mergekit({"merge_method": "passthrough", "base_model": "d/a", "slices": [
        {"sources": [{"model": "d/a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "d/b", "layer_range": [1, 3]}]},
        {"sources": [{"model": "d/a", "layer_range": [1, 2]}]}]})
    assert [m.model for m in r.models] == ["d/b"]
    assert r.layer_flow.embed_from == "base"
    assert [(s.model, s.layer, s.scale) for s in r.layer_flow.slots] == [
        ("base", 0, 1.0), ("base", 1, 1.0), ("b", 1, 1.0), ("b", 2, 1.0), ("base", 1, 1.0)]
    r = recipe_from_mergekit({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "d/a", "layer_range": [0, 1]}]}, {"sources": [{"model": "d/a", "layer_range": [0, 1]}]}]})
    assert r.base_model is None and r.layer_flow.embed_from == "a" and len(r.layer_flow.slots) == 2


def test_base_dir_joins_existing_relative_paths(tmp_path):
    fake_model(tmp_path / "b")
    r = recipe_from_mergekit({"merge_method": "slerp", "base_model": "b", "parameters": {"t": 0.5},
                              "models": [{"model": "org/hub-model"}]}, base_dir=tmp_path)
    assert r.base_model == str(tmp_path / "b") and r.models[0].model == "org/hub-model"


@pytest.mark.parametrize("config,fragment", [
    ({"merge_method": "ties", "modules": {"text": {}, "vision": {}}, "base_model": "b"}, "several modules"),
    ({"merge_method": "ties", "modules": {"text": {"models": [{"model": "a"}]}}, "models": [{"model": "a"}]},
     "either at the top level or in modules.text"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": "base", "tokens": {"<x>": {}}}},
     "tokenizer.tokens"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": {"x": 1}}, "chat_template must be"),
    ({"merge_method": "frankenstein", "models": [{"model": "a"}]}, "merge_method 'frankenstein' has no evomerge operator"),
    ({"models": [{"model": "a"}]}, "`merge_method` is missing"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": [True, False]}}]},
     "only numeric gradients"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]}, "needs `base_model`"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "slices": [{"sources": []}]}, "exactly one of"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]},
                                                            {"model": "b", "layer_range": [0, 1]}]}]},
     "one source per slice"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1],
                                                             "parameters": {"scale": 0.5}}]}]},
     "would also scale the embeddings"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 1]}]}]},
     r"layer_range must be \[start, end\)"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}],
                                                 "residual_weight": 0.5}]}, "residual_weight"),
    ({"merge_method": "ties", "base_model": "a", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 1]}, {"model": "b", "layer_range": [0, 1]}]},
        {"sources": [{"model": "a", "layer_range": [1, 2]}, {"model": "c", "layer_range": [1, 2]}]}]},
     "merges the same models in every slice"),
    ({"merge_method": "ties", "base_model": "a", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 1]}, {"model": "b", "layer_range": [1, 2]}]}]},
     "different layer ranges"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "int8"}, "dtype 'int8'"),
    ("just text", "expected a mapping"),
])
def test_unsupported_features_are_named(config, fragment):
    with pytest.raises(ConfigError, match=fragment):
        recipe_from_mergekit(config)


# ---------------------------------------------------------------------- export
def test_export_models_form():
    r = Recipe(merge_method="dare_ties", base_model="m/b", dtype="bfloat16", tokenizer_source="e", seed=3,
               models=[{"model": "m/e", "parameters": {"weight": 0.5, "density": [0.2, 0.2]}},
                       {"model": "m/f", "name": "eff", "parameters": {"weight": [{"filter": "mlp", "value": 0.1}]}}],
               parameters={"rescale": False, "sign_method": "sum"})
    cfg = recipe_to_mergekit(r)
    assert cfg == {"merge_method": "dare_ties", "base_model": "m/b",
                   "models": [{"model": "m/e", "parameters": {"weight": 0.5, "density": [0.2, 0.2]}},
                              {"model": "m/f", "parameters": {"weight": [{"filter": "mlp", "value": 0.1}]}}],
                   "parameters": {"rescale": False}, "dtype": "float32", "out_dtype": "bfloat16",
                   "tokenizer_source": "m/e"}
    text = dump_mergekit(cfg)
    assert "density: [0.2, 0.2]" in text and yaml.safe_load(text) == cfg


def test_export_slerp_and_linear_inputs():
    cfg = recipe_to_mergekit(Recipe(merge_method="slerp", base_model="b", models=[{"model": "e"}],
                                    parameters={"t": 0.25}))
    assert cfg["models"] == [{"model": "b"}, {"model": "e"}] and cfg["base_model"] == "b"
    # linear: a base_model that is not an input must not reach mergekit (it would become one)
    cfg = recipe_to_mergekit(Recipe(merge_method="linear", base_model="b", tokenizer_source="base",
                                    models=[{"model": "e", "parameters": {"weight": 1}}]))
    assert "base_model" not in cfg and cfg["tokenizer_source"] == "b"


def test_export_group_values_writes_exact_name_filters(tiny_models):
    base, e0 = str(tiny_models["base"]), str(tiny_models["e0"])
    gv = GroupValues(embed=0.9, layers=[0.1, 0.3], head=0.7)
    r = Recipe(merge_method="task_arithmetic", base_model=base, models=[
        {"model": e0, "parameters": {"weight": gv, "density": [{"filter": "mlp", "value": gv}, {"value": 0.5}]}}])
    cfg = recipe_to_mergekit(r)
    w = cfg["models"][0]["parameters"]["weight"]
    assert w == [{"filter": "lm_head.weight", "value": 0.7}, {"filter": "model.embed_tokens.weight", "value": 0.9},
                 {"filter": "model.norm.weight", "value": 0.7}, {"value": [0.1, 0.3]}]
    # "mlp" selects only block tensors: the filter needs no per-name entries
    assert cfg["models"][0]["parameters"]["density"] == [{"filter": "mlp", "value": [0.1, 0.3]}, {"value": 0.5}]
    back = recipe_from_mergekit(cfg)
    names = ModelDir(base).tensor_names
    assert effective(back, names, 2) == effective(r, names, 2)


def test_export_gradient_whose_head_value_differs_needs_names(tiny_models, tmp_path):
    base, e0 = str(tiny_models["base"]), str(tiny_models["e0"])
    r = Recipe(merge_method="task_arithmetic", base_model=base, models=[{"model": e0, "parameters": {"weight": [0.0, 1.0]}}])
    names = ModelDir(base).tensor_names
    assert effective(recipe_from_mergekit(recipe_to_mergekit(r)), names, 2) == effective(r, names, 2)
    r_missing = r.model_copy(update={"base_model": str(tmp_path / "missing")})
    if resolve([0.0, 1.0], _site("lm_head.weight")) != 0.0:
        with pytest.raises(ConfigError, match="tensor names of"):
            recipe_to_mergekit(r_missing)


def test_export_layer_flow_as_slices():
    r = Recipe(merge_method="passthrough", base_model="d/a", models=[{"model": "d/b"}],
               layer_flow={"slots": [{"model": "base", "layer": 0}, {"model": "base", "layer": 1},
                                     {"model": "b", "layer": 1}, {"model": "b", "layer": 2}, {"model": "base", "layer": 1}]})
    cfg = recipe_to_mergekit(r)
    assert cfg == {"slices": [{"sources": [{"model": "d/a", "layer_range": [0, 2]}]},
                              {"sources": [{"model": "d/b", "layer_range": [1, 3]}]},
                              {"sources": [{"model": "d/a", "layer_range": [1, 2]}]}],
                   "merge_method": "passthrough"}
    back = recipe_from_mergekit({**cfg, "base_model": "d/a"})
    assert back.layer_flow == r.layer_flow.model_copy(update={"embed_from": "base"})


@pytest.mark.parametrize("recipe,fragment", [
    ({"merge_method": "passthrough", "models": [{"model": "a"}],
      "layer_flow": {"slots": [{"model": "a", "layer": 0, "scale": 1.5}]}}, r"slots\[0\]\.scale = 1\.5"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}],
      "layer_flow": {"slots": [{"model": "merge", "layer": 0}]}}, "recipe's own merge"),
    ({"merge_method": "passthrough", "models": [{"model": "a"}, {"model": "c"}],
      "layer_flow": {"slots": [{"model": "a", "layer": 0}, {"model": "c", "layer": 0}]}}, "must be embed_from"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}],
      "parameters": {"sign_method": "count"}}, "sign_method .* has no mergekit equivalent"),
    ({"merge_method": "dare_ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}],
      "parameters": {"rescale_mode": [{"filter": "mlp", "value": "inverse_p"}]}}, "rescale_mode"),
    ({"merge_method": "passthrough", "models": [{"model": "a"}, {"model": "c"}]}, "exactly one model"),
    ({"merge_method": "lines", "base_model": "b", "models": [{"model": "a"}], "parameters": {"alpha": 0.1, "beta": 1}},
     "lines is evomerge's own"),
    ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                                   {"model": "c"}]},
     r"models\[0\]\.parameters\.weight is not a per-model parameter of model_stock"),
])
def test_export_refusals(recipe, fragment):
    with pytest.raises(ConfigError, match=fragment):
        recipe_to_mergekit(Recipe.model_validate(recipe))


# ---------------------------------------------------------------------- round trips
MK_CONFIGS = [
    {"merge_method": "ties", "base_model": "m/b", "parameters": {"normalize": False, "weight": 0.4},
     "models": [{"model": "m/e1", "parameters": {"density": [0.3, 0.9], "weight": [{"filter": "self_attn", "value": 0.2}]}},
                {"model": "m/e2", "parameters": {"density": 0.5, "weight": 0.6}}], "dtype": "float32",
     "out_dtype": "float16"},
    {"merge_method": "slerp", "base_model": "m/b", "models": [{"model": "m/b"}, {"model": "m/e1"}],
     "parameters": {"t": [{"filter": "mlp", "value": [0.0, 0.5]}, {"value": 0.5}]}},
    {"merge_method": "model_stock", "base_model": "m/b", "models": [{"model": "m/e1"}, {"model": "m/e2"}],
     "parameters": {"filter_wise": True}},
    {"merge_method": "breadcrumbs_ties", "base_model": "m/b", "models": [
        {"model": "m/e1", "parameters": {"weight": 1.0, "density": 0.9, "gamma": 0.02}}], "tokenizer_source": "base"},
    {"merge_method": "linear", "models": [{"model": "m/e1", "parameters": {"weight": 2}},
                                          {"model": "m/e2", "parameters": {"weight": 1}}], "parameters": {"normalize": True}},
    {"merge_method": "passthrough", "slices": [{"sources": [{"model": "m/e1", "layer_range": [0, 3]}]},
                                               {"sources": [{"model": "m/e2", "layer_range": [2, 4]}]},
                                               {"sources": [{"model": "m/e1", "layer_range": [3, 4]}]}]},
]


@pytest.mark.parametrize("cfg", MK_CONFIGS, ids=lambda c: c["merge_method"])
def test_round_trip_mergekit_recipe_mergekit(cfg):
    r = recipe_from_mergekit(cfg)
    again = recipe_from_mergekit(recipe_to_mergekit(r))
    assert again == r
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r  # and the recipe itself serialises


def test_round_trip_recipe_mergekit_recipe(tiny_models):
    base, e0, e1 = (str(tiny_models[k]) for k in ("base", "e0", "e1"))
    r = Recipe(merge_method="della", base_model=base, dtype="bfloat16", models=[
        {"model": e0, "parameters": {"weight": GroupValues(embed=0.1, layers=[0.2, 0.4], head=0.3), "density": 0.6,
                                     "epsilon": 0.1}},
        {"model": e1, "parameters": {"weight": [0.5, 0.7], "density": [{"filter": "mlp", "value": 0.8}]}}],
        parameters={"density": 0.7, "lambda": 1.1})
    back = recipe_from_mergekit(recipe_to_mergekit(r))
    names = ModelDir(base).tensor_names
    assert effective(back, names, 2) == effective(r, names, 2)
    assert (back.merge_method, back.base_model, back.dtype, [m.model for m in back.models]) == (
        "della", base, "bfloat16", [e0, e1])


# ---------------------------------------------------------------------- CLI
def test_cli_import_and_export(tmp_path, capsys):
    cfg = tmp_path / "mk.yml"
    cfg.write_text(yaml.safe_dump(MK_CONFIGS[0]))
    assert cli_main(["recipe", "import-mergekit", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert Recipe.from_dict(yaml.safe_load(printed)) == recipe_from_mergekit(MK_CONFIGS[0])
    out = tmp_path / "r" / "recipe.yaml"
    assert cli_main(["recipe", "import-mergekit", str(cfg), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    assert Recipe.load(out) == recipe_from_mergekit(MK_CONFIGS[0])
    mk = tmp_path / "back.yml"
    assert cli_main(["recipe", "export-mergekit", str(out), "-o", str(mk)]) == 0
    assert recipe_from_mergekit(yaml.safe_load(mk.read_text())) == Recipe.load(out)
    assert cli_main(["recipe", "export-mergekit", str(out)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["merge_method"] == "ties"


@pytest.mark.parametrize("args,content,fragment", [
    (["recipe", "import-mergekit", "{dir}/missing.yml"], None, "file not found"),
    (["recipe", "import-mergekit", "{dir}/c.yml"], "merge_method: [unclosed", "malformed YAML"),
    (["recipe", "import-mergekit", "{dir}/c.yml"], "merge_method: nuslerps\nmodels: [{model: a}]", "nuslerps"),
    (["recipe", "export-mergekit", "{dir}/c.yml"],
     "merge_method: passthrough\nmodels: [{model: a}]\nlayer_flow: {slots: [{model: a, layer: 0, scale: 2}]}\n",
     "scale"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, args, content, fragment):
    if content is not None:
        (tmp_path / "c.yml").write_text(content)
    out = tmp_path / "out.yaml"
    code = cli_main([a.format(dir=tmp_path) for a in args] + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err
    assert not out.exists()
