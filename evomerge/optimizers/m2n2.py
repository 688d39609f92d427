"""M2N2 — Model Merging of Natural Niches (Abrantes, Lange, Tang 2025), docs/ALGORITHMS.md §4.

An archive of P members with a per-data-point score matrix S (P × N). Competition: each data
point is a resource shared by the members that solve it, z_j = (Σ_k S_kj)^α (1 where the sum is
0), F = S / z, fitness f_k = Σ_j F_kj (α = 0: a plain GA). Parent 1 by roulette ∝ f; parent 2 by
attraction g_k = Σ_j max(0, F_kj − F_{p1,j}) — the member strongest where parent 1 is weak.
The child is a split-point SLERP of the two; steady state: it enters the archive and the member
of lowest fitness (recomputed with it) leaves — the child itself when it is the worst.

The pure functions here (``competition``, ``attraction``, ``replacement_index``,
``split_slerp``) are the algorithm; the :class:`M2N2` class only adds ask/tell bookkeeping, so a
"model archive" (crossing weights directly, as in the paper) can reuse the same operator on
torch tensors or lists of tensors.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from evomerge.errors import ConfigError
from evomerge.optimizers.base import Ask, Optimizer, register, roulette

SIN_EPS = 1e-6  # below this sin ω the SLERP degenerates to linear interpolation


# ----------------------------------------------------------------------------- selection
def nonnegative(S: np.ndarray) -> np.ndarray:
    """Scores are resources and must be ≥ 0: shift any column with negatives so its minimum is 0."""
    S = np.asarray(S, dtype=np.float64)
    return S - np.minimum(0.0, S.min(axis=0, keepdims=True))


def competition(S: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Fitness sharing: (F, f) with z_j = (Σ_k S_kj)^α (1 where the sum is 0), F = S/z, f = Σ_j F.

    S must be nonnegative (see ``nonnegative``): a score is a claim on a shared resource.
    """
    S = np.asarray(S, dtype=np.float64)
    if (S < 0).any():
        raise ValueError("competition: scores must be ≥ 0; shift them with nonnegative() first")
    total = S.sum(axis=0)
    z = np.where(total > 0.0, total, 1.0) ** alpha
    F = S / z[None, :]
    return F, F.sum(axis=1)


def attraction(F: np.ndarray, p1: int) -> np.ndarray:
    """g_k = Σ_j max(0, F_kj − F_{p1,j}): how much member k adds where parent 1 is weak."""
    F = np.asarray(F, dtype=np.float64)
    return np.maximum(0.0, F - F[p1][None, :]).sum(axis=1)


def select_parents(S: np.ndarray, alpha: float, rng: np.random.Generator, use_attraction: bool = True) -> tuple[int, int]:
    """(parent 1, parent 2) rows of S: roulette ∝ f, then attraction (roulette when all g are 0).

    Without attraction both are drawn independently by roulette (the paper's GA baseline).
    """
    F, f = competition(S, alpha)
    p1 = roulette(rng, f)
    if use_attraction:
        g = attraction(F, p1)
        return p1, roulette(rng, g if g.sum() > 0 else f)
    return p1, roulette(rng, f)


def replacement_index(S_ext: np.ndarray, alpha: float) -> int:
    """Row to drop from archive + child (the child is the LAST row of ``S_ext``).

    Fitness is recomputed with the child included; on ties the earliest row goes, so a child that
    only ties the worst member replaces it (as in the authors' reference code).
    """
    return int(np.argmin(competition(S_ext, alpha)[1]))


# ----------------------------------------------------------------------------- crossover
def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _dot(a, b) -> float:
    if _is_torch(a):
        return float((a.reshape(-1).double() * b.reshape(-1).double()).sum())
    # not np.dot: a threaded BLAS call per crossover spins badly on a shared, busy CPU
    return float(np.einsum("i,i->", np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)))


