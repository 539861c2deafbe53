"""The classification problems of benchopt's `benchmark_bilevel`, ready to hand to a method.

- `data_cleaning(...)`: a softmax classifier trained on rows of which a share have random
  labels, with one hyperparameter per training row weighting its loss by `σ(λᵢ)`
  (benchmark_bilevel's `datacleaning` oracle and `datasets/mnist.py`).
- `logreg_per_feature(...)`: binary logistic regression with one ridge penalty `e^{λⱼ}` per
  feature (benchmark_bilevel's `logreg` oracle with `reg='exp'`).

Both return a `BenchProblem`: a `bilevel.Problem` whose losses are means over the rows of
their batch (so a minibatch of rows, e.g. from `bilevel.sampler`, is an unbiased estimate),
the per-row data, starting points and a test metric. They are re-exported from
`bilevel.datasets`.
"""

from __future__ import annotations

import functools
import numbers
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._problem import Problem

__all__ = ["BenchProblem", "data_cleaning", "logreg_per_feature"]

_SOURCES = ("digits", "mnist")
_MNIST_DEFAULTS = (20_000, 5_000)  # benchmark_bilevel's datasets/mnist.py


class BenchProblem(NamedTuple):
    """A bilevel problem from `benchmark_bilevel` with its data (a `NamedTuple`).

    **Fields:**

    - `problem`: the `bilevel.Problem`; both losses are means over the rows of their batch.
    - `inner_data`: the training rows, a tuple of arrays whose leading axis is the row
      (pass it, or any subset of its rows, as the inner batch).
    - `outer_data`: the validation rows, likewise (the outer batch).
    - `test_data`: held-out rows `(X, y)`, used by `metric`.
    - `hparams0`: the starting hyperparameters.
    - `params0`: the starting inner parameters (zeros).
    - `metric`: `metric(params) -> scalar`, the test error (share of misclassified test
      rows) of the model `params`: a `jax.tree_util.Partial` holding the test arrays, so it
      can be passed as an argument into a jitted function (no large constants compiled in).
    - `corrupted`: for `data_cleaning`, a boolean numpy array `(n_train,)` marking the
      training rows whose label was redrawn at random; `None` for `logreg_per_feature`.
    - `name`: e.g. `"data_cleaning/digits"`.

    `repr(bench)` shows the shapes, not the arrays.

    **Example:**

    ```python
    import bilevel as bl

    bench = bl.datasets.logreg_per_feature("digits", n_train=100, n_val=50)
    problem, inner_data, outer_data, test_data, hparams0, params0, metric, _, name = bench
    print(bench)  # BenchProblem(name='logreg_per_feature/digits', inner_data=((100, 64), ...
    ```
    """

    problem: Problem
    inner_data: tuple
    outer_data: tuple
    test_data: tuple
    hparams0: jax.Array
    params0: Any
    metric: jax.tree_util.Partial
    corrupted: np.ndarray | None
    name: str

    def __repr__(self) -> str:
        parts = [f"{f}={jax.tree.map(lambda x: tuple(np.shape(x)), getattr(self, f))}" for f in
                 ("inner_data", "outer_data", "test_data", "hparams0", "params0")]
        return f"BenchProblem(name={self.name!r}, {', '.join(parts)})"


# ----------------------------------------------------------------------------------------------
# Losses: pure functions of (params, hparams, batch), means over the rows of the batch.
# ----------------------------------------------------------------------------------------------


def _cross_entropy(params, X, y):
    """Per-row softmax cross-entropy of the linear model `XW + b` for integer labels `y`."""
    W, b = params
    logits = X @ W + b
    picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - picked


def _cleaning_inner(params, lam, batch, *, ridge):
    """`mean_i σ(λ[idx_i]) CE_i + ridge (‖W‖² + ‖b‖²)` over the rows `(X, y, idx)`."""
    X, y, idx = batch
    weights = jax.nn.sigmoid(lam[idx])
    penalty = sum(jnp.sum(p**2) for p in params)
    return jnp.mean(weights * _cross_entropy(params, X, y)) + ridge * penalty


def _cleaning_outer(params, lam, batch):
    """`mean_j CE_j` over the clean validation rows `(X, y)`."""
    del lam
    X, y = batch
    return jnp.mean(_cross_entropy(params, X, y))


@functools.cache
def _cleaning_problem(ridge: float) -> Problem:
    """One `Problem` per ridge value, so that repeated calls share compiled functions."""
    inner = functools.partial(_cleaning_inner, ridge=ridge)
    return Problem(inner=inner, outer=_cleaning_outer)


def _logistic(w, X, y):
    """Per-row `−log σ(y xᵀw)` for labels `y ∈ {−1, +1}`."""
    return jnp.logaddexp(0.0, -y * (X @ w))


