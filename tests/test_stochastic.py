"""The stochastic drivers (SOBA, SABA, StocBiO, AmIGO) against their papers' update equations
written out in NumPy on the same minibatch draws, their convergence on a problem with a
closed-form optimum, and their argument checks.

The small problems are compile-bound, so the module compiles with
`jax_disable_most_optimizations` (as tests/test_docs.py does); every run is one compiled scan.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
from bilevel._drivers import stream_keys


pytestmark = pytest.mark.usefixtures("quick_compilation")   # tests/conftest.py


# --- exactness: a ridge-like problem with per-row data and e^λ penalties ---------------------
#
# Per row (x, y) of the training data: ½(xᵀw − y)² + ½ Σ_k e^{λ_k} x_k² w_k², so a minibatch b has
#   ∇_w G_b = X_bᵀ(X_b w − y_b)/B + e^λ ⊙ s_b ⊙ w,   s_b = mean of x² over the rows of b,
#   ∇²_ww G_b v = X_bᵀX_b v/B + e^λ ⊙ s_b ⊙ v,       ∇²_λw G_b v = e^λ ⊙ s_b ⊙ w ⊙ v
# (every term depends on the minibatch). Validation rows: ½(xᵀw − y)² + ½C‖λ‖².

D, B, C = 4, 4, 0.01
_rng = np.random.default_rng(0)
TRAIN = (_rng.normal(size=(24, D)), _rng.normal(size=24))       # 6 minibatches of 4 rows
VAL = (_rng.normal(size=(12, D)), _rng.normal(size=12))         # 3 minibatches
W0, LAM0, V0 = _rng.normal(size=D), 0.3 * _rng.normal(size=D), 0.5 * _rng.normal(size=D)
STEPS = 20
TRACES = []


def _inner(w, lam, batch):
    TRACES.append(1)
    x, y = batch
    return jnp.mean(0.5 * (x @ w - y) ** 2 + 0.5 * (x**2 * w**2) @ jnp.exp(lam))


def _outer(w, lam, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * C * lam @ lam


PROBLEM = bl.Problem(_inner, _outer)
INNER = bl.sampler(tuple(map(jnp.asarray, TRAIN)), B)
OUTER = bl.sampler(tuple(map(jnp.asarray, VAL)), B)


def _schedule(t):
    return 0.1 / jnp.sqrt(1.0 + t)


DRIVERS = {
    "soba": bl.soba(PROBLEM, _schedule, 0.05, linear_lr=0.07),
    "saba": bl.saba(PROBLEM, 0.1, 0.05),
    "stocbio": bl.stocbio(PROBLEM, 0.1, 0.05, inner_steps=3, neumann_terms=4, neumann_lr=0.08),
    "amigo": bl.amigo(PROBLEM, 0.1, optax.sgd(0.05, momentum=0.9), inner_steps=3, linear_steps=2,
                      linear_lr=0.08),
}


def _rows(data, j):
    x, y = data
    return x[j * B:(j + 1) * B], y[j * B:(j + 1) * B]


def np_grad(w, lam, j):
    x, y = _rows(TRAIN, j)
    return x.T @ (x @ w - y) / B + np.exp(lam) * np.mean(x**2, 0) * w


def np_hvp(lam, v, j):
    x, _ = _rows(TRAIN, j)
    return x.T @ (x @ v) / B + np.exp(lam) * np.mean(x**2, 0) * v


def np_cross(w, lam, v, j):
    x, _ = _rows(TRAIN, j)
    return np.exp(lam) * np.mean(x**2, 0) * w * v


def np_outer(w, lam, j):
    """(F_j, ∇_w F_j, ∇_λ F_j)."""
    x, y = _rows(VAL, j)
    r = x @ w - y
    return 0.5 * np.mean(r**2) + 0.5 * C * lam @ lam, x.T @ r / B, C * lam


def numpy_soba(infos, rho, rho_v, gamma, v=None):
    """Dagréou et al. 2022, SOBA: D_w, D_v, D_λ at (w_t, v_t, λ_t), then the three SGD steps."""
    w, lam, v = W0.copy(), LAM0.copy(), np.zeros(D) if v is None else v
    out = []
    for t, (i, j) in enumerate(zip(np.asarray(infos.inner_index), np.asarray(infos.outer_index))):
        value, fw, fl = np_outer(w, lam, j)
        d_w, d_v, d_lam = np_grad(w, lam, i), np_hvp(lam, v, i) + fw, np_cross(w, lam, v, i) + fl
        w, v, lam = w - rho(t) * d_w, v - rho_v(t) * d_v, lam - gamma * d_lam
        out.append((value, d_lam, lam))
    return w, v, out


def numpy_saba(infos, rho, gamma, v):
    """SABA: SOBA's five minibatch quantities replaced by new_i − memory_i + mean(memory), then
    memory_i ← new_i; tables filled at (w_0, v_0, λ_0) by one pass over every minibatch."""
    w, lam = W0.copy(), LAM0.copy()
    n_in, n_out = len(TRAIN[1]) // B, len(VAL[1]) // B
    mem_in = [[np_grad(w, lam, i), np_hvp(lam, v, i), np_cross(w, lam, v, i)] for i in range(n_in)]
    mem_out = [list(np_outer(w, lam, j)[1:]) for j in range(n_out)]
    out = []
    for i, j in zip(np.asarray(infos.inner_index), np.asarray(infos.outer_index)):
        value, fw, fl = np_outer(w, lam, j)
        new_in, new_out = [np_grad(w, lam, i), np_hvp(lam, v, i), np_cross(w, lam, v, i)], [fw, fl]
        est_in = [a - b + np.mean([m[k] for m in mem_in], 0) for k, (a, b) in enumerate(zip(new_in, mem_in[i]))]
        est_out = [a - b + np.mean([m[k] for m in mem_out], 0) for k, (a, b) in enumerate(zip(new_out, mem_out[j]))]
        mem_in[i], mem_out[j] = new_in, new_out
        d_lam = est_in[2] + est_out[1]
        w, v, lam = w - rho * est_in[0], v - rho * (est_in[1] + est_out[0]), lam - gamma * d_lam
        out.append((value, d_lam, lam))
    return w, v, out, mem_in, mem_out


def numpy_stocbio(infos, alpha, eta, gamma, T, Q):
    """Ji et al. 2021, Algorithm 2 with eq. (9): D SGD steps, v_Q = η Σ_{q=-1}^{Q-1} ∏(I − ηH_{B_j}) v_0
    with v_0 = ∇_wF_j, then D_λ = ∇_λF_j − ∇²_λwG v_Q (our v is −v_Q)."""
    w, lam = W0.copy(), LAM0.copy()
    out = []
    for idx, j in zip(np.asarray(infos.inner_index), np.asarray(infos.outer_index)):
        for k in range(T):
            w = w - alpha * np_grad(w, lam, idx[k])
        value, fw, fl = np_outer(w, lam, j)
        term, total = fw.copy(), fw.copy()
        for q in range(Q):
            term = term - eta * np_hvp(lam, term, idx[T + q])
            total = total + term
        v_paper = eta * total
        d_lam = fl - np_cross(w, lam, v_paper, idx[T + Q])
        lam = lam - gamma * d_lam
        out.append((value, d_lam, lam))
    return w, -v_paper, out


def numpy_amigo(infos, alpha, beta, gamma, momentum, T, M, v):
    """Arbel & Mairal 2022: T warm SGD steps on w, M warm SGD steps on ½vᵀHv + vᵀ∇_wF, then λ with
    ∇_λF + ∇²_λwG v; the outer optimizer is SGD with (heavy-ball) momentum as optax.sgd has it."""
    w, lam, trace = W0.copy(), LAM0.copy(), np.zeros(D)
    out = []
    for idx, j in zip(np.asarray(infos.inner_index), np.asarray(infos.outer_index)):
        for k in range(T):
            w = w - alpha * np_grad(w, lam, idx[k])
        value, fw, fl = np_outer(w, lam, j)
        for q in range(M):
            v = v - beta * (np_hvp(lam, v, idx[T + q]) + fw)
        d_lam = fl + np_cross(w, lam, v, idx[T + M])
        trace = d_lam + momentum * trace
        lam = lam - gamma * trace
        out.append((value, d_lam, lam))
    return w, v, out


def _compare(state, infos, w, v, out):
    value, hypergrad, hparams = (np.array(x) for x in zip(*out))
    tol = {"rtol": 1e-10, "atol": 1e-12}
    np.testing.assert_allclose(infos.value, value, **tol)
    np.testing.assert_allclose(infos.hypergrad, hypergrad, **tol)
    np.testing.assert_allclose(infos.hparams, hparams, **tol)
    np.testing.assert_allclose(state.params, w, **tol)
    np.testing.assert_allclose(state.v, v, **tol)
    assert int(state.step) == STEPS


def _run(name, key=0, lam=LAM0, v=None):
    driver = DRIVERS[name]
    extra = {"inner": INNER, "outer": OUTER} if name == "saba" else {}
    state = driver.init(jax.random.key(key), jnp.asarray(lam), jnp.asarray(W0), v, **extra)
    return driver.run(state, INNER, OUTER, STEPS)


def test_soba_matches_the_paper_equations():
    state, infos = _run("soba")
    w, v, out = numpy_soba(infos, lambda t: 0.1 / np.sqrt(1.0 + t), lambda t: 0.07, 0.05)
    _compare(state, infos, w, v, out)
    assert len(set(np.asarray(infos.inner_index).tolist())) > 1 and np.all(infos.oracle_calls == 4)


def test_saba_matches_the_paper_equations_with_its_memory():
    state, infos = _run("saba", v=jnp.asarray(V0))  # a carried v: the HVP and cross tables start nonzero
    w, v, out, mem_in, mem_out = numpy_saba(infos, 0.1, 0.05, V0.copy())
    _compare(state, infos, w, v, out)
    memory = state.memory.flushed()                 # the tables with the last step's rows written
    assert memory.inner[0].shape == (6, D) and memory.outer[1].shape == (3, D)
    for k in range(3):
        np.testing.assert_allclose(memory.inner[k], np.stack([m[k] for m in mem_in]), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(state.memory.inner_mean[k], np.mean(memory.inner[k], 0), rtol=1e-10, atol=1e-12)
    for k in range(2):
        np.testing.assert_allclose(memory.outer[k], np.stack([m[k] for m in mem_out]), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(state.memory.outer_mean[k], np.mean(memory.outer[k], 0), rtol=1e-10, atol=1e-12)
    # The stored tables lag one step: only the last drawn rows differ from the flushed ones.
    last_i, last_j = int(infos.inner_index[-1]), int(infos.outer_index[-1])
    assert int(state.memory.inner_pending_index) == last_i and int(state.memory.outer_pending_index) == last_j
    others = np.arange(6) != last_i
    np.testing.assert_array_equal(state.memory.inner[0][others], memory.inner[0][others])


def test_stocbio_matches_the_paper_equations_and_draws_fresh_minibatches():
    state, infos = _run("stocbio")
    w, v, out = numpy_stocbio(infos, 0.1, 0.08, 0.05, T=3, Q=4)
    _compare(state, infos, w, v, out)
    assert infos.inner_index.shape == (STEPS, 3 + 4 + 1) and np.all(infos.oracle_calls == 3 + 4 + 2)
    # The c-th draw of stream i is sampler.index(stream_keys(key, 2)[i], c), c = 8·t + k.
    k_in, k_out = stream_keys(jax.random.key(0), 2)
    drawn = jax.vmap(lambda c: INNER.index(k_in, c))(jnp.arange(STEPS * 8))
    np.testing.assert_array_equal(infos.inner_index, np.asarray(drawn).reshape(STEPS, 8))
    np.testing.assert_array_equal(infos.outer_index, OUTER.indices(k_out, STEPS))


def test_amigo_matches_the_paper_equations():
    state, infos = _run("amigo", v=jnp.asarray(V0))  # warm-started from a carried v
    w, v, out = numpy_amigo(infos, 0.1, 0.08, 0.05, 0.9, T=3, M=2, v=V0.copy())
    _compare(state, infos, w, v, out)
    assert infos.inner_index.shape == (STEPS, 6) and np.all(infos.oracle_calls == 3 + 2 + 2)


def test_new_hparam_values_keys_and_v_do_not_recompile():
    for name in DRIVERS:
        _run(name)
        count = len(TRACES)
        _run(name, key=7, lam=LAM0 + 1.0, v=jnp.asarray(V0))
        assert len(TRACES) == count, f"{name}: a second run with new values retraced"


# --- convergence: a quadratic bilevel problem with a closed-form optimum ---------------------
#
# Inner rows (x, y): ½(xᵀ(w − Mλ) − y)² + ½ρ‖w − Mλ − m‖²; outer rows (u, s): ½(uᵀw − s)².
# Then w*(λ) = Mλ + c with c = A⁻¹(Xᵀy/n + ρm), A = XᵀX/n + ρI, and h(λ) = F(w*(λ)) is a strongly
# convex quadratic: ∇h(λ) = Kᵀ(Kλ + Uc − s)/n_val with K = UM, λ* = argmin ‖Kλ + Uc − s‖ (NumPy).
# With noise = 0 (y = Xm, s = U(Mλ_t + m)) every row's inner gradient vanishes at w*(λ) and every
# row's outer gradient at λ* = λ_t: at the solution (w*, v* = 0, λ*) each minibatch direction is
# zero, so constant step sizes converge geometrically, with no noise floor. With noise > 0 only
# SABA's variance reduction removes the floor.

P, N_TR, N_VAL, RHO = 2, 32, 16, 0.1
_q = np.random.default_rng(1)
QM, QC, LAM_T = _q.normal(size=(D, P)), _q.normal(size=D), np.array([0.5, -1.0])
QX, QU = _q.normal(size=(N_TR, D)), _q.normal(size=(N_VAL, D))
QEPS, QDELTA = _q.normal(size=N_TR), _q.normal(size=N_VAL)


def _q_inner(w, lam, batch):
    x, y = batch
    r = w - QM @ lam
    return 0.5 * jnp.mean((x @ r - y) ** 2) + 0.5 * RHO * jnp.sum((r - QC) ** 2)


def _q_outer(w, lam, batch):
    u, s = batch
    return 0.5 * jnp.mean((u @ w - s) ** 2)


def quadratic(noise):
    """Samplers and the closed-form ∇h of the quadratic problem (NumPy, independent of bilevel)."""
    y = QX @ QC + noise * QEPS
    s = QU @ (QM @ LAM_T + QC) + noise * QDELTA
    c = np.linalg.solve(QX.T @ QX / N_TR + RHO * np.eye(D), QX.T @ y / N_TR + RHO * QC)
    K = QU @ QM
    grad_h = lambda lam: (K @ lam + QU @ c - s) @ K / N_VAL
    samplers = bl.sampler((jnp.asarray(QX), jnp.asarray(y)), 4), bl.sampler((jnp.asarray(QU), jnp.asarray(s)), 4)
    return samplers, grad_h


QPROBLEM = bl.Problem(_q_inner, _q_outer)
_H = [QX[i:i + 4].T @ QX[i:i + 4] / 4 + RHO * np.eye(D) for i in range(0, N_TR, 4)]
ALPHA = 0.5 / max(np.linalg.eigvalsh(h).max() for h in _H)          # 1/(2L) over the minibatch Hessians
GAMMA = 0.1 / np.linalg.eigvalsh((QU @ QM).T @ (QU @ QM) / N_VAL).max()  # λ slower than w (two timescales)
QDRIVERS = {
    "soba": bl.soba(QPROBLEM, ALPHA, GAMMA),
    "saba": bl.saba(QPROBLEM, ALPHA, GAMMA),
    "stocbio": bl.stocbio(QPROBLEM, ALPHA, GAMMA, inner_steps=2, neumann_terms=10, neumann_lr=2 * ALPHA),
    "amigo": bl.amigo(QPROBLEM, ALPHA, GAMMA, inner_steps=2, linear_steps=2, linear_lr=ALPHA),
}
SEEDS, QSTEPS = jax.random.split(jax.random.key(0), 4), 2000


@eqx.filter_jit
def population(driver, inner, outer, keys):
    """A run per seed, vmapped over the keys: the user's one-liner, inside one jit."""
    lam0, w0 = jnp.zeros(P), jnp.zeros(D)
    extra = {"inner": inner, "outer": outer} if isinstance(driver, bl.SABA) else {}
    return jax.vmap(lambda k: driver.run(driver.init(k, lam0, w0, **extra), inner, outer, QSTEPS))(keys)