def slerp_omega(a_parts: Sequence[Any], b_parts: Sequence[Any]) -> float:
    """ω between the two flattened vectors (the parts concatenated); 0 (degenerate) for a zero vector."""
    ab = sum(_dot(a, b) for a, b in zip(a_parts, b_parts))
    aa = sum(_dot(a, a) for a in a_parts)
    bb = sum(_dot(b, b) for b in b_parts)
    if aa == 0.0 or bb == 0.0:
        return 0.0  # undefined angle: treat as degenerate (linear interpolation)
    cos = max(-1.0, min(1.0, ab / math.sqrt(aa * bb)))
    return math.acos(cos)


def slerp_coefficients(t: float, omega: float) -> tuple[float, float]:
    """(c_a, c_b) with SLERP = c_a·a + c_b·b; linear when sin ω ≤ 1e-6."""
    s = math.sin(omega)
    if s <= SIN_EPS:
        return 1.0 - t, t
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s


def split_slerp_parts(a_parts: Sequence[Any], b_parts: Sequence[Any], split: int, w: float) -> list[Any]:
    """Split-point SLERP over several arrays/tensors seen as ONE flattened vector (a model's weights).

    Elements before global index ``split`` use t = w, the rest t = 1 − w; one ω for the whole
    vector. t = 0 gives ``a``. Works on numpy arrays and torch tensors (any device, dtype kept),
    one tensor at a time, so a full model's weights never need to be concatenated.
    """
    if len(a_parts) != len(b_parts):
        raise ValueError(f"split_slerp: {len(a_parts)} parts vs {len(b_parts)}")
    for a, b in zip(a_parts, b_parts):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"split_slerp: shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    omega = slerp_omega(a_parts, b_parts)
    head = slerp_coefficients(w, omega)
    tail = slerp_coefficients(1.0 - w, omega)
    out, offset = [], 0
    for a, b in zip(a_parts, b_parts):
        fa, fb = a.reshape(-1), b.reshape(-1)
        n = int(fa.shape[0])
        s = min(max(int(split) - offset, 0), n)
        if s == n:
            child = head[0] * fa + head[1] * fb
        elif s == 0:
            child = tail[0] * fa + tail[1] * fb
        else:
            child = _concat(head[0] * fa[:s] + head[1] * fb[:s], tail[0] * fa[s:] + tail[1] * fb[s:])
        out.append(child.reshape(a.shape))
        offset += n
    return out


def _concat(x, y):
    if _is_torch(x):
        import torch

        return torch.cat([x, y])
    return np.concatenate([x, y])


def split_slerp(a, b, split: int, w: float):
    """Split-point SLERP of two equally shaped arrays/tensors (flattened order), see ``split_slerp_parts``."""
    return split_slerp_parts([a], [b], split, w)[0]


def draw_crossover(rng: np.random.Generator, dim: int, splitpoint: bool = True) -> tuple[int, float]:
    """(split, w): split ~ U{0..D−1} (D = no split, plain SLERP), w ~ U(0, 1)."""
    split = int(rng.integers(0, dim)) if splitpoint else int(dim)
    return split, float(rng.random())


