"""Diagonal Fisher information of an expert on the objective's own search data, for the
``fisher`` merge operator (:mod:`evomerge.merge.methods.weighted_average`).

The estimate is the empirical Fisher of the conditional LM loss: for every document of each
lm-eval objective (on the objective's split — the search split in a search), the prompt the
evaluator would send and the gold answer (the gold choice of a multiple-choice task, the target
of a generation task) are encoded exactly as the evaluator encodes them, and

    F = (1/N) Σ_examples (∂/∂θ −log p(answer | prompt))²      (per parameter, float32).

Python objectives have no documents and are skipped. The result is cached as a safetensors
file (tensor names = the model's parameter names) under ``<cache>/fisher/``, keyed by the
expert's weight files (name, size, mtime), the objectives and their limits, so each expert is
estimated once per objective set. :func:`with_fisher` points a recipe's models at their files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from evomerge.errors import ConfigError
from evomerge.evaluation.objective import Objective
from evomerge.recipe import Recipe

FISHER_VERSION = 1


def fisher_examples(objectives: Sequence[Objective], evals_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the lm-eval objectives, on each objective's own split."""
    from evomerge.evaluation.scoring import PreparedTask
    from evomerge.evaluation.tasks import TaskCatalog

    lm_objectives = [o for o in objectives if not o.is_python]
    if not lm_objectives:
        raise ConfigError("fisher: the objectives have no lm-eval task to estimate a Fisher on")
    catalog = TaskCatalog(evals_dir)
    pairs: list[tuple[str, str]] = []
    for o in lm_objectives:
        task = catalog.build(o.task, o.split, key=o.key)
        prepared = PreparedTask(task, o.key, o.metric, o.limit)
        for doc, insts in zip(prepared.docs, prepared.instances):
            pairs.append(_gold_pair(task, doc, insts))
    return pairs


def _gold_pair(task, doc, insts) -> tuple[str, str]:
    kind = insts[0].request_type
    if kind == "loglikelihood":
        if len(insts) == 1:
            return insts[0].args[0], insts[0].args[1]
        gold = task.doc_to_target(doc)
        if isinstance(gold, str):
            gold = task.doc_to_choice(doc).index(gold)
        return insts[int(gold)].args[0], insts[int(gold)].args[1]
    if kind == "generate_until":
        target = task.doc_to_target(doc)
        if isinstance(target, list):
            target = target[0]
        return insts[0].args[0], f"{task.config.target_delimiter}{target}"
    if kind == "loglikelihood_rolling":
        return "", insts[0].args[0]
    raise ConfigError(f"fisher: request type {kind!r} of task {task.config.task} has no gold answer")


def diagonal_fisher(model: torch.nn.Module, tokenizer, examples: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of −log p(answer | prompt) over ``examples`` (see module doc),
    one float32 tensor per parameter name of ``model`` (on the model's device)."""
    from evomerge.evaluation.lm import ResidentLM

    if not examples:
        raise ConfigError("fisher: no examples to estimate the Fisher on")
    lm = ResidentLM(model, tokenizer, batch_size=1)
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is evaluated
    device = next(model.parameters()).device
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        for prompt, answer in examples:
            ctx, cont = lm.encode_loglikelihood(prompt, answer)
            ids = torch.tensor([ctx + cont], device=device)
            logits = model(ids[:, :-1]).logits[0, -len(cont):].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, -len(cont):], reduction="sum")
            model.zero_grad(set_to_none=True)
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n].add_(p.grad.float().square())
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return {n: a.div_(len(examples)) for n, a in acc.items()}


def fisher_file(expert: str | Path, objectives: Sequence[Objective], *, cache_dir: str | Path | None = None,
                evals_dir: str | Path | None = None, device: str = "cpu") -> Path:
    """The cached Fisher file of ``expert`` (a model directory) on ``objectives``; estimated and
    written atomically on first use."""
    from evomerge.paths import cache_root

    expert = Path(expert).resolve()
    weights = sorted(p for p in expert.iterdir() if p.suffix == ".safetensors") if expert.is_dir() else []
    if not weights:
        raise ConfigError(f"fisher: {expert} has no safetensors weights")
    key = hashlib.sha256(json.dumps({
        "version": FISHER_VERSION, "model": str(expert),
        "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
        "objectives": [(o.key, o.limit) for o in objectives if not o.is_python],
        "evals_dir": str(evals_dir) if evals_dir is not None else None,
    }, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    path = root / "fisher" / f"{expert.name}-{key}.safetensors"
    if path.is_file():
        return path
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32, use_safetensors=True,
                                                 local_files_only=True, trust_remote_code=False).to(device)
    tokenizer = AutoTokenizer.from_pretrained(expert, local_files_only=True, trust_remote_code=False)
    fisher = diagonal_fisher(model, tokenizer, fisher_examples(objectives, evals_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({n: t.contiguous().cpu() for n, t in fisher.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def with_fisher(recipe: Recipe, files: dict[str, str | Path]) -> Recipe:
    """``recipe`` with ``parameters.fisher`` set for each model alias in ``files``."""
    unknown = sorted(set(files) - {m.alias for m in recipe.models})
    if unknown:
        raise ConfigError(f"fisher: {unknown} are not models of the recipe")
    models = [m.model_copy(update={"parameters": {**m.parameters, "fisher": str(files[m.alias])}})
              if m.alias in files else m for m in recipe.models]
    return recipe.model_copy(update={"models": models})
