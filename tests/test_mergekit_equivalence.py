"""evomerge vs ``mergekit-yaml`` on the same tiny models and the same configs.

mergekit lives in a throwaway venv (``scripts/mergekit_venv.sh``; path from
``EVOMERGE_MERGEKIT_VENV``, default ``/tmp/mergekit-venv``) and only ever runs in a subprocess:
evomerge never imports it (LGPL). One subprocess runs every config through mergekit-yaml's own
command (its click entry point, in-process, to pay torch's import once). Each config is also
imported with :func:`recipe_from_mergekit` and merged by evomerge's engine; every tensor must
match to float tolerance. Random methods (DARE, DELLA) are compared at density 1 only: their
masks come from different random generators by design.

Set ``EVOMERGE_EQUIV_REPORT=path.json`` to write the per-config max abs difference (the table
in docs/operators.md comes from it).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge.materialize import merged_tensors
from evomerge.merge.sources import Sources
from evomerge.merge.mergekit import recipe_from_mergekit

VENV = Path(os.environ.get("EVOMERGE_MERGEKIT_VENV", "/tmp/mergekit-venv"))
MERGEKIT_YAML = VENV / "bin" / "mergekit-yaml"

pytestmark = pytest.mark.skipif(
    not MERGEKIT_YAML.exists(),
    reason=f"mergekit venv not found at {VENV} (create it with scripts/mergekit_venv.sh "
           "or set EVOMERGE_MERGEKIT_VENV)",
)

ATOL = 5e-6  # float32 round-off of differently ordered sums; weights here are O(0.1–1)

# Each config uses the placeholders BASE, E0, E1, E2 for the model directories.
CASES: dict[str, dict] = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "E0", "parameters": {"weight": 0.5}}, {"model": "E1", "parameters": {"weight": 0.3}},
        {"model": "E2", "parameters": {"weight": 0.4}}]},
    "linear_base_is_input": {"merge_method": "linear", "base_model": "BASE", "parameters": {"weight": 0.2},
                             "models": [{"model": "E0", "parameters": {"weight": 0.6}}, {"model": "E1"}]},
    "task_arithmetic_gradients_filters": {
        "merge_method": "task_arithmetic", "base_model": "BASE", "parameters": {"lambda": 0.8},
        "models": [{"model": "E0", "parameters": {"weight": [0.2, 0.9]}},
                   {"model": "E1", "parameters": {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.3}]}},
                   {"model": "E2", "parameters": {"weight": 0.5}}]},
    "task_arithmetic_normalize": {
        "merge_method": "task_arithmetic", "base_model": "BASE", "parameters": {"normalize": True},
        "models": [{"model": "E0", "parameters": {"weight": 0.7}}, {"model": "E1", "parameters": {"weight": 0.6}}]},
    "ties": {"merge_method": "ties", "base_model": "BASE", "models": [
        {"model": "E0", "parameters": {"weight": 0.4, "density": 0.5}},
        {"model": "E1", "parameters": {"weight": 0.3, "density": 0.7}},
        {"model": "E2", "parameters": {"weight": 0.3, "density": 0.3}}]},
    "ties_no_normalize_gradient_density": {
        "merge_method": "ties", "base_model": "BASE", "parameters": {"normalize": False, "weight": 0.5},
        "models": [{"model": "E0", "parameters": {"density": [0.2, 0.8]}},
                   {"model": "E1", "parameters": {"density": [{"filter": "self_attn", "value": 0.4},
                                                              {"value": [0.9, 0.3, 0.6]}]}},
                   {"model": "E2", "parameters": {"density": 0.5, "weight": 0.8}}]},
    "ties_rescale_negative_weight": {
        "merge_method": "ties", "base_model": "BASE", "parameters": {"rescale": True, "lambda": 1.3},
        "models": [{"model": "E0", "parameters": {"weight": 0.7, "density": 0.4}},
                   {"model": "E1", "parameters": {"weight": -0.3, "density": 0.6}}]},
    "dare_ties_density1": {"merge_method": "dare_ties", "base_model": "BASE", "models": [
        {"model": "E0", "parameters": {"weight": 0.5}}, {"model": "E1", "parameters": {"weight": 0.4}},
        {"model": "E2", "parameters": {"weight": 0.3}}]},
    "dare_linear_density1": {"merge_method": "dare_linear", "base_model": "BASE", "models": [
        {"model": "E0", "parameters": {"weight": 0.5, "density": 1.0}},
        {"model": "E1", "parameters": {"weight": 0.4, "density": 1.0}}]},
    "della_density1": {"merge_method": "della", "base_model": "BASE", "models": [
        {"model": "E0", "parameters": {"weight": 0.5, "density": 1.0}},
        {"model": "E1", "parameters": {"weight": 0.4, "density": 1.0}}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "BASE", "models": [
        {"model": "E0", "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}},
        {"model": "E1", "parameters": {"weight": 0.5, "density": 0.8}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "BASE", "models": [
        {"model": "E0", "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.1}},
        {"model": "E1", "parameters": {"weight": 0.4, "density": 0.5, "gamma": 0.02}},
        {"model": "E2", "parameters": {"weight": 0.3, "density": 0.9}}]},
    "slerp": {"merge_method": "slerp", "base_model": "BASE",
              "models": [{"model": "BASE"}, {"model": "E0"}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                                   {"filter": "mlp", "value": [1.0, 0.2]}, {"value": 0.35}]}},
    "slerp_slices_form": {"merge_method": "slerp", "base_model": "BASE",
                          "slices": [{"sources": [{"model": "BASE", "layer_range": [0, 2]},
                                                  {"model": "E1", "layer_range": [0, 2]}]}],
                          "parameters": {"t": 0.6}},
    "model_stock": {"merge_method": "model_stock", "base_model": "BASE",
                    "models": [{"model": "E0"}, {"model": "E1"}, {"model": "E2"}]},
    "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": "BASE",
                                "parameters": {"filter_wise": True},
                                "models": [{"model": "E0"}, {"model": "E1"}, {"model": "E2"}]},
    "sce": {"merge_method": "sce", "base_model": "BASE", "parameters": {"select_topk": 0.4},
            "models": [{"model": "E0"}, {"model": "E1"}, {"model": "E2"}]},
    "sce_no_select": {"merge_method": "sce", "base_model": "BASE",
                      "models": [{"model": "E0"}, {"model": "E1"}]},
    "nuslerp_task_vectors": {"merge_method": "nuslerp", "base_model": "BASE", "models": [
        {"model": "E0", "parameters": {"weight": 0.3}}, {"model": "E1", "parameters": {"weight": [0.9, 0.2]}}]},
    "nuslerp_rows_no_base": {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
                             "models": [{"model": "E0", "parameters": {"weight": 0.6}},
                                        {"model": "E2", "parameters": {"weight": 0.4}}]},
    "nuslerp_row_wise": {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                         "models": [{"model": "E1", "parameters": {"weight": 0.5}},
                                    {"model": "E2", "parameters": {"weight": 0.7}}]},
    "multislerp": {"merge_method": "multislerp", "models": [
        {"model": "E0", "parameters": {"weight": 0.5}}, {"model": "E1", "parameters": {"weight": 0.2}},
        {"model": "E2", "parameters": {"weight": 0.3}}]},
    "multislerp_base": {"merge_method": "multislerp", "base_model": "BASE", "models": [
        {"model": "E0", "parameters": {"weight": 1.0}}, {"model": "E1", "parameters": {"weight": 2.0}}]},
    "karcher": {"merge_method": "karcher", "models": [{"model": "E0"}, {"model": "E1"}, {"model": "E2"}]},
    "karcher_base_is_input": {"merge_method": "karcher", "base_model": "BASE", "parameters": {"max_iter": 20},
                              "models": [{"model": "E0"}, {"model": "E1"}]},
    "nearswap": {"merge_method": "nearswap", "base_model": "BASE", "parameters": {"t": [0.001, 0.05]},
                 "models": [{"model": "BASE"}, {"model": "E0"}]},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "BASE",
                     "models": [{"model": "BASE"}, {"model": "E1"}]},
    "della_linear_density1": {"merge_method": "della_linear", "base_model": "BASE", "models": [
        {"model": "E0", "parameters": {"weight": 0.5, "density": 1.0}},
        {"model": "E1", "parameters": {"weight": 0.4, "density": 1.0}}]},
    "slerp_per_slice_t": {"merge_method": "slerp", "base_model": "BASE", "slices": [
        {"sources": [{"model": "BASE", "layer_range": [0, 1]}, {"model": "E0", "layer_range": [0, 1]}],
         "parameters": {"t": [{"filter": "mlp", "value": 0.9}, {"value": 0.2}]}},
        {"sources": [{"model": "BASE", "layer_range": [1, 2]}, {"model": "E0", "layer_range": [1, 2]}],
         "parameters": {"t": [{"filter": "mlp", "value": 0.1}, {"value": 0.7}]}}]},
    "ties_per_slice_weights_modules": {"merge_method": "ties", "base_model": "BASE", "modules": {"default": {
        "parameters": {"density": 0.6},
        "slices": [{"sources": [{"model": "BASE", "layer_range": [0, 1]},
                                {"model": "E0", "layer_range": [0, 1], "parameters": {"weight": 0.8}},
                                {"model": "E1", "layer_range": [0, 1], "parameters": {"weight": 0.1}}]},
                   {"sources": [{"model": "BASE", "layer_range": [1, 2]},
                                {"model": "E0", "layer_range": [1, 2], "parameters": {"weight": 0.2}},
                                {"model": "E1", "layer_range": [1, 2], "parameters": {"weight": 0.9}}]}]}}},
    "slerp_slices_repeat_a_merged_block": {"merge_method": "slerp", "base_model": "BASE", "slices": [
        {"sources": [{"model": "BASE", "layer_range": [0, 2]}, {"model": "E1", "layer_range": [0, 2]}],
         "parameters": {"t": [0.2, 0.6]}},
        {"sources": [{"model": "BASE", "layer_range": [1, 2]}, {"model": "E1", "layer_range": [1, 2]}],
         "parameters": {"t": 0.6}}]},
    "slerp_partial_slice_gradient": {"merge_method": "slerp", "base_model": "BASE", "slices": [
        {"sources": [{"model": "BASE", "layer_range": [0, 1]}, {"model": "E2", "layer_range": [0, 1]}],
         "parameters": {"t": [0.2, 0.8]}}]},
    "passthrough_scale_filters": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "BASE", "layer_range": [0, 2]}]},
        {"sources": [{"model": "E0", "layer_range": [1, 2]}],
         "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.5},
                                  {"value": 1.0}]}},
        {"sources": [{"model": "BASE", "layer_range": [1, 2], "parameters": {"scale": 0.7}}]},
        {"sources": [{"model": "E1", "layer_range": [0, 2]}]}]},
    "passthrough_models_scale": {"merge_method": "passthrough", "models": [
        {"model": "E2", "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}]},
    "passthrough_head_from_another_model": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "BASE", "layer_range": [0, 2]}]},
        {"sources": [{"model": "DEEP", "layer_range": [1, 3]}]}]},
    "passthrough_slices": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "BASE", "layer_range": [0, 2]}]},
        {"sources": [{"model": "E0", "layer_range": [1, 2]}]},
        {"sources": [{"model": "BASE", "layer_range": [1, 2]}]}]},
}

DRIVER = r"""
import json, sys
from mergekit.scripts.run_yaml import main
for cfg, out in json.load(open(sys.argv[1])):
    main([cfg, out, "--quiet", "--no-copy-tokenizer", "--no-write-model-card"], standalone_mode=False)
