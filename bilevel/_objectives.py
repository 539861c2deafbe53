"""Outer objectives for choosing hyperparameters: k-fold cross-validation as one bilevel
problem, the Laplace approximation of the evidence (MacKay 1992; Bishop 2006 §3.5, §4.4), and
the evidence lower bound of a diagonal Gaussian posterior (Graves 2011).

Each builds plain losses `(params, hparams, batch) -> scalar` (or a whole `bilevel.Problem`),
so every method of the library (unroll, implicit, solver, ...) differentiates them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._problem import Problem, tree_summary

PyTree = Any

_LOG_2PI = math.log(2.0 * math.pi)


def _check_callable(fn, name: str, where: str, signature: str) -> None:
    if not callable(fn):
        raise TypeError(
            f"{where} requires `{name}`, a function {signature}; got {type(fn).__name__} {fn!r}."
        )


def _check_count(value, name: str, where: str, minimum: int, example: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{where} requires an integer {name} >= {minimum}; got {type(value).__name__} "
            f"{value!r}. Pass a Python int, e.g. {name}={example}."
        )
    if value < minimum:
        raise ValueError(f"{where} requires {name} >= {minimum}; got {name}={value}. Pass e.g. {name}={example}.")
    return int(value)


def _scalar(out, what: str, where: str):
    if jnp.shape(out) != ():
        raise TypeError(
            f"{where}: {what} must return a scalar; it returned shape {jnp.shape(out)}. Reduce it, "
            "e.g. with jnp.sum(...)."
        )
    return out


# ----------------------------------------------------------------------------------------------
# k-fold cross-validation.
# ----------------------------------------------------------------------------------------------


def _fold_indices(n: int, k: int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Static (NumPy) index arrays: train (k, n − n/k) and validation (k, n/k)."""
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    val = order.reshape(k, n // k)
    train = np.stack([np.concatenate([val[i] for i in range(k) if i != j]) for j in range(k)])
    return train, val


def _example_count(batch, k: int, where: str) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(
            f"{where} requires the full dataset as batch, a pytree of arrays with a leading "
            f"example axis; got {batch!r}. Pass e.g. (X, y) with X.shape[0] == y.shape[0]."
        )
    sizes = {}
    for path, leaf in leaves:
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"{where} requires every leaf of the batch to have a leading example axis; "
                f"batch{jax.tree_util.keystr(path)} is a scalar. Put constants into the loss or the "
                "hyperparameters, or give them one row per example."
            )
        sizes[f"batch{jax.tree_util.keystr(path)}"] = jnp.shape(leaf)[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{p}: {s}" for p, s in sizes.items())
        raise ValueError(
            f"{where} requires the same number of examples (leading axis) in every leaf of the "
            f"batch; got {listing}. Each example needs its inputs and targets at the same index."
        )
    n = next(iter(sizes.values()))
    if n < k:
        raise ValueError(
            f"{where} requires at least k={k} examples (one fold each); the batch has {n}. Use "
            f"a smaller k (k <= {n}) or more data."
        )
    if n % k:
        raise ValueError(
            f"{where} requires the number of examples to be divisible by k, so that the k folds "
            f"are equal and run as one vmap; got n={n}, k={k} (remainder {n % k}). Drop the last "
            f"{n % k} examples (batch[:{n - n % k}]) or choose a k that divides {n}."
        )
    return n


def _check_folds(params, k: int, where: str) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    bad = [(p, jnp.shape(x)) for p, x in leaves if jnp.ndim(x) == 0 or jnp.shape(x)[0] != k]
    if bad or not leaves:
        path, shape = bad[0] if bad else ((), None)
        raise ValueError(
            f"{where} requires params with a leading fold axis of size k={k} on every leaf (one "
            f"model w_j per fold); params{jax.tree_util.keystr(path)} has shape {shape} in "
            f"{tree_summary(params)}. Build params0 with bilevel.stack_folds(params, k={k})."
        )


def kfold(train_loss: Callable, val_loss: Callable, *, k: int = 5, seed: int | None = None) -> Problem:
    """k-fold cross-validation as one bilevel problem, its k fits vmapped.

    The dataset D (the batch: a pytree whose leaves have a leading example axis of length n)
    is split into k equal folds D_1 ⊔ ... ⊔ D_k. The inner parameters θ = [w_1, ..., w_k]
    stack one model per fold on a leading axis of size k, and

    - inner: L(θ, λ) = Σ_j train_loss(w_j, λ, D ∖ D_j) (the w_j are independent, so each is
      the fit on all folds but j; a sum, so a step size that suits one fit suits θ);
    - outer: Q(θ, λ) = (1/k) Σ_j val_loss(w_j, λ, D_j), the cross-validation estimate.

    One `bilevel.hypergrad` call then gives the CV hypergradient dQ/dλ, the mean of the k
    per-fold hypergradients. Pass the full dataset as both the inner and the outer batch.

    The folds are fixed at trace time from the batch's shape by NumPy index arrays (fold j
    holds examples j·n/k, ..., (j+1)·n/k − 1, after a permutation when `seed` is given), the k
    training subsets are gathered once (k − 1 copies of the data) and the k losses run as one
    `jax.vmap`: no Python loop in traced code, no recompilation when λ changes. n must be
    divisible by k (equal folds are what lets them share one vmap); drop the remainder.

    **Arguments:**

    - `train_loss`: `(w, hparams, batch) -> scalar`, the training loss of one model on a
      subset of the data (a batch with the same tree as the dataset, fewer examples).
    - `val_loss`: `(w, hparams, batch) -> scalar`, the validation loss of one model on one fold.
    - `k`: the number of folds, >= 2.
    - `seed`: None (contiguous folds in the data's order) or an int: the examples are
      permuted by `numpy.random.default_rng(seed)` before splitting.

    **Returns:**

    A `bilevel.Problem` over stacked parameters (see `bilevel.stack_folds`).

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    import bilevel as bl

    def train(w, log_lam, batch):
        X, y = batch
        return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.exp(log_lam) * w @ w

    def val(w, log_lam, batch):
        X, y = batch
        return 0.5 * jnp.mean((X @ w - y) ** 2)

    X = jax.random.normal(jax.random.key(0), (20, 3))
    data = (X, X @ jnp.ones(3))
    problem = bl.kfold(train, val, k=4)
    method = bl.implicit(bl.unroll(optax.sgd(0.3), steps=200), bl.exact())
    out = bl.hypergrad(problem, method)(jnp.asarray(-1.0), bl.stack_folds(jnp.zeros(3), 4), data, data)
    assert out.params.shape == (4, 3) and out.grad.shape == ()
    ```
    """
    where = "kfold(train_loss, val_loss, *, k=..., seed=None)"
    _check_callable(train_loss, "train_loss", where, "(w, hparams, batch) -> scalar")
    _check_callable(val_loss, "val_loss", where, "(w, hparams, batch) -> scalar")
    k = _check_count(k, "k", where, 2, 5)
    if seed is not None:
        seed = _check_count(seed, "seed", where, 0, 0)

    def split(params, batch, which: str):
        n = _example_count(batch, k, f"kfold(..., k={k}) {which} loss")
        _check_folds(params, k, f"kfold(..., k={k}) {which} loss")
        idx = _fold_indices(n, k, seed)[0 if which == "inner" else 1]
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[idx], batch)

    def per_fold(loss, params, hparams, folds, what):
        values = jax.vmap(lambda w, b: loss(w, hparams, b))(params, folds)
        if jnp.shape(values) != (k,):
            raise TypeError(
                f"kfold(..., k={k}): {what} must return a scalar per model; the k folds gave shape "
                f"{jnp.shape(values)}. Reduce it, e.g. with jnp.mean(...)."
            )
        return values

    def inner(params, hparams, batch):
        return jnp.sum(per_fold(train_loss, params, hparams, split(params, batch, "inner"), "train_loss"))

    def outer(params, hparams, batch):
        return jnp.mean(per_fold(val_loss, params, hparams, split(params, batch, "outer"), "val_loss"))

    return Problem(inner=inner, outer=outer)


