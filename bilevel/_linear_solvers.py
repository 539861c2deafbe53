"""Linear solvers for the implicit function theorem: H x = b with H the inner Hessian.

Each solver is an immutable settings object with `solve(matvec, b) -> (x, stats)` where
`matvec` is a linear function on pytrees and `stats` is a dict of float scalars with the
keys of `stats_template`. `bilevel.implicit` wraps the solve in `jax.lax.custom_linear_solve`
so it is transposable (reverse mode) and differentiable (higher order).

Every solver runs on a normalised system: `solve` divides the right-hand side by its largest
absolute entry, solves, and scales the solution back, so a right-hand side far below (or
above) one is solved as well as one of order one, and the reported residuals are those of
the normalised system (relative, so the same number). A right-hand side that is not finite
gives a solution of NaNs, never zeros: a NaN in the validation data must show.
"""

from __future__ import annotations

import abc
import functools
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._base import tree_norm, tree_vdot

_tmap = jax.tree_util.tree_map


def _check_number(value, name: str, where: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{where} requires `{name}` to be a Python number (a setting fixed at compile "
            f"time); got {type(value).__name__} {value!r}. Pass float(...) of a concrete value; "
            "a setting that should change without recompiling belongs in the hyperparameters."
        )
    if not math.isfinite(value):
        raise ValueError(
            f"{where} requires a finite `{name}`; got {name}={value}. An infinite or NaN "
            f"setting turns the solve into a no-op or NaNs. Pass a finite value, e.g. "
            f"{name}={'1e-6' if name.endswith('tol') else '0.01'}."
        )
    if positive and not value > 0:
        raise ValueError(f"{where} requires `{name}` > 0; got {name}={value}. Pass a positive value.")
    if not positive and not value >= 0:
        raise ValueError(
            f"{where} requires `{name}` >= 0; got {name}={value}. Pass a non-negative value "
            "(e.g. 1e-8)."
        )
    return value


def _check_count(value, name: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{where} requires `{name}` to be a Python int; got {type(value).__name__} {value!r}."
        )
    if value < minimum:
        raise ValueError(
            f"{where} requires `{name}` >= {minimum}; got {name}={value}. Pass at least {minimum}."
        )
    return value


def _py(value):
    """NumPy and concrete JAX scalars (np.float64(0.1), jnp.asarray(5)) as Python numbers;
    anything else (a traced value among them) unchanged, for the settings checks to refuse."""
    if isinstance(value, np.generic) and value.ndim == 0:
        return value.item()
    if isinstance(value, jax.Array) and value.ndim == 0 and not isinstance(value, jax.core.Tracer):
        return value.item()
    return value


def _relative_residual(matvec, x, b):
    r = _tmap(jnp.subtract, matvec(x), b)
    bnorm = tree_norm(b)
    return tree_norm(r) / jnp.where(bnorm > 0, bnorm, 1.0)


def _max_abs(tree) -> jax.Array:
    """The largest absolute entry of a pytree (0 for an all-zero one, NaN if any is NaN)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), initial=0.0) for x in leaves],
                            0.0)


class AbstractLinearSolver(eqx.Module):
    """A way to apply H⁻¹ (or an approximation) for the implicit function theorem.

    `symmetric_only` is True for solvers that are only valid for symmetric systems (CG);
    `bilevel.implicit` refuses them for a condition whose linear system is not symmetric.
    `per_term` is True for solvers that can apply a different operator at each term or
    iteration (`curvature="per_term"`: a fresh minibatch's Hessian per Neumann term).
    """

    symmetric_only: ClassVar[bool] = False
    per_term: ClassVar[bool] = False

    def solve(self, matvec, b, *, x0=None, matvec_at=None):
        """Return `(x, stats)` with `x ≈ H⁻¹ b` for `H = matvec`.

        The system is normalised first (b divided by its largest absolute entry), so tiny
        or huge right-hand sides are solved like ones of order one; a non-finite b gives a
        NaN solution (and NaN residual) instead of the zeros an unstarted iteration returns.

        `x0` is an initial guess (a warm start: the previous outer step's solution); `None`
        starts from zero. `matvec_at(v, k)`, where supported (`per_term`), is the operator
        used at term or iteration `k` (a Hessian on the k-th minibatch); the residual is
        still reported for `matvec`.
        """
        scale = jnp.asarray(_max_abs(b))
        finite = jnp.isfinite(scale)
        safe = jnp.where(finite & (scale > 0), scale, 1.0)
        normalise = lambda t: _tmap(lambda v: v / safe.astype(v.dtype), t)  # noqa: E731
        x0 = None if x0 is None else normalise(x0)
        if matvec_at is not None and not self.per_term:
            raise ValueError(
                f"{type(self).__name__} cannot use a different operator per iteration; "
                "curvature='per_term' needs bilevel.neumann(...) or bilevel.cg(...)."
            )
        x, stats = self._solve(matvec, normalise(b), safe, x0, matvec_at)
        nan = jnp.asarray(jnp.nan)
        x = _tmap(lambda v: jnp.where(finite, v * safe.astype(v.dtype), nan.astype(v.dtype)), x)
        stats = {k: jnp.where(finite | (k != "solve_residual"), v, nan.astype(v.dtype))
                 for k, v in stats.items()}
        return x, stats

    @abc.abstractmethod
    def _solve(self, matvec, b, scale, x0, matvec_at):
        """Solve with `b` and `x0` divided by `scale` (b's largest entry is then ±1):
        `(x, stats)`. `x0` is None for a cold start; `matvec_at` is None unless the solver
        is `per_term`."""

    @abc.abstractmethod
    def stats_template(self, dtype) -> dict:
        """Zero float scalars with the keys and dtype of `solve`'s stats."""

    def finalize(self, stats: dict) -> dict:
        """Give float-carried stats their natural dtypes (counts as int, flags as bool)."""
        out = {}
        for key, value in stats.items():
            if key.endswith("_iterations"):
                value = jnp.round(value).astype(jnp.int32)
            elif key.endswith(("_diverged", "_negative_curvature")):
                value = value > 0.5
            out[key] = value
        return out


def _start(op, b, x0):
    """`(x0, b − H x0)`: zero and b for a cold start (no operator applied), else a warm start."""
    if x0 is None:
        return _tmap(jnp.zeros_like, b), b
    return x0, _tmap(jnp.subtract, b, op(x0, jnp.zeros((), jnp.int32)))


def _zeros(dtype, *keys):
    return {k: jnp.zeros((), dtype) for k in keys}


class Exact(AbstractLinearSolver):
    """Dense solve: materialise H and call `jnp.linalg.solve`. See `bilevel.exact`."""

    def _solve(self, matvec, b, scale, x0, matvec_at):
        del scale, x0, matvec_at
        flat_b, unravel = ravel_pytree(b)
        flat_mv = lambda v: ravel_pytree(matvec(unravel(v)))[0]  # noqa: E731
        eye = jnp.eye(flat_b.size, dtype=flat_b.dtype)
        dense = jax.vmap(flat_mv, out_axes=1)(eye)
        x = unravel(jnp.linalg.solve(dense, flat_b))
        residual = jnp.linalg.norm(dense @ ravel_pytree(x)[0] - flat_b)
        bnorm = jnp.linalg.norm(flat_b)
        return x, {"solve_residual": residual / jnp.where(bnorm > 0, bnorm, 1.0)}

    def stats_template(self, dtype):
        return _zeros(dtype, "solve_residual")


class CG(AbstractLinearSolver):
    """Conjugate gradient on H x = b (H symmetric positive definite). See `bilevel.cg`."""

    maxiter: int = eqx.field(static=True)
    tol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True, default=0.0)
    symmetric_only: ClassVar[bool] = True
    per_term: ClassVar[bool] = True

    def __check_init__(self):
        where = "cg(maxiter, tol, atol=0.0)"
        _check_count(self.maxiter, "maxiter", where, 1)
        _check_number(self.tol, "tol", where, positive=False)
        _check_number(self.atol, "atol", where, positive=False)

    def _solve(self, matvec, b, scale, x0, matvec_at):
        bnorm2 = tree_vdot(b, b)
        op = (lambda v, k: matvec(v)) if matvec_at is None else matvec_at  # noqa: E731
        atol = float(self.atol) / scale  # b was divided by `scale`, so is the absolute tolerance
        stop2 = jnp.maximum(float(self.tol) ** 2 * bnorm2, (atol**2).astype(bnorm2.dtype))

        def cond(state):
            return (state[4] < self.maxiter) & (state[3] > stop2)

        def body(state):
            x, r, p, rs, k, negative = state
            ap = op(p, k)
            pap = tree_vdot(p, ap)
            alpha = rs / jnp.where(pap != 0, pap, 1.0)
            x = _tmap(lambda xi, pi: xi + alpha * pi, x, p)
            r = _tmap(lambda ri, ai: ri - alpha * ai, r, ap)
            rs_new = tree_vdot(r, r)
            beta = rs_new / jnp.where(rs != 0, rs, 1.0)
            p = _tmap(lambda ri, pi: ri + beta * pi, r, p)
            return x, r, p, rs_new, k + 1, negative | (pap <= 0)

        x0, r0 = _start(op, b, x0)
        rs0 = tree_vdot(r0, r0)
        init = (x0, r0, r0, rs0, jnp.zeros((), jnp.int32), bnorm2 < 0)  # False, varying like b
        x, _, _, _, k, negative = jax.lax.while_loop(cond, body, init)
        dtype = jnp.result_type(bnorm2)
        return x, {
            "solve_residual": _relative_residual(matvec, x, b),
            "solve_iterations": k.astype(dtype),
            "solve_negative_curvature": negative.astype(dtype),
        }

    def stats_template(self, dtype):
        return _zeros(dtype, "solve_residual", "solve_iterations", "solve_negative_curvature")


class GMRES(AbstractLinearSolver):
    """Restarted GMRES for indefinite or non-symmetric H. See `bilevel.gmres`."""

    maxiter: int = eqx.field(static=True)
    tol: float = eqx.field(static=True)
    restart: int = eqx.field(static=True, default=20)

    def __check_init__(self):
        where = "gmres(maxiter, tol, restart=20)"
        _check_count(self.maxiter, "maxiter", where, 1)
        _check_count(self.restart, "restart", where, 1)
        _check_number(self.tol, "tol", where, positive=False)

    def _solve(self, matvec, b, scale, x0, matvec_at):
        del scale, matvec_at
        x, _ = jax.scipy.sparse.linalg.gmres(
            matvec, b, x0, tol=float(self.tol), atol=0.0, restart=self.restart,
            maxiter=self.maxiter, solve_method="batched",
        )
        return x, {"solve_residual": _relative_residual(matvec, x, b)}

    def stats_template(self, dtype):
        return _zeros(dtype, "solve_residual")


class BiCGStab(AbstractLinearSolver):
    """BiCGStab for non-symmetric systems. See `bilevel.bicgstab`."""

    maxiter: int = eqx.field(static=True)
    tol: float = eqx.field(static=True)

    def __check_init__(self):
        where = "bicgstab(maxiter, tol)"
        _check_count(self.maxiter, "maxiter", where, 1)
        _check_number(self.tol, "tol", where, positive=False)

    def _solve(self, matvec, b, scale, x0, matvec_at):
        del scale, matvec_at
        x, _ = jax.scipy.sparse.linalg.bicgstab(matvec, b, x0, tol=float(self.tol), atol=0.0,
                                                maxiter=self.maxiter)
        return x, {"solve_residual": _relative_residual(matvec, x, b)}

    def stats_template(self, dtype):
        return _zeros(dtype, "solve_residual")


class NormalCG(AbstractLinearSolver):
    """CG on the normal equations AᵀA x = Aᵀb. See `bilevel.normal_cg`."""

    maxiter: int = eqx.field(static=True)
    tol: float = eqx.field(static=True)

    def __check_init__(self):
        where = "normal_cg(maxiter, tol)"
        _check_count(self.maxiter, "maxiter", where, 1)
        _check_number(self.tol, "tol", where, positive=False)

    def _solve(self, matvec, b, scale, x0, matvec_at):
        del matvec_at
        transpose = jax.linear_transpose(matvec, b)
        normal = lambda v: transpose(matvec(v))[0]  # noqa: E731
        x, stats = CG(self.maxiter, self.tol)._solve(normal, transpose(b)[0], scale, x0, None)
        return x, {"solve_residual": _relative_residual(matvec, x, b),
                   "solve_iterations": stats["solve_iterations"]}

    def stats_template(self, dtype):
        return _zeros(dtype, "solve_residual", "solve_iterations")


class Neumann(AbstractLinearSolver):
    """Truncated Neumann series H⁻¹ ≈ α Σ_{j≤k} (I − αH)^j. See `bilevel.neumann`."""

    terms: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    per_term: ClassVar[bool] = True

    def __check_init__(self):
        where = "neumann(terms, alpha)"
        _check_count(self.terms, "terms", where, 0)
        _check_number(self.alpha, "alpha", where, positive=True)

    def _solve(self, matvec, b, scale, x0, matvec_at):
        # From a warm start x0 the series is applied to the residual b − H x0 and added to
        # x0 (Richardson iteration from x0); from zero that is the plain series.
        op = (lambda v, k: matvec(v)) if matvec_at is None else matvec_at  # noqa: E731
        alpha = float(self.alpha)  # a Python float keeps b's dtype (np.float64 would promote it)
        x0, r0 = _start(op, b, x0)
        first = _tmap(lambda x: alpha * x, r0)
        n0 = tree_norm(first)

        def step(carry, k):
            term, total, norm, max_ratio = carry
            term = _tmap(lambda t, ht: t - alpha * ht, term, op(term, k))
            new_norm = tree_norm(term)
            ratio = new_norm / jnp.where(norm > 0, norm, 1.0)
            max_ratio = jnp.maximum(max_ratio, jnp.where(norm > 0, ratio, 0.0))
            return (term, _tmap(jnp.add, total, term), new_norm, max_ratio), None

        init = (first, first, n0, jnp.zeros_like(n0))
        ks = jnp.arange(self.terms, dtype=jnp.int32)
        (term, total, norm, max_ratio), _ = jax.lax.scan(step, init, ks, length=self.terms)
        total = _tmap(jnp.add, x0, total)
        finite = jnp.all(jnp.isfinite(norm)) & jnp.isfinite(tree_norm(total))
        diverged = ~(max_ratio < 1.0) | ~finite  # written so that NaN counts as diverged
        return total, {
            "solve_residual": _relative_residual(matvec, total, b),
            "neumann_last_term": norm * scale.astype(norm.dtype),
            "neumann_ratio": max_ratio,
            "neumann_diverged": diverged.astype(n0.dtype),
        }

    def stats_template(self, dtype):
        return _zeros(dtype, "solve_residual", "neumann_last_term", "neumann_ratio", "neumann_diverged")


class Identity(AbstractLinearSolver):
    """H⁻¹ ≈ I: the one-step / T1−T2 / greedy approximation. See `bilevel.identity`."""

    per_term: ClassVar[bool] = True     # no operator is applied at all

    def _solve(self, matvec, b, scale, x0, matvec_at):
        del scale, x0, matvec_at
        return b, {"solve_residual": _relative_residual(matvec, b, b)}

    def stats_template(self, dtype):
        return _zeros(dtype, "solve_residual")


def exact() -> Exact:
    """Solve the implicit-function linear system exactly with a dense factorisation.

    Materialises the inner Hessian (one Hessian-vector product per parameter) and solves
    with `jnp.linalg.solve`. Exact up to rounding; for small problems (a few thousand
    parameters) and as a reference.

    **Returns:**

    A linear solver for `bilevel.implicit`. Its stats: `solve_residual` (‖Hx − b‖/‖b‖).

    **Example:**

    ```python
    import optax
    import bilevel as bl

    method = bl.implicit(bl.unroll(optax.sgd(0.1), steps=500), bl.exact())
    ```
    """
    return Exact()


def cg(maxiter: int = 100, tol: float = 1e-6, *, atol: float = 0.0) -> CG:
    """Solve the implicit-function linear system by conjugate gradient (HOAG, Pedregosa 2016).

    Needs only Hessian-vector products; stops after `maxiter` iterations or when
    ‖Hx − b‖ ≤ max(tol·‖b‖, atol). The inner Hessian must be symmetric positive definite
    (a strict local minimum); use `bilevel.gmres` otherwise. This tolerance belongs to the
    backward solve only and is independent of how the forward solve was stopped.

    **Arguments:**

    - `maxiter`: maximum number of CG iterations (Hessian-vector products), >= 1.
    - `tol`: relative residual tolerance, >= 0.
    - `atol`: absolute residual tolerance, >= 0.

    **Returns:**

    A linear solver for `bilevel.implicit`. Its stats: `solve_residual` (true relative
    residual ‖Hx − b‖/‖b‖), `solve_iterations` and `solve_negative_curvature` (True when
    CG met a direction with pᵀHp ≤ 0: H is not positive definite at w, the IFT system is
    not a minimum's, and the result is unreliable; use `bilevel.gmres` or converge the
    inner solve).

    **Example:**

    ```python
    import optax
    import bilevel as bl

    method = bl.implicit(bl.unroll(optax.sgd(0.1), steps=500), bl.cg(maxiter=50, tol=1e-10))
    ```
    """
    return CG(_py(maxiter), _py(tol), _py(atol))


def gmres(maxiter: int = 10, tol: float = 1e-6, *, restart: int = 20) -> GMRES:
    """Solve the implicit-function linear system by restarted GMRES.

    For inner Hessians that are indefinite (a saddle point, an unconverged forward solve)
    where CG may break down. Uses `jax.scipy.sparse.linalg.gmres`.

    **Arguments:**

    - `maxiter`: maximum number of restart cycles, >= 1.
    - `tol`: relative residual tolerance, >= 0.
    - `restart`: Krylov subspace size per cycle (Hessian-vector products per cycle), >= 1.

    **Returns:**

    A linear solver for `bilevel.implicit`. Its stats: `solve_residual` (‖Hx − b‖/‖b‖).

    **Example:**

    ```python
    import optax
    import bilevel as bl

    method = bl.implicit(bl.unroll(optax.sgd(0.1), steps=500), bl.gmres(maxiter=5, tol=1e-8))
    ```
    """
    return GMRES(_py(maxiter), _py(tol), _py(restart))


def neumann(terms: int, alpha: float) -> Neumann:
    """Approximate H⁻¹ by the truncated Neumann series α Σ_{j=0}^{terms} (I − αH)^j.

    (Lorraine et al. 2020.) Costs `terms` Hessian-vector products. The error decays like
    ρ^(terms+1) with ρ the spectral radius of I − αH; the series converges only when
    ρ < 1, i.e. 0 < α < 2/λ_max(H) and H positive definite. On an indefinite H (negative
    eigenvalues, e.g. an unconverged network) the series converges to the wrong answer or
    not at all, often without any term growing; `solve_residual` (‖Hx − b‖/‖b‖ of the
    result, one extra Hessian-vector product) shows it. Its stats report
    `neumann_last_term` (norm of the last term added), `neumann_ratio` (largest ratio of
    successive term norms, a lower bound on ρ) and `neumann_diverged`, set when a term grew
    (which proves ρ > 1 since I − αH is symmetric) or the sum is not finite.

    **Arguments:**

    - `terms`: k >= 0, the highest power in the series (`terms=0` gives αI).
    - `alpha`: step size α > 0.

    **Returns:**

    A linear solver for `bilevel.implicit`.

    **Example:**

    ```python
    import optax
    import bilevel as bl

    method = bl.implicit(bl.unroll(optax.adam(1e-2), steps=2000), bl.neumann(terms=20, alpha=0.01))
    ```
    """
    return Neumann(_py(terms), _py(alpha))


def identity() -> Identity:
    """Approximate H⁻¹ by the identity (one-step / T1−T2 / greedy hypergradient).

    The hypergradient becomes ∂L_V/∂λ − (∂²L_T/∂λ∂w)ᵀ ∂L_V/∂w (Luketina et al. 2016):
    no linear solve at all. Equivalent to `neumann(terms=0, alpha=1.0)`. An approximation
    unless H = I; its error is reported as `solve_residual` (‖Hb − b‖/‖b‖, one
    Hessian-vector product).

    **Returns:**

    A linear solver for `bilevel.implicit`. Its stats: `solve_residual`.

    **Example:**

    ```python
    import optax
    import bilevel as bl

    method = bl.implicit(bl.unroll(optax.sgd(0.1), steps=100), bl.identity())
    ```
    """
    return Identity()


def bicgstab(maxiter: int = 100, tol: float = 1e-6) -> BiCGStab:
    """Solve the implicit-function linear system by BiCGStab (`jax.scipy.sparse.linalg.bicgstab`).

    Valid for non-symmetric systems (the conditions of `bilevel.prox_fixed_point` with a
    non-flat prox, `bilevel.kkt`, `bilevel.fixed_point`), with two Jacobian-vector products
    per iteration and constant memory; it can break down on some systems, which the reported
    `solve_residual` shows (then use `gmres` or `normal_cg`).

    **Arguments:**

    - `maxiter`: maximum number of iterations, >= 1.
    - `tol`: relative residual tolerance, >= 0.

    **Returns:**

    A linear solver for `bilevel.implicit`. Its stats: `solve_residual` (‖Jx − b‖/‖b‖).

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    T = lambda w, lam, _: 0.5 * jnp.roll(w, 1) + lam
    method = bl.implicit(bl.solver(lambda lam, w0, b: 2.0 * lam * jnp.ones_like(w0)),
                         bl.bicgstab(tol=1e-10), condition=bl.fixed_point(T))
    ```
    """
    return BiCGStab(_py(maxiter), _py(tol))


def normal_cg(maxiter: int = 100, tol: float = 1e-6) -> NormalCG:
    """Solve the implicit-function linear system J x = b by CG on the normal equations JᵀJ x = Jᵀb.

    Valid for any nonsingular J, symmetric or not (one Jacobian-vector and one
    vector-Jacobian product per iteration), at the price of squaring the condition number.
    The tolerance applies to the normal equations; the reported `solve_residual` is that of
    the original system, ‖Jx − b‖/‖b‖.

    **Arguments:**

    - `maxiter`: maximum number of CG iterations, >= 1.
    - `tol`: relative residual tolerance on the normal equations, >= 0.

    **Returns:**

    A linear solver for `bilevel.implicit`. Its stats: `solve_residual`, `solve_iterations`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    method = bl.implicit(bl.proximal_gradient(bl.projection_simplex(), stepsize=0.1, steps=500),
                         bl.normal_cg(maxiter=200, tol=1e-12))
    ```
    """
    return NormalCG(_py(maxiter), _py(tol))
