"""Exact constrained quadratic programs: closed forms on the active set of the solution.

Every problem here is a strictly convex quadratic program

    min_w ½wᵀQw − qᵀw    s.t.   Ew = e,   Gw <= h

whose linear term (or data) depends on the hyperparameters. On a fixed active set `A` the
solution solves the equality-constrained KKT system

    [[Q, Eᵀ, G_Aᵀ], [E, 0, 0], [G_A, 0, 0]] [w; ν; μ_A] = [q; e; h_A]

(sign convention: `∇_w[½wᵀQw − qᵀw + νᵀ(Ew − e) + μᵀ(Gw − h)] = 0`, `μ >= 0`),
which is linear in `q`, so the response and the hypergradient follow from one dense solve. Each
instance stores the active set at its default hyperparameters (found when it is built by
a dual projected-gradient solve in NumPy float64, then checked exactly) and is exact
wherever that active set stays optimal (`is_valid`), NaN elsewhere.
"""

from __future__ import annotations

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
    check_real,
    check_spd,
    design,
    fraction_size,
    host,
    masked_solve,
    max_abs,
    nan_unless,
    resolve_dtype,
    spd,
    targets_with_moment,
    tolerance,
)

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# Losses and constraint maps: pure functions of (params, hparams, batch).
# ----------------------------------------------------------------------------------------------


def _qp_inner(w, lam, batch):
    """½wᵀQw − (c + Bλ)ᵀw with `(Q, c, B) = batch[:3]`."""
    Q, c, B = batch[:3]
    return 0.5 * w @ (Q @ w) - (c + B @ lam) @ w


def _target_outer(w, lam, batch):
    """½‖w − w_target‖² with `w_target = batch`."""
    del lam
    return 0.5 * jnp.sum((w - batch) ** 2)


def _ridge_loss(w, log_lam, batch):
    """1/(2n)‖Xw − y‖² + ½e^λ‖w‖²."""
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.exp(log_lam) * (w @ w)


def _least_squares(w, log_lam, batch):
    """1/(2m)‖Xv w − yv‖²."""
    del log_lam
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def _shifted_least_squares(w, lam, batch):
    """½‖Aw − b − Cλ‖² with `(A, b, C) = batch`."""
    A, b, C = batch
    return 0.5 * jnp.sum((A @ w - b - C @ lam) ** 2)


def _kkt_inner(params, lam, batch):
    """`_qp_inner` of the primal part of a KKT triple `(w, ν, μ)`."""
    return _qp_inner(params[0], lam, batch)


def _kkt_outer(params, lam, batch):
    """`_target_outer` of the primal part of a KKT triple `(w, ν, μ)`."""
    return _target_outer(params[0], lam, batch)


def _equality(w, lam, batch):
    """`Aw − b` with `(A, b) = batch[3:5]`: zero at a feasible point."""
    del lam
    A, b = batch[3:5]
    return A @ w - b


def _inequality(w, lam, batch):
    """`Gw − h` with `(G, h) = batch[3:5]`: `<= 0` at a feasible point."""
    del lam
    G, h = batch[3:5]
    return G @ w - h


_BOX_PROBLEM = Problem(inner=_qp_inner, outer=_target_outer)
_NNLS_PROBLEM = Problem(inner=_ridge_loss, outer=_least_squares)
_SIMPLEX_PROBLEM = Problem(inner=_shifted_least_squares, outer=_target_outer)
_KKT_PROBLEM = Problem(inner=_kkt_inner, outer=_kkt_outer)

# ----------------------------------------------------------------------------------------------
# Host-side (NumPy float64): find and verify the active set.
# ----------------------------------------------------------------------------------------------


def _kkt_check(Q, q, E, e, G, h, active):
    """`(w, ν, μ, message)`: the KKT solution with the `active` rows of `G` as equalities.

    `message` is `None` when it is optimal (`μ >= 0`, inactive rows feasible, up to a
    relative tolerance 1e-9), and says what fails otherwise.
    """
    d, p = Q.shape[0], G.shape[0]
    C = np.concatenate([E, G[active]])
    mu = np.zeros(p)
    if C.shape[0] and np.linalg.matrix_rank(C) < C.shape[0]:
        return None, None, mu, (f"the equality constraints and the active inequality rows "
                                f"{np.flatnonzero(active).tolist()} are linearly dependent")
    K = np.block([[Q, C.T], [C, np.zeros((C.shape[0], C.shape[0]))]])
    sol = np.linalg.solve(K, np.concatenate([q, e, h[active]]))
    w, nu, mu[active] = sol[:d], sol[d:d + E.shape[0]], sol[d + E.shape[0]:]
    tol = 1e-9
    slack = G @ w - h
    scale = 1 + np.abs(h) + np.abs(G) @ np.abs(w)
    bad = np.flatnonzero(~active & (slack > tol * scale))
    if bad.size:
        i = int(bad[0])
        return w, nu, mu, f"inequality {i} is violated (G_i w − h_i = {slack[i]:.3g} > 0)"
    bad = np.flatnonzero(active & (mu < -tol * (1 + np.max(np.abs(q)) + np.max(np.abs(Q @ w)))))
    if bad.size:
        i = int(bad[0])
        return w, nu, mu, f"the multiplier of active inequality {i} is negative ({mu[i]:.3g})"
    return w, nu, mu, None


def _solve_qp(Q, q, E, e, G, h, where):
    """The active set of `min ½wᵀQw − qᵀw s.t. Ew = e, Gw <= h` (bool over G's rows).

    FISTA with adaptive restart on the dual (a concave quadratic over `ν` free and
    `μ >= 0`); every 20 iterations the active set is guessed from `μ > 0` and from the
    primal slack, and accepted once the KKT solution on it checks out exactly.
    """
    k, p = E.shape[0], G.shape[0]
    active = np.zeros(p, bool)
    if _kkt_check(Q, q, E, e, G, h, active)[3] is None:
        return active
    C, rhs = np.concatenate([E, G]), np.concatenate([e, h])
    Qinv = np.linalg.inv(Q)
    L = np.linalg.eigvalsh(C @ Qinv @ C.T)[-1]
    z = z_prev = np.zeros(k + p)
    t = 1.0
    for it in range(1, 100001):
        t_next = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        y = z + (t - 1) / t_next * (z - z_prev)
        z_new = y + (C @ (Qinv @ (q - C.T @ y)) - rhs) / L
        z_new[k:] = np.maximum(z_new[k:], 0.0)
        if (y - z_new) @ (z_new - z) > 0:  # the dual value went down: restart momentum
            t_next = 1.0
        z_prev, z, t = z, z_new, t_next
        if it % 20 == 0:
            w = Qinv @ (q - C.T @ z)
            slack = G @ w - h
            for guess in (z[k:] > 0, slack > -1e-7 * (1 + np.abs(h))):
                if _kkt_check(Q, q, E, e, G, h, guess)[3] is None:
                    return guess
    raise ValueError(
        f"{where} could not identify the active set of the solution (100000 dual "
        "iterations). The problem may be degenerate or badly conditioned at these "
        "hyperparameters; pass active=... explicitly, or build one with .sample(seed)."
    )