def stack_folds(params: PyTree, k: int) -> PyTree:
    """Repeat one model's parameters k times on a new leading axis: params0 for `bilevel.kfold`.

    **Arguments:**

    - `params`: a pytree of floating-point arrays, one model's parameters.
    - `k`: the number of folds, >= 2.

    **Returns:**

    The same tree with every leaf of shape `(k, *leaf.shape)` (every fold starts from `params`).

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    theta0 = bl.stack_folds({"w": jnp.zeros(3), "b": jnp.zeros(())}, k=5)
    assert theta0["w"].shape == (5, 3) and theta0["b"].shape == (5,)
    ```
    """
    where = "stack_folds(params, k)"
    k = _check_count(k, "k", where, 2, 5)
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves or not all(hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves):
        raise TypeError(
            f"{where} requires a pytree of floating-point arrays (one model's parameters); got "
            f"{tree_summary(params)}. Pass e.g. jnp.zeros(3) or {{'w': jnp.zeros(3)}}."
        )
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (k, *jnp.shape(x))), params)


# ----------------------------------------------------------------------------------------------
# Laplace approximation of the evidence.
# ----------------------------------------------------------------------------------------------


def _logdet_pd(H: jax.Array) -> jax.Array:
    """log det H by Cholesky; NaN unless H (symmetrised) is positive definite."""
    L = jnp.linalg.cholesky(0.5 * (H + H.T))
    diag = jnp.diagonal(L)
    ok = jnp.all(jnp.isfinite(diag) & (diag > 0))
    safe = jnp.where(ok, diag, 1.0)
    return jnp.where(ok, 2.0 * jnp.sum(jnp.log(safe)), jnp.nan)


