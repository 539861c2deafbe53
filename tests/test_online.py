"""The online driver (seed 004) against its equations written out in numpy, and its guarantees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
import bilevel.testing as blt

# Compile-bound (many small programs): compiled with `jax_disable_most_optimizations`
# (tests/conftest.py's `quick_compilation`), the same programs with fewer backend passes.
pytestmark = pytest.mark.usefixtures("quick_compilation")

EXACT = blt.Quadratic004.sample(3, dim=8)
ETA, BETA, STEPS = 0.05, 0.02, 300


def numpy_online(exact, lam0, eta, beta, steps, window=None, clip=None, warmup=0, first_order=False):
    """Seed 004 §3.2-3.4 / Algorithm 1 on its quadratic, in float64 numpy (independent of bilevel).

    L_T = ½(θ−θ̄)ᵀH(θ−θ̄) + ½λθᵀHθ: g_T = H(θ−θ̄) + λHθ, ∂g_T/∂θ = (1+λ)H, ∂g_T/∂λ = Hθ.
    The hypergradient estimate pairs g_V(θ_{t+1}) with y_{t+1} (see `bilevel.online`).
    """
    tb, tt, h = (np.asarray(x, np.float64) for x in (exact.theta_bar, exact.theta_tilde, exact.h))
    theta, y, lam = np.zeros_like(tb), np.zeros_like(tb), float(lam0)
    lams, clipped = [], []
    for t in range(steps):
        if first_order:
            y_new = -h * theta
        else:
            y_new = y - eta * ((1 + lam) * h * y + h * theta)
        theta = theta - eta * (h * (theta - tb) + lam * h * theta)
        c = clip is not None and np.linalg.norm(y_new) > clip
        if c:
            y_new = clip / np.linalg.norm(y_new) * y_new
        y = y_new
        due = window is None or (t + 1) % window == 0
        if due and t >= warmup:
            lam -= beta * (h * (theta - tt)) @ y
        if window is not None and (t + 1) % window == 0:
            y = np.zeros_like(y)
        lams.append(lam)
        clipped.append(c)
    return np.array(lams), np.array(clipped), theta


VARIANTS = {
    "unroll1": dict(window=1),
    "unroll5": dict(window=5),
    "clip2_warmup": dict(clip=0.5, warmup=40),
    "carried": dict(),
    "gtgv": dict(first_order=True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_trajectory_matches_the_papers_equations(name):
    kw = VARIANTS[name]
    driver = bl.online(EXACT.problem, optax.sgd(ETA), optax.sgd(BETA), **kw)
    state = driver.init(jnp.asarray(0.0), EXACT.params0)
    state, infos = jax.jit(driver.run, static_argnums=3)(state, EXACT.inner_batch, EXACT.outer_batch, STEPS)
    lams, clipped, theta = numpy_online(EXACT, 0.0, ETA, BETA, STEPS, **kw)
    np.testing.assert_allclose(infos.hparams, lams, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(infos.clipped, clipped)
    np.testing.assert_allclose(state.params, theta, rtol=1e-10, atol=1e-13)
    assert int(state.step) == STEPS
    assert abs(lams[-1]) > 1e-3  # λ did move: the comparison is not between two constants
    if "clip" in kw:
        assert 0 < clipped.sum() < STEPS


def test_unroll1_is_gtgv_with_the_hyper_rate_divided_by_eta():
    """Seed 004: Unroll1 differs from Unroll1-gTgV by the factor η only (for SGD)."""
    run = lambda d: d.run(d.init(jnp.asarray(0.0), EXACT.params0), EXACT.inner_batch,  # noqa: E731
                          EXACT.outer_batch, 100)[1].hparams
    unroll1 = run(bl.online(EXACT.problem, optax.sgd(ETA), optax.sgd(BETA), window=1))
    gtgv = run(bl.online(EXACT.problem, optax.sgd(ETA), optax.sgd(BETA * ETA), first_order=True))
    np.testing.assert_allclose(unroll1, gtgv, rtol=1e-12)


def test_carried_jacobian_is_forward_mode_when_lambda_is_frozen():
    """With a zero hyper step, y_T is the exact dθ_T/dλ of T steps of any optimizer."""
    opt = optax.adam(0.05)
    driver = bl.online(EXACT.problem, opt, optax.sgd(0.0))
    state, _ = driver.run(driver.init(jnp.asarray(0.4), EXACT.params0), EXACT.inner_batch,
                          EXACT.outer_batch, 50)
    respond = bl.response(EXACT.problem, bl.unroll(opt, 50))
    want = jax.jit(jax.jacfwd(respond))(jnp.asarray(0.4), EXACT.params0, EXACT.inner_batch)   # the reference, compiled
    np.testing.assert_allclose(state.jacobian[0][0], want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_clip5_converges_to_the_analytic_optimum(seed):
    """Seed 004 §4.1: with r = 5 ≥ ‖dθ*/dλ‖ the online system reaches λ† (closed form)."""
    exact = blt.Quadratic004.sample(seed, dim=20)
    driver = bl.online(exact.problem, optax.sgd(0.02), optax.sgd(0.002), clip=5.0, warmup=200)
    state, _ = jax.jit(driver.run, static_argnums=3)(
        driver.init(jnp.asarray(0.0), exact.params0), exact.inner_batch, exact.outer_batch, 20_000)
    assert abs(float(state.hparams) - float(exact.optimal_hparams())) < 1e-6


def test_variants_vmap_as_traced_settings():
    """window/clip/warmup may be arrays: five variants in one vmapped call equal five runs."""
    settings = [(1, np.inf, 0), (5, np.inf, 0), (0, 0.5, 40), (0, np.inf, 0), (3, 0.2, 10)]
    windows, clips, warmups = (jnp.asarray(c) for c in zip(*settings))

    def run(window, clip, warmup):
        driver = bl.online(EXACT.problem, optax.sgd(ETA), optax.sgd(BETA), window=window,
                           clip=clip, warmup=warmup)
        state = driver.init(jnp.asarray(0.0), EXACT.params0)
        return driver.run(state, EXACT.inner_batch, EXACT.outer_batch, STEPS)[1].hparams

    batched = jax.jit(jax.vmap(run))(windows, clips, warmups)
    for i, (k, r, w) in enumerate(settings):
        lams, _, _ = numpy_online(EXACT, 0.0, ETA, BETA, STEPS, window=k or None,
                                  clip=None if np.isinf(r) else r, warmup=w)
        np.testing.assert_allclose(batched[i], lams, rtol=1e-10, atol=1e-13)


def test_per_step_batches_and_step_by_step_equal_run():
    rng = np.random.default_rng(0)
    targets = jnp.asarray(rng.normal(size=(30, 8)))
    problem = bl.Problem(
        inner=lambda w, lam, b: 0.5 * jnp.sum((w - b) ** 2) + 0.5 * jnp.exp(lam) * w @ w,
        outer=lambda w, lam, b: 0.5 * jnp.sum((w - b) ** 2),
    )
    driver = bl.online(problem, optax.sgd(0.1, momentum=0.5), optax.adam(0.01), clip=1.0)
    state0 = driver.init(jnp.asarray(-1.0), jnp.zeros(8))
    val = jnp.ones(8) * 0.3
    state, infos = driver.run(state0, bl.per_step(targets), val, 30)
    stepped, step = state0, jax.jit(driver.step)   # compiled once for the 30 steps
    for t in range(30):
        stepped, info = step(stepped, targets[t], val)
        np.testing.assert_allclose(info.hparams, infos.hparams[t], rtol=1e-13)
    np.testing.assert_allclose(stepped.hparams, state.hparams, rtol=1e-13)


def test_new_hparam_values_do_not_retrace():
    traces = []

    def inner(w, lam, b):
        traces.append(1)
        return EXACT.problem.inner(w, lam, b)

    driver = bl.online(bl.Problem(inner, EXACT.problem.outer), optax.sgd(ETA), optax.sgd(BETA), clip=1.0)
    run = jax.jit(driver.run, static_argnums=3)
    for lam in (0.0, 0.3, 0.7):
        run(driver.init(jnp.asarray(lam), EXACT.params0), EXACT.inner_batch, EXACT.outer_batch, 10)
        if lam == 0.0:
            count = len(traces)
    assert len(traces) == count


def test_dict_hparams_with_a_learning_rate():
    """Pytree hyperparameters; the learning rate's tangent enters through the optimizer."""
    problem = bl.Problem(
        inner=lambda w, h, b: EXACT.problem.inner(w, h["lam"], b),
        outer=lambda w, h, b: EXACT.problem.outer(w, h["lam"], b),
    )
    driver = bl.online(problem, lambda h: optax.sgd(h["lr"]), optax.sgd(0.0))
    hp = {"lam": jnp.asarray(0.2), "lr": jnp.asarray(0.05)}
    state, _ = driver.run(driver.init(hp, EXACT.params0), EXACT.inner_batch, EXACT.outer_batch, 40)
    respond = bl.response(problem, bl.unroll(lambda h: optax.sgd(h["lr"]), 40))
    want = jax.jit(jax.jacfwd(respond))(hp, EXACT.params0, EXACT.inner_batch)   # the reference, compiled
    jac = state.jacobian[0]  # columns in ravel order: lam, lr
    np.testing.assert_allclose(jac[0], want["lam"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jac[1], want["lr"], rtol=1e-10, atol=1e-14)


# ---- bad input --------------------------------------------------------------------------------


def _driver(**kw):
    return bl.online(EXACT.problem, optax.sgd(ETA), optax.sgd(BETA), **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(clip=0.0), "radius r > 0"),
        (dict(clip=-2.0), "radius r > 0"),
        (dict(window=0), "int K >= 1"),
        (dict(window=-3), "int K >= 1"),
        (dict(window=2.5), "int K >= 1"),
        (dict(window=True), "int K >= 1"),
        (dict(warmup=-1), "int >= 0"),
        (dict(first_order=True, clip=2.0), "first_order=True"),
        (dict(first_order=True, window=5), "first_order=True"),
    ],
)
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        _driver(**kw)


