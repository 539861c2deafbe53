"""Bayesian linear regression ([`bilevel.testing.BayesianLinearRegression`][]) with its
evidence, MAP, optimal diagonal Gaussian posterior and ELBO in closed form, and k-fold ridge
cross-validation ([`bilevel.testing.KFoldRidge`][]) with its exact CV hypergradient: the
references for `bilevel.laplace_evidence`, `bilevel.gaussian_elbo` and `bilevel.kfold`.

Every closed form is NumPy float64 linear algebra, written by hand without autodiff.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._objectives import gaussian_elbo, kfold, laplace_evidence
from .._problem import Problem
from ._common import _rng, check_int, check_real, resolve_dtype
from ._ridge import _ridge_inner, _ridge_outer

Array = jax.Array
_LOG_2PI = math.log(2.0 * math.pi)

# ----------------------------------------------------------------------------------------------
# Losses of Bayesian linear regression: hparams = (log α, log β), batch = (X, y).
# ----------------------------------------------------------------------------------------------


def _blr_log_likelihood(w, hparams, batch):
    """log N(y | Xw, β⁻¹I) = (n/2) log β − (n/2) log 2π − (β/2)‖y − Xw‖²."""
    X, y = batch
    n = y.shape[0]
    r = y - X @ w
    return 0.5 * n * hparams[1] - 0.5 * n * _LOG_2PI - 0.5 * jnp.exp(hparams[1]) * (r @ r)


def _blr_neg_log_joint(w, hparams, batch):
    """S(w) = −log N(y | Xw, β⁻¹I) − log N(w | 0, α⁻¹I), every normalising constant included."""
    d = w.shape[0]
    log_prior = 0.5 * d * hparams[0] - 0.5 * d * _LOG_2PI - 0.5 * jnp.exp(hparams[0]) * (w @ w)
    return -_blr_log_likelihood(w, hparams, batch) - log_prior


def _blr_expected_log_likelihood(mean, std, hparams, batch):
    """E_q log N(y | Xw, β⁻¹I) for q = N(μ, diag σ²): the log-likelihood at μ − (β/2) Σ σ_i² (XᵀX)_ii."""
    X, _ = batch
    return _blr_log_likelihood(mean, hparams, batch) - 0.5 * jnp.exp(hparams[1]) * jnp.sum(std**2 * jnp.sum(X**2, axis=0))


def _blr_log_alpha(hparams):
    return hparams[0]


_EVIDENCE_PROBLEM = Problem(inner=_blr_neg_log_joint, outer=laplace_evidence(_blr_neg_log_joint))
_ELBO = gaussian_elbo(expected_log_likelihood=_blr_expected_log_likelihood, log_precision=_blr_log_alpha)
_ELBO_PROBLEM = Problem(inner=_ELBO, outer=_ELBO)


@functools.cache
def _mc_elbo_problem(key_data: tuple, samples: int) -> Problem:
    key = jax.random.wrap_key_data(np.asarray(key_data, np.uint32))
    loss = gaussian_elbo(_blr_log_likelihood, log_precision=_blr_log_alpha, samples=samples, key=key)
    return Problem(inner=loss, outer=loss)


def _log_hparams(hparams, where: str) -> tuple[float, float]:
    h = np.asarray(hparams, np.float64)
    if h.shape != (2,) or not np.all(np.isfinite(h)):
        raise ValueError(
            f"{where} requires hparams = (log α, log β), a finite array of shape (2,); got "
            f"{hparams!r}. Pass e.g. np.array([0.0, 1.0])."
        )
    return float(np.exp(h[0])), float(np.exp(h[1]))


class BayesianLinearRegression(eqx.Module):
    """Bayesian linear regression y ~ N(Xw, β⁻¹I), w ~ N(0, α⁻¹I), hyperparameters (log α, log β).

    With A = αI + βXᵀX (the posterior precision) and m = βA⁻¹Xᵀy (the posterior mean and
    MAP), everything is closed form (Bishop 2006, §3.5):

    - the log evidence (eq. 3.86): log p(y | α, β) = (d/2) log α + (n/2) log β − E(m)
      − ½ log|A| − (n/2) log 2π, E(m) = (β/2)‖y − Xm‖² + (α/2) mᵀm, and its gradient in
      (log α, log β): (d/2 − (α/2)(mᵀm + tr A⁻¹), n/2 − (β/2)(‖y − Xm‖² + tr(A⁻¹XᵀX)));
    - the best diagonal Gaussian q = N(μ, diag σ²) (maximising the ELBO): μ = m,
      σ_i² = 1/A_ii, and the ELBO E_q[log p(y | w)] − KL(q ‖ N(0, α⁻¹I)) there, with its
      gradient (the partial derivatives at the optimal q, by the envelope theorem);
    - the evidence maximiser by MacKay's fixed-point updates (γ = Σ_i λ_i/(α + λ_i), λ_i the
      eigenvalues of βXᵀX; α = γ/mᵀm, β = (n − γ)/‖y − Xm‖²; Bishop eqs. 3.91–3.95).

    The Laplace approximation is exact here, so `bilevel.laplace_evidence` of the negative
    log joint at the MAP equals −log p(y | α, β); with the closed-form expectation the
    `bilevel.gaussian_elbo` loss at the optimal q equals −ELBO. The closed forms are NumPy
    float64 without autodiff.

    **Fields:**

    - `X` (n, d), `y` (n,): the data; `batch` is `(X, y)`.
    - `hparams`: a default (log α, log β), shape (2,).

    **Example:**

    ```python
    import jax, jax.numpy as jnp, numpy as np
    import bilevel as bl
    import bilevel.testing as blt

    jax.config.update("jax_enable_x64", True)
    blr = blt.BayesianLinearRegression.sample(0, n=30, dim=3)
    def map_fit(h, w0, batch):                                   # the MAP in closed form
        X, y = batch
        A = jnp.exp(h[0]) * jnp.eye(X.shape[1]) + jnp.exp(h[1]) * X.T @ X
        return jnp.linalg.solve(A, jnp.exp(h[1]) * X.T @ y)

    hg = bl.hypergrad(blr.evidence_problem, bl.implicit(bl.solver(map_fit), bl.exact()))
    out = hg(blr.hparams, blr.params0, blr.batch, blr.batch)
    np.testing.assert_allclose(out.value, -blr.log_evidence(blr.hparams), rtol=1e-10)
    np.testing.assert_allclose(out.grad, -blr.log_evidence_grad(blr.hparams), rtol=1e-8)
    ```
    """

    X: Array
    y: Array
    hparams: Array

    def __check_init__(self):
        X, y = self.X, self.y
        if not (jnp.ndim(X) == 2 and jnp.shape(y) == jnp.shape(X)[:1] and X.shape[0] >= 1 and X.shape[1] >= 1):
            raise ValueError(
                "BayesianLinearRegression requires X of shape (n, d) and y of shape (n,), n, d >= 1; "
                f"got X {jnp.shape(X)} and y {jnp.shape(y)}. Or build one with "
                "BayesianLinearRegression.sample(seed)."
            )
        if jnp.shape(self.hparams) != (2,):
            raise ValueError(
                "BayesianLinearRegression requires hparams = (log α, log β) of shape (2,); got "
                f"shape {jnp.shape(self.hparams)}."
            )

    @classmethod
    def sample(cls, key_or_seed: Any, *, n: int = 20, dim: int = 3, noise: float = 0.5,
               dtype: Any = None) -> BayesianLinearRegression:
        """Draw X with standard normal entries, w ~ N(0, I) and y = Xw + noise·ε.

        **Arguments:**

        - `key_or_seed`: a non-negative int seed or a JAX PRNG key.
        - `n`: the number of examples, >= 1; `dim`: the number of weights, >= 1.
        - `noise`: the noise standard deviation, > 0.
        - `dtype`: a floating dtype; default float64 under x64, float32 otherwise.

        **Returns:**

        A `BayesianLinearRegression` with hparams (log α, log β) = (0, −2 log noise).
        """
        where = "BayesianLinearRegression.sample(key_or_seed, n=..., dim=..., noise=...)"
        rng = _rng(key_or_seed, where)
        n = check_int(n, "n", where, 1, 20)
        d = check_int(dim, "dim", where, 1, 3)
        noise = check_real(noise, "noise", where, low=0.0, strict=True, example=0.5)
        dt = resolve_dtype(dtype, where)
        X = rng.standard_normal((n, d))
        y = X @ rng.standard_normal(d) + noise * rng.standard_normal(n)
        h = np.array([0.0, -2.0 * math.log(noise)])
        return cls(jnp.asarray(X, dt), jnp.asarray(y, dt), jnp.asarray(h, dt))

    # -- the losses and problems --------------------------------------------------------------

    @property
    def batch(self) -> tuple:
        """`(X, y)`, the batch of every loss (inner and outer)."""
        return (self.X, self.y)

    @property
    def params0(self) -> Array:
        """Zero weights, shape (d,)."""
        return jnp.zeros(self.X.shape[1], self.X.dtype)

    @property
    def neg_log_joint(self):
        """S(w, h, (X, y)) = −log p(y | X, w, β) − log p(w | α), normalising constants included."""
        return _blr_neg_log_joint

    @property
    def log_likelihood(self):
        """log p(y | X, w, β), `(w, h, (X, y)) -> scalar`, for `bilevel.gaussian_elbo`."""
        return _blr_log_likelihood

    @property
    def expected_log_likelihood(self):
        """E_q log p(y | X, w, β) in closed form, `(mean, std, h, (X, y)) -> scalar`."""
        return _blr_expected_log_likelihood

    @property
    def log_precision(self):
        """`h -> log α` (the prior precision's entry of the hyperparameters)."""
        return _blr_log_alpha

    @property
    def evidence_problem(self) -> Problem:
        """`Problem(inner=S, outer=laplace_evidence(S))`: the MAP fit and −log p(y | α, β)."""
        return _EVIDENCE_PROBLEM

    @property
    def elbo_problem(self) -> Problem:
        """The −ELBO (closed-form expectation) as inner and outer loss, over `{"mean", "log_std"}`."""
        return _ELBO_PROBLEM

    def mc_elbo_problem(self, key: Any, samples: int = 1) -> Problem:
        """The −ELBO with a Monte Carlo expectation from fixed noise (`gaussian_elbo(..., key=key)`).

        **Arguments:**

        - `key`: a PRNG key (`jax.random.key(0)`); `samples`: S >= 1.

        **Returns:**

        A `bilevel.Problem` whose inner and outer losses are that −ELBO.
        """
        where = "BayesianLinearRegression.mc_elbo_problem(key, samples=1)"
        samples = check_int(samples, "samples", where, 1, 8)
        try:
            data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
            data = tuple(int(v) for v in np.asarray(data, np.uint32).reshape(2))
        except (AttributeError, TypeError, ValueError) as err:
            raise TypeError(f"{where} requires one concrete PRNG key, e.g. jax.random.key(0); got {key!r}.") from err
        return _mc_elbo_problem(data, samples)

    # -- closed forms (NumPy float64) ---------------------------------------------------------

    def _host(self):
        return np.asarray(self.X, np.float64), np.asarray(self.y, np.float64)

    def posterior(self, hparams) -> tuple[np.ndarray, np.ndarray]:
        """The posterior mean m = βA⁻¹Xᵀy and precision A = αI + βXᵀX (NumPy float64).

        **Arguments:**

        - `hparams`: (log α, log β).

        **Returns:**

        `(m, A)`, shapes (d,) and (d, d).
        """
        a, b = _log_hparams(hparams, "BayesianLinearRegression.posterior(hparams)")
        X, y = self._host()
        A = a * np.eye(X.shape[1]) + b * X.T @ X
        return np.linalg.solve(A, b * X.T @ y), A

    def map(self, hparams) -> np.ndarray:
        """The MAP weights (= the posterior mean m), NumPy float64, shape (d,).

        **Arguments:** `hparams`: (log α, log β).

        **Returns:** m.
        """
        return self.posterior(hparams)[0]

    def log_evidence(self, hparams) -> float:
        """log p(y | X, α, β) (Bishop 2006, eq. 3.86).

        **Arguments:** `hparams`: (log α, log β).

        **Returns:** a Python float.
        """
        a, b = _log_hparams(hparams, "BayesianLinearRegression.log_evidence(hparams)")
        X, y = self._host()
        n, d = X.shape
        m, A = self.posterior(hparams)
        r = y - X @ m
        energy = 0.5 * b * r @ r + 0.5 * a * m @ m
        logdet = np.linalg.slogdet(A)[1]
        return float(0.5 * d * math.log(a) + 0.5 * n * math.log(b) - energy - 0.5 * logdet - 0.5 * n * _LOG_2PI)

    def log_evidence_grad(self, hparams) -> np.ndarray:
        """The gradient of `log_evidence` with respect to (log α, log β).

        (d/2 − (α/2)(mᵀm + tr A⁻¹), n/2 − (β/2)(‖y − Xm‖² + tr(A⁻¹XᵀX))), derived by hand
        (the envelope theorem for E(m) and d log|A| = tr(A⁻¹ dA)).

        **Arguments:** `hparams`: (log α, log β).

        **Returns:** NumPy float64, shape (2,).
        """
        a, b = _log_hparams(hparams, "BayesianLinearRegression.log_evidence_grad(hparams)")
        X, y = self._host()
        n, d = X.shape
        m, A = self.posterior(hparams)
        r = y - X @ m
        Ainv = np.linalg.inv(A)
        return np.array([0.5 * d - 0.5 * a * (m @ m + np.trace(Ainv)),
                         0.5 * n - 0.5 * b * (r @ r + np.trace(Ainv @ X.T @ X))])

    def optimal_q(self, hparams) -> dict:
        """The diagonal Gaussian q maximising the ELBO: μ = m, σ_i² = 1/A_ii.

        **Arguments:** `hparams`: (log α, log β).

        **Returns:** `{"mean": μ, "log_std": log σ}` (NumPy float64), as `bilevel.gaussian_q`.
        """
        m, A = self.posterior(hparams)
        return {"mean": m, "log_std": -0.5 * np.log(np.diag(A))}

    def _elbo_terms(self, hparams, q, where):
        a, b = _log_hparams(hparams, where)
        X, y = self._host()
        q = self.optimal_q(hparams) if q is None else q
        mu = np.asarray(q["mean"], np.float64)
        var = np.exp(2.0 * np.asarray(q["log_std"], np.float64))
        if mu.shape != (X.shape[1],) or var.shape != mu.shape:
            raise ValueError(f"{where} requires q = {{'mean', 'log_std'}} of shape ({X.shape[1]},) each.")
        r = y - X @ mu
        fit = r @ r + var @ np.sum(X**2, axis=0)
        return a, b, X.shape[0], mu, var, fit

    def elbo(self, hparams, q: dict | None = None) -> float:
        """E_q[log p(y | X, w, β)] − KL(q ‖ N(0, α⁻¹I)) in closed form.

        **Arguments:**

        - `hparams`: (log α, log β).
        - `q`: `{"mean": μ, "log_std": log σ}`; default: `optimal_q(hparams)`.

        **Returns:** a Python float (<= `log_evidence(hparams)`).
        """
        a, b, n, mu, var, fit = self._elbo_terms(hparams, q, "BayesianLinearRegression.elbo(hparams, q=None)")
        expected = 0.5 * n * math.log(b) - 0.5 * n * _LOG_2PI - 0.5 * b * fit
        kl = 0.5 * np.sum(a * (var + mu**2) - 1.0 - math.log(a) - np.log(var))
        return float(expected - kl)

    def elbo_grad(self, hparams) -> np.ndarray:
        """The gradient of the ELBO at the optimal q with respect to (log α, log β).

        By the envelope theorem, the partial derivatives at the optimal q:
        (−½ Σ_i (α(σ_i² + μ_i²) − 1), n/2 − (β/2)(‖y − Xμ‖² + Σ_i σ_i² (XᵀX)_ii)).

        **Arguments:** `hparams`: (log α, log β).

        **Returns:** NumPy float64, shape (2,).
        """
        a, b, n, mu, var, fit = self._elbo_terms(hparams, None, "BayesianLinearRegression.elbo_grad(hparams)")
        return np.array([-0.5 * np.sum(a * (var + mu**2) - 1.0), 0.5 * n - 0.5 * b * fit])

    def mackay(self, hparams0=None, *, iterations: int = 10_000, tol: float = 1e-14) -> np.ndarray:
        """The evidence maximiser (log α, log β) by MacKay's fixed-point updates.

        γ = Σ_i λ_i/(α + λ_i) with λ_i the eigenvalues of βXᵀX, then α ← γ/mᵀm and
        β ← (n − γ)/‖y − Xm‖² (Bishop 2006, eqs. 3.91–3.95), until the relative change is
        below `tol`. At the fixed point `log_evidence_grad` is zero.

        **Arguments:**

        - `hparams0`: the start (log α, log β); default `self.hparams`.
        - `iterations`: the most updates, >= 1; `tol`: > 0.

        **Returns:** NumPy float64, shape (2,). Raises if it has not converged.
        """
        where = "BayesianLinearRegression.mackay(hparams0=None, *, iterations=..., tol=...)"
        iterations = check_int(iterations, "iterations", where, 1, 10_000)
        tol = check_real(tol, "tol", where, low=0.0, strict=True, example=1e-14)
        a, b = _log_hparams(self.hparams if hparams0 is None else hparams0, where)
        X, y = self._host()
        n = X.shape[0]
        eig = np.linalg.eigvalsh(X.T @ X)
        for _ in range(iterations):
            m, _ = self.posterior(np.log([a, b]))
            gamma = np.sum(b * eig / (a + b * eig))
            r = y - X @ m
            a_new, b_new = gamma / (m @ m), (n - gamma) / (r @ r)
            done = abs(a_new - a) <= tol * a and abs(b_new - b) <= tol * b
            a, b = a_new, b_new
            if done:
                return np.log([a, b])
        raise ValueError(f"{where} did not converge in {iterations} iterations; pass more iterations or a larger tol.")


# ----------------------------------------------------------------------------------------------
# k-fold ridge regression.
# ----------------------------------------------------------------------------------------------


@functools.cache
def _kfold_ridge_problem(k: int) -> Problem:
    return kfold(_ridge_inner, _ridge_outer, k=k)


class KFoldRidge(eqx.Module):
    """k-fold cross-validation of ridge regression, with the exact CV hypergradient.

    Fold j holds examples j·n/k, ..., (j+1)·n/k − 1 (the order of `bilevel.kfold` without a
    seed). Model j is fitted on the other folds, L_j(w) = 1/(2n_t)‖X₋ⱼw − y₋ⱼ‖² + ½e^λ‖w‖²,
    so w_j = H_j⁻¹X₋ⱼᵀy₋ⱼ/n_t with H_j = X₋ⱼᵀX₋ⱼ/n_t + e^λI, and validated on fold j,
    V_j = 1/(2m)‖X_jw_j − y_j‖². The CV hypergradient is the mean over folds of the
    ridge hypergradients −e^λ w_jᵀH_j⁻¹∇V_j(w_j) (NumPy float64 dense solves, no autodiff).

    **Fields:**

    - `X` (n, d), `y` (n,): the data, n divisible by k; `batch` is `(X, y)`.
    - `log_lam`: a default log-penalty λ (scalar); also `hparams`.
    - `k`: the number of folds (static).

    **Example:**

    ```python
    import jax, numpy as np, optax
    import bilevel as bl
    import bilevel.testing as blt

    jax.config.update("jax_enable_x64", True)
    cv = blt.KFoldRidge.sample(0, n=20, dim=3, k=4)
    method = bl.implicit(bl.unroll(optax.sgd(0.2), steps=300), bl.exact())
    out = bl.hypergrad(cv.problem, method)(cv.hparams, cv.params0, cv.batch, cv.batch)
    np.testing.assert_allclose(out.grad, cv.hypergrad(cv.hparams), rtol=1e-8)
    ```
    """

    X: Array
    y: Array
    log_lam: Array
    k: int = eqx.field(static=True)

    def __check_init__(self):
        where = "KFoldRidge(X, y, log_lam, k)"
        X, y = self.X, self.y
        if not (jnp.ndim(X) == 2 and jnp.shape(y) == jnp.shape(X)[:1] and X.shape[1] >= 1):
            raise ValueError(f"{where} requires X of shape (n, d) and y of shape (n,); got X {jnp.shape(X)}, y {jnp.shape(y)}.")
        check_int(self.k, "k", where, 2, 4)
        n = X.shape[0]
        if n < self.k or n % self.k:
            raise ValueError(
                f"{where} requires n >= k and n divisible by k (equal folds); got n={n}, k={self.k}. "
                "Drop the remainder or choose another k."
            )

    @classmethod
    def sample(cls, key_or_seed: Any, *, n: int = 20, dim: int = 3, k: int = 4, noise: float = 0.5,
               log_lam: float = -1.0, dtype: Any = None) -> KFoldRidge:
        """Draw X with standard normal entries, y = Xw + noise·ε.

        **Arguments:**

        - `key_or_seed`: a non-negative int seed or a JAX PRNG key.
        - `n`: examples (divisible by `k`); `dim`: weights; `k`: folds, >= 2.
        - `noise`: >= 0; `log_lam`: the default λ; `dtype`: a floating dtype.

        **Returns:** a `KFoldRidge`.
        """
        where = "KFoldRidge.sample(key_or_seed, n=..., dim=..., k=...)"
        rng = _rng(key_or_seed, where)
        n = check_int(n, "n", where, 2, 20)
        d = check_int(dim, "dim", where, 1, 3)
        k = check_int(k, "k", where, 2, 4)
        noise = check_real(noise, "noise", where, low=0.0, strict=False, example=0.5)
        lam = check_real(log_lam, "log_lam", where, low=-math.inf, strict=True, example=-1.0)
        dt = resolve_dtype(dtype, where)
        X = rng.standard_normal((n, d))
        y = X @ rng.standard_normal(d) + noise * rng.standard_normal(n)
        return cls(jnp.asarray(X, dt), jnp.asarray(y, dt), jnp.asarray(lam, dt), k)

    @property
    def problem(self) -> Problem:
        """`bilevel.kfold(ridge_train, ridge_val, k=k)`."""
        return _kfold_ridge_problem(self.k)

    @property
    def hparams(self) -> Array:
        return self.log_lam

    @property
    def params0(self) -> Array:
        """Zeros of shape (k, d): one model per fold."""
        return jnp.zeros((self.k, self.X.shape[1]), self.X.dtype)

    @property
    def batch(self) -> tuple:
        """`(X, y)`: the full dataset, the inner and the outer batch."""
        return (self.X, self.y)

    def _folds(self, log_lam):
        lam = np.asarray(log_lam, np.float64)
        if lam.shape != () or not np.isfinite(lam):
            raise ValueError(f"KFoldRidge requires a finite scalar log-penalty; got {log_lam!r}.")
        rho = math.exp(float(lam))
        X, y = np.asarray(self.X, np.float64), np.asarray(self.y, np.float64)
        m = X.shape[0] // self.k
        for j in range(self.k):
            val = np.arange(j * m, (j + 1) * m)
            Xt, yt = np.delete(X, val, axis=0), np.delete(y, val)
            H = Xt.T @ Xt / Xt.shape[0] + rho * np.eye(X.shape[1])
            w = np.linalg.solve(H, Xt.T @ yt / Xt.shape[0])
            yield rho, H, w, X[val], y[val]

    def response(self, log_lam) -> np.ndarray:
        """The k fitted models w_j, shape (k, d), NumPy float64.

        **Arguments:** `log_lam`: λ. **Returns:** the stacked w_j.
        """
        return np.stack([w for _, _, w, _, _ in self._folds(log_lam)])

    def value(self, log_lam) -> float:
        """The CV loss (1/k) Σ_j V_j(w_j). **Arguments:** `log_lam`: λ. **Returns:** a float."""
        return float(np.mean([0.5 * np.mean((Xv @ w - yv) ** 2) for _, _, w, Xv, yv in self._folds(log_lam)]))

    def hypergrad(self, log_lam) -> float:
        """dCV/dλ = (1/k) Σ_j −e^λ w_jᵀH_j⁻¹∇V_j(w_j). **Arguments:** `log_lam`: λ. **Returns:** a float."""
        grads = []
        for rho, H, w, Xv, yv in self._folds(log_lam):
            g = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
            grads.append(-rho * w @ np.linalg.solve(H, g))
        return float(np.mean(grads))