def laplace_evidence(neg_log_joint: Callable) -> Callable:
    """The negative log evidence −log p(D | λ) under the Laplace approximation, as an outer loss.

    With S(w, λ) = −log p(D | w, λ) − log p(w | λ) the negative log joint and ŵ its minimiser
    (the MAP fit), expanding S to second order around ŵ and integrating the Gaussian gives
    (MacKay 1992; Bishop 2006, eqs. 4.135 and 3.86)

        −log p(D | λ) ≈ S(ŵ, λ) + ½ log det ∇²_w S(ŵ, λ) − (d/2) log 2π,

    d the number of parameters. The returned loss evaluates this at the params it is given;
    the inner problem is the MAP fit, so the problem is
    `bilevel.Problem(inner=S, outer=bilevel.laplace_evidence(S))`, and the hypergradient is
    that of the Laplace evidence including the path through ŵ(λ). For a linear-Gaussian
    model the approximation is exact.

    **Contract:** S must be the *full* negative log joint, summed over the data (not a mean),
    with the normalising constants of the likelihood and the prior that depend on λ (e.g.
    −(n/2) log β and −(d/2) log α for Gaussian noise and prior precisions β, α); constants
    free of λ only shift the value, not the hypergradient. A mean loss or a penalty without
    its normaliser gives a number that is not the evidence.

    The Hessian is dense in the flattened parameters (`jax.flatten_util.ravel_pytree`):
    d² memory and d³ time (a Cholesky factorisation), for models with up to a few thousand
    parameters. The log-determinant is computed by Cholesky; where the Hessian is not
    positive definite (ŵ not a strict local minimum) the value is NaN, not a number.

    **Arguments:**

    - `neg_log_joint`: S, a function `(params, hparams, batch) -> scalar`.

    **Returns:**

    The outer loss `(params, hparams, batch) -> −log p(D | λ)` (Laplace).

    **Example:**

    ```python
    import math
    import jax.numpy as jnp
    import bilevel as bl

    def S(w, log_alpha, x):       # x_i ~ N(w, 1), w ~ N(0, 1/α): evidence known exactly
        n = x.shape[0]
        return (0.5 * jnp.sum((x - w) ** 2) + 0.5 * n * math.log(2 * math.pi)
                + 0.5 * jnp.exp(log_alpha) * w ** 2 - 0.5 * log_alpha + 0.5 * math.log(2 * math.pi))

    x = jnp.array([0.3, 1.1, 0.7])
    w_map = jnp.sum(x) / (3 + 1.0)                      # α = 1
    value = bl.laplace_evidence(S)(w_map, jnp.asarray(0.0), x)
    cov = jnp.eye(3) + 1.0                               # marginal: x ~ N(0, I + 11ᵀ/α)
    exact = 0.5 * (x @ jnp.linalg.solve(cov, x) + jnp.linalg.slogdet(cov)[1] + 3 * math.log(2 * math.pi))
    assert jnp.allclose(value, exact)
    ```
    """
    where = "laplace_evidence(neg_log_joint)"
    _check_callable(neg_log_joint, "neg_log_joint", where, "(params, hparams, batch) -> scalar")

    def outer(params, hparams, batch):
        flat, unravel = ravel_pytree(params)
        if flat.size == 0:
            raise ValueError(
                f"{where}: the parameters are empty ({tree_summary(params)}); the evidence "
                "integrates over at least one parameter."
            )
        if not jnp.issubdtype(flat.dtype, jnp.inexact):
            raise TypeError(f"{where} requires floating-point parameters; got {tree_summary(params)}.")
        S = lambda v: _scalar(neg_log_joint(unravel(v), hparams, batch), "neg_log_joint", where)  # noqa: E731
        value = S(flat)
        H = jax.hessian(S)(flat)
        return value + 0.5 * _logdet_pd(H) - 0.5 * flat.size * _LOG_2PI

    return outer


