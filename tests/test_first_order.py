"""F2SA and BOME (bilevel._first_order) against their papers' update equations written out in
NumPy on the same minibatch draws, their convergence on benchmark_bilevel's quadratic
(bilevel.testing.BilevelQuadratic, closed-form optimum), and their argument checks.

The tests are compile-bound (tiny problems; most of the compile time is the samplers' random
draws), so they compile with `jax_disable_most_optimizations`, as tests/test_optimality.py
does: the same programs with fewer backend optimisations, far below the tolerances here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
import bilevel.testing as blt
from bilevel._drivers import stream_keys


pytestmark = pytest.mark.usefixtures("quick_compilation")   # tests/conftest.py

# ----------------------------------------------------------------------------------------------
# A small bilevel problem whose losses are means of per-row quadratics, so every gradient
# below is written by hand in NumPy (for the same-draws comparisons of section 1):
#   G(w, λ) = mean_i ½(a_iᵀw + e_iᵀλ − c_i)² + ½R‖w‖²
#   F(w, λ) = mean_j ½(b_jᵀw − d_j)² + ½S‖λ‖²
# ----------------------------------------------------------------------------------------------

D, P, N_IN, N_OUT, BS = 3, 2, 24, 12, 4
R, S = 0.5, 0.1
_rng = np.random.default_rng(0)
A, E, C_ = _rng.normal(size=(N_IN, D)), _rng.normal(size=(N_IN, P)), _rng.normal(size=N_IN)
B, D_ = _rng.normal(size=(N_OUT, D)), _rng.normal(size=N_OUT)
LAM0, W0 = np.array([1.0, 1.0]), np.zeros(D)
TRACES = []        # one entry each time JAX traces the inner loss (to detect recompilation)


def inner_loss(w, lam, batch):
    TRACES.append(1)
    a, e, c = batch
    return 0.5 * jnp.mean((a @ w + e @ lam - c) ** 2) + 0.5 * R * jnp.sum(w**2)


def outer_loss(w, lam, batch):
    b, d = batch
    return 0.5 * jnp.mean((b @ w - d) ** 2) + 0.5 * S * jnp.sum(lam**2)


PROBLEM = bl.Problem(inner=inner_loss, outer=outer_loss)
INNER_DATA = (jnp.asarray(A), jnp.asarray(E), jnp.asarray(C_))
OUTER_DATA = (jnp.asarray(B), jnp.asarray(D_))
INNER, OUTER = bl.sampler(INNER_DATA, BS), bl.sampler(OUTER_DATA, BS)              # 6 and 3 minibatches
INNER_FULL, OUTER_FULL = bl.sampler(INNER_DATA, N_IN), bl.sampler(OUTER_DATA, N_OUT)


def rows(j, n_rows=BS):
    return slice(j * n_rows, (j + 1) * n_rows)


def g_w(w, lam, j):
    a, e, c = A[rows(j)], E[rows(j)], C_[rows(j)]
    return a.T @ (a @ w + e @ lam - c) / BS + R * w


def g_lam(w, lam, j):
    a, e, c = A[rows(j)], E[rows(j)], C_[rows(j)]
    return e.T @ (a @ w + e @ lam - c) / BS


def f_w(w, j):
    b, d = B[rows(j)], D_[rows(j)]
    return b.T @ (b @ w - d) / BS


def f_value(w, lam, j):
    b, d = B[rows(j)], D_[rows(j)]
    return 0.5 * np.mean((b @ w - d) ** 2) + 0.5 * S * lam @ lam


# ----------------------------------------------------------------------------------------------
# 1. The same draws through an independent NumPy implementation of each paper's update.
# ----------------------------------------------------------------------------------------------

STEPS, T_F2SA, T_BOME = 20, 2, 3
KEY = jax.random.key(7)


def gamma(k):
    return 0.15 / (k + 1) ** (4 / 7)


def alpha(k):
    return 0.1 / (k + 1) ** (5 / 7)


def beta(k):
    return 0.3 / (k + 1) ** 0.5


def growth(k):
    return 0.5 / (k + 1) ** (1 / 7)


def numpy_f2sa(inner_index, outer_index, common):
    """Kwon et al. (2023) Algorithm 1 with SGD on λ, in float64 NumPy, on given minibatch indices."""
    y, z, lam, mu = W0.copy(), W0.copy(), LAM0.copy(), 1.0
    out = {"hparams": [], "hypergrad": [], "value": [], "penalty": []}
    for k in range(STEPS):
        ii, oo = inner_index[k], outer_index[k]
        for t in range(T_F2SA):
            y = y - alpha(k) * (f_w(y, oo[t]) + mu * g_w(y, lam, ii[2 * t]))
            z = z - gamma(k) * g_w(z, lam, ii[2 * t + 1])
        j_z = ii[2 * T_F2SA] if common else ii[2 * T_F2SA + 1]
        direction = S * lam + mu * (g_lam(y, lam, ii[2 * T_F2SA]) - g_lam(z, lam, j_z))
        out["value"].append(f_value(y, lam, oo[T_F2SA]))
        out["penalty"].append(mu)
        lam = lam - beta(k) * direction
        mu = mu + growth(k)
        out["hparams"].append(lam)
        out["hypergrad"].append(direction)
    return {k: np.array(v) for k, v in out.items()}, y, z


_index = jax.jit(lambda sampler, key, count: sampler.index(key, count))   # one compile per sampler shape


def expected_indices(sampler, key, per_step, steps):
    """The sampler's draws 0, 1, ... of the stream `key`, one row per step."""
    return np.array([int(_index(sampler, key, c)) for c in range(per_step * steps)]).reshape(steps, per_step)