def _relative_stationarity(name, noise):
    (inner, outer), grad_h = quadratic(noise)
    state, infos = population(QDRIVERS[name], inner, outer, SEEDS)
    assert infos.hparams.shape == (4, QSTEPS, P)
    assert len({tuple(np.asarray(ix[:10]).tolist()) for ix in infos.outer_index}) > 1, "seeds share their draws"
    return np.array([np.linalg.norm(grad_h(np.asarray(lam))) for lam in state.hparams]) / np.linalg.norm(grad_h(np.zeros(P)))


@pytest.mark.parametrize("name", ["soba", "stocbio", "amigo"])
def test_converges_to_the_closed_form_optimum_without_noise(name):
    # Every seed: the directions vanish at the solution, so a correct method contracts to it and
    # 2000 steps reach ~1e-10 or below; a wrong direction (sign of v, cross product at the wrong
    # point, missing term) leaves ∇h of the order of ∇h(λ_0). 1e-6 lies orders from both.
    assert np.max(_relative_stationarity(name, 0.0)) < 1e-6


def test_saba_removes_the_noise_floor_that_soba_keeps():
    # With noisy rows the minibatch directions do not vanish at the solution: SOBA with constant
    # steps stalls at a noise floor (~1e-1 relative here), while SABA converges geometrically
    # to the exact stationary point of the full-data problem (Dagréou et al. 2022, Thm. 3).
    assert np.max(_relative_stationarity("saba", 0.3)) < 1e-6
    assert np.min(_relative_stationarity("soba", 0.3)) > 1e-3


