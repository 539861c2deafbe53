"""Reproduce the hypernetwork papers' figures (seeds 000/001/003) on real data.

The model is the papers' "linear model": multinomial logistic regression `softmax(X W + b)`
(64-10 on scikit-learn's 8x8 digits by default, 784-10 on MNIST with --data mnist), trained
with L2 penalties `½ Σ exp(λ) ⊙ w²`; the validation cross-entropy is the outer loss.

- Figure 1: training and validation loss against one log L2 penalty: cross-validation (a model
  trained from scratch at each grid point, all grid points in one vmapped call) beside a
  global MLP hypernet (`bilevel.hypertrain_global`, λ ~ U[lo, hi]) evaluated on a dense grid.
- Figure 5: a linear hypernet fitted on λ ~ N(λ̂, σ²) only: accurate where p(λ) has mass.
- Figures 6/8: one penalty per weight (650 on digits, 7,850 on MNIST): hypernet-based
  optimisation (`bilevel.hypertrain_local`, linear hypernet) vs `unroll` vs
  `implicit(neumann)` vs random search, validation and test loss against wall time (each
  method gets the same time budget), and a table of final losses, both as each method sees
  them and after retraining from scratch at its final λ.

Writes fig1_*.png, fig5_*.png, fig6_*.png, fig6_*.md and hypernet_figures_<data>.json to --out.

    python benchmarks/hypernet_figures.py                        # digits, a few minutes on 2 CPUs
    python benchmarks/hypernet_figures.py --data mnist --data-path ../shared/data/mnist.npz --paper
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel as bl
from bilevel import datasets

# ---------------------------------------------------------------------------------------------
# The problem
# ---------------------------------------------------------------------------------------------


def cross_entropy(params, X, y):
    logits = X @ params["W"] + params["b"]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def penalty(params, log_lam):
    """½ Σ e^λ w² with one λ for everything (a scalar) or one per weight (a params-shaped tree)."""
    if isinstance(log_lam, dict):
        return 0.5 * sum(jnp.sum(jnp.exp(log_lam[k]) * params[k] ** 2) for k in params)
    return 0.5 * jnp.exp(log_lam) * sum(jnp.sum(p**2) for p in params.values())


PROBLEM = bl.Problem(
    inner=lambda params, log_lam, batch: cross_entropy(params, *batch) + penalty(params, log_lam),
    outer=lambda params, log_lam, batch: cross_entropy(params, *batch),
)


def load(args):
    if args.data == "digits":
        return datasets.digits(seed=args.seed)
    kw = {} if args.paper else {"num_train": args.mnist_train}
    return datasets.mnist(args.data_path, seed=args.seed, standardize=True, **kw)


def trainer(args, steps):
    """From-scratch training: `steps` of SGD with momentum (the cross-validation inner loop)."""
    return bl.unroll(optax.sgd(args.lr, momentum=0.9), steps=steps)


def _plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# Figures 1 and 5: loss against one hyperparameter
# ---------------------------------------------------------------------------------------------


def cross_validation(args, data, params0, grid):
    """Train from scratch at every grid point (one vmapped call); return train and val CE."""
    respond = bl.response(PROBLEM, trainer(args, args.cv_steps))
    fit = jax.jit(jax.vmap(respond, in_axes=(0, None, None)))
    began = time.perf_counter()
    params = jax.block_until_ready(fit(grid, params0, data.train))
    seconds = time.perf_counter() - began
    losses = {name: jax.vmap(cross_entropy, in_axes=(0, None, None))(params, *split)
              for name, split in (("train", data.train), ("val", data.val))}
    return {k: np.asarray(v) for k, v in losses.items()}, seconds


def fit_hypernet(args, data, net, sample, steps, lr):
    """Algorithm 2's first loop (bilevel.hypertrain_global), scanned; returns net and seconds."""
    fitter = bl.hypertrain_global(PROBLEM, optax.adam(optax.cosine_decay_schedule(lr, steps, 0.01)), sample,
                                  num_samples=args.num_samples)
    lam = jnp.asarray(0.0, jnp.float32)
    state = fitter.init(net, lam, net(lam))
    run = jax.jit(lambda s, key: jax.lax.scan(lambda s, k: fitter.step(s, k, data.train), s,
                                              jax.random.split(key, steps)))
    began = time.perf_counter()
    state, losses = jax.block_until_ready(run(state, jax.random.key(args.seed)))
    return state.hypernet, time.perf_counter() - began


