"""The command line: `python -m bilevel ...` or `bilevel ...`.

`bilevel check` runs every method on an exact ridge-regression problem from
`bilevel.testing` and prints each hypergradient beside the closed-form value, with its
error and time: the quick "does my install compute the right numbers" command.
"""

from __future__ import annotations

import argparse
import sys
import time


def _methods(steps: int, lr: float):
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


def check(args) -> int:
    """Run every method on a ridge problem and print errors against the exact hypergradient."""
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import bilevel as bl
    import bilevel.testing as blt
    from bilevel.testing._check import _auto_target as auto_target

    dtype = jnp.float64 if args.x64 else jnp.float32
    exact = blt.Ridge.sample(args.seed, dim=args.dim, max_condition=10.0, dtype=dtype)
    h = exact.hparams
    ift = exact.hypergrad(h)
    lr = 1.0 / float(jnp.linalg.eigvalsh(exact.hessian(h)).max())  # step 1/L: stable SGD
    print(f"bilevel check: ridge regression, {args.dim} weights, log-penalty λ = {float(h):.3f}, "
          f"{jnp.dtype(dtype).name}, {args.steps} inner SGD steps (lr {lr:.3f}), backend {jax.default_backend()}")
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
        approx = name.startswith(("truncate", "implicit(neumann", "implicit(identity"))
        if not approx:
            worst = max(worst, err)
        label = name + (" *" if cmp_target == "identity" else "")
        print(f"{label:<22} {float(out.grad):>+18.10e} {float(target):>+18.10e} {err:>11.2e} "
              f"{1e3 * run_s:>9.3f} {compile_s:>10.2f}")
    print("\n* compared with its own closed form, ∂L_V/∂λ − (∂²L_T/∂λ∂w)ᵀ∂L_V/∂w (H⁻¹ ≈ I).")
    print("truncate and neumann are approximations: their error is the price of the shortcut.")
    tol = 1e-8 if args.x64 else 1e-3
    status = "OK" if worst <= tol else "FAILED"
    print(f"\n{status}: worst error of the exact methods {worst:.2e} (tolerance {tol:.0e}).")
    return 0 if worst <= tol else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel", description="Hypergradients for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="every method vs the exact hypergradient of a ridge problem",
                       description=check.__doc__)
    p.add_argument("--dim", type=int, default=20, help="number of weights (default 20)")
    p.add_argument("--steps", type=int, default=1000, help="inner SGD steps (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="problem seed (default 0)")
    p.add_argument("--x32", dest="x64", action="store_false", help="run in float32 (default float64)")
    p.set_defaults(func=check)
    return parser


def main(argv=None) -> int:
    """Entry point of the `bilevel` command."""
    args = _parser().parse_args(argv)
    if args.dim < 1 or args.steps < 1:
        _parser().error(f"--dim and --steps must be >= 1; got --dim {args.dim} --steps {args.steps}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