# --- bad input ---------------------------------------------------------------------------


def _amigo(**kw):
    settings = {"inner_steps": 2, "linear_steps": 2, "linear_lr": 0.1} | kw
    return bl.amigo(PROBLEM, 0.1, 0.1, **settings)


def _stocbio(**kw):
    settings = {"inner_steps": 2, "neumann_terms": 2, "neumann_lr": 0.1} | kw
    return bl.stocbio(PROBLEM, 0.1, 0.1, **settings)


@pytest.mark.parametrize("build, match", [
    (lambda: bl.soba(PROBLEM, 0.0, 0.1), "inner_lr` > 0"),
    (lambda: bl.soba(PROBLEM, -0.1, 0.1), "inner_lr` > 0"),
    (lambda: bl.soba(PROBLEM, float("nan"), 0.1), "inner_lr` > 0"),
    (lambda: bl.soba(PROBLEM, 0.1, -1.0), "outer_optimizer` > 0"),
    (lambda: bl.saba(PROBLEM, 0.1, 0.1, linear_lr=0.0), "linear_lr` > 0"),
    (lambda: _stocbio(neumann_lr=-1.0), "neumann_lr` > 0"),
    (lambda: _amigo(linear_lr=0), "linear_lr` > 0"),
    (lambda: _stocbio(inner_steps=0), "inner_steps` >= 1"),
    (lambda: _stocbio(neumann_terms=-1), "neumann_terms` >= 0"),
    (lambda: _amigo(linear_steps=0), "linear_steps` >= 1"),
])
def test_bad_settings_raise_value_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("build, match", [
    (lambda: bl.soba(PROBLEM, "fast", 0.1), "inner_lr"),
    (lambda: bl.soba(_inner, 0.1, 0.1), "bilevel.Problem"),
    (lambda: bl.saba(PROBLEM, 0.1, None), "outer_optimizer"),
    (lambda: _stocbio(inner_steps=2.5), "inner_steps"),
    (lambda: _stocbio(neumann_terms=True), "neumann_terms"),
    (lambda: _amigo(inner_steps="3"), "inner_steps"),
])
def test_bad_setting_types_raise_type_errors(build, match):
    with pytest.raises(TypeError, match=match):
        build()