def _init_active(where, Q, q, E, e, G, h, active, shape_msg):
    """Compute (when None) or check the boolean active set over the rows of `G`."""
    if active is None:
        return _solve_qp(Q, q, E, e, G, h, where)
    msg = _kkt_check(Q, q, E, e, G, h, active)[3]
    if msg is not None:
        raise ValueError(
            f"{where}: the active set passed is not that of the solution at the given "
            f"hyperparameters: {msg}. Omit active= to have it computed ({shape_msg})."
        )
    return active


def _bool_mask(where, name, value, size, meaning):
    m = np.asarray(value)
    if m.shape != (size,) or m.dtype.kind not in "biu" or not np.all(np.isin(m, (0, 1))):
        raise ValueError(
            f"{where} requires {name} to be a boolean array of shape ({size},) ({meaning}); "
            f"got {value!r}. Omit {name}= to have it computed."
        )
    return m.astype(bool)


def _cast_lam(where, lam, k):
    _check_shapes(f"{where}(lam=...)", f"lam of shape () or ({k},)", jnp.shape(lam) in ((), (k,)),
                  lam=lam)
    return jnp.broadcast_to(lam, (k,))


def _qp_sizes(where, dim, num_hparams, max_condition):
    dim = check_int(dim, "dim", where, 1, 6)
    k = check_int(num_hparams, "num_hparams", where, 1, 2)
    max_condition = check_real(max_condition, "max_condition", where, low=1.0, strict=False,
                               example=10.0)
    return dim, k, max_condition


def _validity_scale(*arrays):
    return 1 + sum(max_abs(a) for a in arrays)


# ----------------------------------------------------------------------------------------------
# Box-constrained QP.
# ----------------------------------------------------------------------------------------------