def hypernet_curve(net, data, lams):
    params = jax.vmap(net)(lams)
    return {name: np.asarray(jax.vmap(cross_entropy, in_axes=(0, None, None))(params, *split))
            for name, split in (("train", data.train), ("val", data.val))}


def figures_1_and_5(args, data, params0, out: pathlib.Path) -> dict:
    lo, hi = args.lam_range
    grid = jnp.linspace(lo, hi, args.grid, dtype=jnp.float32)
    dense = jnp.linspace(lo, hi, 200, dtype=jnp.float32)
    cv, cv_seconds = cross_validation(args, data, params0, grid)
    best = float(grid[np.argmin(cv["val"])])
    print(f"  cross-validation: {args.grid} trainings from scratch in one call, {cv_seconds:.1f} s; "
          f"best log λ = {best:.2f}")

    mlp = bl.mlp_hypernet(params0, jnp.asarray(0.0, jnp.float32), key=jax.random.key(args.seed), width=args.width,
                          center=(lo + hi) / 2, scale=(hi - lo) / 2)
    uniform = lambda k: jax.random.uniform(k, (), jnp.float32, lo, hi)  # noqa: E731
    mlp, mlp_seconds = fit_hypernet(args, data, mlp, uniform, args.hypernet_steps, 3e-3)
    global_curve = hypernet_curve(mlp, data, dense)
    at_grid = hypernet_curve(mlp, data, grid)
    print(f"  global MLP hypernet: {args.hypernet_steps} steps in {mlp_seconds:.1f} s")

    center, sigma = best, args.sigma
    linear = bl.linear_hypernet(params0, jnp.asarray(center, jnp.float32), scale=sigma)
    gauss = lambda k: center + sigma * jax.random.normal(k, (), jnp.float32)  # noqa: E731
    linear, lin_seconds = fit_hypernet(args, data, linear, gauss, args.hypernet_steps, 1e-2)
    local_curve = hypernet_curve(linear, data, dense)
    lin_grid = hypernet_curve(linear, data, grid)
    print(f"  local linear hypernet (λ ~ N({center:.2f}, {sigma}²)): {lin_seconds:.1f} s")

    plt = _plot()
    for fig_name, curve, title in (("fig1", global_curve, "global MLP hypernet (λ ~ uniform)"),
                                   ("fig5", local_curve, f"linear hypernet (λ ~ N({center:.1f}, {sigma}²))")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
            ax.plot(grid, cv[split], "x", color=colour, markersize=8, label=f"{split}: cross-validation")
            ax.plot(dense, curve[split], "-", color=colour, label=f"{split}: hypernet")
        if fig_name == "fig5":
            density = np.exp(-0.5 * ((np.asarray(dense) - center) / sigma) ** 2)
            ax2 = ax.twinx()
            ax2.fill_between(dense, 0, density, color="grey", alpha=0.2, label="p(λ)")
            ax2.set_yticks([])
            ax2.set_ylim(0, 4)
        ax.set_xlabel("log L2 penalty λ")
        ax.set_ylabel("cross-entropy")
        ax.set_title(f"{data.name}: {title}")
        ax.set_ylim(0, max(1.2 * float(np.max(cv["val"])), 0.1))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{fig_name}_{data.name}.png", dpi=110)
        plt.close(fig)

    def gap(curve):
        return {s: float(np.max(np.abs(curve[s] - cv[s]))) for s in ("train", "val")}

    near = np.abs(np.asarray(grid) - center) <= 2 * sigma
    local_near = {s: float(np.max(np.abs(lin_grid[s] - cv[s])[near])) for s in ("train", "val")}
    return {
        "grid": np.asarray(grid).tolist(), "cv": {k: v.tolist() for k, v in cv.items()},
        "cv_seconds": cv_seconds, "cv_best_log_lam": best,
        "global": {"seconds": mlp_seconds, "max_abs_gap_to_cv": gap(at_grid),
                   "best_log_lam": float(dense[np.argmin(global_curve["val"])])},
        "local": {"seconds": lin_seconds, "center": center, "sigma": sigma,
                  "max_abs_gap_to_cv": gap(lin_grid), "max_abs_gap_within_2_sigma": local_near},
    }


# ---------------------------------------------------------------------------------------------
# Figures 6/8: one penalty per weight, each method on the same wall-time budget
# ---------------------------------------------------------------------------------------------


def _timed(step, state, budget, max_steps, record):
    """Call `step` until the budget (s) or max_steps; `record(state, out, t)` after each call."""
    began, n = time.perf_counter(), 0
    while n < max_steps:
        state, out = step(state)
        jax.block_until_ready(out)
        n += 1
        record(state, out, time.perf_counter() - began)
        if time.perf_counter() - began > budget:
            break
    return state, n


def capped(args):
    """u -> λ = hi − softplus(hi − u): smooth, and λ < hi, where inner SGD stays stable."""
    hi = args.lam_range[1]
    return lambda u: jax.tree_util.tree_map(lambda x: hi - jax.nn.softplus(hi - x), u)


def run_hyperopt(args, data, method, hparams0, params0):
    driver = bl.hyperopt(PROBLEM, method, optax.adam(args.outer_lr), transform=capped(args))
    test = data.test

    @jax.jit
    def step(state):
        state, info = driver.step(state, data.train, data.val)
        return state, (info.value, cross_entropy(state.params, *test))

    rows = []
    state = driver.init(hparams0, params0)
    state, n = _timed(step, state, args.budget, args.max_outer_steps,
                      lambda s, o, t: rows.append((t, float(o[0]), float(o[1]))))
    return capped(args)(state.variables), rows, n


def run_hypernet(args, data, hparams0, params0):
    n_hparams = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params0))
    # Adam moves every slope entry by about its rate, and an output sums H of them: scale by 1/√H
    lr = args.hypernet_lr if args.hypernet_lr else 2.5e-3 / np.sqrt(n_hparams)
    driver = bl.hypertrain_local(PROBLEM, optax.adam(lr), optax.adam(args.hypernet_outer_lr),
                                 perturb=bl.gaussian(args.sigma), num_samples=args.num_samples,
                                 transform=capped(args))
    # start the hypernet where unroll's first solve lands: the model trained at λ̂₀ (not timed, 0.1 s)
    start = jax.jit(bl.response(PROBLEM, trainer(args, args.inner_steps)))(capped(args)(hparams0), params0, data.train)
    net = bl.linear_hypernet(start, capped(args)(hparams0), scale=args.sigma)
    test = data.test

    @jax.jit
    def chunk(state, key):
        def one(s, k):
            s, info = driver.step(s, k, data.train, data.val)
            return s, info.value
        state, values = jax.lax.scan(one, state, jax.random.split(key, args.chunk))
        w = state.hypernet(capped(args)(state.variables))
        return state, (values[-1], cross_entropy(w, *test))

    rows, key = [], jax.random.key(args.seed)
    state = driver.init(net, hparams0, params0)

    def step(state):
        nonlocal key
        key, sub = jax.random.split(key)
        return chunk(state, sub)

    state, n = _timed(step, state, args.budget, args.max_outer_steps // args.chunk + 1,
                      lambda s, o, t: rows.append((t, float(o[0]), float(o[1]))))
    return capped(args)(state.variables), rows, n * args.chunk


