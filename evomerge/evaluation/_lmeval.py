"""Import lm-eval offline, quietly, and with template compilation cached.

Importing this module (and nothing earlier in evomerge) pulls in lm-eval, ``datasets`` and
``huggingface_hub``; it first sets ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` and a local
``HF_HOME`` so that no network access is ever attempted, and flips the libraries' own offline
flags in case they were imported before us.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from pathlib import Path


from evomerge.paths import cache_root as cache_dir  # noqa: E402  (re-exported for callers)


def datasets_cache_dir() -> Path:
    return cache_dir() / "datasets"


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(cache_dir() / "hf"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import datasets.config  # noqa: E402
import huggingface_hub.constants  # noqa: E402
import lm_eval.api.model  # noqa: E402
import lm_eval.api.task  # noqa: E402
import lm_eval.models.huggingface  # noqa: E402
import lm_eval.utils  # noqa: E402

datasets.config.HF_DATASETS_OFFLINE = True
huggingface_hub.constants.HF_HUB_OFFLINE = True


def _cache_template_compilation() -> None:
    """lm-eval compiles every Jinja template anew for every document (``env.from_string``):
    ~0.5 ms per call, most of its per-document cost. Compiling is a pure function of the
    template text, so memoise it; rendering is unchanged."""
    if getattr(lm_eval.utils.apply_template, "_evomerge_cached", False):
        return
    compile_template = functools.lru_cache(maxsize=4096)(lm_eval.utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compile_template(template).render(**doc)

    apply_template._evomerge_cached = True  # type: ignore[attr-defined]
    lm_eval.utils.apply_template = apply_template


_cache_template_compilation()

_QUIET_LOGGERS = ("lm_eval", "datasets", "transformers.generation")
# lm-eval modules that draw progress bars with a module-level `tqdm` on every call.
_BAR_MODULES = (lm_eval.api.task, lm_eval.api.model, lm_eval.models.huggingface)


def _silenced(bar):
    def tqdm(*args, **kwargs):  # callers pass disable=False explicitly: override it
        return bar(*args, **{**kwargs, "disable": True})

    return tqdm


@contextmanager
def quiet():
    """Silence lm-eval's per-call INFO/WARNING chatter and progress bars for the block."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, _QUIET_LOGGERS)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    bars = [(m, m.tqdm) for m in _BAR_MODULES]
    for m, bar in bars:
        m.tqdm = _silenced(bar)
    try:
        yield
    finally:
        for m, bar in bars:
            m.tqdm = bar
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()
        for lg, level in saved:
            lg.setLevel(level)
