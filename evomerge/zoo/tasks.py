"""Synthetic tasks of the zoo: value-level operations written in one of two digit scripts.

Every item is a prompt and an answer. The prompt is an operation over numbers or digit
strings written in script L1 ("0".."9") or L2 ("a".."j", a cipher of the same ten values),
and it ends with a marker that names the script of the answer ("=" → L1, ":" → L2). So the
same operation can be asked in either "language", which is what the cross-skill task needs:
an operation one expert learned in L1, asked in the script another expert learned.

Held-out items are fixed per *operation* (not per task or preset): the first
:data:`HELDOUT_PER_OP` distinct keys drawn from a seed, split into search / validation / test.
Training streams reject those keys, so every split is unseen by every zoo model, in every
script.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from evomerge.errors import ConfigError
from evomerge.zoo.tokenizer import L1_DIGITS, MARKERS, SCRIPTS

SPLIT_SIZES = {"search": 200, "validation": 200, "test": 400}  # held-out sizes, in this order
HELDOUT_PER_OP = sum(SPLIT_SIZES.values())
_L1_TO = {name: str.maketrans(L1_DIGITS, digits) for name, digits in SCRIPTS.items()}


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(L1_DIGITS) for _ in range(rng.randint(lo, hi)))


@dataclass(frozen=True)
class Op:
    """An operation: how to draw a key, and the prompt body and answer for it (in L1)."""

    name: str
    draw: Callable[[random.Random], tuple]
    render: Callable[[tuple], tuple[str, str]]  # key → (prompt body, answer), both in L1
    about: str


def _op(name: str, about: str):
    def deco(fn):
        draw, render = fn()
        OPS[name] = Op(name, draw, render, about)
        return fn

    return deco


OPS: dict[str, Op] = {}


@_op("copy", "C<digits> → the same digits (with another answer script: translation)")
def _copy():
    return (lambda r: (_digits(r, 2, 6),)), (lambda k: ("C" + k[0], k[0]))


@_op("rev", "R<digits> → the digits reversed")
def _rev():
    return (lambda r: (_digits(r, 3, 6),)), (lambda k: ("R" + k[0], k[0][::-1]))


@_op("succ", "S<n> → n + 1")
def _succ():
    return (lambda r: (r.randint(0, 9999),)), (lambda k: (f"S{k[0]}", str(k[0] + 1)))


@_op("pred", "P<n> → n − 1")
def _pred():
    return (lambda r: (r.randint(1, 9999),)), (lambda k: (f"P{k[0]}", str(k[0] - 1)))


@_op("sort", "O<digits> → the digits in ascending order")
def _sort():
    return (lambda r: (_digits(r, 3, 6),)), (lambda k: ("O" + k[0], "".join(sorted(k[0]))))


@_op("rot", "X<digits> → the digits rotated left by one (12345 → 23451)")
def _rot():
    return (lambda r: (_digits(r, 3, 6),)), (lambda k: ("X" + k[0], k[0][1:] + k[0][0]))


@_op("add", "<a>+<b> → a + b, a and b in 0..99")
def _add():
    return (lambda r: (r.randint(0, 99), r.randint(0, 99))), (lambda k: (f"{k[0]}+{k[1]}", str(k[0] + k[1])))


@_op("sub", "<a>-<b> → a − b, 0 ≤ b ≤ a ≤ 99")
def _sub():
    def draw(r):
        a, b = r.randint(0, 99), r.randint(0, 99)
        return (max(a, b), min(a, b))

    return draw, (lambda k: (f"{k[0]}-{k[1]}", str(k[0] - k[1])))


@_op("mul", "<a>*<b> → a · b, a in 0..99, b in 0..9")
def _mul():
    return (lambda r: (r.randint(0, 99), r.randint(0, 9))), (lambda k: (f"{k[0]}*{k[1]}", str(k[0] * k[1])))


# ---------------------------------------------------------------------------- scripts
def transliterate(text: str, script: str, rng: random.Random | None = None) -> str:
    """Rewrite the L1 digits of ``text`` in ``script`` (l1 | l2 | mixed: each digit at random)."""
    if script == "mixed":
        assert rng is not None
        return "".join(SCRIPTS[rng.choice(("l1", "l2"))][int(c)] if c in L1_DIGITS else c for c in text)
    return text.translate(_L1_TO[script])


def _pick(script: str, rng: random.Random) -> str:
    return rng.choice(("l1", "l2")) if script == "any" else script


@dataclass(frozen=True)
class TaskSpec:
    """One task: an operation with the script of its inputs and of its answers.

    ``inputs``: l1 | l2 | mixed (each digit in a random script) | any (whole prompt in one
    random script); ``answers``: l1 | l2 | any.
    """

    name: str
    op: str
    inputs: str
    answers: str
    about: str = ""

    def item(self, key: tuple, rng: random.Random) -> tuple[str, str]:
        body, answer = OPS[self.op].render(key)
        out = _pick(self.answers, rng)
        return transliterate(body, _pick(self.inputs, rng), rng) + MARKERS[out], transliterate(answer, out)


# Every task a preset can train on or evaluate, by name. Eval task names start with "zoo_".
TASKS: dict[str, TaskSpec] = {}


def _task(name, op, inputs, answers, about=""):
    TASKS[name] = TaskSpec(name, op, inputs, answers, about)


for _op_name in OPS:
    for _i in ("l1", "l2", "mixed", "any"):
        for _a in ("l1", "l2", "any"):
            _task(f"{_op_name}:{_i}>{_a}", _op_name, _i, _a)

# Evaluated tasks (lm-eval YAMLs under evals/): held-out items of one operation in one script pair.
EVAL_TASKS = {
    "zoo_add": ("add", "l1", "l1", "addition in L1 (the skill expert's task)"),
    "zoo_l2": ("rev", "l2", "l2", "reverse, read and written in L2 (the language expert's task)"),
    "zoo_sort": ("sort", "l1", "l1", "sorting digits in L1 (the third expert's task)"),
    "zoo_add_l2": ("add", "l2", "l2", "cross-skill: addition read and written in L2"),
    "zoo_sort_l2": ("sort", "l2", "l2", "cross-skill: sorting read and written in L2"),
    "zoo_succ": ("succ", "l1", "l1", "successor in L1 (a base skill: retention)"),
    "zoo_succ_l2": ("succ", "l2", "l2", "successor read and written in L2"),
    "zoo_translate": ("copy", "l1", "l2", "translation L1 → L2 (copy into the other script)"),
}
for _name, (_op_name, _i, _a, _about) in EVAL_TASKS.items():
    _task(_name, _op_name, _i, _a, _about)


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(sorted(EVAL_TASKS))
        raise ConfigError(f"unknown zoo task {name!r}; evaluated tasks: {known} (or '<op>:<inputs>><answers>')") from None


# ---------------------------------------------------------------------------- held-out splits
@lru_cache(maxsize=None)
def heldout_keys(op: str) -> dict[str, tuple[tuple, ...]]:
    """The op's held-out keys by split: fixed, distinct, disjoint across splits."""
    rng = random.Random(f"evomerge-zoo-heldout-{op}")
    seen: dict[tuple, None] = {}
    while len(seen) < HELDOUT_PER_OP:
        seen.setdefault(OPS[op].draw(rng), None)
    keys = list(seen)
    out, start = {}, 0
    for split, n in SPLIT_SIZES.items():
        out[split] = tuple(keys[start : start + n])
        start += n
    return out


