"""A best response affine in λ ([`bilevel.testing.AffineResponse`][]), which a linear
hypernet can represent exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._problem import Problem
from ._common import (
    _cast_hparams,
    _check_shapes,
    _floats,
    _rng,
    check_int,
    resolve_dtype,
)
from ._exact import AbstractExactProblem
from ._ridge import _ridge_outer

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# Losses: pure functions of (params, hparams, batch); all data comes from the batch.
# ----------------------------------------------------------------------------------------------


def _affine_inner(w, lam, batch):
    """½‖w − Aλ − b‖²."""
    A, b = batch
    return 0.5 * jnp.sum((w - A @ lam - b) ** 2)


_AFFINE_PROBLEM = Problem(inner=_affine_inner, outer=_ridge_outer)


class AffineResponse(AbstractExactProblem):
    """A problem whose best response is affine in λ, so a linear hypernet can be exact.

        L_T(w, λ) = ½‖w − Aλ − b‖²        L_V(w, λ) = 1/(2m)‖Xv w − yv‖²

    with `w*(λ) = Aλ + b`, inner Hessian `I`, and hypergradient `Aᵀ Xvᵀ(Xv w* − yv)/m`.
    λ is a `(k,)` vector, w a `(d,)` vector. A linear hypernet trained on it by
    `bilevel.hypertrain_global` must recover `A` and `b` (up to optimisation error).

    **Arguments:**

    - `A`: the response's slope, shape `(d, k)`.
    - `b`: the response's intercept, shape `(d,)`.
    - `Xv`: validation inputs, shape `(m, d)`.
    - `yv`: validation targets, shape `(m,)`.
    - `lam`: the default hyperparameters, shape `(k,)` (a scalar is broadcast); default `0.0`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.AffineResponse.sample(0, dim=4, num_hparams=2)
    w = exact.response(exact.hparams)            # A λ + b
    assert jnp.allclose(w, exact.A @ exact.hparams + exact.b)
    ```
    """

    A: Array
    b: Array
    Xv: Array
    yv: Array
    lam: Array

    def __init__(self, A, b, Xv, yv, lam=0.0):
        A, b, Xv, yv, lam = _floats(A, b, Xv, yv, lam)
        where = "AffineResponse(A, b, Xv, yv)"
        ok = (A.ndim == 2 and min(A.shape) >= 1 and b.shape == A.shape[:1] and Xv.ndim == 2
              and Xv.shape[1] == A.shape[0] and Xv.shape[0] >= 1 and yv.shape == Xv.shape[:1])
        _check_shapes(where, "A of shape (d, k), b of shape (d,), Xv of shape (m, d) and yv of "
                      "shape (m,) with d, k, m >= 1", ok, A=A, b=b, Xv=Xv, yv=yv)
        k = A.shape[1]
        _check_shapes("AffineResponse(lam=...)", f"lam of shape () or ({k},)", lam.shape in ((), (k,)), lam=lam)
        self.A, self.b, self.Xv, self.yv = A, b, Xv, yv
        self.lam = jnp.broadcast_to(lam, (k,))

    @classmethod
    def sample(cls, key, *, dim=5, num_hparams=3, n_val=None, dtype=None) -> "AffineResponse":
        """Draw a random instance: `A`, `b`, `Xv`, `yv` standard normal, `λ = 0`.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the number of parameters `d >= 1`.
        - `num_hparams`: the number of hyperparameters `k >= 1`.
        - `n_val`: validation rows, `>= 1` (default `2 * dim`).
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        An `AffineResponse` instance.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.AffineResponse.sample(1, dim=3, num_hparams=2)
        assert exact.A.shape == (3, 2)
        ```
        """
        where = "AffineResponse.sample"
        rng = _rng(key, where)
        dim = check_int(dim, "dim", where, 1, 5)
        k = check_int(num_hparams, "num_hparams", where, 1, 3)
        n_val = 2 * dim if n_val is None else check_int(n_val, "n_val", where, 1, 2 * dim)
        dt = resolve_dtype(dtype, where)
        arrays = (rng.standard_normal((dim, k)), rng.standard_normal(dim),
                  rng.standard_normal((n_val, dim)), rng.standard_normal(n_val), np.zeros(k))
        return cls(*(jnp.asarray(a, dt) for a in arrays))

    @property
    def problem(self) -> Problem:
        return _AFFINE_PROBLEM

    @property
    def hparams(self) -> Array:
        return self.lam

    @property
    def params0(self) -> Array:
        return jnp.zeros(self.A.shape[0], self.dtype)

    @property
    def inner_batch(self):
        return (self.A, self.b)

    @property
    def outer_batch(self):
        return (self.Xv, self.yv)

    @property
    def dtype(self):
        return self.A.dtype

    def _cast(self, hparams):
        k = self.A.shape[1]
        return _cast_hparams(hparams, (k,), self.dtype, "AffineResponse", f"{k} hyperparameters")

    def response(self, hparams):
        """`Aλ + b`; see [`AbstractExactProblem.response`][]."""
        return self.A @ self._cast(hparams) + self.b

    def hessian(self, hparams):
        """The identity; see [`AbstractExactProblem.hessian`][]."""
        del hparams
        return jnp.eye(self.A.shape[0], dtype=self.dtype)

    def hypergrad(self, hparams):
        """`Aᵀ Xvᵀ(Xv w* − yv)/m`; see [`AbstractExactProblem.hypergrad`][]."""
        w = self.response(hparams)
        return self.A.T @ (self.Xv.T @ (self.Xv @ w - self.yv)) / self.Xv.shape[0]

    def identity_hypergrad(self, hparams):
        """Equal to the hypergradient, since the Hessian is `I`; see [`AbstractExactProblem.identity_hypergrad`][]."""
        return self.hypergrad(hparams)