def run_random(args, data, params0, shape_tree):
    method = trainer(args, args.inner_steps)
    sample = lambda k: jax.tree_util.tree_map(  # noqa: E731
        lambda s: jax.random.uniform(k, s.shape, jnp.float32, *args.lam_range), shape_tree)
    respond = jax.jit(bl.response(PROBLEM, method))
    rows, best, best_val, key = [], None, np.inf, jax.random.key(args.seed + 1)
    began, n = time.perf_counter(), 0
    while time.perf_counter() - began <= args.budget and n < args.max_outer_steps:
        key, sub = jax.random.split(key)
        found = bl.random_search(PROBLEM, method, sample, params0, data.train, data.val, num=8, key=sub,
                                 chunk_size=8)
        n += 8
        if float(found.best_value) < best_val:
            best, best_val = found.best, float(found.best_value)
        test_loss = float(cross_entropy(respond(best, params0, data.train), *data.test))
        rows.append((time.perf_counter() - began, best_val, test_loss))
    return best, rows, n


def figure_6(args, data, params0, out: pathlib.Path) -> dict:
    shape_tree = jax.tree_util.tree_map(jnp.zeros_like, params0)
    hparams0 = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, args.log_lam0, p.dtype), params0)
    n_hparams = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params0))
    forward = trainer(args, args.inner_steps)
    judge_fn = jax.jit(bl.response(PROBLEM, trainer(args, args.eval_steps)))

    def judge(log_lam):
        w = judge_fn(log_lam, params0, data.train)
        return {"val": float(cross_entropy(w, *data.val)), "test": float(cross_entropy(w, *data.test))}

    start = judge(capped(args)(hparams0))
    print(f"  per-weight penalties: {n_hparams} hyperparameters; start (log λ = {args.log_lam0}, "
          f"retrained) val {start['val']:.4f} test {start['test']:.4f}; budget {args.budget:.0f} s per method")
    runs = {
        "hypernet (local, linear)": lambda: run_hypernet(args, data, hparams0, params0),
        "unroll": lambda: run_hyperopt(args, data, forward, hparams0, params0),
        "implicit (neumann)": lambda: run_hyperopt(
            args, data, bl.implicit(forward, bl.neumann(terms=20, alpha=args.lr)), hparams0, params0),
        "random search": lambda: run_random(args, data, params0, shape_tree),
    }
    results, curves = {}, {}
    for name, run in runs.items():
        final, rows, steps = run()
        curves[name] = np.asarray(rows)
        t, val, test = rows[-1]
        results[name] = {"steps": steps, "seconds": t, "val": val, "test": test, "retrained": judge(final)}
        print(f"  {name:<26} {steps:6d} steps {t:6.1f} s   val {val:.4f} test {test:.4f}   "
              f"retrained: val {results[name]['retrained']['val']:.4f} test {results[name]['retrained']['test']:.4f}")

    plt = _plot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, c in curves.items():
        for ax, col in zip(axes, (1, 2)):
            ax.plot(c[:, 0], c[:, col], label=name, marker="o" if name == "random search" else None, markersize=3)
    for ax, what in zip(axes, ("validation", "test")):
        ax.set_xlabel("wall time (s, compilation included)")
        ax.set_title(f"{data.name}: {what} loss, {n_hparams} per-weight L2 penalties")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy")
    axes[0].set_ylim(0, 2.0 * max(start["val"], start["test"]))   # single noisy draws may spike above
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"fig6_{data.name}.png", dpi=110)
    plt.close(fig)

    lines = ["| method | steps | wall time (s) | val loss | test loss | val (retrained) | test (retrained) |",
             "|---|---|---|---|---|---|---|",
             f"| start (log λ = {args.log_lam0}) | – | – | – | – | {start['val']:.4f} | {start['test']:.4f} |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['steps']} | {r['seconds']:.1f} | {r['val']:.4f} | {r['test']:.4f} "
                     f"| {r['retrained']['val']:.4f} | {r['retrained']['test']:.4f} |")
    (out / f"fig6_{data.name}.md").write_text("\n".join(lines) + "\n")
    return {"n_hparams": n_hparams, "start": start, "methods": results}