def _logreg_inner(w, lam, batch):
    """`mean_i −log σ(y_i x_iᵀw) + ½ Σ_j e^{λ_j} w_j²` over the rows `(X, y)`."""
    X, y = batch
    return jnp.mean(_logistic(w, X, y)) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)


def _logreg_outer(w, lam, batch):
    """`mean_j −log σ(y_j x_jᵀw)` over the validation rows `(X, y)`."""
    del lam
    X, y = batch
    return jnp.mean(_logistic(w, X, y))


_LOGREG_PROBLEM = Problem(inner=_logreg_inner, outer=_logreg_outer)


def _softmax_error(X, y, params):
    """The share of rows whose largest logit is not their label."""
    W, b = params
    return jnp.mean(jnp.argmax(X @ W + b, axis=1) != y, dtype=X.dtype)


def _binary_error(X, y, w):
    """The share of rows on the wrong side of `xᵀw = 0` (0 counts as the label −1)."""
    return jnp.mean((X @ w > 0) != (y > 0), dtype=X.dtype)


# ----------------------------------------------------------------------------------------------
# Argument checks and loading.
# ----------------------------------------------------------------------------------------------


def _check_source(source, path, where):
    if not isinstance(source, str) or source not in _SOURCES:
        raise ValueError(
            f"{where} knows the sources {list(_SOURCES)}; got source={source!r}. Pass "
            "source='digits' (bundled with scikit-learn) or source='mnist' with path=..."
        )
    if source == "digits" and path is not None:
        raise ValueError(
            f"{where}: source='digits' takes no path (the digits ship with scikit-learn); got "
            f"path={path!r}. Drop path=, or pass source='mnist' to read an .npz file."
        )
    if source == "mnist" and path is None:
        raise ValueError(
            f"{where}: source='mnist' requires the MNIST .npz file, which is not bundled with "
            "bilevel. Pass path='.../mnist.npz' (see bilevel.datasets.mnist for the format)."
        )


def _check_unit_interval(value, name, where) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where} requires `{name}` to be a number in [0, 1]; got "
            f"{type(value).__name__} {value!r}. Pass e.g. {name}=0.5."
        )
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{where} requires 0 <= {name} <= 1 (the share of training rows whose label is "
            f"redrawn at random); got {name}={value!r}. Pass e.g. {name}=0.5."
        )
    return float(value)


def _check_positive(value, name, where, example) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where} requires `{name}` to be a real number > 0; got {type(value).__name__} "
            f"{value!r}. Pass e.g. {name}={example}."
        )
    if not (np.isfinite(value) and value > 0):
        raise ValueError(
            f"{where} requires a finite `{name}` > 0 (it keeps the inner problem strongly "
            f"convex); got {name}={value!r}. Pass e.g. {name}={example}."
        )
    return float(value)


def _resolve_dtype(dtype, where) -> np.dtype:
    """`None` -> JAX's default float (float64 under x64); otherwise a usable real float dtype."""
    if dtype is None:
        return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(
            f"{where} requires dtype to be a floating dtype such as jnp.float32; got "
            f"{dtype!r}."
        ) from err
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{where} requires a real floating dtype; got dtype={dt}. Pass dtype=jnp.float32 "
            "or dtype=jnp.float64."
        )
    if jax.dtypes.canonicalize_dtype(dt) != dt:
        raise ValueError(
            f"{where} was asked for dtype={dt}, which needs 64-bit mode, but jax_enable_x64 "
            "is off. Call jax.config.update('jax_enable_x64', True) at start-up, or pass "
            "dtype=jnp.float32."
        )
    return dt


def _load(source, path, n_train, n_val, seed, where):
    """Standardised `(X, y)` train / validation / test splits of `source`, sized as asked."""
    from . import datasets as ds  # here, not at the top: bilevel.datasets imports this module

    n_train = ds._check_size(n_train, "n_train", where, optional=True)
    n_val = ds._check_size(n_val, "n_val", where, optional=True)
    seed = ds._check_seed(seed, where)
    if source == "mnist":
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"{where} requires `path` to be a str or os.PathLike naming an .npz file; "
                f"got {type(path).__name__} {path!r}. Pass e.g. path='data/mnist.npz'."
            )
        n_train = _MNIST_DEFAULTS[0] if n_train is None else n_train
        n_val = _MNIST_DEFAULTS[1] if n_val is None else n_val
        return ds.mnist(path, num_train=n_train, num_val=n_val, seed=seed, standardize=True)[:3]
    data = ds.digits(seed=seed, standardize=False)
    (Xt, yt), (Xv, yv), (Xs, ys) = data.train, data.val, data.test
    for name, asked, have in (("n_train", n_train, len(Xt)), ("n_val", n_val, len(Xv))):
        if asked is not None and asked > have:
            raise ValueError(
                f"{where}: the digits have {have} rows in that split (1797 images: 50% train, "
                f"25% validation, 25% test); got {name}={asked}. Pass {name} <= {have}, or "
                f"None for all of them (or source='mnist' for more data)."
            )
    Xt, yt, Xv, yv = Xt[:n_train], yt[:n_train], Xv[:n_val], yv[:n_val]
    Xt, Xv, Xs = ds._standardize(Xt, Xv, Xs)
    return (Xt, yt), (Xv, yv), (Xs, ys)