# ----------------------------------------------------------------------------------------------
# Evidence lower bound with a diagonal Gaussian q.
# ----------------------------------------------------------------------------------------------


def gaussian_q(mean: PyTree, log_std: float = -3.0) -> dict:
    """Variational parameters of q(w) = N(μ, diag σ²) for `bilevel.gaussian_elbo`.

    **Arguments:**

    - `mean`: μ, a pytree of floating-point arrays with the tree of the model's parameters.
    - `log_std`: log σ for every entry, a finite Python number (small values start q near
      a point mass at μ).

    **Returns:**

    `{"mean": μ, "log_std": log σ}`, log σ with the tree and shapes of μ.

    **Example:**

    ```python
    import jax.numpy as jnp
    import bilevel as bl

    q = bl.gaussian_q(jnp.zeros(3), log_std=-2.0)
    assert q["log_std"].shape == (3,)
    ```
    """
    where = "gaussian_q(mean, log_std=-3.0)"
    leaves = jax.tree_util.tree_leaves(mean)
    if not leaves or not all(hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) for x in leaves):
        raise TypeError(
            f"{where} requires `mean`, a pytree of real floating-point arrays; got "
            f"{tree_summary(mean)}. Pass e.g. jnp.zeros(3)."
        )
    ok = isinstance(log_std, (int, float)) and not isinstance(log_std, bool) and math.isfinite(log_std)
    if not ok:
        raise ValueError(f"{where} requires a finite Python number log_std; got {log_std!r}. Pass e.g. log_std=-3.0.")
    return {"mean": mean, "log_std": jax.tree_util.tree_map(lambda x: jnp.full_like(x, log_std), mean)}


def _check_q(vparams, where: str):
    if not (isinstance(vparams, dict) and set(vparams) == {"mean", "log_std"}):
        got = sorted(vparams) if isinstance(vparams, dict) else type(vparams).__name__
        raise TypeError(
            f"{where} requires variational params {{'mean': μ, 'log_std': log σ}}; got {got}. "
            "Build them with bilevel.gaussian_q(mean, log_std)."
        )
    mean, log_std = vparams["mean"], vparams["log_std"]
    t_mean, t_std = jax.tree_util.tree_structure(mean), jax.tree_util.tree_structure(log_std)
    shapes = lambda t: [jnp.shape(x) for x in jax.tree_util.tree_leaves(t)]  # noqa: E731
    if t_mean != t_std or shapes(mean) != shapes(log_std):
        raise ValueError(
            f"{where} requires vparams['log_std'] with the tree and shapes of vparams['mean']; got "
            f"mean {tree_summary(mean)} and log_std {tree_summary(log_std)}."
        )
    return mean, log_std


