"""User text in generated markdown (model cards): code spans and fences nothing can break out of."""

from __future__ import annotations

import re


def _longest_backtick_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"`+", text)), default=0)


def md_code(text: object) -> str:
    """User text as one markdown code span: nothing in it is markup (backticks, HTML, links),
    newlines become spaces."""
    s = " ".join(str(text).splitlines())
    ticks = "`" * (_longest_backtick_run(s) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or not s.strip() else ""
    return f"{ticks}{pad}{s}{pad}{ticks}"


def md_fence(text: str, lang: str = "") -> list[str]:
    """``text`` as a fenced code block whose fence no line of ``text`` can close."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return [fence + lang, text.rstrip(), fence]


def md_cell(text: object) -> str:
    """User text for a markdown table cell or prose: one line; emphasis, code, links, HTML and
    cell separators escaped."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", " ".join(str(text).splitlines()))