# ----------------------------------------------------------------------------- optimizer
@register("m2n2")
class M2N2(Optimizer):
    """Steady-state M2N2 over genomes, fed by per-example scores (``tell(..., per_example=...)``).

    Options: ``archive_size`` P (20); ``alpha`` (1.0; 0 = GA); ``attraction`` (True; False draws
    both parents by roulette, the paper's GA); ``splitpoint`` (True; False = plain SLERP);
    ``mutation`` σ of N(0, σ²) added to every child, genome units (0 = off; the paper uses 0.01
    when evolving from scratch); ``init`` genomes to seed the archive (after ``x0``);
    ``init_size`` number of initial candidates (default P: ``x0``/``init`` then uniform points).
    Bounds may be infinite (raw weight vectors) when ``init``/``x0`` fill the initial archive.

    Ask-ahead: ``ask`` never waits while something useful can be asked. Initial candidates are
    handed out first; after that, children are bred from the members evaluated *so far* (pending
    candidates are never parents). With fewer than two evaluated members a further uniform point is
    asked (bounded spaces) or None is returned (unbounded). A child whose parents leave the archive
    before its own result arrives is unaffected: it competes on its own scores when told.
    """

    allows_infinite_bounds = True

    def __init__(
        self,
        lower,
        upper,
        seed: int,
        x0=None,
        *,
        archive_size: int = 20,
        alpha: float = 1.0,
        attraction: bool = True,
        splitpoint: bool = True,
        mutation: float = 0.0,
        init: Sequence[Any] | None = None,
        init_size: int | None = None,
    ):
        super().__init__(lower, upper, seed, x0=x0)
        if int(archive_size) < 2:
            raise ConfigError(f"m2n2: archive_size must be at least 2, got {archive_size}")
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ConfigError(f"m2n2: alpha must be ≥ 0 (0 = plain GA), got {alpha}")
        if not (mutation >= 0 and math.isfinite(mutation)):
            raise ConfigError(f"m2n2: mutation must be a standard deviation ≥ 0, got {mutation}")
        self.archive_size = int(archive_size)
        self.alpha = float(alpha)
        self.use_attraction = bool(attraction)
        self.splitpoint = bool(splitpoint)
        self.mutation = float(mutation)
        given = ([self.x0] if self.x0 is not None else []) + [
            self._check_genome(g, f"init[{i}]") for i, g in enumerate(init or [])
        ]
        self.init_size = max(len(given), self.archive_size) if init_size is None else int(init_size)
        if self.init_size < len(given):
            raise ConfigError(f"m2n2: init_size {self.init_size} is smaller than the {len(given)} given init genomes")
        self._bounded = bool(np.isfinite(self.lower).all() and np.isfinite(self.upper).all())
        if not self._bounded and self.init_size > len(given):
            raise ConfigError(
                "m2n2: the genome is unbounded, so the initial archive cannot be drawn uniformly; "
                "pass init genomes (or x0) and init_size equal to their number"
            )
        if not self._bounded and len(given) < 2:
            raise ConfigError("m2n2: an unbounded genome needs at least two init genomes to breed from")
        self._given = given
        self._n_init_asked = 0
        self._rng = np.random.default_rng(self.seed)
        # archive: parallel lists, one entry per member
        self._ids: list[int] = []
        self._genomes: list[np.ndarray] = []
        self._fitness: list[float] = []
        self._rows: list[np.ndarray | None] = []
        self._n_examples: int | None = None
        self.last_event: dict[str, Any] = {}

    # --------------------------------------------------------------- archive views
    @property
    def archive(self) -> list[tuple[int, np.ndarray, float]]:
        """(id, genome, scalar fitness) of every member, in slot order."""
        return [(i, g.copy(), f) for i, g, f in zip(self._ids, self._genomes, self._fitness)]

    def score_matrix(self, rows=None, fitness=None) -> np.ndarray:
        """S (members × N), nonnegative. Without per-example scores: the scalar fitness, one column.

        A member told without per-example scores while others have them (a failure) claims
        nothing: its row is min(0, column minimum), i.e. 0 after the nonnegative shift.
        """
        rows = self._rows if rows is None else rows
        fitness = self._fitness if fitness is None else fitness
        present = [r for r in rows if r is not None]
        if not present:
            S = np.asarray(fitness, dtype=np.float64)[:, None]
        else:
            fill = np.minimum(0.0, np.min(np.vstack(present), axis=0))
            S = np.vstack([fill if r is None else r for r in rows])
        return nonnegative(S)

    def member_fitness(self) -> np.ndarray:
        """Shared fitness f of the current members."""
        if not self._ids:
            return np.zeros(0)
        return competition(self.score_matrix(), self.alpha)[1]

    # --------------------------------------------------------------- warm start
    warm_centres = False  # a warm start's points become archive members instead

    def _absorb(self, told) -> None:
        """The evaluations seed the archive (as if told, in id order); the initial candidates still
        to ask are ``init_size`` minus them (default: uniform points fill it to ``archive_size``)."""
        super()._absorb(told)
        for e in sorted(told, key=lambda e: e.ask.id):
            self._tell(e.ask, float(e.fitness), e.per_example, e.objectives)
        self.init_size = max(len(self._given), self.init_size - len(told))

    # --------------------------------------------------------------- ask / tell
    def _ask_new(self) -> Ask | None:
        if self._n_init_asked < self.init_size:
            k = self._n_init_asked
            self._n_init_asked += 1
            if k < len(self._given):
                return self._new_ask(self._given[k], source="init")
            return self._new_ask(self._uniform(self._rng), source="init-uniform")
        if len(self._ids) >= 2:
            return self._breed()
        if self._bounded:
            return self._new_ask(self._uniform(self._rng), source="uniform")
        return None

    def _breed(self) -> Ask:
        p1, p2 = select_parents(self.score_matrix(), self.alpha, self._rng, self.use_attraction)
        split, w = draw_crossover(self._rng, self.dim, self.splitpoint)
        child = split_slerp(self._genomes[p1], self._genomes[p2], split, w)
        if self.mutation > 0:
            child = child + self._rng.normal(0.0, self.mutation, self.dim)
        child = np.clip(child, self.lower, self.upper)
        return self._new_ask(
            child, source="child", parents=(self._ids[p1], self._ids[p2]), split=split, w=w
        )

    def _tell(self, ask, fitness, per_example, objectives) -> None:
        row = per_example
        if row is not None:
            if self._n_examples is None:
                self._n_examples = int(row.size)
            elif row.size != self._n_examples:
                raise ValueError(
                    f"m2n2: ask {ask.id} has {row.size} per-example scores, earlier ones had {self._n_examples}"
                )
        if len(self._ids) < self.archive_size:
            self._append(ask, fitness, row)
            self.last_event = {"id": ask.id, "action": "added"}
            return
        worst = replacement_index(self.score_matrix(self._rows + [row], self._fitness + [fitness]), self.alpha)
        if worst == len(self._ids):
            self.last_event = {"id": ask.id, "action": "rejected"}
            return
        self.last_event = {"id": ask.id, "action": "replaced", "dropped": self._ids[worst]}
        self._ids[worst], self._genomes[worst] = ask.id, ask.genome.copy()
        self._fitness[worst], self._rows[worst] = fitness, None if row is None else row.copy()

    def _append(self, ask: Ask, fitness: float, row: np.ndarray | None) -> None:
        self._ids.append(ask.id)
        self._genomes.append(ask.genome.copy())
        self._fitness.append(fitness)
        self._rows.append(None if row is None else row.copy())


