"""The exact Lasso and elastic net: closed forms on the support of the solution.

For the training loss `f(w) + g(w, λ)` with smooth `f(w) = 1/(2n)‖Xw − y‖²` (what
`problem.inner` returns) and the nonsmooth penalty `g` (the ℓ1 penalty, plus the ℓ2 one for
the elastic net; handled by a proximal operator, not part of `problem.inner`), the solution
on its support `S` with signs `s_S` satisfies `∇_S f(w) + l1 s_S + l2 w_S = 0`, i.e.

    w_S = (X_SᵀX_S/n + l2 I)⁻¹ (X_Sᵀy/n − l1 s_S),        w_i = 0 off S,

as long as `|∇_i f(w)| <= l1` off `S` and `sign(w_S) = s_S`. On that piece `w` is smooth in
λ and the hypergradient follows by differentiating the formula.
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np

from .._problem import Problem
from ._common import (
    AbstractConditionProblem,
    _cast_hparams,
    _check_regression,
    _check_shapes,
    _floats,
    _regression_sizes,
    _rng,
    check_int,
    design,
    fraction_size,
    host,
    masked_solve,
    max_abs,
    nan_unless,
    resolve_dtype,
    targets_with_moment,
    tolerance,
)

Array = jax.Array


def _least_squares(w, hparams, batch):
    """1/(2n)‖Xw − y‖² with `(X, y) = batch`; the hyperparameters do not enter."""
    del hparams
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2)


_SPARSE_PROBLEM = Problem(inner=_least_squares, outer=_least_squares)


def soft_threshold(x: Array, threshold) -> Array:
    """`sign(x) max(|x| − threshold, 0)`: the proximal operator of `threshold·‖·‖₁`."""
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0)


# ----------------------------------------------------------------------------------------------
# Host-side (NumPy float64): find and verify the signs of the solution.
# ----------------------------------------------------------------------------------------------


def _kkt_violation(H, v, l1, signs):
    """`(w, message)`: the closed form on the support of `signs`, and why it fails (or None)."""
    S = signs != 0
    w = np.zeros(len(v))
    if S.any():
        H_S = H[np.ix_(S, S)]
        if np.linalg.eigvalsh(H_S)[0] <= 1e-12 * max(1.0, np.max(np.abs(H_S))):
            return w, (f"XᵀX/n + l2·I restricted to the support {np.flatnonzero(S).tolist()} "
                       "is singular, so the solution is not unique")
        w[S] = np.linalg.solve(H_S, v[S] - l1 * signs[S])
    tol = 1e-9
    grad = H @ w - v  # gradient of the smooth part (with the l2 term), 0 penalty term
    scale = max(1.0, np.max(np.abs(w), initial=0.0))
    bad_sign = np.flatnonzero(S & (signs * w < -tol * scale))
    if bad_sign.size:
        i = int(bad_sign[0])
        return w, (f"on the support, coordinate {i} has sign {int(signs[i])} but the closed "
                   f"form gives w_{i} = {w[i]:.3g}")
    bad_grad = np.flatnonzero(~S & (np.abs(grad) > l1 * (1 + tol) + tol * np.abs(v).max()))
    if bad_grad.size:
        i = int(bad_grad[0])
        return w, (f"off the support, |∂f/∂w_{i}| = {abs(grad[i]):.6g} exceeds the ℓ1 "
                   f"strength {l1:.6g}")
    return w, None


def _coordinate_descent_signs(H, v, l1, where):
    """The signs of argmin ½wᵀHw − vᵀw + l1‖w‖₁ by coordinate descent, checked by KKT."""
    d = len(v)
    w = np.zeros(d)
    diag = np.diag(H)
    for sweep in range(20000):
        w_old = w.copy()
        for j in range(d):
            if diag[j] > 0:
                z = v[j] - H[j] @ w + diag[j] * w[j]
                w[j] = np.sign(z) * max(abs(z) - l1, 0.0) / diag[j]
        if sweep % 5 == 4 or np.max(np.abs(w - w_old)) == 0.0:
            signs = np.sign(w).astype(np.int32)
            if _kkt_violation(H, v, l1, signs)[1] is None:
                return signs
    raise ValueError(
        f"{where} could not find the support of the solution by coordinate descent (20000 "
        "sweeps). The problem may be degenerate or badly conditioned at this log_lam; pass "
        "signs=... (the signs of the solution) explicitly, or use .sample(seed)."
    )


def _init_signs(where, X, y, l1, l2, signs):
    """Compute (when `signs` is None) or check the signs of the solution, as int32 (d,)."""
    Xh, yh = host(X), host(y)
    n, d = Xh.shape
    H, v = Xh.T @ Xh / n + l2 * np.eye(d), Xh.T @ yh / n
    if signs is None:
        s = _coordinate_descent_signs(H, v, l1, where)
    else:
        s = np.asarray(signs)
        if s.shape != (d,) or not np.all(np.isin(s, (-1, 0, 1))):
            raise ValueError(
                f"{where} requires signs to be an array of shape ({d},) with entries in "
                f"{{-1, 0, 1}} (the signs of the solution, 0 off its support); got "
                f"{signs!r}. Omit signs= to have them computed."
            )
        s = s.astype(np.int32)
        msg = _kkt_violation(H, v, l1, s)[1]
        if msg is not None:
            raise ValueError(
                f"{where}: the signs passed are not those of the solution at the given "
                f"log_lam: {msg}. Omit signs= to have them computed."
            )
    return jnp.asarray(s, jnp.int32)


def _plant(rng, X_parts, l1, l2, noise, nonzeros, n_val, where):
    """Regression data whose penalised solution has a chosen support, with margins."""
    U, sv, V = X_parts
    n, d = U.shape
    X = (U * sv) @ V.T
    H = (V * sv**2 / n) @ V.T
    k = fraction_size(rng, d) if nonzeros is None else check_int(nonzeros, "nonzeros", where, 0,
                                                                  max(1, d // 2))
    if k > d:
        raise ValueError(f"{where} requires nonzeros <= dim; got nonzeros={k}, dim={d}. "
                         f"Pass e.g. nonzeros={max(1, d // 2)}.")
    S = rng.permutation(d)[:k]
    signs = np.zeros(d, np.int32)
    signs[S] = rng.choice([-1, 1], size=k)
    w = np.zeros(d)
    w[S] = signs[S] * rng.uniform(0.5, 1.5, size=k)
    sub = rng.uniform(-0.9, 0.9, size=d)  # the ℓ1 subgradient: sign on S, |·| <= 0.9 off S
    sub[S] = signs[S]
    moment = (H + l2 * np.eye(d)) @ w + l1 * sub  # Xᵀy/n, so that 0 ∈ ∇f + ∂g at w
    y = targets_with_moment(rng, U, sv, V, moment, noise)
    Xv = rng.standard_normal((n_val, d))
    yv = Xv @ np.linalg.solve(H, moment) + noise * rng.standard_normal(n_val)
    return X, y, Xv, yv, signs


# ----------------------------------------------------------------------------------------------
# jax.numpy closed forms on a fixed support.
# ----------------------------------------------------------------------------------------------


def _on_support(X, y, signs, l1, l2):
    """`(K, mask, s, w, grad)`: `K = XᵀX/n + l2 I`, `w` on the support, `grad = ∇f(w)`."""
    n, d = X.shape
    mask, s = signs != 0, signs.astype(X.dtype)
    K = X.T @ X / n + l2 * jnp.eye(d, dtype=X.dtype)
    w = masked_solve(K, mask, X.T @ y / n - l1 * s)
    grad = X.T @ (X @ w - y) / n
    return K, mask, s, w, grad


def _support_valid(mask, s, w, grad, l1, l2, dtype):
    """Signs agree on the support, `|∇_i f| <= l1` off it (relative tolerance sqrt(eps))."""
    tol = tolerance(dtype)
    on = jnp.all(jnp.where(mask, s * w >= -tol * (1 + max_abs(w)), True))
    off = jnp.all(jnp.where(mask, True, jnp.abs(grad + l2 * w) <= l1 + tol * (l1 + max_abs(grad))))
    return on & off


class _AbstractSparse(AbstractConditionProblem):
    """What `Lasso` and `ElasticNet` share: data, losses, support, prox, response."""

    X: Array
    y: Array
    Xv: Array
    yv: Array
    log_lam: Array
    signs: Array

    @property
    def problem(self) -> Problem:
        return _SPARSE_PROBLEM

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

    @property
    def lipschitz(self) -> Array:
        """The largest eigenvalue of `XᵀX/n`: the Lipschitz constant of `∇problem.inner`.

        A proximal-gradient step size `1/lipschitz` converges (for any λ).
        """
        n = self.X.shape[0]
        return jnp.linalg.eigvalsh(self.X.T @ self.X / n)[-1]

    @abc.abstractmethod
    def _l1_l2(self, lam):
        """The ℓ1 and ℓ2 strengths at the (cast) hyperparameters."""

    def support(self, hparams) -> Array:
        """The support of `w*(λ)`: the stored one (exact where `is_valid(hparams)`).

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        A boolean `(d,)` array, true where `w*_i != 0`.
        """
        self._cast(hparams)
        return self.signs != 0

    def _solve(self, hparams):
        l1, l2 = self._l1_l2(self._cast(hparams))
        K, mask, s, w, grad = _on_support(self.X, self.y, self.signs, l1, l2)
        valid = _support_valid(mask, s, w, grad, l1, l2, self.dtype)
        u = masked_solve(K, mask, self.Xv.T @ (self.Xv @ w - self.yv) / self.Xv.shape[0])
        return l1, l2, s, w, u, valid

    def is_valid(self, hparams) -> Array:
        """Whether the stored support is the solution's at `hparams`.

        See [`AbstractConditionProblem.is_valid`][].
        """
        return self._solve(hparams)[-1]

    def response(self, hparams) -> Array:
        """`w_S = (X_SᵀX_S/n + l2 I)⁻¹(X_Sᵀy/n − l1 s_S)`, 0 off S.

        See [`AbstractConditionProblem.response`][].
        """
        _, _, _, w, _, valid = self._solve(hparams)
        return nan_unless(valid, w)


class Lasso(_AbstractSparse):
    """The Lasso with one log-penalty, split into a smooth loss and a prox-able penalty.

        L_T(w, λ) = f(w) + e^λ‖w‖₁,  f(w) = 1/(2n)‖Xw − y‖²      L_V(w) = 1/(2m)‖Xv w − yv‖²

    `problem.inner` is the smooth part `f` only; the penalty `e^λ‖w‖₁` is handled by a
    proximal operator: [`prox`][bilevel.testing.Lasso.prox] (soft-thresholding at
    `stepsize · strength(λ)`). The solution is a fixed point of the proximal-gradient map
    `w = prox(w − η∇f(w), λ, η)` for any `η > 0`.

    On the support `S` of `w*` with signs `s_S`,

        w*_S = (X_SᵀX_S/n)⁻¹ (X_Sᵀy/n − e^λ s_S),
        dL_V/dλ = −e^λ s_Sᵀ (X_SᵀX_S/n)⁻¹ ∇_S L_V(w*).

    The support and signs are stored in the field `signs` (computed when the instance is
    built, at `log_lam`); the closed forms use them, so they are exact on the interval of
    λ around `log_lam` where that support stays optimal and NaN outside it (see
    `is_valid`).

    **Arguments:**

    - `X`: training inputs, shape `(n, d)`.
    - `y`: training targets, shape `(n,)`.
    - `Xv`: validation inputs, shape `(m, d)`.
    - `yv`: validation targets, shape `(m,)`.
    - `log_lam`: the default hyperparameter (scalar log-penalty), default `0.0`.
    - `signs`: optional `(d,)` integers in `{-1, 0, 1}`: the signs of the solution at
      `log_lam`. By default they are computed (coordinate descent in NumPy float64, then
      the optimality conditions checked on the closed form); when given they are
      checked. Either way the arrays must be concrete (build outside `jit`).

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.Lasso.sample(0, dim=6)
    w = exact.response(exact.hparams)              # exact, with zeros off the support
    g = exact.hypergrad(exact.hparams)             # exact dL_V/dλ
    eta = 1.0 / exact.lipschitz
    X, y = exact.inner_batch
    step = exact.prox(w - eta * X.T @ (X @ w - y) / X.shape[0], exact.hparams, eta)
    assert jnp.allclose(step, w)                   # w* is a proximal-gradient fixed point
    ```
    """

    def __init__(self, X, y, Xv, yv, log_lam=0.0, *, signs=None):
        X, y, Xv, yv, log_lam = _floats(X, y, Xv, yv, log_lam)
        _check_regression("Lasso(X, y, Xv, yv)", X, y, Xv, yv)
        _check_shapes("Lasso(log_lam=...)", "a scalar log_lam", log_lam.shape == (),
                      log_lam=log_lam)
        l1 = float(np.exp(host(log_lam)))
        self.signs = _init_signs("Lasso", X, y, l1, 0.0, signs)
        self.X, self.y, self.Xv, self.yv, self.log_lam = X, y, Xv, yv, log_lam

    @classmethod
    def sample(
        cls, key, *, dim=6, n_train=None, n_val=None, max_condition=10.0, noise=0.5,
        log_lam=0.0, nonzeros=None, dtype=None,
    ) -> "Lasso":
        """Draw an instance whose solution at `log_lam` has a non-trivial, stable support.

        The solution is chosen first and the data built around it (so no draw is
        rejected): `X = U diag(s) Vᵀ` as in [`bilevel.testing.Ridge.sample`][]
        (`cond(XᵀX/n) <= max_condition`); a support of `nonzeros` coordinates (default:
        30 % to 70 % of `dim`, at least one, and for `dim >= 2` at least one zero) with
        random signs and `|w*_i|` uniform in `[0.5, 1.5]`; off the support, `∇_i f(w*)`
        uniform in `[−0.9, 0.9]·e^λ`; then `y` is the one with the right `Xᵀy/n` plus noise
        orthogonal to `X`'s columns. So every on-support `|w*_i| >= 0.5` and every
        off-support `|∇_i f(w*)| <= 0.9 e^λ`: the support is stable for λ near `log_lam`
        (finite differences work). Validation targets are `Xv w_ls + noise·ε` with `w_ls`
        the unpenalised least-squares fit.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key (e.g. `jax.random.key(0)`).
        - `dim`: the number of parameters `d >= 1`.
        - `n_train`: training rows, `>= dim` (default `2 * dim`).
        - `n_val`: validation rows, `>= 1` (default `2 * dim`).
        - `max_condition`: bound `>= 1` on the condition number of `XᵀX/n`.
        - `noise`: target noise standard deviation, `>= 0`.
        - `log_lam`: the default hyperparameter (the support is planted for it).
        - `nonzeros`: the support size, `0 <= nonzeros <= dim`; default random (see above).
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        A `Lasso` instance.

        **Example:**

        ```python
        import jax
        import bilevel.testing as blt

        exact = blt.Lasso.sample(jax.random.key(1), dim=10)
        k = int(exact.support(exact.hparams).sum())
        assert 3 <= k <= 7
        ```
        """
        where = "Lasso.sample"
        rng = _rng(key, where)
        dim, n_train, n_val, max_condition, noise = _regression_sizes(
            where, dim, n_train, n_val, max_condition, noise)
        lam = _check_log_lam(log_lam, (), where)
        dt = resolve_dtype(dtype, where)
        parts = design(rng, n_train, dim, max_condition)
        X, y, Xv, yv, signs = _plant(rng, parts, float(np.exp(lam)), 0.0, noise, nonzeros,
                                     n_val, where)
        return cls(*(jnp.asarray(a, dt) for a in (X, y, Xv, yv, lam)), signs=signs)

    def _cast(self, hparams):
        return _cast_hparams(hparams, (), self.dtype, "Lasso", "a scalar log-penalty log λ")

    def _l1_l2(self, lam):
        return jnp.exp(lam), jnp.zeros((), self.dtype)

    def strength(self, hparams) -> Array:
        """The ℓ1 penalty strength `e^λ`.

        **Arguments:**

        - `hparams`: the scalar log-penalty λ.

        **Returns:**

        A scalar array of dtype `self.dtype`.
        """
        return jnp.exp(self._cast(hparams))

    def prox(self, x, hparams, stepsize=1.0) -> Array:
        """The proximal operator of `stepsize · e^λ‖·‖₁` (soft-thresholding).

        **Arguments:**

        - `x`: a `(d,)` point.
        - `hparams`: the scalar log-penalty λ.
        - `stepsize`: the step size η `> 0` scaling the penalty.

        **Returns:**

        `sign(x) max(|x| − η e^λ, 0)`, shaped like `x`.
        """
        return soft_threshold(x, stepsize * self.strength(hparams))

    def penalty(self, params, hparams) -> Array:
        """The nonsmooth part of the training loss, `e^λ ‖w‖₁`.

        **Arguments:**

        - `params`: the parameters w, shape `(d,)`.
        - `hparams`: the scalar log-penalty λ.

        **Returns:**

        A scalar array.
        """
        return self.strength(hparams) * jnp.sum(jnp.abs(params))

    def hypergrad(self, hparams) -> Array:
        """`−e^λ s_Sᵀ (X_SᵀX_S/n)⁻¹ ∇_S L_V(w*)`; see [`AbstractConditionProblem.hypergrad`][]."""
        l1, _, s, _, u, valid = self._solve(hparams)
        return nan_unless(valid, -l1 * (s @ u))


class ElasticNet(_AbstractSparse):
    """The elastic net with two log-penalties, split into a smooth loss and a prox-able penalty.

        L_T(w, λ) = f(w) + e^{λ₁}‖w‖₁ + ½e^{λ₂}‖w‖²,   f(w) = 1/(2n)‖Xw − y‖²
        L_V(w) = 1/(2m)‖Xv w − yv‖²

    with `hparams = (λ₁, λ₂) = (log l1, log l2)`, shape `(2,)`. As for
    [`bilevel.testing.Lasso`][], `problem.inner` is the smooth part `f` only: the whole
    penalty `l1‖w‖₁ + ½l2‖w‖²` is handled by [`prox`][bilevel.testing.ElasticNet.prox],
    `prox(x) = soft(x, η l1) / (1 + η l2)`. On the support `S` with signs `s_S`, with
    `K = X_SᵀX_S/n + l2 I` and `u = K⁻¹ ∇_S L_V(w*)`:

        w*_S = K⁻¹ (X_Sᵀy/n − l1 s_S),
        dL_V/dλ₁ = −l1 s_Sᵀ u,        dL_V/dλ₂ = −l2 w*_Sᵀ u.

    The support is fixed as for `Lasso` (field `signs`; NaN where not valid).

    **Arguments:**

    - `X`: training inputs, shape `(n, d)`.
    - `y`: training targets, shape `(n,)`.
    - `Xv`: validation inputs, shape `(m, d)`.
    - `yv`: validation targets, shape `(m,)`.
    - `log_lam`: the default hyperparameters `(log l1, log l2)`, shape `(2,)` (a scalar
      is broadcast); default `(0.0, 0.0)`.
    - `signs`: optional `(d,)` signs of the solution at `log_lam` (computed if omitted,
      checked if given).

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.ElasticNet.sample(0, dim=6, log_lam=(0.0, -1.0))
    l1, l2 = exact.strengths(exact.hparams)
    g = exact.hypergrad(exact.hparams)          # shape (2,)
    assert g.shape == (2,)
    ```
    """

    def __init__(self, X, y, Xv, yv, log_lam=(0.0, 0.0), *, signs=None):
        X, y, Xv, yv, log_lam = _floats(X, y, Xv, yv, log_lam)
        _check_regression("ElasticNet(X, y, Xv, yv)", X, y, Xv, yv)
        _check_shapes("ElasticNet(log_lam=...)", "log_lam of shape () or (2,) (log l1, log l2)",
                      log_lam.shape in ((), (2,)), log_lam=log_lam)
        log_lam = jnp.broadcast_to(log_lam, (2,))
        l1, l2 = np.exp(host(log_lam))
        self.signs = _init_signs("ElasticNet", X, y, float(l1), float(l2), signs)
        self.X, self.y, self.Xv, self.yv, self.log_lam = X, y, Xv, yv, log_lam

    @classmethod
    def sample(
        cls, key, *, dim=6, n_train=None, n_val=None, max_condition=10.0, noise=0.5,
        log_lam=(0.0, 0.0), nonzeros=None, dtype=None,
    ) -> "ElasticNet":
        """Draw an instance whose solution at `log_lam` has a non-trivial, stable support.

        Drawn as in [`bilevel.testing.Lasso.sample`][] with the elastic-net optimality
        conditions: on the support `|w*_i|` is in `[0.5, 1.5]`; off it `|∇_i f(w*)| <= 0.9 l1`.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the number of parameters `d >= 1`.
        - `n_train`: training rows, `>= dim` (default `2 * dim`).
        - `n_val`: validation rows, `>= 1` (default `2 * dim`).
        - `max_condition`: bound `>= 1` on the condition number of `XᵀX/n`.
        - `noise`: target noise standard deviation, `>= 0`.
        - `log_lam`: the default `(log l1, log l2)` (a float is used for both).
        - `nonzeros`: the support size, `0 <= nonzeros <= dim`; default random.
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        An `ElasticNet` instance.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.ElasticNet.sample(2, dim=4, nonzeros=2)
        assert int(exact.support(exact.hparams).sum()) == 2
        ```
        """
        where = "ElasticNet.sample"
        rng = _rng(key, where)
        dim, n_train, n_val, max_condition, noise = _regression_sizes(
            where, dim, n_train, n_val, max_condition, noise)
        lam = _check_log_lam(log_lam, (2,), where)
        dt = resolve_dtype(dtype, where)
        parts = design(rng, n_train, dim, max_condition)
        l1, l2 = np.exp(lam)
        X, y, Xv, yv, signs = _plant(rng, parts, l1, l2, noise, nonzeros, n_val, where)
        return cls(*(jnp.asarray(a, dt) for a in (X, y, Xv, yv, lam)), signs=signs)

    def _cast(self, hparams):
        return _cast_hparams(hparams, (2,), self.dtype, "ElasticNet",
                             "(log l1, log l2): the log ℓ1 and log ℓ2 strengths")

    def _l1_l2(self, lam):
        rho = jnp.exp(lam)
        return rho[0], rho[1]

    def strengths(self, hparams) -> tuple[Array, Array]:
        """The penalty strengths `(l1, l2) = (e^{λ₁}, e^{λ₂})`.

        **Arguments:**

        - `hparams`: `(log l1, log l2)`, shape `(2,)`.

        **Returns:**

        A pair of scalar arrays of dtype `self.dtype`.
        """
        return self._l1_l2(self._cast(hparams))

    def prox(self, x, hparams, stepsize=1.0) -> Array:
        """The proximal operator of `stepsize · (l1‖·‖₁ + ½l2‖·‖²)`.

        **Arguments:**

        - `x`: a `(d,)` point.
        - `hparams`: `(log l1, log l2)`, shape `(2,)`.
        - `stepsize`: the step size η `> 0` scaling the penalty.

        **Returns:**

        `soft(x, η l1) / (1 + η l2)`, shaped like `x`.
        """
        l1, l2 = self.strengths(hparams)
        return soft_threshold(x, stepsize * l1) / (1 + stepsize * l2)

    def penalty(self, params, hparams) -> Array:
        """The part of the training loss not in `problem.inner`, `l1‖w‖₁ + ½l2‖w‖²`.

        **Arguments:**

        - `params`: the parameters w, shape `(d,)`.
        - `hparams`: `(log l1, log l2)`, shape `(2,)`.

        **Returns:**

        A scalar array.
        """
        l1, l2 = self.strengths(hparams)
        return l1 * jnp.sum(jnp.abs(params)) + 0.5 * l2 * jnp.sum(params**2)

    def hypergrad(self, hparams) -> Array:
        """`(−l1 s_Sᵀu, −l2 w*_Sᵀu)` with `u = (X_SᵀX_S/n + l2 I)⁻¹ ∇_S L_V(w*)`.

        See [`AbstractConditionProblem.hypergrad`][].
        """
        l1, l2, s, w, u, valid = self._solve(hparams)
        return nan_unless(valid, jnp.stack([-l1 * (s @ u), -l2 * (w @ u)]))


def _check_log_lam(log_lam, shape, where) -> np.ndarray:
    """A finite float64 array of `shape` (a float is broadcast), or an error."""
    try:
        lam = np.asarray(log_lam, dtype=np.float64)
    except (TypeError, ValueError):
        lam = None
    if lam is None or lam.shape not in ((), shape) or not np.all(np.isfinite(lam)):
        raise ValueError(
            f"{where} requires log_lam to be a finite float"
            + (f" or a finite array of shape {shape}" if shape else "")
            + f"; got {log_lam!r}. Pass e.g. log_lam=0.0."
        )
    return np.broadcast_to(lam, shape).copy()
