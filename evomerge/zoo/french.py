"""Word problems in English and French, built from templates and word lists written here.

Three evaluated tasks for the real-model preset (``smollm2``), every answer a number in digits:

* ``smol_math`` — arithmetic word problems in English (add, subtract, multiply by a small
  number); operands written in digits or in English words. The math expert's task.
* ``smol_french`` — reading French: a short French story about quantities (numbers spelled in
  French words) and a question whose answer is one quantity *stated* in it, or "write this
  French number in digits". No arithmetic. The French expert's task.
* ``smol_math_fr`` — the cross-skill task: the arithmetic word problems posed in French with
  the operands spelled in French words ("sept", "quarante-deux"), answered with the result.
  Reading French is required to get the operands, arithmetic to get the answer; neither
  expert is trained on it.

An item is drawn from a *key* (kind, operation, operands, name, object, template); held-out
keys are fixed per task (the first distinct draws of a seeded stream, split into
search / validation / test) and training streams reject them, so no split is ever trained on.
Everything is deterministic: ``random.Random`` seeded by strings.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from evomerge.errors import ConfigError

SPLITS = {"search": 128, "validation": 400, "test": 400}  # held-out sizes, in this order
PROMPT = "Q: {question}\nA:"  # the answer follows after one space, then a newline

# ------------------------------------------------------------------------- numbers in words
_FR_UNITS = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze",
             "douze", "treize", "quatorze", "quinze", "seize", "dix-sept", "dix-huit", "dix-neuf"]
_FR_TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}
_EN_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_EN_TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty", 9: "ninety"}


def french_number(n: int) -> str:
    """0..99 in French words (1990 spelling rules: "vingt et un", "soixante-dix", "quatre-vingts")."""
    if not 0 <= n <= 99:
        raise ValueError(f"french_number: {n} is outside 0..99")
    if n < 20:
        return _FR_UNITS[n]
    tens, unit = divmod(n, 10)
    if tens in (7, 9):  # soixante-dix.., quatre-vingt-dix..
        head = "soixante" if tens == 7 else "quatre-vingt"
        return f"{head} et onze" if n == 71 else f"{head}-{_FR_UNITS[10 + unit]}"
    if tens == 8:
        return "quatre-vingts" if unit == 0 else f"quatre-vingt-{_FR_UNITS[unit]}"
    if unit == 0:
        return _FR_TENS[tens]
    return f"{_FR_TENS[tens]} et un" if unit == 1 else f"{_FR_TENS[tens]}-{_FR_UNITS[unit]}"


def english_number(n: int) -> str:
    """0..99 in English words ("forty-two")."""
    if not 0 <= n <= 99:
        raise ValueError(f"english_number: {n} is outside 0..99")
    if n < 20:
        return _EN_UNITS[n]
    tens, unit = divmod(n, 10)
    return _EN_TENS[tens] if unit == 0 else f"{_EN_TENS[tens]}-{_EN_UNITS[unit]}"


# ------------------------------------------------------------------------- word lists
# (name, pronoun); French pronoun agrees with the name.
EN_NAMES = [("Tom", "He"), ("Anna", "She"), ("Paul", "He"), ("Emma", "She"), ("Lucas", "He"), ("Lily", "She"),
            ("Sam", "He"), ("Mia", "She"), ("Ben", "He"), ("Zoe", "She")]
FR_NAMES = [("Marie", "elle"), ("Pierre", "il"), ("Léa", "elle"), ("Hugo", "il"), ("Camille", "elle"),
            ("Louis", "il"), ("Chloé", "elle"), ("Jules", "il"), ("Manon", "elle"), ("Théo", "il")]
EN_OBJECTS = ["apples", "marbles", "books", "pencils", "candies", "flowers", "stamps", "cards", "shells", "coins"]
FR_OBJECTS = ["pommes", "billes", "livres", "crayons", "bonbons", "fleurs", "timbres", "cartes", "coquillages",
              "pièces"]

# Operation templates: {n} name, {p} pronoun, {P} capitalised pronoun, {a} {b} operands, {o} object.
EN_STORY = {
    "add": ["{n} has {a} {o}. {P} buys {b} more {o}.", "{n} has {a} {o}. {P} finds {b} more {o}.",
            "{n} has {a} {o}. A friend gives {p} {b} more {o}."],
    "sub": ["{n} has {a} {o}. {P} gives {b} {o} to a friend.", "{n} has {a} {o}. {P} loses {b} {o}.",
            "{n} has {a} {o}. {P} sells {b} {o}."],
    "mul": ["{n} has {a} boxes. Each box holds {b} {o}.", "{n} has {a} bags with {b} {o} in each bag.",
            "{n} buys {a} packs of {b} {o}."],
}
EN_ASK = {"add": "How many {o} does {n} have now?", "sub": "How many {o} does {n} have now?",
          "mul": "How many {o} does {n} have in total?"}
FR_STORY = {
    "add": ["{n} a {a} {o}. {P} achète {b} autres {o}.", "{n} a {a} {o}. {P} trouve {b} autres {o}.",
            "{n} a {a} {o}. Un ami lui donne {b} autres {o}."],
    "sub": ["{n} a {a} {o}. {P} donne {b} {o} à un ami.", "{n} a {a} {o}. {P} perd {b} {o}.",
            "{n} a {a} {o}. {P} vend {b} {o}."],
    "mul": ["{n} a {a} boîtes. Chaque boîte contient {b} {o}.", "{n} a {a} sacs avec {b} {o} dans chaque sac.",
            "{n} achète {a} paquets de {b} {o}."],
}
FR_ASK_RESULT = {"add": "Combien de {o} {n} a-t-{p} maintenant ?", "sub": "Combien de {o} {n} a-t-{p} maintenant ?",
                 "mul": "Combien de {o} {n} a-t-{p} en tout ?"}
# Reading questions: the answer is operand a or b, stated in the story (no arithmetic).
FR_ASK_STATED = {
    "add": [("Combien de {o} {n} avait-{p} au début ?", "a"), ("Combien d'autres {o} {n} reçoit-{p} ?", "b")],
    "sub": [("Combien de {o} {n} avait-{p} au début ?", "a"), ("Combien de {o} {n} n'a-t-{p} plus ?", "b")],
    "mul": [("Combien de boîtes, sacs ou paquets {n} a-t-{p} ?", "a"), ("Combien de {o} y a-t-il dans chacun ?", "b")],
}
FR_SPELL = ["Écris ce nombre en chiffres : {w}.", "Quel nombre est « {w} » ?", "En chiffres, {w} s'écrit comment ?"]


def _operands(op: str, rng: random.Random) -> tuple[int, int]:
    if op == "add":
        return rng.randint(2, 49), rng.randint(2, 49)
    if op == "sub":
        a = rng.randint(10, 69)
        return a, rng.randint(2, a - 1)
    return rng.randint(2, 9), rng.randint(2, 9)  # mul: small factors


def _result(op: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b}[op]


# ------------------------------------------------------------------------- task families
# A key is a tuple of small ints and strings; render(key) → (question, answer).
def _draw_math(rng: random.Random) -> tuple:
    op = rng.choice(("add", "sub", "mul"))
    a, b = _operands(op, rng)
    return (op, a, b, rng.randrange(len(EN_NAMES)), rng.randrange(len(EN_OBJECTS)), rng.randrange(3),
            rng.choice(("digits", "words")))


def _render_math(key: tuple) -> tuple[str, str]:
    op, a, b, who, obj, tpl, style = key
    name, pron = EN_NAMES[who]
    num = str if style == "digits" else english_number
    fill = dict(n=name, P=pron, p="him" if pron == "He" else "her", a=num(a), b=num(b), o=EN_OBJECTS[obj])
    return (EN_STORY[op][tpl] + " " + EN_ASK[op]).format(**fill), str(_result(op, a, b))


def _fr_fill(op, a, b, who, obj) -> dict:
    name, pron = FR_NAMES[who]
    return dict(n=name, p=pron, P=pron.capitalize(), a=french_number(a), b=french_number(b), o=FR_OBJECTS[obj])


def _draw_math_fr(rng: random.Random) -> tuple:
    op = rng.choice(("add", "sub", "mul"))
    a, b = _operands(op, rng)
    return (op, a, b, rng.randrange(len(FR_NAMES)), rng.randrange(len(FR_OBJECTS)), rng.randrange(3))


def _render_math_fr(key: tuple) -> tuple[str, str]:
    op, a, b, who, obj, tpl = key
    fill = _fr_fill(op, a, b, who, obj)
    return (FR_STORY[op][tpl] + " " + FR_ASK_RESULT[op]).format(**fill), str(_result(op, a, b))


def _draw_french(rng: random.Random) -> tuple:
    if rng.random() < 0.3:
        return ("spell", rng.randint(2, 99), rng.randrange(len(FR_SPELL)))
    op = rng.choice(("add", "sub", "mul"))
    a, b = _operands(op, rng)
    return ("story", op, a, b, rng.randrange(len(FR_NAMES)), rng.randrange(len(FR_OBJECTS)), rng.randrange(3),
            rng.randrange(2))


def _render_french(key: tuple) -> tuple[str, str]:
    if key[0] == "spell":
        _, n, tpl = key
        return FR_SPELL[tpl].format(w=french_number(n)), str(n)
    _, op, a, b, who, obj, tpl, which = key
    fill = _fr_fill(op, a, b, who, obj)
    ask, operand = FR_ASK_STATED[op][which]
    return (FR_STORY[op][tpl] + " " + ask).format(**fill), str(a if operand == "a" else b)


# task → (draw, render, about). The arithmetic facts (op, a, b) of the cross-skill task are
# not held out from the English task (with factors 2..9 there are only 64 products): the cross
# task tests reading the operands in French and applying a known skill, not new facts.
FAMILIES: dict[str, tuple[Callable, Callable, str]] = {
    "smol_math": (_draw_math, _render_math, "arithmetic word problems in English (the math expert's task)"),
    "smol_french": (_draw_french, _render_french, "reading French: a quantity stated in a French story, or a "
                    "French number in digits (the French expert's task)"),
    "smol_math_fr": (_draw_math_fr, _render_math_fr, "cross-skill: the arithmetic word problems posed in French, "
                     "numbers in French words, answered with the result"),
}
EVAL_TASKS = tuple(FAMILIES)


def _check(task: str) -> None:
    if task not in FAMILIES:
        raise ConfigError(f"unknown smollm2 task {task!r}; tasks: {', '.join(FAMILIES)}")


@lru_cache(maxsize=None)
def heldout_keys(task: str) -> dict[str, tuple[tuple, ...]]:
    """The task's held-out keys by split: distinct, disjoint across splits, fixed by a seed."""
    _check(task)
    draw = FAMILIES[task][0]
    rng = random.Random(f"evomerge-smollm2-heldout-{task}")
    seen: dict[tuple, None] = {}
    while len(seen) < sum(SPLITS.values()):
        seen.setdefault(draw(rng), None)
    keys, out, start = list(seen), {}, 0
    for split, n in SPLITS.items():
        out[split] = tuple(keys[start:start + n])
        start += n
    return out


