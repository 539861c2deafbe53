"""forward_mode's memory and cost, side by side with unroll, in one process.

1. Memory: XLA's planned temporary memory of the compiled hypergradient (the peak working set
   beyond inputs and outputs, `compiled.memory_analysis().temp_size_in_bytes`) for `unroll`,
   `unroll(checkpoint=√T)` and `forward_mode` at T = 1k, 10k, 100k steps, d = 10k parameters.
   Only compiled, not run: reverse mode at 100k steps would need gigabytes.
2. Cost: median wall time of the hypergradient ÷ the forward unroll alone (the same steps,
   no derivative) at T = 1,000, for 1 to 64 hyperparameters (one log-penalty per group of
   coordinates): forward_mode, reverse-mode unroll, and hand-written forward mode
   (`jax.jacfwd` through the same unrolled scan).

    python benchmarks/forward_mode.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bilevel as bl  # noqa: E402


def make_problem(d: int, n: int):
    """Quadratic with n log-penalties, each on a block of d/n coordinates."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(1.0, 10.0, d))
    b, c = jnp.asarray(rng.normal(size=d)), jnp.asarray(rng.normal(size=d))
    groups = jnp.asarray(np.arange(d) % n)

    def inner(w, lam, _):
        return 0.5 * jnp.sum(a * (w - b) ** 2) + 0.5 * jnp.sum(jnp.exp(lam)[groups] * w**2)

    def outer(w, lam, _):
        return 0.5 * jnp.sum((w - c) ** 2)

    return bl.Problem(inner, outer)


def temp_bytes(problem, method, d):
    lowered = jax.jit(bl.hypergrad(problem, method)).lower(jnp.zeros(1), jnp.zeros(d), None, None)
    return int(lowered.compile().memory_analysis().temp_size_in_bytes)


def median_seconds(fn, *args, repeats: int):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=10_000, help="parameters d for the memory table (10000)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--cost-dim", type=int, default=10_000, help="parameters d for the cost table (10000)")
    parser.add_argument("--cost-steps", type=int, default=1_000)
    parser.add_argument("--hparams", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    sgd = optax.sgd(0.05)

    problem = make_problem(args.dim, 1)
    memory = []
    for t in args.steps:
        methods = {
            "unroll": bl.unroll(sgd, t),
            "unroll(checkpoint=√T)": bl.unroll(sgd, t, checkpoint=int(round(t**0.5))),
            "forward_mode": bl.forward_mode(bl.unroll(sgd, t)),
        }
        memory.append({"steps": t, **{k: temp_bytes(problem, m, args.dim) for k, m in methods.items()}})
        print(memory[-1], flush=True)

    cost = []
    d, t = args.cost_dim, args.cost_steps
    for n in args.hparams:
        problem = make_problem(d, n)
        lam, w0 = jnp.full(n, -1.0), jnp.zeros(d)
        forward_only = jax.jit(bl.response(problem, bl.unroll(sgd, t)))
        base = median_seconds(forward_only, lam, w0, None, repeats=args.repeats)
        row = {"hparams": n, "forward_seconds": base}
        respond = bl.response(problem, bl.unroll(sgd, t))

        @jax.jit
        def hand_jacfwd(lam, w0, respond=respond, problem=problem):
            """Hand-written forward mode: jax.jacfwd through the unrolled scan, then g_Vᵀ J."""
            w, jac = respond(lam, w0, None), jax.jacfwd(respond)(lam, w0, None)
            value, g_w = jax.value_and_grad(problem.outer)(w, lam, None)
            return value, g_w @ jac

        row["jacfwd"] = median_seconds(hand_jacfwd, lam, w0, repeats=args.repeats) / base
        for name, method in (("unroll", bl.unroll(sgd, t)), ("forward_mode", bl.forward_mode(bl.unroll(sgd, t)))):
            hg = jax.jit(bl.hypergrad(problem, method))
            row[name] = median_seconds(hg, lam, w0, None, None, repeats=args.repeats) / base
        cost.append(row)
        print(row, flush=True)

    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "memory_dim": args.dim,
              "cost_dim": d, "cost_steps": t, "memory": memory, "cost": cost}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forward_mode.json").write_text(json.dumps(result, indent=2))
    (args.out / "forward_mode.md").write_text(markdown(result))
    print(markdown(result))


def _mb(b):
    return f"{b / 2**20:,.2f} MiB"


def markdown(r) -> str:
    lines = [f"Temporary memory of the compiled hypergradient, d = {r['memory_dim']:,} ({r['device']}):", "",
             "| steps T | unroll | unroll(checkpoint=√T) | forward_mode |", "|---|---|---|---|"]
    for row in r["memory"]:
        lines.append(f"| {row['steps']:,} | {_mb(row['unroll'])} | {_mb(row['unroll(checkpoint=√T)'])} | "
                     f"{_mb(row['forward_mode'])} |")
    lines += ["", f"Hypergradient time ÷ forward unroll alone, T = {r['cost_steps']:,}, d = {r['cost_dim']:,} "
              "(median of repeats):", "",
              "| hyperparameters | forward alone | unroll (reverse) | forward_mode | hand-written jax.jacfwd |",
              "|---|---|---|---|---|"]
    for row in r["cost"]:
        lines.append(f"| {row['hparams']} | {row['forward_seconds'] * 1e3:.2f} ms | {row['unroll']:.2f}× | "
                     f"{row['forward_mode']:.2f}× | {row['jacfwd']:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