# ---------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("digits", "mnist"), default="digits")
    p.add_argument("--data-path", default=None, help="mnist.npz (for --data mnist)")
    p.add_argument("--mnist-train", type=int, default=10000, help="MNIST training images (default size)")
    p.add_argument("--paper", action="store_true", help="paper size: all 50k MNIST training images, longer runs")
    p.add_argument("--figures", nargs="+", default=["1", "5", "6"], choices=["1", "5", "6"])
    p.add_argument("--lr", type=float, default=0.1, help="inner SGD-momentum learning rate")
    p.add_argument("--cv-steps", type=int, default=1000, help="steps of each from-scratch training (figs 1/5)")
    p.add_argument("--grid", type=int, default=21, help="cross-validation grid points")
    p.add_argument("--lam-range", type=float, nargs=2, default=(-9.0, 1.0))
    p.add_argument("--width", type=int, default=64, help="MLP hypernet width")
    p.add_argument("--hypernet-steps", type=int, default=3000, help="hypernet fitting steps (figs 1/5)")
    p.add_argument("--num-samples", type=int, default=8, help="λ draws per hypernet step")
    p.add_argument("--sigma", type=float, default=0.5, help="perturbation scale (fig 5, fig 6 hypernet)")
    p.add_argument("--inner-steps", type=int, default=100, help="inner steps per hypergradient (fig 6)")
    p.add_argument("--eval-steps", type=int, default=1000, help="retraining steps to judge a final λ")
    p.add_argument("--outer-lr", type=float, default=0.03, help="λ's Adam rate for unroll/implicit (fig 6)")
    p.add_argument("--hypernet-lr", type=float, default=None,
                   help="hypernet weights' Adam rate (fig 6); default 2.5e-3/sqrt(#hyperparameters)")
    p.add_argument("--hypernet-outer-lr", type=float, default=0.01, help="λ̂'s Adam rate with the hypernet (fig 6)")
    p.add_argument("--log-lam0", type=float, default=-6.0)
    p.add_argument("--budget", type=float, default=30.0, help="wall-time budget per method (s, fig 6)")
    p.add_argument("--max-outer-steps", type=int, default=100000)
    p.add_argument("--chunk", type=int, default=20, help="hypernet steps per recorded point (fig 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.data == "mnist" and not args.data_path:
        p.error("--data mnist needs --data-path FILE (an mnist.npz)")
    if args.paper:
        args.cv_steps, args.hypernet_steps, args.budget = max(args.cv_steps, 2000), max(args.hypernet_steps, 10000), max(args.budget, 300.0)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load(args)
    data = datasets.Dataset(*(tuple(jnp.asarray(a) for a in s) for s in (data.train, data.val, data.test)),
                            num_classes=data.num_classes, name=data.name)
    features = data.train[0].shape[1]
    params0 = {"W": jnp.zeros((features, data.num_classes), jnp.float32), "b": jnp.zeros(data.num_classes, jnp.float32)}
    print(f"hypernet figures on {data.name}: {data.train[0].shape[0]}/{data.val[0].shape[0]}/"
          f"{data.test[0].shape[0]} train/val/test, {features}-{data.num_classes} logistic regression; "
          f"backend {jax.default_backend()}")
    result = {"data": data.name, "settings": {k: v for k, v in vars(args).items()},
              "machine": {"backend": jax.default_backend(), "platform": platform.platform(),
                          "jax": jax.__version__}}
    if {"1", "5"} & set(args.figures):
        result["figures_1_5"] = figures_1_and_5(args, data, params0, out)
    if "6" in args.figures:
        result["figure_6"] = figure_6(args, data, params0, out)
    (out / f"hypernet_figures_{data.name}.json").write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