def test_bad_arguments():
    with pytest.raises(TypeError, match="bilevel.Problem"):
        bl.online(lambda w, h, b: 0.0, optax.sgd(0.1), optax.sgd(0.1))
    with pytest.raises(TypeError, match="hyper_optimizer"):
        bl.online(EXACT.problem, optax.sgd(0.1), 0.1)
    with pytest.raises(TypeError, match="optimizer"):
        bl.online(EXACT.problem, 0.1, optax.sgd(0.1))
    driver = _driver()
    state = driver.init(jnp.asarray(0.0), EXACT.params0)
    with pytest.raises(ValueError, match="steps to be a Python int >= 1"):
        driver.run(state, EXACT.inner_batch, EXACT.outer_batch, 0)
    with pytest.raises(TypeError, match="OnlineState"):
        driver.step((state.params, state.hparams), EXACT.inner_batch, EXACT.outer_batch)
    with pytest.raises(TypeError, match="floating-point"):
        driver.init(jnp.asarray(1), EXACT.params0)
    with pytest.raises(ValueError, match="leading axis == steps=10"):
        driver.run(state, bl.per_step(jnp.zeros((4, 8))), EXACT.outer_batch, 10)


def test_warmup_longer_than_the_run():
    driver = _driver(clip=5.0, warmup=100)
    state = driver.init(jnp.asarray(0.0), EXACT.params0)
    with pytest.raises(ValueError, match="warm-up .100 steps. is not shorter than the run"):
        driver.run(state, EXACT.inner_batch, EXACT.outer_batch, 100)
    driver.run(state, EXACT.inner_batch, EXACT.outer_batch, 101)
    # inside a jit the step count is traced, so a first piece may end inside the warm-up ...
    state, _ = jax.jit(driver.run, static_argnums=3)(state, EXACT.inner_batch, EXACT.outer_batch, 60)
    # ... and a later eager run counts from the state's step
    with pytest.raises(ValueError, match="steps 60 to 100"):
        driver.run(state, EXACT.inner_batch, EXACT.outer_batch, 40)
    _, infos = driver.run(state, EXACT.inner_batch, EXACT.outer_batch, 41)
    np.testing.assert_array_equal(infos.updated, np.arange(60, 101) >= 100)
