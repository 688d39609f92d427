"""The merge engine: recipes → weights, in place and exported, layer flows, and every error path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError, EvomergeError, ModelError
from evomerge.merge.export import export_model
from evomerge.merge.materialize import apply_in_place, build_model, merged_tensors, output_layout
from evomerge.merge.sources import Sources
from evomerge.models import ModelDir
from evomerge.recipe import Recipe, TensorSite, resolve

from conftest import make_model

X = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


def ta_recipe(m, **params) -> Recipe:
    return Recipe(
        merge_method="task_arithmetic", base_model=str(m["base"]),
        models=[{"model": str(m["e0"]), "parameters": {"weight": params.get("w0", 0.5)}},
                {"model": str(m["e1"]), "parameters": {"weight": params.get("w1", [0.0, 1.0])}}],
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


# ---------------------------------------------------------------------- recipe semantics
def test_parameter_resolution_follows_mergekit():
    sites = [TensorSite(name=n, group=g, block=b, num_blocks=3) for n, g, b in [
        ("model.embed_tokens.weight", "embed", None), ("model.layers.0.self_attn.q_proj.weight", "layers.0", 0),
        ("model.layers.1.mlp.up_proj.weight", "layers.1", 1), ("model.layers.2.mlp.up_proj.weight", "layers.2", 2),
        ("lm_head.weight", "head", None)]]
    grad = [resolve([0.0, 1.0], s) for s in sites]
    assert grad == [0.0, 0.0, 0.5, 1.0, 0.0]  # t = i/(L-1) in blocks, 0 outside (mergekit 0.1.5)
    groups = {"embed": 7.0, "layers": [1.0, 2.0, 3.0], "head": 9.0}
    r = Recipe(merge_method="linear", models=[{"model": "a", "parameters": {"weight": groups}}])
    assert [resolve(r.models[0].parameters["weight"], s) for s in sites] == [7.0, 1.0, 2.0, 3.0, 9.0]
    filt = Recipe(merge_method="linear", models=[{"model": "a", "parameters": {"weight": [
        {"filter": "self_attn", "value": 0.25}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.75}]}}])
    v = filt.models[0].parameters["weight"]
    assert [resolve(v, s) for s in sites] == [0.75, 0.25, 0.5, 1.0, 0.75]
    assert resolve([2.0, 4.0, 6.0], sites[2]) == 4.0  # piecewise-linear through the anchors


def test_recipe_hash_is_content_identity(tiny_models):
    a, b = ta_recipe(tiny_models), ta_recipe(tiny_models)
    assert a.hash() == b.hash()
    assert ta_recipe(tiny_models, w0=0.6).hash() != a.hash()
    assert Recipe.from_dict(json.loads(json.dumps(a.model_dump(mode="json")))).hash() == a.hash()


# ---------------------------------------------------------------------- merging
def test_task_arithmetic_exact_per_tensor(tiny_models):
    m = tiny_models
    r = ta_recipe(m)
    b, e0, e1 = (ModelDir(m[k]) for k in ("base", "e0", "e1"))
    got = dict(merged_tensors(r, Sources.from_recipe(r)))
    for name, t in got.items():
        w1 = resolve([0.0, 1.0], b.site(name))
        want = b.get(name) + 0.5 * (e0.get(name) - b.get(name)) + w1 * (e1.get(name) - b.get(name))
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6)


def test_weight_one_reproduces_parent_and_in_place_equals_export(tiny_models, tmp_path):
    m = tiny_models
    r = ta_recipe(m, w0=1.0, w1=0.0)
    src = Sources.from_recipe(r)
    out = export_model(r, tmp_path / "merged", src)
    exported, parent = weights(out), weights(m["e0"])
    assert exported.keys() == parent.keys()
    for k in parent:
        torch.testing.assert_close(exported[k], parent[k], rtol=0, atol=1e-6)

    r2 = ta_recipe(m, w0=0.3, w1=[0.2, 0.9])
    export_model(r2, tmp_path / "m2", src)
    model = build_model(src)
    apply_in_place(model, r2, src)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m2")
    assert torch.equal(logits(model), logits(loaded))
    # and the resident (worker) path gives the same weights as the lazy one
    res = src.resident("cpu")
    model2 = build_model(res)
    apply_in_place(model2, r2, res)
    assert torch.equal(logits(model2), logits(loaded))


def test_export_directory_contents_and_shards(tiny_models, tmp_path):
    r = ta_recipe(tiny_models).model_copy(update={"dtype": "bfloat16"})
    out = export_model(r, tmp_path / "sharded", shard_bytes=20_000)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all(t.dtype == torch.bfloat16 for t in weights(out).values())
    assert Recipe.load(out / "evomerge_recipe.yaml").hash() == r.hash()
    assert "task_arithmetic" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_in_place_reuses_parameters_without_reallocation(tiny_models):
    r = ta_recipe(tiny_models)
    src = Sources.from_recipe(r).resident("cpu")
    model = build_model(src)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    apply_in_place(model, r, src)
    apply_in_place(model, ta_recipe(tiny_models, w0=0.9), src)
    assert ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}
    # resident inputs are never modified by merging
    assert torch.equal(src.get("e0", "lm_head.weight"), ModelDir(tiny_models["e0"]).get("lm_head.weight"))


# ---------------------------------------------------------------------- layer flow
def flow_recipe(m, scales=(1.0, 2.0, 0.5)) -> Recipe:
    return Recipe(
        merge_method="task_arithmetic", base_model=str(m["base"]),
        models=[{"model": str(m["e0"]), "parameters": {"weight": 0.5}},
                {"model": str(m["e1"]), "parameters": {"weight": 0.5}}],
        layer_flow={"slots": [{"model": "e0", "layer": 0, "scale": scales[0]},
                              {"model": "merge", "layer": 1, "scale": scales[1]},
                              {"model": "e1", "layer": 1, "scale": scales[2]}]},
    )


def test_layer_flow_exports_a_plain_model_that_runs(tiny_models, tmp_path):
    r = flow_recipe(tiny_models)
    out = export_model(r, tmp_path / "flow")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert logits(model).shape == (1, X.shape[1], 32)
    # in place into a 2-block resident model gives the same network
    src = Sources.from_recipe(r).resident("cpu")
    resident = build_model(src)
    apply_in_place(resident, r, src)
    torch.testing.assert_close(logits(resident), logits(model), rtol=0, atol=1e-6)
    # and shrinking back to a plain merge works on the same resident model
    apply_in_place(resident, ta_recipe(tiny_models), src)
    assert resident.config.num_hidden_layers == 2


def test_folded_scales_equal_scaling_the_residual_stream(tiny_models, tmp_path):
    """DESIGN.md: scaling the stream before block j ≡ dividing later output projections."""
    scales = (1.0, 2.0, 0.5)
    folded = AutoModelForCausalLM.from_pretrained(export_model(flow_recipe(tiny_models, scales), tmp_path / "f"))
    plain = AutoModelForCausalLM.from_pretrained(
        export_model(flow_recipe(tiny_models, (1.0, 1.0, 1.0)), tmp_path / "p"))
    unscaled = logits(plain)
    for block, s in zip(plain.model.layers, scales):
        block.register_forward_pre_hook(
            lambda mod, args, kwargs, s=s: ((args[0] * s, *args[1:]), kwargs) if args
            else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}), with_kwargs=True)
    hooked = logits(plain)
    assert (hooked - unscaled).abs().max() > 1e-2  # the scales matter...
    torch.testing.assert_close(logits(folded), hooked, rtol=0, atol=1e-4)  # ...and folding is exact up to ε


def test_layer_flow_across_depths_and_families(tiny_models, tmp_path):
    m = tiny_models
    r = Recipe(merge_method="passthrough", models=[{"model": str(m["deep"])}, {"model": str(m["base"])}],
               layer_flow={"slots": [{"model": "deep", "layer": 2}, {"model": "base", "layer": 0},
                                     {"model": "deep", "layer": 0}, {"model": "deep", "layer": 1}]})
    out = export_model(r, tmp_path / "stack")
    got, deep = weights(out), weights(m["deep"])
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], deep["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], deep["model.layers.1.mlp.up_proj.weight"])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    q = m["qwen"]
    rq = Recipe(merge_method="passthrough", models=[{"model": str(q)}],
                layer_flow={"slots": [{"model": "qwen", "layer": 1, "scale": 1.5}, {"model": "qwen", "layer": 1}]})
    model = AutoModelForCausalLM.from_pretrained(export_model(rq, tmp_path / "qwen"))
    assert logits(model).shape[-1] == 32


# ---------------------------------------------------------------------- errors: one clear line, no output
def run_cli(*args) -> int:
    return cli_main(list(map(str, args)))


def write_recipe(path: Path, data) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def assert_cli_error(capsys, args, *fragments):
    capsys.readouterr()
    rc = run_cli(*args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for f in fragments:
        assert f in err, err


@pytest.fixture()
def recipe_dict(tiny_models):
    return ta_recipe(tiny_models).model_dump(mode="json", exclude_none=True)


def test_cli_merge_success(tiny_models, tmp_path, capsys, recipe_dict):
    rc = run_cli("merge", write_recipe(tmp_path / "r.yaml", recipe_dict), "--out", tmp_path / "o")
    assert rc == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    # a second run refuses to overwrite, --force replaces
    assert_cli_error(capsys, ["merge", tmp_path / "r.yaml", "--out", tmp_path / "o"], "--force")
    assert run_cli("merge", tmp_path / "r.yaml", "--out", tmp_path / "o", "--force") == 0


@pytest.mark.parametrize("case", ["missing_path", "no_safetensors", "shape", "arch", "operator", "yaml",
                                  "layer_range", "nan", "pickle", "range", "schema"])
def test_cli_merge_errors(case, tiny_models, tmp_path, capsys, recipe_dict):
    m = tiny_models
    d = json.loads(json.dumps(recipe_dict))
    frag = []
    if case == "missing_path":
        d["models"][0]["model"] = str(tmp_path / "nope")
        frag = ["nope", "not found"]
    elif case == "no_safetensors":
        empty = tmp_path / "empty"
        empty.mkdir()
        shutil.copy(m["base"] / "config.json", empty)
        d["models"][0]["model"] = str(empty)
        frag = ["no *.safetensors"]
    elif case == "shape":
        other = make_model(tmp_path / "wide", 3, hidden=64)
        d["models"][0]["model"] = str(other)
        frag = ["shape mismatch", "[32, 64]"]
    elif case == "arch":
        d["models"][0]["model"] = str(m["qwen"])
        frag = ["architecture mismatch", "qwen2"]
    elif case == "operator":
        d["merge_method"] = "frobnicate"
        frag = ["unknown merge_method 'frobnicate'"]
    elif case == "yaml":
        p = tmp_path / "r.yaml"
        p.write_text("merge_method: linear\nmodels: [\n  - {model: a")
        assert_cli_error(capsys, ["merge", p, "--out", tmp_path / "o"], "malformed YAML", "line")
        assert not (tmp_path / "o").exists()
        return
    elif case == "layer_range":
        d["layer_flow"] = {"slots": [{"model": "e0", "layer": 7}]}
        frag = ["slots[0].layer = 7", "0–1"]
    elif case == "nan":
        bad = tmp_path / "bad"
        shutil.copytree(m["e0"], bad)
        sd = load_file(bad / "model.safetensors")
        sd["model.norm.weight"][0] = float("nan")
        save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
        d["models"][0]["model"] = str(bad)
        frag = ["NaN", "model.norm.weight"]
    elif case == "pickle":
        pk = tmp_path / "pk"
        pk.mkdir()
        shutil.copy(m["e0"] / "config.json", pk)
        torch.save(load_file(m["e0"] / "model.safetensors"), pk / "pytorch_model.bin")
        d["models"][0]["model"] = str(pk)
        frag = ["pickled", "--allow-pickle"]
    elif case == "range":
        d["merge_method"] = "ties"
        d["models"][0]["parameters"]["density"] = 1.4
        frag = ["density", "1.4", "outside"]
    elif case == "schema":
        d["layer_flow"] = {"slots": [{"model": "e0", "layer": 0, "scale": -1}]}
        frag = ["scale", "positive"]
    assert_cli_error(capsys, ["merge", write_recipe(tmp_path / "r.yaml", d), "--out", tmp_path / "o"], *frag)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_allow_pickle_opt_in(tiny_models, tmp_path):
    pk = tmp_path / "pk"
    pk.mkdir()
    shutil.copy(tiny_models["e0"] / "config.json", pk)
    torch.save(load_file(tiny_models["e0"] / "model.safetensors"), pk / "pytorch_model.bin")
    with pytest.raises(ModelError):
        ModelDir(pk)
    d = ModelDir(pk, allow_pickle=True)
    assert torch.equal(d.get("lm_head.weight"), ModelDir(tiny_models["e0"]).get("lm_head.weight"))


def test_interrupted_export_leaves_nothing(tiny_models, tmp_path):
    def boom(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_model(ta_recipe(tiny_models), tmp_path / "out", progress=boom)
    assert list(tmp_path.iterdir()) == []


def test_errors_are_user_errors():
    assert issubclass(ConfigError, EvomergeError) and issubclass(ModelError, EvomergeError)


def test_random_operators_do_not_depend_on_where_models_live(tiny_models, tmp_path):
    """DARE masks are seeded from the portable mask key (aliases, not paths): copy the models
    elsewhere, same weights."""
    moved = {k: tmp_path / "elsewhere" / k for k in ("base", "e0", "e1")}
    for k, p in moved.items():
        shutil.copytree(tiny_models[k], p)

    def dare(m, seed=0):
        return Recipe(merge_method="dare_ties", base_model=str(m["base"]), seed=seed,
                      models=[{"model": str(m["e0"]), "parameters": {"weight": 0.6, "density": 0.5}},
                              {"model": str(m["e1"]), "parameters": {"weight": 0.4, "density": 0.5}}])

    here, there = dare(tiny_models), dare(moved)
    assert here.hash() != there.hash() and here.mask_key("random") == there.mask_key("random")
    a = dict(merged_tensors(here, Sources.from_recipe(here)))
    b = dict(merged_tensors(there, Sources.from_recipe(there)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = dict(merged_tensors(dare(tiny_models, seed=1), Sources.from_recipe(here)))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_random_masks_are_common_to_recipes_that_differ_in_coefficients(tiny_models):
    """Common random numbers: masks are seeded from the seed, the tensor, the sparsification and
    the models — not from weights, densities, λ or ε — so recipes that differ in coefficients keep
    nested entry sets (density p1 < p2: the kept set at p1 is a subset; DELLA at a fixed ε), and a
    model's mask does not move when another model's density reaches 1."""
    name = "model.layers.0.mlp.up_proj.weight"
    sources = Sources.from_recipe(Recipe(merge_method="dare_linear", base_model=str(tiny_models["base"]),
                                         models=[{"model": str(tiny_models[e])} for e in ("e0", "e1")]))
    base = sources.get("base", name, None).float()
    layout = [o for o in output_layout(Recipe(merge_method="dare_linear", base_model=str(tiny_models["base"]),
                                              models=[{"model": str(tiny_models["e0"])}]), sources) if o.name == name]

    def support(method, params, seed=0, options=None, expert=0):
        """The entries of expert ``expert``'s τ kept by a merge in which only it has a nonzero weight."""
        models = [{"model": str(tiny_models[f"e{k}"]), "parameters": {"weight": 0.0, "density": 0.5, **p}}
                  for k, p in enumerate(params)]
        models[expert]["parameters"]["weight"] = params[expert].get("weight", 0.7)
        r = Recipe(merge_method=method, base_model=str(tiny_models["base"]), seed=seed, models=models,
                   parameters={"rescale": False, **(options or {})})
        merged = dict(merged_tensors(r, sources, layout))[name]
        tau = sources.get(f"e{expert}", name, None).float() - base
        assert bool((tau != 0).all())  # every entry moved: the merge's support is the mask
        return merged != base

    for method in ("dare_linear", "della_linear"):
        a = support(method, [{"weight": 0.7, "density": 0.5}, {"density": 0.3}])
        assert 0.35 < a.float().mean().item() < 0.65
        # other coefficients: another weight, λ, other experts' densities — the same mask
        assert torch.equal(a, support(method, [{"weight": 0.2, "density": 0.5}, {"density": 1.0}],
                                      options={"lambda": 0.6}))
        assert not torch.equal(a, support(method, [{"weight": 0.7, "density": 0.5}, {"density": 0.3}], seed=1))
        lo, hi = (support(method, [{"density": d}, {}]) for d in (0.2, 0.8))  # nested in the density
        assert not (lo & ~a).any() and not (a & ~hi).any() and lo.sum() < a.sum() < hi.sum()
    # the second expert's mask does not depend on the first expert's density
    b = support("dare_linear", [{"density": 0.4}, {"weight": 0.5, "density": 0.5}], expert=1)
    assert torch.equal(b, support("dare_linear", [{"density": 1.0}, {"weight": 0.9, "density": 0.5}], expert=1))
    # the masks are a property of the sparsification: DARE's differ from DELLA's
    assert not torch.equal(support("dare_linear", [{}, {}]), support("della_linear", [{"epsilon": 0.0}, {}]))


