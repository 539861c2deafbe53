"""Memory at depth: XLA memory and time of unrolled meta-gradients through T steps of an MLP.

One hypergradient (per-layer weight decays and the learning rate of Adam) through T inner
steps of an MLP classifier, differentiated six ways, side by side in one process:

- `unroll`: plain reverse mode (stores every step's gradient intermediates);
- `unroll(checkpoint=√T)`: reverse mode recomputing segments of √T steps;
- `mixflow`: reverse mode with a forward-over-reverse backward (MixFlow-MG, Kemaev et al.
  2025; stores the iterates only);
- `mixflow(checkpoint=√T)`: the same, storing every √T-th iterate and recomputing segments;
- `forward_mode`: forward mode (memory independent of T, cost ∝ number of hyperparameters);
- `drmad`: DrMAD (Fu et al. 2016), reverse mode along the straight line from the start to
  the end of the run (memory independent of T; an approximation).

For each method and depth: the XLA temporary memory of the compiled program
(`memory_analysis().temp_size_in_bytes`), the compile time, the median time per call, and the
relative difference of the hypergradient from `unroll`'s (the first five are exact, so theirs
is float32 rounding; DrMAD's is its approximation error).

    python benchmarks/mixflow_memory.py --out benchmarks/results/mixflow
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel as bl
from bilevel._mixflow import mixflow


def _problem(dim: int, width: int, n: int, seed: int = 0):
    """A tanh MLP dim-width-width-10 on synthetic data: Gaussian inputs labelled by a random
    linear teacher (no download); the inner loss has one weight decay exp(h['wd'][i]) per layer."""

    def net(w, x):
        return jnp.tanh(jnp.tanh(x @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]) @ w["W3"]

    def loss(w, b):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(net(w, b[0]), b[1]))

    def penalty(w, h):
        return 0.5 * sum(jnp.exp(h["wd"][i]) * jnp.sum(w[k] ** 2) for i, k in enumerate(("W1", "W2", "W3")))

    problem = bl.Problem(inner=lambda w, h, b: loss(w, b) + penalty(w, h), outer=lambda w, h, b: loss(w, b))
    keys = jax.random.split(jax.random.key(seed), 6)

    def data(key):
        x = jax.random.normal(key, (n, dim))
        return x, jnp.argmax(x @ jax.random.normal(keys[0], (dim, 10)), axis=1)

    w0 = {"W1": jax.random.normal(keys[1], (dim, width)) / dim**0.5, "b1": jnp.zeros(width),
          "W2": jax.random.normal(keys[2], (width, width)) / width**0.5, "b2": jnp.zeros(width),
          "W3": jax.random.normal(keys[3], (width, 10)) / width**0.5}
    return problem, w0, data(keys[4]), data(keys[5])


def _methods(steps: int):
    def opt(h):
        return optax.adam(jnp.exp(h["log_lr"]))

    k = max(1, round(math.sqrt(steps)))
    return {
        "unroll": bl.unroll(opt, steps),
        f"unroll(checkpoint={k})": bl.unroll(opt, steps, checkpoint=k),
        "mixflow": mixflow(bl.unroll(opt, steps)),
        f"mixflow(checkpoint={k})": mixflow(bl.unroll(opt, steps, checkpoint=k)),
        "forward_mode": bl.forward_mode(bl.unroll(opt, steps)),
        "drmad (approximate)": bl.drmad(bl.unroll(opt, steps)),
    }


def run(depths=(100, 300, 1000), dim: int = 64, width: int = 128, n: int = 256, repeats: int = 1,
        time_depths=None) -> dict:
    time_depths = set(depths if time_depths is None else time_depths)
    problem, w0, inner, outer = _problem(dim, width, n)
    h = {"wd": jnp.full(3, -6.0), "log_lr": jnp.asarray(math.log(1e-3))}
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(w0))
    rows = []
    for steps in depths:
        compiled, ref = {}, None
        for name, method in _methods(steps).items():
            start = time.perf_counter()
            compiled[name] = jax.jit(bl.hypergrad(problem, method)).lower(h, w0, inner, outer).compile()
            mem = compiled[name].memory_analysis()
            rows.append({"steps": steps, "method": name, "compile_s": time.perf_counter() - start,
                         "temp_mib": mem.temp_size_in_bytes / 2**20, "times": [], "rel_diff": None})
        if steps in time_depths:
            for fn in compiled.values():            # one untimed call each (first-run costs)
                jax.block_until_ready(fn(h, w0, inner, outer))
            grads = {}
            for _ in range(repeats):                # interleaved rounds
                for row in rows[-len(compiled):]:
                    start = time.perf_counter()
                    out = jax.block_until_ready(compiled[row["method"]](h, w0, inner, outer))
                    row["times"].append(time.perf_counter() - start)
                    grads[row["method"]] = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(out.grad)])
            ref = grads["unroll"]
            for row in rows[-len(compiled):]:
                row["rel_diff"] = float(np.linalg.norm(grads[row["method"]] - ref) / np.linalg.norm(ref))
        for row in rows[-len(compiled):]:
            row["s_per_call"] = float(np.median(row.pop("times"))) if row["times"] else None
        print(f"T={steps} done", flush=True)
    return {"setup": {"mlp": f"{dim}-{width}-{width}-10 tanh, {n_params} parameters", "batch": n,
                      "inner": "Adam, learning rate and 3 per-layer weight decays as the 4 hyperparameters",
                      "dtype": jnp.dtype(jnp.result_type(float)).name, "backend": jax.default_backend(),
                      "machine": platform.machine(), "jax": jax.__version__,
                      "bytes_per_iterate": 3 * n_params * 4},
            "rows": rows}


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [(f"MLP {s['mlp']}, batch {s['batch']} (the same batch every step), {s['inner']}, {s['dtype']}; "
              f"{s['backend']} ({s['machine']}), jax {s['jax']}. One iterate (parameters + Adam's two moments) is "
              f"{s['bytes_per_iterate'] / 2**20:.2f} MiB."), "",
             "| T | method | XLA temp MiB | s per call | compile s | rel. diff vs unroll |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = "—" if r["s_per_call"] is None else f"{r['s_per_call']:.2f}"
        d = "—" if r["rel_diff"] is None else f"{r['rel_diff']:.1e}"
        lines.append(f"| {r['steps']} | {r['method']} | {r['temp_mib']:.1f} | {t} | {r['compile_s']:.1f} | {d} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/mixflow")
    parser.add_argument("--depths", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--time-depths", type=int, nargs="*", default=None,
                        help="depths at which calls are also timed (default: all)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    if min(args.depths) < 1 or min(args.dim, args.width, args.batch, args.repeats) < 1:
        parser.error("--depths, --dim, --width, --batch and --repeats must be >= 1")
    result = run(tuple(args.depths), args.dim, args.width, args.batch, args.repeats, args.time_depths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixflow_memory.json").write_text(json.dumps(result, indent=2))
    (out / "mixflow_memory.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
