"""Diagonal Fisher on the objective's own data: the (prompt, gold answer) pairs, the squared
gradients, the cache, and a Fisher-weighted merge of two experts end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model
from evomerge.errors import ConfigError
from evomerge.evaluation.fisher import diagonal_fisher, fisher_examples, fisher_file, with_fisher
from evomerge.evaluation.objective import Objective
from evomerge.merge.materialize import merged_tensors
from evomerge.merge.sources import Sources
from evomerge.recipe import Recipe

EVALS = Path(__file__).parent / "fixtures" / "evals"


def _jsonl(name):
    return [json.loads(line) for line in (EVALS / "data" / name).read_text().splitlines() if line.strip()]


def test_examples_are_prompts_and_gold_answers():
    mc = fisher_examples([Objective("fx_mc", limit=3)], EVALS)
    assert mc == [(d["question"], d["choices"][d["label"]]) for d in _jsonl("fx_mc_search.jsonl")[:3]]
    gen = fisher_examples([Objective("fx_add", limit=2)], EVALS)
    assert gen == [(d["question"], " " + d["answer"]) for d in _jsonl("fx_add_search.jsonl")[:2]]
    with pytest.raises(ConfigError, match="no lm-eval task"):
        fisher_examples([Objective.parse("python:fx_objectives:weight_norms")], EVALS)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher")
    base = make_model(root / "base", 0)
    return {"base": base, "e0": make_model(root / "e0", 1, perturb_from=base),
            "e1": make_model(root / "e1", 2, perturb_from=base)}


def test_fisher_is_the_mean_squared_gradient_of_the_answer_loss(experts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(experts["e0"])
    tok = AutoTokenizer.from_pretrained(experts["e0"])
    examples = [("6+6=", "12"), ("9+7=", "16")]
    fisher = diagonal_fisher(model, tok, examples)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for prompt, answer in examples:  # −log p(answer | prompt), token by token
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + a_ids])
        logp = torch.log_softmax(model(ids).logits[0], -1)
        nll = -sum(logp[len(p_ids) - 1 + j, a] for j, a in enumerate(a_ids))
        grads = torch.autograd.grad(nll, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            want[n] += g.square() / len(examples)
    assert set(fisher) == set(want)
    for n in want:
        torch.testing.assert_close(fisher[n], want[n], rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())
    assert float(fisher["lm_head.weight"].sum()) > 0


def test_fisher_file_is_cached_and_drives_a_fisher_merge(experts, tmp_path):
    objectives = [Objective("fx_mc", limit=4)]
    f0 = fisher_file(experts["e0"], objectives, cache_dir=tmp_path, evals_dir=EVALS)
    stamp = f0.stat().st_mtime_ns
    assert fisher_file(experts["e0"], objectives, cache_dir=tmp_path, evals_dir=EVALS) == f0
    assert f0.stat().st_mtime_ns == stamp  # not recomputed
    other = fisher_file(experts["e0"], [Objective("fx_mc", limit=2)], cache_dir=tmp_path, evals_dir=EVALS)
    assert other != f0
    f1 = fisher_file(experts["e1"], objectives, cache_dir=tmp_path, evals_dir=EVALS)
    recipe = with_fisher(Recipe(merge_method="fisher", models=[{"model": str(experts["e0"])},
                                                               {"model": str(experts["e1"]), "parameters": {"weight": 2.0}}]),
                         {"e0": f0, "e1": f1})
    merged = dict(merged_tensors(recipe, Sources.from_recipe(recipe)))
    name = "model.layers.1.mlp.down_proj.weight"
    F0, F1 = load_file(str(f0))[name] + 1e-6, 2 * (load_file(str(f1))[name] + 1e-6)
    t0, t1 = load_file(str(experts["e0"] / "model.safetensors"))[name], load_file(str(experts["e1"] / "model.safetensors"))[name]
    torch.testing.assert_close(merged[name], (F0 * t0 + F1 * t1) / (F0 + F1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match=r"\['zz'\] are not models"):
        with_fisher(recipe, {"zz": f0})


def test_cli_add_fisher_writes_a_mergeable_recipe(experts, tmp_path, monkeypatch, capsys):
    from evomerge.cli import main as cli_main

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    r = tmp_path / "r.yaml"
    Recipe(merge_method="fisher", models=[{"model": str(experts["e0"])}, {"model": str(experts["e1"])}]).save(r)
    out = tmp_path / "with.yaml"
    assert cli_main(["recipe", "add-fisher", str(r), "--objective", "fx_add:search", "--evals-dir", str(EVALS),
                     "--out", str(out)]) == 0
    done = Recipe.load(out)
    paths = [Path(m.parameters["fisher"]) for m in done.models]
    assert all(p.is_file() and p.parent == tmp_path / "cache" / "fisher" for p in paths)
    assert cli_main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    Recipe(merge_method="linear", models=[{"model": str(experts["e0"]), "parameters": {"weight": 1}}]).save(r)
    assert cli_main(["recipe", "add-fisher", str(r), "--objective", "fx_add"]) == 2
    assert "Fisher files are for merge_method: fisher" in capsys.readouterr().err


def test_cli_add_scores_uses_each_experts_own_fitness(experts, tmp_path):
    from evomerge.cli import main as cli_main
    from evomerge.cli.eval import load_model_dir
    from evomerge.evaluation import Evaluator

    r = tmp_path / "r.yaml"
    Recipe(merge_method="metric_weighted", base_model=str(experts["base"]),
           models=[{"model": str(experts["e0"])}, {"model": str(experts["e1"])}]).save(r)
    out = tmp_path / "scored.yaml"
    assert cli_main(["recipe", "add-scores", str(r), "--objective", "fx_mc", "--evals-dir", str(EVALS),
                     "--device", "cpu", "--out", str(out)]) == 0
    done = Recipe.load(out)
    objectives = [Objective("fx_mc")]
    for m in done.models:
        model, tok = load_model_dir(Path(m.model), "cpu")
        assert m.parameters["score"] == Evaluator(objectives, tok, evals_dir=EVALS).evaluate(model).fitness(objectives)
    scores = [m.parameters["score"] for m in done.models]
    # proportional weights need a positive total; all-zero scores are refused in one line
    assert cli_main(["merge", str(out), "--out", str(tmp_path / "merged")]) == (0 if sum(scores) > 0 else 2)
