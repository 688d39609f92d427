"""Evaluator: metrics equal hand computations, per-example alignment, in-place swaps, offline, errors, CLI."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluation import EvalResult, Evaluator, Objective

FIXTURES = Path(__file__).parent / "fixtures" / "evals"
CHARS = "0123456789+=; \nabcdefghij"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def make_model(tok, seed: int):
    """A 2-layer, 32-wide random Llama whose greedy output is digits, spaces and newlines."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    favoured = tok.convert_tokens_to_ids(list("0123456789 \n"))
    with torch.no_grad():
        others = torch.ones(len(tok), dtype=torch.bool)
        others[favoured] = False
        model.lm_head.weight[others] = 0
        model.lm_head.weight[~others] *= 4
    return model


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def hand_generate(model, tok, prompt: str, max_new: int = 5) -> str:
    """Greedy decoding with a full forward pass per token, cut at the task's stop string."""
    ids, out = tok.encode(prompt), []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).split("\n")[0]


def hand_extract(text: str) -> str:
    found = re.findall(r"(\d+)", text)
    return found[0].strip() if found else "[invalid]"


@torch.no_grad()
def hand_choice_logliks(model, tok, doc: dict) -> list[float]:
    ctx = tok.encode(doc["question"])
    lls = []
    for choice in doc["choices"]:
        cont = tok.encode(doc["question"] + choice)[len(ctx):]
        logp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]])).logits[0].double(), -1)
        lls.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return lls


def oracle_task(tmp_path: Path, answers: list[str]) -> Path:
    """fx_add with its search answers replaced (the YAML's relative data paths stay relative)."""
    root = tmp_path / "evals"
    (root / "data").mkdir(parents=True)
    shutil.copy(FIXTURES / "fx_add.yaml", root)
    for split in ("validation", "test"):
        shutil.copy(FIXTURES / "data" / f"fx_add_{split}.jsonl", root / "data")
    docs = read_jsonl(FIXTURES / "data" / "fx_add_search.jsonl")
    with open(root / "data" / "fx_add_search.jsonl", "w") as f:
        for doc, answer in zip(docs, answers):
            f.write(json.dumps({**doc, "answer": answer}) + "\n")
    return root


def test_objective_parse():
    assert Objective.parse("zoo_add").key == "zoo_add:search"
    assert Objective.parse("zoo_add:test", limit=3) == Objective("zoo_add", split="test", limit=3)
    assert Objective.parse("python:pkg.mod:fn").key == "python:pkg.mod:fn:search"
    assert Objective.parse("python:pkg.mod:fn:validation").split == "validation"
    for bad in ("", "python:onlymodule", ":test"):
        with pytest.raises(ConfigError):
            Objective.parse(bad)
    with pytest.raises(ConfigError, match="limit"):
        Objective("t", limit=0)
    res = EvalResult(scores={}, seconds={"model": 2.0, "harness": 0.1})
    assert res.harness_share == pytest.approx(0.05)


def test_generation_exact_match_equals_hand_greedy_and_follows_in_place_swaps(tok, tmp_path, monkeypatch):
    model_a, model_b = make_model(tok, 0), make_model(tok, 1)
    docs = read_jsonl(FIXTURES / "data" / "fx_add_search.jsonl")
    outs_a = [hand_extract(hand_generate(model_a, tok, d["question"])) for d in docs]
    # Even documents: the answer is what model A says; odd ones keep the true sum.
    answers = [a if i % 2 == 0 else d["answer"] for i, (a, d) in enumerate(zip(outs_a, docs))]
    evals = oracle_task(tmp_path, answers)
    monkeypatch.chdir(tmp_path / "evals" / "data")  # relative data paths resolve against the YAML, not cwd

    ev = Evaluator([Objective("fx_add")], tok, evals_dir=evals, batch_size=5)
    score = ev.evaluate(model_a).scores["fx_add:search"]
    expected_a = np.array([o == a for o, a in zip(outs_a, answers)], dtype=np.float32)
    assert expected_a[::2].all() and expected_a.sum() < len(docs)  # the test can tell docs apart
    assert score.doc_ids == list(range(len(docs)))
    np.testing.assert_array_equal(score.per_example, expected_a)
    assert score.value == pytest.approx(expected_a.mean())
    assert score.metric == "exact_match,strict" and score.per_example.dtype == np.float32

    with torch.no_grad():  # an in-place swap, as the merge engine does it
        for p, q in zip(model_a.parameters(), model_b.parameters()):
            p.data.copy_(q.data)
    outs_b = [hand_extract(hand_generate(model_b, tok, d["question"])) for d in docs]
    score_b = ev.evaluate(model_a).scores["fx_add:search"]
    expected_b = np.array([o == a for o, a in zip(outs_b, answers)], dtype=np.float32)
    np.testing.assert_array_equal(score_b.per_example, expected_b)
    assert not np.array_equal(expected_a, expected_b)