@lru_cache(maxsize=None)
def _heldout(task: str) -> frozenset:
    return frozenset(k for keys in heldout_keys(task).values() for k in keys)


def eval_docs(task: str, split: str) -> list[dict]:
    """One task's documents on one split: ``{"id", "prompt", "answer"}``."""
    _check(task)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    render = FAMILIES[task][1]
    docs = []
    for i, key in enumerate(heldout_keys(task)[split]):
        question, answer = render(key)
        docs.append({"id": i, "prompt": PROMPT.format(question=question), "answer": answer})
    return docs


def training_items(task: str, rng: random.Random) -> Iterator[tuple[str, str]]:
    """Endless (prompt, answer) pairs of ``task``, its held-out keys excluded."""
    _check(task)
    draw, render, _ = FAMILIES[task]
    excluded = _heldout(task)
    while True:
        key = draw(rng)
        if key in excluded:
            continue
        question, answer = render(key)
        yield PROMPT.format(question=question), answer


def write_eval_data(out_dir: str | Path) -> list[Path]:
    """``<out_dir>/<task>/<split>.jsonl`` for every task (deterministic bytes)."""
    from evomerge.io import atomic_write_text

    written = []
    for task in FAMILIES:
        for split in SPLITS:
            path = Path(out_dir) / task / f"{split}.jsonl"
            atomic_write_text(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in eval_docs(task, split)))
            written.append(path)
    return written
