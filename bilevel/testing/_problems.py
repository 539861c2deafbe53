"""Exact bilevel problems: closed-form responses, values, Hessians and hypergradients.

Every quantity here is written out by hand with `jax.numpy` linear algebra, never with
autodiff of the losses, so that the problems are an independent reference for autodiff-based
methods. The losses exposed through `.problem` are module-level pure functions that read their
data from `batch` only, so one `Problem` serves every instance (and `vmap` over datasets).
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._problem import Problem

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


def _quadratic004_inner(theta, lam, batch):
    """½(θ − θ̄)ᵀH(θ − θ̄) + ½λθᵀHθ with H = diag(h)."""
    theta_bar, h = batch
    return 0.5 * jnp.sum(h * (theta - theta_bar) ** 2) + 0.5 * lam * jnp.sum(h * theta**2)


def _quadratic004_outer(theta, lam, batch):
    """½(θ − θ̃)ᵀH(θ − θ̃) with H = diag(h)."""
    del lam
    theta_tilde, h = batch
    return 0.5 * jnp.sum(h * (theta - theta_tilde) ** 2)


def _unrolled_inner(w, log_lam, batch):
    """½wᵀAw − bᵀw + ½e^λ‖w‖²."""
    A, b = batch
    return 0.5 * w @ (A @ w) - b @ w + 0.5 * jnp.exp(log_lam) * (w @ w)


def _unrolled_outer(w, log_lam, batch):
    """½‖Cw − e‖²."""
    del log_lam
    C, e = batch
    return 0.5 * jnp.sum((C @ w - e) ** 2)


def _affine_inner(w, lam, batch):
    """½‖w − Aλ − b‖²."""
    A, b = batch
    return 0.5 * jnp.sum((w - A @ lam - b) ** 2)


_RIDGE_PROBLEM = Problem(inner=_ridge_inner, outer=_ridge_outer)
_AFFINE_PROBLEM = Problem(inner=_affine_inner, outer=_ridge_outer)
_QUADRATIC004_PROBLEM = Problem(inner=_quadratic004_inner, outer=_quadratic004_outer)
_UNROLLED_PROBLEM = Problem(inner=_unrolled_inner, outer=_unrolled_outer)

# ----------------------------------------------------------------------------------------------
# Argument checks (host-side, at construction time).
# ----------------------------------------------------------------------------------------------


def check_int(value: Any, name: str, where: str, minimum: int, example: int) -> int:
    """Return `value` as an int, raising if it is not an integer `>= minimum`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{where} requires an integer {name} >= {minimum}; got {type(value).__name__} "
            f"{value!r}. Pass a Python int, e.g. {name}={example}."
        )
    if value < minimum:
        raise ValueError(
            f"{where} requires {name} >= {minimum}; got {name}={value}. "
            f"Pass e.g. {name}={example}."
        )
    return int(value)


def check_real(
    value: Any, name: str, where: str, *, low: float, strict: bool, example: float
) -> float:
    """Return `value` as a float, raising unless it is finite and `> low` (or `>= low`)."""
    op = ">" if strict else ">="
    try:
        v = float(value)
    except TypeError as err:
        raise TypeError(
            f"{where} requires a concrete real number {name} {op} {low}; got "
            f"{type(value).__name__} {value!r}. Pass a Python float, e.g. {name}={example}."
        ) from err
    if not np.isfinite(v) or v < low or (strict and v == low):
        raise ValueError(
            f"{where} requires a finite {name} {op} {low}; got {name}={value!r}. "
            f"Pass e.g. {name}={example}."
        )
    return v


def check_range(value: Any, name: str, where: str, *, above: float, example: str):
    """Return `(lo, hi)` floats, raising unless `above < lo <= hi` and both are finite."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{where} requires {name} to be a pair (low, high) of real numbers; got "
            f"{value!r}. Pass e.g. {name}={example}."
        ) from err
    if not (np.isfinite(lo) and np.isfinite(hi) and above < lo <= hi):
        raise ValueError(
            f"{where} requires {name}=(low, high) with {above} < low <= high, both finite; "
            f"got {name}={value!r}. Pass e.g. {name}={example}."
        )
    return lo, hi


def resolve_dtype(dtype: Any, where: str) -> np.dtype:
    """`None` -> JAX's default float (float64 under x64); otherwise a usable real float dtype."""
    if dtype is None:
        return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
    try:
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(
            f"{where} requires dtype to be a floating dtype such as jnp.float64 or "
            f"jnp.float32; got {dtype!r}."
        ) from err
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{where} requires a real floating dtype (e.g. jnp.float64 or jnp.float32); got "
            f"dtype={dt}. Pass dtype=jnp.float32 or dtype=jnp.float64."
        )
    if jax.dtypes.canonicalize_dtype(dt) != dt:
        raise ValueError(
            f"{where} was asked for dtype={dt}, which needs 64-bit mode, but jax_enable_x64 "
            "is off. Call jax.config.update('jax_enable_x64', True) at start-up, or pass "
            "dtype=jnp.float32."
        )
    return dt


