"""Learning-rate and momentum schedules as hyperparameters (scheduled_sgd, Maclaurin, Duvenaud &
Adams 2015): the unrolled hypergradient against the adjoint recursion of
bilevel.testing.QuadraticSchedule (NumPy float64, no autodiff), that closed form against
float64 finite differences of its own value, forward mode, jit/vmap without retracing, NaN
past the schedule's end, and the argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import bilevel as bl
import bilevel.testing.strategies as bst
from bilevel._cli_check_schedules import check_rows
from bilevel._schedules import ScheduledSGDState, scheduled_sgd
from bilevel.testing._schedules import QuadraticSchedule

pytestmark = pytest.mark.usefixtures("quick_compilation")


def _hypergrad(exact, **kw):
    return bl.hypergrad(exact.problem, exact.method(**kw))


def _run(exact, hparams=None, **kw):
    h = exact.hparams if hparams is None else hparams
    return _hypergrad(exact, **kw)(h, exact.params0, exact.inner_batch, exact.outer_batch)


def _assert_grads(got, want):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-9, atol=1e-12 * np.abs(want[k]).max())


# ---------------------------------------------------------------- against the closed form


@settings(max_examples=5)
@given(bst.quadratic_schedules(max_dim=4, max_steps=8, momentum=False))
def test_unroll_equals_the_adjoint_recursion_without_momentum(exact):
    assert set(exact.hparams) == {"lr"}
    _check_against_closed_form(exact)


@settings(max_examples=5)
@given(bst.quadratic_schedules(max_dim=4, max_steps=8, momentum=True))
def test_unroll_equals_the_adjoint_recursion_with_momentum(exact):
    assert set(exact.hparams) == {"lr", "momentum"}
    _check_against_closed_form(exact)


def _check_against_closed_form(exact):
    out = _run(exact)
    _assert_grads(out.grad, exact.hypergrad(exact.hparams))
    np.testing.assert_allclose(out.params, exact.response(exact.hparams), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.value, exact.value(exact.hparams), rtol=1e-10)


@pytest.mark.parametrize("momentum", [False, True])
def test_unroll_with_checkpoints_equals_the_adjoint_recursion(momentum):
    exact = QuadraticSchedule.sample(3, dim=3, steps=12, momentum=momentum)
    _assert_grads(_run(exact, checkpoint=4).grad, exact.hypergrad(exact.hparams))


@pytest.mark.parametrize("momentum", [False, True])
def test_closed_form_matches_finite_differences_of_its_value(momentum):
    """Checks the adjoint recursion itself: central differences (float64, step 1e-6, error
    O(1e-12) + rounding O(1e-10 / 1e-6)) of the forward recursion's value."""
    exact = QuadraticSchedule.sample(7, dim=3, steps=6, momentum=momentum)
    h = {k: np.asarray(v, np.float64) for k, v in exact.hparams.items()}
    grads, eps = exact.hypergrad(h), 1e-6
    for k, x in h.items():
        for t in range(exact.steps):
            up, down = ({**h, k: x + s * eps * np.eye(exact.steps)[t]} for s in (1, -1))
            fd = (exact.value(up) - exact.value(down)) / (2 * eps)
            np.testing.assert_allclose(grads[k][t], fd, rtol=1e-6, atol=1e-8)


def test_without_momentum_is_momentum_zero_and_plain_gradient_descent():
    exact = QuadraticSchedule.sample(2, dim=3, steps=5, momentum=False)
    A, b, w = (np.asarray(x) for x in (exact.A, exact.b, exact.w0))
    for a in np.asarray(exact.lr):
        w = w - a * (A @ w - b)
    np.testing.assert_allclose(exact.response(exact.hparams), w, rtol=1e-12)
    with_zero = QuadraticSchedule(exact.A, exact.b, exact.B, exact.c, exact.w0, exact.lr,
                                  jnp.zeros(exact.steps))
    zero = {"lr": exact.lr, "momentum": jnp.zeros(exact.steps)}
    np.testing.assert_allclose(_run(with_zero, zero).grad["lr"], exact.hypergrad(exact.hparams)["lr"],
                               rtol=1e-9)


def test_log_rate_and_logit_momentum_parametrisation_follows_the_chain_rule():
    exact = QuadraticSchedule.sample(4, dim=3, steps=6)
    method = bl.unroll(lambda h: scheduled_sgd(jnp.exp(h["log_lr"]), jax.nn.sigmoid(h["logit_m"])),
                       steps=exact.steps)
    h = {"log_lr": jnp.log(exact.lr), "logit_m": jax.scipy.special.logit(exact.momentum)}
    out = bl.hypergrad(exact.problem, method)(h, exact.params0, exact.inner_batch, exact.outer_batch)
    want = exact.hypergrad(exact.hparams)
    a, m = np.asarray(exact.lr), np.asarray(exact.momentum)
    np.testing.assert_allclose(out.grad["log_lr"], a * want["lr"], rtol=1e-9)
    np.testing.assert_allclose(out.grad["logit_m"], m * (1 - m) * want["momentum"], rtol=1e-9)