# ----------------------------------------------------------------------------------------------
# The problems.
# ----------------------------------------------------------------------------------------------


def data_cleaning(
    source: str = "digits",
    *,
    corruption: float = 0.5,
    n_train: int | None = None,
    n_val: int | None = None,
    path: str | os.PathLike | None = None,
    seed: int = 0,
    ridge: float = 0.2,
    dtype=None,
) -> BenchProblem:
    """Data cleaning: learn one weight per training row to ignore the corrupted labels.

    benchmark_bilevel's `datacleaning` problem. A share `corruption` of the training rows
    get a label drawn uniformly from all the classes (so about one in ten of them keeps its
    true label); validation and test rows are clean. The model is a linear softmax
    classifier `params = (W, b)`, `W` of shape `(features, classes)`, and the
    hyperparameters `λ` hold one value per training row:

        L_T((W, b), λ) = mean_{i ∈ batch} σ(λ_{idx_i}) CE(W x_i + b, y_i) + ridge (‖W‖² + ‖b‖²)
        L_V((W, b))    = mean_{j ∈ batch} CE(W x_j + b, y_j)

    with `σ` the logistic sigmoid and `CE` the softmax cross-entropy. The ridge convention
    is benchmark_bilevel's: `ridge · ‖θ‖²` (no ½), with `ridge = 0.2`; the benchmark's model
    has no intercept, here the intercept `b` is penalised like `W` so that the inner problem
    stays strongly convex (softmax logits are invariant to a common shift). Each training
    row carries its own index `idx_i`, so the inner loss of any subset of rows picks the
    right `λ`s and is an unbiased estimate of the full one.

    `source="mnist"` reads `bilevel.datasets.mnist(path)` and takes, as the benchmark does,
    20,000 training and 5,000 validation rows (from `x_train`) and all of `x_test` for the
    test set; `source="digits"` (bundled) uses `bilevel.datasets.digits()`'s split, 899 /
    449 / 449 rows. Features are standardised with training statistics.

    **Arguments:**

    - `source`: `"digits"` or `"mnist"`.
    - `corruption`: the share of training rows whose label is redrawn, in `[0, 1]`
      (`round(corruption · n_train)` rows exactly; the benchmark uses 0.5, 0.7 and 0.9).
    - `n_train`, `n_val`: training and validation rows; `None` for the defaults above.
    - `path`: the MNIST `.npz` file (required for `"mnist"`, not allowed for `"digits"`).
    - `seed`: non-negative int seeding the split and the corruption.
    - `ridge`: the ridge coefficient, `> 0`.
    - `dtype`: a floating dtype for the features and parameters; `None` is float64 under
      `jax_enable_x64`, float32 otherwise.

    **Returns:**

    A `BenchProblem`: `inner_data = (X, y, idx)` (labels int32, `idx = arange(n_train)`),
    `outer_data = (X_val, y_val)`, `test_data = (X_test, y_test)`, `hparams0 = zeros(n_train)`
    (every weight ½), `params0 = (W, b)` zeros, `metric(params)` the test error and
    `corrupted` the mask of redrawn rows.

    **Example:**

    ```python
    import jax
    import bilevel as bl

    bench = bl.datasets.data_cleaning("digits", corruption=0.5, n_train=200, n_val=100)
    X, y, idx = bench.inner_data
    print(X.shape, bench.corrupted.mean())          # (200, 64) 0.5
    rows = jax.tree.map(lambda a: a[:32], bench.inner_data)   # a minibatch of rows
    loss = jax.jit(bench.problem.inner)(bench.params0, bench.hparams0, rows)
    print(float(bench.metric(bench.params0)))       # test error of the zero model, ~0.9
    ```

    Hypergradients come from `bilevel.hypergrad` as for any problem; see the example of
    `logreg_per_feature`.
    """
    where = ("bilevel.datasets.data_cleaning(source, corruption=..., n_train=..., n_val=..., "
             "path=..., seed=..., ridge=...)")
    _check_source(source, path, where)
    corruption = _check_unit_interval(corruption, "corruption", where)
    ridge = _check_positive(ridge, "ridge", where, 0.2)
    dt = _resolve_dtype(dtype, where)
    (Xt, yt), (Xv, yv), (Xs, ys) = _load(source, path, n_train, n_val, seed, where)
    n, classes = len(Xt), 10
    rng = np.random.default_rng([int(seed), 1])  # a stream apart from the split's
    rows = rng.choice(n, size=round(corruption * n), replace=False)
    corrupted = np.zeros(n, bool)
    corrupted[rows] = True
    yt = np.array(yt, np.int32)
    yt[rows] = rng.integers(0, classes, size=len(rows))
    as_x, as_y = (lambda X: jnp.asarray(X, dt)), (lambda y: jnp.asarray(y, jnp.int32))
    params0 = (jnp.zeros((Xt.shape[1], classes), dt), jnp.zeros(classes, dt))
    return BenchProblem(
        problem=_cleaning_problem(ridge),
        inner_data=(as_x(Xt), as_y(yt), jnp.arange(n, dtype=jnp.int32)),
        outer_data=(as_x(Xv), as_y(yv)),
        test_data=(as_x(Xs), as_y(ys)),
        hparams0=jnp.zeros(n, dt),
        params0=params0,
        metric=jax.tree_util.Partial(_softmax_error, as_x(Xs), as_y(ys)),
        corrupted=corrupted,
        name=f"data_cleaning/{source}",
    )