def _rng(key_or_seed: Any, where: str) -> np.random.Generator:
    """A NumPy generator from a non-negative int seed or one concrete JAX PRNG key."""
    fix = (
        "Pass a non-negative Python int (e.g. 0) or one key from jax.random.key(0). To build "
        "many instances, call it in a Python loop and stack them with "
        "jax.tree.map(lambda *xs: jnp.stack(xs), *problems)."
    )
    if isinstance(key_or_seed, jax.core.Tracer):
        raise TypeError(
            f"{where} draws with NumPy and needs a concrete seed or key; got a traced value "
            f"{key_or_seed!r} (it was called inside jit, vmap or grad). {fix}"
        )
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, (bool, np.bool_)):
        if key_or_seed < 0:
            raise ValueError(f"{where} requires a seed >= 0; got {key_or_seed}. {fix}")
        return np.random.default_rng(int(key_or_seed))
    if isinstance(key_or_seed, (jax.Array, np.ndarray)):
        data = key_or_seed
        if jax.dtypes.issubdtype(data.dtype, jax.dtypes.prng_key):
            data = jax.random.key_data(data)
        if data.dtype == np.uint32 and data.ndim == 1:
            return np.random.default_rng(np.asarray(data).tolist())
    raise TypeError(
        f"{where} requires a seed or a single PRNG key; got {type(key_or_seed).__name__} "
        f"{key_or_seed!r}. {fix}"
    )


def _floats(*arrays) -> tuple[Array, ...]:
    """Convert to JAX arrays of one common real floating dtype (ints -> default float)."""
    arrays = [jnp.asarray(a) for a in arrays]
    dtype = jnp.result_type(*arrays)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"Exact problems hold real data; got complex dtype {dtype}. Pass real arrays."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    return tuple(a.astype(dtype) for a in arrays)


