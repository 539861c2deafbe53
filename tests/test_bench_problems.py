"""benchmark_bilevel's three problems: `bilevel.testing.BilevelQuadratic` against a dense NumPy
IFT solve, finite differences and the library's own implicit hypergradient; the data-cleaning
and per-feature logistic-regression problems of `bilevel.datasets` (shapes, corruption, losses
as means over rows, the σ(λ) weights, conventions, metrics, argument errors); docstrings."""

import functools
import inspect
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from scipy.special import expit, logsumexp

import bilevel as bl
import bilevel.testing as blt
import bilevel.testing.strategies as bst

REAL_MNIST = Path(__file__).parents[2] / "shared" / "data" / "mnist.npz"
needs_mnist = pytest.mark.skipif(not REAL_MNIST.is_file(), reason=f"no {REAL_MNIST}")

KEYS = ("hess_params", "hess_hparams", "cross", "lin_params", "lin_hparams")


pytestmark = pytest.mark.usefixtures("quick_compilation")   # tests/conftest.py


def _rows(batch, idx):
    return jax.tree.map(lambda x: x[idx], batch)


@functools.partial(jax.jit, static_argnums=0)
def _per_row_mean_and_full(loss, params, hparams, batch):
    """(the mean of each row's loss on its own one-row batch, the loss of the whole batch)."""
    one_row = jax.tree.map(lambda x: x[:, None], batch)
    per_row = jax.vmap(lambda row: loss(params, hparams, row))(one_row)
    return jnp.mean(per_row), loss(params, hparams, batch)


# ----------------------------------------------------------------------------- quadratic


@pytest.fixture(scope="module")
def quad():
    # the shapes of the docstring examples (compiled once for all); the strategy test below
    # covers n_samples < p + q, where each sample's joint Hessian has rank above one
    return blt.BilevelQuadratic.sample(3, dim_inner=4, dim_outer=3, n_samples=16,
                                       max_condition=8.0)


def _dense_reference(exact, lam):
    """w*, ∇h, the H⁻¹ ≈ I formula and ∇²h from NumPy means of the rows (no JAX, no autodiff)."""
    i = {k: np.asarray(v).mean(axis=0) for k, v in exact.inner_batch.items()}
    o = {k: np.asarray(v).mean(axis=0) for k, v in exact.outer_batch.items()}
    p, q = i["lin_params"].size, i["lin_hparams"].size
    # stationarity of the inner quadratic: A w + Cᵀλ + a = 0
    w = np.linalg.solve(i["hess_params"], -i["lin_params"] - i["cross"].T @ lam)
    gw = o["hess_params"] @ w + o["cross"].T @ lam + o["lin_params"]
    glam = o["hess_hparams"] @ lam + o["cross"] @ w + o["lin_hparams"]
    # the IFT as one dense block solve: [A Cᵀ; C 0]-free form, v = A⁻¹ ∂_wL_V
    v = np.linalg.solve(i["hess_params"], gw)
    grad = glam - i["cross"] @ v
    ident = glam - i["cross"] @ gw
    J = -np.linalg.solve(i["hess_params"], i["cross"].T)
    joint = np.block([[o["hess_params"], o["cross"].T], [o["cross"], o["hess_hparams"]]])
    JI = np.vstack([J, np.eye(q)])
    assert JI.shape == (p + q, q)
    return w, grad, ident, JI.T @ joint @ JI, i["hess_params"]


