"""Search spaces: genome ⇄ recipe round trips, constraints, bounds, errors, engine compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from evomerge.architecture import TensorRoles
from evomerge.errors import ConfigError
from evomerge.recipe import FilteredValue, GroupValues, InputModel, LayerFlow, LayerSlot, Recipe, resolve
from evomerge.spaces import SPACES, ModelPool, make_space, parent_recipes, parse_space_config
from evomerge.spaces.base import SEARCH_SPACES_DIR
from evomerge.spaces.dfs import transition

LLAMA = TensorRoles.for_model_type("llama")


def pool(k: int = 2, blocks: int = 4, base: bool = True) -> ModelPool:
    experts = tuple(InputModel(model=f"/m/e{i}", name=f"e{i}") for i in range(k))
    nb = {f"e{i}": blocks for i in range(k)}
    if base:
        nb["base"] = blocks
    return ModelPool(base="/m/base" if base else None, experts=experts, num_blocks=nb)


def random_genomes(space, n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [space.lower + rng.random(space.dim) * (space.upper - space.lower) for _ in range(n)]


def assert_round_trips(space, n=20):
    for g in random_genomes(space, n):
        r = space.to_recipe(g)
        g2 = space.from_recipe(r)
        # genome -> recipe -> genome: the same recipe (the genome may be canonicalised)
        assert space.to_recipe(g2) == r
        assert r.hash() == space.to_recipe(g2).hash()
        # recipe -> genome -> recipe is the identity, also after a YAML round trip
        r2 = Recipe.from_dict(yaml.safe_load(r.to_yaml()))
        assert space.to_recipe(space.from_recipe(r2)) == r


# ---------------------------------------------------------------------- ps
def test_ps_layer_granularity_shape_bounds_and_exact_values():
    s = make_space({"type": "ps", "granularity": "layer"}, pool(k=2, blocks=4))
    assert s.dim == 2 * 2 * (4 + 2)  # (weight, density) × experts × (embed, 4 blocks, head)
    assert s.names[:3] == ["weight[e0].embed", "weight[e0].layers.0", "weight[e0].layers.1"]
    w = [i for i, n in enumerate(s.names) if n.startswith("weight")]
    d = [i for i, n in enumerate(s.names) if n.startswith("density")]
    assert np.all(s.lower[w] == 0) and np.all(s.upper[w] == 2)  # weights above 1 by default
    assert np.all(s.lower[d] == 0) and np.all(s.upper[d] == 1)
    assert np.all(s.x0 == 0.5)
    g = np.arange(s.dim) / 100.0
    r = s.to_recipe(g)
    assert r.merge_method == "dare_ties" and r.base_model == "/m/base"
    assert [m.alias for m in r.models] == ["e0", "e1"]
    wv = r.models[1].parameters["weight"]
    assert wv == GroupValues(embed=0.06, layers=[0.07, 0.08, 0.09, 0.10], head=0.11)
    back = s.from_recipe(r)
    np.testing.assert_allclose(back[w], g[w])
    np.testing.assert_array_equal(back[d], np.round(g[d] * 1024) / 1024)  # densities on the grid
    assert r.models[0].parameters["density"].layers[1] == 143 / 1024  # gene 0.14
    assert_round_trips(s)


def test_ps_density_and_gamma_snap_to_the_grid_within_bounds():
    s = make_space({"type": "ps", "operator": "breadcrumbs", "granularity": "global",
                    "parameters": {"weight": None, "density": {"bounds": [0.3, 0.7]},
                                   "gamma": {"bounds": [0.0, 0.2]}}}, pool(k=1))
    assert s.names == ["weight[e0].all", "density[e0].all", "gamma[e0].all"]
    p = s.to_recipe([0.123456, 0.3, 0.0123]).models[0].parameters
    assert p == {"weight": 0.1235, "density": 308 / 1024, "gamma": 13 / 1024}  # 307/1024 < 0.3
    assert s.to_recipe([1.0, 0.7, 0.2]).models[0].parameters["density"] == 716 / 1024  # inside [0.3, 0.7]
    assert_round_trips(s)
    fixed = make_space({"type": "ps", "granularity": "global", "parameters": {"weight": None},
                        "fixed": {"density": 0.1234567}}, pool(k=1))
    assert fixed.to_recipe([0.5]).models[0].parameters == {"density": 0.1234567, "weight": 0.5}  # as written


def test_ps_blocks_of_k_and_global():
    s = make_space({"type": "ps", "granularity": "block", "block_size": 3,
                    "parameters": {"weight": None}}, pool(k=1, blocks=8))
    assert s.names == ["weight[e0].embed", "weight[e0].layers.0-2", "weight[e0].layers.3-5",
                       "weight[e0].layers.6-7", "weight[e0].head"]
    r = s.to_recipe([0.1, 0.2, 0.3, 0.4, 0.5])
    assert r.models[0].parameters["weight"] == GroupValues(
        embed=0.1, layers=[0.2] * 3 + [0.3] * 3 + [0.4] * 2, head=0.5)
    # density is not searched: the operator default applies (nothing written)
    assert "density" not in r.models[0].parameters
    assert_round_trips(s)

    g = make_space({"type": "ps", "granularity": "global"}, pool(k=3))
    assert g.dim == 6 and g.names[0] == "weight[e0].all"
    r = g.to_recipe([1.23456, 0, 2, 0.1, 0.2, 0.3])
    assert r.models[0].parameters == {"weight": 1.2346, "density": 102 / 1024}  # 4 decimals; the grid
    assert_round_trips(g)


def test_ps_filters_resolve_on_real_tensor_names():
    s = make_space({"type": "ps", "granularity": "layer", "filters": ["self_attn", "mlp"],
                    "parameters": {"weight": None}}, pool(k=1, blocks=2))
    # filtered genes exist only for blocks; the rest also covers embeddings and head
    assert s.names == ["weight[e0].self_attn.layers.0", "weight[e0].self_attn.layers.1",
                       "weight[e0].mlp.layers.0", "weight[e0].mlp.layers.1",
                       "weight[e0].rest.embed", "weight[e0].rest.layers.0", "weight[e0].rest.layers.1",
                       "weight[e0].rest.head"]
    g = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    value = s.to_recipe(g).models[0].parameters["weight"]
    assert isinstance(value, list) and all(isinstance(v, FilteredValue) for v in value)

    def at(name):
        return resolve(value, LLAMA.site(name, 2))

    assert at("model.layers.1.self_attn.q_proj.weight") == 0.2
    assert at("model.layers.0.mlp.down_proj.weight") == 0.3
    assert at("model.layers.1.post_attention_layernorm.weight") == 0.7
    assert at("model.embed_tokens.weight") == 0.5
    assert at("lm_head.weight") == 0.8 and at("model.norm.weight") == 0.8
    np.testing.assert_allclose(s.from_recipe(s.to_recipe(g)), g)
    assert_round_trips(s)


def test_ps_projects_foreign_recipes():
    s = make_space({"type": "ps", "granularity": "layer", "parameters": {"weight": None}}, pool(k=1, blocks=3))
    r = Recipe(merge_method="dare_ties", base_model="/m/base",
               models=[InputModel(model="/m/e0", name="e0", parameters={"weight": [0.0, 1.0]})])
    # gradient: blocks at t=i/2; embeddings and head read t=0 (mergekit's behaviour, see recipe.py)
    expected = [resolve([0.0, 1.0], LLAMA.site(n, 3)) for n in (
        "model.embed_tokens.weight", "model.layers.0.x", "model.layers.1.x", "model.layers.2.x", "lm_head.weight")]
    assert expected[1:4] == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(s.from_recipe(r), expected)
    r = r.model_copy(update={"models": [InputModel(model="/m/e0", name="e0", parameters={"weight": 7.0})]})
    np.testing.assert_allclose(s.from_recipe(r), [2.0] * 5)  # clipped into the box
    with pytest.raises(ConfigError, match="merges with 'linear'"):
        s.from_recipe(Recipe(merge_method="linear", models=[InputModel(model="/m/e0", name="e0")]))


def test_ps_bounds_and_errors():
    s = make_space({"type": "ps", "granularity": "global",
                    "parameters": {"weight": {"bounds": [-1, 3], "init": 1.0}, "density": {"bounds": [0.2, 1.5]}}},
                   pool(k=1))
    np.testing.assert_array_equal(s.lower, [-1, 0.2])
    np.testing.assert_array_equal(s.upper, [3, 1.0])  # clipped to the operator's range
    np.testing.assert_array_equal(s.x0, [1.0, 0.5])
    cases = [
        ({"type": "ps", "parameters": {"nope": None}}, "not a parameter of 'dare_ties'"),
        ({"type": "ps", "parameters": {"gamma": None}, "operator": "breadcrumbs"}, "give `bounds"),
        ({"type": "ps", "parameters": {"weight": None}, "fixed": {"weight": 1}}, "also listed under `fixed`"),
        ({"type": "ps", "experts": ["zz"]}, "not among the experts"),
        ({"type": "ps", "operator": "nope"}, "unknown merge_method"),
        ({"type": "ps", "filters": ["layers"]}, "would match every block tensor"),
        ({"type": "ps", "granularity": "rows"}, "granularity"),
        ({"type": "ps", "typo": 1}, "typo"),
        ({"type": "ps", "parameters": {"density": {"bounds": [1.2, 2]}}}, "empty range"),
    ]
    for cfg, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            make_space(cfg, pool(k=1))
    with pytest.raises(ConfigError, match="needs a base model"):
        make_space({"type": "ps"}, pool(k=1, base=False))
    with pytest.raises(ConfigError, match="genome has 3 values"):
        make_space({"type": "ps", "granularity": "global"}, pool(k=1)).to_recipe([0, 0, 0])


# ---------------------------------------------------------------------- dfs
def test_dfs_start_point_is_model_a_and_constraints_hold():
    s = make_space({"type": "dfs", "repeats": 3}, pool(k=2, blocks=4))
    assert s.order == ["e0", "e1"] and s.model_a == "e0"
    # 2 models × 4 blocks × 3 repeats, minus the forced first and last slot, + 4 compact scales
    assert s.n_indicators == 8 * 3 - 2 and s.dim == 22 + 4
    r = s.to_recipe(s.x0)
    assert r.merge_method == "passthrough" and r.layer_flow.embed_from == "e0"
    assert [(x.model, x.layer, x.scale) for x in r.layer_flow.slots] == [("e0", i, 1.0) for i in range(4)]
    for g in random_genomes(s, 50, seed=1):
        flow = s.to_recipe(g).layer_flow
        assert (flow.slots[0].model, flow.slots[0].layer) == ("e0", 0)
        assert (flow.slots[-1].model, flow.slots[-1].layer) == ("e0", 3)
        assert flow.slots[0].scale == 1.0 and all(x.scale > 0 for x in flow.slots)
        assert flow.embed_from == "e0"
    assert_round_trips(s, 50)


def test_dfs_transitions_and_compact_scales_exact():
    s = make_space({"type": "dfs", "repeats": 2, "pool": ["e1", "e0"], "model_a": "e0"}, pool(k=2, blocks=2))
    assert s.order == ["e0", "e1"]  # A first
    # slots (rep, model, layer) without (0,e0,0) and (1,e0,1)
    assert s.slots == [(0, "e0", 1), (0, "e1", 0), (0, "e1", 1), (1, "e0", 0), (1, "e1", 0), (1, "e1", 1)]
    g = np.zeros(s.dim)
    g[: s.n_indicators] = -0.5
    g[[1, 3]] = 0.5  # e1.0 then e0.0 (repeat) -> final e0.1 (next)
    g[s.scale_index["cross"]] = 1.0
    g[s.scale_index["repeat"]] = -1.0
    flow = s.to_recipe(g).layer_flow
    assert [(x.model, x.layer, x.scale) for x in flow.slots] == [
        ("e0", 0, 1.0), ("e1", 0, 2.0), ("e0", 0, 2.0), ("e0", 1, 1.0)]
    assert transition(("e0", 0), ("e0", 3)) == "skip" and transition(("e0", 3), ("e0", 3)) == "repeat"
    g[s.scale_index["cross"]] = -1.0
    flow = s.to_recipe(g).layer_flow
    assert [x.scale for x in flow.slots] == [1.0, 0.5, 0.5, 1.0]


def test_dfs_matrix_scaling_and_unexpressible_flow():
    s = make_space({"type": "dfs", "scaling": "matrix", "repeats": 1}, pool(k=2, blocks=2))
    assert s.dim == (4 * 1 - 2) + 4 * 4
    assert_round_trips(s)
    none = make_space({"type": "dfs", "scaling": "none"}, pool(k=2, blocks=2))
    assert none.dim == 4 * 2 - 2
    # e0.1 -> e0.0 -> e0.1 twice needs more repetitions than one
    flow = LayerFlow(embed_from="e0", slots=[LayerSlot(model="e0", layer=i) for i in (0, 1, 0, 1, 0, 1)])
    r = Recipe(merge_method="passthrough", models=[InputModel(model="/m/e0", name="e0"),
                                                    InputModel(model="/m/e1", name="e1")], layer_flow=flow)
    with pytest.raises(ConfigError, match="raise `repeats`"):
        make_space({"type": "dfs", "repeats": 2}, pool(k=2, blocks=2)).from_recipe(r)
    bad = Recipe(merge_method="passthrough", models=r.models,
                 layer_flow=LayerFlow(embed_from="e0", slots=[LayerSlot(model="e1", layer=0), LayerSlot(model="e0", layer=1)]))
    with pytest.raises(ConfigError, match="must start with e0.0"):
        s.from_recipe(bad)
    with pytest.raises(ConfigError, match="not in the pool"):
        make_space({"type": "dfs", "model_a": "zz", "pool": ["e0"]}, pool())
    with pytest.raises(ConfigError, match="init_off"):
        make_space({"type": "dfs", "init_on": -0.1}, pool())


def test_dfs_with_base_in_pool():
    s = make_space({"type": "dfs", "pool": ["base", "e1"]}, pool(k=2, blocks=3))
    r = s.to_recipe(s.x0)
    assert r.base_model == "/m/base" and [m.alias for m in r.models] == ["e1"]
    assert r.layer_flow.embed_from == "base" and r.tokenizer_source is None
    assert_round_trips(s)


# ---------------------------------------------------------------------- hybrid
def test_hybrid_stages_identity_and_round_trip():
    p = pool(k=2, blocks=3)
    s = make_space({"type": "hybrid", "ps": {"granularity": "global"}}, p)
    ps = make_space({"type": "ps", "granularity": "global"}, p)
    assert s.n_ps == ps.dim == 4
    st = s.stages
    assert [x.name for x in st] == ["ps", "dfs"] and st[0].fraction == st[1].fraction == 0.5
    np.testing.assert_array_equal(np.concatenate([st[0].genes, st[1].genes]), np.arange(s.dim))
    # start: the pure PS merge (identity flow left out), identical to the ps space's recipe
    assert s.to_recipe(s.x0) == ps.to_recipe(ps.x0) and s.to_recipe(s.x0).layer_flow is None
    assert s.dfs.order == ["merge", "e0", "e1"]
    g = s.x0.copy()
    g[s.n_ps + s.dfs.slots.index((0, "e1", 2))] = 0.5  # put e1's last block into the flow
    r = s.to_recipe(g)
    assert r.merge_method == "dare_ties" and r.layer_flow.embed_from == "merge"
    assert [(x.model, x.layer) for x in r.layer_flow.slots] == [("merge", 0), ("merge", 1), ("e1", 2), ("merge", 2)]
    np.testing.assert_allclose(s.from_recipe(r), g)
    assert_round_trips(s, 30)


# ---------------------------------------------------------------------- task vector
def test_task_vector_space():
    s = make_space("task_vector", pool(k=3))
    assert s.dim == 3 and s.names == ["c[e0]", "c[e1]", "c[e2]"]
    np.testing.assert_array_equal(s.lower, [0, 0, 0])
    np.testing.assert_array_equal(s.upper, [2, 2, 2])
    r = s.to_recipe([1.5, 0.0, 0.25])
    assert r.merge_method == "task_arithmetic"
    assert [m.parameters for m in r.models] == [{"weight": 1.5}, {"weight": 0.0}, {"weight": 0.25}]
    np.testing.assert_array_equal(s.from_recipe(r), [1.5, 0.0, 0.25])
    assert_round_trips(s)


# ---------------------------------------------------------------------- config files
@pytest.mark.parametrize("name", sorted(SPACES))
def test_shipped_yaml_equals_code_defaults_and_has_a_banner(name):
    path = SEARCH_SPACES_DIR / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and f"evomerge/spaces/{name}.py" in text.splitlines()[0]
    # the code holds the defaults; the file shows every one of them, with the same values
    from evomerge.io import load_yaml
    from evomerge.spaces.base import space_defaults

    shown = load_yaml(path)
    assert set(shown) == set(space_defaults(name)), "the shipped file must show every key"
    assert SPACES[name].config.model_validate(shown) == SPACES[name].config.model_validate({"type": name})
    from_file = parse_space_config(str(path))
    assert from_file == parse_space_config(name)
    # a mapping only names what it changes; the rest comes from the shipped file
    changed = parse_space_config({"type": name, "decimals": 2})
    assert changed.decimals == 2 and changed.model_copy(update={"decimals": 4}) == from_file


def test_space_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown search space 'pz'"):
        parse_space_config("pz")
    with pytest.raises(ConfigError, match="is not a search space"):
        parse_space_config({"type": "zz"})
    f = tmp_path / "mine.yaml"
    f.write_text("type: ps\ngranularity: global\n")
    assert parse_space_config(str(f)).granularity == "global"


# ---------------------------------------------------------------------- against the merge engine
def test_recipes_merge_with_the_engine_and_parents_are_exact(tiny_models):
    from evomerge.merge.materialize import apply_in_place, build_model, merged_tensors
    from evomerge.merge.sources import Sources

    experts = [InputModel(model=str(tiny_models[f"e{i}"]), name=f"e{i}") for i in range(2)]
    p = ModelPool.from_paths(str(tiny_models["base"]), experts)
    assert p.num_blocks == {"base": 2, "e0": 2, "e1": 2}
    parents = parent_recipes(p)
    sources = Sources.from_recipe(parents["base"]).resident("cpu")
    for name, recipe in parents.items():
        ref = sources.dirs[name]
        for tname, t in merged_tensors(recipe, sources):
            assert torch.equal(t, ref.get(tname).float()), (name, tname)
    model = build_model(sources, "cpu")
    for spec in ({"type": "ps", "granularity": "layer"}, {"type": "task_vector"},
                 {"type": "hybrid", "ps": {"granularity": "global"}}, {"type": "dfs", "pool": ["base", "e0", "e1"], "model_a": "base"}):
        space = make_space(spec, p)
        for g in random_genomes(space, 3, seed=7):
            recipe = space.to_recipe(g)
            apply_in_place(model, recipe, sources)
            n = model.config.num_hidden_layers  # the engine keeps spare blocks beyond it
            assert n == (len(recipe.layer_flow.slots) if recipe.layer_flow else 2)
            with torch.no_grad():
                out = model(torch.tensor([[1, 2, 3]])).logits
            assert torch.isfinite(out).all()


def test_ps_searches_global_operator_parameters():
    # LiNeS: alpha and beta are operator-wide, so they get one shared gene per group
    s = make_space({"type": "ps", "operator": "lines", "granularity": "global",
                    "parameters": {"weight": None, "alpha": None, "beta": {"bounds": [0, 1], "init": 0.25}}},
                   pool(k=2))
    assert s.names == ["weight[e0].all", "weight[e1].all", "alpha.all", "beta.all"]
    np.testing.assert_array_equal(s.upper, [2, 2, 2, 1])
    r = s.to_recipe([0.5, 1.5, 0.3, 0.7])
    assert r.parameters == {"alpha": 0.3, "beta": 0.7}
    assert [m.parameters for m in r.models] == [{"weight": 0.5}, {"weight": 1.5}]
    assert_round_trips(s)
    # required global parameters are searched by default (slerp's t, per layer group here)
    t = make_space({"type": "ps", "operator": "slerp", "granularity": "layer", "experts": ["e0"]}, pool(k=2, blocks=2))
    assert t.names == ["t.embed", "t.layers.0", "t.layers.1", "t.head"]
    assert t.to_recipe([0.1, 0.2, 0.3, 0.4]).parameters["t"] == GroupValues(embed=0.1, layers=[0.2, 0.3], head=0.4)
    assert_round_trips(t)
    # sce has only a global parameter
    sce = make_space({"type": "ps", "operator": "sce", "granularity": "global", "parameters": {"select_topk": None}},
                     pool(k=2))
    assert sce.names == ["select_topk.all"] and sce.to_recipe([0.4]).parameters == {"select_topk": 0.4}
    for cfg, msg in [
        ({"operator": "lines", "parameters": {"head_scale": None}}, "not a parameter of 'lines' that can be searched"),
        ({"operator": "slerp", "experts": ["e0"], "options": {"t": 0.5}, "parameters": {"t": None}},
         "also listed under `fixed` or `options`"),
        ({"operator": "lines", "parameters": {"weight": None}}, r"needs \['alpha', 'beta'\]"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            make_space({"type": "ps", **cfg}, pool(k=2))
