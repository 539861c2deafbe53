"""What the exact problems share: argument checks, data and sampling helpers.

The argument checks (`check_int`, `check_real`, `check_range`, `resolve_dtype`, `_rng`, ...),
the data conversions (`_floats`, `_cast_hparams`) and the NumPy random-matrix and regression
sampling helpers serve every exact-problem family (one file each: `_ridge.py`,
`_quadratic004.py`, `_unrolled.py`, `_affine.py`, `_sparse.py`, `_constrained.py`,
`_fixed_point.py`).

[`bilevel.testing.AbstractConditionProblem`][] is the interface of the exact problems whose
inner problem is not smooth and unconstrained (Lasso, elastic net, box- and
simplex-constrained and KKT-form quadratic programs, fixed points); the helpers after it are
the jit/vmap-friendly linear algebra they share and the NumPy sampling pieces.
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


# ----------------------------------------------------------------------------------------------
# The interface of the problems defined by optimality conditions.
# ----------------------------------------------------------------------------------------------


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
    V = _orthonormal(rng, d, d)
    Q = (V * _spectrum(rng, d, max_condition)) @ V.T
    return 0.5 * (Q + Q.T)


def design(rng: np.random.Generator, n: int, d: int, max_condition: float):
    """`(U, sv, V)` with `X = U diag(sv) Vᵀ` and `XᵀX/n` eigenvalues in [1, max_condition]."""
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