"""


def _fill(obj, paths):
    if isinstance(obj, dict):
        return {k: _fill(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, paths) for v in obj]
    return paths.get(obj, obj) if isinstance(obj, str) else obj


@pytest.fixture(scope="module")
def mergekit_outputs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    paths = {"BASE": str(tiny_models["base"]), "E0": str(tiny_models["e0"]),
             "E1": str(tiny_models["e1"]), "E2": str(tiny_models["e2"]), "DEEP": str(tiny_models["deep"])}
    jobs, configs = [], {}
    for name, case in CASES.items():
        cfg = _fill(case, paths)
        cfg.setdefault("dtype", "float32")
        configs[name] = cfg
        (root / f"{name}.yml").write_text(yaml.safe_dump(cfg))
        jobs.append([str(root / f"{name}.yml"), str(root / name)])
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "driver.py").write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([str(VENV / "bin" / "python"), str(root / "driver.py"), str(root / "jobs.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: (configs[name], root / name) for name in CASES}


REPORT: dict[str, float] = {}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(case, mergekit_outputs):
    cfg, out_dir = mergekit_outputs[case]
    theirs = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        theirs.update(load_file(f))
    recipe = recipe_from_mergekit(cfg)
    ours = dict(merged_tensors(recipe, Sources.from_recipe(recipe)))
    assert set(ours) == set(theirs)
    worst = 0.0
    for name, t in ours.items():
        assert t.shape == theirs[name].shape, name
        diff = float((t.float() - theirs[name].float()).abs().max())
        worst = max(worst, diff)
        assert diff <= ATOL, f"{case}: {name} differs by {diff:.3g}"
    REPORT[case] = worst
    path = os.environ.get("EVOMERGE_EQUIV_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=1))


# ---------------------------------------------------------------------- vocabularies (tokenizer_source)
@pytest.mark.parametrize("source", ["base", "union", "E1"])
def test_tokenizer_source_matches_mergekit(source, tmp_path):
    """Models with different tokenizers (tests/test_vocab.py): mergekit and evomerge give every
    token the same merged embedding and head row, and the same output vocabulary. Rows are
    compared by token, not id: the order in which a union appends new tokens is not specified
    (mergekit's follows the tokenizers' hash-map order)."""
    from transformers import AutoTokenizer

    from evomerge.recipe import Recipe
    from test_vocab import build_vocab_models

    paths = build_vocab_models(tmp_path / "models")
    cfg = {"merge_method": "task_arithmetic", "base_model": paths["base"], "dtype": "float32",
           "tokenizer_source": paths["e1"] if source == "E1" else source,
           "models": [{"model": paths["e0"], "parameters": {"weight": 0.7}},
                      {"model": paths["e1"], "parameters": {"weight": 0.3}}]}
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "jobs.json").write_text(json.dumps([[str(tmp_path / "cfg.yml"), str(tmp_path / "mk")]]))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([str(VENV / "bin" / "python"), str(tmp_path / "driver.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    their_vocab = AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab()

    recipe = Recipe(merge_method="task_arithmetic", base_model=paths["base"],
                    tokenizer_source="e1" if source == "E1" else source,
                    models=[{"model": paths["e0"], "parameters": {"weight": 0.7}},
                            {"model": paths["e1"], "parameters": {"weight": 0.3}}])
    sources = Sources.from_recipe(recipe)
    ours = dict(merged_tensors(recipe, sources))
    from evomerge.merge.vocab import vocabulary_of

    our_vocab = vocabulary_of(sources).tokenizer.get_vocab()
    assert set(our_vocab) == set(their_vocab) and set(ours) == set(theirs)
    for name, t in ours.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            for tok, i in our_vocab.items():
                diff = float((t[i] - theirs[name][their_vocab[tok]]).abs().max())
                assert diff <= ATOL, f"{source}: {name} row of {tok!r} differs by {diff:.3g}"
        else:
            assert float((t - theirs[name]).abs().max()) <= ATOL, name
