"""The quadratic of *Online Hyper-parameter Optimization* §4.1 ([`bilevel.testing.Quadratic004`][]),
with its analytic optimum λ†."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._problem import Problem
from ._common import (
    _cast_hparams,
    _check_positive,
    _check_shapes,
    _floats,
    _rng,
    _spectrum,
    check_int,
    check_range,
    check_real,
    resolve_dtype,
)
from ._exact import AbstractExactProblem

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# Losses: pure functions of (params, hparams, batch); all data comes from the batch.
# ----------------------------------------------------------------------------------------------


def _quadratic004_inner(theta, lam, batch):
    """½(θ − θ̄)ᵀH(θ − θ̄) + ½λθᵀHθ with H = diag(h)."""
    theta_bar, h = batch
    return 0.5 * jnp.sum(h * (theta - theta_bar) ** 2) + 0.5 * lam * jnp.sum(h * theta**2)


def _quadratic004_outer(theta, lam, batch):
    """½(θ − θ̃)ᵀH(θ − θ̃) with H = diag(h)."""
    del lam
    theta_tilde, h = batch
    return 0.5 * jnp.sum(h * (theta - theta_tilde) ** 2)


_QUADRATIC004_PROBLEM = Problem(inner=_quadratic004_inner, outer=_quadratic004_outer)


class Quadratic004(AbstractExactProblem):
    """The quadratic of *Online Hyper-parameter Optimization* §4.1, with its analytic optimum λ†.

        L_T(θ, λ) = ½(θ − θ̄)ᵀH(θ − θ̄) + ½λθᵀHθ        L_V(θ) = ½(θ − θ̃)ᵀH(θ − θ̃)

    with `H = diag(h)`, `h > 0`. The hyperparameter λ is used raw (not logged); the inner
    problem is strongly convex for `λ > −1`, where `θ*(λ) = θ̄ / (1 + λ)`, the inner Hessian is
    `(1 + λ) H` and `dθ*/dλ = −θ̄ / (1 + λ)²`. When `θ̄ᵀHθ̃ > 0` the validation value has the
    unique minimiser over `λ > −1`

        λ† = θ̄ᵀH(θ̄ − θ̃) / θ̄ᵀHθ̃.

    **Arguments:**

    - `theta_bar`: the training target θ̄, shape `(d,)`.
    - `theta_tilde`: the validation target θ̃, shape `(d,)`.
    - `h`: the diagonal of `H`, shape `(d,)`, all entries `> 0`.
    - `lam`: the default hyperparameter λ (scalar), default `0.0`.

    **Example:**

    ```python
    import bilevel.testing as blt

    exact = blt.Quadratic004.sample(0, dim=20, lam_range=(0.2, 0.4))
    lam_star = exact.optimal_hparams()
    assert 0.2 <= float(lam_star) <= 0.4
    assert abs(float(exact.hypergrad(lam_star))) < 1e-5
    ```
    """

    theta_bar: Array
    theta_tilde: Array
    h: Array
    lam: Array

    def __init__(self, theta_bar, theta_tilde, h, lam=0.0):
        theta_bar, theta_tilde, h, lam = _floats(theta_bar, theta_tilde, h, lam)
        ok = theta_bar.ndim == 1 and theta_bar.size >= 1 and theta_tilde.shape == \
            theta_bar.shape and h.shape == theta_bar.shape and lam.shape == ()
        _check_shapes("Quadratic004(theta_bar, theta_tilde, h, lam)",
                      "theta_bar, theta_tilde and h of one shape (d,) with d >= 1 and a "
                      "scalar lam", ok, theta_bar=theta_bar, theta_tilde=theta_tilde, h=h,
                      lam=lam)
        _check_positive("Quadratic004", "h", h,
                        "H = diag(h) must be positive definite; pass positive entries.")
        self.theta_bar, self.theta_tilde, self.h, self.lam = theta_bar, theta_tilde, h, lam

    @classmethod
    def sample(
        cls, key, *, dim=20, lam_range=(0.2, 0.4), max_condition=10.0,
        response_grad_range=(3.0, 5.0), noise=1.0, lam=0.0, dtype=None,
    ) -> "Quadratic004":
        """Draw an instance whose optimum λ† is uniform in `lam_range` (exactly, no rejection).

        The sampling scheme:

        1. `h_i` log-uniform in `[1, max_condition]`, so `cond((1 + λ) H) <= max_condition`
           for every `λ > −1`;
        2. `λ† ~ U(lam_range)` and `s = 1 / (1 + λ†)`;
        3. `ν ~ U(response_grad_range)` and `θ̄ = ν (1 + λ†)² u` with `u` uniform on the unit
           sphere, so that `‖dθ*/dλ‖ = ‖θ̄‖ / (1 + λ†)² = ν` at λ† (the seed reports values
           between 3 and 5, which matters for its clipping thresholds 2 and 5);
        4. `ξ ~ N(0, noise² I)`, and `θ̃ = s θ̄ + ξ − (θ̄ᵀHξ / θ̄ᵀHθ̄) θ̄`.

        The correction in step 4 makes `ξ`'s contribution H-orthogonal to `θ̄`, so
        `θ̄ᵀHθ̃ = s θ̄ᵀHθ̄ > 0` and `optimal_hparams() = 1/s − 1 = λ†` up to rounding.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the dimension `d >= 1` (20 in the seed).
        - `lam_range`: `(low, high)` with `−1 < low <= high`; λ† is drawn uniformly in it.
        - `max_condition`: bound `>= 1` on the condition number of the inner Hessian.
        - `response_grad_range`: `(low, high)` with `0 < low <= high`: where `‖dθ*/dλ‖` at
          λ† is drawn uniformly.
        - `noise`: scale `>= 0` of the part of θ̃ not aligned with θ̄.
        - `lam`: the default hyperparameter stored in the instance.
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        A `Quadratic004` instance.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.Quadratic004.sample(7, dim=5, lam_range=(0.25, 0.25))
        assert abs(float(exact.optimal_hparams()) - 0.25) < 1e-6
        ```
        """
        where = "Quadratic004.sample"
        rng = _rng(key, where)
        dim = check_int(dim, "dim", where, 1, 20)
        lo, hi = check_range(lam_range, "lam_range", where, above=-1.0, example="(0.2, 0.4)")
        max_condition = check_real(max_condition, "max_condition", where, low=1.0,
                                   strict=False, example=10.0)
        nu_lo, nu_hi = check_range(response_grad_range, "response_grad_range", where,
                                   above=0.0, example="(3.0, 5.0)")
        noise = check_real(noise, "noise", where, low=0.0, strict=False, example=1.0)
        lam = check_real(lam, "lam", where, low=-1.0, strict=True, example=0.0)
        dt = resolve_dtype(dtype, where)
        h = _spectrum(rng, dim, max_condition)
        s = 1.0 / (1.0 + rng.uniform(lo, hi))
        u = rng.standard_normal(dim)
        theta_bar = rng.uniform(nu_lo, nu_hi) / s**2 * u / np.linalg.norm(u)
        xi = noise * rng.standard_normal(dim)
        hb = h * theta_bar
        theta_tilde = s * theta_bar + xi - (hb @ xi) / (hb @ theta_bar) * theta_bar
        return cls(*(jnp.asarray(a, dt) for a in (theta_bar, theta_tilde, h, lam)))

    @property
    def problem(self) -> Problem:
        return _QUADRATIC004_PROBLEM

    @property
    def hparams(self) -> Array:
        return self.lam

    @property
    def params0(self) -> Array:
        return jnp.zeros_like(self.theta_bar)

    @property
    def inner_batch(self):
        return (self.theta_bar, self.h)

    @property
    def outer_batch(self):
        return (self.theta_tilde, self.h)

    @property
    def dtype(self):
        return self.theta_bar.dtype

    def _cast(self, hparams):
        return _cast_hparams(hparams, (), self.dtype, "Quadratic004", "a scalar λ > −1")

    def response(self, hparams):
        """`θ*(λ) = θ̄ / (1 + λ)`; see [`AbstractExactProblem.response`][]."""
        return self.theta_bar / (1 + self._cast(hparams))

    def hessian(self, hparams):
        """`(1 + λ) H`; see [`AbstractExactProblem.hessian`][]."""
        return jnp.diag((1 + self._cast(hparams)) * self.h)

    def hypergrad(self, hparams):
        """`−(θ* − θ̃)ᵀHθ̄ / (1 + λ)²`; see [`AbstractExactProblem.hypergrad`][]."""
        lam = self._cast(hparams)
        residual = self.theta_bar / (1 + lam) - self.theta_tilde
        return -jnp.sum(self.h * residual * self.theta_bar) / (1 + lam) ** 2

    def identity_hypergrad(self, hparams):
        """`−(Hθ*)ᵀ H(θ* − θ̃)`; see [`AbstractExactProblem.identity_hypergrad`][]."""
        theta = self.response(hparams)
        return -jnp.sum((self.h * theta) * (self.h * (theta - self.theta_tilde)))

    def optimal_hparams(self) -> Array:
        """The minimiser of the validation value, `λ† = θ̄ᵀH(θ̄ − θ̃) / θ̄ᵀHθ̃`.

        It is the unique minimiser of `value` over `λ > −1` when `θ̄ᵀHθ̃ > 0` (always so for
        instances from `sample`); otherwise the formula's result has no such meaning
        (and is infinite when `θ̄ᵀHθ̃ = 0`).

        **Returns:**

        A scalar array of dtype `self.dtype`.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.Quadratic004.sample(0)
        lam_star = exact.optimal_hparams()
        assert exact.value(lam_star) <= exact.value(lam_star + 0.01)
        ```
        """
        hb = self.h * self.theta_bar
        return hb @ (self.theta_bar - self.theta_tilde) / (hb @ self.theta_tilde)
