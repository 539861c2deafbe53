"""Warm-started backward solves: CG iterations along an outer run, carried v vs cold starts.

The digits demo problem (`bilevel demo`'s: a linear softmax classifier on scikit-learn's 8x8
digits, one log-penalty per class or per weight, 100 warm-started SGD-momentum steps per
outer step, Adam on log λ) is tuned for `--steps` outer steps twice with
`implicit(..., cg(maxiter=1000, tol))`: once with every backward solve started from zero, once
with `warm_start_solve=True` (each solve starts from the previous outer step's solution,
carried in the driver state). Both reach the same relative residual `tol` at every step; the
script reports CG iterations (total, per quarter of the run), the residuals, the wall time
and the final validation loss of each, and checks that the two runs agree.

Writes warm_start.md and warm_start.json to --out.

    python benchmarks/warm_start.py                        # 200 steps, about a minute on 2 CPU cores
    python benchmarks/warm_start.py --tol 1e-3            # a looser tolerance: warm starts save more
    python benchmarks/warm_start.py --penalty per-weight
    python benchmarks/warm_start.py --quick                # a tiny run (what the tests use)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)   # float32 CG cannot reach 1e-6 on this nearly singular
                                            # system (softmax's shift invariance, λ = e⁻⁶)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bilevel as bl  # noqa: E402
from bilevel import _demo  # noqa: E402


def _run(problem, method, hparams0, params0, train, val, steps, outer_lr, warm):
    began = time.perf_counter()
    result = bl.optimize(problem, method, optax.adam(outer_lr), hparams0, params0, train, val, steps,
                         warm_start_solve=warm, progress=False, residual_warning=None)
    seconds = time.perf_counter() - began
    h = result.history
    return {"iterations": h["stats.solve_iterations"].astype(int).tolist(),
            "residual": h["stats.solve_residual"].tolist(), "value": h["value"].tolist(),
            "step_time": h["wall_time"].tolist(), "wall_time": seconds}


def _quarters(values):
    parts = np.array_split(np.asarray(values), 4)
    return [int(p.sum()) for p in parts]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--inner-steps", type=int, default=100)
    p.add_argument("--penalty", choices=["per-class", "per-weight"], default="per-class")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--outer-lr", type=float, default=0.1)
    p.add_argument("--log-lam0", type=float, default=-6.0)
    p.add_argument("--quick", action="store_true", help="10 outer steps of 20 inner steps")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.inner_steps = 10, 20
    data = bl.datasets.digits()
    train = tuple(jnp.asarray(a) for a in data.train)
    val = tuple(jnp.asarray(a) for a in data.val)
    features, classes = train[0].shape[1], data.num_classes
    params0 = {"W": jnp.zeros((features, classes)), "b": jnp.zeros(classes)}
    shape = (classes,) if args.penalty == "per-class" else (features, classes)
    hparams0 = jnp.full(shape, args.log_lam0)
    problem = _demo.make_problem()
    forward = bl.unroll(optax.sgd(0.1, momentum=0.9), steps=args.inner_steps)
    method = bl.implicit(forward, bl.cg(maxiter=1000, tol=args.tol))
    runs = {name: _run(problem, method, hparams0, params0, train, val, args.steps, args.outer_lr, warm)
            for name, warm in (("cold", False), ("warm", True))}
    cold, warm = runs["cold"], runs["warm"]
    gap = float(np.max(np.abs(np.asarray(cold["value"]) - np.asarray(warm["value"]))))
    summary = {
        "total_iterations": {k: int(sum(r["iterations"])) for k, r in runs.items()},
        "iterations_by_quarter": {k: _quarters(r["iterations"]) for k, r in runs.items()},
        "ratio_cold_over_warm": sum(cold["iterations"]) / max(1, sum(warm["iterations"])),
        "max_residual": {k: float(np.max(r["residual"])) for k, r in runs.items()},
        "final_value": {k: r["value"][-1] for k, r in runs.items()},
        "max_value_gap": gap,
        "backward_time_note": "step_time includes the 100-step forward solve, which warm starts do not change",
        "median_step_time": {k: float(np.median(r["step_time"][1:])) for k, r in runs.items()},
    }
    settings = {**vars(args), "hparams": int(np.prod(shape)), "params": features * classes + classes,
                "machine": platform.machine(), "processor": platform.processor(),
                "backend": jax.default_backend(), "jax": jax.__version__}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("warm_start" + ("_quick" if args.quick else "") + ("_per_weight" if args.penalty == "per-weight" else "")
            + ("" if args.tol == 1e-6 else f"_tol{args.tol:g}"))
    (out / f"{stem}.json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": runs}, indent=1))
    q = summary["iterations_by_quarter"]
    lines = [
        f"# Warm-started backward solves ({args.penalty}, {settings['hparams']} hyperparameters)",
        "",
        f"digits demo problem, {args.steps} outer Adam steps (lr {args.outer_lr}) from log λ = "
        f"{args.log_lam0}, {args.inner_steps} inner steps each, implicit CG to relative residual "
        f"{args.tol:g}. Command: `python benchmarks/warm_start.py"
        f"{' --penalty per-weight' if args.penalty == 'per-weight' else ''}"
        f"{'' if args.tol == 1e-6 else f' --tol {args.tol:g}'}`.",
        "",
        "| backward solve | CG iterations | by quarter of the run | max residual | final val loss | median step (s) |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("cold", "warm"):
        lines.append(f"| {k} | {summary['total_iterations'][k]} | {' / '.join(map(str, q[k]))} | "
                     f"{summary['max_residual'][k]:.1e} | {summary['final_value'][k]:.5f} | "
                     f"{summary['median_step_time'][k]:.4f} |")
    lines += ["", f"Cold/warm iteration ratio: {summary['ratio_cold_over_warm']:.2f}×; the two runs' "
              f"validation losses differ by at most {gap:.1e}.", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
