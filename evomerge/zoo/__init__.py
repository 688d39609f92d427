"""The expert zoo: a tiny base language model and experts fine-tuned from it, built locally.

``build_zoo(preset, out=None, family="llama") -> ZooInfo`` trains (or reuses from the cache)
a base and its experts as Hugging Face model directories; ``evals/`` holds the lm-eval tasks
that score them. See ``docs/zoo.md`` and ``evals/README.md``.
"""

from evomerge.zoo.build import ZooInfo, build_zoo, default_cache_root, zoo_dir
from evomerge.zoo import smollm2  # noqa: E402,F401  (registers the pretrained presets' builder)
from evomerge.zoo.presets import PRESETS, ExpertSpec, Preset, get_preset
from evomerge.zoo.tasks import EVAL_TASKS, SPLIT_SIZES, eval_docs
from evomerge.zoo.tokenizer import build_tokenizer

__all__ = [
    "EVAL_TASKS", "PRESETS", "SPLIT_SIZES", "ExpertSpec", "Preset", "ZooInfo", "build_tokenizer", "build_zoo",
    "default_cache_root", "eval_docs", "get_preset", "zoo_dir",
]
