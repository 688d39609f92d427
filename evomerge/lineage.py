"""Lineage of model-archive members (M2N2 on weights): identity, weights, ancestry, export.

What report, export and the CLI need about the children of a ``space: model_archive`` search
(the search kind itself is :mod:`evomerge.search.archive`). A child is
:func:`~evomerge.optimizers.m2n2.split_slerp_parts` over two members' float tensors in the
reference model's tensor order (one ω over the whole vector, the split over the total element
count, ratio ``w``), plus optional N(0, σ²) mutation drawn from a CPU generator seeded per child
(device-independent noise).

A child has no merge recipe. Its identity is its :class:`Lineage` — the parents' hashes, split,
w, σ and seed — stored as the trial's ``recipe`` (canonical JSON) and hashed like a recipe, so
everything the loop guarantees (commit before tell, one evaluation per candidate, deterministic
resume) holds unchanged.

Weights: a child is a pure function of its parents' weights, so every trial can be recomputed
from the lineage of stored members down to the parents (:class:`ArchiveWeights`). Files are the
fast path: ``RUN_DIR/archive/<hash>.safetensors`` (atomic rename); anything missing is
recomputed, bit for bit on the same device and thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import EvomergeError
from evomerge.optimizers.m2n2 import split_slerp_parts
from evomerge.outputs import public_mode

ARCHIVE_DIR = "archive"
LINEAGE_KEY = "model_archive"


# ---------------------------------------------------------------------- lineage
@dataclass(frozen=True)
class Lineage:
    """How a child's weights are made: ``split_slerp(parents[0], parents[1], split, w)`` (+ mutation)."""

    parents: tuple[str, str]  # member hashes (a recipe hash for an initial member)
    split: int
    w: float
    mutation: float = 0.0  # σ in weight units; 0 = none
    seed: int = 0  # seed of the mutation noise

    def to_dict(self) -> dict:
        return {LINEAGE_KEY: {"parents": list(self.parents), "split": int(self.split), "w": float(self.w),
                              "mutation": float(self.mutation), "seed": int(self.seed)}}

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def hash(self) -> str:
        """Same scheme as :meth:`Recipe.hash`: the content identifies the candidate."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "Lineage":
        x = d[LINEAGE_KEY]
        return cls(parents=tuple(x["parents"]), split=int(x["split"]), w=float(x["w"]),
                   mutation=float(x.get("mutation", 0.0)), seed=int(x.get("seed", 0)))


def is_lineage(recipe: Any) -> bool:
    """Whether a stored recipe (JSON text or parsed dict) is a model-archive lineage."""
    if isinstance(recipe, str):
        try:
            recipe = json.loads(recipe)
        except ValueError:
            return False
    return isinstance(recipe, dict) and set(recipe) == {LINEAGE_KEY}


def parse_lineage(recipe: Any) -> Lineage | None:
    if not is_lineage(recipe):
        return None
    return Lineage.from_dict(json.loads(recipe) if isinstance(recipe, str) else recipe)


def recipe_yaml(recipe_json: str) -> str:
    """YAML of a stored recipe or lineage (what ``evomerge runs show`` prints)."""
    import yaml

    from evomerge.recipe import Recipe

    if is_lineage(recipe_json):
        return yaml.safe_dump(json.loads(recipe_json), sort_keys=False)
    return Recipe.model_validate_json(recipe_json).to_yaml()


# ---------------------------------------------------------------------- weights
def float_names(model_dir) -> list[str]:
    """The crossed tensors: the reference model's floating tensors in its tensor order."""
    return [n for n in model_dir.tensor_names if model_dir.dtype(n).is_floating_point]


def crossover(a: list, b: list, lin: Lineage) -> list:
    """A child's tensors from its parents' (float32 lists on one device); inputs are not modified."""
    import torch

    child = split_slerp_parts(a, b, lin.split, lin.w)
    if lin.mutation > 0:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(lin.seed))
        for t in child:
            t.add_(torch.randn(tuple(t.shape), generator=gen, dtype=torch.float32).to(t.device), alpha=lin.mutation)
    return child


