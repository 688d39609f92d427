"""Quadratic surrogates of a task metric as a function of merge coefficients (MAP, docs/ALGORITHMS.md §5).

A metric M(c) over coefficients c ∈ ℝ^N is modelled as a full quadratic — features c_i²,
c_i c_j (i<j), c_i, 1, i.e. (N+1)(N+2)/2 coefficients — fitted by ridge-regularised least squares,
optionally through a link (fit g(M) instead of M, predict back with g⁻¹) so that accuracies stay
in [0, 1] and losses stay positive. Coordinates are mapped affinely onto [-1, 1] by the sampled
box before featurising: the quadratic family is invariant under affine maps (so a quadratic is
still recovered exactly) and the ridge penalty and conditioning no longer depend on units.

A surrogate knows the box it was fitted in and refuses to predict outside it unless asked to:
MAP's reference code searched [-3, 3] while sampling [0, 1], and a quadratic extrapolated that far
is fiction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from evomerge.errors import EvomergeError

__all__ = [
    "LINKS",
    "Link",
    "QuadraticSurrogate",
    "SurrogateSet",
    "n_quadratic_features",
    "quadratic_features",
]


# ---------------------------------------------------------------------------------------------
# Links


@dataclass(frozen=True)
class Link:
    """A monotone map g between metric space and the space the quadratic is fitted in."""

    name: str
    forward: Callable[[np.ndarray, float], np.ndarray]  # metric → link space (clips with ε)
    inverse: Callable[[np.ndarray], np.ndarray]  # link space → metric
    d_inverse: Callable[[np.ndarray], np.ndarray]  # d g⁻¹ / dz, for the delta method
    check: Callable[[np.ndarray], str | None]  # returns a complaint about values outside the domain


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def _logit(y: np.ndarray, eps: float) -> np.ndarray:
    y = np.clip(y, eps, 1.0 - eps)
    return np.log(y) - np.log1p(-y)


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _softplus_inv(y: np.ndarray, eps: float) -> np.ndarray:
    y = np.maximum(y, eps)
    # log(exp(y) - 1) = y + log(1 - exp(-y)), stable for large y
    return y + np.log(-np.expm1(-y))


def _in_unit(y: np.ndarray) -> str | None:
    if np.any((y < 0) | (y > 1)):
        return "the logit link needs metrics in [0, 1] (accuracies); use link 'identity' or 'log' otherwise"
    return None


def _nonneg(y: np.ndarray) -> str | None:
    if np.any(y < 0):
        return "this link needs non-negative metrics (losses); use link 'identity' otherwise"
    return None


LINKS: dict[str, Link] = {
    "identity": Link("identity", lambda y, eps: y, lambda z: z, np.ones_like, lambda y: None),
    "logit": Link("logit", _logit, _sigmoid, lambda z: _sigmoid(z) * (1.0 - _sigmoid(z)), _in_unit),
    "log": Link("log", lambda y, eps: np.log(np.maximum(y, eps)), np.exp, np.exp, _nonneg),
    "softplus": Link("softplus", _softplus_inv, _softplus, _sigmoid, _nonneg),
}


def auto_link(y: np.ndarray) -> str:
    """``logit`` for values that all lie in [0, 1] (accuracies, rates), else ``identity``."""
    y = np.asarray(y, dtype=float)
    return "logit" if y.size and np.all((y >= 0) & (y <= 1)) else "identity"


# How the coefficients are estimated: least squares in link space, or (logit link only) the
# quasi-binomial likelihood of the accuracies themselves (a GLM, by IRLS).
FIT_METHODS = ("ls", "binomial")


def get_link(name: str) -> Link:
    try:
        return LINKS[name]
    except KeyError:
        raise EvomergeError(f"unknown surrogate link {name!r}; choose one of {sorted(LINKS)}") from None


# ---------------------------------------------------------------------------------------------
# Features


def n_quadratic_features(n: int, interactions: bool = True) -> int:
    """(N+1)(N+2)/2 coefficients of a full quadratic in N variables; 2N+1 without cross terms."""
    return (n + 1) * (n + 2) // 2 if interactions else 2 * n + 1


def quadratic_features(u: np.ndarray, interactions: bool = True) -> np.ndarray:
    """Rows [u_i² (i), u_i u_j (i<j), u_i (i), 1] for each row of ``u`` (shape (n, N)).

    Without ``interactions`` the cross terms are left out (a separable quadratic, for long genomes).
    """
    u = np.atleast_2d(np.asarray(u, dtype=float))
    n, d = u.shape
    iu, ju = np.triu_indices(d, k=1) if interactions else (np.empty(0, int), np.empty(0, int))
    return np.hstack([u**2, u[:, iu] * u[:, ju], u, np.ones((n, 1))])


def _as_points(C, n_dims: int | None = None, what: str = "coefficients") -> np.ndarray:
    C = np.asarray(C, dtype=float)
    if C.ndim == 1:
        # one point of N coefficients when N is known, else n points of one coefficient
        C = C[None, :] if n_dims is not None and C.shape[0] == n_dims else C[:, None]
    if C.ndim != 2:
        raise EvomergeError(f"{what}: expected a 2-D array (points × coefficients), got shape {C.shape}")
    if n_dims is not None and C.shape[1] != n_dims:
        raise EvomergeError(f"{what}: expected {n_dims} coefficients per point, got {C.shape[1]}")
    if not np.all(np.isfinite(C)):
        raise EvomergeError(f"{what}: contains NaN or infinite values")
    return C


# ---------------------------------------------------------------------------------------------
# One objective


class QuadraticSurrogate:
    """Ridge-regularised quadratic fit of one metric, with a link, a box, and fit diagnostics.

    After :meth:`fit`: ``r2`` (in metric space, on the fitted points), ``loo_residuals`` (exact
    leave-one-out residuals in metric space, from the hat matrix) and ``loo_rmse``.
    """

    def __init__(
        self,
        link: str = "identity",
        ridge: float = 1e-8,
        eps: float = 1e-4,
        interactions: bool = True,
        method: str = "auto",
    ):
        if ridge < 0 or not np.isfinite(ridge):
            raise EvomergeError(f"surrogate ridge must be a finite number >= 0, got {ridge}")
        if not 0 < eps < 0.5:
            raise EvomergeError(f"surrogate link clipping eps must be in (0, 0.5), got {eps}")
        self.link = get_link(link)
        if method == "auto":
            method = "binomial" if link == "logit" else "ls"
        if method not in FIT_METHODS:
            raise EvomergeError(f"surrogate fit method must be one of {FIT_METHODS} or 'auto', got {method!r}")
        if method == "binomial" and link != "logit":
            raise EvomergeError("surrogate fit method 'binomial' needs the logit link (accuracies in [0, 1])")
        self.method = method
        self.ridge = float(ridge)
        self.eps = float(eps)
        self.interactions = bool(interactions)
        self.coef: np.ndarray | None = None

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, C, y, box: tuple[Sequence[float], Sequence[float]] | None = None) -> "QuadraticSurrogate":
        """Fit to points ``C`` (n × N) with metric values ``y`` (n,).

        ``box`` = (lower, upper) is the region the points were sampled from; by default the
        points' own bounding box. It must contain every point.
        """
        C = _as_points(C)
        y = np.asarray(y, dtype=float).reshape(-1)
        n, d = C.shape
        if y.shape[0] != n:
            raise EvomergeError(f"surrogate fit: {n} points but {y.shape[0]} metric values")
        if not np.all(np.isfinite(y)):
            raise EvomergeError("surrogate fit: metric values contain NaN or infinity; drop failed trials first")
        p = n_quadratic_features(d, self.interactions)
        if n < p:
            raise EvomergeError(
                f"surrogate fit: a quadratic in {d} coefficients has {p} terms and needs at least {p} "
                f"evaluated points, got {n}; evaluate more points (MAP's plan uses (N+1)(N+2) = {2 * p})"
            )
        complaint = self.link.check(y)
        if complaint:
            raise EvomergeError(f"surrogate fit: {complaint}")
        lower, upper = self._resolve_box(C, box)
        self.lower, self.upper = lower, upper
        self.center = (lower + upper) / 2.0
        half = (upper - lower) / 2.0
        self.half = np.where(half > 0, half, 1.0)

        z = self.link.forward(y, self.eps)
        Phi = self._features(C)
        # Ridge on everything but the intercept, solved as an augmented least-squares problem
        # (better conditioned than the normal equations); its QR also gives the hat matrix.
        if np.linalg.matrix_rank(Phi) < p:
            raise EvomergeError(
                "surrogate fit: the points do not determine a quadratic (too few distinct points, or all "
                "on a line or conic); add space-filling points"
            )
        D = np.sqrt(self.ridge) * np.eye(p)[:-1]
        zeros = np.zeros(p - 1)

        def solve(w: np.ndarray, target: np.ndarray):
            """Weighted ridge least squares via QR of the augmented system; (coef, Q, R)."""
            sw = np.sqrt(w)
            Q, R = np.linalg.qr(np.vstack([sw[:, None] * Phi, D]))
            return np.linalg.solve(R, Q.T @ np.concatenate([sw * target, zeros])), Q, R

        w = np.ones(n)
        if self.method == "binomial":
            # Quasi-binomial GLM: Newton/IRLS on the penalised negative log-likelihood of the
            # accuracies, with step halving so that it never increases (plain IRLS blows up on
            # nearly separable data: many exact 0s and 1s). Accuracies are proportions, so exact
            # 0s and 1s need no clipping and saturated points do not dominate through huge logits.
            def objective(coef: np.ndarray) -> float:
                eta = Phi @ coef
                nll = y * np.logaddexp(0.0, -eta) + (1.0 - y) * np.logaddexp(0.0, eta)
                return float(np.sum(nll) + 0.5 * self.ridge * np.sum(coef[:-1] ** 2))

            self.coef, Q, R = solve(w, self.link.forward(y, 0.05))  # a moderate start
            f = objective(self.coef)
            for _ in range(200):
                eta = Phi @ self.coef
                mu = self.link.inverse(eta)
                w = np.clip(mu * (1.0 - mu), 1e-12, None)
                new, Q, R = solve(w, eta + (y - mu) / w)
                f_new = objective(new)
                for _ in range(40):  # step halving
                    if f_new <= f + 1e-12 * max(1.0, abs(f)):
                        break
                    new = (self.coef + new) / 2.0
                    f_new = objective(new)
                else:
                    break  # no descent possible: at the optimum up to rounding
                done = f - f_new <= 1e-13 * max(1.0, abs(f))
                self.coef, f = new, f_new
                if done:
                    break
            eta = Phi @ self.coef
            mu = self.link.inverse(eta)
            w = np.clip(mu * (1.0 - mu), 1e-12, None)
            z = eta + (y - mu) / w  # working response: LOO and dispersion below
            Q, R = solve(w, z)[1:]
        else:
            self.coef, Q, R = solve(w, z)
        h = np.sum(Q[:n] ** 2, axis=1)  # diagonal of the (weighted) hat matrix W½Φ(AᵀA)⁻¹ΦᵀW½
        z_hat = Phi @ self.coef
        with np.errstate(divide="ignore", invalid="ignore"):
            # exact for least squares; the standard one-step approximation for the GLM
            z_loo = z - (z - z_hat) / (1.0 - h)
        z_loo = np.where(1.0 - h > 1e-10, z_loo, np.nan)  # a point the fit cannot do without
        self.n_points = n
        self._train_points = C.copy()
        self.leverage = h
        self.y_fit = y.copy()
        y_hat = self.link.inverse(z_hat)
        self.residuals = y - y_hat
        self.loo_residuals = y - self.link.inverse(z_loo)
        ss_tot = float(np.sum((y - y.mean()) ** 2))
        ss_res = float(np.sum(self.residuals**2))
        self.r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res < 1e-24 else float("nan"))
        finite = np.isfinite(self.loo_residuals)
        self.loo_rmse = float(np.sqrt(np.mean(self.loo_residuals[finite] ** 2))) if finite.all() else float("inf")
        # σ² of the link-space noise (the Pearson dispersion for the GLM), for predictive standard
        # deviations (Bayesian linear model view)
        dof = max(n - p, 1)
        self.sigma2_link = float(np.sum(w * (z - z_hat) ** 2) / dof)
        self._chol_inv_R = np.linalg.inv(R)  # (AᵀA)⁻¹ = R⁻¹ R⁻ᵀ
        return self

    def _resolve_box(self, C: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = C.min(axis=0), C.max(axis=0)
        if box is None:
            return lo, hi
        lower = np.asarray(box[0], dtype=float).reshape(-1)
        upper = np.asarray(box[1], dtype=float).reshape(-1)
        if lower.shape != (C.shape[1],) or upper.shape != (C.shape[1],):
            raise EvomergeError(f"surrogate box: expected {C.shape[1]} lower and upper bounds")
        if np.any(upper < lower):
            raise EvomergeError("surrogate box: some upper bound is below its lower bound")
        tol = 1e-9 * np.maximum(1.0, upper - lower)
        if np.any(lo < lower - tol) or np.any(hi > upper + tol):
            raise EvomergeError("surrogate box: some fitted points lie outside the given box")
        return lower, upper

    def _to_unit(self, C: np.ndarray) -> np.ndarray:
        return (C - self.center) / self.half

    def _features(self, C: np.ndarray) -> np.ndarray:
        return quadratic_features(self._to_unit(C), self.interactions)

    def _require_fitted(self) -> None:
        if self.coef is None:
            raise EvomergeError("surrogate: call fit() before predict()")

    def check_in_box(self, C: np.ndarray) -> None:
        """Raise if any point lies outside the sampled box (with a 1e-9 relative tolerance)."""
        tol = 1e-9 * np.maximum(1.0, self.upper - self.lower)
        bad = (C < self.lower - tol) | (C > self.upper + tol)
        if bad.any():
            k, i = map(int, np.argwhere(bad)[0])
            raise EvomergeError(
                f"surrogate: point {k} has coefficient {i} = {C[k, i]:.6g}, outside the sampled box "
                f"[{self.lower[i]:.6g}, {self.upper[i]:.6g}]; the quadratic is only trusted where it was fitted "
                "(pass allow_extrapolation=True to predict anyway)"
            )

    # -- prediction ---------------------------------------------------------------------------
    def predict_link(self, C, allow_extrapolation: bool = False) -> np.ndarray:
        self._require_fitted()
        C = _as_points(C, len(self.lower))
        if not allow_extrapolation:
            self.check_in_box(C)
        return self._features(C) @ self.coef

    def predict(self, C, allow_extrapolation: bool = False) -> np.ndarray:
        """Predicted metric at each row of ``C`` (shape (n,))."""
        return self.link.inverse(self.predict_link(C, allow_extrapolation))

    def predict_std(self, C, allow_extrapolation: bool = False) -> np.ndarray:
        """Predictive standard deviation of the mean in metric space (ridge posterior + delta method).

        Var_z(c) = σ² φ(c)ᵀ (ΦᵀΦ + λD)⁻¹ φ(c), σ² from the fit's residuals; mapped to metric space by
        the link's derivative. Small where the design pins the quadratic down, large where it does not.
        """
        z = self.predict_link(C, allow_extrapolation)
        Phi = self._features(_as_points(C, len(self.lower)))
        G = Phi @ self._chol_inv_R
        var = self.sigma2_link * np.sum(G**2, axis=1)
        return np.abs(self.link.d_inverse(z)) * np.sqrt(var)

    def kfold_rmse(self, k: int = 5, seed: int = 0) -> float:
        """k-fold cross-validated RMSE in metric space (refits k times; LOO is ``loo_rmse``)."""
        self._require_fitted()
        if not hasattr(self, "_train_points"):
            raise EvomergeError("k-fold: this surrogate was loaded without its training points; refit it")
        C, y = self._train_points, self.y_fit
        n = len(y)
        if not 2 <= k <= n:
            raise EvomergeError(f"k-fold: need 2 <= k <= {n} points, got k={k}")
        folds = np.array_split(np.random.default_rng(seed).permutation(n), k)
        errs = np.empty(n)
        for f in folds:
            train = np.setdiff1d(np.arange(n), f)
            m = QuadraticSurrogate(self.link.name, self.ridge, self.eps, self.interactions, self.method)
            try:
                m.fit(C[train], y[train], box=(self.lower, self.upper))
            except EvomergeError:
                return float("inf")  # a fold too small to determine the quadratic
            errs[f] = y[f] - m.predict(C[f])
        return float(np.sqrt(np.mean(errs**2)))

    def quadratic_form(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(A, b, c0) with g(M(c)) ≈ cᵀAc + bᵀc + c0 in original coordinates (A symmetric)."""
        self._require_fitted()
        d = len(self.lower)
        iu, ju = np.triu_indices(d, k=1) if self.interactions else (np.empty(0, int), np.empty(0, int))
        Qm = np.diag(self.coef[:d])
        Qm[iu, ju] = Qm[ju, iu] = self.coef[d : d + len(iu)] / 2.0
        b_u = self.coef[d + len(iu) : -1]
        d0 = float(self.coef[-1])
        U = np.diag(1.0 / self.half)
        A = U @ Qm @ U
        m = self.center
        b = -2.0 * A @ m + U @ b_u
        c0 = float(m @ A @ m - b_u @ (U @ m) + d0)
        return A, b, c0

    # -- persistence ----------------------------------------------------------------------------
    def __getstate__(self) -> dict:  # links hold lambdas: pickle the link by name
        d = self.__dict__.copy()
        d["link"] = self.link.name
        return d

    def __setstate__(self, d: dict) -> None:
        d = dict(d)
        d["link"] = get_link(d["link"])
        self.__dict__.update(d)

    def to_dict(self) -> dict:
        """JSON-able state (enough to predict and to report fit quality)."""
        self._require_fitted()
        return {
            "link": self.link.name,
            "ridge": self.ridge,
            "eps": self.eps,
            "interactions": self.interactions,
            "method": self.method,
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            "coef": self.coef.tolist(),
            "r2": self.r2,
            "loo_rmse": self.loo_rmse,
            "n_points": self.n_points,
            "sigma2_link": self.sigma2_link,
            "inv_R": self._chol_inv_R.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuadraticSurrogate":
        m = cls(d["link"], d["ridge"], d["eps"], d.get("interactions", True), d.get("method", "ls"))
        m.lower = np.asarray(d["lower"], dtype=float)
        m.upper = np.asarray(d["upper"], dtype=float)
        m.center = (m.lower + m.upper) / 2.0
        half = (m.upper - m.lower) / 2.0
        m.half = np.where(half > 0, half, 1.0)
        m.coef = np.asarray(d["coef"], dtype=float)
        m.r2, m.loo_rmse, m.n_points = d["r2"], d["loo_rmse"], d["n_points"]
        m.sigma2_link = d["sigma2_link"]
        m._chol_inv_R = np.asarray(d["inv_R"], dtype=float)
        return m


# ---------------------------------------------------------------------------------------------
# Several objectives


class SurrogateSet:
    """One :class:`QuadraticSurrogate` per objective over the same points and box."""

    def __init__(self, models: list[QuadraticSurrogate], names: Sequence[str] | None = None):
        if not models:
            raise EvomergeError("surrogate set: need at least one objective")
        self.models = list(models)
        self.names = list(names) if names is not None else [f"objective_{i}" for i in range(len(models))]
        if len(self.names) != len(self.models):
            raise EvomergeError("surrogate set: one name per objective")

    @classmethod
    def fit(
        cls,
        C,
        Y,
        *,
        links: str | Sequence[str] = "identity",
        ridge: float = 1e-8,
        eps: float = 1e-4,
        box=None,
        names: Sequence[str] | None = None,
        method: str = "auto",
    ) -> "SurrogateSet":
        """Fit every column of ``Y`` (n × m) against ``C`` (n × N).

        ``links``: one name or one per column; ``auto`` picks :func:`auto_link` from the values.
        """
        Y = np.asarray(Y, dtype=float)
        if Y.ndim == 1:
            Y = Y[:, None]
        m = Y.shape[1]
        links = [links] * m if isinstance(links, str) else list(links)
        if len(links) != m:
            raise EvomergeError(f"surrogate set: {m} objectives but {len(links)} links")
        links = [auto_link(Y[:, j]) if links[j] == "auto" else links[j] for j in range(m)]
        models = [QuadraticSurrogate(links[j], ridge, eps, method=method).fit(C, Y[:, j], box) for j in range(m)]
        return cls(models, names)

    @property
    def lower(self) -> np.ndarray:
        return self.models[0].lower

    @property
    def upper(self) -> np.ndarray:
        return self.models[0].upper

    @property
    def n_objectives(self) -> int:
        return len(self.models)

    @property
    def r2(self) -> np.ndarray:
        return np.array([m.r2 for m in self.models])

    @property
    def loo_rmse(self) -> np.ndarray:
        return np.array([m.loo_rmse for m in self.models])

    def predict(self, C, allow_extrapolation: bool = False) -> np.ndarray:
        """Predicted metrics, shape (n, m)."""
        return np.column_stack([m.predict(C, allow_extrapolation) for m in self.models])

    __call__ = predict

    def predict_std(self, C, allow_extrapolation: bool = False) -> np.ndarray:
        return np.column_stack([m.predict_std(C, allow_extrapolation) for m in self.models])

    def to_dict(self) -> dict:
        return {"names": self.names, "models": [m.to_dict() for m in self.models]}

    @classmethod
    def from_dict(cls, d: dict) -> "SurrogateSet":
        return cls([QuadraticSurrogate.from_dict(m) for m in d["models"]], d["names"])