def test_mask_key_ignores_coefficients_and_paths_but_not_models():
    def recipe(w, d, models=("/a/x", "/a/y"), **kw):
        return Recipe(merge_method="dare_ties", base_model="/a/base", **kw,
                      models=[{"model": m, "parameters": {"weight": w, "density": d}} for m in models])

    key = recipe(0.5, 0.5).mask_key("random")
    assert key == recipe(0.9, 0.2, parameters={"lambda": 0.3}).mask_key("random")
    assert key == recipe(0.5, 0.5, models=("/b/x", "/b/y")).mask_key("random")  # aliases, not paths
    assert key != recipe(0.5, 0.5, models=("/a/y", "/a/x")).mask_key("random")  # the models' order
    assert key != recipe(0.5, 0.5).mask_key("della")


def test_reference_alias_is_the_base_else_the_first_input(tiny_models):
    """One rule (recipe.reference_alias) for the model a set of inputs follows: its layout
    (Sources.reference, the memory plan) and its tokenizer (the worker, the memory plan)."""
    from evomerge.recipe import reference_alias

    assert reference_alias({"e0": 1, "base": 2, "e1": 3}) == "base"
    assert reference_alias({"e1": 1, "e0": 2}) == "e1"
    with pytest.raises(ConfigError, match="at least one input model"):
        reference_alias({})
    dirs = {a: ModelDir(tiny_models[a]) for a in ("e1", "base", "e0")}
    assert Sources(dirs).reference is dirs["base"]
    del dirs["base"]
    assert Sources(dirs).reference is dirs["e1"]
