"""LoRA fine-tuning of a pretrained causal LM on (prompt, answer) streams, deterministic on CPU.

The loss is the cross-entropy of the answer tokens (`` <answer>\\n``, encoded as lm-eval's
loglikelihood requests encode a continuation) given the prompt. The output head — for
SmolLM2 a 49,152-row matrix tied to the frozen embeddings — is applied only at the positions
that have a label, not at every position, which is where most of a short prompt's head cost
went. Embeddings are frozen; LoRA adapters (``peft``) train on every linear layer of the
blocks. Deterministic for a fixed seed and thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = LORA_TARGETS

    def config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM")


def encode_item(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + " answer\\n" and the number of prompt tokens (as lm-eval splits them)."""
    ctx = tokenizer(prompt, add_special_tokens=False).input_ids
    whole = tokenizer(prompt + " " + answer + "\n", add_special_tokens=False).input_ids
    return whole, len(ctx)


def batch_tensors(tokenizer, items: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the answer)."""
    enc = [encode_item(tokenizer, p, a) for p, a in items]
    width = max(len(ids) for ids, _ in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    labels = torch.full((len(enc), width), -100, dtype=torch.long)
    for i, (seq, n_ctx) in enumerate(enc):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, n_ctx:len(seq)] = torch.tensor(seq[n_ctx:])
    return ids, mask, labels


def answer_logits(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a label (head applied there only) and those labels."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = core.model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    return core.lm_head(hidden[:, :-1][keep]), target[keep]


def lora_finetune(
    model,
    stream: Iterator[tuple[str, str]],
    tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    lora: LoraSpec = LoraSpec(),
    warmup: int = 20,
    on_step: Callable[[int, float], None] | None = None,
):
    """Wrap ``model`` in LoRA adapters and train them; returns the PEFT model (in eval mode)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora.config())
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

        def lr_at(step: int) -> float:
            if step < warmup:
                return lr * (step + 1) / warmup
            t = (step - warmup) / max(1, steps - warmup)
            return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

        peft_model.train()
        for step in range(steps):
            ids, mask, labels = batch_tensors(tokenizer, [next(stream) for _ in range(batch_size)])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits, target = answer_logits(peft_model, ids, mask, labels)
            loss = F.cross_entropy(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if on_step is not None:
                on_step(step, float(loss.detach()))
    peft_model.eval()
    return peft_model


@torch.no_grad()
def greedy_exact(model, tokenizer, docs: list[dict], batch_size: int = 32) -> list[float]:
    """Per document 1.0 when `` <answer>\\n`` is the greedy continuation of the prompt (teacher forced)."""
    out: list[float] = []
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        ids, mask, labels = batch_tensors(tokenizer, [(d["prompt"], d["answer"]) for d in chunk])
        logits, target = answer_logits(model, ids, mask, labels)
        hit = (logits.argmax(-1) == target).tolist()
        per_row = (labels[:, 1:] != -100).sum(1).tolist()
        i = 0
        for n in per_row:
            out.append(float(all(hit[i:i + n])))
            i += n
    return out
