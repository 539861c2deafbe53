"""Ridge regression with one log-penalty ([`bilevel.testing.Ridge`][]) or one per coordinate
([`bilevel.testing.RidgePerCoordinate`][]), with closed-form responses and hypergradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._problem import Problem
from ._common import (
    _cast_hparams,
    _check_regression,
    _check_shapes,
    _floats,
    _regression_sizes,
    _rng,
    _sample_regression,
    check_real,
    resolve_dtype,
)
from ._exact import AbstractExactProblem

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# Losses: pure functions of (params, hparams, batch); all data comes from the batch.
# ----------------------------------------------------------------------------------------------


def _ridge_inner(w, log_lam, batch):
    """1/(2n)‖Xw − y‖² + ½ Σ_i e^{λ_i} w_i²; λ is a scalar or one log-penalty per coordinate."""
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(log_lam) * w**2)


def _ridge_outer(w, log_lam, batch):
    """1/(2m)‖Xv w − yv‖²."""
    del log_lam
    Xv, yv = batch
    return 0.5 * jnp.mean((Xv @ w - yv) ** 2)


_RIDGE_PROBLEM = Problem(inner=_ridge_inner, outer=_ridge_outer)


# ----------------------------------------------------------------------------------------------
# Ridge regression (shared closed forms for one penalty or one per coordinate).
# ----------------------------------------------------------------------------------------------


def _ridge_hessian(X, rho):
    """XᵀX/n + diag(ρ), ρ a scalar or a (d,) vector of penalties e^λ."""
    n, d = X.shape
    return X.T @ X / n + jnp.diag(jnp.broadcast_to(rho, (d,)))


def _ridge_solution(X, y, Xv, yv, rho):
    """(H, w*, ∂L_V/∂w at w*) for penalties ρ."""
    H = _ridge_hessian(X, rho)
    w = jnp.linalg.solve(H, X.T @ y / X.shape[0])
    g = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    return H, w, g


def _ridge_coordinate_hypergrad(X, y, Xv, yv, rho):
    """dL_V/dλ_i = −ρ_i w*_i (H⁻¹ ∂L_V/∂w)_i, since ∂(∇_w L_T)/∂λ_i = ρ_i w_i e_i."""
    H, w, g = _ridge_solution(X, y, Xv, yv, rho)
    return -(rho * w) * jnp.linalg.solve(H, g)


def _ridge_coordinate_identity(X, y, Xv, yv, rho):
    """−ρ_i w*_i (∂L_V/∂w)_i: the IFT expression with H⁻¹ replaced by I."""
    _, w, g = _ridge_solution(X, y, Xv, yv, rho)
    return -(rho * w) * g


# ----------------------------------------------------------------------------------------------
# Concrete problems.
# ----------------------------------------------------------------------------------------------


class _AbstractRidge(AbstractExactProblem):
    """What `Ridge` and `RidgePerCoordinate` share: data, losses, response and Hessian.

    The penalty `e^λ` is a scalar (`Ridge`) or one per coordinate (`RidgePerCoordinate`);
    `_cast` gives it the right shape, and the formulas broadcast over it.
    """

    X: Array
    y: Array
    Xv: Array
    yv: Array
    log_lam: Array

    @property
    def problem(self) -> Problem:
        return _RIDGE_PROBLEM

    @property
    def hparams(self) -> Array:
        return self.log_lam

    @property
    def params0(self) -> Array:
        return jnp.zeros(self.X.shape[1], self.dtype)

    @property
    def inner_batch(self):
        return (self.X, self.y)

    @property
    def outer_batch(self):
        return (self.Xv, self.yv)

    @property
    def dtype(self):
        return self.X.dtype

    def response(self, hparams):
        """`w*(λ) = (XᵀX/n + diag(e^λ))⁻¹ Xᵀy/n`; see [`AbstractExactProblem.response`][]."""
        rho = jnp.exp(self._cast(hparams))
        return _ridge_solution(self.X, self.y, self.Xv, self.yv, rho)[1]

    def hessian(self, hparams):
        """`XᵀX/n + diag(e^λ)`; see [`AbstractExactProblem.hessian`][]."""
        return _ridge_hessian(self.X, jnp.exp(self._cast(hparams)))


class Ridge(_AbstractRidge):
    """Ridge regression with one log-penalty: the classic hyperparameter-tuning problem.

        L_T(w, λ) = 1/(2n)‖Xw − y‖² + ½ e^λ ‖w‖²        L_V(w, λ) = 1/(2m)‖Xv w − yv‖²

    with `w*(λ) = (XᵀX/n + e^λ I)⁻¹ Xᵀy/n`. The hyperparameter is the scalar `log λ`.
    The inner Hessian `XᵀX/n + e^λ I` does not depend on `w`.

    **Arguments:**

    - `X`: training inputs, shape `(n, d)`.
    - `y`: training targets, shape `(n,)`.
    - `Xv`: validation inputs, shape `(m, d)`.
    - `yv`: validation targets, shape `(m,)`.
    - `log_lam`: the default hyperparameter (scalar log-penalty), default `0.0`.

    All arrays are converted to one common floating dtype.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.Ridge.sample(0, dim=4, max_condition=10.0)
    w = exact.response(exact.hparams)                    # closed-form w*(λ)
    g = exact.hypergrad(exact.hparams)                   # exact dL_V/dλ
    gs = jax.vmap(exact.hypergrad)(jnp.linspace(-2.0, 1.0, 5))   # many λ at once
    ```
    """

    def __init__(self, X, y, Xv, yv, log_lam=0.0):
        X, y, Xv, yv, log_lam = _floats(X, y, Xv, yv, log_lam)
        _check_regression("Ridge(X, y, Xv, yv)", X, y, Xv, yv)
        _check_shapes("Ridge(log_lam=...)", "a scalar log_lam", log_lam.shape == (),
                      log_lam=log_lam)
        self.X, self.y, self.Xv, self.yv, self.log_lam = X, y, Xv, yv, log_lam

    @classmethod
    def sample(
        cls, key, *, dim=5, n_train=None, n_val=None, max_condition=10.0, noise=0.5,
        log_lam=0.0, dtype=None,
    ) -> "Ridge":
        """Draw a random instance whose inner Hessian has condition number <= `max_condition`.

        `X = U diag(s) Vᵀ` with `U`, `V` Haar-random orthonormal and `s_i² / n`
        log-uniform in `[1, max_condition]`, so `cond(XᵀX/n + e^λ I) <= max_condition` for
        every λ. Targets are `y = X w₀ + noise·ε` and `yv = Xv w₀ + noise·ε'` with
        `w₀, ε, ε', Xv` standard normal.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key (e.g. `jax.random.key(0)`).
        - `dim`: the number of parameters `d >= 1`.
        - `n_train`: training rows, `>= dim` (default `2 * dim`).
        - `n_val`: validation rows, `>= 1` (default `2 * dim`).
        - `max_condition`: bound `>= 1` on the inner Hessian's condition number.
        - `noise`: target noise standard deviation, `>= 0`.
        - `log_lam`: the default hyperparameter stored in the instance.
        - `dtype`: a floating dtype; default `None` is float64 when `jax_enable_x64` is on,
          float32 otherwise.

        **Returns:**

        A `Ridge` instance.

        **Example:**

        ```python
        import jax.numpy as jnp
        import bilevel.testing as blt

        exact = blt.Ridge.sample(1, dim=3, dtype=jnp.float32)
        assert exact.X.dtype == jnp.float32
        ```
        """
        where = "Ridge.sample"
        rng = _rng(key, where)
        dim, n_train, n_val, max_condition, noise = _regression_sizes(
            where, dim, n_train, n_val, max_condition, noise)
        log_lam = check_real(log_lam, "log_lam", where, low=-np.inf, strict=True, example=0.0)
        dt = resolve_dtype(dtype, where)
        X, y, Xv, yv = _sample_regression(rng, dim, n_train, n_val, max_condition, noise)
        return cls(*(jnp.asarray(a, dt) for a in (X, y, Xv, yv, log_lam)))


    def _cast(self, hparams):
        return _cast_hparams(hparams, (), self.dtype, "Ridge", "a scalar log-penalty log λ")

    def hypergrad(self, hparams):
        """`−e^λ w*ᵀ H⁻¹ Xvᵀ(Xv w* − yv)/m`; see [`AbstractExactProblem.hypergrad`][]."""
        rho = jnp.exp(self._cast(hparams))
        return jnp.sum(_ridge_coordinate_hypergrad(self.X, self.y, self.Xv, self.yv, rho))

    def identity_hypergrad(self, hparams):
        """`−e^λ w*ᵀ Xvᵀ(Xv w* − yv)/m`; see [`AbstractExactProblem.identity_hypergrad`][]."""
        rho = jnp.exp(self._cast(hparams))
        return jnp.sum(_ridge_coordinate_identity(self.X, self.y, self.Xv, self.yv, rho))


class RidgePerCoordinate(_AbstractRidge):
    """Ridge regression with one log-penalty per coordinate (a `d`-dimensional λ).

        L_T(w, λ) = 1/(2n)‖Xw − y‖² + ½ Σ_i e^{λ_i} w_i²      L_V(w, λ) = 1/(2m)‖Xv w − yv‖²

    with `w*(λ) = (XᵀX/n + diag(e^λ))⁻¹ Xᵀy/n`; the hypergradient is a `(d,)` vector.

    **Arguments:**

    - `X`: training inputs, shape `(n, d)`.
    - `y`: training targets, shape `(n,)`.
    - `Xv`: validation inputs, shape `(m, d)`.
    - `yv`: validation targets, shape `(m,)`.
    - `log_lam`: the default hyperparameters, shape `(d,)` (a scalar is broadcast);
      default `0.0`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.RidgePerCoordinate.sample(0, dim=4)
    g = exact.hypergrad(exact.hparams)          # shape (4,)
    assert g.shape == (4,)
    ```
    """

    def __init__(self, X, y, Xv, yv, log_lam=0.0):
        X, y, Xv, yv, log_lam = _floats(X, y, Xv, yv, log_lam)
        _check_regression("RidgePerCoordinate(X, y, Xv, yv)", X, y, Xv, yv)
        d = X.shape[1]
        _check_shapes("RidgePerCoordinate(log_lam=...)", f"log_lam of shape () or ({d},)",
                      log_lam.shape in ((), (d,)), log_lam=log_lam)
        self.X, self.y, self.Xv, self.yv = X, y, Xv, yv
        self.log_lam = jnp.broadcast_to(log_lam, (d,))

    @classmethod
    def sample(
        cls, key, *, dim=5, n_train=None, n_val=None, max_condition=10.0, noise=0.5,
        log_lam=0.0, dtype=None,
    ) -> "RidgePerCoordinate":
        """Draw a random instance; data drawn exactly as in [`bilevel.testing.Ridge.sample`][].

        `XᵀX/n` has condition number `<= max_condition`, so the inner Hessian
        `XᵀX/n + diag(e^λ)` has condition number `<= max(max_condition, e^{max λ − min λ})`;
        in particular `<= max_condition` at the default (constant) hyperparameters.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the number of parameters (and of hyperparameters) `d >= 1`.
        - `n_train`: training rows, `>= dim` (default `2 * dim`).
        - `n_val`: validation rows, `>= 1` (default `2 * dim`).
        - `max_condition`: bound `>= 1` on the condition number of `XᵀX/n`.
        - `noise`: target noise standard deviation, `>= 0`.
        - `log_lam`: the default hyperparameters, a float (broadcast) or a `(dim,)` array.
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        A `RidgePerCoordinate` instance.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.RidgePerCoordinate.sample(3, dim=2, log_lam=-1.0)
        assert exact.hparams.shape == (2,)
        ```
        """
        where = "RidgePerCoordinate.sample"
        rng = _rng(key, where)
        dim, n_train, n_val, max_condition, noise = _regression_sizes(
            where, dim, n_train, n_val, max_condition, noise)
        dt = resolve_dtype(dtype, where)
        lam = np.asarray(log_lam, dtype=np.float64)
        if lam.shape not in ((), (dim,)) or not np.all(np.isfinite(lam)):
            raise ValueError(
                f"{where} requires log_lam to be a finite float or a finite array of shape "
                f"({dim},); got {log_lam!r}. Pass e.g. log_lam=0.0."
            )
        X, y, Xv, yv = _sample_regression(rng, dim, n_train, n_val, max_condition, noise)
        return cls(*(jnp.asarray(a, dt) for a in (X, y, Xv, yv, lam)))


    def _cast(self, hparams):
        d = self.X.shape[1]
        return _cast_hparams(hparams, (d,), self.dtype, "RidgePerCoordinate",
                             f"one log-penalty per coordinate, {d} in all")

    def hypergrad(self, hparams):
        """`−e^{λ_i} w*_i (H⁻¹ ∂L_V/∂w)_i`; see [`AbstractExactProblem.hypergrad`][]."""
        rho = jnp.exp(self._cast(hparams))
        return _ridge_coordinate_hypergrad(self.X, self.y, self.Xv, self.yv, rho)

    def identity_hypergrad(self, hparams):
        """`−e^{λ_i} w*_i (∂L_V/∂w)_i`; see [`AbstractExactProblem.identity_hypergrad`][]."""
        rho = jnp.exp(self._cast(hparams))
        return _ridge_coordinate_identity(self.X, self.y, self.Xv, self.yv, rho)