# ---------------------------------------------------------------- forward mode, jit, vmap


def test_jvp_equals_the_closed_form_gradient_dotted_with_the_tangent():
    exact = QuadraticSchedule.sample(5, dim=4, steps=10)
    respond = bl.response(exact.problem, exact.method())

    def value(h):
        return exact.problem.outer(respond(h, exact.params0, exact.inner_batch), h, exact.outer_batch)

    rng = np.random.default_rng(0)
    v = {k: jnp.asarray(rng.standard_normal(exact.steps)) for k in exact.hparams}
    val, tangent = jax.jit(lambda h, v: jax.jvp(value, (h,), (v,)))(exact.hparams, v)
    want = exact.hypergrad(exact.hparams)
    np.testing.assert_allclose(val, exact.value(exact.hparams), rtol=1e-10)
    np.testing.assert_allclose(tangent, sum(want[k] @ np.asarray(v[k]) for k in want), rtol=1e-9)


def test_vmap_over_schedules_and_no_retrace_on_new_values():
    exact = QuadraticSchedule.sample(6, dim=3, steps=8)
    traces = []

    def opt(h):
        traces.append(1)  # runs only while tracing
        return scheduled_sgd(h["lr"], h["momentum"])

    hg = jax.jit(jax.vmap(bl.hypergrad(exact.problem, bl.unroll(opt, steps=exact.steps)),
                          in_axes=(0, None, None, None)))
    scales = jnp.array([0.5, 1.0, 1.5])
    for shift in (0.0, 0.1):
        pop = {"lr": scales[:, None] * exact.lr, "momentum": jnp.clip(exact.momentum + shift, 0, 0.95)
               * jnp.ones((3, 1))}
        out = hg(pop, exact.params0, exact.inner_batch, exact.outer_batch)
        if shift == 0.0:
            n_traces = len(traces)
        for i in range(3):
            h = {k: v[i] for k, v in pop.items()}
            _assert_grads({k: g[i] for k, g in out.grad.items()}, exact.hypergrad(h))
    assert len(traces) == n_traces, "new schedule values retraced the hypergradient"


# ---------------------------------------------------------------- past the end of the schedule


def test_an_update_past_the_schedule_end_is_nan():
    opt = scheduled_sgd(jnp.array([0.1, 0.2]), jnp.array([0.5, 0.5]))
    state = opt.init(jnp.ones(2))
    assert isinstance(state, ScheduledSGDState)
    for _ in range(2):
        u, state = opt.update(jnp.ones(2), state)
        assert bool(jnp.all(jnp.isfinite(u)))
    u, state = opt.update(jnp.ones(2), state)
    assert bool(jnp.all(jnp.isnan(u))) and int(state.count) == 3
    plain = scheduled_sgd(jnp.array([0.1]))
    s = plain.init(jnp.ones(2))
    _, s = plain.update(jnp.ones(2), s)
    assert bool(jnp.all(jnp.isnan(plain.update(jnp.ones(2), s)[0])))


@pytest.mark.parametrize("momentum", [False, True])
def test_unrolling_more_steps_than_the_schedule_gives_nan_not_a_reused_rate(momentum):
    exact = QuadraticSchedule.sample(8, dim=3, steps=4, momentum=momentum)
    method = bl.unroll(exact.method().optimizer, steps=exact.steps + 1)
    out = bl.hypergrad(exact.problem, method)(exact.hparams, exact.params0, exact.inner_batch,
                                               exact.outer_batch)
    assert bool(jnp.all(jnp.isnan(out.params))) and bool(jnp.isnan(out.value))
    assert all(bool(jnp.all(jnp.isnan(g))) for g in out.grad.values())


def test_fewer_steps_than_the_schedule_leave_the_rest_with_zero_gradient():
    exact = QuadraticSchedule.sample(9, dim=3, steps=6)
    short = QuadraticSchedule(exact.A, exact.b, exact.B, exact.c, exact.w0, exact.lr[:4], exact.momentum[:4])
    method = bl.unroll(exact.method().optimizer, steps=4)
    out = bl.hypergrad(exact.problem, method)(exact.hparams, exact.params0, exact.inner_batch,
                                               exact.outer_batch)
    want = short.hypergrad(short.hparams)
    for k in want:
        np.testing.assert_allclose(out.grad[k][:4], want[k], rtol=1e-9)
        assert bool(jnp.all(out.grad[k][4:] == 0))


def test_float32_parameters_with_float64_schedules_keep_their_dtype():
    exact = QuadraticSchedule.sample(10, dim=3, steps=6, dtype=jnp.float32)
    h = {k: v.astype(jnp.float64) for k, v in exact.hparams.items()}
    out = _run(exact, h)
    assert out.params.dtype == jnp.float32
    want = exact.hypergrad(exact.hparams)
    # float32 arithmetic over 6 steps: relative error a few hundred float32 eps at most
    for k in want:
        np.testing.assert_allclose(np.asarray(out.grad[k], np.float64), want[k], rtol=1e-4,
                                   atol=1e-4 * np.abs(want[k]).max())


