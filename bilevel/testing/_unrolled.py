"""T steps of gradient descent on a quadratic ([`bilevel.testing.UnrolledQuadratic`][]), with
the unrolled hypergradient in closed form."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._problem import Problem
from ._common import (
    _cast_hparams,
    _check_positive,
    _check_shapes,
    _concrete,
    _floats,
    _orthonormal,
    _rng,
    _spectrum,
    check_int,
    check_real,
    resolve_dtype,
)
from ._exact import AbstractExactProblem

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# Losses: pure functions of (params, hparams, batch); all data comes from the batch.
# ----------------------------------------------------------------------------------------------


def _unrolled_inner(w, log_lam, batch):
    """½wᵀAw − bᵀw + ½e^λ‖w‖²."""
    A, b = batch
    return 0.5 * w @ (A @ w) - b @ w + 0.5 * jnp.exp(log_lam) * (w @ w)


def _unrolled_outer(w, log_lam, batch):
    """½‖Cw − e‖²."""
    del log_lam
    C, e = batch
    return 0.5 * jnp.sum((C @ w - e) ** 2)


_UNROLLED_PROBLEM = Problem(inner=_unrolled_inner, outer=_unrolled_outer)


class UnrolledQuadratic(AbstractExactProblem):
    """T steps of gradient descent on a quadratic, with the unrolled hypergradient in closed form.

        L_T(w, λ) = ½wᵀAw − bᵀw + ½e^λ‖w‖²       L_V(w) = ½‖Cw − e‖²

    with `A = Q diag(a) Qᵀ` (`Q` orthogonal, `a > 0`) and λ a scalar log-penalty. Beside the
    exact (IFT, `T → ∞`) quantities, the instance knows the iterate `w_T` of `steps` plain
    gradient-descent steps `w_{t+1} = w_t − η ∇L_T(w_t)` from `w0` and its exact derivative.
    In the eigenbasis `z = Qᵀw`, with `h_i = a_i + e^λ`, `m_i = 1 − η h_i`, `β = Qᵀb`:

        z_T,i = m_i^T z0_i + (1 − m_i^T) β_i / h_i
        dz_T,i/dλ = −η e^λ T m_i^{T−1} (z0_i − β_i/h_i) − (1 − m_i^T) e^λ β_i / h_i²

    The formulas are exact for any `η > 0`; gradient descent converges (and `w_T → w*`) when
    `η < 2 / max_i h_i`.

    **Arguments:**

    - `Q`: orthogonal `(d, d)` eigenvectors of `A` (e.g. from `numpy.linalg.eigh`).
    - `a`: positive eigenvalues of `A`, shape `(d,)`.
    - `b`: the linear term, shape `(d,)`.
    - `C`: validation matrix, shape `(p, d)`.
    - `e`: validation targets, shape `(p,)`.
    - `lr`: the step size η `> 0`.
    - `steps`: the number of steps T `>= 1` (static: changing it recompiles).
    - `w0`: the initial iterate, shape `(d,)`; default zeros.
    - `log_lam`: the default hyperparameter (scalar log-penalty), default `0.0`.

    **Example:**

    ```python
    import bilevel.testing as blt

    exact = blt.UnrolledQuadratic.sample(0, dim=4, steps=50)
    w_T = exact.unrolled_response(exact.hparams)      # iterate after 50 GD steps
    g_T = exact.unrolled_hypergrad(exact.hparams)     # d L_V(w_T(λ)) / dλ
    g = exact.hypergrad(exact.hparams)                # the T -> ∞ limit
    ```
    """

    Q: Array
    a: Array
    b: Array
    C: Array
    e: Array
    lr: Array
    w0: Array
    log_lam: Array
    steps: int = eqx.field(static=True)

    def __init__(self, Q, a, b, C, e, lr, steps, w0=None, log_lam=0.0):
        where = "UnrolledQuadratic"
        w0 = np.zeros(np.shape(b), np.int8) if w0 is None else w0  # int: takes b's float dtype
        Q, a, b, C, e, lr, w0, log_lam = _floats(Q, a, b, C, e, lr, w0, log_lam)
        d = b.shape[0] if b.ndim == 1 else -1
        ok = (d >= 1 and Q.shape == (d, d) and a.shape == (d,) and w0.shape == (d,)
              and C.ndim == 2 and C.shape[0] >= 1 and C.shape[1] == d and e.shape == C.shape[:1]
              and lr.shape == () and log_lam.shape == ())
        _check_shapes(where, "Q (d, d), a (d,), b (d,), C (p, d), e (p,), w0 (d,) with "
                      "d, p >= 1 and scalar lr and log_lam", ok, Q=Q, a=a, b=b, C=C, e=e,
                      w0=w0, lr=lr, log_lam=log_lam)
        self.steps = check_int(steps, "steps", where, 1, 20)
        _check_positive(where, "a", a, "A = Q diag(a) Qᵀ must be positive definite.")
        _check_positive(where, "lr", lr, "Pass a step size such as lr=0.1; GD converges "
                        "for lr < 2 / (max(a) + exp(log_lam)).")
        _check_orthogonal(where, Q)
        self.Q, self.a, self.b, self.C, self.e = Q, a, b, C, e
        self.lr, self.w0, self.log_lam = lr, w0, log_lam

    @classmethod
    def sample(
        cls, key, *, dim=5, n_val=None, steps=20, lr=None, max_condition=10.0, log_lam=0.0,
        w0_scale=0.0, dtype=None,
    ) -> "UnrolledQuadratic":
        """Draw a random instance; the inner Hessian's condition number is `<= max_condition`.

        `Q` is Haar-random orthogonal and `a_i` log-uniform in `[1, max_condition]`, so
        `cond(A + e^λ I) <= max_condition` for every λ. `b`, `C` (scaled by `1/√p`), `e` and
        `w0 / w0_scale` are standard normal. The default step size is
        `lr = 1 / (max(a) + e^{log_lam})`, for which gradient descent converges monotonically
        at the default hyperparameters.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the dimension `d >= 1`.
        - `n_val`: rows `p >= 1` of `C` (default `dim`).
        - `steps`: the number of gradient steps `T >= 1`.
        - `lr`: the step size `> 0`, or `None` for `1 / (max(a) + e^{log_lam})`.
        - `max_condition`: bound `>= 1` on the inner Hessian's condition number.
        - `log_lam`: the default hyperparameter stored in the instance.
        - `w0_scale`: scale `>= 0` of the random initial iterate (`0` gives `w0 = 0`).
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        An `UnrolledQuadratic` instance.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.UnrolledQuadratic.sample(2, dim=3, steps=10, w0_scale=1.0)
        assert exact.steps == 10 and exact.w0.shape == (3,)
        ```
        """
        where = "UnrolledQuadratic.sample"
        rng = _rng(key, where)
        dim = check_int(dim, "dim", where, 1, 5)
        n_val = dim if n_val is None else check_int(n_val, "n_val", where, 1, dim)
        steps = check_int(steps, "steps", where, 1, 20)
        max_condition = check_real(max_condition, "max_condition", where, low=1.0,
                                   strict=False, example=10.0)
        log_lam = check_real(log_lam, "log_lam", where, low=-np.inf, strict=True, example=0.0)
        w0_scale = check_real(w0_scale, "w0_scale", where, low=0.0, strict=False, example=1.0)
        dt = resolve_dtype(dtype, where)
        a = _spectrum(rng, dim, max_condition)
        lr = 1.0 / (a.max() + np.exp(log_lam)) if lr is None else check_real(
            lr, "lr", where, low=0.0, strict=True, example=0.1)
        Q = _orthonormal(rng, dim, dim)
        b, e = rng.standard_normal(dim), rng.standard_normal(n_val)
        C = rng.standard_normal((n_val, dim)) / np.sqrt(n_val)
        w0 = w0_scale * rng.standard_normal(dim)
        arrays = (jnp.asarray(x, dt) for x in (Q, a, b, C, e, lr, w0, log_lam))
        Q, a, b, C, e, lr, w0, log_lam = arrays
        return cls(Q, a, b, C, e, lr, steps, w0=w0, log_lam=log_lam)

    @property
    def A(self) -> Array:
        """The materialised quadratic `A = Q diag(a) Qᵀ`."""
        return (self.Q * self.a) @ self.Q.T

    @property
    def problem(self) -> Problem:
        return _UNROLLED_PROBLEM

    @property
    def hparams(self) -> Array:
        return self.log_lam

    @property
    def params0(self) -> Array:
        return self.w0

    @property
    def inner_batch(self):
        return (self.A, self.b)

    @property
    def outer_batch(self):
        return (self.C, self.e)

    @property
    def dtype(self):
        return self.b.dtype

    def _cast(self, hparams):
        return _cast_hparams(hparams, (), self.dtype, "UnrolledQuadratic",
                             "a scalar log-penalty log λ")

    def _eig(self, hparams):
        """(e^λ, h = a + e^λ, β = Qᵀb)."""
        rho = jnp.exp(self._cast(hparams))
        return rho, self.a + rho, self.Q.T @ self.b

    def _outer_grad(self, w):
        return self.C.T @ (self.C @ w - self.e)

    def response(self, hparams):
        """`w* = Q diag(1/h) Qᵀ b`; see [`AbstractExactProblem.response`][]."""
        _, h, beta = self._eig(hparams)
        return self.Q @ (beta / h)

    def hessian(self, hparams):
        """`A + e^λ I = Q diag(a + e^λ) Qᵀ`; see [`AbstractExactProblem.hessian`][]."""
        _, h, _ = self._eig(hparams)
        return (self.Q * h) @ self.Q.T

    def hypergrad(self, hparams):
        """`−e^λ (∂L_V/∂w)ᵀ H⁻¹ w*`; see [`AbstractExactProblem.hypergrad`][]."""
        rho, h, beta = self._eig(hparams)
        dw = -self.Q @ (rho * beta / h**2)
        return self._outer_grad(self.Q @ (beta / h)) @ dw

    def identity_hypergrad(self, hparams):
        """`−e^λ w*ᵀ ∂L_V/∂w`; see [`AbstractExactProblem.identity_hypergrad`][]."""
        rho, h, beta = self._eig(hparams)
        w = self.Q @ (beta / h)
        return -rho * (w @ self._outer_grad(w))

    def unrolled_response(self, hparams) -> Array:
        """The iterate `w_T` after `steps` gradient-descent steps from `w0`, in closed form.

        **Arguments:**

        - `hparams`: the scalar log-penalty λ.

        **Returns:**

        A `(d,)` array of dtype `self.dtype`.
        """
        _, h, beta = self._eig(hparams)
        mT = (1 - self.lr * h) ** self.steps
        return self.Q @ (mT * (self.Q.T @ self.w0) + (1 - mT) * beta / h)

    def unrolled_value(self, hparams) -> Array:
        """The validation loss at the unrolled iterate, `L_V(w_T(λ))`.

        **Arguments:**

        - `hparams`: the scalar log-penalty λ.

        **Returns:**

        A scalar array of dtype `self.dtype`.
        """
        lam = self._cast(hparams)
        return self.problem.outer(self.unrolled_response(lam), lam, self.outer_batch)

    def unrolled_hypergrad(self, hparams) -> Array:
        """The exact derivative `d L_V(w_T(λ)) / dλ` of the unrolled value.

        This is what differentiating through the `steps` iterations (reverse or forward
        mode) must return.

        **Arguments:**

        - `hparams`: the scalar log-penalty λ.

        **Returns:**

        A scalar array of dtype `self.dtype`.
        """
        rho, h, beta = self._eig(hparams)
        m, T = 1 - self.lr * h, self.steps
        z0 = self.Q.T @ self.w0
        dz = -self.lr * rho * T * m ** (T - 1) * (z0 - beta / h) - (1 - m**T) * rho * beta / h**2
        return self._outer_grad(self.unrolled_response(hparams)) @ (self.Q @ dz)


    def drmad_hypergrad(self, hparams) -> Array:
        """The hypergradient DrMAD (Fu et al. 2016) returns for the `steps` GD steps, in closed form.

        DrMAD's reverse pass evaluates each step's derivatives on the straight line
        `w̃_t = w0 + (t/T)(w_T − w0)` instead of the iterates. On this quadratic the
        step's Jacobian `M = I − ηH` does not depend on the point but its λ-derivative
        `−η e^λ w` does, so in the eigenbasis

            d = Σ_{t<T} −η e^λ z̃_t ⊙ m^{T−1−t} ⊙ Qᵀ∂L_V/∂w(w_T)

        which differs from `unrolled_hypergrad` (the same sum over the true iterates) unless
        the trajectory is straight.

        **Arguments:**

        - `hparams`: the scalar log-penalty λ.

        **Returns:**

        A scalar array of dtype `self.dtype`.
        """
        rho, h, _ = self._eig(hparams)
        m, T = 1 - self.lr * h, self.steps
        z0 = self.Q.T @ self.w0
        w_T = self.unrolled_response(hparams)
        zT = self.Q.T @ w_T
        G = self.Q.T @ self._outer_grad(w_T)
        t = jnp.arange(T, dtype=self.dtype)[:, None]
        path = z0 + (t / T) * (zT - z0)                      # (T, d): the straight line
        decay = m[None, :] ** (T - 1 - t)                    # (T, d): M^{T-1-t}
        return -self.lr * rho * jnp.sum(path * decay * G)


def _check_orthogonal(where: str, Q: Array) -> None:
    value = _concrete(Q)
    if value is None:
        return
    d = value.shape[0]
    err = np.max(np.abs(value.T @ value - np.eye(d)))
    tol = 10 * d * float(np.sqrt(np.finfo(value.dtype).eps))
    if not err <= tol:
        raise ValueError(
            f"{where} requires Q to be orthogonal (QᵀQ = I); got max |QᵀQ − I| = {err:.3g}. "
            "Take Q from the eigendecomposition of a symmetric A, e.g. "
            "a, Q = numpy.linalg.eigh(A)."
        )