def _precisions(log_alpha, mean, where: str) -> list:
    """log α per leaf of the mean: one scalar for all, or a tree like the mean."""
    leaves = jax.tree_util.tree_leaves(log_alpha)
    if len(leaves) == 1 and jnp.ndim(leaves[0]) == 0:
        return [leaves[0]] * len(jax.tree_util.tree_leaves(mean))
    same = jax.tree_util.tree_structure(log_alpha) == jax.tree_util.tree_structure(mean)
    if same and all(jnp.ndim(a) == 0 or jnp.shape(a) == jnp.shape(m)
                    for a, m in zip(leaves, jax.tree_util.tree_leaves(mean))):
        return leaves
    raise ValueError(
        f"{where} requires the log prior precision log α to be a scalar or a pytree with the "
        f"tree of the parameters (each leaf a scalar or of its parameter's shape: ARD); got {tree_summary(log_alpha)} for parameters "
        f"{tree_summary(mean)}. Pass log_precision=lambda h: ... that picks it out of hparams."
    )


def _is_key(x) -> bool:
    if not hasattr(x, "dtype"):
        return False
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jnp.ndim(x) == 0
    return x.dtype == jnp.uint32 and jnp.shape(x) == (2,)


def _kl_diag_gaussian(mean, log_std, log_alpha) -> jax.Array:
    """KL(N(μ, diag σ²) ‖ N(0, α⁻¹I)) = ½ Σ [α(σ² + μ²) − 1 − log α − 2 log σ]."""
    total = 0.0
    for mu, ls, la in zip(jax.tree_util.tree_leaves(mean), jax.tree_util.tree_leaves(log_std), log_alpha):
        a = jnp.exp(la)
        total = total + 0.5 * jnp.sum(a * (jnp.exp(2.0 * ls) + mu**2) - 1.0 - la - 2.0 * ls)
    return total


