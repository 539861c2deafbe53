"""`bilevel check` rows for the relaxations of `_relax.py`: the coupled dropout estimator against
its closed form, and a Gumbel-softmax feature-group choice against exhaustive search.

`select_feature_group` is also what tests/test_relax.py runs on several problems.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._relax import dropout_expectation, gumbel_softmax

# These programs run once: compiling them with the CPU backend's optimisations off takes about
# half the time and the run itself stays in milliseconds.
_QUICK = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run_once(fn, *args):
    """jax.jit(fn)(*args), compiled for a single run."""
    return jax.jit(fn).lower(*args).compile(compiler_options=_QUICK)(*args)


# ---------------------------------------------------------------- dropout: a closed-form loss


def dropout_problem(dtype=jnp.float64, n: int = 30, d: int = 6, seed: int = 0):
    """L(m, w) = ‖y − X(m⊙w)‖²/n and its expectation's derivative in a shared keep p.

    With m_i ~ B(p) independent, E[m_i m_j] = p² (i ≠ j) and p (i = j), so with G = XᵀX/n and
    b = Xᵀy/n, E L = yᵀy/n − 2p bᵀw + p² wᵀGw + (p − p²) Σᵢ Gᵢᵢ wᵢ², a quadratic in p: its
    central difference is exact and dE L/dp = −2bᵀw + 2p wᵀGw + (1 − 2p) Σᵢ Gᵢᵢ wᵢ².
    Returns (loss, w, exact_derivative(p)) computed in NumPy float64.
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y = X @ (w + 0.5 * rng.normal(size=d)) + 0.1 * rng.normal(size=n)
    G, b = X.T @ X / n, X.T @ y / n
    Xj, yj = jnp.asarray(X, dtype), jnp.asarray(y, dtype)

    def loss(mask, w):
        return jnp.mean((yj - Xj @ (mask * w)) ** 2)

    def exact(p):
        return -2 * b @ w + 2 * p * w @ G @ w + (1 - 2 * p) * np.sum(np.diag(G) * w**2)

    return loss, jnp.asarray(w, dtype), exact


def _dropout_row(x64: bool) -> dict:
    dtype = jnp.float64 if x64 else jnp.float32
    loss, w, exact = dropout_problem(dtype)
    keep, n = 0.6, 4000
    grad = jax.grad(lambda p, k: dropout_expectation(loss, p, (w,), k, eps=0.05, shape=w.shape))
    keys = jax.random.split(jax.random.key(0), n)
    g = np.asarray(_run_once(jax.vmap(grad, (None, 0)), jnp.asarray(keep, dtype), keys), np.float64)
    mean, se, target = g.mean(), g.std(ddof=1) / math.sqrt(n), exact(keep)
    return {
        "name": "dropout_expectation: d E[L]/d keep (coupled masks)",
        "value": float(mean),
        "target": float(target),
        "rel_error": float(abs(mean - target) / abs(target)),
        "exact": False,
        "note": (f"mean of {n} stochastic estimates, standard error {se:.3g} "
                 f"({abs(mean - target) / se:.1f} s.e. from the closed form; eps = 0.05)"),
    }


# ---------------------------------------------------------------- a discrete choice by relaxation


def feature_group_problem(seed: int, groups: int = 4, size: int = 3, n: int = 40, noise: float = 0.3):
    """K groups of features; y depends on one group only (group `seed % groups`).

    Returns (X, y, Xv, yv) as NumPy float64 arrays; feature j belongs to group j // size.
    """
    rng = np.random.default_rng(seed)
    d = groups * size
    true = seed % groups
    beta = np.zeros(d)
    beta[true * size:(true + 1) * size] = rng.normal(size=size) + np.sign(rng.normal(size=size))
    X, Xv = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    y = X @ beta + noise * rng.normal(size=n)
    yv = Xv @ beta + noise * rng.normal(size=n)
    return X, y, Xv, yv


def exhaustive_best_group(X, y, Xv, yv, groups: int, size: int, alpha: float) -> int:
    """Ridge on each group alone (dense NumPy solve); the group with the least validation MSE."""
    losses = []
    for g in range(groups):
        cols = slice(g * size, (g + 1) * size)
        A, B = X[:, cols], Xv[:, cols]
        w = np.linalg.solve(A.T @ A / len(y) + alpha * np.eye(size), A.T @ y / len(y))
        losses.append(np.mean((yv - B @ w) ** 2))
    return int(np.argmin(losses))


