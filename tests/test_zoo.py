"""The zoo: tokenizer, tasks and splits, deterministic cached builds, both model families, offline."""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import json
import random
import socket
import time
from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError, EvomergeError
from evomerge.zoo import EVAL_TASKS, SPLIT_SIZES, build_tokenizer, build_zoo, eval_docs, get_preset, zoo_dir
from evomerge.zoo.presets import replay_mixture
from evomerge.zoo.tasks import OPS, heldout_keys, training_items, transliterate
from evomerge.zoo.tokenizer import CHARS, vocabulary
from evomerge.zoo.train import greedy_correct, greedy_generate

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _micro(name="micro", **kw):
    """The tiny preset cut to a few steps (one expert with its own step count), built in seconds."""
    tiny = get_preset("tiny")
    experts = (tiny.experts[0], dataclasses.replace(tiny.experts[1], steps=5))
    return dataclasses.replace(tiny, name=name, base_steps=6, expert_steps=3, experts=experts, **kw)


def _weights_digest(model_dir: Path) -> str:
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build_zoo("tiny", out=tmp_path_factory.mktemp("zoo") / "tiny", workers=1)


# ------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trip_and_offline_autoload(tiny, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(tiny.base))
    vocab = vocabulary()
    text = CHARS  # every character once, the newline included
    ids = tok(text).input_ids
    assert ids == [vocab[c] for c in text]  # one token per character, no BOS/EOS added
    assert tok.decode(ids) == text
    assert tok("12+b").input_ids == [vocab["1"], vocab["2"], vocab["+"], vocab["b"]]
    assert tok("%").input_ids == [tok.unk_token_id]
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>"
    assert len(tok) == len(vocab) == 4 + len(CHARS)
    assert build_tokenizer().get_vocab() == vocab


# ------------------------------------------------------------------------ tasks and splits
def test_ops_render_exact_answers():
    assert OPS["add"].render((81, 48)) == ("81+48", "129")
    assert OPS["rev"].render(("1230",)) == ("R1230", "0321")
    assert OPS["succ"].render((9999,)) == ("S9999", "10000")
    assert OPS["sort"].render(("3101",)) == ("O3101", "0113")
    assert transliterate("R109=", "l2") == "Rbaj="
    mixed = transliterate("1234567890", "mixed", random.Random(0))
    assert {c for c in mixed} - set("0123456789abcdefghij") == set()
    assert transliterate(mixed.translate(str.maketrans("abcdefghij", "0123456789")), "l1") == "1234567890"


@pytest.mark.parametrize("task", sorted(EVAL_TASKS))
def test_splits_are_disjoint_and_answers_correct(task):
    op, inputs, answers, _ = EVAL_TASKS[task]
    prompts = {}
    for split, n in SPLIT_SIZES.items():
        docs = eval_docs(task, split)
        assert len(docs) == n and [d["id"] for d in docs] == list(range(n))
        prompts[split] = {d["prompt"] for d in docs}
        assert len(prompts[split]) == n  # no duplicate within a split
        marker = "=" if answers == "l1" else ":"
        assert all(d["prompt"].endswith(marker) for d in docs)
        alphabet = set("0123456789") if answers == "l1" else set("abcdefghij")
        assert all(set(d["answer"]) <= alphabet for d in docs)
    s, v, t = prompts.values()
    assert not (s & v) and not (s & t) and not (v & t)
    keys = heldout_keys(op)
    assert not set(keys["search"]) & set(keys["test"])
    assert eval_docs(task, "search") == eval_docs(task, "search")  # deterministic


def test_training_streams_never_see_heldout_items():
    heldout = {d["prompt"] for t in EVAL_TASKS for s in SPLIT_SIZES for d in eval_docs(t, s)}
    mix = replay_mixture((("add:l1>l1", 1.0), ("rev:any>l2", 1.0), ("sort:any>any", 1.0)),
                         get_preset("demo").base_mixture, 0.5)
    stream = training_items(mix, random.Random(1))
    seen = [next(stream) for _ in range(4000)]
    assert not {p for p, _ in seen} & heldout
    # and the stream is deterministic under its seed
    again = training_items(mix, random.Random(1))
    assert [next(again) for _ in range(50)] == seen[:50]