F2SA_DRIVERS = {common: bl.f2sa(PROBLEM, gamma, optax.sgd(beta), penalty0=1.0, penalty_growth=growth,
                                inner_steps=T_F2SA, penalized_lr=alpha, common_batch=common)
                for common in (False, True)}


@pytest.mark.parametrize("common", [False, True])
def test_f2sa_matches_numpy_on_the_same_draws(common):
    driver = F2SA_DRIVERS[common]
    state, infos = driver.run(driver.init(KEY, jnp.asarray(LAM0), jnp.asarray(W0)), INNER, OUTER, STEPS)
    # The draws follow the documented convention: stream i of stream_keys(key, 2), count per_step·k + i.
    k_in, k_out = stream_keys(KEY, 2)
    per_step = 2 * T_F2SA + 1 if common else 2 * T_F2SA + 2
    inner_idx = expected_indices(INNER, k_in, per_step, STEPS)
    if common:
        inner_idx = np.concatenate([inner_idx, inner_idx[:, -1:]], axis=1)
    np.testing.assert_array_equal(infos.inner_index, inner_idx)
    np.testing.assert_array_equal(infos.outer_index, expected_indices(OUTER, k_out, T_F2SA + 1, STEPS))
    ref, y, z = numpy_f2sa(inner_idx, np.asarray(infos.outer_index), common)
    for name in ("hparams", "hypergrad", "value", "penalty"):
        np.testing.assert_allclose(getattr(infos, name), ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(state.y, y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.z, z, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.penalty, ref["penalty"][-1] + growth(STEPS - 1), rtol=1e-12)
    assert (np.asarray(infos.oracle_calls) == 3 * T_F2SA + 3).all()
    assert int(state.step) == STEPS


ETA, ETA_REF = 0.5, 0.1        # ETA_REF: small enough that the max(·, 0) of ρ is hit on these draws


def xi(k):
    return 0.08 / (1 + 0.05 * k)


def numpy_bome(inner_index, outer_index):
    """Liu et al. (2022) Algorithm 1 (φ = η‖∇q‖²), in float64 NumPy, on given minibatch indices."""
    w, lam = W0.copy(), LAM0.copy()
    out = {"hparams": [], "hypergrad": [], "value": [], "rho": [], "grad_q_norm": []}
    for k in range(STEPS):
        ii, jo = inner_index[k], outer_index[k]
        theta = w.copy()
        for t in range(T_BOME):
            theta = theta - 0.2 * g_w(theta, lam, ii[t])
        fw, fl = f_w(w, jo), S * lam
        qw = g_w(w, lam, ii[T_BOME])
        ql = g_lam(w, lam, ii[T_BOME]) - g_lam(theta, lam, ii[T_BOME + 1])
        sq = qw @ qw + ql @ ql
        rho = max(ETA_REF * sq - (fw @ qw + fl @ ql), 0.0) / sq
        out["value"].append(f_value(w, lam, jo))
        w, lam = w - xi(k) * (fw + rho * qw), lam - xi(k) * (fl + rho * ql)
        out["hparams"].append(lam)
        out["hypergrad"].append(fl + rho * ql)
        out["rho"].append(rho)
        out["grad_q_norm"].append(np.sqrt(sq))
    return {k: np.array(v) for k, v in out.items()}, w


BOME_DRIVER = bl.bome(PROBLEM, xi, inner_steps=T_BOME, eta=ETA_REF, inner_lr=0.2)


def test_bome_matches_numpy_on_the_same_draws():
    driver = BOME_DRIVER
    state, infos = driver.run(driver.init(KEY, jnp.asarray(LAM0), jnp.asarray(W0)), INNER, OUTER, STEPS)
    k_in, k_out = stream_keys(KEY, 2)
    inner_idx = expected_indices(INNER, k_in, T_BOME + 2, STEPS)
    np.testing.assert_array_equal(infos.inner_index, inner_idx)
    np.testing.assert_array_equal(infos.outer_index, expected_indices(OUTER, k_out, 1, STEPS)[:, 0])
    ref, w = numpy_bome(inner_idx, np.asarray(infos.outer_index))
    assert (ref["rho"] > 0).any() and (ref["rho"] == 0).any()      # both branches of the max
    for name in ("hparams", "hypergrad", "value", "rho", "grad_q_norm"):
        np.testing.assert_allclose(getattr(infos, name), ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(state.params, w, rtol=1e-10, atol=1e-12)
    assert (np.asarray(infos.oracle_calls) == T_BOME + 3).all()


def test_bome_guards_a_zero_value_function_gradient():
    """G constant: ∇q = 0, so ρ = 0 (not NaN) and (λ, w) follow ∇F alone."""
    problem = bl.Problem(inner=lambda w, lam, b: 0.0 * (jnp.sum(w) + jnp.sum(lam) + jnp.sum(b[2])),
                         outer=outer_loss)
    driver = bl.bome(problem, 0.1, inner_steps=2, eta=ETA)
    state = driver.init(KEY, jnp.asarray(LAM0), jnp.asarray(W0))
    new, info = jax.jit(driver.step)(state, INNER_FULL, OUTER_FULL)
    assert float(info.rho) == 0.0 and float(info.grad_q_norm) == 0.0
    np.testing.assert_allclose(new.hparams, LAM0 - 0.1 * S * LAM0, rtol=1e-12)
    np.testing.assert_allclose(new.params, W0 - 0.1 * B.T @ (B @ W0 - D_) / N_OUT, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# 2. Convergence on benchmark_bilevel's quadratic (bilevel.testing.BilevelQuadratic, exact λ*),
#    with bounds that follow from what each method guarantees. Full batches: deterministic.
# ----------------------------------------------------------------------------------------------

QUAD = blt.BilevelQuadratic.sample(0, dim_inner=4, dim_outer=2, n_samples=16, max_condition=4.0)
QUAD_INNER, QUAD_OUTER = bl.sampler(QUAD.inner_batch, 16), bl.sampler(QUAD.outer_batch, 16)
QUAD_LAM0, QUAD_STAR = np.ones(2), np.asarray(QUAD.optimal_hparams())
_I = {k: np.asarray(v).mean(axis=0) for k, v in QUAD.inner_batch.items()}
_O = {k: np.asarray(v).mean(axis=0) for k, v in QUAD.outer_batch.items()}


# From the means of the per-sample quadratics ℓ = ½wᵀAw + ½λᵀBλ + λᵀCw + aᵀw + bᵀλ:
# ∇_w ℓ = Aw + Cᵀλ + a and ∇_λ ℓ = Bλ + Cw + b (A, C, a inner; F, G, K, f, g outer).
A_, C2, A1 = _I["hess_params"], _I["cross"], _I["lin_params"]
F_, G_, K_, F1, G1 = (_O[k] for k in ("hess_params", "hess_hparams", "cross", "lin_params", "lin_hparams"))


def quad_z(lam):
    """argmin_w G(w, λ) = w*(λ)."""
    return -np.linalg.solve(A_, A1 + C2.T @ lam)


def quad_y(lam, mu):
    """argmin_w F(w, λ) + μ G(w, λ)."""
    return -np.linalg.solve(F_ + mu * A_, K_.T @ lam + F1 + mu * (C2.T @ lam + A1))


def quad_f2sa_direction(lam, mu):
    """D_λ = ∇_λF(y) + μ(∇_λG(y) − ∇_λG(z)) at y = argmin F + μG, z = argmin G."""
    y = quad_y(lam, mu)
    return G_ @ lam + K_ @ y + G1 + mu * C2 @ (y - quad_z(lam))


def quad_penalised_optimum(mu):
    """The λ where the fixed-penalty F2SA direction vanishes (it is affine in λ)."""
    v = quad_f2sa_direction(np.zeros(2), mu)
    M = np.stack([quad_f2sa_direction(np.eye(2)[i], mu) - v for i in range(2)], axis=1)
    return np.linalg.solve(M, -v)


def test_quadratic_closed_forms_agree():
    np.testing.assert_allclose(quad_f2sa_direction(QUAD_LAM0, 1e9), QUAD.hypergrad(jnp.asarray(QUAD_LAM0)),
                               rtol=1e-6)
    assert np.linalg.norm(quad_penalised_optimum(1e9) - QUAD_STAR) < 1e-6


def test_f2sa_direction_bias_falls_like_one_over_the_penalty():
    """At fixed λ with y, z converged (λ held by a zero outer update), the F2SA direction
    equals its closed form and differs from the hypergradient by c/μ + O(1/μ²)."""
    mus = np.array([10.0, 100.0, 1000.0])
    driver = bl.f2sa(QUAD.problem, 1.0, optax.set_to_zero(), penalty0=1.0, penalty_growth=0.0,
                     penalized_lr=1.0 / (1.0 + mus.max()))      # α(L_F + μ L_G) <= 1 for every μ (L <= 1)

    def direction(mu):
        state = driver.init(KEY, jnp.asarray(QUAD_LAM0), QUAD.params0)._replace(penalty=mu)
        return driver.run(state, QUAD_INNER, QUAD_OUTER, 6000)[1].hypergrad[-1]

    directions = np.asarray(jax.jit(jax.vmap(direction))(jnp.asarray(mus)))
    for d, mu in zip(directions, mus):
        np.testing.assert_allclose(d, quad_f2sa_direction(QUAD_LAM0, mu), rtol=1e-9, atol=1e-12)
    err = np.linalg.norm(directions - QUAD.hypergrad(jnp.asarray(QUAD_LAM0)), axis=1)
    assert 0.09 < err[1] / err[0] < 0.12 and 0.098 < err[2] / err[1] < 0.102, err
    assert abs(err[2] * mus[2] / (err[1] * mus[1]) - 1) < 0.03, err        # μ·error -> constant


def test_f2sa_with_a_growing_penalty_converges_like_one_over_the_penalty():
    """μ_k = 1 + δk: λ tracks the penalised optimum λ_μ (closed form), whose distance to λ*
    is c/μ, so the final error is that of λ_{μ_K} up to a small lag, and O(1/μ_K)."""
    steps, delta = 400, 0.05
    mu_final = 1.0 + delta * steps
    driver = bl.f2sa(QUAD.problem, 1.0, 1.0, penalty0=1.0, penalty_growth=delta, inner_steps=5,
                     penalized_lr=1.0 / (1.0 + mu_final))
    state = driver.init(KEY, jnp.asarray(QUAD_LAM0), QUAD.params0)
    state, infos = driver.run(state, QUAD_INNER, QUAD_OUTER, steps)
    np.testing.assert_allclose(state.penalty, mu_final, rtol=1e-12)
    target = quad_penalised_optimum(float(infos.penalty[-1]))
    bias = np.linalg.norm(target - QUAD_STAR)
    assert np.linalg.norm(state.hparams - target) < 0.05 * bias, (state.hparams, target)
    assert np.linalg.norm(state.hparams - QUAD_STAR) < 0.01 * np.linalg.norm(QUAD_LAM0 - QUAD_STAR)
    lam, mu = np.asarray(infos.hparams[-2]), float(infos.penalty[-1])       # what the last step used
    gap = quad_y(lam, mu) - quad_z(lam)                                     # O(1/μ)
    assert np.linalg.norm(state.y - state.z - gap) < 0.02 * np.linalg.norm(gap)


def test_bome_reaches_a_neighbourhood_of_the_optimum_that_shrinks_with_the_step_size():
    """BOME guarantees approximate stationarity up to terms that vanish with the step size
    ξ: its iterates settle near λ* (and w near w*(λ)), in a neighbourhood about
    proportional to ξ (measured: 0.077 at ξ = 0.2, 0.019 at ξ = 0.05, from 7.4 away)."""
    driver = bl.bome(QUAD.problem, lambda k: jnp.where(k < 1500, 0.2, 0.05), inner_steps=10, eta=ETA,
                     inner_lr=1.0)
    state = driver.init(KEY, jnp.asarray(QUAD_LAM0), QUAD.params0)
    state, infos = driver.run(state, QUAD_INNER, QUAD_OUTER, 6000)
    err_coarse = np.linalg.norm(infos.hparams[1499] - QUAD_STAR)
    err_fine = np.linalg.norm(state.hparams - QUAD_STAR)
    assert err_coarse < 0.02 * np.linalg.norm(QUAD_LAM0 - QUAD_STAR)
    assert err_fine < 0.4 * err_coarse, (err_coarse, err_fine)
    assert np.linalg.norm(state.params - QUAD.response(state.hparams)) < 0.2      # q ≈ 0


# ----------------------------------------------------------------------------------------------
# 3. Populations of seeds, compilation, dtypes, bad input.
# ----------------------------------------------------------------------------------------------

DRIVERS = {"f2sa": F2SA_DRIVERS[True], "bome": BOME_DRIVER}


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_vmap_over_seeds_equals_separate_runs_which_do_not_recompile(name):
    """A population of seeds in one vmapped run equals the runs one by one; those reuse one
    compiled program for new keys and new hyperparameter values (the loss traces once).
    (The drivers and step count are those of the NumPy tests, whose compiled runs are reused.)"""
    driver = DRIVERS[name]
    keys = jax.random.split(jax.random.key(3), 3)

    def run(key, lam=LAM0):
        return driver.run(driver.init(key, jnp.asarray(lam), jnp.asarray(W0)), INNER, OUTER, STEPS)

    states, infos = jax.jit(jax.vmap(run))(keys)
    for i in range(3):
        state, info = run(keys[i])
        if i == 0:
            count = len(TRACES)
        np.testing.assert_allclose(states.hparams[i], state.hparams, rtol=1e-12)
        np.testing.assert_array_equal(infos.inner_index[i], info.inner_index)
    assert not np.array_equal(infos.inner_index[0], infos.inner_index[1])
    run(keys[0], LAM0 + 0.5)
    assert len(TRACES) == count


def test_float32_state_keeps_its_dtype_with_float64_schedules():
    driver = bl.f2sa(PROBLEM, lambda k: 0.1 / (k + 1.0), 0.1, penalty0=1.0, penalty_growth=lambda k: 0.1)
    inner = bl.sampler(tuple(x.astype(jnp.float32) for x in INNER_DATA), N_IN)
    outer = bl.sampler(tuple(x.astype(jnp.float32) for x in OUTER_DATA), N_OUT)
    state, _ = driver.run(driver.init(KEY, jnp.asarray(LAM0, jnp.float32), jnp.zeros(D, jnp.float32)),
                          inner, outer, 3)
    assert state.y.dtype == state.z.dtype == state.hparams.dtype == state.penalty.dtype == jnp.float32


def _f2sa(**kw):
    args = dict(problem=PROBLEM, inner_lr=0.1, outer_optimizer=0.1, penalty0=1.0, penalty_growth=0.1)
    args.update(kw)
    return bl.f2sa(args.pop("problem"), args.pop("inner_lr"), args.pop("outer_optimizer"), **args)


def _bome(**kw):
    args = dict(problem=PROBLEM, lr=0.1, inner_steps=2, eta=0.5)
    args.update(kw)
    return bl.bome(args.pop("problem"), args.pop("lr"), **args)


BAD_SETTINGS = [
    (_f2sa, dict(inner_lr=0.0), ValueError, "inner_lr"),
    (_f2sa, dict(inner_lr=-0.1), ValueError, "inner_lr"),
    (_f2sa, dict(inner_lr="fast"), TypeError, "inner_lr"),
    (_f2sa, dict(penalized_lr=float("nan")), ValueError, "penalized_lr"),
    (_f2sa, dict(outer_optimizer=0.0), ValueError, "outer_optimizer"),
    (_f2sa, dict(penalty0=0.0), ValueError, "penalty0"),
    (_f2sa, dict(penalty0=-1.0), ValueError, "penalty0"),
    (_f2sa, dict(penalty0=None), TypeError, "penalty0"),
    (_f2sa, dict(penalty_growth=-0.1), ValueError, "penalty_growth"),
    (_f2sa, dict(inner_steps=0), ValueError, "inner_steps"),
    (_f2sa, dict(inner_steps=2.0), ValueError, "inner_steps"),
    (_f2sa, dict(inner_steps=True), ValueError, "inner_steps"),
    (_f2sa, dict(common_batch=1), TypeError, "common_batch"),
    (_f2sa, dict(problem=(inner_loss, outer_loss)), TypeError, "bilevel.Problem"),
    (_bome, dict(lr=0.0), ValueError, "lr"),
    (_bome, dict(inner_lr=-1.0), ValueError, "inner_lr"),
    (_bome, dict(eta=0.0), ValueError, "eta"),
    (_bome, dict(eta=float("inf")), ValueError, "eta"),
    (_bome, dict(inner_steps=0), ValueError, "inner_steps"),
    (_bome, dict(problem=None), TypeError, "bilevel.Problem"),
]


@pytest.mark.parametrize("build, kw, error, match", BAD_SETTINGS,
                         ids=[f"{b.__name__}-{next(iter(k))}-{i}" for i, (b, k, *_) in enumerate(BAD_SETTINGS)])
def test_bad_settings_raise_clear_errors(build, kw, error, match):
    with pytest.raises(error, match=match):
        build(**kw)


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_bad_calls_raise_clear_errors(name):
    driver = DRIVERS[name]
    state = driver.init(KEY, jnp.asarray(LAM0), jnp.asarray(W0))
    with pytest.raises(TypeError, match="bilevel.Sampler"):
        driver.step(state, INNER_DATA, OUTER)
    with pytest.raises(TypeError, match="bilevel.Sampler"):
        driver.run(state, INNER, OUTER_DATA, 3)
    for steps in (0, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            driver.run(state, INNER, OUTER, steps)
    with pytest.raises(TypeError, match="State"):
        driver.run(tuple(state), INNER, OUTER, 3)
    with pytest.raises(TypeError, match="PRNG key"):
        driver.init(0, jnp.asarray(LAM0), jnp.asarray(W0))
    with pytest.raises(TypeError, match="floating-point hyperparameters"):
        driver.init(KEY, jnp.array([1, 2]), jnp.asarray(W0))
    with pytest.raises(TypeError, match="params0"):
        driver.init(KEY, jnp.asarray(LAM0), jnp.array([0, 0, 0]))
    with pytest.raises(ValueError, match="inner loss"):       # data that does not fit the loss
        driver.step(state, OUTER, OUTER)
