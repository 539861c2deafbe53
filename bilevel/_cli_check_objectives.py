"""`bilevel check` rows for the outer objectives: the k-fold cross-validation, Laplace-evidence
and ELBO hypergradients against their closed forms on small problems (under a second or two)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._compile import hypergrad
from ._implicit import implicit, solver
from ._linear_solvers import exact
from ._objectives import gaussian_q


def _map_fit(h, w0, batch):
    """The MAP of Bayesian linear regression, (αI + βXᵀX)⁻¹βXᵀy."""
    X, y = batch
    A = jnp.exp(h[0]) * jnp.eye(X.shape[1], dtype=X.dtype) + jnp.exp(h[1]) * X.T @ X
    return jnp.linalg.solve(A, jnp.exp(h[1]) * X.T @ y)


def _q_fit(h, q0, batch):
    """The best diagonal Gaussian q: mean = MAP, σ_i² = 1/A_ii."""
    X, _ = batch
    A = jnp.exp(h[0]) * jnp.eye(X.shape[1], dtype=X.dtype) + jnp.exp(h[1]) * X.T @ X
    return {"mean": _map_fit(h, None, batch), "log_std": -0.5 * jnp.log(jnp.diag(A))}


def _newton_step(loss):
    """One Newton step on the flattened parameters: the exact minimiser of a quadratic loss."""
    def fit(h, params0, batch):
        flat, unravel = ravel_pytree(params0)
        f = lambda v: loss(unravel(v), h, batch)  # noqa: E731
        return unravel(flat - jnp.linalg.solve(jax.hessian(f)(flat), jax.grad(f)(flat)))
    return fit


def _row(name: str, value, target, note: str) -> dict:
    value, target = float(value), float(target)
    rel = abs(value - target) / max(abs(target), np.finfo(np.float64).tiny)
    return {"name": name, "value": value, "target": target, "rel_error": rel, "exact": True, "note": note}


def check_rows(x64: bool) -> list[dict]:
    """The objectives' hypergradients against their closed forms, as `bilevel check` rows.

    Every method here is exact (the implicit function theorem with a dense solve at an inner
    solution reached to machine precision), so `rel_error` is rounding: ~1e-15 under float64,
    ~1e-7 to 1e-6 under float32 (the data and the closed forms' inputs are then float32).

    **Arguments:**

    - `x64`: compute in float64 (True) or float32 (False).

    **Returns:**

    A list of dicts `{"name", "value", "target", "rel_error", "exact", "note"}`.
    """
    if not isinstance(x64, bool):
        raise TypeError(f"check_rows(x64) requires a bool; got {type(x64).__name__} {x64!r}.")
    # tiny programs: compile them with XLA's optimisations mostly off (half the compile time);
    # the setting is restored on the way out
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        # GPUs multiply float32 matrices in TF32 by default (about 1e-3 relative); the check
        # compares implementations with closed forms, so it asks for full float32 products.
        with jax.default_matmul_precision("highest"):
            return _rows(x64)
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def _rows(x64: bool) -> list[dict]:
    from .testing._bayes import BayesianLinearRegression, KFoldRidge

    rows = []
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        cv = KFoldRidge.sample(0, n=20, dim=3, k=4, log_lam=-1.0, dtype=dtype)
        blr = BayesianLinearRegression.sample(0, n=30, dim=3, dtype=dtype)
        cv_hg = hypergrad(cv.problem, implicit(solver(_newton_step(cv.problem.inner)), exact()))
        ev_hg = hypergrad(blr.evidence_problem, implicit(solver(_map_fit), exact()))
        elbo_hg = hypergrad(blr.elbo_problem, implicit(solver(_q_fit), exact()))

        @jax.jit
        def all_three(cv_h, h):           # one compiled program for the three checks
            return (cv_hg(cv_h, cv.params0, cv.batch, cv.batch),
                    ev_hg(h, blr.params0, blr.batch, blr.batch),
                    elbo_hg(h, gaussian_q(blr.params0, 0.0), blr.batch, blr.batch))

        h = blr.hparams
        cv_out, ev_out, elbo_out = all_three(cv.hparams, h)
        rows.append(_row("kfold CV dQ/dlog λ (ridge, k=4)", cv_out.grad, cv.hypergrad(cv.hparams),
                         "kfold + implicit(solver(one Newton step: the quadratic's minimiser), exact) vs the mean "
                         "of per-fold closed-form ridge hypergradients"))
        rows.append(_row("Laplace −log evidence (Bayesian linear regression)", ev_out.value, -blr.log_evidence(h),
                         "laplace_evidence at the MAP vs Bishop 2006 eq. 3.86 (Laplace is exact here)"))
        evidence, elbo = -blr.log_evidence_grad(h), -blr.elbo_grad(h)
        for i, name in enumerate(("log α", "log β")):
            rows.append(_row(f"Laplace evidence hypergradient d/d{name}", ev_out.grad[i], evidence[i],
                             "implicit(solver(MAP), exact) vs the hand-derived gradient of eq. 3.86"))
        for i, name in enumerate(("log α", "log β")):
            rows.append(_row(f"−ELBO hypergradient d/d{name} (diagonal Gaussian q)", elbo_out.grad[i], elbo[i],
                             "gaussian_elbo (closed-form expectation) at the optimal q vs the envelope closed form"))
    return rows