class BoxQP(AbstractConditionProblem):
    """A strictly convex quadratic over a box, with a linear term affine in λ.

        L_T(w, λ) = ½wᵀQw − (c + Bλ)ᵀw  s.t.  lower <= w <= upper     L_V(w) = ½‖w − w_target‖²

    `problem.inner` is the quadratic; the constraint is handled by projection
    ([`project`][bilevel.testing.BoxQP.project], a clip), so the solution is a fixed point
    of projected gradient `w = project(w − η∇L_T(w))`. λ is a `(k,)` vector used raw. With
    `F` the free coordinates and `A` those at a bound (`w_A = lower_A` or `upper_A`),

        Q_FF w_F = (c + Bλ)_F − Q_FA w_A,     dw_F/dλ = Q_FF⁻¹ B_F,  dw_A/dλ = 0,
        dL_V/dλ = B_Fᵀ Q_FF⁻¹ (w* − w_target)_F.

    The active set is stored in the field `active` (`-1` at the lower bound, `+1` at the
    upper, `0` free); the closed forms are exact where it stays optimal (`is_valid`), NaN
    elsewhere. Bounds may be infinite (`±inf`).

    **Arguments:**

    - `Q`: symmetric positive-definite `(d, d)`.
    - `c`: `(d,)`.
    - `B`: `(d, k)`.
    - `lower`, `upper`: `(d,)` bounds with `lower < upper`.
    - `w_target`: the validation target, `(d,)`.
    - `lam`: the default hyperparameters, `(k,)` (a scalar is broadcast); default `0.0`.
    - `active`: optional `(d,)` integers in `{-1, 0, 1}`: the active set at `lam`
      (computed if omitted, checked if given).

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.BoxQP.sample(0, dim=6, num_hparams=2)
    w = exact.response(exact.hparams)
    Q, c, B = exact.inner_batch
    step = exact.project(w - (Q @ w - c - B @ exact.hparams) / exact.lipschitz)
    assert jnp.allclose(step, w)                   # a projected-gradient fixed point
    ```
    """

    Q: Array
    c: Array
    B: Array
    lower: Array
    upper: Array
    w_target: Array
    lam: Array
    active: Array

    def __init__(self, Q, c, B, lower, upper, w_target, lam=0.0, *, active=None):
        where = "BoxQP"
        Q, c, B, lower, upper, w_target, lam = _floats(Q, c, B, lower, upper, w_target, lam)
        d = c.shape[0] if c.ndim == 1 else -1
        ok = (d >= 1 and Q.shape == (d, d) and B.ndim == 2 and B.shape[0] == d
              and B.shape[1] >= 1 and lower.shape == upper.shape == w_target.shape == (d,))
        _check_shapes(f"{where}(Q, c, B, lower, upper, w_target)", "Q (d, d), c (d,), B (d, k), "
                      "lower, upper and w_target (d,) with d, k >= 1", ok, Q=Q, c=c, B=B,
                      lower=lower, upper=upper, w_target=w_target)
        lam = _cast_lam(where, lam, B.shape[1])
        Qh, lo, up = host(Q), host(lower), host(upper)
        check_spd(where, "Q", Qh, "Pass e.g. Q = M.T @ M + I.")
        if not np.all(lo < up):
            i = int(np.flatnonzero(~(lo < up))[0])
            raise ValueError(f"{where} requires lower < upper everywhere; got lower[{i}] = "
                             f"{lo[i]!r}, upper[{i}] = {up[i]!r}. Widen the box.")
        q = host(c) + host(B) @ host(lam)
        fin_up, fin_lo = np.isfinite(up), np.isfinite(lo)
        I = np.eye(d)
        G = np.concatenate([I[fin_up], -I[fin_lo]])
        h = np.concatenate([up[fin_up], -lo[fin_lo]])
        if active is not None:
            a = np.asarray(active)
            if a.shape != (d,) or not np.all(np.isin(a, (-1, 0, 1))):
                raise ValueError(f"{where} requires active to be an array of shape ({d},) in "
                                 f"{{-1, 0, 1}} (-1 at lower, 1 at upper, 0 free); got "
                                 f"{active!r}. Omit active= to have it computed.")
            if np.any((a == 1) & ~fin_up) or np.any((a == -1) & ~fin_lo):
                raise ValueError(f"{where}: active marks a coordinate at an infinite bound; "
                                 "omit active= to have it computed.")
            rows = np.concatenate([a[fin_up] == 1, a[fin_lo] == -1])
        else:
            rows = None
        rows = _init_active(where, Qh, q, np.zeros((0, d)), np.zeros(0), G, h, rows,
                            "-1 at lower, 1 at upper, 0 free")
        a = np.zeros(d, np.int32)
        a[np.flatnonzero(fin_up)[rows[:fin_up.sum()]]] = 1
        a[np.flatnonzero(fin_lo)[rows[fin_up.sum():]]] = -1
        self.Q, self.c, self.B, self.lower, self.upper = Q, c, B, lower, upper
        self.w_target, self.lam, self.active = w_target, lam, jnp.asarray(a)

    @classmethod
    def sample(cls, key, *, dim=6, num_hparams=2, max_condition=10.0, dtype=None) -> "BoxQP":
        """Draw an instance whose solution at `λ = 0` is strictly complementary.

        The solution is chosen first and `c` built around it: `Q` has eigenvalues
        log-uniform in `[1, max_condition]` (Haar-random eigenvectors); bounds
        `lower_i ~ −U(0.5, 1.5)`, `upper_i ~ U(0.5, 1.5)`; 30 % to 70 % of the coordinates
        (at least one, and for `dim >= 2` not all) are free, at a distance
        `>= 0.1 (upper_i − lower_i)` from both bounds, the others at a random bound with a
        multiplier `|∂L_T/∂w_i|` uniform in `[0.5, 1.5]`. `B`, `w_target` are standard
        normal.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the number of parameters `d >= 1`.
        - `num_hparams`: the number of hyperparameters `k >= 1`.
        - `max_condition`: bound `>= 1` on the condition number of `Q`.
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        A `BoxQP` instance.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.BoxQP.sample(1, dim=5)
        assert (exact.active == 0).any() and (exact.active != 0).any()
        ```
        """
        where = "BoxQP.sample"
        rng = _rng(key, where)
        dim, k, max_condition = _qp_sizes(where, dim, num_hparams, max_condition)
        dt = resolve_dtype(dtype, where)
        Q = spd(rng, dim, max_condition)
        lower, upper = -rng.uniform(0.5, 1.5, dim), rng.uniform(0.5, 1.5, dim)
        order = rng.permutation(dim)
        active = np.where(rng.random(dim) < 0.5, -1, 1).astype(np.int32)
        active[order[:fraction_size(rng, dim)]] = 0
        w = np.where(active == 1, upper, lower)
        free = active == 0
        w[free] = lower[free] + (upper - lower)[free] * rng.uniform(0.1, 0.9, free.sum())
        grad = -active * rng.uniform(0.5, 1.5, dim)  # ∂L_T/∂w: >= 0 at lower, <= 0 at upper
        c = Q @ w - grad
        B, w_target = rng.standard_normal((dim, k)), rng.standard_normal(dim)
        arrays = (Q, c, B, lower, upper, w_target, np.zeros(k))
        return cls(*(jnp.asarray(a, dt) for a in arrays), active=active)

    @property
    def problem(self) -> Problem:
        return _BOX_PROBLEM

    @property
    def hparams(self) -> Array:
        return self.lam

    @property
    def params0(self) -> Array:
        return jnp.zeros_like(self.c)

    @property
    def inner_batch(self):
        return (self.Q, self.c, self.B)

    @property
    def outer_batch(self):
        return self.w_target

    @property
    def dtype(self):
        return self.Q.dtype

    @property
    def lipschitz(self) -> Array:
        """The largest eigenvalue of `Q`: a projected-gradient step `1/lipschitz` converges."""
        return jnp.linalg.eigvalsh(self.Q)[-1]

    def project(self, x) -> Array:
        """The Euclidean projection onto the box, `clip(x, lower, upper)`.

        **Arguments:**

        - `x`: a `(d,)` point.

        **Returns:**

        A `(d,)` array.
        """
        return jnp.clip(x, self.lower, self.upper)

    def _cast(self, hparams):
        k = self.B.shape[1]
        return _cast_hparams(hparams, (k,), self.dtype, "BoxQP", f"{k} hyperparameters")

    def _solve(self, hparams):
        q = self.c + self.B @ self._cast(hparams)
        free = self.active == 0
        bound = jnp.where(self.active == 1, self.upper, jnp.where(self.active == -1, self.lower, 0))
        w = masked_solve(self.Q, free, q - self.Q @ bound) + bound
        grad = self.Q @ w - q
        tol = tolerance(self.dtype)
        slack = tol * (1 + jnp.abs(w))
        inside = (w >= self.lower - slack) & (w <= self.upper + slack)
        sign_ok = -self.active * grad >= -tol * _validity_scale(q, self.Q @ w)
        valid = jnp.all(jnp.where(free, inside, sign_ok))
        return w, free, valid

    def is_valid(self, hparams) -> Array:
        """Free coordinates inside the box, multipliers `>= 0`.

        See [`AbstractConditionProblem.is_valid`][].
        """
        return self._solve(hparams)[2]

    def response(self, hparams) -> Array:
        """`w_A` at its bounds, `w_F = Q_FF⁻¹((c + Bλ)_F − Q_FA w_A)`.

        See [`AbstractConditionProblem.response`][].
        """
        w, _, valid = self._solve(hparams)
        return nan_unless(valid, w)

    def hypergrad(self, hparams) -> Array:
        """`B_Fᵀ Q_FF⁻¹ (w* − w_target)_F`; see [`AbstractConditionProblem.hypergrad`][]."""
        w, free, valid = self._solve(hparams)
        return nan_unless(valid, self.B.T @ masked_solve(self.Q, free, w - self.w_target))


# ----------------------------------------------------------------------------------------------
# Nonnegative (ridge) least squares.
# ----------------------------------------------------------------------------------------------