def test_committed_evals_match_generator(tmp_path):
    from evomerge.zoo.evals import write_evals

    written = write_evals(tmp_path)
    for path in written:
        rel = path.relative_to(tmp_path)
        assert (REPO / "evals" / rel).is_file(), f"evals/{rel} missing: run `evomerge zoo evals`"
        assert filecmp.cmp(path, REPO / "evals" / rel, shallow=False), f"evals/{rel} is stale: run `evomerge zoo evals`"


def test_unknown_task_split_preset_family():
    with pytest.raises(ConfigError, match="unknown zoo task"):
        eval_docs("zoo_nope", "search")
    with pytest.raises(ConfigError, match="unknown split"):
        eval_docs("zoo_add", "train")
    with pytest.raises(ConfigError, match="unknown zoo preset"):
        build_zoo("huge")
    with pytest.raises(EvomergeError, match="unknown model family"):
        build_zoo("tiny", family="gpt9")


# ------------------------------------------------------------------------ building
def test_tiny_zoo_layout(tiny):
    assert set(tiny.experts) == {"math", "cipher"}
    assert tiny.expert_tasks == {"math": ["zoo_add"], "cipher": ["zoo_l2"]}
    assert tiny.cross_tasks == ["zoo_add_l2"]
    for path in tiny.models.values():
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
            assert (path / f).is_file(), path / f
        assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    digests = {name: _weights_digest(p) for name, p in tiny.models.items()}
    assert len(set(digests.values())) == 3  # experts really moved away from the base
    record = json.loads((tiny.root / "zoo.json").read_text())
    assert record["digest"] == get_preset("tiny").digest("llama") and record["base"] == "base"


def test_cache_reuse_returns_at_once_without_training(tiny, monkeypatch):
    import evomerge.zoo.train as train_mod

    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("retrained a cached zoo"))
    t0 = time.perf_counter()
    again = build_zoo("tiny", out=tiny.root)
    assert time.perf_counter() - t0 < 1.0
    assert again.cached and again.digest == tiny.digest and again.experts == tiny.experts


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    p = get_preset("demo")
    assert zoo_dir(p, "llama") == tmp_path / "zoo" / f"demo-llama-{p.digest('llama')}"
    assert p.digest("llama") != p.digest("qwen2") != _micro().digest("llama")


def test_deterministic_across_builds_and_worker_counts(tmp_path):
    a = build_zoo(_micro(), out=tmp_path / "a", workers=1)
    b = build_zoo(_micro(), out=tmp_path / "b", workers=2)  # experts in subprocesses
    for name in a.models:
        assert _weights_digest(a.models[name]) == _weights_digest(b.models[name]), name


def test_refuses_to_overwrite_foreign_directories(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(EvomergeError, match="not a zoo"):
        build_zoo(_micro(), out=tmp_path / "x")
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_qwen2_family_builds_and_loads_offline(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    info = build_zoo(_micro(), out=tmp_path / "q", family="qwen2", workers=1)
    model = AutoModelForCausalLM.from_pretrained(str(info.experts["math"]))
    tok = AutoTokenizer.from_pretrained(str(info.experts["math"]))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert any(n.endswith("q_proj.bias") for n, _ in model.named_parameters())  # not Llama's layout
    out = model(**tok(["12+3="], return_tensors="pt")).logits
    assert out.shape == (1, 5, len(tok))


def test_cli_build_reports_cached_and_path(tiny, capsys, monkeypatch, tmp_path):
    from evomerge.cli import main

    assert main(["zoo", "build", "--preset", "tiny", "--out", str(tiny.root)]) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["zoo", "build", "--preset", "nope"]) == 2
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    assert main(["zoo", "path", "--preset", "tiny"]) == 2  # not built in this cache
    assert "evomerge zoo build --preset tiny" in capsys.readouterr().err.replace("\n", "")


# ------------------------------------------------------------------------ scoring
def test_teacher_forced_score_equals_greedy_generation(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny.base)).eval()
    docs = eval_docs("zoo_succ", "search")[:40] + eval_docs("zoo_translate", "search")[:40]
    scores = greedy_correct(model, docs, batch_size=16)
    gens = greedy_generate(model, [d["prompt"] for d in docs])
    assert scores.tolist() == [float(g == d["answer"]) for g, d in zip(gens, docs)]
    assert scores.sum() > 0  # the tiny base has learned something