def test_multiple_choice_equals_hand_loglikelihoods(tok):
    model = make_model(tok, 2)
    docs = read_jsonl(FIXTURES / "data" / "fx_mc_search.jsonl")
    lls = [hand_choice_logliks(model, tok, d) for d in docs]
    acc = np.array([np.argmax(ll) == d["label"] for ll, d in zip(lls, docs)], dtype=np.float32)
    acc_norm = np.array([np.argmax(np.array(ll) / [len(c) for c in d["choices"]]) == d["label"]
                         for ll, d in zip(lls, docs)], dtype=np.float32)
    assert 0 < acc.sum() < len(docs)

    ev = Evaluator([Objective("fx_mc")], tok, evals_dir=FIXTURES, batch_size=4)
    result = ev.evaluate(model)
    score = result.scores["fx_mc:search"]
    np.testing.assert_array_equal(score.per_example, acc)
    assert score.metric == "acc,none" and score.value == pytest.approx(acc.mean())
    assert score.metrics["acc_norm,none"] == pytest.approx(acc_norm.mean())
    assert result.fitness([Objective("fx_mc")]) == pytest.approx(acc.mean())
    s = result.seconds
    assert s["model"] > 0 and s["total"] == pytest.approx(s["model"] + s["harness"] + s["setup"] + s["python"])
    again = ev.evaluate(model)
    assert again.seconds["setup"] == 0.0  # requests are planned once
    np.testing.assert_array_equal(again.scores["fx_mc:search"].per_example, acc)


def test_fast_engine_agrees_with_lm_eval_evaluate(tok):
    model = make_model(tok, 3)
    objectives = [Objective("fx_add", split="validation"), Objective("fx_mc", metric="acc_norm", limit=7)]
    fast = Evaluator(objectives, tok, evals_dir=FIXTURES, batch_size=3).evaluate(model)
    ref = Evaluator(objectives, tok, evals_dir=FIXTURES, batch_size=3, engine="lm-eval").evaluate(model)
    for o in objectives:
        a, b = fast.scores[o.key], ref.scores[o.key]
        assert a.doc_ids == b.doc_ids == list(range(7 if o.limit else 6))
        assert a.metric == b.metric
        np.testing.assert_array_equal(a.per_example, b.per_example)
        assert a.metrics == pytest.approx(b.metrics)


def test_limit_and_split_select_documents(tok):
    model = make_model(tok, 4)
    full = Evaluator([Objective("fx_mc")], tok, evals_dir=FIXTURES).evaluate(model).scores["fx_mc:search"]
    ev = Evaluator([Objective("fx_mc", limit=5), Objective("fx_mc", split="test")], tok, evals_dir=FIXTURES)
    res = ev.evaluate(model)
    head = res.scores["fx_mc:search"]
    assert head.doc_ids == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(head.per_example, full.per_example[:5])
    test_docs = read_jsonl(FIXTURES / "data" / "fx_mc_test.jsonl")
    lls = [hand_choice_logliks(model, tok, d) for d in test_docs]
    np.testing.assert_array_equal(res.scores["fx_mc:test"].per_example,
                                  [float(np.argmax(ll) == d["label"]) for ll, d in zip(lls, test_docs)])


def test_no_network_is_attempted(tok, tmp_path, monkeypatch):
    import os

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))  # cold datasets cache
    ev = Evaluator([Objective("fx_add", limit=3), Objective("fx_mc", split="validation")], tok, evals_dir=FIXTURES)
    ev.evaluate(make_model(tok, 5))
    assert attempts == []
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert (tmp_path / "cache" / "datasets").is_dir()


