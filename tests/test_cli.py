"""The command line: every subcommand runs, writes what it says, and fails clearly on bad input.

Each command runs as `python -m bilevel ...` in a fresh interpreter. Two things keep the time
down. The runs that do work compile with `JAX_DISABLE_MOST_OPTIMIZATIONS=1` (they are
compile-bound, as the documentation pages tests/test_docs_pages.py runs that way are). The
calls that only print help or reject their arguments (about 25, each ~2 s of interpreter and
JAX start-up for a few milliseconds of work) run together in one interpreter
(`quick_calls`): each is `runpy.run_module("bilevel", run_name="__main__")`, which is what
`python -m bilevel` does, with its own `sys.argv`, stdout and stderr, its exit status taken
from `SystemExit` and any other exception printed as the interpreter would (a traceback, status
1). The three demo runs that do work share one interpreter the same way (`demo_runs`); `check`
and `bench` run in interpreters of their own. Every case keeps its own assertions.

The working runs inherit `--xla_cpu_use_fusion_emitters=false` in XLA_FLAGS from tests/conftest.py:
XLA:CPU then emits its fusions with the older loop emitters, whose compilation is far cheaper
on these tiny programs (`bilevel check`: backend compile 14.4 s -> 5.8 s, the run 23.6 s ->
15.0 s on 2 shared cores; its errors stay at ~1e-15).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bilevel as bl


QUICK_ENV = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # XLA_FLAGS as tests/conftest.py set it


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "bilevel", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=QUICK_ENV)


_RUN_EACH = r"""
import contextlib, io, json, runpy, sys, traceback

