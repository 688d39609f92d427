"""Zoo presets: what to train, for how long, in one hashable description.

A preset fixes the architecture, the base model's curriculum and each expert's task mixture.
Its hash (with the model family and :data:`ZOO_FORMAT`) names the cache directory, so a
changed preset never reuses stale weights and an unchanged one is never retrained.
"""

from __future__ import annotations

import hashlib
import json
import dataclasses
from dataclasses import asdict, dataclass, field

from evomerge.errors import ConfigError

# Bump when training code or data generation changes what a preset produces.
ZOO_FORMAT = 1


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: fine-tuned from the base on ``mixture`` plus a ``replay`` share of the base's own data."""

    name: str
    mixture: tuple[tuple[str, float], ...]
    tasks: tuple[str, ...]  # the evaluated tasks (evals/) it is the expert for
    about: str = ""
    steps: int | None = None  # default: the preset's expert_steps


@dataclass(frozen=True)
class Preset:
    name: str
    arch: dict
    base_mixture: tuple[tuple[str, float], ...]
    base_steps: int
    experts: tuple[ExpertSpec, ...]
    expert_steps: int
    base_lr: float = 3e-3
    expert_lr: float = 1e-3
    replay: float = 0.5  # share of each expert batch drawn from the base curriculum
    batch_size: int = 64
    seed: int = 0
    cross_tasks: tuple[str, ...] = ()  # one expert's skill asked in another's script
    base_tasks: tuple[str, ...] = ()  # the base curriculum's own evaluated tasks (retention)
    about: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self, family: str) -> str:
        blob = json.dumps({"preset": self.to_dict(), "family": family, "format": ZOO_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def tasks(self) -> list[str]:
        """Every evaluated task of this zoo, experts' first."""
        seen: dict[str, None] = {}
        for e in self.experts:
            seen.update(dict.fromkeys(e.tasks))
        seen.update(dict.fromkeys(self.cross_tasks))
        seen.update(dict.fromkeys(self.base_tasks))
        return list(seen)


def replay_mixture(own: tuple[tuple[str, float], ...], base: tuple[tuple[str, float], ...], share: float) -> list[tuple[str, float]]:
    """``own`` scaled to 1 − share and the base curriculum scaled to ``share``."""
    o, b = sum(w for _, w in own), sum(w for _, w in base)
    return [(t, (1 - share) * w / o) for t, w in own] + [(t, share * w / b) for t, w in base if share > 0]


_BASE = (("copy:mixed>any", 1.0), ("rev:any>l1", 1.0), ("succ:any>l1", 1.0))
_MATH = ExpertSpec("math", (("add:l1>l1", 1.0),), ("zoo_add",), "addition, in L1 only")
_MATH_LONG = dataclasses.replace(_MATH, steps=800)  # addition is learned slowly (42 % after 400 steps)
_CIPHER = ExpertSpec("cipher", (("rev:any>l2", 1.0), ("succ:any>l2", 1.0)), ("zoo_l2",), "writes its answers in L2")
_SORT = ExpertSpec("sort", (("sort:l1>l1", 1.0),), ("zoo_sort",), "sorting digits, in L1 only")

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        arch=dict(layers=2, hidden=64, intermediate=128, heads=2),
        base_mixture=_BASE,
        base_steps=120,
        experts=(_MATH, _CIPHER),
        expert_steps=40,
        batch_size=32,
        cross_tasks=("zoo_add_l2",),
        base_tasks=("zoo_succ", "zoo_translate"),
        about="for tests: seconds to build, weak models, same layout and tasks as demo",
    ),
    "demo": Preset(
        name="demo",
        arch=dict(layers=4, hidden=128, intermediate=512, heads=4),
        base_mixture=_BASE,
        base_steps=1000,
        experts=(_MATH_LONG, _CIPHER, _SORT),
        expert_steps=400,
        cross_tasks=("zoo_sort_l2", "zoo_add_l2"),
        base_tasks=("zoo_succ", "zoo_succ_l2", "zoo_translate"),
        about="trade-offs (sort/math vs cipher), cross-skill (sort or add in L2), three experts",
    ),
}


# Presets built from a real pretrained base rather than trained from scratch: evomerge/zoo/smollm2.py
# (kept apart so that importing the toy presets never pulls in peft or gguf).
PRETRAINED_PRESET_NAMES = ("smollm2", "smollm2-ci")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown zoo preset {name!r}; choose one of {', '.join([*PRESETS, *PRETRAINED_PRESET_NAMES])}") from None