@pytest.mark.parametrize("objective, fragments", [
    (Objective("nope"), ["unknown task 'nope'", "fx_add, fx_mc"]),
    (Objective("fx_add", split="dev"), ["no split 'dev'", "search, test, validation"]),
    (Objective("fx_mc", metric="f1"), ["no metric 'f1'", "acc,none, acc_norm,none"]),
    (Objective("python:no_such_module_xyz:f"), ["cannot import 'no_such_module_xyz'"]),
    (Objective("python:fx_objectives:missing"), ["no 'missing'", "weight_norms"]),
    (Objective("python:fx_objectives:two_metrics", metric="nope"), ["no metric 'nope'", "hits, bias"]),
    (Objective("python:fx_objectives:not_numbers"), ["returned str"]),
])
def test_clear_errors(tok, objective, fragments, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    with pytest.raises(EvomergeError) as e:
        Evaluator([objective], tok, evals_dir=FIXTURES).evaluate(make_model(tok, 0))
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


def test_bad_evaluator_arguments(tok, tmp_path):
    with pytest.raises(ConfigError, match="listed twice"):
        Evaluator([Objective("fx_mc"), Objective("fx_mc", metric="acc_norm")], tok, evals_dir=FIXTURES)
    with pytest.raises(ConfigError, match="unknown engine"):
        Evaluator([Objective("fx_mc")], tok, evals_dir=FIXTURES, engine="turbo")
    with pytest.raises(EvomergeError, match="evals directory not found"):
        Evaluator([Objective("fx_mc")], tok, evals_dir=tmp_path / "none")


def test_python_objectives_and_weighted_fitness(tok, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    model = make_model(tok, 6)
    norms = np.array([float(p.detach().norm()) for p in model.parameters()], dtype=np.float32)
    objectives = [Objective("python:fx_objectives:weight_norms", split="test", weight=0.5),
                  Objective("python:fx_objectives:two_metrics", weight=2.0),
                  Objective("fx_mc", weight=-1.0, limit=4)]
    res = Evaluator(objectives, tok, evals_dir=FIXTURES).evaluate(model)
    norm_score = res.scores["python:fx_objectives:weight_norms:test"]
    np.testing.assert_allclose(norm_score.per_example, 2 * norms, rtol=1e-6)
    assert norm_score.doc_ids == list(range(len(norms)))
    hits = res.scores["python:fx_objectives:two_metrics:search"]
    assert hits.metric == "hits" and hits.value == 0.75 and hits.metrics == {"hits": 0.75, "bias": 0.5}
    mc = res.scores["fx_mc:search"].value
    assert res.fitness(objectives) == pytest.approx(0.5 * 2 * norms.mean() + 2 * 0.75 - mc, rel=1e-6)
    assert res.seconds["python"] > 0


def test_cli_prints_table_and_fails_cleanly(tok, tmp_path, capsys):
    model_dir = tmp_path / "model"
    make_model(tok, 7).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    capsys.readouterr()
    rc = cli_main(["eval", str(model_dir), "-t", "fx_mc", "-t", "fx_add:validation",
                   "--evals-dir", str(FIXTURES), "--limit", "4", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for fragment in ("fx_mc", "acc,none *", "acc_norm,none", "fx_add", "validation", "exact_match,strict *",
                     "model", "harness"):
        assert fragment in out
    for args, fragment in (
        (["-t", "nope"], "unknown task 'nope'"),
        (["-t", "fx_add:dev"], "no split 'dev'"),
    ):
        rc = cli_main(["eval", str(model_dir), *args, "--evals-dir", str(FIXTURES)])
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err and err.count("\n") == 1, err
    rc = cli_main(["eval", str(tmp_path / "missing"), "-t", "fx_mc", "--evals-dir", str(FIXTURES)])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_cli_json_with_comma_separated_tasks(tok, tmp_path, capsys):
    """-t a,b -t c: three objectives in that order; --json prints only the document on stdout."""
    from evomerge.cli.eval import split_list

    assert split_list(["a,b", " c ", "d,,"]) == ["a", "b", "c", "d"]
    model_dir = tmp_path / "model"
    make_model(tok, 7).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    capsys.readouterr()
    rc = cli_main(["eval", str(model_dir), "-t", "fx_mc,fx_add:validation", "--task", "fx_add",
                   "--evals-dir", str(FIXTURES), "--limit", "4", "--batch-size", "2", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)
    assert list(doc) == ["model", "objectives", "seconds"] and doc["model"] == str(model_dir)
    assert [o["key"] for o in doc["objectives"]] == ["fx_mc:search", "fx_add:validation", "fx_add:search"]
    for o in doc["objectives"]:
        assert list(o) == ["key", "task", "split", "metric", "value", "docs", "metrics"]
        assert o["docs"] == 4 and o["value"] == o["metrics"][o["metric"]]
    assert doc["objectives"][0]["metric"] == "acc,none" and doc["objectives"][1]["metric"] == "exact_match,strict"
    assert {"total", "model", "harness"} <= set(doc["seconds"])