def logreg_per_feature(
    source: str = "digits",
    *,
    n_train: int | None = None,
    n_val: int | None = None,
    path: str | os.PathLike | None = None,
    seed: int = 0,
    dtype=None,
) -> BenchProblem:
    """Binary logistic regression with one ridge penalty per feature (even vs odd digits).

    benchmark_bilevel's `logreg` oracle with `reg='exp'` and one hyperparameter per
    feature (`n_reg='full'`, as for its ijcnn1 and covtype datasets):

        L_T(w, λ) = mean_{i ∈ batch} −log σ(y_i x_iᵀw) + ½ Σ_j e^{λ_j} w_j²
        L_V(w)    = mean_{j ∈ batch} −log σ(y_j x_jᵀw)

    with labels `y = +1` for even digits and `y = −1` for odd ones, no intercept (as in the
    benchmark), and the benchmark's penalty convention `½ e^{λ_j} w_j²`. The inner problem is
    strongly convex for every λ. The rows and sizes are those of `data_cleaning` (digits:
    899 / 449 / 449; MNIST: 20,000 / 5,000 / all of `x_test`), standardised with training
    statistics; pixels constant on the training rows become zero features, whose weight
    is 0 and hypergradient 0.

    **Arguments:**

    - `source`: `"digits"` or `"mnist"`.
    - `n_train`, `n_val`: training and validation rows; `None` for the defaults above.
    - `path`: the MNIST `.npz` file (required for `"mnist"`, not allowed for `"digits"`).
    - `seed`: non-negative int seeding the split.
    - `dtype`: a floating dtype; `None` is float64 under `jax_enable_x64`, float32
      otherwise.

    **Returns:**

    A `BenchProblem`: `inner_data = (X, y)` with `y ∈ {−1, +1}` in `dtype`, likewise
    `outer_data` and `test_data`, `hparams0 = zeros(features)` (every penalty 1),
    `params0 = zeros(features)`, `metric(w)` the test error of the classifier
    `sign(xᵀw)` (0 counts as odd) and `corrupted = None`.

    **Example:**

    ```python
    import jax
    import optax
    import bilevel as bl

    bench = bl.datasets.logreg_per_feature("digits", n_train=200, n_val=100)
    method = bl.implicit(bl.unroll(optax.sgd(0.5), steps=100), bl.cg(maxiter=20))
    hypergrad = jax.jit(bl.hypergrad(bench.problem, method))
    out = hypergrad(bench.hparams0, bench.params0, bench.inner_data, bench.outer_data)
    print(out.grad.shape, float(bench.metric(out.params)) < 0.5)   # (64,) True
    ```
    """
    where = ("bilevel.datasets.logreg_per_feature(source, n_train=..., n_val=..., path=..., "
             "seed=...)")
    _check_source(source, path, where)
    dt = _resolve_dtype(dtype, where)
    splits = _load(source, path, n_train, n_val, seed, where)
    (Xt, yt), (Xv, yv), (Xs, ys) = (
        (jnp.asarray(X, dt), jnp.asarray(np.where(y % 2 == 0, 1.0, -1.0), dt)) for X, y in splits
    )
    d = Xt.shape[1]
    return BenchProblem(
        problem=_LOGREG_PROBLEM,
        inner_data=(Xt, yt),
        outer_data=(Xv, yv),
        test_data=(Xs, ys),
        hparams0=jnp.zeros(d, dt),
        params0=jnp.zeros(d, dt),
        metric=jax.tree_util.Partial(_binary_error, Xs, ys),
        corrupted=None,
        name=f"logreg_per_feature/{source}",
    )