# ----------------------------------------------------------------------------- on whole weights
class ArchiveM2N2(M2N2):
    """M2N2's selection and steady-state replacement, with children drawn as lineages.

    The genome of a child is (parent_a id, parent_b id, split, w, mutation seed); the search
    loop turns it into a :class:`Lineage` over the members' hashes. Initial members come first.
    """

    def __init__(self, sources: int, elements: int, seed: int, *, archive_size: int = 20, alpha: float = 1.0,
                 attraction: bool = True, splitpoint: bool = True, mutation: float = 0.0):
        init = [[-(k + 1), -(k + 1), 0, 0, 0] for k in range(sources)]
        inf = np.full(5, np.inf)
        super().__init__(-inf, inf, seed, archive_size=archive_size, alpha=alpha, attraction=attraction,
                         splitpoint=splitpoint, mutation=mutation, init=init, init_size=sources)
        if int(elements) < 1:
            raise ConfigError("model_archive: the reference model has no floating-point tensors to cross")
        self.elements = int(elements)

    def _breed(self) -> Ask:
        p1, p2 = select_parents(self.score_matrix(), self.alpha, self._rng, self.use_attraction)
        split, w = draw_crossover(self._rng, self.elements, self.splitpoint)
        seed = int(self._rng.integers(0, 2 ** 52)) if self.mutation > 0 else 0
        a, b = self._ids[p1], self._ids[p2]
        return self._new_ask(np.array([a, b, split, w, seed], dtype=np.float64), source="child",
                             parents=(a, b), split=split, w=w, mutation=self.mutation, mutation_seed=seed)
