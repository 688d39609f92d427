"""mergekit import beyond one whole-model merge: ignored keys, modules, carried tokenizer /
template / LoRA keys, passthrough scale, the head from another model, per-slice merges,
multi-document files, format detection and the export of the new shapes."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.merge.mergekit import recipe_from_mergekit, recipe_to_mergekit
from evomerge.merge.mergekit_multi import plan_documents, read_merge_file
from evomerge.recipe import FilteredValue, GroupValues


def fake_model(path, layers=4):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return str(path)


def imported(config, **kw):
    warnings: list[str] = []
    return recipe_from_mergekit(config, warn=warnings.append, **kw), warnings


def test_keys_mergekit_ignores_are_dropped_with_one_warning_each():
    r, warnings = imported({"name": "My-Merge", "merge_method": "model_stock", "base_model": "b",
                            "models": [{"model": "a", "parameters": {"weight": 1.0}, "notes": "x"}, {"model": "c"}],
                            "parameters": {"foo": 2}})
    assert [m.parameters for m in r.models] == [{}, {}]
    assert r.parameters == {}
    assert len(warnings) == 4
    assert "`name` is not a mergekit key" in warnings[0]
    assert any("models[0].notes" in w for w in warnings)
    assert any("models[0].parameters.weight is not a parameter of model_stock" in w for w in warnings)
    assert any("parameters.foo" in w for w in warnings)


def test_single_module_is_the_config_one_level_down(tmp_path):
    b, e = fake_model(tmp_path / "b"), fake_model(tmp_path / "e")
    r, _ = imported({"merge_method": "ties", "base_model": b, "parameters": {"density": 0.3, "weight": 1.0},
                     "modules": {"default": {"parameters": {"density": [{"filter": "mlp", "value": 0.9}]},
                                             "models": [{"model": e}]}}})
    assert [m.model for m in r.models] == [e]
    # module parameters rank before the global ones, falling through where their filters miss
    assert r.parameters["density"] == [FilteredValue(filter="mlp", value=0.9), FilteredValue(value=0.3)]
    assert r.parameters["weight"] == 1.0


def test_tokenizer_template_and_lora_references_are_carried():
    r, _ = imported({"merge_method": "task_arithmetic", "base_model": "b", "tokenizer_source": "union",
                     "chat_template": "chatml",
                     "models": [{"model": "org/m+org/lora", "parameters": {"weight": 1}},
                                {"model": {"model": {"path": "x/n"}, "lora": {"path": "x/l"}}, "parameters": {"weight": 1}}]})
    assert r.tokenizer_source == "union" and r.chat_template == "chatml"
    assert [m.model for m in r.models] == ["org/m+org/lora", "x/n+x/l"]
    assert recipe_to_mergekit(r)["chat_template"] == "chatml"
    assert recipe_to_mergekit(r)["tokenizer_source"] == "union"


def test_passthrough_scale_becomes_tensor_scale_and_head_from():
    r, _ = imported({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "d/a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "d/a", "layer_range": [1, 3],
                      "parameters": {"scale": [{"filter": "o_proj", "value": [0.0, 1.0]}, {"value": 1.0}]}}]},
        {"sources": [{"model": "d/b", "layer_range": [2, 4]}], "parameters": {"scale": 0.5}},
        {"sources": [{"model": "d/b", "layer_range": [3, 4]}]}]})
    flow = r.layer_flow
    assert flow.embed_from == "a" and flow.head_from == "b"
    # gradients are read at t = i/(n−1) inside the slice; a trailing catch-all 1 is the default
    assert [s.tensor_scale for s in flow.slots] == [
        None, None, [FilteredValue(filter="o_proj", value=0.0)], [FilteredValue(filter="o_proj", value=1.0)],
        0.5, 0.5, None]
    assert r.to_yaml().count("tensor_scale") == 4  # unset (1) is not written
    back = recipe_to_mergekit(r)
    assert back["slices"][1] == {"sources": [{"model": "d/a", "layer_range": [1, 2],
                                              "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}]}}]}
    assert recipe_from_mergekit(back, warn=lambda m: None) == r


def test_per_slice_parameters_become_per_block_values(tmp_path):
    b, e = fake_model(tmp_path / "b"), fake_model(tmp_path / "e")

    def sl(a, z, t):
        return {"sources": [{"model": b, "layer_range": [a, z]}, {"model": e, "layer_range": [a, z]}],
                "parameters": {"t": t}}

    r, _ = imported({"merge_method": "slerp", "base_model": b, "slices": [sl(0, 3, [0.0, 1.0]), sl(3, 4, 0.2)]})
    # slice 0: t = 0, 0.5, 1 over its 3 layers; slice 1 (one layer): 0.2; embed: slice 0 at t = 0; head: last slice
    assert r.parameters["t"] == GroupValues(embed=0.0, layers=[0.0, 0.5, 1.0, 0.2], head=0.2)
    assert r.layer_flow is None
    # a reordered / repeated stack becomes a layer flow of the merge
    r, _ = imported({"merge_method": "slerp", "base_model": b, "slices": [sl(0, 4, 0.3), sl(2, 3, 0.3)]})
    assert [(s.model, s.layer) for s in r.layer_flow.slots] == [("merge", i) for i in (0, 1, 2, 3, 2)]
    assert r.parameters["t"] == 0.3
    # one partial slice reads its gradient over its own layers: blocks 1, 2 at t = 0, 1
    r, _ = imported({"merge_method": "slerp", "base_model": b, "slices": [sl(1, 3, [0.2, 0.8])]})
    assert r.parameters["t"].layers[1:3] == [0.2, 0.8]
    assert [s.layer for s in r.layer_flow.slots] == [1, 2]
    with pytest.raises(ConfigError, match="block 2 is merged in several slices with different values"):
        imported({"merge_method": "slerp", "base_model": b, "slices": [sl(0, 4, 0.3), sl(2, 3, 0.9)]})
    with pytest.raises(ConfigError, match="set in some slices only"):
        imported({"merge_method": "slerp", "base_model": b, "slices": [
            sl(0, 2, 0.3), {"sources": sl(2, 4, 0)["sources"]}]})
    with pytest.raises(ConfigError, match="different filter lists"):
        imported({"merge_method": "slerp", "base_model": b, "slices": [
            sl(0, 2, [{"filter": "mlp", "value": 0.1}]), sl(2, 4, [{"filter": "attn", "value": 0.1}])]})


def test_passthrough_scale_on_the_embeddings_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="would also scale the final norm/head"):
        imported({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 1]}]},
            {"sources": [{"model": "a", "layer_range": [1, 2], "parameters": {"scale": 0.5}}]}]})
    # a filter that only hits block tensors is fine on the last slice
    r, _ = imported({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 1]}]},
        {"sources": [{"model": "a", "layer_range": [1, 2], "parameters": {"scale": {"filter": "down_proj", "value": 0}}}]}]})
    assert r.layer_flow.slots[1].tensor_scale == [FilteredValue(filter="down_proj", value=0.0)]


# ---------------------------------------------------------------------- multi-document files
def test_plan_orders_merges_and_substitutes_names(tmp_path):
    docs = [{"name": "late", "merge_method": "linear", "models": [{"model": "early"}, {"model": "x+lora"}]},
            {"merge_method": "linear", "models": [{"model": "late"}, {"model": "early"}]},
            {"name": "early", "merge_method": "linear", "models": [{"model": "hub/a"}]}]
    plan = plan_documents(docs, tmp_path / "out", "mega.yml")
    parts = tmp_path / "out.merges"
    assert [(p.name, p.out, p.final) for p in plan] == [
        ("early", parts / "early", False), ("late", parts / "late", False), (None, tmp_path / "out", True)]
    assert plan[1].config["models"] == [{"model": str(parts / "early")}, {"model": "x+lora"}]
    assert "name" not in plan[1].config
    # all named: the last one is the final model
    plan = plan_documents(docs[2:] + docs[:1], tmp_path / "out", "m")
    assert [(p.name, p.final) for p in plan] == [("early", False), ("late", True)]
    assert plan[-1].out == tmp_path / "out"


@pytest.mark.parametrize("docs,fragment", [
    ([{"merge_method": "linear"}, {"merge_method": "linear"}], "2 documents have no `name`"),
    ([{"name": "a", "merge_method": "linear"}, {"name": "a", "merge_method": "linear"}], "two merges are named 'a'"),
    ([{"name": "a", "models": [{"model": "b"}]}, {"name": "b", "models": [{"model": "a"}]}], "cycle"),
    ([{"name": "../x", "merge_method": "linear"}], "plain, non-empty string"),
    (["text"], "not a mapping"),
])
def test_plan_refusals(docs, fragment, tmp_path):
    with pytest.raises(ConfigError, match=fragment):
        plan_documents(docs, tmp_path / "o", "m")


def test_format_detection(tmp_path):
    def write(name, obj, multi=False):
        p = tmp_path / name
        p.write_text(yaml.safe_dump_all(obj) if multi else yaml.safe_dump(obj))
        return p

    recipe = {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": 1}}]}
    assert read_merge_file(write("r.yml", recipe)).kind == "recipe"  # both readings agree
    assert read_merge_file(write("v.yml", {**recipe, "version": 1, "models": [{"model": "b"}, *recipe["models"]]})).kind == "recipe"
    f = read_merge_file(write("m.yml", {**recipe, "models": [{"model": "b"}, *recipe["models"]]}))
    assert f.kind == "mergekit" and "version: 1" in f.note  # the base listed among models: mergekit's idiom
    assert read_merge_file(write("s.yml", {"merge_method": "passthrough", "slices": []})).kind == "mergekit"
    assert read_merge_file(write("multi.yml", [recipe, recipe], multi=True)).kind == "mergekit"
    with pytest.raises(ConfigError, match="neither an evomerge recipe .*merge_method.* nor a mergekit config .*merge_method"):
        read_merge_file(write("bad.yml", {"models": [{"model": "e"}]}))
    with pytest.raises(ConfigError, match="empty"):
        read_merge_file(write("empty.yml", None))


def test_cli_merge_runs_a_mergekit_multi_file(tiny_models, tmp_path, capsys):
    base, e0, e1 = (str(tiny_models[k]) for k in ("base", "e0", "e1"))
    mega = tmp_path / "mega.yml"
    mega.write_text(yaml.safe_dump_all([
        {"name": "step", "merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
         "models": [{"model": base}, {"model": e0}]},
        {"merge_method": "ties", "base_model": base, "models": [
            {"model": "step", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": e1, "parameters": {"weight": 0.5, "density": 0.5}}]}]))
    out = tmp_path / "final"
    assert cli_main(["merge", str(mega), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (tmp_path / "final.merges" / "step" / "config.json").is_file()
    capsys.readouterr()
    # a second run reuses the intermediate merge and refuses to overwrite the final one
    assert cli_main(["merge", str(mega), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "reusing" in captured.out and len(captured.err.strip().splitlines()) == 1
    assert cli_main(["merge", str(mega), "--out", str(out), "--force"]) == 0


def test_import_mergekit_cli_points_multi_files_to_merge(tmp_path, capsys):
    p = tmp_path / "m.yml"
    p.write_text("merge_method: linear\nmodels: [{model: a}]\n---\nmerge_method: linear\nmodels: [{model: b}]\n")
    assert cli_main(["recipe", "import-mergekit", str(p)]) == 2
    assert "run `evomerge merge`" in capsys.readouterr().err
