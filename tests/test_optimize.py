"""The outer-loop driver: trajectories against closed-form hypergradients, warm start, history,
checkpoints and resume, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
import bilevel.testing as blt

EXACT = blt.Ridge.sample(2, dim=6, max_condition=5.0)
CLOSED = bl.solver(lambda h, w0, batch: EXACT.response(h))   # the exact response w*(λ)
LR = 0.5


def numpy_descent(h0, lr, steps, transform=lambda u: u, dtransform=lambda u: 1.0):
    """Gradient descent on u with the closed-form hypergradient, in plain float64 numpy."""
    u, values, us = float(h0), [], []
    for _ in range(steps):
        h = transform(u)
        values.append(float(EXACT.value(h)))
        us.append(u)
        u = u - lr * float(EXACT.hypergrad(h)) * dtransform(u)
    return u, np.array(values), np.array(us)


def run(steps=12, **kw):
    kw.setdefault("progress", False)
    return bl.optimize(EXACT.problem, CLOSED, optax.sgd(LR), jnp.asarray(-1.0), EXACT.params0,
                       EXACT.inner_batch, EXACT.outer_batch, steps, **kw)


def test_trajectory_equals_gradient_descent_on_the_closed_form():
    result = run()
    u, values, us = numpy_descent(-1.0, LR, 12)
    np.testing.assert_allclose(result.hparams, u, rtol=1e-10)
    np.testing.assert_allclose(result.history["value"], values, rtol=1e-10)
    np.testing.assert_allclose(result.history["hparams"][:, 0], us, rtol=1e-10)
    np.testing.assert_array_equal(result.history["step"], np.arange(12))
    assert len(result.history) == 12 and result.history["wall_time"].shape == (12,)


def test_transform_pulls_the_hypergradient_back():
    # u = λ (the penalty itself); the problem takes log λ.
    result = bl.optimize(EXACT.problem, CLOSED, optax.sgd(0.2), jnp.asarray(0.5), EXACT.params0,
                         EXACT.inner_batch, EXACT.outer_batch, 8, transform=jnp.log, progress=False)
    u, values, _ = numpy_descent(0.5, 0.2, 8, transform=np.log, dtransform=lambda u: 1.0 / u)
    np.testing.assert_allclose(result.state.variables, u, rtol=1e-10)
    np.testing.assert_allclose(result.hparams, np.log(u), rtol=1e-10)
    np.testing.assert_allclose(result.history["value"], values, rtol=1e-10)


def test_grad_norm_is_the_pulled_back_hypergradient():
    result = bl.optimize(EXACT.problem, CLOSED, optax.sgd(0.2), jnp.asarray(0.5), EXACT.params0,
                         EXACT.inner_batch, EXACT.outer_batch, 5, transform=jnp.log, progress=False)
    lam = np.exp(result.history["hparams"][:, 0])          # recorded: log λ, what the problem sees
    expected = np.abs([float(EXACT.hypergrad(np.log(v))) / v for v in lam])
    np.testing.assert_allclose(result.history["grad_norm"], expected, rtol=1e-9)


def test_warm_start_chains_inner_solves_and_cold_start_does_not():
    # With a zero outer learning rate λ is fixed; K inner SGD steps per outer step, warm-started
    # N times, are N*K steps of one unroll.
    K, N = 7, 5
    inner = bl.unroll(optax.sgd(0.1), steps=K)
    warm = bl.optimize(EXACT.problem, inner, optax.sgd(0.0), EXACT.hparams, EXACT.params0,
                       EXACT.inner_batch, EXACT.outer_batch, N, progress=False)
    long = bl.response(EXACT.problem, bl.unroll(optax.sgd(0.1), steps=N * K))(
        EXACT.hparams, EXACT.params0, EXACT.inner_batch)
    np.testing.assert_allclose(warm.state.params, long, rtol=1e-12)
    cold = bl.optimize(EXACT.problem, inner, optax.sgd(0.0), EXACT.hparams, EXACT.params0,
                       EXACT.inner_batch, EXACT.outer_batch, N, warm_start=False, progress=False)
    np.testing.assert_array_equal(cold.state.params, EXACT.params0)
    assert np.ptp(cold.history["value"]) == 0.0 and np.ptp(warm.history["value"]) > 0.0


def test_init_step_under_scan_equals_optimize():
    driver = bl.hyperopt(EXACT.problem, CLOSED, optax.adam(0.1))
    state = driver.init(jnp.asarray(-1.0), EXACT.params0)
    step = lambda s, _: driver.step(s, EXACT.inner_batch, EXACT.outer_batch)  # noqa: E731
    final, infos = jax.jit(lambda s: jax.lax.scan(step, s, None, length=10))(state)
    result = bl.optimize(EXACT.problem, CLOSED, optax.adam(0.1), jnp.asarray(-1.0), EXACT.params0,
                         EXACT.inner_batch, EXACT.outer_batch, 10, progress=False)
    np.testing.assert_allclose(final.variables, result.hparams, rtol=1e-12)
    np.testing.assert_allclose(infos.value, result.history["value"], rtol=1e-12)
    assert int(final.step) == 10


def test_vmap_over_starting_points():
    driver = bl.hyperopt(EXACT.problem, CLOSED, optax.sgd(LR))
    starts = jnp.array([-1.0, 0.0, 0.5])
    state = jax.vmap(driver.init, in_axes=(0, None))(starts, EXACT.params0)
    state, _ = jax.vmap(driver.step, in_axes=(0, None, None))(state, EXACT.inner_batch, EXACT.outer_batch)
    expected = [s - LR * float(EXACT.hypergrad(s)) for s in np.asarray(starts)]
    np.testing.assert_allclose(state.variables, expected, rtol=1e-10)


def test_compiles_once_and_data_may_be_a_function_of_the_step():
    traces = []

    def inner(w, h, batch):
        traces.append(1)
        return EXACT.problem.inner(w, h, batch)

    problem = bl.Problem(inner=inner, outer=EXACT.problem.outer)
    batches = [EXACT.inner_batch, jax.tree_util.tree_map(lambda x: 1.1 * x, EXACT.inner_batch)]
    seen = []
    method, outer = bl.unroll(optax.sgd(0.1), steps=5), optax.sgd(0.1)  # same objects: same cache key

    def data(k):
        seen.append(k)
        return batches[k % 2]

    bl.optimize(problem, method, outer, jnp.asarray(0.0), EXACT.params0, data,
                EXACT.outer_batch, 6, progress=False)
    assert seen == list(range(6))
    first = len(traces)
    bl.optimize(problem, method, outer, jnp.asarray(0.3), EXACT.params0, data,
                EXACT.outer_batch, 6, progress=False)
    assert len(traces) == first, "new hyperparameter values or data recompiled the step"
    # The result equals the same loop written by hand.
    driver = bl.hyperopt(problem, method, optax.sgd(0.1))
    state = driver.init(jnp.asarray(0.0), EXACT.params0)
    for k in range(6):
        state, _ = driver.step(state, batches[k % 2], EXACT.outer_batch)
    again = bl.optimize(problem, method, optax.sgd(0.1), jnp.asarray(0.0), EXACT.params0, data,
                        EXACT.outer_batch, 6, progress=False)
    np.testing.assert_allclose(again.hparams, state.variables, rtol=1e-12)


def test_history_records_stats_and_summaries_and_round_trips(tmp_path):
    many = blt.RidgePerCoordinate.sample(0, dim=120)
    method = bl.implicit(bl.unroll(optax.sgd(0.1), steps=10), bl.cg(maxiter=5))
    result = bl.optimize(many.problem, method, optax.sgd(0.1), many.hparams, many.params0,
                         many.inner_batch, many.outer_batch, 3, progress=False)
    h = result.history
    assert {"stats.inner_grad_norm", "stats.solve_residual", "stats.solve_iterations"} <= set(h.keys())
    assert "hparams" not in h.keys()                         # 120 > 100 scalars: a summary
    first = np.asarray(many.hparams)
    np.testing.assert_allclose(
        [h["hparams.mean"][0], h["hparams.min"][0], h["hparams.max"][0], h["hparams.norm"][0]],
        [first.mean(), first.min(), first.max(), np.linalg.norm(first)], rtol=1e-12)
    full = bl.optimize(many.problem, method, optax.sgd(0.1), many.hparams, many.params0,
                       many.inner_batch, many.outer_batch, 2, progress=False, record_hparams="all")
    assert full.history["hparams"].shape == (2, 120)
    for suffix in (".json", ".npz"):
        back = bl.History.load(h.save(tmp_path / f"history{suffix}"))
        assert set(back.keys()) == set(h.keys())
        for key in h.keys():
            np.testing.assert_array_equal(back[key], h[key])


def test_progress_bar_when_asked(capsys):
    run(steps=3, progress=True)
    assert "bilevel.optimize" in capsys.readouterr().err
    run(steps=3)
    assert "bilevel.optimize" not in capsys.readouterr().err


def test_callback_false_stops_early():
    result = run(steps=10, callback=lambda k, state, info: k < 3)
    assert len(result.history) == 4 and int(result.state.step) == 4


# --- checkpoints -------------------------------------------------------------------------


class Stop(Exception):
    pass


def stop_after(step, exc=Stop):
    def callback(k, state, info):
        if k == step:
            raise exc
    return callback


ADAM_RUN = dict(method=bl.implicit(bl.unroll(optax.sgd(0.2), steps=15), bl.cg(maxiter=8)))


def adam_run(steps=10, **kw):
    """A run whose result depends on the warm-started params and on Adam's state."""
    kw.setdefault("progress", False)
    return bl.optimize(EXACT.problem, ADAM_RUN["method"], optax.adam(0.2), jnp.asarray(-1.0),
                       EXACT.params0, EXACT.inner_batch, EXACT.outer_batch, steps, **kw)