results = []
for argv in json.loads(sys.stdin.read()):
    out, err, status = io.StringIO(), io.StringIO(), 0
    sys.argv = ["bilevel", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("bilevel", run_name="__main__", alter_sys=True)   # python -m bilevel
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                status = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
                status = 1
        except BaseException:
            traceback.print_exc()
            status = 1
    results.append({"returncode": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, sys.__stdout__)
"""

# Calls that only print help or are refused before any work: run together by `quick_calls`.
HELP_COMMANDS = ["check", "demo", "bench", "multiprocess", None]
DEMO_BAD_INPUT = [
    (("--data", "cifar"), "invalid choice: 'cifar'"),
    (("--data", "mnist"), "needs --data-path"),
    (("--data", "mnist", "--data-path", "/nonexistent/mnist.npz"), "/nonexistent/mnist.npz"),
    (("--data-path", "x.npz"), "only for --data mnist"),
    (("--num-train", 100), "--num-train is only for --data mnist"),
    (("--num-val", 100), "--num-val is only for --data mnist"),
    (("--data", "mnist", "--data-path", "x.npz", "--num-train", 0), "--num-train must be >= 1"),
    (("--methods", "unroll", "magic"), "unknown method"),
    (("--outer-steps", 0), "--outer-steps must be >= 1"),
    (("--lr", 0, "--methods", "unroll"), "--lr must be a positive finite number"),
    (("--lr", -1), "--lr must be a positive finite number"),
    (("--lr", "nan"), "--lr must be a positive finite number"),
    (("--outer-lr", 0), "--outer-lr must be a positive finite number"),
    (("--log-lam0", "inf"), "--log-lam0 must be a finite number"),
    (("--seed", -1), "--seed must be >= 0"),
]
BENCH_BAD_INPUT = [
    (("--repeats", 0), "--repeats, --cg-iters and --devices >= 1"),
    (("--devices", 0), "--repeats, --cg-iters and --devices >= 1"),
    (("--sections", "speed"), "invalid choice: 'speed'"),
    (("--dtypes", "float16"), "invalid choice: 'float16'"),
]


def _quick_argvs(base):
    """{case: argv} of every quick call; `base / case` is the case's own directory."""
    calls = {f"help-{c}": [*([c] if c else []), "--help"] for c in HELP_COMMANDS}
    calls.update({f"demo-bad-{i}": ["demo", *args, "--out", base / f"demo-bad-{i}" / "out"]
                  for i, (args, _) in enumerate(DEMO_BAD_INPUT)})
    calls.update({f"bench-bad-{i}": ["bench", *args, "--out", base / f"bench-bad-{i}"]
                  for i, (args, _) in enumerate(BENCH_BAD_INPUT)})
    calls["demo-argparse"] = ["demo", "--lr", 0, "--out", base / "demo-argparse" / "out"]
    calls["demo-unwritable"] = ["demo", "--out", base / "demo-unwritable" / "file" / "out"]
    return calls


def run_each(calls, base, env=None):
    """`case -> (CompletedProcess, base / case)` for `{case: argv}`: every argv through `_RUN_EACH`,
    in order, in one interpreter."""
    proc = subprocess.run([sys.executable, "-c", _RUN_EACH], input=json.dumps(
        [[str(a) for a in argv] for argv in calls.values()]), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    return {case: (subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"]), base / case)
            for (case, argv), r in zip(calls.items(), results)}


@pytest.fixture(scope="module")
def quick_calls(tmp_path_factory):
    """`case -> (CompletedProcess, the case's directory)` for every quick call, one interpreter."""
    base = tmp_path_factory.mktemp("quick_calls")
    calls = _quick_argvs(base)
    for case in calls:
        (base / case).mkdir()
    (base / "demo-unwritable" / "file").write_text("")   # a file where the output directory should go
    return run_each(calls, base)


def test_check_command_runs_every_method_and_passes():
    out = cli("check", "--dim", 5, "--steps", 300)
    assert out.returncode == 0, out.stderr
    for name in ("unroll", "truncate(last=50)", "forward_mode", "implicit(cg)", "implicit(identity)",
                 "implicit(cg, gauss-newton)", "drmad"):
        assert f"\n{name}" in out.stdout, name
    for name in ("drmad vs its straight-line closed form", "gauss-newton, zero-residual least squares",
                 "scheduled_sgd", "dropout_expectation", "gumbel_softmax", "kfold CV", "Laplace", "−ELBO"):
        assert f"\n{name}" in out.stdout, name        # every method and objective of the seeds has a row
    assert "OK: worst error of the exact methods" in out.stdout


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help(command, quick_calls):
    out, _ = quick_calls[f"help-{command}"]
    assert out.returncode == 0 and "usage: bilevel" in out.stdout


SMALL = ("--outer-steps", 3, "--inner-steps", 5, "--eval-steps", 20, "--quiet")


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """`case -> (CompletedProcess, the case's directory)` for the demo runs that do work.

    They run one after the other in one interpreter, as `quick_calls` do (`python -m bilevel`
    through runpy, each with its own argv, stdout, stderr and exit status), compiled with
    `QUICK_ENV` as `cli` runs them: the interpreter start and the demo's
    imports (JAX, matplotlib, scikit-learn: ~4.5 s of CPU) are paid once, not per run. The
    demo sets no global state (no JAX config, no environment); `check` (which turns on float64)
    and `bench` (which sets XLA flags) keep interpreters of their own.

    - `digits`: two methods, the learning rate and starting penalty given explicitly (the NumPy
      reference of `test_demo_start_row_is_plain_logistic_regression` uses them);
    - `mnist`: a tiny MNIST-format file (`mnist/tiny-mnist.npz`), output in `mnist/out`;
    - `diverged`: --lr 50.
    """
    base = tmp_path_factory.mktemp("demo_runs")
    rng = np.random.default_rng(0)
    (base / "mnist").mkdir()
    path = base / "mnist" / "tiny-mnist.npz"
    np.savez(path, x_train=rng.integers(0, 256, (300, 784), dtype=np.uint8), y_train=rng.integers(0, 10, 300, dtype=np.uint8),
             x_test=rng.integers(0, 256, (50, 784), dtype=np.uint8), y_test=rng.integers(0, 10, 50, dtype=np.uint8))
    calls = {
        "digits": ["demo", *SMALL, "--methods", "unroll", "implicit-cg", "--lr", 0.1, "--log-lam0", -3,
                   "--out", base / "digits"],
        "mnist": ["demo", *SMALL, "--data", "mnist", "--data-path", path, "--num-train", 200, "--num-val", 100,
                  "--methods", "identity", "--out", base / "mnist" / "out"],
        "diverged": ["demo", *SMALL, "--lr", 50, "--methods", "implicit-neumann", "--out", base / "diverged"],
    }
    return run_each(calls, base, env=QUICK_ENV)


def test_demo_on_digits_writes_table_plot_and_histories(demo_runs):
    out, tmp_path = demo_runs["digits"]
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "results.json").read_text())
    assert set(rows) == {"start (no tuning)", "unroll", "implicit-cg", "random search"}
    assert rows["unroll"]["hypergradients"] == 3 and rows["random search"]["trainings"] == 3
    for row in rows.values():
        assert np.isfinite(row["val_loss"]) and 0 <= row["test_accuracy"] <= 1
    history = bl.History.load(tmp_path / "history_unroll.json")
    np.testing.assert_array_equal(history["step"], [0, 1, 2])
    assert (tmp_path / "validation_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| unroll |" in out.stdout and "| random search |" in out.stdout


def test_demo_start_row_is_plain_logistic_regression(demo_runs):
    """The untuned row equals an independent numpy training at the starting penalty.

    The run is `demo_runs["digits"]` (--lr 0.1 --log-lam0 -3); the start row does not depend on
    which methods are tuned after it."""
    out, tmp_path = demo_runs["digits"]
    assert out.returncode == 0, out.stderr
    row = json.loads((tmp_path / "results.json").read_text())["start (no tuning)"]
    data = bl.datasets.digits(seed=0)
    (X, y), (Xv, yv) = (tuple(np.asarray(a, np.float64) for a in s) for s in (data.train, data.val))
    W, b, vW, vb, lam = np.zeros((64, 10)), np.zeros(10), np.zeros((64, 10)), np.zeros(10), np.exp(-3.0)
    onehot = np.eye(10)[y.astype(int)]
    for _ in range(20):                       # SGD with momentum 0.9 (optax's form), lr 0.1
        z = X @ W + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        gW, gb = X.T @ (p - onehot) / len(y) + lam * W, (p - onehot).mean(0)
        vW, vb = 0.9 * vW + gW, 0.9 * vb + gb
        W, b = W - 0.1 * vW, b - 0.1 * vb
    z = Xv @ W + b
    val = np.mean(np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(len(yv)), yv.astype(int)])
    assert row["val_loss"] == pytest.approx(val, rel=1e-4)       # the demo runs in float32


def test_demo_on_mnist_from_a_path(demo_runs):
    out, _ = demo_runs["mnist"]   # 300/50 random 28×28 images written to an .npz
    assert out.returncode == 0, out.stderr
    assert "mnist, 200/100/50 train/val/test, 784 features" in out.stdout


@pytest.mark.parametrize("case", range(len(DEMO_BAD_INPUT)), ids=lambda i: DEMO_BAD_INPUT[i][1])
def test_demo_bad_input(case, quick_calls):
    """Rejected up front: status 2, the message, no traceback, and no output directory left behind."""
    _, message = DEMO_BAD_INPUT[case]
    out, tmp_path = quick_calls[f"demo-bad-{case}"]
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_demo_bad_argument_reads_like_argparse(quick_calls):
    out, _ = quick_calls["demo-argparse"]
    assert out.stderr.startswith("usage: bilevel demo") and "bilevel demo: error: --lr" in out.stderr, out.stderr


def test_demo_flags_diverged_rows(demo_runs):
    """--lr 50 blows up the from-scratch trainings and the Neumann series (alpha = lr): the rows
    say so instead of showing a loss of 1e22, and a method whose tuning fails stops alone."""
    out, tmp_path = demo_runs["diverged"]
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows["random search"]["diverged"] and rows["start (no tuning)"]["diverged"]
    assert "| random search (diverged) |" in out.stdout and "| start (no tuning) (diverged) |" in out.stdout
    assert "A (diverged) row: the training from scratch" in out.stdout and "Lower --lr." in out.stdout
    assert rows["implicit-neumann"]["stopped"].startswith("stopped at step ")
    assert rows["implicit-neumann"]["hypergradients"] < 3
    assert "implicit-neumann (stopped early): bilevel.optimize stopped at step" in out.stdout


def _row(val, train_objective=0.1, **extra):
    return {"val_loss": val, "test_loss": val, "test_accuracy": 0.9, "train_objective": train_objective,
            "hypergradients": 3, "wall_time": 1.0, **extra}


@pytest.mark.parametrize("row, expected", [
    (_row(0.12), False),
    (_row(0.12, train_objective=2.2), False),     # below log 10 = 2.303: still learning
    (_row(0.12, train_objective=2.4), True),      # above the all-zero start's objective
    (_row(float("nan")), True),
    (_row(1e22, train_objective=float("inf")), True),
])
def test_diverged(row, expected):
    from bilevel import _demo

    assert _demo.diverged(row, classes=10) is expected


def test_table_footer_and_plot_caption_explain_the_curves(tmp_path):
    """The footer says how rows are judged, names rising curves and rows worse than the start."""
    from bilevel import _demo

    rows = {"start (no tuning)": _row(0.13), "unroll": _row(0.11), "truncate": _row(0.14),
            "identity": _row(5.0, train_objective=9.0), "random search": _row(0.15, trainings=3)}
    for row in rows.values():
        row["diverged"] = _demo.diverged(row, classes=10)
    t = np.arange(3.0)
    curves = {"unroll": (t, np.array([0.15, 0.12, 0.11])), "truncate": (t, np.array([0.15, 0.13, 0.16])),
              "identity": (t, np.array([0.15, 0.5, 3.0])), "random search": (t, np.array([0.2, 0.15, 0.15]))}
    _demo._write(tmp_path, rows, curves, "toy", "per-class", classes=10, inner_steps=5, eval_steps=20, lr=0.1)
    table = (tmp_path / "results.md").read_text()
    assert "| identity (diverged) |" in table and "| unroll |" in table
    assert "retrained from scratch (20 steps)" in table and "warm-started inner parameters (5 steps" in table
    assert "Worse than the start (no tuning): truncate." in table          # identity diverged: not listed
    assert "Random search: none of its 3 draws beat the start" in table
    assert "end above their first point: truncate, identity." in table
    assert "A (diverged) row" in table and "--lr 0.1" in table
    assert (tmp_path / "validation_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    caption = _demo._caption(rows, curves, inner_steps=5, eval_steps=20)
    assert "warm-started" in caption and "retrained from scratch (20 steps)" in caption
    assert "Ending above their start (truncate, identity)" in caption and "Diverged, not marked: identity" in caption


def test_demo_unwritable_output(quick_calls):
    out, _ = quick_calls["demo-unwritable"]   # its directory holds a plain file named "file"
    assert out.returncode == 2 and "cannot write to the output directory" in out.stderr


def test_bench_quick_writes_json_and_markdown(tmp_path):
    out = cli("bench", "--quick", "--sections", "ratios", "compile", "--problems", "ridge", "--dtypes", "float64",
              "--repeats", 1, "--out", tmp_path, "--quiet")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result) >= {"ratios", "compile"} and "memory" not in result
    (run,) = result["ratios"]
    assert (run["case"], run["dtype"]) == ("ridge", "float64")
    assert all(t["ratio"] > 0 for t in run["targets"])
    markdown = (tmp_path / "bench.md").read_text()
    assert "## Target ratios" in markdown and "## Compile time" in markdown
    assert markdown in out.stdout


@pytest.mark.parametrize("case", range(len(BENCH_BAD_INPUT)), ids=lambda i: BENCH_BAD_INPUT[i][1])
def test_bench_bad_input(case, quick_calls):
    _, message = BENCH_BAD_INPUT[case]
    out, _ = quick_calls[f"bench-bad-{case}"]
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_bench_sections_match_the_suite():
    from bilevel import __main__, _bench

    assert __main__._BENCH_SECTIONS == _bench.SECTIONS