def gaussian_elbo(
    log_likelihood: Callable | None = None,
    *,
    expected_log_likelihood: Callable | None = None,
    log_precision: Callable | None = None,
    samples: int = 1,
    key: jax.Array | None = None,
) -> Callable:
    """The negative evidence lower bound of q(w) = N(μ, diag σ²) with a Gaussian prior N(0, α⁻¹I).

    For a model p(D | w, λ) and prior p(w | α) = N(0, α⁻¹I) (Graves 2011, practical
    variational inference)

        −ELBO(μ, σ; λ) = −E_q[log p(D | w, λ)] + KL(q ‖ N(0, α⁻¹I))  >=  −log p(D | λ),

    with the KL in closed form, ½ Σ_i [α(σ_i² + μ_i²) − 1 − log α − log σ_i²]. The returned
    loss is a function of the variational parameters `{"mean": μ, "log_std": log σ}`
    (`bilevel.gaussian_q`) and serves both levels: as the inner loss it is the variational
    fit, as the outer loss the (negative) bound on the evidence that the hyperparameters
    maximise — variational EM by hypergradients:
    `bilevel.Problem(inner=elbo, outer=elbo)`. At an exact inner optimum the hypergradient
    is the partial derivative ∂(−ELBO)/∂λ (envelope theorem).

    The expectation is either given in closed form (`expected_log_likelihood`) or estimated
    by the reparameterisation trick, w_s = μ + σ ⊙ ε_s with ε_s ~ N(0, I), s = 1..S, from a
    PRNG key: `key=` here (the same noise at every call), or, when `key` is None, the batch is
    a pair `(key, data)` (e.g. a new key per outer step). With fixed noise (common random
    numbers) the inner loss is a deterministic function, so its minimiser and the implicit
    hypergradient are exact for that Monte Carlo objective; they approximate those of the
    true ELBO, with an error that shrinks as S grows (not the exact ELBO gradient).

    **Arguments:**

    - `log_likelihood`: `(w, hparams, data) -> log p(D | w, λ)`, summed over the data with
      its normalising constants (for the bound to be on the evidence); for the Monte Carlo
      expectation.
    - `expected_log_likelihood`: instead, `(mean, std, hparams, data) -> E_q[log p(D | w, λ)]`
      in closed form (std = σ, a tree like the mean). Give exactly one of the two.
    - `log_precision`: `hparams -> log α`, a scalar (one precision) or a tree like the
      parameters (one per entry); default: hparams is log α itself.
    - `samples`: S >= 1, Monte Carlo samples per call.
    - `key`: a PRNG key for the noise, or None to read it from the batch `(key, data)`.

    **Returns:**

    The loss `(vparams, hparams, batch) -> −ELBO`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import bilevel as bl

    def log_lik(w, log_alpha, x):                    # x_i ~ N(w, 1)
        return -0.5 * jnp.sum((x - w) ** 2) - 0.5 * x.size * jnp.log(2 * jnp.pi)

    nelbo = bl.gaussian_elbo(log_lik, samples=64, key=jax.random.key(0))
    q = bl.gaussian_q(jnp.zeros(()), log_std=-1.0)
    x = jnp.array([0.3, 1.1, 0.7])
    value = nelbo(q, jnp.asarray(0.0), x)             # log α = 0: prior N(0, 1)
    assert value == nelbo(q, jnp.asarray(0.0), x)     # common random numbers: deterministic
    ```
    """
    where = ("gaussian_elbo(log_likelihood=None, *, expected_log_likelihood=None, log_precision=None, "
             "samples=1, key=None)")
    if (log_likelihood is None) == (expected_log_likelihood is None):
        raise TypeError(
            f"{where} requires exactly one of `log_likelihood` (Monte Carlo expectation) and "
            "`expected_log_likelihood` (closed form); got "
            f"{'both' if log_likelihood is not None else 'neither'}."
        )
    if log_likelihood is not None:
        _check_callable(log_likelihood, "log_likelihood", where, "(w, hparams, data) -> scalar")
    else:
        _check_callable(expected_log_likelihood, "expected_log_likelihood", where,
                        "(mean, std, hparams, data) -> scalar")
    if log_precision is not None:
        _check_callable(log_precision, "log_precision", where, "hparams -> log α")
    samples = _check_count(samples, "samples", where, 1, 8)
    if key is not None and not _is_key(key):
        raise TypeError(
            f"{where} requires `key` to be None or one PRNG key (jax.random.key(0)); got "
            f"{type(key).__name__} {getattr(key, 'shape', key)!r}."
        )
    if key is not None and log_likelihood is None:
        raise TypeError(f"{where}: `key` is only used by the Monte Carlo expectation; drop it with expected_log_likelihood.")

    def expectation(mean, log_std, hparams, batch):
        std = jax.tree_util.tree_map(jnp.exp, log_std)
        if expected_log_likelihood is not None:
            return _scalar(expected_log_likelihood(mean, std, hparams, batch), "expected_log_likelihood", where)
        noise_key, data = key, batch
        if key is None:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and _is_key(batch[0])):
                raise TypeError(
                    f"{where}: built without key=, so the batch must be a pair (key, data) with a "
                    f"PRNG key first; got {tree_summary(batch)}. Pass (jax.random.key(0), data), "
                    "or build the loss with gaussian_elbo(..., key=jax.random.key(0))."
                )
            noise_key, data = batch
        leaves, treedef = jax.tree_util.tree_flatten(mean)
        keys = jax.random.split(noise_key, len(leaves))
        eps = [jax.random.normal(kk, (samples, *jnp.shape(x)), x.dtype) for kk, x in zip(keys, leaves)]
        eps = jax.tree_util.tree_unflatten(treedef, eps)

        def one(e):
            w = jax.tree_util.tree_map(lambda m, s, z: m + s * z, mean, std, e)
            return _scalar(log_likelihood(w, hparams, data), "log_likelihood", where)

        return jnp.mean(jax.vmap(one)(eps))

    def loss(vparams, hparams, batch):
        mean, log_std = _check_q(vparams, where)
        log_alpha = hparams if log_precision is None else log_precision(hparams)
        kl = _kl_diag_gaussian(mean, log_std, _precisions(log_alpha, mean, where))
        return kl - expectation(mean, log_std, hparams, batch)

    return loss