@pytest.mark.parametrize("stop_at, every", [(5, 3), (2, 1), (8, 4)])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, stop_at, every):
    whole = adam_run()
    with pytest.raises(Stop):
        adam_run(checkpoint_dir=tmp_path, checkpoint_every=every, callback=stop_after(stop_at))
    resumed = adam_run(checkpoint_dir=tmp_path, checkpoint_every=every, resume=True)
    assert float(resumed.hparams) == float(whole.hparams)        # bit for bit
    np.testing.assert_array_equal(resumed.state.params, whole.state.params)
    np.testing.assert_array_equal(resumed.history["value"], whole.history["value"])
    np.testing.assert_array_equal(resumed.history["step"], np.arange(10))


def test_keyboard_interrupt_saves_the_current_step(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        adam_run(checkpoint_dir=tmp_path, checkpoint_every=100, callback=stop_after(3, KeyboardInterrupt))
    assert (tmp_path / "step_00000004.json").is_file()
    resumed = adam_run(checkpoint_dir=tmp_path, resume=True)
    assert float(resumed.hparams) == float(adam_run().hparams)


def test_resume_can_extend_a_finished_run(tmp_path):
    adam_run(steps=6, checkpoint_dir=tmp_path)
    longer = adam_run(steps=10, checkpoint_dir=tmp_path, resume=True)
    assert float(longer.hparams) == float(adam_run().hparams)
    with pytest.raises(ValueError, match="past steps=4"):
        adam_run(steps=4, checkpoint_dir=tmp_path, resume=True)


def test_keep_limits_the_checkpoints_on_disk(tmp_path):
    adam_run(checkpoint_dir=tmp_path, checkpoint_every=1, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000009.eqx", "step_00000009.json", "step_00000010.eqx", "step_00000010.json"]


def test_resume_on_an_empty_directory_starts_fresh(tmp_path):
    result = adam_run(checkpoint_dir=tmp_path / "new", resume=True)
    assert float(result.hparams) == float(adam_run().hparams)


def test_existing_checkpoints_without_resume_are_refused(tmp_path):
    adam_run(steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        adam_run(steps=2, checkpoint_dir=tmp_path)


@pytest.mark.parametrize("change, named", [
    (dict(method=bl.implicit(bl.unroll(optax.sgd(0.3), steps=15), bl.cg(maxiter=8))), "method"),
    (dict(hparams0=jnp.asarray(-0.5)), "initial values"),
    (dict(outer_optimizer=optax.adam(0.1)), "outer_optimizer"),
    (dict(transform=jnp.negative), "transform"),
])
def test_a_checkpoint_of_another_run_is_refused(tmp_path, change, named):
    adam_run(steps=3, checkpoint_dir=tmp_path)
    args = dict(method=ADAM_RUN["method"], outer_optimizer=optax.adam(0.2), hparams0=jnp.asarray(-1.0))
    args.update(change)
    transform = args.pop("transform", None)
    with pytest.raises(ValueError, match=f"different run: its .*{named}"):
        bl.optimize(EXACT.problem, args["method"], args["outer_optimizer"], args["hparams0"],
                    EXACT.params0, EXACT.inner_batch, EXACT.outer_batch, 6, transform=transform,
                    checkpoint_dir=tmp_path, resume=True, progress=False)


def _corrupt_state(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_manifest(path):
    path.write_text("{not json")


def _remove(path):
    path.unlink()


@pytest.mark.parametrize("suffix, damage, message", [
    (".eqx", _corrupt_state, "SHA-256"),
    (".json", _corrupt_manifest, "manifest cannot be read"),
    (".eqx", _remove, "missing"),
])
def test_a_corrupted_checkpoint_is_an_error_not_a_fresh_start(tmp_path, suffix, damage, message):
    adam_run(steps=4, checkpoint_dir=tmp_path, checkpoint_every=2)
    damage(tmp_path / f"step_00000004{suffix}")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=f"corrupted.*{message}"):
        adam_run(steps=6, checkpoint_dir=tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # nothing overwritten


def test_manifest_records_the_history(tmp_path):
    adam_run(steps=4, checkpoint_dir=tmp_path, checkpoint_every=2)
    manifest = json.loads((tmp_path / "step_00000004.json").read_text())
    assert manifest["step"] == 4 and manifest["history"]["step"] == [0, 1, 2, 3]


def test_unwritable_checkpoint_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write checkpoints"):
        adam_run(steps=2, checkpoint_dir=blocker / "run")


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error, match", [
    (dict(steps=0), ValueError, "steps"),
    (dict(checkpoint_every=0), ValueError, "checkpoint_every"),
    (dict(keep=0), ValueError, "keep"),
    (dict(record_hparams="some"), ValueError, "record_hparams"),
    (dict(callback=3), TypeError, "callback"),
    (dict(transform="exp"), TypeError, "transform"),
    (dict(warm_start=1), TypeError, "warm_start"),
])
def test_bad_settings(kw, error, match):
    args = dict(steps=3)
    args.update(kw)
    steps = args.pop("steps")
    with pytest.raises(error, match=match):
        run(steps=steps, **args)


def test_bad_arguments():
    with pytest.raises(TypeError, match="bilevel.Problem"):
        bl.hyperopt(lambda w: w, CLOSED, optax.sgd(0.1))
    with pytest.raises(TypeError, match="method such as"):
        bl.hyperopt(EXACT.problem, optax.sgd(0.1), optax.sgd(0.1))
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        bl.hyperopt(EXACT.problem, CLOSED, 0.1)
    driver = bl.hyperopt(EXACT.problem, CLOSED, optax.sgd(0.1))
    with pytest.raises(TypeError, match="floating-point"):
        driver.init(jnp.asarray(1), EXACT.params0)
    with pytest.raises(TypeError, match="HyperOptState"):
        driver.step((1.0, 2.0), EXACT.inner_batch, EXACT.outer_batch)
    with pytest.raises(TypeError, match="transform failed"):
        bl.hyperopt(EXACT.problem, CLOSED, optax.sgd(0.1), transform=lambda u: u["x"]).init(
            jnp.asarray(0.0), EXACT.params0)