class ArchiveWeights:
    """Weights of any archive member by hash: parents from ``source``, else memory, else the run
    directory's file, else recomputed from the lineage (``lineage_of``), parents first."""

    def __init__(self, run_dir: str | Path, names: list[str], sources: dict[str, str],
                 source: Callable[[str, str], Any], lineage_of: Callable[[str], Lineage | None],
                 device: Any = "cpu", cache: int = 8):
        self.dir = Path(run_dir) / ARCHIVE_DIR
        self.names, self.sources, self.source = names, sources, source
        self.lineage_of, self.device, self.cache_size = lineage_of, device, max(3, int(cache))
        self._cache: OrderedDict[str, list] = OrderedDict()

    def path(self, h: str) -> Path:
        return self.dir / f"{h}.safetensors"

    def _lookup(self, h: str, memo: dict | None = None) -> list | None:
        if h in self.sources:
            return [self.source(self.sources[h], n).float() for n in self.names]
        if memo is not None and h in memo:
            return memo[h]
        if h in self._cache:
            self._cache.move_to_end(h)
            return self._cache[h]
        if self.path(h).is_file():
            from safetensors.torch import load_file

            data = load_file(str(self.path(h)), device=str(self.device))
            return self._remember(h, [data[n] for n in self.names])
        return None

    def _remember(self, h: str, tensors: list) -> list:
        self._cache[h] = tensors
        self._cache.move_to_end(h)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tensors

    def get(self, h: str, lineage: Lineage | None = None, save: bool = False) -> list:
        """The member's float32 tensors (shared: do not modify). ``save`` writes a computed child's file."""
        hit = self._lookup(h)
        if hit is not None:
            return hit
        memo: dict[str, list] = {}
        todo: list[tuple[str, bool]] = [(h, False)]
        while todo:  # post-order walk over the missing ancestors (no recursion limit)
            x, ready = todo.pop()
            if self._lookup(x, memo) is not None:
                continue
            lin = lineage if x == h and lineage is not None else self.lineage_of(x)
            if lin is None:
                raise EvomergeError(f"archive member {x}: no weights file and no lineage in the run store")
            if ready:
                a, b = (self._lookup(p, memo) for p in lin.parents)
                memo[x] = crossover(a, b, lin)
            else:
                todo.append((x, True))
                todo.extend((p, False) for p in lin.parents)
        out = memo[h]
        if save:
            self.save(h, out)
        return self._remember(h, out)

    def save(self, h: str, tensors: list) -> None:
        """Atomic write of a member's file (a reader or a kill -9 never leaves half a file). Its
        mode follows the umask like every other file of the run directory (``mkstemp`` makes 0600;
        nothing in a member's weights is more private than the run store beside it)."""
        from safetensors.torch import save_file

        final = self.path(h)
        if final.is_file():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{h}.", suffix=".tmp", dir=self.dir)
        os.close(fd)
        try:
            save_file({n: t.detach().contiguous().cpu() for n, t in zip(self.names, tensors)}, tmp)
            os.chmod(tmp, public_mode("file"))
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def collect(self, keep: set[str]) -> int:
        """Delete member files (and stray temporaries) not in ``keep``; returns how many."""
        if not self.dir.is_dir():
            return 0
        n = 0
        for f in self.dir.iterdir():
            h = f.name.split(".")[0] if not f.name.startswith(".") else None
            if h in keep and f.suffix == ".safetensors":
                continue
            f.unlink(missing_ok=True)
            n += 1
        return n


def store_lineage(store) -> Callable[[str], Lineage | None]:
    def lineage_of(h: str) -> Lineage | None:
        t = store.get(h)
        return None if t is None else parse_lineage(t.recipe_json)
    return lineage_of