def select_feature_group(X, y, Xv, yv, groups: int, size: int, *, alpha: float = 0.1,
                         temperature: float = 0.5, steps: int = 60, samples: int = 8,
                         learning_rate: float = 0.1, seed: int = 0, dtype=jnp.float64):
    """Choose one of K feature groups by hypergradient descent on Gumbel-softmax logits λ.

    Inner: ridge on the gated features X ⊙ s[group], s = gumbel_softmax(key, λ, τ), solved in
    closed form and differentiated by the implicit function theorem (bl.implicit with
    bl.exact()). Outer: the validation MSE with the same gates, averaged over `samples` keys
    (fresh keys every step), Adam on λ from λ = 0. Returns the final logits (a NumPy array);
    the choice is argmax. Arrays with a leading axis (several problems) run as one vmapped
    program and return one row of logits per problem.
    """
    import bilevel as bl  # the public names; imported here to avoid a cycle at package import

    group_of = jnp.arange(groups * size) // size

    def gated(A, lam, key):
        return A * gumbel_softmax(key, lam, temperature)[group_of]

    def inner(w, lam, batch):
        A, b, key = batch
        return jnp.mean((b - gated(A, lam, key) @ w) ** 2) + alpha * w @ w

    def outer(w, lam, batch):
        A, b, key = batch
        return jnp.mean((b - gated(A, lam, key) @ w) ** 2)

    def ridge(lam, w0, batch):                  # the inner problem's exact minimiser
        A, b, key = batch
        Z = gated(A, lam, key)
        n = b.shape[0]
        return jnp.linalg.solve(Z.T @ Z / n + alpha * jnp.eye(Z.shape[1], dtype=Z.dtype), Z.T @ b / n)

    hg = bl.hypergrad(bl.Problem(inner=inner, outer=outer), bl.implicit(bl.solver(ridge), bl.exact()))
    opt = optax.adam(learning_rate)

    def run(X, y, Xv, yv, keys):
        w0 = jnp.zeros(groups * size, dtype)

        def step(carry, key):
            lam, state = carry
            sample_keys = jax.random.split(key, samples)
            out = jax.vmap(lambda k: hg(lam, w0, (X, y, k), (Xv, yv, k)))(sample_keys)
            updates, state = opt.update(out.grad.mean(0), state, lam)
            return (optax.apply_updates(lam, updates), state), None

        lam0 = jnp.zeros(groups, dtype)
        (lam, _), _ = jax.lax.scan(step, (lam0, opt.init(lam0)), keys)
        return lam

    data = [jnp.asarray(a, dtype) for a in (X, y, Xv, yv)]
    keys = jax.random.split(jax.random.key(seed), steps)
    if data[0].ndim == 3:
        return np.asarray(_run_once(jax.vmap(run, (0, 0, 0, 0, None)), *data, keys))
    return np.asarray(_run_once(run, *data, keys))


def _selection_row(x64: bool) -> dict:
    dtype = jnp.float64 if x64 else jnp.float32
    groups, size, alpha = 4, 3, 0.1
    X, y, Xv, yv = feature_group_problem(seed=1, groups=groups, size=size)
    best = exhaustive_best_group(X, y, Xv, yv, groups, size, alpha)
    lam = select_feature_group(X, y, Xv, yv, groups, size, alpha=alpha, dtype=dtype)
    chosen = int(np.argmax(lam))
    lam = np.asarray(lam, np.float64)
    probs = ", ".join(f"{p:.3f}" for p in np.exp(lam - lam.max()) / np.exp(lam - lam.max()).sum())
    return {
        "name": "gumbel_softmax: feature group chosen by hypergradient",
        "value": float(chosen),
        "target": float(best),
        "rel_error": 0.0 if chosen == best else 1.0,
        "exact": True,
        "note": (f"argmax of the logits after 60 Adam steps (tau = 0.5, 8 samples a step) vs ridge on "
                 f"each of {groups} groups (NumPy); softmax(logits) = [{probs}]"),
    }


def check_rows(x64: bool) -> list[dict]:
    """The `bilevel check` rows of the relaxations: dropout keep-probability estimator and Gumbel-softmax choice."""
    return [_dropout_row(x64), _selection_row(x64)]