@lru_cache(maxsize=None)
def _heldout_set(op: str) -> frozenset:
    return frozenset(k for keys in heldout_keys(op).values() for k in keys)


def eval_docs(task: str, split: str) -> list[dict]:
    """The documents of one evaluated task and split (what ``evals/`` stores as JSONL)."""
    spec = get_task(task)
    if split not in SPLIT_SIZES:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLIT_SIZES)}")
    rng = random.Random(f"evomerge-zoo-docs-{task}-{split}")
    docs = []
    for i, key in enumerate(heldout_keys(spec.op)[split]):
        prompt, answer = spec.item(key, rng)
        docs.append({"id": i, "prompt": prompt, "answer": answer})
    return docs


def training_items(mixture: list[tuple[str, float]], rng: random.Random) -> Iterator[tuple[str, str]]:
    """An endless stream of (prompt, answer) from a weighted task mixture, held-out keys excluded."""
    specs = [get_task(name) for name, _ in mixture]
    weights = [w for _, w in mixture]
    while True:
        spec = rng.choices(specs, weights)[0]
        op = OPS[spec.op]
        key = op.draw(rng)
        while key in _heldout_set(spec.op):
            key = op.draw(rng)
        yield spec.item(key, rng)


def write_eval_data(out_dir: str | Path, tasks: list[str] | None = None) -> list[Path]:
    """Write ``<out_dir>/<task>/<split>.jsonl`` for the evaluated tasks (deterministic bytes)."""
    from evomerge.io import atomic_write_text

    written = []
    for task in tasks or list(EVAL_TASKS):
        for split in SPLIT_SIZES:
            path = Path(out_dir) / task / f"{split}.jsonl"
            atomic_write_text(path, "".join(json.dumps(d, ensure_ascii=True) + "\n" for d in eval_docs(task, split)))
            written.append(path)
    return written
