"""The ``smollm2`` zoo: a real pretrained base (SmolLM2-135M-Instruct) and LoRA experts trained on CPU.

``build_pretrained("smollm2")`` fetches and dequantizes the base (:mod:`evomerge.zoo.gguf`),
then fine-tunes one LoRA expert per skill on data generated here (:mod:`evomerge.zoo.french`):

* ``math``   — arithmetic word problems in English (``smol_math``)
* ``french`` — translating the French word problems into English (``smol_french``): it reads
  French and never computes

The cross-skill task ``smol_math_fr`` (the word problems in French, numbers in French words)
is trained by nobody. Layout (written atomically, ``zoo.json`` last)::

    <root>/zoo.json                  ZooInfo (as every zoo)
    <root>/base/                     dequantized SmolLM2 (safetensors, tokenizer, chat template)
    <root>/<expert>/                 base + its LoRA delta, a full model directory
    <root>/adapters/<expert>/        the PEFT LoRA adapter itself (adapter_config.json + safetensors)
    <root>/build.json                per-expert training losses and seconds

Experts train in parallel processes, each on ``threads`` threads (default 1), so the result
depends on the seed and thread count only. Cached by the hash of the preset (which pins the
GGUF's sha256); a file lock makes a concurrent build wait and reuse.

``assemble_pretrained(preset, source)`` makes the same zoo (same layout, preset and digest)
without training, from a built zoo's ``build.json`` and ``adapters/``: the experts are merged
from the adapters as the build merges them (scripts/gpu_check.sh carries them to a GPU machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from evomerge.errors import ConfigError, EvomergeError
from evomerge.io import atomic_directory, atomic_write_text
from evomerge.zoo.build import PRETRAINED_BUILDERS, Progress, ZooInfo, _cached, _locked, _quiet_transformers, default_cache_root
from evomerge.zoo.finetune import LoraSpec
from evomerge.zoo.gguf import SMOLLM2, dequantize, fetch_gguf

FORMAT = 2  # bump when training code or data generation changes what a preset produces


@dataclass(frozen=True)
class LoraExpert:
    name: str
    task: str  # the smollm2 task it trains on and is evaluated on
    steps: int
    about: str = ""


@dataclass(frozen=True)
class PretrainedPreset:
    name: str
    experts: tuple[LoraExpert, ...]
    batch_size: int = 8
    lr: float = 1e-3
    lora: LoraSpec = LoraSpec()
    seed: int = 0
    threads: int = 1
    cross_tasks: tuple[str, ...] = ("smol_math_fr",)
    about: str = ""
    source: dict = field(default_factory=lambda: asdict(SMOLLM2))

    def digest(self) -> str:
        blob = json.dumps({"preset": asdict(self), "format": FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def tasks(self) -> list[str]:
        return [*(e.task for e in self.experts), *self.cross_tasks]


_MATH = "arithmetic word problems in English (a ± b, a in 10..89, b in 2..4; digits or English words)"
_FRENCH = "translating the French word problems into English (numbers in words; no arithmetic)"
PRETRAINED_PRESETS: dict[str, PretrainedPreset] = {
    "smollm2": PretrainedPreset(
        name="smollm2",
        experts=(LoraExpert("math", "smol_math", 200, _MATH), LoraExpert("french", "smol_french", 200, _FRENCH)),
        about="SmolLM2-135M-Instruct (GGUF from PyPI, dequantized) + LoRA math and French experts",
    ),
    "smollm2-ci": PretrainedPreset(
        name="smollm2-ci",
        experts=(LoraExpert("math", "smol_math", 2, _MATH), LoraExpert("french", "smol_french", 2, _FRENCH)),
        batch_size=2,
        about="for tests: the real base, two LoRA steps per expert",
    ),
}


def get_pretrained(name: str) -> PretrainedPreset:
    try:
        return PRETRAINED_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown pretrained preset {name!r}; choose one of {', '.join(PRETRAINED_PRESETS)}") from None


def pretrained_dir(p: PretrainedPreset, out: str | Path | None = None) -> Path:
    return Path(out).expanduser() if out is not None else default_cache_root() / f"{p.name}-{p.digest()}"


def base_dir() -> Path:
    """The dequantized base, shared by every pretrained preset (built once, cached)."""
    from evomerge.paths import cache_root

    root = cache_root() / "base" / f"smollm2-135m-instruct-{SMOLLM2.gguf_sha256[:12]}"
    if (root / "config.json").is_file():
        return root
    with _locked(root):
        if not (root / "config.json").is_file():
            with _quiet_transformers():
                dequantize(fetch_gguf(), root)
    return root


def build_pretrained(preset: str | PretrainedPreset, out: str | Path | None = None, *, workers: int | None = None,
                     force: bool = False, progress: Progress | None = None) -> ZooInfo:
    p = get_pretrained(preset) if isinstance(preset, str) else preset

    def train(tmp: Path) -> dict:
        jobs = [(str(tmp / "base"), str(tmp), asdict(p), i) for i in range(len(p.experts))]
        report = progress or (lambda *_: None)
        n = max(1, min(workers or (os.cpu_count() or 1), len(jobs)))
        logs = {}
        if n == 1:
            for e, job in zip(p.experts, jobs):
                logs.update(_train_expert(*job))
                report(e.name, e.steps, e.steps)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_train_expert, *job) for job in jobs]
                for e, fut in zip(p.experts, futures):
                    logs.update(fut.result())
                    report(e.name, e.steps, e.steps)
        return logs

    return _write_zoo(p, pretrained_dir(p, out), force, train)


def assemble_pretrained(preset: str | PretrainedPreset, source: str | Path, out: str | Path | None = None, *,
                        force: bool = False) -> ZooInfo:
    """The zoo :func:`build_pretrained` builds, made from its already trained LoRA adapters.

    ``source`` holds what training adds to the base: ``build.json`` (the build's record, whose
    preset must be this one) and ``adapters/<expert>/`` (adapter_config.json +
    adapter_model.safetensors) for every expert. Nothing is trained: each expert is the base plus
    its adapter merged by PEFT (``merge_and_unload``, as the build does after training), the
    adapters and build.json are copied as they are, and ``zoo.json`` names the same preset and
    digest, in the same place, as a build would. Used where training is out of reach but the
    adapters can be carried (scripts/gpu_check.sh: the GPU machine has no network and 64 MiB per
    transfer); ``zoo.json``'s ``seconds`` is then the assembly's.
    """
    p = get_pretrained(preset) if isinstance(preset, str) else preset
    source = Path(source).expanduser()
    record = _check_source(p, source)

    def merge(tmp: Path) -> dict:
        import shutil

        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tmp / "base"))
        lora = _lora_of(asdict(p))
        for e in p.experts:
            adapter = tmp / "adapters" / e.name
            shutil.copytree(source / "adapters" / e.name, adapter)
            model = AutoModelForCausalLM.from_pretrained(str(tmp / "base"), dtype=torch.float32)
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            _save_expert(merged, tok, tmp, asdict(p), asdict(e), lora)
            for f in adapter.iterdir():
                os.chmod(f, 0o644)
        return record["experts"]

    return _write_zoo(p, pretrained_dir(p, out), force, merge)


def _check_source(p: PretrainedPreset, source: Path) -> dict:
    """``source``'s build.json, once it is known to hold this preset's record and every adapter."""
    record_path = source / "build.json"
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        raise EvomergeError(f"{source}: no build.json (the record of the build that trained the adapters)") from None
    except (OSError, ValueError) as e:
        raise EvomergeError(f"{record_path}: unreadable ({e})") from None
    if not isinstance(record, dict) or record.get("preset") != json.loads(json.dumps(asdict(p))):
        raise EvomergeError(f"{record_path}: records another preset than {p.name!r} (digest {p.digest()}); "
                            "its adapters were trained differently")
    for e in p.experts:
        adapter = source / "adapters" / e.name
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (adapter / f).is_file()]
        if missing:
            raise EvomergeError(f"{adapter}: no {missing[0]} (expert {e.name!r} of preset {p.name!r})")
    return record


def _write_zoo(p: PretrainedPreset, root: Path, force: bool, experts: Callable[[Path], dict]) -> ZooInfo:
    """Write the zoo of ``p`` at ``root`` (atomically, under its lock, or reuse the cached one):
    the shared base, then ``experts(tmp)`` fills tmp/<expert> and tmp/adapters/<expert> and
    returns each expert's training log for build.json."""
    digest = p.digest()
    if not force and (hit := _cached(root, digest)) is not None:
        return hit
    base = base_dir()
    with _locked(root):
        if not force and (hit := _cached(root, digest)) is not None:
            return hit
        if root.exists() and any(root.iterdir()) and not (root / "zoo.json").is_file() and not force:
            raise EvomergeError(f"{root}: exists, is not empty and is not a zoo; choose another --out or pass --force")
        t0 = time.perf_counter()
        with atomic_directory(root, overwrite=True) as tmp, _quiet_transformers():
            os.chmod(tmp, 0o755)
            _copy_model(base, tmp / "base")
            logs = experts(tmp)
            info = ZooInfo(
                root=root, preset=p.name, family="llama", digest=digest, base=root / "base",
                experts={e.name: root / e.name for e in p.experts},
                expert_tasks={e.name: [e.task] for e in p.experts},
                cross_tasks=list(p.cross_tasks), tasks=p.tasks, seconds=round(time.perf_counter() - t0, 1),
            )
            atomic_write_text(tmp / "build.json", json.dumps({"preset": asdict(p), "experts": logs}, indent=1) + "\n")
            atomic_write_text(tmp / "zoo.json", info.to_json())
        return info


