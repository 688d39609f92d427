"""Shared fixtures: tiny random models written as real Hugging Face directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[1]


def char_tokenizer():
    """A small character-level fast tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789+-=abcdefghij ")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_model(path: Path, seed: int, family: str = "llama", layers: int = 2, hidden: int = 32,
               perturb_from: Path | None = None, scale: float = 0.05, tie: bool = False) -> Path:
    """Write a tiny random causal LM to ``path``; with ``perturb_from``, a fine-tune-like
    perturbation of that model (so task vectors are small, like real experts)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    cfg_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    cfg = cfg_cls(vocab_size=32, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(cfg)
    if perturb_from is not None:
        base = AutoModelForCausalLM.from_pretrained(perturb_from)
        with torch.no_grad():
            for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
                p.copy_(q + scale * torch.randn_like(q))
    model.save_pretrained(path, safe_serialization=True)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base + three experts (2-layer Llama, hidden 32) and a 3-layer variant."""
    root = tmp_path_factory.mktemp("models")
    base = make_model(root / "base", 0)
    out = {"base": base}
    for k in range(3):
        out[f"e{k}"] = make_model(root / f"e{k}", 10 + k, perturb_from=base)
    out["deep"] = make_model(root / "deep", 20, layers=3)
    out["qwen"] = make_model(root / "qwen", 30, family="qwen2")
    return out


def run_search_then_sigkill(config: dict, run_dir: Path, *, after: int, timeout: float,
                            env: dict | None = None) -> None:
    """Start ``evomerge.search.run_search`` in a subprocess and kill -9 it once ``after`` trials
    are committed (the search must still be running then)."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from evomerge.store import RunStore

    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    tests = str(Path(__file__).resolve().parent)
    full_env = {**os.environ, **(env or {}),
                "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from evomerge.search import run_search; run_search(sys.argv[1], sys.argv[2])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(run_dir)], env=full_env)
    t0, n = time.time(), 0
    while n < after and time.time() - t0 < timeout and proc.poll() is None:
        time.sleep(0.05)
        if (run_dir / "evomerge.sqlite").exists():
            with RunStore(run_dir) as s:
                n = s.count()
    assert proc.poll() is None, "the search finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