class NonnegativeLeastSquares(AbstractConditionProblem):
    """Ridge regression constrained to nonnegative weights, with one log-penalty.

        L_T(w, λ) = 1/(2n)‖Xw − y‖² + ½e^λ‖w‖²  s.t.  w >= 0     L_V(w) = 1/(2m)‖Xv w − yv‖²

    `problem.inner` is the (smooth) ridge loss; the constraint is handled by projection
    ([`project`][bilevel.testing.NonnegativeLeastSquares.project], `max(x, 0)`). With `F`
    the free (positive) coordinates, `K = X_FᵀX_F/n + e^λ I` and `u = K⁻¹ ∇_F L_V(w*)`:

        w*_F = K⁻¹ X_Fᵀy/n,  w* = 0 off F,        dL_V/dλ = −e^λ w*_Fᵀ u.

    The active set (`w_i = 0`) is stored in the field `active`; exact where it stays
    optimal (`is_valid`), NaN elsewhere.

    **Arguments:**

    - `X`: training inputs, shape `(n, d)`.
    - `y`: training targets, shape `(n,)`.
    - `Xv`: validation inputs, shape `(m, d)`.
    - `yv`: validation targets, shape `(m,)`.
    - `log_lam`: the default hyperparameter (scalar log-penalty), default `0.0`.
    - `active`: optional boolean `(d,)`, true where `w*_i = 0` at `log_lam` (computed if
      omitted, checked if given).

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.NonnegativeLeastSquares.sample(0, dim=6)
    w = exact.response(exact.hparams)
    assert bool((w >= 0).all()) and bool((w == 0).any())
    ```
    """

    X: Array
    y: Array
    Xv: Array
    yv: Array
    log_lam: Array
    active: Array

    def __init__(self, X, y, Xv, yv, log_lam=0.0, *, active=None):
        where = "NonnegativeLeastSquares"
        X, y, Xv, yv, log_lam = _floats(X, y, Xv, yv, log_lam)
        _check_regression(f"{where}(X, y, Xv, yv)", X, y, Xv, yv)
        _check_shapes(f"{where}(log_lam=...)", "a scalar log_lam", log_lam.shape == (),
                      log_lam=log_lam)
        Xh, yh = host(X), host(y)
        n, d = Xh.shape
        Q = Xh.T @ Xh / n + np.exp(host(log_lam)) * np.eye(d)
        if active is not None:
            active = _bool_mask(where, "active", active, d, "true where w*_i = 0")
        active = _init_active(where, Q, Xh.T @ yh / n, np.zeros((0, d)), np.zeros(0),
                              -np.eye(d), np.zeros(d), active, "true where w*_i = 0")
        self.X, self.y, self.Xv, self.yv, self.log_lam = X, y, Xv, yv, log_lam
        self.active = jnp.asarray(active)

    @classmethod
    def sample(
        cls, key, *, dim=6, n_train=None, n_val=None, max_condition=10.0, noise=0.5,
        log_lam=0.0, dtype=None,
    ) -> "NonnegativeLeastSquares":
        """Draw an instance whose solution at `log_lam` is strictly complementary.

        `X` is drawn as in [`bilevel.testing.Ridge.sample`][]; the solution is chosen
        first: 30 % to 70 % of the coordinates (at least one, and for `dim >= 2` not all)
        positive, uniform in `[0.5, 1.5]`, the others 0 with a multiplier
        `∂L_T/∂w_i` uniform in `[0.5, 1.5]`; `y` is built to match, plus noise orthogonal
        to `X`'s columns. Validation targets are `Xv w_ls + noise·ε`.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the number of parameters `d >= 1`.
        - `n_train`: training rows, `>= dim` (default `2 * dim`).
        - `n_val`: validation rows, `>= 1` (default `2 * dim`).
        - `max_condition`: bound `>= 1` on the condition number of `XᵀX/n`.
        - `noise`: target noise standard deviation, `>= 0`.
        - `log_lam`: the default hyperparameter.
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        A `NonnegativeLeastSquares` instance.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.NonnegativeLeastSquares.sample(3, dim=4, log_lam=-1.0)
        assert exact.active.shape == (4,)
        ```
        """
        where = "NonnegativeLeastSquares.sample"
        rng = _rng(key, where)
        dim, n_train, n_val, max_condition, noise = _regression_sizes(
            where, dim, n_train, n_val, max_condition, noise)
        log_lam = check_real(log_lam, "log_lam", where, low=-np.inf, strict=True, example=0.0)
        dt = resolve_dtype(dtype, where)
        U, sv, V = design(rng, n_train, dim, max_condition)
        H = (V * sv**2 / n_train) @ V.T
        active = np.ones(dim, bool)
        active[rng.permutation(dim)[:fraction_size(rng, dim)]] = False
        w = np.where(active, 0.0, rng.uniform(0.5, 1.5, dim))
        grad = np.where(active, rng.uniform(0.5, 1.5, dim), 0.0)
        moment = (H + np.exp(log_lam) * np.eye(dim)) @ w - grad  # Xᵀy/n
        X = (U * sv) @ V.T
        y = targets_with_moment(rng, U, sv, V, moment, noise)
        Xv = rng.standard_normal((n_val, dim))
        yv = Xv @ np.linalg.solve(H, moment) + noise * rng.standard_normal(n_val)
        return cls(*(jnp.asarray(a, dt) for a in (X, y, Xv, yv, log_lam)), active=active)

    @property
    def problem(self) -> Problem:
        return _NNLS_PROBLEM

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
        """`λ_max(XᵀX/n) + e^{log_lam}`: the Lipschitz constant of `∇problem.inner` at `hparams`.

        At another λ it is `lipschitz − e^{log_lam} + e^λ`.
        """
        n = self.X.shape[0]
        return jnp.linalg.eigvalsh(self.X.T @ self.X / n)[-1] + jnp.exp(self.log_lam)

    def project(self, x) -> Array:
        """The Euclidean projection onto `w >= 0`, `max(x, 0)`.

        **Arguments:**

        - `x`: a `(d,)` point.

        **Returns:**

        A `(d,)` array.
        """
        return jnp.maximum(x, 0)

    def _cast(self, hparams):
        return _cast_hparams(hparams, (), self.dtype, "NonnegativeLeastSquares",
                             "a scalar log-penalty log λ")

    def _solve(self, hparams):
        rho = jnp.exp(self._cast(hparams))
        n, d = self.X.shape
        K = self.X.T @ self.X / n + rho * jnp.eye(d, dtype=self.dtype)
        v = self.X.T @ self.y / n
        free = ~self.active
        w = masked_solve(K, free, v)
        grad = K @ w - v
        tol = tolerance(self.dtype)
        ok = jnp.where(free, w >= -tol * (1 + max_abs(w)), grad >= -tol * _validity_scale(v, K @ w))
        return rho, K, free, w, jnp.all(ok)

    def is_valid(self, hparams) -> Array:
        """Free weights `>= 0`, multipliers `>= 0`; see [`AbstractConditionProblem.is_valid`][]."""
        return self._solve(hparams)[-1]

    def response(self, hparams) -> Array:
        """`w*_F = (X_FᵀX_F/n + e^λ I)⁻¹ X_Fᵀy/n`; see [`AbstractConditionProblem.response`][]."""
        *_, w, valid = self._solve(hparams)
        return nan_unless(valid, w)

    def hypergrad(self, hparams) -> Array:
        """`−e^λ w*_Fᵀ (X_FᵀX_F/n + e^λ I)⁻¹ ∇_F L_V`.

        See [`AbstractConditionProblem.hypergrad`][].
        """
        rho, K, free, w, valid = self._solve(hparams)
        g = self.Xv.T @ (self.Xv @ w - self.yv) / self.Xv.shape[0]
        return nan_unless(valid, -rho * (w @ masked_solve(K, free, g)))


