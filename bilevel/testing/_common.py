"""What the exact problems defined by optimality conditions share.

[`bilevel.testing.AbstractConditionProblem`][] is the interface of the exact problems whose
inner problem is not smooth and unconstrained (Lasso, elastic net, box- and
simplex-constrained and KKT-form quadratic programs, fixed points); the helpers below are
the jit/vmap-friendly linear algebra they share and the NumPy sampling pieces.

The argument checks (`check_int`, `check_real`, `resolve_dtype`, `_rng`, ...) stay in
`_problems.py` and are imported from there.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._problem import Problem
from ._problems import _concrete

Array = jax.Array


class AbstractConditionProblem(eqx.Module):
    """An exact bilevel problem whose inner solution is defined by an optimality condition.

    Where [`bilevel.testing.AbstractExactProblem`][] assumes a smooth, unconstrained inner
    problem (`∇_w L_T = 0`, an inner Hessian), the problems here are characterised by a
    proximal-gradient fixed point (Lasso, elastic net), a projected-gradient fixed point
    or KKT system (constrained quadratic programs), or a fixed-point map (contractions).
    Each still knows its response `w*(λ)`, validation value and exact hypergradient
    `d L_V(w*(λ), λ)/dλ` in closed form, written with `jax.numpy` linear algebra only
    (no autodiff of the losses), computed in the problem's `dtype`, and usable under `jit`
    and `vmap` (over hyperparameters, or over instances stacked leaf-wise).

    **Fixed support.** A nonsmooth or constrained solution is piecewise smooth in λ: its
    support (Lasso) or active set (constraints) changes at finitely many λ. Each instance
    stores the support or active set of its solution at the default hyperparameters
    `hparams` (computed when it is built, and checked there against the optimality
    conditions in float64), and the closed forms are those of that piece. They are exact
    wherever that support is still optimal, which `is_valid` tells (a neighbourhood of
    `hparams`; instances from `sample` have margins that make it a wide one). Elsewhere
    `response`, `value` and `hypergrad` return NaN rather than a wrong number.

    Concrete classes: [`bilevel.testing.Lasso`][], [`bilevel.testing.ElasticNet`][],
    [`bilevel.testing.BoxQP`][], [`bilevel.testing.NonnegativeLeastSquares`][],
    [`bilevel.testing.SimplexLeastSquares`][], [`bilevel.testing.EqualityQP`][],
    [`bilevel.testing.InequalityQP`][] and [`bilevel.testing.Contraction`][].

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.Lasso.sample(0, dim=6)
    lams = exact.hparams + jnp.linspace(-1e-3, 1e-3, 3)   # near the default λ
    ws, gs = jax.vmap(lambda lam: (exact.response(lam), exact.hypergrad(lam)))(lams)
    assert bool(jax.vmap(exact.is_valid)(lams).all())      # the stored support is still optimal
    ```
    """

    @property
    @abc.abstractmethod
    def problem(self) -> Problem:
        """The `bilevel.Problem` whose losses this instance's data is for."""

    @property
    @abc.abstractmethod
    def hparams(self) -> Array:
        """The default hyperparameters (those the stored support or active set is for)."""

    @property
    @abc.abstractmethod
    def params0(self):
        """A default initial value of the inner parameters."""

    @property
    @abc.abstractmethod
    def inner_batch(self):
        """The batch to pass to `problem.inner` (and to the condition's maps)."""

    @property
    @abc.abstractmethod
    def outer_batch(self):
        """The batch to pass to `problem.outer`."""

    @property
    @abc.abstractmethod
    def dtype(self) -> np.dtype:
        """The floating dtype of the data and of every output."""

    @abc.abstractmethod
    def _cast(self, hparams) -> Array:
        """Check the shape of `hparams` and cast them to `dtype`."""

    @abc.abstractmethod
    def is_valid(self, hparams) -> Array:
        """Whether the stored support / active set is optimal at `hparams`.

        The optimality conditions (signs on the support, subgradient bounds off it;
        feasibility and multiplier signs for constraints) are checked with a relative
        tolerance of `sqrt(eps)` of the dtype, so the boundary of the valid region counts
        as valid (the response is continuous there).

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        A boolean scalar array (works under `jit` and `vmap`).
        """

    @abc.abstractmethod
    def response(self, hparams):
        """The exact inner solution `w*(λ)` (NaN where `is_valid(hparams)` is false).

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        A pytree shaped like `self.params0`.
        """

    @abc.abstractmethod
    def hypergrad(self, hparams) -> Array:
        """The exact hypergradient `d L_V(w*(λ), λ)/dλ` (NaN where not valid).

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        An array shaped like `hparams`.
        """

    def value(self, hparams) -> Array:
        """The validation loss at the exact response, `L_V(w*(λ), λ)` (NaN where not valid).

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        A scalar array of dtype `self.dtype`.
        """
        lam = self._cast(hparams)
        return self.problem.outer(self.response(lam), lam, self.outer_batch)


# ----------------------------------------------------------------------------------------------
# jax.numpy helpers (traceable).
# ----------------------------------------------------------------------------------------------


def tolerance(dtype) -> float:
    """The relative tolerance of the validity checks: `sqrt(eps)` of `dtype`."""
    return float(np.sqrt(np.finfo(dtype).eps))


def nan_unless(valid: Array, tree):
    """`tree` where `valid`, NaN (same shapes) elsewhere; `None` leaves stay `None`."""
    return jax.tree.map(lambda x: jnp.where(valid, x, jnp.nan), tree)


def masked_solve(H: Array, mask: Array, rhs: Array) -> Array:
    """`z` with `z_S = H_SS⁻¹ rhs_S` and `z = 0` off `S = mask`, as one dense `(d, d)` solve.

    The matrix `P H P + (I − P)` (`P = diag(mask)`) is block-diagonal up to a permutation,
    `H_SS` beside an identity, so its solve gives `H_SS⁻¹ rhs_S` on `S` and the (zeroed)
    right-hand side off it; its shape does not depend on `S`, so it traces once.
    """
    m = mask.astype(H.dtype)
    M = H * m[:, None] * m[None, :] + jnp.diag(1 - m)
    return jnp.linalg.solve(M, m.reshape((-1,) + (1,) * (rhs.ndim - 1)) * rhs)


def max_abs(x: Array) -> Array:
    """`max |x|`, 0 for an empty array."""
    return jnp.max(jnp.abs(x), initial=0.0)


# ----------------------------------------------------------------------------------------------
# Host-side (NumPy float64) helpers for construction and sampling.
# ----------------------------------------------------------------------------------------------


def host(x) -> np.ndarray:
    """`x` as a float64 NumPy array, or an error if it is being traced."""
    value = _concrete(jnp.asarray(x))
    if value is None:
        raise TypeError(
            "Building this exact problem checks its optimality conditions with NumPy and "
            "needs concrete arrays; got a traced value (it was built inside jit, vmap or "
            "grad). Build the instance outside the transformation and pass it in, or stack "
            "instances with jax.tree.map(lambda *xs: jnp.stack(xs), *problems)."
        )
    return value.astype(np.float64)


def fraction_size(rng: np.random.Generator, d: int) -> int:
    """A count in [30 %, 70 %] of `d`: at least 1, and at most `d − 1` when `d >= 2`."""
    lo = max(1, int(np.ceil(0.3 * d)))
    hi = max(lo, min(d - 1, int(np.floor(0.7 * d))))
    return int(rng.integers(lo, hi + 1))


def spd(rng: np.random.Generator, d: int, max_condition: float) -> np.ndarray:
    """A Haar-rotated symmetric matrix with eigenvalues log-uniform in [1, max_condition]."""
    from ._problems import _orthonormal, _spectrum

    V = _orthonormal(rng, d, d)
    Q = (V * _spectrum(rng, d, max_condition)) @ V.T
    return 0.5 * (Q + Q.T)


def design(rng: np.random.Generator, n: int, d: int, max_condition: float):
    """`(U, sv, V)` with `X = U diag(sv) Vᵀ` and `XᵀX/n` eigenvalues in [1, max_condition]."""
    from ._problems import _orthonormal, _spectrum

    U, V = _orthonormal(rng, n, d), _orthonormal(rng, d, d)
    return U, np.sqrt(n * _spectrum(rng, d, max_condition)), V


def targets_with_moment(rng, U, sv, V, moment, noise):
    """`y` with `Xᵀy/n = moment` for `X = U diag(sv) Vᵀ`, plus noise orthogonal to range(X)."""
    n = U.shape[0]
    eps = noise * rng.standard_normal(n)
    return U @ (n * (V.T @ moment) / sv) + eps - U @ (U.T @ eps)


def check_spd(where: str, name: str, Q: np.ndarray, fix: str) -> None:
    """Raise unless the float64 matrix `Q` is symmetric positive definite."""
    sym = np.max(np.abs(Q - Q.T), initial=0.0) <= 1e-6 * max(1.0, np.max(np.abs(Q)))
    low = np.linalg.eigvalsh(0.5 * (Q + Q.T))[0] if sym else -np.inf
    if not (sym and low > 1e-12 * max(1.0, np.max(np.abs(Q)))):
        raise ValueError(
            f"{where} requires {name} to be symmetric positive definite; got "
            f"{'a non-symmetric matrix' if not sym else f'smallest eigenvalue {low:.3g}'}. "
            f"{fix}"
        )