def test_numpy_counts_and_schedules_are_accepted():
    driver = bl.stocbio(PROBLEM, optax.exponential_decay(0.1, 10, 0.5), 0.1, inner_steps=np.int64(2),
                        neumann_terms=np.int32(0), neumann_lr=np.float64(0.1))
    assert driver.inner_steps == 2 and driver.neumann_terms == 0 and driver.neumann_lr == 0.1


def test_bad_init_arguments_raise():
    driver = DRIVERS["soba"]
    key, lam, w = jax.random.key(0), jnp.asarray(LAM0), jnp.asarray(W0)
    with pytest.raises(ValueError, match="from a run of the same problem"):
        driver.init(key, lam, w, v=jnp.zeros(D + 1))
    with pytest.raises(ValueError, match="tree, shapes and dtypes"):
        driver.init(key, lam, w, v={"w": jnp.zeros(D)})
    with pytest.raises(ValueError, match="tree, shapes and dtypes"):
        driver.init(key, lam, w, v=jnp.zeros(D, jnp.float32))
    with pytest.raises(TypeError, match="PRNG key"):
        driver.init(0, lam, w)
    with pytest.raises(TypeError, match="floating-point"):
        driver.init(key, jnp.arange(3), w)
    with pytest.raises(TypeError, match="samplers as keywords"):
        DRIVERS["saba"].init(key, lam, w)
    with pytest.raises(TypeError, match="bilevel.Sampler"):
        DRIVERS["saba"].init(key, lam, w, inner=TRAIN, outer=OUTER)