# ----------------------------------------------------------------------------------------------
# Least squares over the probability simplex.
# ----------------------------------------------------------------------------------------------


def _project_simplex(x):
    """The Euclidean projection onto `{w >= 0, Σw = 1}` (sort-based, Held et al. 1974)."""
    u = jnp.sort(x)[::-1]
    css = jnp.cumsum(u) - 1
    k = jnp.arange(1, x.shape[0] + 1, dtype=x.dtype)
    rho = jnp.sum(u - css / k > 0)
    theta = css[rho - 1] / rho
    return jnp.maximum(x - theta, 0)


class SimplexLeastSquares(AbstractConditionProblem):
    """Least squares over the probability simplex, with a target affine in λ.

        L_T(w, λ) = ½‖Aw − b − Cλ‖²  s.t.  w >= 0, Σw = 1      L_V(w) = ½‖w − w_target‖²

    `problem.inner` is the least-squares loss; the constraint is handled by projection
    ([`project`][bilevel.testing.SimplexLeastSquares.project]). With `S` the support and
    `r = b + Cλ`, the KKT conditions on `S` (multiplier `ν` of `Σw = 1`, sign convention
    `∇f + ν1 − μ = 0`, `μ >= 0` the multipliers of `w >= 0`) are the linear system

        [[A_SᵀA_S, 1], [1ᵀ, 0]] [w_S; ν] = [A_Sᵀr; 1],

    and, with `[u; t]` the solution of the same system for the right-hand side
    `[(w* − w_target)_S; 0]`, `dL_V/dλ = Cᵀ A_S u`. The support is stored through the field
    `active` (true where `w*_i = 0`); exact where it stays optimal (`is_valid`), NaN
    elsewhere.

    **Arguments:**

    - `A`: `(m, d)` with full column rank.
    - `b`: `(m,)`.
    - `C`: `(m, k)`.
    - `w_target`: the validation target, `(d,)`.
    - `lam`: the default hyperparameters, `(k,)` (a scalar is broadcast); default `0.0`.
    - `active`: optional boolean `(d,)`, true where `w*_i = 0` at `lam` (computed if
      omitted, checked if given).

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.SimplexLeastSquares.sample(0, dim=5)
    w = exact.response(exact.hparams)
    assert jnp.allclose(w.sum(), 1.0) and bool((w >= 0).all())
    ```
    """

    A: Array
    b: Array
    C: Array
    w_target: Array
    lam: Array
    active: Array

    def __init__(self, A, b, C, w_target, lam=0.0, *, active=None):
        where = "SimplexLeastSquares"
        A, b, C, w_target, lam = _floats(A, b, C, w_target, lam)
        ok = (A.ndim == 2 and min(A.shape) >= 1 and b.shape == A.shape[:1] and C.ndim == 2
              and C.shape[0] == A.shape[0] and C.shape[1] >= 1 and w_target.shape == A.shape[1:])
        _check_shapes(f"{where}(A, b, C, w_target)", "A (m, d), b (m,), C (m, k) and w_target "
                      "(d,) with m, d, k >= 1", ok, A=A, b=b, C=C, w_target=w_target)
        lam = _cast_lam(where, lam, C.shape[1])
        Ah = host(A)
        d = Ah.shape[1]
        check_spd(where, "AᵀA", Ah.T @ Ah, "A needs full column rank (at least d rows).")
        if active is not None:
            active = _bool_mask(where, "active", active, d, "true where w*_i = 0")
        r = host(b) + host(C) @ host(lam)
        active = _init_active(where, Ah.T @ Ah, Ah.T @ r, np.ones((1, d)), np.ones(1),
                              -np.eye(d), np.zeros(d), active, "true where w*_i = 0")
        self.A, self.b, self.C, self.w_target, self.lam = A, b, C, w_target, lam
        self.active = jnp.asarray(active)

    @classmethod
    def sample(
        cls, key, *, dim=6, n_rows=None, num_hparams=2, max_condition=10.0, dtype=None,
    ) -> "SimplexLeastSquares":
        """Draw an instance whose solution at `λ = 0` is strictly complementary.

        `A = U diag(s) Vᵀ` with `AᵀA` eigenvalues log-uniform in `[1, max_condition]`; the
        solution is chosen first: a support of 30 % to 70 % of the coordinates (at least
        one, and for `dim >= 2` not all) with weights uniform in `[0.5, 1.5]` normalised to
        sum 1 (so each is at least a third of the mean weight), multipliers `μ_i` off the
        support uniform in `[0.5, 1.5] / |S|`, `ν` standard normal; `b` is built to match
        (plus a component orthogonal to `A`'s columns). `C` is standard normal and
        `w_target` uniform on the simplex.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the number of parameters `d >= 1`.
        - `n_rows`: rows of `A`, `>= dim` (default `2 * dim`).
        - `num_hparams`: the number of hyperparameters `k >= 1`.
        - `max_condition`: bound `>= 1` on the condition number of `AᵀA`.
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        A `SimplexLeastSquares` instance.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.SimplexLeastSquares.sample(1, dim=4, num_hparams=1)
        assert exact.hparams.shape == (1,)
        ```
        """
        where = "SimplexLeastSquares.sample"
        rng = _rng(key, where)
        dim, k, max_condition = _qp_sizes(where, dim, num_hparams, max_condition)
        m = 2 * dim if n_rows is None else check_int(n_rows, "n_rows", where, dim, 2 * dim)
        dt = resolve_dtype(dtype, where)
        U, sv, V = design(rng, m, dim, max_condition)
        sv = sv / np.sqrt(m)  # AᵀA = V diag(sv²) Vᵀ, eigenvalues in [1, max_condition]
        A = (U * sv) @ V.T
        active = np.ones(dim, bool)
        support = rng.permutation(dim)[:fraction_size(rng, dim)]
        active[support] = False
        w = np.zeros(dim)
        w[support] = rng.uniform(0.5, 1.5, len(support))
        w /= w.sum()
        mu = np.where(active, rng.uniform(0.5, 1.5, dim) / len(support), 0.0)
        nu = rng.standard_normal()
        grad = mu - nu  # ∇f = μ − ν1
        moment = (V * sv**2) @ (V.T @ w) - grad  # Aᵀ(b + Cλ)
        eps = rng.standard_normal(m)  # b's part outside range(A) does not move the solution
        b = U @ (V.T @ moment / sv) + eps - U @ (U.T @ eps)
        C, w_target = rng.standard_normal((m, k)), rng.dirichlet(np.ones(dim))
        arrays = (A, b, C, w_target, np.zeros(k))
        return cls(*(jnp.asarray(a, dt) for a in arrays), active=active)

    @property
    def problem(self) -> Problem:
        return _SIMPLEX_PROBLEM

    @property
    def hparams(self) -> Array:
        return self.lam

    @property
    def params0(self) -> Array:
        d = self.A.shape[1]
        return jnp.full((d,), 1.0 / d, self.dtype)

    @property
    def inner_batch(self):
        return (self.A, self.b, self.C)

    @property
    def outer_batch(self):
        return self.w_target

    @property
    def dtype(self):
        return self.A.dtype

    @property
    def lipschitz(self) -> Array:
        """The largest eigenvalue of `AᵀA`: a projected-gradient step `1/lipschitz` converges."""
        return jnp.linalg.eigvalsh(self.A.T @ self.A)[-1]

    def project(self, x) -> Array:
        """The Euclidean projection onto the probability simplex.

        **Arguments:**

        - `x`: a `(d,)` point.

        **Returns:**

        A `(d,)` array, nonnegative and summing to 1.
        """
        return _project_simplex(x)

    def _cast(self, hparams):
        k = self.C.shape[1]
        return _cast_hparams(hparams, (k,), self.dtype, "SimplexLeastSquares",
                             f"{k} hyperparameters")

    def _kkt(self):
        """The `(d+1, d+1)` KKT matrix on the support (identity rows off it)."""
        d = self.A.shape[1]
        m = (~self.active).astype(self.dtype)
        G = self.A.T @ self.A
        top = jnp.concatenate([G * m[:, None] * m[None, :] + jnp.diag(1 - m), m[:, None]], 1)
        return jnp.concatenate([top, jnp.append(m, 0.0)[None, :]], 0), m, d

    def _solve(self, hparams):
        lam = self._cast(hparams)
        K, m, d = self._kkt()
        r = self.b + self.C @ lam
        sol = jnp.linalg.solve(K, jnp.append(m * (self.A.T @ r), 1.0))
        w, nu = sol[:d], sol[d]
        mu = self.A.T @ (self.A @ w - r) + nu
        tol = tolerance(self.dtype)
        ok = jnp.where(m > 0, w >= -tol, mu >= -tol * _validity_scale(self.A.T @ r, nu))
        return K, m, d, w, jnp.all(ok)

    def is_valid(self, hparams) -> Array:
        """Support weights `>= 0`, multipliers off it `>= 0`.

        See [`AbstractConditionProblem.is_valid`][].
        """
        return self._solve(hparams)[-1]

    def response(self, hparams) -> Array:
        """`w*_S` from the KKT system on the support, 0 off it.

        See [`AbstractConditionProblem.response`][].
        """
        *_, w, valid = self._solve(hparams)
        return nan_unless(valid, w)

    def hypergrad(self, hparams) -> Array:
        """`Cᵀ A_S u` (see above); see [`AbstractConditionProblem.hypergrad`][]."""
        K, m, d, w, valid = self._solve(hparams)
        u = jnp.linalg.solve(K, jnp.append(m * (w - self.w_target), 0.0))[:d]
        return nan_unless(valid, self.C.T @ (self.A @ (m * u)))


