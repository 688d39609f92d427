"""An lm-eval language model over a resident ``transformers`` model, built for repeated scoring.

:class:`ResidentLM` is lm-eval's ``HFLM`` wrapped around a model object whose weights change in
place between calls. Everything that depends only on the requests and the tokenizer —
tokenization, sorting into batches, padding, moving to the device — is done once per task and
kept in a plan (:class:`LoglikelihoodPlan`, :class:`GeneratePlan`); a call then only runs the
model and reads its outputs. Forward and generate calls are timed (``ModelTimer``) so that the
evaluator can report model compute apart from harness bookkeeping.

Semantics follow ``HFLM`` exactly: the same context/continuation encoding (``_encode_pair``,
the prefix token for empty contexts, left truncation to ``max_length``), the same greedy check,
the same generation call (``_model_generate`` with lm-eval's stop criteria) and the same
post-processing of generated text. ``tests/test_evaluation.py`` checks the results against
``lm_eval.evaluator.evaluate`` with a plain ``HFLM``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from evomerge.errors import EvomergeError
from evomerge.evaluation import _lmeval  # noqa: F401  (offline before lm-eval)
from evomerge.evaluation._lmeval import quiet

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.models.utils import (  # noqa: E402
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)


@dataclass
class ModelTimer:
    """Seconds spent inside the model (forward and generate), synchronised on accelerators."""

    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def time(self, fn, device: torch.device, *args, **kwargs):
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        if sync:
            sync(device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if sync:
            sync(device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


class ResidentLM(HFLM):
    """``HFLM`` over a model object that is scored again after every in-place weight swap."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 64, timer: ModelTimer | None = None):
        with quiet():
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        if self.backend != "causal":
            raise EvomergeError(f"{type(model).__name__}: evomerge evaluates causal language models only")
        self.timer = timer or ModelTimer()

    def _model_call(self, inps, attn_mask=None, labels=None):
        return self.timer.time(super()._model_call, self.device, inps, attn_mask, labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        return self.timer.time(super()._model_generate, self.device, context, max_length, stop, **generation_kwargs)

    def encode_loglikelihood(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens, as ``HFLM.loglikelihood`` encodes them."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if self.prefix_token_id != cont[0]:
                return [self.prefix_token_id], cont
            return cont[:1], cont[1:]
        return self._encode_pair(context, continuation)


@dataclass
class _LLBatch:
    inputs: torch.Tensor  # [rows, T] right-padded
    rows: torch.Tensor  # [N] row of each scored position
    cols: torch.Tensor  # [N] logit position
    labels: torch.Tensor  # [N] continuation token expected there
    owner: torch.Tensor  # [N] request (index into `requests`) the position belongs to
    requests: list[int]  # original indices of the requests scored in this batch
    keep: torch.Tensor  # [rows, T] bool: the positions whose logits are read
    kept: torch.Tensor  # [N] index of each scored position among keep's True entries (row-major)


def _kept_positions(rows: list[int], cols: list[int], shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask of scored positions and, per scored position, its rank in the mask's row-major order."""
    keep = torch.zeros(shape, dtype=torch.bool)
    keep[rows, cols] = True
    rank = torch.full(shape, -1, dtype=torch.long)
    rank[keep] = torch.arange(int(keep.sum()))
    return keep, rank[rows, cols]


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model(input_ids, logits_to_keep=<bool mask>)`` applies the output head only there.

    ``transformers`` causal LMs that route through ``slice_logits_to_keep`` do (v5+); the head of
    a small model with a large vocabulary (SmolLM2: 49k rows) is then paid for the scored
    positions only instead of every position.
    """
    import inspect

    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class LoglikelihoodPlan:
    """Every loglikelihood request of a task, tokenized and batched once.

    Requests whose model input is identical (e.g. the choices of a multiple-choice question
    that differ only in their last token) share one row of the batch.
    """

    n: int
    batches: list[_LLBatch] = field(default_factory=list)
    head_at_scored_positions: bool = True  # False: full logits, as HFLM computes them (the reference)

    @classmethod
    def build(cls, lm: ResidentLM, args: list[tuple[str, str]]) -> LoglikelihoodPlan:
        encoded = []
        for i, (context, continuation) in enumerate(args):
            ctx, cont = lm.encode_loglikelihood(context, continuation)
            if not cont:
                raise EvomergeError(f"empty continuation after tokenization: {continuation!r} after {context!r}")
            full = (ctx + cont)[-(lm.max_length + 1):]
            encoded.append((i, tuple(full[:-1]), cont))
        # Longest first, as HFLM does; identical inputs share a row.
        rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, inp, cont in sorted(encoded, key=lambda e: (-len(e[1]), e[1])):
            rows.setdefault(inp, []).append((i, cont))
        plan = cls(n=len(args))
        items = list(rows.items())
        device, pad = lm.device, lm.tokenizer.pad_token_id or 0
        for start in range(0, len(items), lm.batch_size):
            chunk = items[start:start + lm.batch_size]
            width = len(chunk[0][0])
            inputs = torch.full((len(chunk), width), pad, dtype=torch.long)
            r, c, lab, own, reqs = [], [], [], [], []
            for row, (inp, members) in enumerate(chunk):
                inputs[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                for i, cont in members:
                    slot = len(reqs)
                    reqs.append(i)
                    positions = range(len(inp) - len(cont), len(inp))
                    r += [row] * len(cont)
                    c += positions
                    lab += cont
                    own += [slot] * len(cont)
            as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
            keep, kept = _kept_positions(r, c, tuple(inputs.shape))
            plan.batches.append(_LLBatch(inputs.to(device), as_t(r), as_t(c), as_t(lab), as_t(own), reqs,
                                         keep.to(device), kept.to(device)))
        return plan

    def run(self, lm: ResidentLM) -> list[tuple[float, bool]]:
        """(log-probability, is-greedy) per request, in request order."""
        lls, greedy, order = [], [], []
        partial = self.head_at_scored_positions and accepts_logits_to_keep(lm.model)
        for b in self.batches:
            if partial:  # the head only where a logit is read: [kept, vocab]
                logits = lm.timer.time(lambda: lm.model(b.inputs, logits_to_keep=b.keep).logits, lm.device)
                picked = logits.reshape(-1, logits.shape[-1])[b.kept].float()
            else:
                logits = lm._model_call(b.inputs)
                picked = logits[b.rows, b.cols].float()  # [N, vocab]: only the scored positions
            token_lp = F.log_softmax(picked, dim=-1).gather(1, b.labels[:, None])[:, 0]
            misses = (picked.argmax(-1) != b.labels).to(torch.int32)
            k = len(b.requests)
            lls.append(torch.zeros(k, device=token_lp.device).index_add_(0, b.owner, token_lp))
            greedy.append(torch.zeros(k, dtype=torch.int32, device=token_lp.device).index_add_(0, b.owner, misses) == 0)
            order += b.requests
        out: list[tuple[float, bool] | None] = [None] * self.n
        if order:
            for i, ll, g in zip(order, torch.cat(lls).tolist(), torch.cat(greedy).tolist()):
                out[i] = (ll, g)
        return out  # type: ignore[return-value]


@dataclass
class _GenBatch:
    context: torch.Tensor
    attention_mask: torch.Tensor
    until: list[str]
    max_gen_toks: int
    kwargs: dict
    requests: list[int]


@dataclass
class GeneratePlan:
    """Every generate_until request of a task, tokenized, left-padded and batched once."""

    n: int
    batches: list[_GenBatch] = field(default_factory=list)

    @classmethod
    def build(cls, lm: ResidentLM, args: list[tuple[str, dict]]) -> GeneratePlan:
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        plan = cls(n=len(args))
        eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(args[members[0]][1], lm.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if lm.max_length - max_gen_toks <= 0:
                raise EvomergeError(
                    f"max_gen_toks {max_gen_toks} leaves no room for the prompt in max_length {lm.max_length}"
                )
            members = sorted(members, key=lambda i: (-len(lm.tok_encode(args[i][0])), args[i][0]))
            for start in range(0, len(members), lm.batch_size):
                chunk = members[start:start + lm.batch_size]
                ctx, mask = lm.tok_batch_encode(
                    [args[i][0] for i in chunk], left_truncate_len=lm.max_length - max_gen_toks,
                    truncation=lm.truncation,
                )
                plan.batches.append(
                    _GenBatch(ctx.to(lm.device), mask.to(lm.device), until, max_gen_toks, kwargs, chunk)
                )
        return plan

    def run(self, lm: ResidentLM) -> list[str]:
        out: list[str | None] = [None] * self.n
        for b in self.batches:
            width = b.context.shape[1]
            cont = lm._model_generate(
                context=b.context, attention_mask=b.attention_mask, stop=list(b.until),
                max_length=width + b.max_gen_toks, **dict(b.kwargs),
            )
            texts = lm.tokenizer.batch_decode(cont[:, width:].tolist(), skip_special_tokens=True)
            for i, text in zip(b.requests, texts):
                out[i] = postprocess_generated_text(text, stop=b.until, think_end_token=None)
        return out  # type: ignore[return-value]


PLANS = {"loglikelihood": LoglikelihoodPlan, "generate_until": GeneratePlan}
