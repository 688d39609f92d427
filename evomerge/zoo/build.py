"""Build a zoo (base + experts) as Hugging Face model directories, cached by the preset's hash.

Layout of a zoo directory (written atomically; ``zoo.json`` marks it complete)::

    <root>/zoo.json        what was built: preset, family, digest, experts and their tasks
    <root>/base/           config.json, model.safetensors, tokenizer files, README.md
    <root>/<expert>/       same, one per expert

The base trains in this process; experts train in up to ``workers`` processes (each on one
thread, so results do not depend on the worker count). A file lock makes a concurrent second
build of the same zoo wait and then reuse the first one's result.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue as queue_mod
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from evomerge.errors import EvomergeError
from evomerge.io import atomic_directory, atomic_write_text
from evomerge.paths import cache_root
from evomerge.zoo.presets import PRETRAINED_PRESET_NAMES, Preset, get_preset, replay_mixture
from evomerge.zoo.train import FAMILIES

#: pretrained preset name → its builder; the module that builds them registers here on import
#: (``evomerge.zoo`` imports :mod:`evomerge.zoo.smollm2`), so nothing here imports it.
PRETRAINED_BUILDERS: dict[str, Callable[..., "ZooInfo"]] = {}

Progress = Callable[[str, int, int], None]  # (stage, done, total)
_PROGRESS_EVERY = 10  # steps between progress reports


@dataclass
class ZooInfo:
    """Where a built zoo lives and what each model is for."""

    root: Path
    preset: str
    family: str
    digest: str
    base: Path
    experts: dict[str, Path]
    expert_tasks: dict[str, list[str]]  # expert name → the evaluated tasks it is expert on
    cross_tasks: list[str]  # tasks that need more than one expert's skill
    tasks: list[str]  # every evaluated task of this zoo
    seconds: float  # wall time of the build that made it (also when loaded from the cache)
    cached: bool = False

    @property
    def models(self) -> dict[str, Path]:
        return {"base": self.base, **self.experts}

    def to_json(self) -> str:
        d = asdict(self)
        d["root"] = str(self.root)
        d["base"] = self.base.name
        d["experts"] = {k: v.name for k, v in self.experts.items()}
        d.pop("cached")
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, root: Path) -> "ZooInfo":
        d = json.loads((root / "zoo.json").read_text())
        d["root"] = root
        d["base"] = root / d["base"]
        d["experts"] = {k: root / v for k, v in d["experts"].items()}
        return cls(**d, cached=True)


def default_cache_root() -> Path:
    """Built zoos live under :func:`evomerge.paths.cache_root` ``/zoo``."""
    return cache_root() / "zoo"


def zoo_dir(preset: Preset, family: str, out: str | Path | None = None) -> Path:
    if out is not None:
        return Path(out).expanduser()
    return default_cache_root() / f"{preset.name}-{family}-{preset.digest(family)}"


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(root: Path, digest: str) -> ZooInfo | None:
    marker = root / "zoo.json"
    if not marker.is_file():
        return None
    info = ZooInfo.load(root)
    return info if info.digest == digest else None


def build_zoo(
    preset: str | Preset = "demo",
    out: str | Path | None = None,
    family: str = "llama",
    *,
    workers: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ZooInfo:
    """Build (or reuse) a zoo. Returns at once when the same preset and family are already built."""
    if isinstance(preset, str) and preset in PRETRAINED_PRESET_NAMES:  # a real base from PyPI (zoo/smollm2.py)
        build_pretrained = PRETRAINED_BUILDERS[preset]
        if family != "llama":
            raise EvomergeError(f"zoo preset {preset!r} is a pretrained llama model; --family {family} does not apply")
        return build_pretrained(preset, out, workers=workers, force=force, progress=progress)
    p = get_preset(preset) if isinstance(preset, str) else preset
    if family not in FAMILIES:
        raise EvomergeError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    digest = p.digest(family)
    root = zoo_dir(p, family, out)
    if not force and (hit := _cached(root, digest)) is not None:
        return hit
    with _locked(root):
        if not force and (hit := _cached(root, digest)) is not None:
            return hit
        if root.exists() and any(root.iterdir()) and not (root / "zoo.json").is_file() and not force:
            raise EvomergeError(f"{root}: exists, is not empty and is not a zoo; choose another --out or pass --force")
        if (root / "zoo.json").is_file() and not force:
            raise EvomergeError(
                f"{root}: holds a different zoo ({ZooInfo.load(root).preset}); choose another --out or pass --force"
            )
        t0 = time.perf_counter()
        with atomic_directory(root, overwrite=True) as tmp, _quiet_transformers():
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a zoo is meant to be shared
            _build_into(tmp, p, family, workers, progress)
            info = ZooInfo(
                root=root,
                preset=p.name,
                family=family,
                digest=digest,
                base=root / "base",
                experts={e.name: root / e.name for e in p.experts},
                expert_tasks={e.name: list(e.tasks) for e in p.experts},
                cross_tasks=list(p.cross_tasks),
                tasks=p.tasks,
                seconds=round(time.perf_counter() - t0, 1),
            )
            atomic_write_text(tmp / "zoo.json", info.to_json())
            os.chmod(tmp / "zoo.json", 0o644)
        return info


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-file "Loading weights" / "Writing shards" bars while our own progress runs."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _build_into(tmp: Path, p: Preset, family: str, workers: int | None, progress: Progress | None) -> None:
    from evomerge.zoo.train import make_model, one_thread, train

    report = progress or (lambda *_: None)
    with one_thread():
        base = make_model(family, p.arch, p.seed)
        report("base", 0, p.base_steps)
        train(base, list(p.base_mixture), steps=p.base_steps, lr=p.base_lr, batch_size=p.batch_size, seed=p.seed,
              on_step=lambda s, _l: (s + 1) % _PROGRESS_EVERY == 0 and report("base", s + 1, p.base_steps))
        _save(base, tmp / "base", _card(p, family, "base", "the shared base model", p.base_mixture))
    jobs = [(str(tmp / "base"), str(tmp / e.name), p.to_dict(), i, family) for i, e in enumerate(p.experts)]
    jobs.sort(key=lambda j: -(p.experts[j[3]].steps or p.expert_steps))  # longest first: balances workers
    n = max(1, min(workers or (os.cpu_count() or 1), len(jobs)))
    if n == 1:
        for job in jobs:
            _train_expert(*job, report=report)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
        futures = [pool.submit(_train_expert, *job) for job in jobs]
        while not all(f.done() for f in futures):
            try:
                report(*q.get(timeout=0.2))
            except queue_mod.Empty:
                pass
        for f in futures:
            f.result()  # re-raise a worker's error
        while True:
            try:
                report(*q.get_nowait())
            except queue_mod.Empty:
                break


_worker_queue = None


def _init_worker(q) -> None:
    global _worker_queue
    _worker_queue = q


def _train_expert(base_dir: str, out_dir: str, preset: dict, index: int, family: str, report: Progress | None = None) -> None:
    """Fine-tune expert ``index`` of ``preset`` from the saved base (runs in a worker process)."""
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.train import one_thread, train

    spec = preset["experts"][index]
    name, steps = spec["name"], spec["steps"] or preset["expert_steps"]
    if report is None:
        report = (lambda *a: _worker_queue.put(a)) if _worker_queue is not None else (lambda *_: None)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with one_thread():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        mix = replay_mixture(tuple(map(tuple, spec["mixture"])), tuple(map(tuple, preset["base_mixture"])), preset["replay"])
        report(name, 0, steps)
        train(model, mix, steps=steps, lr=preset["expert_lr"], batch_size=preset["batch_size"],
              seed=preset["seed"] + 1000 * (index + 1), warmup=min(20, steps // 4),
              on_step=lambda s, _l: (s + 1) % _PROGRESS_EVERY == 0 and report(name, s + 1, steps))
    _save(model, Path(out_dir), _card_from_dict(preset, family, name, spec["about"], spec["mixture"]))


def _save(model, out: Path, card: str) -> None:
    from evomerge.zoo.tokenizer import save_tokenizer

    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(out)
    atomic_write_text(out / "README.md", card)
    for f in out.iterdir():
        os.chmod(f, 0o644)


def _card(p: Preset, family: str, name: str, about: str, mixture) -> str:
    return _card_from_dict(p.to_dict(), family, name, about, mixture)


def _card_from_dict(p: dict, family: str, name: str, about: str, mixture) -> str:
    lines = [
        f"# evomerge zoo · {p['name']} · {name}",
        "",
        f"{about}. A {family} model built locally by `evomerge zoo build --preset {p['name']}` "
        f"(arch {p['arch']}), character-level tokenizer.",
        "",
        "Training mixture (task: weight):",
        *(f"- `{t}`: {w:g}" for t, w in mixture),
    ]
    if name != "base":
        lines.append(f"- plus a {p['replay']:.0%} replay of the base curriculum")
    return "\n".join(lines) + "\n"