def test_quadratic_closed_forms_match_a_dense_numpy_ift(quad):
    lam = np.array([0.4, -1.3, 0.7])
    w, grad, ident, value_hess, hess = _dense_reference(quad, lam)
    np.testing.assert_allclose(quad.response(lam), w, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(quad.hypergrad(lam), grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(quad.identity_hypergrad(lam), ident, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(quad.value_hessian(), value_hess, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(quad.hessian(lam), hess, rtol=1e-12, atol=1e-14)
    # w* zeroes the full-data inner gradient (autodiff of the loss, an independent check)
    g = jax.jit(jax.grad(quad.problem.inner))(quad.response(lam), jnp.asarray(lam),
                                              quad.inner_batch)
    assert float(jnp.max(jnp.abs(g))) < 1e-12


def test_quadratic_hypergrad_matches_central_differences_of_the_value(quad):
    lam, step = np.array([0.2, 0.5, -0.8]), 1e-3
    eye = np.eye(3)
    fd = [(quad.value(lam + step * e) - quad.value(lam - step * e)) / (2 * step) for e in eye]
    np.testing.assert_allclose(quad.hypergrad(lam), np.array(fd), rtol=1e-8, atol=1e-10)
    # ∇h is affine in λ with slope ∇²h
    cols = [quad.hypergrad(lam + e) - quad.hypergrad(lam) for e in eye]
    np.testing.assert_allclose(np.stack(cols, axis=1), quad.value_hessian(), atol=1e-10)


def test_quadratic_library_hypergrad_agrees(quad):
    closed_form = bl.solver(lambda lam, w0, batch: quad.response(lam))
    method = bl.implicit(closed_form, bl.exact())
    lam = jnp.array([-0.3, 0.9, 0.1])
    # hypergrad_error runs bl.hypergrad(quad.problem, method) on quad's batches (here under jit)
    grad, _, error = jax.jit(lambda lam: blt.hypergrad_error(method, quad, lam)[:3])(lam)
    assert float(error) < 1e-10
    np.testing.assert_allclose(grad, _dense_reference(quad, np.asarray(lam))[1], rtol=1e-10,
                               atol=1e-12)


def test_quadratic_minibatch_means_are_unbiased(quad):
    w, lam = jnp.linspace(-1.0, 1.0, 4), jnp.array([0.3, -0.2, 0.5])
    value_and_grads = jax.value_and_grad(quad.problem.inner, argnums=(0, 1))

    @jax.jit
    def check(batch):
        one_row = jax.tree.map(lambda x: x[:, None], batch)  # 16 batches of one row
        quarters = jax.tree.map(lambda x: x.reshape((4, 4) + x.shape[1:]), batch)  # 4 of four
        rows = jax.vmap(lambda b: quad.problem.inner(w, lam, b))(one_row)
        parts = jax.vmap(lambda b: value_and_grads(w, lam, b))(quarters)
        return jnp.mean(rows), jax.tree.map(lambda x: jnp.mean(x, axis=0), parts), \
            value_and_grads(w, lam, batch)

    row_mean, part_mean, full = check(quad.inner_batch)
    np.testing.assert_allclose(row_mean, full[0], rtol=1e-13)
    for got, want in zip(jax.tree.leaves(part_mean), jax.tree.leaves(full)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    mean, full = _per_row_mean_and_full(quad.problem.outer, w, lam, quad.outer_batch)
    np.testing.assert_allclose(mean, full, rtol=1e-13)


def test_quadratic_optimum_is_unique_and_stationary(quad):
    lam_star = quad.optimal_hparams()
    assert float(jnp.max(jnp.abs(quad.hypergrad(lam_star)))) < 1e-10
    eigs = np.linalg.eigvalsh(quad.value_hessian())
    assert 1 / 8.0 - 1e-12 <= eigs.min() and eigs.max() <= 9.0 + 1e-12  # I/κ <= ∇²h <= (1+κ)I
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert quad.value(lam_star) < quad.value(lam_star + 0.1 * rng.standard_normal(3))


def test_quadratic_sample_structure(quad):
    inner = quad.inner_batch
    assert {k: v.shape for k, v in inner.items()} == {
        "hess_params": (16, 4, 4), "hess_hparams": (16, 3, 3), "cross": (16, 3, 4),
        "lin_params": (16, 4), "lin_hparams": (16, 3)}
    assert quad.outer_batch["lin_params"].shape == (16, 4)
    for data in (quad.inner_batch, quad.outer_batch):
        joint = np.block([[np.asarray(data["hess_params"]), np.swapaxes(data["cross"], 1, 2)],
                          [np.asarray(data["cross"]), np.asarray(data["hess_hparams"])]])
        ranks = [np.linalg.matrix_rank(h, tol=1e-9) for h in joint]
        assert ranks == [1] * 16  # rank ⌈(p + q)/n⌉ = 1, as in benchmark_bilevel
        assert np.all(np.linalg.eigvalsh(joint) >= -1e-12)  # every sample PSD
    eig_A = np.linalg.eigvalsh(quad.hessian(quad.hparams))
    assert eig_A.min() >= 1 / 8.0 - 1e-12 and eig_A.max() <= 1.0 + 1e-12


def test_quadratic_under_jit_and_vmap(quad):
    lams = jnp.stack([jnp.zeros(3), jnp.ones(3), -jnp.ones(3)])
    got = jax.jit(jax.vmap(quad.hypergrad))(lams)
    want = np.stack([_dense_reference(quad, np.asarray(lam))[1] for lam in lams])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_quadratic_float32():
    exact = blt.BilevelQuadratic.sample(0, dim_inner=4, dim_outer=3, n_samples=16,
                                        dtype=jnp.float32)
    assert exact.dtype == jnp.float32 and exact.inner_batch["cross"].dtype == jnp.float32
    out = jax.eval_shape(exact.hypergrad, exact.hparams)  # traced, not compiled
    assert out.dtype == jnp.float32 and out.shape == (3,)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dim_inner=0), ValueError, "dim_inner >= 1"),
    (dict(dim_outer=2.0), TypeError, "integer dim_outer"),
    (dict(n_samples=0), ValueError, "n_samples >= 1"),
    (dict(n_samples_outer=-1), ValueError, "n_samples_outer >= 1"),
    (dict(max_condition=0.5), ValueError, "max_condition >= 1.0"),
    (dict(lam=np.zeros(4)), ValueError, r"shape \(3,\)"),
    (dict(lam=np.inf), ValueError, "finite"),
    (dict(dtype=jnp.int32), TypeError, "floating dtype"),
])
def test_quadratic_sample_rejects_bad_arguments(kwargs, error, match):
    kwargs = dict(dict(dim_inner=2, dim_outer=3), **kwargs)
    with pytest.raises(error, match=match):
        blt.BilevelQuadratic.sample(0, **kwargs)
    with pytest.raises(ValueError, match="seed >= 0"):
        blt.BilevelQuadratic.sample(-1)


def test_quadratic_constructor_checks(quad):
    inner = {k: np.asarray(v) for k, v in quad.inner_batch.items()}
    outer = {k: np.asarray(v) for k, v in quad.outer_batch.items()}
    with pytest.raises(TypeError, match="dict with keys"):
        blt.BilevelQuadratic({k: inner[k] for k in KEYS[:4]}, outer)
    with pytest.raises(ValueError, match=r"hess_params \(n, p, p\)"):
        blt.BilevelQuadratic(dict(inner, cross=inner["cross"][:, :2]), outer)
    with pytest.raises(ValueError, match="symmetric"):
        asym = inner["hess_params"].copy()
        asym[:, 0, 1] += 1.0
        blt.BilevelQuadratic(dict(inner, hess_params=asym), outer)
    with pytest.raises(ValueError, match="symmetric positive definite"):
        blt.BilevelQuadratic(dict(inner, hess_params=-inner["hess_params"]), outer)
    with pytest.raises(ValueError, match=r"hparams of shape \(3,\)"):
        quad.hypergrad(jnp.zeros(2))
    rebuilt = blt.BilevelQuadratic(inner, outer, lam=1.5)
    np.testing.assert_array_equal(rebuilt.hparams, jnp.full(3, 1.5))


@settings(max_examples=5, deadline=None)
@given(bst.bilevel_quadratic_problems(min_dim=2, max_dim=2, min_samples=3, max_samples=3,
                                      max_condition=5.0))
def test_strategy_draws_strongly_convex_problems(exact):
    # one shape for every example (one compilation), with fewer samples than p + q = 4
    assert exact.inner_batch["cross"].shape == exact.outer_batch["cross"].shape == (3, 2, 2)
    joint = np.block([[np.asarray(exact.inner_batch["hess_params"]),
                       np.swapaxes(exact.inner_batch["cross"], 1, 2)],
                      [np.asarray(exact.inner_batch["cross"]),
                       np.asarray(exact.inner_batch["hess_hparams"])]])
    assert [np.linalg.matrix_rank(h, tol=1e-9) for h in joint] == [2, 2, 2]  # ⌈4 / 3⌉
    assert np.all(np.linalg.eigvalsh(joint) >= -1e-12)
    lam = np.asarray(exact.hparams)
    assert np.all(lam == lam[0]) and -2.0 <= lam[0] <= 2.0
    _, grad, _, value_hess, hess = _dense_reference(exact, np.asarray(exact.optimal_hparams()))
    assert np.max(np.abs(grad)) < 1e-9
    assert np.linalg.eigvalsh(value_hess).min() >= 1 / 5.0 - 1e-10
    assert np.linalg.cond(hess) <= 5.0 + 1e-9


def test_strategy_rejects_bad_settings():
    with pytest.raises(ValueError, match="min_samples <= max_samples"):
        bst.bilevel_quadratic_problems(min_samples=5, max_samples=2)
    with pytest.raises(ValueError, match="max_dim >= 1"):
        bst.bilevel_quadratic_problems(max_dim=0)


# ----------------------------------------------------------------------------- data cleaning


@pytest.fixture(scope="module")
def cleaning():
    return bl.datasets.data_cleaning("digits", corruption=0.5, n_train=120, n_val=60, seed=1)


def test_data_cleaning_shapes_and_starting_point(cleaning):
    X, y, idx = cleaning.inner_data
    assert X.shape == (120, 64) and y.shape == (120,) and y.dtype == jnp.int32
    np.testing.assert_array_equal(idx, np.arange(120))
    assert cleaning.outer_data[0].shape == (60, 64) and cleaning.test_data[0].shape == (449, 64)
    assert cleaning.hparams0.shape == (120,) and not np.any(cleaning.hparams0)
    W, b = cleaning.params0
    assert W.shape == (64, 10) and b.shape == (10,) and X.dtype == W.dtype == jnp.float64
    assert cleaning.corrupted.shape == (120,) and cleaning.corrupted.dtype == bool
    assert "name='data_cleaning/digits'" in repr(cleaning) and "(120, 64)" in repr(cleaning)
    # the zero model predicts class 0 everywhere: its test error is the share of other labels
    # the metric is a pytree (a Partial holding the test set): it can be a jit argument
    evaluate = jax.jit(lambda metric, params: metric(params))
    ys = np.asarray(cleaning.test_data[1])
    assert float(evaluate(cleaning.metric, cleaning.params0)) == pytest.approx(np.mean(ys != 0))
    b = jnp.zeros(10).at[3].set(1.0)  # W = 0: predicts class 3 everywhere
    assert float(evaluate(cleaning.metric, (jnp.zeros((64, 10)), b))) == pytest.approx(np.mean(ys != 3))


@pytest.mark.parametrize("corruption", [0.0, 0.3, 1.0])
def test_data_cleaning_corrupts_the_share_asked(corruption):
    bench = bl.datasets.data_cleaning(corruption=corruption, n_train=200, n_val=20, seed=2)
    clean = bl.datasets.data_cleaning(corruption=0.0, n_train=200, n_val=20, seed=2)
    assert bench.corrupted.sum() == round(corruption * 200)
    changed = np.asarray(bench.inner_data[1]) != np.asarray(clean.inner_data[1])
    assert not np.any(changed & ~bench.corrupted)  # only redrawn rows may differ
    if corruption == 1.0:  # uniform over 10 classes: about 9 in 10 redrawn labels are wrong
        assert 0.8 < changed.mean() < 0.98
    np.testing.assert_array_equal(bench.outer_data[1], clean.outer_data[1])  # val stays clean
    np.testing.assert_array_equal(bench.inner_data[0], clean.inner_data[0])


def _numpy_cleaning_loss(params, lam, X, y, ridge=0.2):
    W, b = (np.asarray(p) for p in params)
    logits = np.asarray(X) @ W + b
    ce = logsumexp(logits, axis=1) - logits[np.arange(len(y)), np.asarray(y)]
    return np.mean(expit(np.asarray(lam)) * ce) + ridge * (np.sum(W**2) + np.sum(b**2))


def test_data_cleaning_inner_loss_is_a_mean_over_rows(cleaning):
    rng = np.random.default_rng(0)
    params = (jnp.asarray(rng.normal(size=(64, 10)) * 0.1), jnp.asarray(rng.normal(size=10)))
    lam = jnp.asarray(rng.normal(size=120))
    inner = jax.jit(cleaning.problem.inner)
    full = inner(params, lam, cleaning.inner_data)
    # benchmark_bilevel's convention, written out: mean σ(λ_i) CE_i + 0.2 (‖W‖² + ‖b‖²)
    assert float(full) == pytest.approx(_numpy_cleaning_loss(params, lam, *cleaning.inner_data[:2]),
                                        rel=1e-12)
    mean, full_again = _per_row_mean_and_full(cleaning.problem.inner, params, lam,
                                              cleaning.inner_data)
    np.testing.assert_allclose(mean, full_again, rtol=1e-13)
    # a shuffled minibatch picks its rows' own λ through idx
    rows = rng.permutation(120)[:17]
    sub = _rows(cleaning.inner_data, rows)
    assert float(inner(params, lam, sub)) == pytest.approx(
        _numpy_cleaning_loss(params, np.asarray(lam)[rows], *sub[:2]), rel=1e-12)
    outer = jax.jit(cleaning.problem.outer)(params, lam, cleaning.outer_data)
    assert float(outer) == pytest.approx(
        _numpy_cleaning_loss(params, np.full(60, 50.0), *cleaning.outer_data, ridge=0.0), rel=1e-12)


def test_data_cleaning_weights_are_sigmoid_of_lambda(cleaning):
    params = (jnp.full((64, 10), 0.01), jnp.arange(10.0) / 10)
    X, y, idx = cleaning.inner_data
    drop = np.arange(120) % 3 == 0
    lam = jnp.where(drop, -1e3, 2.0)  # σ(-1000) = 0: those rows contribute nothing
    value_and_grad = jax.jit(jax.value_and_grad(cleaning.problem.inner))
    loss, g = value_and_grad(params, lam, cleaning.inner_data)
    # whatever the dropped rows hold, the loss and its gradient are the same
    loss2, g2 = value_and_grad(params, lam, (X.at[drop].set(123.0), y.at[drop].set(7), idx))
    assert float(loss2) == float(loss)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(a, b)
    # ... and the loss is the kept rows' weighted mean, scaled by their share of the batch
    penalty = 0.2 * sum(float(jnp.sum(p**2)) for p in params)
    keep = ~drop
    kept_loss = _numpy_cleaning_loss(params, np.asarray(lam)[keep], np.asarray(X)[keep],
                                     np.asarray(y)[keep])
    assert float(loss) == pytest.approx(keep.mean() * (kept_loss - penalty) + penalty, rel=1e-12)
    # λ → +∞ gives weight 1: the plain cross-entropy plus the ridge
    full = _numpy_cleaning_loss(params, np.full(120, 50.0), X, y)
    assert float(value_and_grad(params, jnp.full(120, 1e3), cleaning.inner_data)[0]) == \
        pytest.approx(full, rel=1e-12)


def test_data_cleaning_hypergrad_pushes_corrupted_rows_down():
    bench = bl.datasets.data_cleaning(corruption=0.5, n_train=100, n_val=80, seed=0)
    method = bl.implicit(bl.unroll(optax.sgd(0.2), steps=300), bl.cg(maxiter=100, tol=1e-10))
    out = jax.jit(bl.hypergrad(bench.problem, method))(
        bench.hparams0, bench.params0, bench.inner_data, bench.outer_data)
    assert float(out.stats["inner_grad_norm"]) < 1e-8
    g = np.asarray(out.grad)
    # raising a corrupted row's weight hurts validation (positive hypergradient) on average
    assert g[bench.corrupted].mean() > 0 > g[~bench.corrupted].mean()
    assert float(bench.metric(out.params)) < 0.5


# ----------------------------------------------------------------------------- logreg


@pytest.fixture(scope="module")
def logreg():
    return bl.datasets.logreg_per_feature("digits", n_train=150, n_val=70, seed=4)


def test_logreg_shapes_labels_and_metric(logreg):
    X, y = logreg.inner_data
    assert X.shape == (150, 64) and logreg.hparams0.shape == logreg.params0.shape == (64,)
    assert logreg.corrupted is None and logreg.name == "logreg_per_feature/digits"
    digits = bl.datasets.digits(seed=4)
    np.testing.assert_array_equal(y, np.where(digits.train[1][:150] % 2 == 0, 1.0, -1.0))
    np.testing.assert_array_equal(logreg.test_data[1], np.where(digits.test[1] % 2 == 0, 1, -1))
    # the zero model says "odd" everywhere: its test error is the share of even digits
    ys = np.asarray(logreg.test_data[1])
    assert float(logreg.metric(logreg.params0)) == pytest.approx(np.mean(ys > 0))


def test_logreg_losses_follow_the_benchmark_convention(logreg):
    rng = np.random.default_rng(1)
    w, lam = rng.normal(size=64) * 0.1, rng.normal(size=64)
    X, y = (np.asarray(a) for a in logreg.inner_data)
    want = np.mean(np.logaddexp(0, -y * (X @ w))) + 0.5 * np.sum(np.exp(lam) * w**2)
    inner = jax.jit(logreg.problem.inner)
    full = inner(w, lam, logreg.inner_data)
    assert float(full) == pytest.approx(want, rel=1e-12)
    mean, full_again = _per_row_mean_and_full(logreg.problem.inner, jnp.asarray(w),
                                              jnp.asarray(lam), logreg.inner_data)
    np.testing.assert_allclose(mean, full_again, rtol=1e-13)
    Xv, yv = (np.asarray(a) for a in logreg.outer_data)
    assert float(jax.jit(logreg.problem.outer)(w, lam, logreg.outer_data)) == pytest.approx(
        np.mean(np.logaddexp(0, -yv * (Xv @ w))), rel=1e-12)


def test_logreg_hypergrad_matches_a_dense_ift(logreg):
    method = bl.implicit(bl.unroll(optax.sgd(0.5), steps=400), bl.exact())
    lam = jnp.full(64, -1.0)
    out = jax.jit(bl.hypergrad(logreg.problem, method))(lam, logreg.params0, logreg.inner_data,
                                                         logreg.outer_data)
    w = np.asarray(out.params)
    X, y = (np.asarray(a) for a in logreg.inner_data)
    Xv, yv = (np.asarray(a) for a in logreg.outer_data)
    s = expit(y * (X @ w))
    grad_inner = -X.T @ (y * (1 - s)) / len(y) + np.exp(lam) * w
    assert np.max(np.abs(grad_inner)) < 1e-8
    H = X.T @ (X * (s * (1 - s))[:, None]) / len(y) + np.diag(np.exp(lam))
    gv = -Xv.T @ (yv * (1 - expit(yv * (Xv @ w)))) / len(yv)
    want = -np.exp(lam) * w * np.linalg.solve(H, gv)  # ∂²L_T/∂λ_j∂w = e^{λ_j} w_j e_j
    np.testing.assert_allclose(out.grad, want, rtol=1e-7, atol=1e-12)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [bl.datasets.data_cleaning, bl.datasets.logreg_per_feature])
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(source="cifar"), ValueError, "knows the sources"),
    (dict(source="digits", path="x.npz"), ValueError, "takes no path"),
    (dict(source="mnist"), ValueError, "requires the MNIST .npz"),
    (dict(source="mnist", path=3), TypeError, "str or os.PathLike"),
    (dict(source="mnist", path="/nonexistent/mnist.npz"), FileNotFoundError, "found no file"),
    (dict(n_train=5000), ValueError, "n_train <= 899"),
    (dict(n_val=450), ValueError, "n_val <= 449"),
    (dict(n_train=0), ValueError, "n_train` >= 1"),
    (dict(n_val=2.5), TypeError, "n_val"),
    (dict(seed=-1), ValueError, "seed` >= 0"),
    (dict(dtype=jnp.int32), TypeError, "floating dtype"),
])
def test_bad_arguments_raise(fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(corruption=1.5), ValueError, r"0 <= corruption <= 1"),
    (dict(corruption="half"), TypeError, "corruption"),
    (dict(corruption=True), TypeError, "corruption"),
    (dict(ridge=0.0), ValueError, "ridge` > 0"),
    (dict(ridge=None), TypeError, "ridge"),
])
def test_data_cleaning_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        bl.datasets.data_cleaning(**kwargs)