# ----------------------------------------------------------------------------------------------
# Quadratic programs in KKT form: params are (w, ν, μ).
# ----------------------------------------------------------------------------------------------


def _check_kkt_data(where, Q, c, B, M, r, w_target, names):
    d = c.shape[0] if c.ndim == 1 else -1
    ok = (d >= 1 and Q.shape == (d, d) and B.ndim == 2 and B.shape[0] == d and B.shape[1] >= 1
          and M.ndim == 2 and M.shape[0] >= 1 and M.shape[1] == d and r.shape == M.shape[:1]
          and w_target.shape == (d,))
    _check_shapes(f"{where}(Q, c, B, {names[0]}, {names[1]}, w_target)",
                  f"Q (d, d), c (d,), B (d, k), {names[0]} (p, d), {names[1]} (p,) and w_target "
                  f"(d,) with d, k, p >= 1", ok, Q=Q, c=c, B=B, **{names[0]: M, names[1]: r},
                  w_target=w_target)


class EqualityQP(AbstractConditionProblem):
    """A strictly convex quadratic with linear equality constraints, in KKT form.

        L_T(w, λ) = ½wᵀQw − (c + Bλ)ᵀw  s.t.  Aw = b      L_V(w) = ½‖w − w_target‖²

    The parameters are the KKT triple `(w, ν, None)` (primal, equality multipliers, no
    inequality multipliers): `params0 = (zeros(d), zeros(p), None)`, and `problem.inner` /
    `problem.outer` read `params[0]`. The constraint map is [`eq`][bilevel.testing.EqualityQP.eq],
    `eq(w, hparams, batch) = Aw − b` (of the primal `w` only, with `batch = inner_batch`);
    the sign convention is `∇_w[L_T(w) + νᵀ eq(w)] = 0`. With the KKT matrix
    `K = [[Q, Aᵀ], [A, 0]]`,

        [w*; ν*] = K⁻¹ [c + Bλ; b],        dL_V/dλ = Bᵀ (K⁻¹ [w* − w_target; 0])_w.

    There is no active set: the closed forms hold for every λ (`is_valid` is always true).

    **Arguments:**

    - `Q`: symmetric positive-definite `(d, d)`.
    - `c`: `(d,)`.
    - `B`: `(d, k)`.
    - `A`: `(p, d)` with full row rank (`p <= d`).
    - `b`: `(p,)`.
    - `w_target`: the validation target, `(d,)`.
    - `lam`: the default hyperparameters, `(k,)` (a scalar is broadcast); default `0.0`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.EqualityQP.sample(0, dim=5, num_constraints=2)
    w, nu, _ = exact.response(exact.hparams)
    assert jnp.allclose(exact.eq(w, exact.hparams, exact.inner_batch), 0.0, atol=1e-6)
    ```
    """

    Q: Array
    c: Array
    B: Array
    A: Array
    b: Array
    w_target: Array
    lam: Array

    def __init__(self, Q, c, B, A, b, w_target, lam=0.0):
        where = "EqualityQP"
        Q, c, B, A, b, w_target, lam = _floats(Q, c, B, A, b, w_target, lam)
        _check_kkt_data(where, Q, c, B, A, b, w_target, ("A", "b"))
        lam = _cast_lam(where, lam, B.shape[1])
        check_spd(where, "Q", host(Q), "Pass e.g. Q = M.T @ M + I.")
        Ah = host(A)
        if np.linalg.matrix_rank(Ah) < Ah.shape[0]:
            raise ValueError(f"{where} requires A of full row rank (independent equality "
                             f"constraints); got A of shape {Ah.shape} and rank "
                             f"{np.linalg.matrix_rank(Ah)}. Drop the redundant rows.")
        self.Q, self.c, self.B, self.A, self.b = Q, c, B, A, b
        self.w_target, self.lam = w_target, lam

    @classmethod
    def sample(
        cls, key, *, dim=6, num_constraints=None, num_hparams=2, max_condition=10.0, dtype=None,
    ) -> "EqualityQP":
        """Draw an instance: `Q` with eigenvalues log-uniform in `[1, max_condition]`, the rest
        standard normal.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the number of parameters `d >= 1`.
        - `num_constraints`: the number `p` of equality constraints, `1 <= p <= dim`
          (default `max(1, dim // 3)`).
        - `num_hparams`: the number of hyperparameters `k >= 1`.
        - `max_condition`: bound `>= 1` on the condition number of `Q`.
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        An `EqualityQP` instance.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.EqualityQP.sample(1, dim=4)
        w, nu, mu = exact.params0
        assert nu.shape == (1,) and mu is None
        ```
        """
        where = "EqualityQP.sample"
        rng = _rng(key, where)
        dim, k, max_condition = _qp_sizes(where, dim, num_hparams, max_condition)
        p = max(1, dim // 3) if num_constraints is None else check_int(
            num_constraints, "num_constraints", where, 1, max(1, dim // 3))
        if p > dim:
            raise ValueError(f"{where} requires num_constraints <= dim; got {p} > {dim}. "
                             f"Pass e.g. num_constraints={max(1, dim // 3)}.")
        dt = resolve_dtype(dtype, where)
        arrays = (spd(rng, dim, max_condition), rng.standard_normal(dim),
                  rng.standard_normal((dim, k)), rng.standard_normal((p, dim)),
                  rng.standard_normal(p), rng.standard_normal(dim), np.zeros(k))
        return cls(*(jnp.asarray(a, dt) for a in arrays))

    @property
    def problem(self) -> Problem:
        return _KKT_PROBLEM

    @property
    def hparams(self) -> Array:
        return self.lam

    @property
    def params0(self):
        d, p = self.Q.shape[0], self.A.shape[0]
        return (jnp.zeros(d, self.dtype), jnp.zeros(p, self.dtype), None)

    @property
    def inner_batch(self):
        return (self.Q, self.c, self.B, self.A, self.b)

    @property
    def outer_batch(self):
        return self.w_target

    @property
    def dtype(self):
        return self.Q.dtype

    @property
    def eq(self):
        """The equality-constraint map `eq(w, hparams, batch) = Aw − b` (zero when feasible).

        A module-level pure function of the primal `w`, reading `A, b` from
        `batch = inner_batch` (the same function for every instance).
        """
        return _equality

    def _cast(self, hparams):
        k = self.B.shape[1]
        return _cast_hparams(hparams, (k,), self.dtype, "EqualityQP", f"{k} hyperparameters")

    def _kkt(self):
        p = self.A.shape[0]
        return jnp.block([[self.Q, self.A.T], [self.A, jnp.zeros((p, p), self.dtype)]])

    def is_valid(self, hparams) -> Array:
        """Always true (no active set); see [`AbstractConditionProblem.is_valid`][]."""
        self._cast(hparams)
        return jnp.array(True)

    def response(self, hparams):
        """`(w*, ν*, None)` with `[w*; ν*] = K⁻¹[c + Bλ; b]`.

        See [`AbstractConditionProblem.response`][].
        """
        d = self.Q.shape[0]
        sol = jnp.linalg.solve(self._kkt(), jnp.concatenate([self.c + self.B @ self._cast(hparams),
                                                              self.b]))
        return (sol[:d], sol[d:], None)

    def hypergrad(self, hparams) -> Array:
        """`Bᵀ (K⁻¹ [w* − w_target; 0])_w`; see [`AbstractConditionProblem.hypergrad`][]."""
        d, p = self.Q.shape[0], self.A.shape[0]
        w = self.response(hparams)[0]
        rhs = jnp.concatenate([w - self.w_target, jnp.zeros(p, self.dtype)])
        return self.B.T @ jnp.linalg.solve(self._kkt(), rhs)[:d]


class InequalityQP(AbstractConditionProblem):
    """A strictly convex quadratic with linear inequality constraints, in KKT form.

        L_T(w, λ) = ½wᵀQw − (c + Bλ)ᵀw  s.t.  Gw <= h      L_V(w) = ½‖w − w_target‖²

    The parameters are the KKT triple `(w, None, μ)` (primal, no equality multipliers,
    inequality multipliers `μ >= 0`): `params0 = (zeros(d), None, zeros(p))`, and
    `problem.inner` / `problem.outer` read `params[0]`. The constraint map is
    [`ineq`][bilevel.testing.InequalityQP.ineq], `ineq(w, hparams, batch) = Gw − h <= 0`
    (`batch = inner_batch`); the sign convention is `∇_w[L_T(w) + μᵀ ineq(w)] = 0`, with
    `μ_i (Gw − h)_i = 0`. On the active set `A` (stored in the field `active`),

        [[Q, G_Aᵀ], [G_A, 0]] [w*; μ*_A] = [c + Bλ; h_A],   μ* = 0 off A,
        dL_V/dλ = Bᵀ (K⁻¹ [w* − w_target; 0])_w

    with `K` that matrix. Exact where the active set stays optimal (`is_valid`), NaN
    elsewhere.

    **Arguments:**

    - `Q`: symmetric positive-definite `(d, d)`.
    - `c`: `(d,)`.
    - `B`: `(d, k)`.
    - `G`: `(p, d)`.
    - `h`: `(p,)`.
    - `w_target`: the validation target, `(d,)`.
    - `lam`: the default hyperparameters, `(k,)` (a scalar is broadcast); default `0.0`.
    - `active`: optional boolean `(p,)`, true where `(Gw* − h)_i = 0` at `lam` (computed if
      omitted, checked if given).

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.InequalityQP.sample(0, dim=5)
    w, _, mu = exact.response(exact.hparams)
    slack = exact.ineq(w, exact.hparams, exact.inner_batch)
    assert bool((slack <= 1e-9).all()) and bool((mu >= 0).all())
    assert jnp.allclose(mu * slack, 0.0, atol=1e-9)
    ```
    """

    Q: Array
    c: Array
    B: Array
    G: Array
    h: Array
    w_target: Array
    lam: Array
    active: Array

    def __init__(self, Q, c, B, G, h, w_target, lam=0.0, *, active=None):
        where = "InequalityQP"
        Q, c, B, G, h, w_target, lam = _floats(Q, c, B, G, h, w_target, lam)
        _check_kkt_data(where, Q, c, B, G, h, w_target, ("G", "h"))
        lam = _cast_lam(where, lam, B.shape[1])
        Qh, Gh = host(Q), host(G)
        d, p = Gh.shape[1], Gh.shape[0]
        check_spd(where, "Q", Qh, "Pass e.g. Q = M.T @ M + I.")
        if active is not None:
            active = _bool_mask(where, "active", active, p, "true where (Gw* − h)_i = 0")
        q = host(c) + host(B) @ host(lam)
        active = _init_active(where, Qh, q, np.zeros((0, d)), np.zeros(0), Gh, host(h), active,
                              "true where (Gw* − h)_i = 0")
        self.Q, self.c, self.B, self.G, self.h = Q, c, B, G, h
        self.w_target, self.lam, self.active = w_target, lam, jnp.asarray(active)

    @classmethod
    def sample(
        cls, key, *, dim=6, num_constraints=None, num_hparams=2, max_condition=10.0, dtype=None,
    ) -> "InequalityQP":
        """Draw an instance whose solution at `λ = 0` is strictly complementary.

        The solution is chosen first: `Q` with eigenvalues log-uniform in
        `[1, max_condition]`, `G` and `w*` standard normal; 30 % to 70 % of the constraints
        (at least one, at most `dim`, and for `p >= 2` not all) active with multipliers
        uniform in `[0.5, 1.5]`, the others with slack `h_i − G_i w*` uniform in
        `[0.5, 1.5]`; then `c = Qw* + Gᵀμ*`. `B` and `w_target` are standard normal.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim`: the number of parameters `d >= 1`.
        - `num_constraints`: the number `p >= 1` of inequality constraints (default `dim`).
        - `num_hparams`: the number of hyperparameters `k >= 1`.
        - `max_condition`: bound `>= 1` on the condition number of `Q`.
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        An `InequalityQP` instance.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.InequalityQP.sample(1, dim=4, num_constraints=6)
        assert exact.active.any() and not exact.active.all()
        ```
        """
        where = "InequalityQP.sample"
        rng = _rng(key, where)
        dim, k, max_condition = _qp_sizes(where, dim, num_hparams, max_condition)
        p = dim if num_constraints is None else check_int(num_constraints, "num_constraints",
                                                          where, 1, dim)
        dt = resolve_dtype(dtype, where)
        Q = spd(rng, dim, max_condition)
        G, w = rng.standard_normal((p, dim)), rng.standard_normal(dim)
        active = np.zeros(p, bool)
        active[rng.permutation(p)[:min(dim, fraction_size(rng, p))]] = True
        mu = np.where(active, rng.uniform(0.5, 1.5, p), 0.0)
        h = G @ w + np.where(active, 0.0, rng.uniform(0.5, 1.5, p))
        c = Q @ w + G.T @ mu
        B, w_target = rng.standard_normal((dim, k)), rng.standard_normal(dim)
        arrays = (Q, c, B, G, h, w_target, np.zeros(k))
        return cls(*(jnp.asarray(a, dt) for a in arrays), active=active)

    @property
    def problem(self) -> Problem:
        return _KKT_PROBLEM

    @property
    def hparams(self) -> Array:
        return self.lam

    @property
    def params0(self):
        d, p = self.G.shape[1], self.G.shape[0]
        return (jnp.zeros(d, self.dtype), None, jnp.zeros(p, self.dtype))

    @property
    def inner_batch(self):
        return (self.Q, self.c, self.B, self.G, self.h)

    @property
    def outer_batch(self):
        return self.w_target

    @property
    def dtype(self):
        return self.Q.dtype

    @property
    def ineq(self):
        """The inequality-constraint map `ineq(w, hparams, batch) = Gw − h` (`<= 0` if feasible).

        A module-level pure function of the primal `w`, reading `G, h` from
        `batch = inner_batch` (the same function for every instance).
        """
        return _inequality

    def _cast(self, hparams):
        k = self.B.shape[1]
        return _cast_hparams(hparams, (k,), self.dtype, "InequalityQP", f"{k} hyperparameters")

    def _kkt(self):
        """`[[Q, GᵀP], [PG, I − P]]`, `P = diag(active)`: symmetric; inactive μ pinned to 0."""
        m = self.active.astype(self.dtype)
        return jnp.block([[self.Q, self.G.T * m[None, :]], [self.G * m[:, None], jnp.diag(1 - m)]])

    def _solve(self, hparams):
        q = self.c + self.B @ self._cast(hparams)
        d = self.Q.shape[0]
        K = self._kkt()
        sol = jnp.linalg.solve(K, jnp.concatenate([q, self.active * self.h]))
        w, mu = sol[:d], sol[d:]
        tol = tolerance(self.dtype)
        slack = self.G @ w - self.h
        ok = jnp.where(self.active, mu >= -tol * _validity_scale(q, self.Q @ w),
                       slack <= tol * (1 + jnp.abs(self.h) + jnp.abs(self.G) @ jnp.abs(w)))
        return K, d, w, mu, jnp.all(ok)

    def is_valid(self, hparams) -> Array:
        """Inactive constraints satisfied, active multipliers `>= 0`.

        See [`AbstractConditionProblem.is_valid`][].
        """
        return self._solve(hparams)[-1]

    def response(self, hparams):
        """`(w*, None, μ*)` from the KKT system on the active set.

        See [`AbstractConditionProblem.response`][].
        """
        _, _, w, mu, valid = self._solve(hparams)
        return nan_unless(valid, (w, None, mu))

    def hypergrad(self, hparams) -> Array:
        """`Bᵀ (K⁻¹ [w* − w_target; 0])_w`; see [`AbstractConditionProblem.hypergrad`][]."""
        K, d, w, _, valid = self._solve(hparams)
        rhs = jnp.concatenate([w - self.w_target, jnp.zeros(self.G.shape[0], self.dtype)])
        return nan_unless(valid, self.B.T @ jnp.linalg.solve(K, rhs)[:d])
