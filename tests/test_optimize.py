"""The outer-loop driver: trajectories against closed-form hypergradients, warm start, history,
checkpoints and resume, and bad input."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel as bl
import bilevel.testing as blt
from bilevel._optimize import OptimizeError, OptimizeWarning

# Compile-bound (many small programs): compiled with `jax_disable_most_optimizations`
# (tests/conftest.py's `quick_compilation`), the same programs with fewer backend passes.
pytestmark = pytest.mark.usefixtures("quick_compilation")

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
    state = jax.jit(jax.vmap(driver.init, in_axes=(0, None)))(starts, EXACT.params0)
    state, _ = jax.jit(jax.vmap(driver.step, in_axes=(0, None, None)))(state, EXACT.inner_batch, EXACT.outer_batch)
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
    state, step = driver.init(jnp.asarray(0.0), EXACT.params0), jax.jit(driver.step)   # one compile
    for k in range(6):
        state, _ = step(state, batches[k % 2], EXACT.outer_batch)
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


# --- failed steps and unreliable solves -------------------------------------------------

DIVERGING = bl.implicit(bl.unroll(optax.sgd(0.2), steps=15), bl.neumann(terms=20, alpha=5.0))


def nan_from(step):
    """Validation data that turns NaN at outer step `step`."""
    x, y = EXACT.outer_batch
    bad = (x.at[0, 0].set(jnp.nan), y)
    return lambda k: bad if k >= step else EXACT.outer_batch


def test_a_diverged_solve_stops_the_run_by_default():
    with pytest.raises(OptimizeError, match=r"step 0: stats\['neumann_diverged'\] is True.*alpha") as err:
        bl.optimize(EXACT.problem, DIVERGING, optax.sgd(LR), jnp.asarray(-1.0), EXACT.params0,
                    EXACT.inner_batch, EXACT.outer_batch, 20, progress=False)
    assert err.value.step == 0 and int(err.value.result.state.step) == 0
    assert float(err.value.result.hparams) == -1.0 and len(err.value.result.history) == 0


def test_nan_data_stops_the_run_and_keeps_the_last_good_state(tmp_path):
    whole = run(steps=3)
    with pytest.raises(OptimizeError, match=r"stopped at step 3: the validation loss \(value\) is nan.*"
                                            r"hypergradient is not finite") as err:
        bl.optimize(EXACT.problem, CLOSED, optax.sgd(LR), jnp.asarray(-1.0), EXACT.params0,
                    EXACT.inner_batch, nan_from(3), 12, progress=False, checkpoint_dir=tmp_path,
                    checkpoint_every=2)
    good = err.value.result
    assert int(good.state.step) == 3 and len(good.history) == 3
    assert float(good.hparams) == float(whole.hparams) and np.isfinite(good.history["value"]).all()
    # The state before the failed step is the newest checkpoint; nothing after it was written.
    assert err.value.checkpoint == tmp_path / "step_00000003.json"
    assert str(err.value.checkpoint) in str(err.value)
    assert ckpt_steps(tmp_path) == [2, 3]
    manifest = json.loads(err.value.checkpoint.read_text())
    assert manifest["history"]["step"] == [0, 1, 2]


def ckpt_steps(directory):
    return sorted(int(p.stem[5:]) for p in directory.glob("step_*.json"))


def test_on_failure_warn_warns_once_and_carries_on():
    with pytest.warns(OptimizeWarning) as caught:
        result = bl.optimize(EXACT.problem, DIVERGING, optax.sgd(LR), jnp.asarray(-1.0), EXACT.params0,
                             EXACT.inner_batch, EXACT.outer_batch, 6, progress=False, on_failure="warn")
    assert len(result.history) == 6 and result.history["stats.neumann_diverged"].all()
    messages = [str(w.message) for w in caught if issubclass(w.category, OptimizeWarning)]
    assert messages[0].startswith("bilevel.optimize: at step 0, stats['neumann_diverged'] is True")
    assert sum("neumann_diverged" in m for m in messages) == 1        # once, not at every step
    assert len(messages) <= 2                                         # the NaNs that follow: once


def test_on_failure_continue_is_silent(recwarn):
    result = bl.optimize(EXACT.problem, CLOSED, optax.sgd(LR), jnp.asarray(-1.0), EXACT.params0,
                         EXACT.inner_batch, nan_from(0), 4, progress=False, on_failure="continue")
    assert np.isnan(result.history["value"]).all() and np.isnan(float(result.hparams))
    assert not [w for w in recwarn if issubclass(w.category, OptimizeWarning)]


def test_a_sustained_inexact_linear_solve_warns_once():
    loose = bl.implicit(bl.unroll(optax.sgd(0.2), steps=15), bl.cg(maxiter=1))   # residual ≈ 0.58
    with pytest.warns(OptimizeWarning) as caught:
        bl.optimize(EXACT.problem, loose, optax.sgd(LR), jnp.asarray(-1.0), EXACT.params0,
                    EXACT.inner_batch, EXACT.outer_batch, 8, progress=False)
    messages = [str(w.message) for w in caught if "solve_residual" in str(w.message)]
    assert len(messages) == 1
    for part in ("0.58", "step 4", "residual_warning=0.1", "maxiter", "inner solve", "gmres"):
        assert part in messages[0], part


@pytest.mark.parametrize("maxiter, threshold", [(3, 0.1), (1, None), (1, 0.9)])
def test_no_residual_warning_for_an_accurate_solve_or_when_off(recwarn, maxiter, threshold):
    method = bl.implicit(bl.unroll(optax.sgd(0.2), steps=15), bl.cg(maxiter=maxiter))
    bl.optimize(EXACT.problem, method, optax.sgd(LR), jnp.asarray(-1.0), EXACT.params0,
                EXACT.inner_batch, EXACT.outer_batch, 6, progress=False, residual_warning=threshold)
    assert not [w for w in recwarn if issubclass(w.category, OptimizeWarning)]


def test_negative_curvature_warns_but_does_not_stop():
    from bilevel._optimize import HyperOptInfo, _failures, _Monitor

    info = HyperOptInfo(np.float64(1.0), np.float64(2.0), np.float64(0.5),
                        {"solve_residual": np.float64(1e-9), "solve_negative_curvature": np.bool_(True)})
    assert _failures(info, np.float64(0.5)) == []
    monitor = _Monitor("raise", 0.1, 5)
    (message,) = monitor.messages(3, info, [])
    assert "step 3" in message and "negative_curvature" in message and "gmres" in message
    assert monitor.messages(4, info, []) == []                   # once per run


@pytest.mark.parametrize("kw, match", [
    (dict(on_failure="ignore"), "on_failure"),
    (dict(residual_warning=0.0), "residual_warning"),
    (dict(residual_warning=True), "residual_warning"),
])
def test_bad_policy_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        run(steps=2, **kw)


# --- what a resume checks ----------------------------------------------------------------

SCALE = 1.0


def scaled_outer(w, h, batch):
    return SCALE * EXACT.problem.outer(w, h, batch)


def trig_inner(which):
    """Two losses that differ only in the function they call: the same bytecode and constants."""
    if which == "sin":
        def inner(w, h, batch):
            return EXACT.problem.inner(w, h, batch) + 0.01 * jnp.sum(jnp.sin(w))
    else:
        def inner(w, h, batch):
            return EXACT.problem.inner(w, h, batch) + 0.01 * jnp.sum(jnp.cos(w))
    return inner


def resume_with(tmp_path, problem, **kw):
    return bl.optimize(problem, CLOSED, optax.sgd(LR), jnp.asarray(-1.0), EXACT.params0,
                       EXACT.inner_batch, EXACT.outer_batch, 6, checkpoint_dir=tmp_path,
                       progress=False, **kw)


def test_resume_refuses_a_loss_that_calls_another_function(tmp_path):
    first = bl.Problem(inner=trig_inner("sin"), outer=EXACT.problem.outer)
    resume_with(tmp_path, first, callback=lambda k, s, i: k < 2)
    edited = bl.Problem(inner=trig_inner("cos"), outer=EXACT.problem.outer)
    with pytest.raises(ValueError, match="different run: its problem"):
        resume_with(tmp_path, edited, resume=True)
    assert len(resume_with(tmp_path, first, resume=True).history) == 6


def test_resume_refuses_a_changed_module_constant(tmp_path, monkeypatch):
    problem = bl.Problem(inner=EXACT.problem.inner, outer=scaled_outer)
    resume_with(tmp_path, problem, callback=lambda k, s, i: k < 2)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 2.0)
    with pytest.raises(ValueError, match="different run: its problem"):
        resume_with(tmp_path, problem, resume=True)


def test_resume_checks_the_user_fingerprint(tmp_path):
    resume_with(tmp_path, EXACT.problem, callback=lambda k, s, i: k < 2, fingerprint={"data": "v1"})
    with pytest.raises(ValueError, match="different run: its fingerprint"):
        resume_with(tmp_path, EXACT.problem, resume=True, fingerprint={"data": "v2"})
    with pytest.raises(ValueError, match="different run: its fingerprint"):
        resume_with(tmp_path, EXACT.problem, resume=True)
    assert len(resume_with(tmp_path, EXACT.problem, resume=True, fingerprint={"data": "v1"}).history) == 6


def test_a_fingerprint_must_be_json():
    with pytest.raises(TypeError, match="fingerprint"):
        run(steps=2, fingerprint=object())


def _edit_history(manifest):
    manifest["history"]["value"][0] = 0.0


def _older_format(manifest):
    manifest["format"] = "bilevel-checkpoint/1"


@pytest.mark.parametrize("edit, match", [(_edit_history, "corrupted.*edited"),
                                         (_older_format, "format 'bilevel-checkpoint/1'")])
def test_an_edited_manifest_is_refused(tmp_path, edit, match):
    adam_run(steps=4, checkpoint_dir=tmp_path, checkpoint_every=2)
    path = tmp_path / "step_00000004.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=match):
        adam_run(steps=6, checkpoint_dir=tmp_path, resume=True)


# --- compiling once across calls ---------------------------------------------------------


def counted_inner(w, h, batch):
    counted_inner.traces += 1          # an attribute: the fingerprint of the loss does not see it
    return EXACT.problem.inner(w, h, batch)


counted_inner.traces = 0


def test_a_second_call_with_freshly_built_method_and_optimizer_does_not_recompile():
    problem = bl.Problem(inner=counted_inner, outer=EXACT.problem.outer)

    def call(lr=0.1):
        method = bl.implicit(bl.unroll(optax.sgd(0.1), steps=5), bl.cg(maxiter=4))
        return bl.optimize(problem, method, optax.adam(lr), jnp.asarray(0.0), EXACT.params0,
                           EXACT.inner_batch, EXACT.outer_batch, 3, progress=False)

    first = call()
    traced = counted_inner.traces
    assert traced > 0
    again = call()
    assert counted_inner.traces == traced, "an identically built method and optimizer recompiled"
    np.testing.assert_array_equal(again.history["value"], first.history["value"])
    other = call(lr=0.3)                                  # another learning rate: a new compile
    assert counted_inner.traces > traced
    assert float(other.hparams) != float(first.hparams)


def test_same_code_with_different_closures_is_not_shared():
    def make(c):
        return bl.Problem(inner=lambda w, h, b: EXACT.problem.inner(w, h, b) + c * jnp.sum(w),
                          outer=EXACT.problem.outer)

    method = bl.unroll(optax.sgd(0.1), steps=5)
    a = bl.optimize(make(0.0), method, optax.sgd(LR), jnp.asarray(-1.0), EXACT.params0,
                    EXACT.inner_batch, EXACT.outer_batch, 2, progress=False)
    b = bl.optimize(make(1.0), method, optax.sgd(LR), jnp.asarray(-1.0), EXACT.params0,
                    EXACT.inner_batch, EXACT.outer_batch, 2, progress=False)
    assert a.history["value"][1] != b.history["value"][1]


# --- history values ----------------------------------------------------------------------


@pytest.mark.parametrize("record", ["all", "summary"])
def test_history_holds_plain_python_numbers(record):
    result = run(steps=2, record_hparams=record)
    h = result.history
    assert type(h.columns["value"][0]) is float and type(h.columns["step"][0]) is int
    for key, column in h.columns.items():
        for value in column:
            values = value if isinstance(value, list) else [value]
            assert all(type(v) in (float, int) for v in values), (key, value)
    assert "np." not in repr(h.row(-1)) and h.row(-1)["step"] == 1
