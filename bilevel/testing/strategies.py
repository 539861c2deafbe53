"""Hypothesis strategies drawing exact bilevel problems at random within a conditioning bound.

Each strategy draws an integer seed and the sizes with `hypothesis.strategies.integers` (so
failures shrink to small problems), the default hyperparameters with
`hypothesis.strategies.floats`, and builds the instance with the class's `sample`
constructor. Dimensions default to 2..8 so that property tests stay fast.

This module needs `hypothesis` (`pip install bilevel[testing]`); `bilevel.testing` does not.

**Example:**

```python
from hypothesis import given, settings
import bilevel.testing.strategies as bst

@settings(max_examples=5, deadline=None)
@given(bst.ridge_problems(max_dim=4))
def test_value_is_nonnegative(exact):
    assert exact.value(exact.hparams) >= 0

test_value_is_nonnegative()
```
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import strategies as st

from ._affine import AffineResponse
from ._bench_quadratic import BilevelQuadratic
from ._meta_tasks import QuadraticTasks
from ._common import check_int, check_range, check_real, resolve_dtype
from ._constrained import BoxQP
from ._quadratic004 import Quadratic004
from ._ridge import Ridge, RidgePerCoordinate
from ._sparse import ElasticNet, Lasso
from ._unrolled import UnrolledQuadratic

_SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def _check_common(where, min_dim, max_dim, max_condition, hparams_range, above, dtype):
    """Validate the shared strategy settings eagerly (at build time, not at draw time)."""
    min_dim = check_int(min_dim, "min_dim", where, 1, 2)
    max_dim = check_int(max_dim, "max_dim", where, 1, 8)
    if max_dim < min_dim:
        raise ValueError(
            f"{where} requires min_dim <= max_dim; got min_dim={min_dim}, max_dim={max_dim}. "
            "Raise max_dim or lower min_dim."
        )
    check_real(max_condition, "max_condition", where, low=1.0, strict=False, example=10.0)
    check_range(hparams_range, "hparams_range", where, above=above, example="(-2.0, 1.0)")
    resolve_dtype(dtype, where)
    return min_dim, max_dim


def _floats_in(bounds) -> st.SearchStrategy[float]:
    lo, hi = (float(b) for b in bounds)
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def _regression_problems(cls, where, min_dim, max_dim, max_condition, hparams_range, dtype):
    min_dim, max_dim = _check_common(where, min_dim, max_dim, max_condition, hparams_range,
                                     -np.inf, dtype)

    @st.composite
    def draw(draw_):
        return cls.sample(
            draw_(_SEEDS), dim=draw_(st.integers(min_dim, max_dim)),
            max_condition=max_condition, log_lam=draw_(_floats_in(hparams_range)), dtype=dtype,
        )

    return draw()


def ridge_problems(
    *, min_dim=2, max_dim=8, max_condition=10.0, hparams_range=(-2.0, 1.0), dtype=None
) -> st.SearchStrategy[Ridge]:
    """Draw [`bilevel.testing.Ridge`][] instances.

    **Arguments:**

    - `min_dim`, `max_dim`: bounds on the number of parameters.
    - `max_condition`: bound `>= 1` on the inner Hessian's condition number (any λ).
    - `hparams_range`: `(low, high)` for the default log-penalty `exact.hparams`.
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `Ridge` instances with `2d` training and `2d` validation rows
    (so that shapes, and compiled functions, repeat across examples).

    **Example:**

    ```python
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.ridge_problems(max_dim=3, max_condition=5.0))
    def test_shape(exact):
        assert exact.hypergrad(exact.hparams).shape == ()

    test_shape()
    ```
    """
    return _regression_problems(Ridge, "ridge_problems", min_dim, max_dim, max_condition,
                                hparams_range, dtype)


def ridge_per_coordinate_problems(
    *, min_dim=2, max_dim=8, max_condition=10.0, hparams_range=(-2.0, 1.0), dtype=None
) -> st.SearchStrategy[RidgePerCoordinate]:
    """Draw [`bilevel.testing.RidgePerCoordinate`][] instances.

    The default hyperparameters are one value drawn from `hparams_range`, repeated over
    the coordinates, so the inner Hessian's condition number is `<= max_condition` there.

    **Arguments:**

    - `min_dim`, `max_dim`: bounds on the number of parameters (and hyperparameters).
    - `max_condition`: bound `>= 1` on the condition number of `XᵀX/n`.
    - `hparams_range`: `(low, high)` for the default log-penalties.
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `RidgePerCoordinate` instances.

    **Example:**

    ```python
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.ridge_per_coordinate_problems(min_dim=3, max_dim=3))
    def test_shape(exact):
        assert exact.hypergrad(exact.hparams).shape == (3,)

    test_shape()
    ```
    """
    return _regression_problems(RidgePerCoordinate, "ridge_per_coordinate_problems", min_dim,
                                max_dim, max_condition, hparams_range, dtype)


def quadratic004_problems(
    *, min_dim=2, max_dim=8, max_condition=10.0, lam_range=(0.2, 0.4),
    hparams_range=(0.0, 1.0), dtype=None,
) -> st.SearchStrategy[Quadratic004]:
    """Draw [`bilevel.testing.Quadratic004`][] instances with λ† in `lam_range`.

    **Arguments:**

    - `min_dim`, `max_dim`: bounds on the dimension.
    - `max_condition`: bound `>= 1` on the inner Hessian's condition number (any λ > −1).
    - `lam_range`: `(low, high)`, `−1 < low <= high`: where the optimum λ† is drawn.
    - `hparams_range`: `(low, high)`, `low > −1`, for the default λ `exact.hparams`.
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `Quadratic004` instances.

    **Example:**

    ```python
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.quadratic004_problems(lam_range=(0.2, 0.4)))
    def test_optimum_in_range(exact):
        assert 0.2 - 1e-9 <= float(exact.optimal_hparams()) <= 0.4 + 1e-9

    test_optimum_in_range()
    ```
    """
    where = "quadratic004_problems"
    min_dim, max_dim = _check_common(where, min_dim, max_dim, max_condition, hparams_range,
                                     -1.0, dtype)
    check_range(lam_range, "lam_range", where, above=-1.0, example="(0.2, 0.4)")

    @st.composite
    def draw(draw_):
        return Quadratic004.sample(
            draw_(_SEEDS), dim=draw_(st.integers(min_dim, max_dim)), lam_range=lam_range,
            max_condition=max_condition, lam=draw_(_floats_in(hparams_range)), dtype=dtype,
        )

    return draw()


def unrolled_quadratic_problems(
    *, min_steps=1, max_steps=30, min_dim=2, max_dim=8, max_condition=10.0,
    hparams_range=(-2.0, 1.0), lr_range=(0.1, 1.9), dtype=None,
) -> st.SearchStrategy[UnrolledQuadratic]:
    """Draw [`bilevel.testing.UnrolledQuadratic`][] instances on which gradient descent is stable.

    The step size is `lr = f / L` with `f` drawn from `lr_range` and
    `L = max(a) + e^λ` the largest eigenvalue of the inner Hessian at the default
    hyperparameters, so gradient descent there contracts when `lr_range` lies in `(0, 2)`.
    Half the draws start from `w0 = 0`, the others from a random `w0`.

    **Arguments:**

    - `min_steps`, `max_steps`: bounds on the number of gradient steps T.
    - `min_dim`, `max_dim`: bounds on the dimension.
    - `max_condition`: bound `>= 1` on the inner Hessian's condition number (any λ).
    - `hparams_range`: `(low, high)` for the default log-penalty.
    - `lr_range`: `(low, high)` with `0 < low <= high`; the step size in units of `1/L`.
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `UnrolledQuadratic` instances.

    **Example:**

    ```python
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.unrolled_quadratic_problems(max_steps=5))
    def test_steps(exact):
        assert 1 <= exact.steps <= 5

    test_steps()
    ```
    """
    where = "unrolled_quadratic_problems"
    min_dim, max_dim = _check_common(where, min_dim, max_dim, max_condition, hparams_range,
                                     -np.inf, dtype)
    min_steps = check_int(min_steps, "min_steps", where, 1, 1)
    max_steps = check_int(max_steps, "max_steps", where, min_steps, 30)
    check_range(lr_range, "lr_range", where, above=0.0, example="(0.1, 1.9)")

    @st.composite
    def draw(draw_):
        exact = UnrolledQuadratic.sample(
            draw_(_SEEDS), dim=draw_(st.integers(min_dim, max_dim)),
            steps=draw_(st.integers(min_steps, max_steps)), max_condition=max_condition,
            log_lam=draw_(_floats_in(hparams_range)), w0_scale=draw_(st.sampled_from([0.0, 1.0])),
            dtype=dtype,
        )
        lipschitz = np.max(np.asarray(exact.a)) + np.exp(float(exact.log_lam))
        lr = draw_(_floats_in(lr_range)) / lipschitz
        return dataclasses.replace(exact, lr=np.asarray(lr, exact.dtype))

    return draw()


def affine_response_problems(
    *, min_dim=2, max_dim=8, min_hparams=1, max_hparams=4, dtype=None
) -> st.SearchStrategy[AffineResponse]:
    """Draw [`bilevel.testing.AffineResponse`][] instances (best response `Aλ + b`).

    **Arguments:**

    - `min_dim`, `max_dim`: bounds on the number of parameters.
    - `min_hparams`, `max_hparams`: bounds on the number of hyperparameters.
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `AffineResponse` instances.

    **Example:**

    ```python
    import jax.numpy as jnp
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.affine_response_problems(max_dim=3, max_hparams=2))
    def test_response_is_affine(exact):
        lam = jnp.ones_like(exact.hparams)
        assert jnp.allclose(exact.response(lam), exact.A @ lam + exact.b)

    test_response_is_affine()
    ```
    """
    where = "affine_response_problems"
    min_dim, max_dim = _check_common(where, min_dim, max_dim, 10.0, (0.0, 1.0), -np.inf, dtype)
    min_k = check_int(min_hparams, "min_hparams", where, 1, 1)
    max_k = check_int(max_hparams, "max_hparams", where, 1, 4)
    if max_k < min_k:
        raise ValueError(
            f"{where} requires min_hparams <= max_hparams; got {min_k} and {max_k}. Raise max_hparams."
        )

    @st.composite
    def draw(draw_):
        return AffineResponse.sample(draw_(_SEEDS), dim=draw_(st.integers(min_dim, max_dim)),
                                     num_hparams=draw_(st.integers(min_k, max_k)), dtype=dtype)

    return draw()


def lasso_problems(
    *, min_dim=2, max_dim=8, max_condition=10.0, hparams_range=(-2.0, 1.0), dtype=None
) -> st.SearchStrategy[Lasso]:
    """Draw [`bilevel.testing.Lasso`][] instances with a non-trivial, stable support.

    The seed, the dimension and the default log-penalty are drawn; the support (30 % to
    70 % of the coordinates, planted by `Lasso.sample` with margins) varies with the seed.

    **Arguments:**

    - `min_dim`, `max_dim`: bounds on the number of parameters.
    - `max_condition`: bound `>= 1` on the condition number of `XᵀX/n`.
    - `hparams_range`: `(low, high)` for the default log-penalty `exact.hparams`.
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `Lasso` instances with `2d` training and `2d` validation rows.

    **Example:**

    ```python
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.lasso_problems(max_dim=4))
    def test_support_is_nontrivial(exact):
        nonzeros = int((exact.signs != 0).sum())
        assert 0 < nonzeros < exact.X.shape[1]

    test_support_is_nontrivial()
    ```
    """
    return _regression_problems(Lasso, "lasso_problems", min_dim, max_dim, max_condition,
                                hparams_range, dtype)


def elastic_net_problems(
    *, min_dim=2, max_dim=8, max_condition=10.0, hparams_range=(-2.0, 1.0), dtype=None
) -> st.SearchStrategy[ElasticNet]:
    """Draw [`bilevel.testing.ElasticNet`][] instances with a non-trivial, stable support.

    Both default log-strengths `(log l1, log l2)` are drawn independently from
    `hparams_range`.

    **Arguments:**

    - `min_dim`, `max_dim`: bounds on the number of parameters.
    - `max_condition`: bound `>= 1` on the condition number of `XᵀX/n`.
    - `hparams_range`: `(low, high)` for each default log-strength.
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `ElasticNet` instances.

    **Example:**

    ```python
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.elastic_net_problems(max_dim=4))
    def test_shape(exact):
        assert exact.hparams.shape == (2,)

    test_shape()
    ```
    """
    where = "elastic_net_problems"
    min_dim, max_dim = _check_common(where, min_dim, max_dim, max_condition, hparams_range,
                                     -np.inf, dtype)

    @st.composite
    def draw(draw_):
        log_lam = (draw_(_floats_in(hparams_range)), draw_(_floats_in(hparams_range)))
        return ElasticNet.sample(draw_(_SEEDS), dim=draw_(st.integers(min_dim, max_dim)),
                                 max_condition=max_condition, log_lam=log_lam, dtype=dtype)

    return draw()


def box_qp_problems(
    *, min_dim=2, max_dim=8, max_condition=10.0, min_hparams=1, max_hparams=3, dtype=None
) -> st.SearchStrategy[BoxQP]:
    """Draw [`bilevel.testing.BoxQP`][] instances, strictly complementary at `λ = 0`.

    The seed, the dimension and the number of hyperparameters are drawn; which coordinates
    are free and which sit at a bound (30 % to 70 % free) varies with the seed.

    **Arguments:**

    - `min_dim`, `max_dim`: bounds on the number of parameters.
    - `max_condition`: bound `>= 1` on the condition number of `Q`.
    - `min_hparams`, `max_hparams`: bounds on the number of hyperparameters.
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `BoxQP` instances.

    **Example:**

    ```python
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.box_qp_problems(max_dim=4))
    def test_some_free_some_at_a_bound(exact):
        assert (exact.active == 0).any() and (exact.active != 0).any()

    test_some_free_some_at_a_bound()
    ```
    """
    where = "box_qp_problems"
    min_dim, max_dim = _check_common(where, min_dim, max_dim, max_condition, (0.0, 1.0),
                                     -np.inf, dtype)
    min_k = check_int(min_hparams, "min_hparams", where, 1, 1)
    max_k = check_int(max_hparams, "max_hparams", where, 1, 3)
    if max_k < min_k:
        raise ValueError(f"{where} requires min_hparams <= max_hparams; got {min_k} and "
                         f"{max_k}. Raise max_hparams.")

    @st.composite
    def draw(draw_):
        return BoxQP.sample(draw_(_SEEDS), dim=draw_(st.integers(min_dim, max_dim)),
                            num_hparams=draw_(st.integers(min_k, max_k)),
                            max_condition=max_condition, dtype=dtype)

    return draw()


def bilevel_quadratic_problems(
    *, min_dim=1, max_dim=6, min_samples=1, max_samples=16, max_condition=10.0,
    hparams_range=(-2.0, 2.0), dtype=None,
) -> st.SearchStrategy[BilevelQuadratic]:
    """Draw [`bilevel.testing.BilevelQuadratic`][] instances (benchmark_bilevel's quadratic).

    The numbers of parameters and of hyperparameters are drawn independently in
    `[min_dim, max_dim]`, and the numbers of inner and outer samples independently in
    `[min_samples, max_samples]`, so some draws have fewer samples than dimensions (each
    sample's Hessian then has rank above one).

    **Arguments:**

    - `min_dim`, `max_dim`: bounds on the numbers of parameters and of hyperparameters.
    - `min_samples`, `max_samples`: bounds on the numbers of inner and of outer samples.
    - `max_condition`: `κ >= 1`: the inner Hessian's condition number is `<= κ` and the
      value function's Hessian lies between `I/κ` and `(1 + κ) I`.
    - `hparams_range`: `(low, high)` for the default hyperparameters (one value, broadcast).
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `BilevelQuadratic` instances.

    **Example:**

    ```python
    import numpy as np
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.bilevel_quadratic_problems(max_dim=3, max_samples=4))
    def test_every_sample_is_convex_in_w(exact):
        A = np.asarray(exact.inner_batch["hess_params"])        # (n, p, p)
        assert np.linalg.eigvalsh(A).min() >= -1e-6

    test_every_sample_is_convex_in_w()
    ```
    """
    where = "bilevel_quadratic_problems"
    min_dim, max_dim = _check_common(where, min_dim, max_dim, max_condition, hparams_range,
                                     -np.inf, dtype)
    min_n = check_int(min_samples, "min_samples", where, 1, 1)
    max_n = check_int(max_samples, "max_samples", where, 1, 16)
    if max_n < min_n:
        raise ValueError(f"{where} requires min_samples <= max_samples; got {min_n} and "
                         f"{max_n}. Raise max_samples or lower min_samples.")

    @st.composite
    def draw(draw_):
        dims, sizes = st.integers(min_dim, max_dim), st.integers(min_n, max_n)
        return BilevelQuadratic.sample(
            draw_(_SEEDS), dim_inner=draw_(dims), dim_outer=draw_(dims),
            n_samples=draw_(sizes), n_samples_outer=draw_(sizes),
            max_condition=max_condition, lam=draw_(_floats_in(hparams_range)), dtype=dtype,
        )

    return draw()


def quadratic_meta_tasks(
    *, min_tasks=1, max_tasks=4, min_dim=1, max_dim=4, max_condition=10.0, dtype=None,
) -> st.SearchStrategy[QuadraticTasks]:
    """Draw [`bilevel.testing.QuadraticTasks`][] batches (quadratic meta-learning tasks).

    **Arguments:**

    - `min_tasks`, `max_tasks`: bounds on the number of tasks.
    - `min_dim`, `max_dim`: bounds on the parameter dimension.
    - `max_condition`: κ >= 1, the bound on every task Hessian's condition number (their
      eigenvalues lie in [1, κ], so gradient descent is stable for rates below 2/κ).
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `QuadraticTasks` instances.

    **Example:**

    ```python
    import numpy as np
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.quadratic_meta_tasks(max_dim=3))
    def test_zero_steps_adapt_nothing(tasks):
        w = tasks.adapted(tasks.hparams, 0.1, 0)
        np.testing.assert_allclose(w, np.broadcast_to(tasks.hparams, w.shape), rtol=1e-6)

    test_zero_steps_adapt_nothing()
    ```
    """
    where = "quadratic_meta_tasks"
    min_dim, max_dim = _check_common(where, min_dim, max_dim, max_condition, (-1.0, 1.0), -np.inf, dtype)
    lo = check_int(min_tasks, "min_tasks", where, 1, 1)
    hi = check_int(max_tasks, "max_tasks", where, 1, 4)
    if hi < lo:
        raise ValueError(f"{where} requires min_tasks <= max_tasks; got {lo} and {hi}. Raise "
                         "max_tasks or lower min_tasks.")

    @st.composite
    def draw(draw_):
        return QuadraticTasks.sample(draw_(_SEEDS), num_tasks=draw_(st.integers(lo, hi)),
                                     dim=draw_(st.integers(min_dim, max_dim)),
                                     max_condition=max_condition, dtype=dtype)

    return draw()


def quadratic_schedules(
    *, min_dim=1, max_dim=4, min_steps=1, max_steps=10, max_condition=10.0, momentum=True,
    dtype=None,
) -> st.SearchStrategy:
    """Draw [`bilevel.testing.QuadraticSchedule`][] instances (learning-rate and momentum
    schedules on a quadratic, Maclaurin et al. 2015).

    **Arguments:**

    - `min_dim`, `max_dim`: bounds on the dimension.
    - `min_steps`, `max_steps`: bounds on the schedules' length T.
    - `max_condition`: κ >= 1, the bound on the condition numbers of the training and
      validation Hessians (rates are drawn in [0.2, 1]/κ, momenta in [0, 0.9]).
    - `momentum`: True (rate and momentum schedules), False (rates only) or None (either,
      drawn).
    - `dtype`: a floating dtype; default `None` is float64 under x64, float32 otherwise.

    **Returns:**

    A hypothesis strategy of `QuadraticSchedule` instances.

    **Example:**

    ```python
    from hypothesis import given, settings
    import bilevel.testing.strategies as bst

    @settings(max_examples=3, deadline=None)
    @given(bst.quadratic_schedules(max_dim=3, max_steps=5))
    def test_one_derivative_per_step(exact):
        grads = exact.hypergrad(exact.hparams)
        assert all(g.shape == (exact.steps,) for g in grads.values())

    test_one_derivative_per_step()
    ```
    """
    from ._schedules import QuadraticSchedule

    where = "quadratic_schedules"
    min_dim, max_dim = _check_common(where, min_dim, max_dim, max_condition, (-1.0, 1.0), -np.inf, dtype)
    lo = check_int(min_steps, "min_steps", where, 1, 1)
    hi = check_int(max_steps, "max_steps", where, 1, 10)
    if hi < lo:
        raise ValueError(f"{where} requires min_steps <= max_steps; got {lo} and {hi}. Raise "
                         "max_steps or lower min_steps.")
    if momentum is not None and not isinstance(momentum, (bool, np.bool_)):
        raise TypeError(f"{where} requires momentum to be True, False or None (draw either); got "
                        f"{type(momentum).__name__} {momentum!r}.")
    moms = st.booleans() if momentum is None else st.just(bool(momentum))

    @st.composite
    def draw(draw_):
        return QuadraticSchedule.sample(draw_(_SEEDS), dim=draw_(st.integers(min_dim, max_dim)),
                                        steps=draw_(st.integers(lo, hi)), max_condition=max_condition,
                                        momentum=draw_(moms), dtype=dtype)

    return draw()