def test_nan_in_the_schedule_gives_nan_never_zero():
    exact = QuadraticSchedule.sample(11, dim=3, steps=5)
    h = {**exact.hparams, "lr": exact.lr.at[2].set(jnp.nan)}
    out = _run(exact, h)
    assert bool(jnp.all(jnp.isnan(out.params)))
    assert bool(jnp.all(jnp.isnan(out.grad["lr"][:3])))


# ---------------------------------------------------------------- bilevel check rows


def test_check_rows_agree_with_the_closed_form():
    rows = check_rows(True)
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"name", "value", "target", "rel_error", "exact", "note"}
        assert row["exact"] and row["rel_error"] <= 1e-12, row
        assert row["value"] == pytest.approx(row["target"], rel=1e-12)


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize("args, error, match", [
    (([[0.1, 0.2]],), ValueError, "1-D with at least one entry"),
    ((jnp.zeros(0),), ValueError, "1-D with at least one entry"),
    ((0.1,), ValueError, r"got shape \(\)"),
    ((jnp.array([1, 2]),), TypeError, "real floating array"),
    (("fast",), TypeError, "learning_rates"),
    ((jnp.ones(3) * 0.1, jnp.ones(2) * 0.9), ValueError, "got 2 momenta for 3 learning rates"),
    ((jnp.ones(3) * 0.1, jnp.ones((3, 1))), ValueError, "`momenta` to be 1-D"),
    ((jnp.ones(3) * 0.1, jnp.array([0, 1, 0])), TypeError, "`momenta` to be a real floating"),
])
def test_scheduled_sgd_refuses_bad_schedules(args, error, match):
    with pytest.raises(error, match=match):
        scheduled_sgd(*args)


def test_quadratic_schedule_refuses_bad_arguments():
    exact = QuadraticSchedule.sample(0, dim=2, steps=3)
    A, b, B, c, w0, lr, m = exact.A, exact.b, exact.B, exact.c, exact.w0, exact.lr, exact.momentum
    with pytest.raises(ValueError, match=r"momentum \(T,\)"):
        QuadraticSchedule(A, b, B, c, w0, lr, m[:2])
    with pytest.raises(ValueError, match="A to be symmetric positive definite"):
        QuadraticSchedule(-A, b, B, c, w0, lr, m)
    with pytest.raises(TypeError, match="real floating arrays"):
        QuadraticSchedule(A, b, B, c, w0, jnp.array([1, 2, 3]), m)
    with pytest.raises(ValueError, match=r"keys \['lr', 'momentum'\]"):
        exact.hypergrad({"lr": lr})
    with pytest.raises(ValueError, match=r"hparams\['lr'\] of shape \(3,\)"):
        exact.value({"lr": lr[:2], "momentum": m})
    with pytest.raises(ValueError, match="steps >= 1"):
        QuadraticSchedule.sample(0, steps=0)
    with pytest.raises(TypeError, match="momentum to be True or False"):
        QuadraticSchedule.sample(0, momentum="yes")
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        bst.quadratic_schedules(min_steps=5, max_steps=2)
    with pytest.raises(TypeError, match="True, False or None"):
        bst.quadratic_schedules(momentum=1)
    with pytest.raises(TypeError, match="x64 to be True or False"):
        check_rows(1)


def test_the_state_is_a_named_tuple_and_optax_chains_it():
    opt = optax.chain(optax.clip(1.0), scheduled_sgd(jnp.full(3, 0.5), jnp.full(3, 0.5)))
    state = opt.init({"w": jnp.ones(2)})
    assert isinstance(state[1], ScheduledSGDState) and state[1].velocity["w"].shape == (2,)
    assert scheduled_sgd(jnp.full(3, 0.5)).init(jnp.ones(2)).velocity is None


# ---------------------------------------------------------------- the digits benchmark script


@pytest.mark.slow
def test_digits_benchmark_quick_run_writes_results_and_figure(tmp_path):
    """benchmarks/lr_schedule_digits.py --quick (T = 10, 3 outer steps; about 35 s, compiling)."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "lr_schedule_digits.py"
    spec = importlib.util.spec_from_file_location("lr_schedule_digits", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--quick", "--out", str(tmp_path), "--figure", str(tmp_path / "fig.png")])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == result["rows"] and len(saved["rows"]) == 4
    assert (tmp_path / "results.md").read_text().count("\n| ") == 5 and (tmp_path / "fig.png").stat().st_size > 0
    for row in saved["rows"].values():
        assert all(np.isfinite(v) for v in row.values())
    for hist in saved["history"].values():
        assert len(hist) == 4 and np.all(np.isfinite(hist))      # 3 outer steps and the final value
    # the learned schedules start from the best constants: their first values are the baselines'
    rows = saved["rows"]
    assert saved["history"]["rates only"][0] == pytest.approx(rows["best constant rate"]["val_loss"], rel=1e-5)
    assert len(saved["learned"]["rates and momenta"]["momentum"]) == 10
