"""The command line: `python -m bilevel ...` or `bilevel ...`.

- `bilevel demo` tunes L2 penalties of a logistic regression on scikit-learn's digits (or
  MNIST) with every method and random search, and writes a table, plots and histories.
- `bilevel check` runs every method on an exact ridge-regression problem from
  `bilevel.testing` and prints each hypergradient beside the closed-form value, with its
  error and time: the quick "does my install compute the right numbers" command.
- `bilevel multiprocess --processes N` starts N local processes on JAX's distributed
  runtime and checks a data-parallel hypergradient and a population split across them
  against the single-process run.
- `bilevel bench` runs the microbenchmark suite: each method against hand-written JAX and
  jaxopt, memory, compile time, vmapped populations, sharding and Lasso hypergradients.
"""

from __future__ import annotations

import argparse
import sys
import time

_BENCH_SECTIONS = ("ratios", "memory", "compile", "vmap", "sharding", "lasso")
METHOD_NAMES = ("unroll", "truncate", "implicit-cg", "implicit-neumann", "identity", "forward_mode")


def _methods(steps: int, lr: float):
    import jax.numpy as jnp
    import optax

    import bilevel as bl

    forward = bl.unroll(optax.sgd(lr), steps=steps)
    return {
        "unroll": forward,
        "unroll(checkpoint)": bl.unroll(optax.sgd(lr), steps=steps, checkpoint=max(1, int(steps**0.5))),
        "truncate(last=50)": bl.truncate(forward, last=min(50, steps)),
        "forward_mode": bl.forward_mode(forward),
        "implicit(exact)": bl.implicit(forward, bl.exact()),
        "implicit(cg)": bl.implicit(forward, bl.cg(maxiter=100, tol=1e-10)),
        "implicit(gmres)": bl.implicit(forward, bl.gmres(maxiter=5, tol=1e-10)),
        "implicit(neumann 50)": bl.implicit(forward, bl.neumann(terms=50, alpha=lr)),
        "implicit(identity)": bl.implicit(forward, bl.identity()),
        "implicit(cg, gauss-newton)": bl.implicit(forward, bl.cg(maxiter=100, tol=1e-10), hessian=bl.gauss_newton(
            lambda w, h, b: b[0] @ w, lambda z, h, b: 0.5 * jnp.mean((z - b[1]) ** 2))),
        "drmad": bl.drmad(forward),
    }