def load_into(model, names: list[str], tensors: list) -> None:
    """Copy a member's tensors into the resident model's parameters/buffers (no re-instantiation)."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    tied = getattr(model.config, "tie_word_embeddings", False)
    with torch.no_grad():
        for name, t in zip(names, tensors):
            target = params.get(name, buffers.get(name))
            if target is None:
                if tied and "lm_head" in name:
                    continue
                raise EvomergeError(f"the resident model has no parameter {name}")
            target.copy_(t)


# ---------------------------------------------------------------------- export
def ancestry(store, h: str, sources: dict[str, str]) -> list[dict]:
    """Every lineage step from ``h`` down to the initial members, children before parents."""
    out, seen, todo = [], set(), [h]
    while todo:
        x = todo.pop(0)
        if x in seen:
            continue
        seen.add(x)
        t = store.get(x)
        if x in sources:
            out.append({"hash": x, "trial": getattr(t, "id", None), "model": sources[x]})
            continue
        lin = parse_lineage(t.recipe_json) if t is not None else None
        if lin is None:
            raise EvomergeError(f"archive member {x}: no lineage in the run store")
        out.append({"hash": x, "trial": getattr(t, "id", None), "parents": list(lin.parents), "split": lin.split,
                    "w": lin.w, "mutation": lin.mutation, "seed": lin.seed})
        todo.extend(lin.parents)
    return out


def export_member(run_dir: str | Path, h: str, out: str | Path, *, card_extra: str = "",
                  overwrite: bool = False) -> Path:
    """Write archive member / child ``h`` of a run as a Hugging Face directory (float32 weights,
    the reference model's config and tokenizer, the lineage as ``evomerge_lineage.yaml`` and a card).

    ``out`` may not equal, contain or lie inside the run directory or a parent model; the copied
    tokenizer and generation-config files must stay inside the reference model's directory."""
    import yaml
    from safetensors.torch import save_file

    from evomerge.io import atomic_directory
    from evomerge.merge.export import copy_files
    from evomerge.merge.vocab import TOKENIZER_FILES
    from evomerge.models import ModelDir
    from evomerge.outputs import check_output_dir
    from evomerge.safety import contained_files
    from evomerge.store import RunStore

    run_dir = Path(run_dir)
    with RunStore(run_dir) as store:
        meta = store.meta("archive") or {}
        models = store.meta("models") or {}
        sources = meta.get("sources")
        if not sources:
            raise EvomergeError(f"{run_dir}: not a model_archive run (no archive metadata)")
        from evomerge.recipe import InputModel

        paths = {m.alias: m.model for m in (InputModel(**e) for e in models.get("experts", []))}
        if models.get("base"):
            paths["base"] = models["base"]
        missing = [p for p in paths.values() if not Path(p).is_dir()]
        if missing:
            raise EvomergeError(f"{run_dir}: parent model {missing[0]} not found; the run's models must be where "
                                "they were during the search")
        dirs = {a: ModelDir(p) for a, p in paths.items()}
        ref = dirs.get("base") or dirs[next(iter(paths))]
        protect = [("run directory", run_dir), *(("input model", d.path) for d in dict.fromkeys(dirs.values()))]
        check_output_dir(Path(out), overwrite=overwrite, protect=protect)  # before the weights are rebuilt
        copies = contained_files(ref.path, (*TOKENIZER_FILES, "generation_config.json"), "tokenizer or generation file")
        names = float_names(ref)
        weights = ArchiveWeights(run_dir, names, sources, lambda a, n: dirs[a].get(n), store_lineage(store), "cpu")
        tensors = weights.get(h)
        steps = ancestry(store, h, sources)
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite, protect=protect) as tmp:
        state = {n: t.detach().contiguous().cpu() for n, t in zip(names, tensors)}
        state.update({n: ref.get(n).contiguous() for n in ref.tensor_names if n not in state})
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(ref.config)  # read and checked by ModelDir; only top-level keys change
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "torch_dtype":
                cfg[key] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        copy_files(copies, tmp)
        (tmp / "evomerge_lineage.yaml").write_text(yaml.safe_dump({"member": h, "models": paths, "steps": steps},
                                                                 sort_keys=False))
        (tmp / "README.md").write_text(member_card(h, steps, paths, run_dir, card_extra))
    return out


def member_card(h: str, steps: list[dict], paths: dict[str, str], run_dir: Path, extra: str = "") -> str:
    from evomerge.markdown import md_cell, md_code, md_fence

    rows = ["| member | trial | made from | split | w | mutation σ (seed) |", "|---|---|---|---|---|---|"]
    for s in steps:
        if "model" in s:
            rows.append(f"| `{s['hash']}` | {s['trial'] if s['trial'] is not None else '—'} | parent model "
                        f"{md_cell(s['model'])} | — | — | — |")
        else:
            rows.append(f"| `{s['hash']}` | {s['trial']} | `{s['parents'][0]}` × `{s['parents'][1]}` | {s['split']} "
                        f"| {s['w']:.6g} | {s['mutation']:g} ({s['seed']}) |")
    lines = ["---", "library_name: transformers", "tags:", "- evomerge", "- merge", "- m2n2", "---", "",
             "# Model-archive member (M2N2 on weights)", "",
             f"Evolved with evomerge's model-archive search: weights crossed directly by split-point SLERP "
             f"(one angle over the whole parameter vector), no merge recipe. Member `{h}`.", "",
             "## Parents", "", *(f"- {md_code(a)}: {md_code(p)}" for a, p in paths.items()), "",
             "## Lineage", "", "Child = SLERP(a, b) with t = w before the split (flattened tensor order) and "
             "1 − w after it, plus N(0, σ²) noise from a CPU generator with the given seed.", "", *rows]
    if extra:
        lines += ["", extra.strip()]
    lines += ["", "## Reproduce", "", *md_fence(f"evomerge export {run_dir} --trial N -o OUT   # recomputes "
                                                "the weights from this lineage (or reads the archive file)", "bash"), ""]
    return "\n".join(lines)
