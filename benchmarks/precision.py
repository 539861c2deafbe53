"""Precision policies of `bl.implicit`: the hypergradient's error against float64.

Two problems: ridge regression (`bilevel.testing.Ridge`, 50 weights, κ ≤ 100, closed-form
float64 hypergradient) and per-class L2 penalties of a logistic regression on scikit-learn's
digits (reference: the same method run entirely in float64). For each policy the inner
steps, products and solve run as `bl.precision(compute, accumulate, loss_scale)` says, from
float32 inputs, and the relative error of `.grad` against the float64 reference is reported.

    python benchmarks/precision.py --out benchmarks/results/precision
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bilevel as bl  # noqa: E402
import bilevel.testing as blt  # noqa: E402

POLICIES = {
    "float64 (reference)": (jnp.float64, None),
    "float32": (jnp.float32, None),
    "bfloat16 steps and products, float32 solve": (jnp.float32, bl.precision(jnp.bfloat16)),
    "bfloat16 throughout": (jnp.float32, bl.precision(jnp.bfloat16, jnp.bfloat16)),
    "float16 steps and products, float32 solve": (jnp.float32, bl.precision(jnp.float16)),
    "float16, float32 solve, loss scale 2^8": (jnp.float32, bl.precision(jnp.float16, loss_scale=2.0**8)),
}


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def _ridge():
    exact = blt.Ridge.sample(0, dim=50, max_condition=100.0)
    lr = 1.0 / float(jnp.linalg.eigvalsh(exact.hessian(exact.hparams)).max())
    args = (exact.hparams, exact.params0, exact.inner_batch, exact.outer_batch)
    return exact.problem, bl.unroll(optax.sgd(lr), steps=3000), args, np.asarray(exact.hypergrad(exact.hparams))


def _digits():
    data = bl.datasets.digits(seed=0)

    def xent(W, batch):
        X, y = batch
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(X @ W, y))

    problem = bl.Problem(inner=lambda W, h, b: xent(W, b) + 0.5 * jnp.sum(jnp.exp(h) * jnp.sum(W**2, axis=0)),
                         outer=lambda W, h, b: xent(W, b))
    args = (jnp.full(10, -3.0), jnp.zeros((64, 10)), data.train, data.val)
    return problem, bl.unroll(optax.sgd(0.5, momentum=0.9), steps=1000), args, None


def run() -> dict:
    rows = []
    for name, build in (("ridge (50 weights, κ ≤ 100)", _ridge), ("digits logistic regression (10 penalties)", _digits)):
        problem, forward, args, reference = build()
        grads = {}
        for label, (dtype, policy) in POLICIES.items():
            method = bl.implicit(forward, bl.cg(maxiter=200, tol=1e-10 if dtype == jnp.float64 else 1e-6),
                                 precision=policy)
            out = jax.jit(bl.hypergrad(problem, method))(*_cast(args, dtype))
            grads[label] = np.asarray(out.grad, np.float64)
        if reference is None:
            reference = grads["float64 (reference)"]
        for label, g in grads.items():
            rows.append({"problem": name, "policy": label,
                         "rel_error": float(np.linalg.norm(g - reference) / np.linalg.norm(reference))})
    return {"jax": jax.__version__, "backend": jax.default_backend(), "rows": rows}


def markdown(result: dict) -> str:
    problems = list(dict.fromkeys(r["problem"] for r in result["rows"]))
    lines = ["| policy | " + " | ".join(problems) + " |", "|---" * (len(problems) + 1) + "|"]
    for policy in POLICIES:
        cells = [f"{r['rel_error']:.1e}" for p in problems for r in result["rows"]
                 if r["problem"] == p and r["policy"] == policy]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nRelative error of the hypergradient against float64 ({result['backend']}, jax {result['jax']}).\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/precision")
    args = parser.parse_args(argv)
    result = run()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(result, indent=2))
    (out / "precision.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
