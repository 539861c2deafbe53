"""Hessian-vector product choices of `bl.implicit`: time, XLA memory and error on an MLP.

For each `hvp` choice (forward-over-reverse, reverse-over-reverse, central and one-sided
finite differences) one implicit hypergradient of per-layer weight decays of an MLP is
compiled (CG with a fixed number of iterations, so every choice does the same work), and
measured side by side in one process: the median time per call over interleaved rounds, the
XLA temporary memory of the compiled program, and the relative error of the hypergradient
against forward-over-reverse.

    python benchmarks/hvp_choice.py --out benchmarks/results/hvp_choice
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel as bl


def _problem(width: int, n: int, dim: int, seed: int):
    def net(w, x):
        return jnp.tanh(jnp.tanh(x @ w["W1"]) @ w["W2"]) @ w["W3"]

    def loss(w, b):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(net(w, b[0]), b[1]))

    def penalty(w, h):
        return 0.5 * sum(jnp.exp(h[i]) * jnp.sum(w[k] ** 2) for i, k in enumerate(("W1", "W2", "W3")))

    problem = bl.Problem(inner=lambda w, h, b: loss(w, b) + penalty(w, h), outer=lambda w, h, b: loss(w, b))
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (n, dim))
    y = jax.random.randint(keys[1], (n,), 0, 10)
    w0 = {"W1": jax.random.normal(keys[2], (dim, width)) / dim**0.5,
          "W2": jax.random.normal(keys[3], (width, width)) / width**0.5,
          "W3": jax.random.normal(keys[4], (width, 10)) / width**0.5}
    return problem, w0, (x, y)


def run(width: int = 256, n: int = 512, dim: int = 64, cg_iters: int = 20, repeats: int = 7,
        steps: int = 200) -> dict:
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    problem, w0, data = _problem(width, n, dim, 0)
    h = jnp.full(3, -4.0, dtype)
    forward = bl.unroll(optax.adam(1e-2), steps=steps)
    eps = 1e-4 if dtype == jnp.float64 else 1e-2
    choices = {
        "forward_over_reverse": "forward_over_reverse",
        "reverse_over_reverse": "reverse_over_reverse",
        f"finite_difference(central, ε={eps:g})": bl.finite_difference(eps),
        f"finite_difference(one-sided, ε={eps:g})": bl.finite_difference(eps, central=False),
    }
    # The inner solve is shared: run it once, then time only the implicit backward pass.
    params = jax.jit(bl.response(problem, forward))(h, w0, data)
    solve = bl.solver(lambda hh, p0, b: p0)
    compiled, results = {}, {}
    for name, hvp in choices.items():
        method = bl.implicit(solve, bl.cg(maxiter=cg_iters, tol=0.0), hvp=hvp)
        fn = jax.jit(bl.hypergrad(problem, method))
        start = time.perf_counter()
        lowered = fn.lower(h, params, data, data)
        compiled[name] = lowered.compile()
        mem = compiled[name].memory_analysis()
        results[name] = {"compile_s": time.perf_counter() - start,
                         "temp_mib": mem.temp_size_in_bytes / 2**20, "times": []}
        jax.block_until_ready(compiled[name](h, params, data, data))
    for _ in range(repeats):                       # interleaved rounds
        for name in choices:
            start = time.perf_counter()
            out = jax.block_until_ready(compiled[name](h, params, data, data))
            results[name]["times"].append(time.perf_counter() - start)
            results[name]["grad"] = np.asarray(out.grad, np.float64)
    ref = results["forward_over_reverse"]["grad"]
    base = float(np.median(results["forward_over_reverse"]["times"]))
    rows = []
    for name, r in results.items():
        t = float(np.median(r["times"]))
        rows.append({"hvp": name, "ms": 1e3 * t, "time_ratio": t / base, "temp_mib": r["temp_mib"],
                     "compile_s": r["compile_s"],
                     "rel_error": float(np.linalg.norm(r["grad"] - ref) / np.linalg.norm(ref))})
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(w0))
    return {"setup": {"mlp": f"{dim}-{width}-{width}-10 tanh, {n_params} parameters", "examples": n,
                      "dtype": jnp.dtype(dtype).name, "cg_iterations": cg_iters, "inner": f"Adam, {steps} steps",
                      "backend": jax.default_backend(), "machine": platform.machine(),
                      "jax": jax.__version__},
            "rows": rows}


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"MLP {s['mlp']}, {s['examples']} examples, {s['dtype']}, implicit CG with {s['cg_iterations']} "
             f"iterations at the point reached by {s['inner']}; {s['backend']} ({s['machine']}), jax {s['jax']}.",
             "", "| hvp | ms per hypergradient | time vs forward-over-reverse | XLA temp MiB | rel. error vs forward-over-reverse |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['hvp']} | {r['ms']:.2f} | {r['time_ratio']:.2f}× | {r['temp_mib']:.2f} | {r['rel_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/hvp_choice")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--x32", action="store_true", help="float32 (default float64)")
    args = parser.parse_args(argv)
    if args.width < 1 or args.repeats < 1:
        parser.error("--width and --repeats must be >= 1")
    jax.config.update("jax_enable_x64", not args.x32)
    result = run(width=args.width, repeats=args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_x32" if args.x32 else ""
    (out / f"hvp_choice{suffix}.json").write_text(json.dumps(result, indent=2))
    (out / f"hvp_choice{suffix}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