def _time(fn, *args, repeats: int = 5):
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return out, compile_s, sorted(runs)[len(runs) // 2]


def _ridge(args, **sizes):
    """The ridge problem `check` runs on, and a stable SGD step 1/L."""
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import bilevel.testing as blt

    dtype = jnp.float64 if args.x64 else jnp.float32
    exact = blt.Ridge.sample(args.seed, dim=args.dim, max_condition=10.0, dtype=dtype, **sizes)
    lr = 1.0 / float(jnp.linalg.eigvalsh(exact.hessian(exact.hparams)).max())
    return exact, lr


def check(args) -> int:
    """Run every method on a ridge problem and print errors against the exact hypergradient."""
    exact, lr = _ridge(args)
    import jax
    import jax.numpy as jnp

    import bilevel as bl
    from bilevel.testing._check import _auto_target as auto_target

    h = exact.hparams
    ift = exact.hypergrad(h)
    print(f"bilevel check: ridge regression, {args.dim} weights, log-penalty λ = {float(h):.3f}, "
          f"{jnp.dtype(exact.dtype).name}, {args.steps} inner SGD steps (lr {lr:.3f}), backend {jax.default_backend()}")
    print(f"exact hypergradient (closed form): {float(ift):+.10e}\n")
    header = f"{'method':<22} {'hypergradient':>18} {'exact target':>18} {'rel. error':>11} {'ms/call':>9} {'compile s':>10}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, method in _methods(args.steps, lr).items():
        cmp_target = auto_target(method, exact)
        target = exact.identity_hypergrad(h) if cmp_target == "identity" else ift
        hg = jax.jit(bl.hypergrad(exact.problem, method))
        out, compile_s, run_s = _time(hg, h, exact.params0, exact.inner_batch, exact.outer_batch)
        err = abs(float(out.grad) - float(target)) / abs(float(target))
        approx = name.startswith(("truncate", "implicit(neumann", "implicit(identity", "drmad"))
        if not approx:
            worst = max(worst, err)
        label = name + (" *" if cmp_target == "identity" else "")
        print(f"{label:<22} {float(out.grad):>+18.10e} {float(target):>+18.10e} {err:>11.2e} "
              f"{1e3 * run_s:>9.3f} {compile_s:>10.2f}")
    print("\n* compared with its own closed form, ∂L_V/∂λ − (∂²L_T/∂λ∂w)ᵀ∂L_V/∂w (H⁻¹ ≈ I).")
    print("truncate, neumann and drmad are approximations: their error is the price of the shortcut.")
    print("gauss-newton is exact here: the ridge model is linear in w, so the Gauss-Newton matrix is the Hessian.")
    tol = 1e-8 if args.x64 else 1e-3
    worst = max(worst, _check_extras(args.x64, tol))
    status = "OK" if worst <= tol else "FAILED"
    print(f"\n{status}: worst error of the exact methods {worst:.2e} (tolerance {tol:.0e}).")
    return 0 if worst <= tol else 1


_EXTRA_CHECKS = ("bilevel._cli_check_core", "bilevel._cli_check_schedules", "bilevel._cli_check_relax",
                 "bilevel._cli_check_objectives")


def _check_extras(x64: bool, tol: float) -> float:
    """Print the rows of the other methods and objectives, each against its own exact value;
    return the worst relative error among those marked exact."""
    import importlib

    print("\nOther methods, hyperparameter kinds and objectives, each on its own exact problem:\n")
    import jax

    with jax.default_matmul_precision("highest"):   # no TF32 on GPUs: the rows compare with closed forms
        rows = [row for module in _EXTRA_CHECKS for row in importlib.import_module(module).check_rows(x64)]
    names = [row["name"] + ("" if row["exact"] else " *") for row in rows]
    width = max(len(n) for n in names)
    header = f"{'check':<{width}} {'value':>16} {'exact value':>16} {'rel. error':>11}  note"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, row in zip(names, rows):
        err = float(row["rel_error"])
        if row["exact"]:
            worst = max(worst, err) if err == err else float("inf")
        print(f"{name:<{width}} {float(row['value']):>+16.8e} {float(row['target']):>+16.8e} {err:>11.2e}  {row['note']}")
    print("\n* an estimate or approximation, not held to the tolerance; its note says what it is compared with.")
    return worst


def bench(args) -> int:
    """Run the microbenchmark suite and write bench.json and bench.md to --out.

    Every comparison runs side by side in one process (compiled ahead of time, warmed up,
    interleaved rounds, median): each method against hand-written JAX for the same
    mathematics and against jaxopt, memory and compile time against the number of steps,
    vmapped populations against a Python loop, a population sharded across forced host
    devices, and Lasso hypergradients (support-restricted implicit differentiation against a
    hand-written closed form and jaxopt). `--quick` runs tiny sizes (a smoke test); the full
    suite takes about 6 minutes on 2 CPU cores.
    """
    from bilevel import _bench

    out, problem = _output_dir(args.out)
    if problem:
        return _fail(problem)
    progress = (lambda m: print(f"bilevel bench: {m}", file=sys.stderr, flush=True)) if not args.quiet else (
        lambda m: None)
    try:
        result = _bench.run_suite(sections=args.sections, problems=args.problems, dtypes=args.dtypes,
                                  repeats=args.repeats, cg_iters=args.cg_iters, quick=args.quick,
                                  devices=args.devices, progress=progress)
    except ImportError as err:
        return _fail(f"{err} (the digits problem needs scikit-learn and the jaxopt comparison jaxopt: "
                     "pip install 'bilevel[bench]').")
    import json

    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(_bench.markdown(result))
    print(_bench.markdown(result))
    print(f"Wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def _fail(message: str) -> int:
    print(f"bilevel: error: {message}", file=sys.stderr)
    return 2


def _output_dir(path: str):
    """`(directory, None)` once `path` exists and is writable, else `(None, message)`."""
    from bilevel._checkpoint import writable_dir

    try:
        return writable_dir(path), None
    except OSError as err:
        return None, f"cannot write to the output directory {path!r} ({err}). Pass --out DIR with a writable directory."


def _demo_problem(args) -> str | None:
    """What is wrong with `bilevel demo`'s arguments, or None; checked before anything runs."""
    import math

    if args.data == "mnist" and args.data_path is None:
        return "--data mnist needs --data-path FILE, an .npz with x_train, y_train, x_test, y_test."
    if args.data == "digits":
        given = [flag for flag, value in (("--data-path", args.data_path), ("--num-train", args.num_train),
                                          ("--num-val", args.num_val)) if value is not None]
        if given:
            return (f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only for --data mnist; digits has a "
                    "fixed split (899/449/449 train/val/test images, set by --seed) and ships with scikit-learn. "
                    f"Drop {', '.join(given)} or add --data mnist --data-path FILE.")
    for name in ("num_train", "num_val"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1 (a number of images); got {value}."
    for name in ("outer_steps", "inner_steps", "eval_steps"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}."
    for name, what, default in (("lr", "the inner SGD-momentum step size", 0.1),
                                ("outer_lr", "the Adam step size on log λ", 0.1)):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            return (f"--{name.replace('_', '-')} must be a positive finite number ({what}); got {value}. "
                    f"Pass e.g. --{name.replace('_', '-')} {default} (the default).")
    if not math.isfinite(args.log_lam0):
        return f"--log-lam0 must be a finite number (a log-penalty); got {args.log_lam0}. Pass e.g. --log-lam0 -6."
    if args.seed < 0:
        return f"--seed must be >= 0 (it seeds the data split and random search); got {args.seed}."
    unknown = sorted(set(args.methods) - set(METHOD_NAMES))
    if unknown:
        return f"unknown method(s) {unknown}; choose from {list(METHOD_NAMES)}."
    return None


def demo(args) -> int:
    """Tune L2 penalties of a logistic regression with every method and random search.

    Each gradient-based method runs `bilevel.optimize` (Adam on the log-penalties,
    warm-started inner SGD); random search trains from scratch at as many random points.
    Every final λ is judged alike: trained from scratch, scored on validation and test.
    Writes results.md/json, validation_vs_time.png and one history per method to --out.
    """
    from bilevel import _demo, datasets

    try:
        if args.data == "mnist":
            data = datasets.mnist(args.data_path, num_train=args.num_train,
                                  num_val=10000 if args.num_val is None else args.num_val, seed=args.seed)
        else:
            data = datasets.digits(seed=args.seed)
    except (FileNotFoundError, ValueError, ImportError) as err:
        return _fail(str(err))
    out, problem = _output_dir(args.out)
    if problem:
        return _fail(problem)
    rows = _demo.run(data, out, penalty=args.penalty, outer_steps=args.outer_steps,
                     inner_steps=args.inner_steps, lr=args.lr, outer_lr=args.outer_lr,
                     eval_steps=args.eval_steps, log_lam0=args.log_lam0, seed=args.seed,
                     methods=args.methods, progress=not args.quiet and sys.stderr.isatty())
    print()
    print((out / "results.md").read_text())
    print(f"Wrote {out / 'results.md'}, results.json, validation_vs_time.png and history_<method>.json "
          f"({sum(1 for r in rows.values() if r['hypergradients'])} histories) to {out}/")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel", description="Hypergradients for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="tune logistic-regression penalties with every method (digits or MNIST)",
                       description=demo.__doc__)
    p.add_argument("--data", choices=["digits", "mnist"], default="digits",
                   help="dataset (default digits, bundled with scikit-learn)")
    p.add_argument("--data-path", default=None, help="the MNIST .npz file (for --data mnist)")
    p.add_argument("--num-train", type=int, default=None,
                   help="MNIST training images to use (default all; --data mnist only)")
    p.add_argument("--num-val", type=int, default=None,
                   help="MNIST validation images (default 10000; --data mnist only)")
    p.add_argument("--penalty", choices=["per-class", "per-weight"], default="per-class",
                   help="one log-penalty per class (default) or per weight")
    p.add_argument("--methods", nargs="+", default=list(METHOD_NAMES),
                   help=f"methods to run (default all: {' '.join(METHOD_NAMES)})")
    p.add_argument("--outer-steps", type=int, default=50, help="hyperparameter steps (default 50)")
    p.add_argument("--inner-steps", type=int, default=100, help="inner SGD steps per outer step (default 100)")
    p.add_argument("--eval-steps", type=int, default=1000,
                   help="steps of the from-scratch training that judges each final λ (default 1000)")
    p.add_argument("--lr", type=float, default=0.1, help="inner SGD-momentum learning rate (default 0.1)")
    p.add_argument("--outer-lr", type=float, default=0.1, help="Adam learning rate on log λ (default 0.1)")
    p.add_argument("--log-lam0", type=float, default=-6.0, help="starting log-penalty (default -6)")
    p.add_argument("--seed", type=int, default=0, help="data split and random-search seed (default 0)")
    p.add_argument("--out", default="bilevel-demo", help="output directory (default ./bilevel-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=demo, error=p.error)
    p = sub.add_parser("check", help="every method vs the exact hypergradient of a ridge problem",
                       description=check.__doc__)
    p.add_argument("--dim", type=int, default=20, help="number of weights (default 20)")
    p.add_argument("--steps", type=int, default=1000, help="inner SGD steps (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="problem seed (default 0)")
    p.add_argument("--x32", dest="x64", action="store_false", help="run in float32 (default float64)")
    p.set_defaults(func=check, error=p.error)
    p = sub.add_parser("bench", help="the microbenchmark suite: each method vs hand-written JAX and jaxopt",
                       description=bench.__doc__)
    p.add_argument("--sections", nargs="+", choices=_BENCH_SECTIONS, default=list(_BENCH_SECTIONS),
                   help=f"what to measure (default all: {' '.join(_BENCH_SECTIONS)})")
    p.add_argument("--problems", nargs="+", choices=["ridge", "digits"], default=["ridge", "digits"],
                   help="problems for the ratio tables (default both)")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"],
                   help="floating dtypes for the ratio and lasso tables (default both)")
    p.add_argument("--repeats", type=int, default=21,
                   help="interleaved timing rounds (default 21; the lasso section runs at most 11)")
    p.add_argument("--cg-iters", type=int, default=20,
                   help="CG iterations of the implicit rows and the lasso linear solves (default 20)")
    p.add_argument("--devices", type=int, default=8, help="forced host devices for the sharding section (default 8)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in about a minute")
    p.add_argument("--out", default="bilevel-bench", help="output directory (default ./bilevel-bench)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=bench, error=p.error)
    from . import _multiprocess

    p = sub.add_parser("multiprocess", help=_multiprocess.HELP, description=_multiprocess.run.__doc__)
    _multiprocess.add_arguments(p)
    p.set_defaults(func=_multiprocess.run, error=p.error)
    return parser


def _check_problem(args) -> str | None:
    if args.dim < 1 or args.steps < 1:
        return f"--dim and --steps must be >= 1; got --dim {args.dim} --steps {args.steps}"
    return None


def _bench_problem(args) -> str | None:
    if min(args.repeats, args.cg_iters, args.devices) < 1:
        return (f"bench needs --repeats, --cg-iters and --devices >= 1; got --repeats {args.repeats} "
                f"--cg-iters {args.cg_iters} --devices {args.devices}")
    return None


def _multiprocess_problem(args) -> str | None:
    from . import _multiprocess

    return _multiprocess.check_args(args)


_PROBLEMS = {"demo": _demo_problem, "check": _check_problem, "bench": _bench_problem,
             "multiprocess": _multiprocess_problem}


def main(argv=None) -> int:
    """Entry point of the `bilevel` command.

    Arguments are checked before anything runs or is written: a bad one exits with status 2
    and argparse's usage-and-error message, no traceback and no output directory.
    """
    args = _parser().parse_args(argv)
    problem = _PROBLEMS[args.command](args)
    if problem:
        args.error(problem)  # the subcommand's parser: prints its usage and the message, exits 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