def _copy_model(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)
    for f in dst.iterdir():
        os.chmod(f, 0o644)


def _train_expert(base: str, root: str, preset: dict, index: int) -> dict:
    """Train expert ``index`` (in a worker process): save its adapter and its merged full model."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evomerge.zoo.finetune import lora_finetune
    from evomerge.zoo.french import training_items

    hf_logging.disable_progress_bar()
    spec = preset["experts"][index]
    torch.set_num_threads(preset["threads"])
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    seed = preset["seed"] + 1000 * (index + 1)
    stream = training_items(spec["task"], random.Random(f"evomerge-smollm2-train-{spec['task']}-{seed}"))
    losses: list[float] = []
    t0 = time.perf_counter()
    lora = _lora_of(preset)
    peft_model = lora_finetune(model, stream, tok, steps=spec["steps"], batch_size=preset["batch_size"],
                               lr=preset["lr"], seed=seed, lora=lora, warmup=min(10, spec["steps"] // 6 + 1),
                               on_step=lambda _s, loss: losses.append(round(loss, 4)))
    seconds = time.perf_counter() - t0
    adapter = Path(root) / "adapters" / spec["name"]
    peft_model.save_pretrained(str(adapter), safe_serialization=True)
    _relative_base(adapter)
    for f in adapter.iterdir():
        os.chmod(f, 0o644)
    _save_expert(peft_model.merge_and_unload(), tok, Path(root), preset, spec, lora)
    return {spec["name"]: {"steps": spec["steps"], "seconds": round(seconds, 1), "losses": losses}}


def _lora_of(preset: dict) -> LoraSpec:
    return LoraSpec(**{**preset["lora"], "targets": tuple(preset["lora"]["targets"])})


def _save_expert(merged, tok, root: Path, preset: dict, spec: dict, lora: LoraSpec) -> None:
    """Expert ``spec``'s full model (base + its LoRA delta, merged) as root/<expert>, with its card."""
    out = root / spec["name"]
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    atomic_write_text(out / "README.md", f"# evomerge zoo · {preset['name']} · {spec['name']}\n\n{spec['about']}.\n"
                      f"SmolLM2-135M-Instruct plus a LoRA adapter (rank {lora.rank}) trained {spec['steps']} steps "
                      f"× {preset['batch_size']} on `{spec['task']}`; the adapter is in `../adapters/{spec['name']}`.\n")
    for f in out.iterdir():
        os.chmod(f, 0o644)


def _relative_base(adapter: Path) -> None:
    """The adapter names its base as the zoo's ``base`` directory, relative to itself."""
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "../../base"
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


PRETRAINED_BUILDERS.update(dict.fromkeys(PRETRAINED_PRESETS, build_pretrained))