def test_bad_step_and_run_arguments_raise():
    driver = DRIVERS["soba"]
    state = driver.init(jax.random.key(0), jnp.asarray(LAM0), jnp.asarray(W0))
    with pytest.raises(TypeError, match="bilevel.Sampler"):
        driver.run(state, TRAIN, OUTER, 5)
    with pytest.raises(TypeError, match="bilevel.Sampler"):
        driver.step(state, INNER, VAL)
    with pytest.raises(ValueError, match="steps to be a Python int >= 1"):
        driver.run(state, INNER, OUTER, 0)
    with pytest.raises(ValueError, match="steps to be a Python int >= 1"):
        driver.run(state, INNER, OUTER, 5.0)
    with pytest.raises(TypeError, match="StochasticState"):
        driver.step((state.params, state.hparams), INNER, OUTER)
    with pytest.raises(TypeError, match="SAGA tables"):
        DRIVERS["saba"].step(state, INNER, OUTER)
    saba_state = DRIVERS["saba"].init(jax.random.key(0), jnp.asarray(LAM0), jnp.asarray(W0), inner=INNER, outer=OUTER)
    with pytest.raises(ValueError, match="memory holds 6 inner minibatches but the inner sampler has 3"):
        DRIVERS["saba"].step(saba_state, bl.sampler(tuple(map(jnp.asarray, TRAIN)), 8), OUTER)
    with pytest.raises(TypeError, match="inner loss"):
        driver.step(state, bl.sampler((jnp.ones((8, D + 1)), jnp.ones(8)), 4), OUTER)
