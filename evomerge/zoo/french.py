"""Word problems in English and French, built from templates and word lists written here.

Three evaluated tasks for the real-model preset (``smollm2``):

* ``smol_math`` — arithmetic word problems in English: a quantity of two digits changed by a
  small amount (``a ± b``, a in 10..89, b in 2..4), operands written in digits or in English
  words, answered with the result in digits. The math expert's task.
* ``smol_french`` — translating the French word problems into English (numbers in words on both
  sides), answered with the English text. The French expert's task: it reads French, it never
  computes.
* ``smol_math_fr`` — the cross-skill task: the word problems posed in French with the operands
  spelled in French words ("trente-quatre", "trois"), answered with the result in digits.
  Reading French is required to get the operands and the operation, arithmetic to get the
  answer; neither expert is trained on it.

Why the arithmetic is small: SmolLM2-135M-Instruct cannot add at all in this format (measured:
0 % on one-digit sums as ``Q: What is 7 + 7?``, 18 % as ``7 + 7 =``), and a LoRA expert trained
60–150 steps on two-digit sums and products stayed at 2–18 % on its own task, so it could not
lend a skill to a merge. ``a ± b`` with b ≤ 4 is learned to ~90 % in 100 steps and still cannot be
guessed: the answer is never a number stated in the question, add and subtract are equally likely
and no answer value covers 5 % of the items.

An item is drawn from a *key* (operation, operands, name, object, template, ...); held-out keys
are fixed per task (the first distinct draws of a seeded stream, split into
search / validation / test) and training streams reject the held-out keys of every task drawn
from the same key space (the French expert never translates a cross-task test question).
Everything is deterministic: ``random.Random`` seeded by strings.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
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
# The English and French lists are aligned (same operation, template and object index).
EN_STORY = {
    "add": ["{n} has {a} {o}. {P} buys {b} more {o}.", "{n} has {a} {o}. {P} finds {b} more {o}.",
            "{n} has {a} {o}. A friend gives {p} {b} more {o}."],
    "sub": ["{n} has {a} {o}. {P} gives {b} {o} to a friend.", "{n} has {a} {o}. {P} loses {b} {o}.",
            "{n} has {a} {o}. {P} sells {b} {o}."],
}
EN_ASK = "How many {o} does {n} have now?"
FR_STORY = {
    "add": ["{n} a {a} {o}. {P} achète {b} autres {o}.", "{n} a {a} {o}. {P} trouve {b} autres {o}.",
            "{n} a {a} {o}. Un ami lui donne {b} autres {o}."],
    "sub": ["{n} a {a} {o}. {P} donne {b} {o} à un ami.", "{n} a {a} {o}. {P} perd {b} {o}.",
            "{n} a {a} {o}. {P} vend {b} {o}."],
}
FR_ASK = "Combien de {o} {n} a-t-{p} maintenant ?"
TRANSLATE = "Traduis en anglais : {text}"
OPERATIONS = ("add", "sub")


def _operands(rng: random.Random) -> tuple[int, int]:
    """A two-digit quantity and a small change (plural, so every template reads grammatically):
    a ± b stays within 6..93 (French words cover 0..99)."""
    return rng.randint(10, 89), rng.randint(2, 4)


def _result(op: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b}[op]


# ------------------------------------------------------------------------- task families
# A key is a tuple of small ints and strings; render(key) → (question, answer).
def _draw_math(rng: random.Random) -> tuple:
    op = rng.choice(OPERATIONS)
    a, b = _operands(rng)
    return (op, a, b, rng.randrange(len(EN_NAMES)), rng.randrange(len(EN_OBJECTS)), rng.randrange(3),
            rng.choice(("digits", "words")))


def _english_story(op: str, a: str, b: str, name: str, he: bool, obj: int, tpl: int) -> str:
    fill = dict(n=name, P="He" if he else "She", p="him" if he else "her", a=a, b=b, o=EN_OBJECTS[obj])
    return (EN_STORY[op][tpl] + " " + EN_ASK).format(**fill)


def _render_math(key: tuple) -> tuple[str, str]:
    op, a, b, who, obj, tpl, style = key
    name, pron = EN_NAMES[who]
    num = str if style == "digits" else english_number
    return _english_story(op, num(a), num(b), name, pron == "He", obj, tpl), str(_result(op, a, b))


def _draw_fr_problem(rng: random.Random) -> tuple:
    op = rng.choice(OPERATIONS)
    a, b = _operands(rng)
    return (op, a, b, rng.randrange(len(FR_NAMES)), rng.randrange(len(FR_OBJECTS)), rng.randrange(3))


def _french_story(key: tuple) -> str:
    op, a, b, who, obj, tpl = key
    name, pron = FR_NAMES[who]
    fill = dict(n=name, p=pron, P=pron.capitalize(), a=french_number(a), b=french_number(b), o=FR_OBJECTS[obj])
    return (FR_STORY[op][tpl] + " " + FR_ASK).format(**fill)


def _render_math_fr(key: tuple) -> tuple[str, str]:
    op, a, b = key[:3]
    return _french_story(key), str(_result(op, a, b))


def _render_french(key: tuple) -> tuple[str, str]:
    op, a, b, who, obj, tpl = key
    name, pron = FR_NAMES[who]
    english = _english_story(op, english_number(a), english_number(b), name, pron == "il", obj, tpl)
    return TRANSLATE.format(text=_french_story(key)), english


@dataclass(frozen=True)
class Family:
    draw: Callable[[random.Random], tuple]
    render: Callable[[tuple], tuple[str, str]]
    about: str
    space: str  # tasks of one key space never train on each other's held-out keys


# The arithmetic facts (op, a, b) of the cross-skill task are not held out from the English
# task (there are only 480 of them): the cross task tests reading the problem in French and
# applying a known skill, not new facts. Its *questions* are held out from the French expert.
FAMILIES: dict[str, Family] = {
    "smol_math": Family(_draw_math, _render_math, "arithmetic word problems in English, answered with the "
                        "result (the math expert's task)", "en_problem"),
    "smol_french": Family(_draw_fr_problem, _render_french, "the French word problems translated into English, "
                          "numbers in words (the French expert's task)", "fr_problem"),
    "smol_math_fr": Family(_draw_fr_problem, _render_math_fr, "cross-skill: the arithmetic word problems posed "
                           "in French, numbers in French words, answered with the result", "fr_problem"),
}
EVAL_TASKS = tuple(FAMILIES)


def _check(task: str) -> None:
    if task not in FAMILIES:
        raise ConfigError(f"unknown smollm2 task {task!r}; tasks: {', '.join(FAMILIES)}")


@lru_cache(maxsize=None)
def heldout_keys(task: str) -> dict[str, tuple[tuple, ...]]:
    """The task's held-out keys by split: distinct, disjoint across splits, fixed by a seed."""
    _check(task)
    draw = FAMILIES[task].draw
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
    """Held-out keys of every task in ``task``'s key space."""
    space = FAMILIES[task].space
    return frozenset(k for t, f in FAMILIES.items() if f.space == space
                     for keys in heldout_keys(t).values() for k in keys)


def eval_docs(task: str, split: str) -> list[dict]:
    """One task's documents on one split: ``{"id", "prompt", "answer"}``."""
    _check(task)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    render = FAMILIES[task].render
    docs = []
    for i, key in enumerate(heldout_keys(task)[split]):
        question, answer = render(key)
        docs.append({"id": i, "prompt": PROMPT.format(question=question), "answer": answer})
    return docs


def training_items(task: str, rng: random.Random) -> Iterator[tuple[str, str]]:
    """Endless (prompt, answer) pairs of ``task``, its held-out keys excluded."""
    _check(task)
    draw, render = FAMILIES[task].draw, FAMILIES[task].render
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