@needs_mnist
def test_mnist_sizes_follow_the_benchmark():
    bench = bl.datasets.data_cleaning("mnist", path=REAL_MNIST, corruption=0.7, seed=32)
    assert bench.inner_data[0].shape == (20_000, 784) and bench.outer_data[0].shape == (5_000, 784)
    assert bench.test_data[0].shape == (10_000, 784) and bench.corrupted.sum() == 14_000


# ----------------------------------------------------------------------------- docs


DOCUMENTED = [blt.BilevelQuadratic, blt.BilevelQuadratic.sample, blt.BilevelQuadratic.value_hessian,
              blt.BilevelQuadratic.optimal_hparams, bst.bilevel_quadratic_problems,
              bl.datasets.BenchProblem, bl.datasets.data_cleaning, bl.datasets.logreg_per_feature]


def _examples():
    for obj in DOCUMENTED:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", inspect.getdoc(obj), re.S)):
            yield pytest.param(block, id=f"{obj.__qualname__}-{i}")


@pytest.mark.parametrize("code", list(_examples()))
def test_docstring_examples_run(code):
    exec(compile(code, "<docstring>", "exec"), {})


def test_public_names_are_documented():
    for obj in DOCUMENTED:
        doc = inspect.getdoc(obj)
        assert "**Example:**" in doc, obj
        if inspect.isfunction(obj) and len(inspect.signature(obj).parameters) > 1:
            assert "**Arguments:**" in doc and "**Returns:**" in doc, obj
    for name in ("response", "hessian", "hypergrad", "identity_hypergrad"):
        assert inspect.getdoc(getattr(blt.BilevelQuadratic, name)), name
    assert "BilevelQuadratic" in blt.__doc__
    for name in ("BenchProblem", "data_cleaning", "logreg_per_feature"):
        assert getattr(bl.datasets, name) is getattr(bl._bench_problems, name)
    api = (Path(__file__).parents[1] / "docs" / "api.md").read_text(encoding="utf-8")
    for name in ("bilevel.testing.BilevelQuadratic", "bilevel.testing.strategies.bilevel_quadratic_problems",
                 "bilevel.datasets.data_cleaning", "bilevel.datasets.logreg_per_feature",
                 "bilevel.datasets.BenchProblem"):
        assert f"::: {name}\n" in api, name
