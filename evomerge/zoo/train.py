"""Model construction, training and fast greedy scoring for the zoo.

Training is deterministic under its seed on one CPU thread (the data stream is a seeded
``random.Random``; weights are initialised under ``torch.manual_seed``). Scoring uses teacher
forcing: an item is correct when every answer token (and the closing newline) is the argmax
given the prompt and the previous answer tokens — exactly what greedy decoding would produce,
at the cost of one forward pass.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Callable, Iterable

import numpy as np
import torch

from evomerge.errors import ConfigError
from evomerge.zoo.tasks import training_items
from evomerge.zoo.tokenizer import vocabulary

VOCAB = vocabulary()
PAD_ID = VOCAB["<pad>"]
EOS_ID = VOCAB["<eos>"]
END = "\n"  # every answer ends with a newline: the stop sequence for generation


def _llama(vocab_size: int, a: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(vocab_size, a))


def _qwen2(vocab_size: int, a: dict):
    from transformers import Qwen2Config

    return Qwen2Config(**_common(vocab_size, a), use_sliding_window=False)


def _common(vocab_size: int, a: dict) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=a["hidden"],
        intermediate_size=a["intermediate"],
        num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"],
        num_key_value_heads=a.get("kv_heads", a["heads"]),
        max_position_embeddings=a.get("max_positions", 64),
        tie_word_embeddings=a.get("tie_embeddings", False),
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        pad_token_id=PAD_ID,
        bos_token_id=VOCAB["<bos>"],
        eos_token_id=EOS_ID,
    )


# Model families: name → config builder. Add one here to build the zoo in another architecture.
FAMILIES: dict[str, Callable] = {"llama": _llama, "qwen2": _qwen2}


def make_model(family: str, arch: dict, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    config = FAMILIES[family](len(VOCAB), arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model


@contextmanager
def one_thread():
    """Bitwise-reproducible CPU training needs a fixed thread count; one is also the fastest here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode(text: str) -> list[int]:
    return [VOCAB[c] for c in text]


def _batch(items: list[tuple[str, str]], device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded ids and labels (-100 on prompt and padding) for prompt + answer + newline."""
    seqs, plens = [], []
    for prompt, answer in items:
        p, a = encode(prompt), encode(answer + END)
        seqs.append((p, a))
        plens.append(len(p))
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    return ids.to(device), labels.to(device), plens


def train(
    model: torch.nn.Module,
    mixture: list[tuple[str, float]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    warmup: int = 50,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.nn.Module:
    """AdamW on the answer tokens of a task mixture; warm-up then cosine decay."""
    device = next(model.parameters()).device
    rng = random.Random(f"evomerge-zoo-train-{seed}")
    stream = training_items(mixture, rng)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            ids, labels, _ = _batch([next(stream) for _ in range(batch_size)], device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if on_step is not None:
                on_step(step, float(loss.detach()))
    model.eval()
    return model


@torch.no_grad()
def greedy_correct(model: torch.nn.Module, docs: Iterable[dict], batch_size: int = 256) -> np.ndarray:
    """Per document 1.0 when greedy decoding yields exactly ``answer`` then a newline, else 0.0."""
    device = next(model.parameters()).device
    docs = list(docs)
    out = np.zeros(len(docs), dtype=np.float32)
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        ids, labels, _ = _batch([(d["prompt"], d["answer"]) for d in chunk], device)
        logits = model(input_ids=ids).logits
        pred = logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        ok = ((pred == target) | (target == -100)).all(dim=1)
        out[start : start + len(chunk)] = ok.float().cpu().numpy()
    return out


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: list[str], max_new: int = 8) -> list[str]:
    """Greedy continuations up to the first newline (left padding, explicit positions)."""
    device = next(model.parameters()).device
    inv = {i: t for t, i in VOCAB.items()}
    enc = [encode(p) for p in prompts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    outs = [[] for _ in prompts]
    done = torch.zeros(len(enc), dtype=torch.bool, device=device)
    nl = VOCAB[END]
    for _ in range(max_new):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i] and t != nl:
                outs[i].append(inv.get(t, "?"))
        done |= nxt == nl
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
    return ["".join(o) for o in outs]
