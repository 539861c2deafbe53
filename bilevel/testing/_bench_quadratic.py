"""The quadratic bilevel problem of benchopt's `benchmark_bilevel`
([`bilevel.testing.BilevelQuadratic`][]): per-sample quadratics whose means are the exact
problem, for checking stochastic bilevel methods (SOBA, SABA, StocBiO, ...)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._problem import Problem
from ._common import (
    _cast_hparams,
    _check_shapes,
    _concrete,
    _floats,
    _orthonormal,
    _rng,
    check_int,
    check_real,
    check_spd,
    resolve_dtype,
    spd,
)
from ._exact import AbstractExactProblem

Array = jax.Array

_KEYS = ("hess_params", "hess_hparams", "cross", "lin_params", "lin_hparams")

# ----------------------------------------------------------------------------------------------
# Losses: pure functions of (params, hparams, batch); all data comes from the batch.
# ----------------------------------------------------------------------------------------------


def _per_sample(w, lam, data):
    """`ℓ_i(w, λ) = ½wᵀA_i w + ½λᵀB_iλ + λᵀC_i w + a_iᵀw + b_iᵀλ`, one value per row."""
    def quad(x, M, y):
        return jnp.einsum("j,njk,k->n", x, M, y)

    return (0.5 * quad(w, data["hess_params"], w) + 0.5 * quad(lam, data["hess_hparams"], lam)
            + quad(lam, data["cross"], w) + data["lin_params"] @ w + data["lin_hparams"] @ lam)


def _mean_loss(w, lam, batch):
    """The mean of the per-sample quadratics over the rows of `batch`."""
    return jnp.mean(_per_sample(w, lam, batch))


_BENCH_QUADRATIC_PROBLEM = Problem(inner=_mean_loss, outer=_mean_loss)


# ----------------------------------------------------------------------------------------------
# Closed forms, from the means of the per-sample matrices.
# ----------------------------------------------------------------------------------------------


def _means(data):
    """The full-data quadratic: the means of the rows, square matrices symmetrised."""
    m = {k: jnp.mean(v, axis=0) for k, v in data.items()}
    for k in ("hess_params", "hess_hparams"):
        m[k] = 0.5 * (m[k] + m[k].T)
    return m


@jax.jit
def _closed_forms(inner, outer, lam):
    """Every closed form at λ, from the means of the rows, in one compiled call per shape.

    `w* = −A⁻¹(a + Cᵀλ)`, `∇h = ∂_λL_V − C A⁻¹ ∂_wL_V`, its `H⁻¹ ≈ I` version, the value
    `L_V(w*, λ)`, the inner Hessian `A` and `∇²h = JᵀFJ + KJ + JᵀKᵀ + G` with `J = −A⁻¹Cᵀ`.
    """
    i, o = _means(inner), _means(outer)
    A, C = i["hess_params"], i["cross"]
    w = -jnp.linalg.solve(A, i["lin_params"] + C.T @ lam)
    gw = o["hess_params"] @ w + o["cross"].T @ lam + o["lin_params"]
    glam = o["hess_hparams"] @ lam + o["cross"] @ w + o["lin_hparams"]
    J = -jnp.linalg.solve(A, C.T)
    KJ = o["cross"] @ J
    M = J.T @ o["hess_params"] @ J + KJ + KJ.T + o["hess_hparams"]
    return {"response": w, "hypergrad": glam + J.T @ gw, "identity": glam - C @ gw,
            "value": _mean_loss(w, lam, outer), "hessian": A, "value_hessian": 0.5 * (M + M.T)}


# ----------------------------------------------------------------------------------------------
# Sampling (NumPy, float64).
# ----------------------------------------------------------------------------------------------


def _sample_side(rng, n, p, q, max_condition):
    """Per-sample (w, λ) quadratics whose mean joint Hessian has eigenvalues in [1/κ, 1].

    The mean joint Hessian is `S = V diag(s) Vᵀ` (s log-uniform in [1/κ, 1]). Sample `i`'s
    joint Hessian is `S^½ RᵢᵀRᵢ S^½` (positive semi-definite, rank `r = ⌈(p+q)/n⌉`) with
    `Rᵢ = √n` times `r` rows of a Haar matrix with orthonormal columns, so `Σᵢ RᵢᵀRᵢ = n I` and
    the mean is exactly `S`. The linear terms are `m + εᵢ − ε̄` with `m, εᵢ` standard normal,
    so their mean is exactly `m`.
    """
    d = p + q
    S = spd(rng, d, max_condition) / max_condition
    vals, vecs = np.linalg.eigh(S)
    root = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    r = -(-d // n)
    R = np.sqrt(n) * _orthonormal(rng, n * r, d).reshape(n, r, d)
    Y = R @ root
    H = np.einsum("nri,nrj->nij", Y, Y)
    eps = rng.standard_normal((n, d))
    lin = rng.standard_normal(d) + eps - eps.mean(axis=0)
    return {"hess_params": H[:, :p, :p], "hess_hparams": H[:, p:, p:], "cross": H[:, p:, :p],
            "lin_params": lin[:, :p], "lin_hparams": lin[:, p:]}


def _check_data(where, name, data):
    if not isinstance(data, dict) or sorted(data) != sorted(_KEYS):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise TypeError(
            f"{where} requires {name} to be a dict with keys {list(_KEYS)} (arrays whose "
            f"leading axis is the sample); got {got}. Build a random instance with "
            "BilevelQuadratic.sample(seed), or pass such a dict."
        )


def _shapes_ok(data, p, q):
    A, B, C, a, b = (data[k] for k in _KEYS)
    n = A.shape[0] if A.ndim == 3 else -1
    return (n >= 1 and A.shape == (n, p, p) and B.shape == (n, q, q)
            and C.shape == (n, q, p) and a.shape == (n, p) and b.shape == (n, q))


def _check_symmetric(where, name, data):
    for k in ("hess_params", "hess_hparams"):
        x = _concrete(data[k])
        if x is not None:
            asym = np.max(np.abs(x - np.swapaxes(x, 1, 2)), initial=0.0)
            if asym > 1e-6 * max(1.0, np.max(np.abs(x), initial=0.0)):
                raise ValueError(
                    f"{where} requires every {name}[{k!r}][i] to be symmetric; got an "
                    f"asymmetry of {asym:.3g}. Pass 0.5 * (M + M.swapaxes(1, 2))."
                )


class BilevelQuadratic(AbstractExactProblem):
    """The quadratic bilevel problem of benchopt's `benchmark_bilevel`, sample by sample.

    The inner and the outer losses are means over samples (rows) of quadratics in the
    parameters `w ∈ ℝᵖ` and the hyperparameters `λ ∈ ℝ^q`,

        ℓ_i(w, λ) = ½wᵀA_i w + ½λᵀB_iλ + λᵀC_i w + a_iᵀw + b_iᵀλ,

        L_T(w, λ) = mean_{i ∈ inner batch} ℓ_i(w, λ)      L_V(w, λ) = mean_{j ∈ outer batch} ℓ_j(w, λ)

    with separate samples (`inner_data`, `outer_data`) for the two levels. A batch is a dict
    of arrays whose leading axis is the sample: `hess_params` `(n, p, p)` (the `A_i`),
    `hess_hparams` `(n, q, q)` (the `B_i`), `cross` `(n, q, p)` (the `C_i`), `lin_params`
    `(n, p)` (the `a_i`) and `lin_hparams` `(n, q)` (the `b_i`). Any subset of rows (a
    minibatch, e.g. from `bilevel.sampler`) gives an unbiased estimate of the losses and of
    all their derivatives; all the rows give the exact problem, whose closed forms use the
    means `A, B, C, a, b` (inner) and `F, G, K, f, g` (outer) of those arrays:

        w*(λ) = −A⁻¹(a + Cᵀλ),  ∇h(λ) = ∂_λL_V − C A⁻¹ ∂_wL_V  at w*(λ),

    and the value `h(λ) = L_V(w*(λ), λ)` is a quadratic in λ with constant Hessian
    `∇²h = [J; I]ᵀ [[F, Kᵀ], [K, G]] [J; I]`, `J = dw*/dλ = −A⁻¹Cᵀ`, so its minimiser
    (`optimal_hparams`) solves one linear system.

    In `benchmark_bilevel` (`datasets/quadratic.py`) each `A_i`, `B_i`, `C_i` is a rank-one
    outer product of Gaussian vectors with a prescribed covariance, the linear terms are
    standard normal, and a dataset is redrawn until `∇²h` is positive definite; `sample`
    draws the same kind of data with exact control over the means instead (see there).

    **Arguments:**

    - `inner_data`: the training samples, a dict with the five keys above.
    - `outer_data`: the validation samples, the same keys with the same `p, q` (any `n`).
    - `lam`: the default hyperparameters, shape `(q,)` (a scalar is broadcast); default `0.0`.

    All arrays are converted to one common floating dtype. The mean of
    `inner_data["hess_params"]` must be symmetric positive definite.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import bilevel.testing as blt

    exact = blt.BilevelQuadratic.sample(0, dim_inner=4, dim_outer=3, n_samples=16)
    lam = exact.optimal_hparams()                     # the unique minimiser of h
    assert jnp.allclose(exact.hypergrad(lam), 0.0, atol=1e-5)
    rows = jax.tree.map(lambda x: x[:4], exact.inner_batch)   # a minibatch of 4 samples
    loss = jax.jit(exact.problem.inner)(exact.params0, lam, rows)   # an unbiased estimate
    ```
    """

    inner_data: dict
    outer_data: dict
    lam: Array

    def __init__(self, inner_data, outer_data, lam=0.0):
        where = "BilevelQuadratic(inner_data, outer_data, lam)"
        _check_data(where, "inner_data", inner_data)
        _check_data(where, "outer_data", outer_data)
        arrays = _floats(*(inner_data[k] for k in _KEYS), *(outer_data[k] for k in _KEYS), lam)
        inner, outer = dict(zip(_KEYS, arrays[:5])), dict(zip(_KEYS, arrays[5:10]))
        lam = arrays[10]
        A = inner["hess_params"]
        p = A.shape[1] if A.ndim == 3 else -1
        q = inner["hess_hparams"].shape[1] if inner["hess_hparams"].ndim == 3 else -1
        ok = p >= 1 and q >= 1 and _shapes_ok(inner, p, q) and \
            _shapes_ok(outer, p, q) and lam.shape in ((), (q,))
        _check_shapes(
            where, "inner_data and outer_data with hess_params (n, p, p), hess_hparams "
            "(n, q, q), cross (n, q, p), lin_params (n, p), lin_hparams (n, q) for one p, q >= 1 "
            "(n >= 1, its own for each), and lam of shape () or (q,)", ok,
            **{f"inner {k}": v for k, v in inner.items()},
            **{f"outer {k}": v for k, v in outer.items()}, lam=lam,
        )
        _check_symmetric(where, "inner_data", inner)
        _check_symmetric(where, "outer_data", outer)
        mean_A = _concrete(jnp.mean(A, axis=0))
        if mean_A is not None:
            check_spd(where, "the mean of inner_data['hess_params']", mean_A.astype(np.float64),
                      "The inner problem must be strongly convex in w; add a multiple of the "
                      "identity to every inner hess_params.")
        self.inner_data, self.outer_data = inner, outer
        self.lam = jnp.broadcast_to(lam, (q,))

    @classmethod
    def sample(
        cls, key, *, dim_inner=10, dim_outer=10, n_samples=64, n_samples_outer=None,
        max_condition=10.0, lam=0.0, dtype=None,
    ) -> "BilevelQuadratic":
        """Draw an instance whose inner Hessian and value function are well conditioned.

        For each level, the mean joint Hessian of `ℓ` over `(w, λ)`, `[[A, Cᵀ], [C, B]]`
        (inner) or `[[F, Kᵀ], [K, G]]` (outer), is Haar-rotated with eigenvalues
        log-uniform in `[1/max_condition, 1]` (the scale of `benchmark_bilevel`, whose
        default spectrum is `[0.1, 1]`). Each sample's joint Hessian is positive
        semi-definite of rank `⌈(p + q)/n⌉` (rank one when `n >= p + q`, as in the
        benchmark), built so that the mean is that matrix exactly; the linear terms are a
        standard normal mean plus standard normal per-sample deviations that sum to zero.
        Hence, at every λ:

        - the inner Hessian `A` has eigenvalues in `[1/κ, 1]`, condition number `<= κ`
          (`κ = max_condition`);
        - the value function's Hessian satisfies `I/κ <= ∇²h <= (1 + κ) I`, since
          `∇²h = [J; I]ᵀ(outer joint Hessian)[J; I]` and `‖J‖² <= κ` (a Schur complement of
          the inner joint Hessian): `h` is strongly convex, `optimal_hparams()` is its
          unique minimiser, and `cond(∇²h) <= κ(1 + κ)`.

        **Arguments:**

        - `key`: a non-negative int seed or a JAX PRNG key.
        - `dim_inner`: the number of parameters `p >= 1` (100 in the benchmark).
        - `dim_outer`: the number of hyperparameters `q >= 1` (100 in the benchmark).
        - `n_samples`: inner samples `n >= 1` (1024 in the benchmark).
        - `n_samples_outer`: outer samples `>= 1`; default `None` is `n_samples`.
        - `max_condition`: `κ >= 1` as above (10 in the benchmark: `mu = 0.1`, `L = 1`).
        - `lam`: the default hyperparameters stored in the instance, a float (broadcast) or
          a `(dim_outer,)` array.
        - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

        **Returns:**

        A `BilevelQuadratic` instance.

        **Example:**

        ```python
        import numpy as np
        import bilevel.testing as blt

        exact = blt.BilevelQuadratic.sample(1, dim_inner=4, dim_outer=3, n_samples=16,
                                            max_condition=4.0)
        assert exact.inner_batch["cross"].shape == (16, 3, 4)
        assert np.linalg.cond(exact.hessian(exact.hparams)) <= 4.0 + 1e-6
        ```
        """
        where = "BilevelQuadratic.sample"
        rng = _rng(key, where)
        p = check_int(dim_inner, "dim_inner", where, 1, 10)
        q = check_int(dim_outer, "dim_outer", where, 1, 10)
        n = check_int(n_samples, "n_samples", where, 1, 64)
        m = n if n_samples_outer is None else check_int(n_samples_outer, "n_samples_outer",
                                                          where, 1, 64)
        kappa = check_real(max_condition, "max_condition", where, low=1.0, strict=False,
                           example=10.0)
        lam = np.asarray(lam, dtype=np.float64)
        if lam.shape not in ((), (q,)) or not np.all(np.isfinite(lam)):
            raise ValueError(
                f"{where} requires lam to be a finite float or a finite array of shape ({q},) "
                f"(one per hyperparameter, dim_outer={q}); got {lam!r}. Pass e.g. lam=0.0."
            )
        dt = resolve_dtype(dtype, where)
        inner = _sample_side(rng, n, p, q, kappa)
        outer = _sample_side(rng, m, p, q, kappa)
        inner, outer = ({k: jnp.asarray(v, dt) for k, v in d.items()} for d in (inner, outer))
        return cls(inner, outer, jnp.asarray(lam, dt))

    @property
    def problem(self) -> Problem:
        return _BENCH_QUADRATIC_PROBLEM

    @property
    def hparams(self) -> Array:
        return self.lam

    @property
    def params0(self) -> Array:
        return jnp.zeros(self.inner_data["lin_params"].shape[1], self.dtype)

    @property
    def inner_batch(self):
        return self.inner_data

    @property
    def outer_batch(self):
        return self.outer_data

    @property
    def dtype(self):
        return self.lam.dtype

    def _cast(self, hparams):
        q = self.lam.shape[0]
        return _cast_hparams(hparams, (q,), self.dtype, "BilevelQuadratic",
                             f"one value per hyperparameter, {q} in all")

    def _forms(self, hparams):
        return _closed_forms(self.inner_data, self.outer_data, self._cast(hparams))

    def response(self, hparams):
        """`w*(λ) = −A⁻¹(a + Cᵀλ)`; see [`AbstractExactProblem.response`][]."""
        return self._forms(hparams)["response"]

    def hessian(self, hparams):
        """`A`, the mean of the inner `hess_params` (constant in λ); see
        [`AbstractExactProblem.hessian`][]."""
        return self._forms(hparams)["hessian"]

    def hypergrad(self, hparams):
        """`∂_λL_V − C A⁻¹ ∂_wL_V` at `w*(λ)`; see [`AbstractExactProblem.hypergrad`][]."""
        return self._forms(hparams)["hypergrad"]

    def identity_hypergrad(self, hparams):
        """`∂_λL_V − C ∂_wL_V` at `w*(λ)`; see [`AbstractExactProblem.identity_hypergrad`][]."""
        return self._forms(hparams)["identity"]

    def value(self, hparams):
        """`L_V(w*(λ), λ)`, the outer loss on all its rows; see [`AbstractExactProblem.value`][]."""
        return self._forms(hparams)["value"]

    def value_hessian(self) -> Array:
        """The Hessian `∇²h` of the value `h(λ) = L_V(w*(λ), λ)`, constant in λ.

        With `J = dw*/dλ = −A⁻¹Cᵀ`, `∇²h = JᵀFJ + KJ + JᵀKᵀ + G`.

        **Returns:**

        A symmetric `(q, q)` array of dtype `self.dtype` (positive definite for instances
        from `sample`).

        **Example:**

        ```python
        import numpy as np
        import bilevel.testing as blt

        exact = blt.BilevelQuadratic.sample(0, dim_inner=4, dim_outer=3, n_samples=16,
                                            max_condition=5.0)
        eigs = np.linalg.eigvalsh(exact.value_hessian())
        assert eigs.min() >= 1 / 5.0 - 1e-9 and eigs.max() <= 6.0 + 1e-9
        ```
        """
        return self._forms(self.lam)["value_hessian"]

    def optimal_hparams(self) -> Array:
        """The minimiser `λ† = −(∇²h)⁻¹ ∇h(0)` of the value function.

        `h` is a quadratic in λ, so one Newton step from anywhere lands on its stationary
        point; it is the unique minimiser when `∇²h` is positive definite (always so for
        instances from `sample`).

        **Returns:**

        An array of shape `(q,)` and dtype `self.dtype`.

        **Example:**

        ```python
        import bilevel.testing as blt

        exact = blt.BilevelQuadratic.sample(2, dim_inner=4, dim_outer=3, n_samples=16)
        lam_star = exact.optimal_hparams()
        assert exact.value(lam_star) <= exact.value(lam_star + 0.1)
        ```
        """
        forms = self._forms(jnp.zeros_like(self.lam))
        return -jnp.linalg.solve(forms["value_hessian"], forms["hypergrad"])