def _concrete(x: Array) -> np.ndarray | None:
    """The value of `x` on the host, or `None` while tracing (value checks are then skipped)."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _check_shapes(where: str, expected: str, ok: bool, **arrays) -> None:
    if not ok:
        got = ", ".join(f"{k} {tuple(jnp.shape(v))}" for k, v in arrays.items())
        raise ValueError(
            f"{where} requires {expected}; got {got}. Check the shapes of the arrays passed, "
            "or build a random instance with .sample(seed)."
        )


def _check_positive(where: str, name: str, x: Array, fix: str) -> None:
    value = _concrete(x)
    if value is not None and not np.all(np.isfinite(value) & (value > 0)):
        raise ValueError(
            f"{where} requires every entry of {name} to be finite and > 0; got "
            f"min {name} = {np.min(value)!r}. {fix}"
        )


def _cast_hparams(hparams: Any, shape: tuple, dtype, where: str, what: str) -> Array:
    """`hparams` as an array of `shape` in the problem's dtype, or an error saying what's wanted."""
    x = jnp.asarray(hparams)
    if x.shape != shape:
        raise ValueError(
            f"{where} requires hparams of shape {shape} ({what}); got shape {x.shape}. "
            "Pass an array of that shape, e.g. problem.hparams."
        )
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(
            f"{where} requires real-valued hparams ({what}); got dtype {x.dtype}."
        )
    return x.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Sampling helpers (NumPy, float64; cast to the requested dtype at the end).
# ----------------------------------------------------------------------------------------------


def _orthonormal(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """An (n, d) matrix with orthonormal columns, Haar-distributed (QR with sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((n, d)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _spectrum(rng: np.random.Generator, d: int, max_condition: float) -> np.ndarray:
    """d values log-uniform in [1, max_condition]: their max/min ratio is <= max_condition."""
    return np.exp(rng.uniform(0.0, np.log(max_condition), size=d))


def _sample_regression(rng, dim, n_train, n_val, max_condition, noise):
    """(X, y, Xv, yv) with XᵀX/n = V diag(s) Vᵀ, s log-uniform in [1, max_condition]."""
    U, V = _orthonormal(rng, n_train, dim), _orthonormal(rng, dim, dim)
    X = (U * np.sqrt(n_train * _spectrum(rng, dim, max_condition))) @ V.T
    w_true = rng.standard_normal(dim)
    Xv = rng.standard_normal((n_val, dim))
    y = X @ w_true + noise * rng.standard_normal(n_train)
    yv = Xv @ w_true + noise * rng.standard_normal(n_val)
    return X, y, Xv, yv


def _regression_sizes(where, dim, n_train, n_val, max_condition, noise):
    dim = check_int(dim, "dim", where, 1, 5)
    n_train = 2 * dim if n_train is None else check_int(n_train, "n_train", where, dim, 2 * dim)
    n_val = 2 * dim if n_val is None else check_int(n_val, "n_val", where, 1, 2 * dim)
    max_condition = check_real(max_condition, "max_condition", where, low=1.0, strict=False,
                               example=10.0)
    noise = check_real(noise, "noise", where, low=0.0, strict=False, example=0.5)
    return dim, n_train, n_val, max_condition, noise


# ----------------------------------------------------------------------------------------------
# Ridge regression (shared closed forms for one penalty or one per coordinate).
# ----------------------------------------------------------------------------------------------


def _check_regression(where: str, X, y, Xv, yv) -> None:
    ok = (
        X.ndim == 2 and Xv.ndim == 2 and X.shape[0] >= 1 and X.shape[1] >= 1
        and Xv.shape[0] >= 1 and Xv.shape[1] == X.shape[1]
        and y.shape == X.shape[:1] and yv.shape == Xv.shape[:1]
    )
    _check_shapes(
        where, "X of shape (n, d), y of shape (n,), Xv of shape (m, d) and yv of shape (m,) "
        "with n, m, d >= 1", ok, X=X, y=y, Xv=Xv, yv=yv,
    )


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
# The abstract interface.
# ----------------------------------------------------------------------------------------------


class AbstractExactProblem(eqx.Module):
    """A bilevel problem whose response, value, Hessian and hypergradient are known exactly.

    Concrete subclasses ([`bilevel.testing.Ridge`][], [`bilevel.testing.RidgePerCoordinate`][],
    [`bilevel.testing.Quadratic004`][], [`bilevel.testing.UnrolledQuadratic`][]) are final
    `equinox.Module`s holding the data as array fields. Every closed form is written with
    `jax.numpy` linear algebra only (no autodiff of the losses), works under `jit` and
    `vmap` (over hyperparameters, or over instances stacked leaf-wise), and is computed in
    the problem's `dtype` (hyperparameters are cast to it).

    The hypergradient is `d L_V(w*(λ), λ) / dλ` with `w*(λ) = argmin_w L_T(w, λ)`, i.e. by
    the implicit function theorem

        ∂L_V/∂λ − (∂²L_T/∂λ∂w)ᵀ (∂²L_T/∂w²)⁻¹ ∂L_V/∂w    at w = w*(λ).

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.Ridge.sample(0, dim=3)
    problem = exact.problem                    # a bilevel.Problem
    loss = problem.inner(exact.params0, exact.hparams, exact.inner_batch)
    assert jnp.shape(exact.hypergrad(exact.hparams)) == jnp.shape(exact.hparams)
    ```
    """

    @property
    @abc.abstractmethod
    def problem(self) -> Problem:
        """The `bilevel.Problem` (training and validation loss) this instance's data is for."""

    @property
    @abc.abstractmethod
    def hparams(self) -> Array:
        """A default hyperparameter value (the one the instance was built with)."""

    @property
    @abc.abstractmethod
    def params0(self) -> Array:
        """A default initial value of the inner parameters."""

    @property
    @abc.abstractmethod
    def inner_batch(self):
        """The batch to pass to `problem.inner`."""

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
    def response(self, hparams) -> Array:
        """The exact minimiser `w*(λ)` of the training loss.

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        An array shaped like `self.params0`.
        """

    @abc.abstractmethod
    def hessian(self, hparams) -> Array:
        """The dense inner Hessian `∂²L_T/∂w²` at `w*(λ)`, of shape `(d, d)`.

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        A symmetric positive-definite `(d, d)` array.
        """

    @abc.abstractmethod
    def hypergrad(self, hparams) -> Array:
        """The exact hypergradient `d L_V(w*(λ), λ)/dλ` (implicit function theorem).

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        An array shaped like `hparams`.
        """

    @abc.abstractmethod
    def identity_hypergrad(self, hparams) -> Array:
        """`∂L_V/∂λ − (∂²L_T/∂λ∂w)ᵀ ∂L_V/∂w` at `w*(λ)`: the IFT with `H⁻¹ ≈ I`.

        This is what one-step / greedy methods (Luketina et al. 2016; Neumann with zero
        terms) estimate when the inner problem is solved exactly.

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        An array shaped like `hparams`.
        """

    def value(self, hparams) -> Array:
        """The validation loss at the exact response, `L_V(w*(λ), λ)`.

        **Arguments:**

        - `hparams`: the hyperparameters λ, shaped like `self.hparams`.

        **Returns:**

        A scalar array of dtype `self.dtype`.
        """
        lam = self._cast(hparams)
        return self.problem.outer(self.response(lam), lam, self.outer_batch)


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
