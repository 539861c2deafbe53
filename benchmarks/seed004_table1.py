"""Reproduce Table 1 of seed 004 (§4.1): online hyperparameter optimisation on its quadratic.

    L_T(θ, λ) = ½(θ − θ̄)ᵀH(θ − θ̄) + ½λθᵀHθ,    L_V(θ) = ½(θ − θ̃)ᵀH(θ − θ̃),    H diagonal, d = 20,

50 random problems with λ† ∈ [0.2, 0.4]; 20K inner SGD steps at η = 1e-3, then 20K at η = 1e-4;
hyperparameter learning rate 0.1η; methods Unroll1, Unroll5, Unroll10, Clip2, Clip5. Reported,
as means over the problems, after each phase i: ΔL_V(θ_i) = L_V(θ_i)/L_V(θ*(λ†)) − 1 and |λ_i − λ†|.

All problems × methods run in one compiled, vmapped call (the variants differ only in traced
settings of `bilevel.online`). Writes `seed004_table1.json` and `seed004_table1.md` to --out.

    python benchmarks/seed004_table1.py                 # the paper's setting (about a minute on 2 CPUs)
    python benchmarks/seed004_table1.py --steps 2000    # a quick look
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bilevel as bl  # noqa: E402
import bilevel.testing as blt  # noqa: E402

# (name, window K or 0, clip radius or inf) — the paper's methods, in its order
METHODS = [
    ("Unroll1", 1, np.inf),
    ("Unroll5", 5, np.inf),
    ("Unroll10", 10, np.inf),
    ("Clip2", 0, 2.0),
    ("Clip5", 0, 5.0),
]
# Seed 004, Table 1 (ΔL_V(θ1), |λ1 − λ†|, ΔL_V(θ2), |λ2 − λ†|), ΔL_V in percent
PAPER = {
    "Unroll1": (0.77, 0.047, 0.77, 0.047),
    "Unroll5": (0.56, 0.039, 0.72, 0.045),
    "Unroll10": (0.37, 0.032, 0.71, 0.044),
    "Clip2": (0.07, 0.012, 0.07, 0.012),
    "Clip5": (0.00, 0.000, 0.00, 0.000),
}


def sample_problems(n: int, seed: int, dim: int, max_condition: float) -> list[blt.Quadratic004]:
    """`n` instances of `bilevel.testing.Quadratic004` with λ† uniform in [0.2, 0.4]."""
    return [blt.Quadratic004.sample(seed + i, dim=dim, lam_range=(0.2, 0.4), max_condition=max_condition)
            for i in range(n)]


def first_order_fixed_point(p: blt.Quadratic004) -> float:
    """Where Unroll1 / Unroll1-gTgV stop: ⟨g_V, ∂g_T/∂λ⟩ = ⟨H(θ* − θ̃), Hθ*⟩ = 0 on θ* = θ̄/(1 + λ).

    The true optimum solves ⟨H(θ* − θ̃), θ*⟩ = 0 instead; the two agree only when H ∝ I.
    """
    tb, tt, h = (np.asarray(x) for x in (p.theta_bar, p.theta_tilde, p.h))
    return float((h * tb) @ (h * tb) / ((h * h * tt) @ tb) - 1.0)


def make_run(steps: int, eta1: float, eta2: float, hyper_scale: float):
    """One run: (θ̄, θ̃, h, window, clip, warmup, λ0) -> (θ1, λ1, θ2, λ2)."""
    problem = blt.Quadratic004.sample(0, dim=2).problem  # the losses; the data are arguments

    def run(theta_bar, theta_tilde, h, window, clip, warmup, lam0):
        inner, outer = (theta_bar, h), (theta_tilde, h)
        phases = []
        state = None
        for eta in (eta1, eta2):
            driver = bl.online(problem, optax.sgd(eta), optax.sgd(hyper_scale * eta),
                               window=window, clip=clip, warmup=warmup)
            if state is None:
                state = driver.init(lam0, jnp.zeros_like(theta_bar))
            state, _ = driver.run(state, inner, outer, steps)
            phases.append((state.params, state.hparams))
        (theta1, lam1), (theta2, lam2) = phases
        return theta1, lam1, theta2, lam2

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=50, help="number of random problems (50)")
    parser.add_argument("--steps", type=int, default=20_000, help="inner steps per phase (20000)")
    parser.add_argument("--dim", type=int, default=20, help="dimension of θ (20)")
    parser.add_argument("--eta", type=float, nargs=2, default=(1e-3, 1e-4), help="η of the two phases")
    parser.add_argument("--hyper-scale", type=float, default=0.1, help="hyper learning rate / η (0.1)")
    parser.add_argument("--lam0", type=float, default=0.3, help="initial λ (0.3, the middle of λ†'s range; the paper does not say)")
    parser.add_argument("--warmup", type=int, default=0, help="Clip-r warm-up steps (0; the paper does not say)")
    parser.add_argument("--max-condition", type=float, default=10.0,
                        help="H = diag(h), h log-uniform in [1, this] (10; the paper does not say)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first problem")
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    problems = sample_problems(args.problems, args.seed, args.dim, args.max_condition)
    stack = lambda f: jnp.stack([f(p) for p in problems])  # noqa: E731
    theta_bar, theta_tilde, h = stack(lambda p: p.theta_bar), stack(lambda p: p.theta_tilde), stack(lambda p: p.h)
    lam_star = np.array([float(p.optimal_hparams()) for p in problems])
    best = np.array([float(p.value(p.optimal_hparams())) for p in problems])  # L_V(θ*(λ†))
    lam_fo = np.array([first_order_fixed_point(p) for p in problems])

    windows = jnp.asarray([m[1] for m in METHODS], jnp.int32)
    clips = jnp.asarray([m[2] for m in METHODS])
    warmups = jnp.asarray([0 if np.isinf(m[2]) else args.warmup for m in METHODS], jnp.int32)
    run = make_run(args.steps, args.eta[0], args.eta[1], args.hyper_scale)
    over_methods = jax.vmap(run, in_axes=(None, None, None, 0, 0, 0, None))
    over_problems = jax.vmap(over_methods, in_axes=(0, 0, 0, None, None, None, None))
    call = jax.jit(over_problems)
    call_args = (theta_bar, theta_tilde, h, windows, clips, warmups, jnp.asarray(args.lam0))

    t0 = time.perf_counter()
    compiled = call.lower(*call_args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theta1, lam1, theta2, lam2 = jax.block_until_ready(compiled(*call_args))
    run_s = time.perf_counter() - t0

    def val(theta):  # L_V(θ) per (problem, method)
        return 0.5 * np.sum(np.asarray(h)[:, None, :] * (np.asarray(theta) - np.asarray(theta_tilde)[:, None, :]) ** 2, -1)

    rows = {}
    for j, (name, _, _) in enumerate(METHODS):
        cols = []
        for theta, lam in ((theta1, lam1), (theta2, lam2)):
            dl = val(theta)[:, j] / best - 1.0
            dlam = np.abs(np.asarray(lam)[:, j] - lam_star)
            cols.append({"delta_val_pct": 100 * float(dl.mean()), "lam_err": float(dlam.mean()),
                         "lam_err_max": float(dlam.max()), "final_lam_mean": float(np.asarray(lam)[:, j].mean())})
        rows[name] = {"phase1": cols[0], "phase2": cols[1], "paper": PAPER[name]}

    result = {
        "settings": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, pathlib.Path) else v)
                     for k, v in vars(args).items()},
        "lam_star_mean": float(lam_star.mean()),
        "first_order_fixed_point_err": float(np.abs(lam_fo - lam_star).mean()),
        "runs": len(problems) * len(METHODS),
        "compile_seconds": compile_s,
        "run_seconds": run_s,
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "methods": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "seed004_table1" + (f"_{args.tag}" if args.tag else "")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result) -> str:
    s = result["settings"]
    lines = [
        f"{len(result['methods'])} methods × {s['problems']} problems = {result['runs']} runs of "
        f"2 × {s['steps']} steps in one vmapped call: {result['run_seconds']:.1f} s "
        f"(+ {result['compile_seconds']:.1f} s compile) on {result['device']}; "
        f"λ0 = {s['lam0']}, Clip warm-up = {s['warmup']} steps, h log-uniform in "
        f"[1, {s['max_condition']:g}]. Mean |λ_fo − λ†| of the first-order fixed point: "
        f"{result['first_order_fixed_point_err']:.3f}.",
        "",
        "| method | ΔL_V(θ1) | \\|λ1 − λ†\\| | ΔL_V(θ2) | \\|λ2 − λ†\\| | paper: ΔL_V(θ1) | \\|λ1 − λ†\\| | ΔL_V(θ2) | \\|λ2 − λ†\\| |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["methods"].items():
        p1, p2, paper = row["phase1"], row["phase2"], row["paper"]
        lines.append(
            f"| {name} | {p1['delta_val_pct']:+.2f}% | {p1['lam_err']:.3f} | {p2['delta_val_pct']:+.2f}% | "
            f"{p2['lam_err']:.3f} | {paper[0]:+.2f}% | {paper[1]:.3f} | {paper[2]:+.2f}% | {paper[3]:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
