"""Tune Lasso and elastic-net penalties on scikit-learn's diabetes data by hypergradient descent.

Linear regression on the 442-patient diabetes dataset (10 features; `sklearn.datasets.load_diabetes`,
nothing downloaded), split train / validation / test by a seeded permutation, features standardised
with training statistics and the target centred with the training mean. The training loss is

    Lasso:        1/(2n) ‖y − Xw‖² + e^λ ‖w‖₁                     (one log-penalty λ)
    elastic net:  1/(2n) ‖y − Xw‖² + e^λ₁ ‖w‖₁ + ½ e^λ₂ ‖w‖²      (two log-penalties)

solved by FISTA (`bilevel.proximal_gradient`); the validation loss is 1/(2n) ‖y − Xw‖² on the
validation split. The script

1. checks the hypergradient dL_V/dλ of `implicit(proximal_gradient(...), cg)` (the prox_l1
   fixed-point condition, support-restricted) against central finite differences of the
   validation loss of scikit-learn's own `Lasso` / `ElasticNet` fits, and shows what the plain
   stationarity condition (inner loss written with jnp.abs) gives instead;
2. tunes the Lasso penalty by hypergradient descent (`bilevel.optimize`, warm-started, Adam on
   log λ) against `bilevel.grid_search` with the same number of inner solves;
3. tunes the two elastic-net penalties the same way against a grid and `bilevel.random_search`.

Writes lasso_diabetes.png, lasso_diabetes.md and lasso_diabetes.json (every number, the settings
and the machine) to --out.

    python benchmarks/lasso_diabetes.py            # about half a minute on 2 CPU cores
    python benchmarks/lasso_diabetes.py --quick    # a tiny run (what the tests use)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bilevel as bl  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The problem
# ---------------------------------------------------------------------------------------------


def half_mse(w, hparams, batch):
    """1/(2n) ‖y − Xw‖²: scikit-learn's Lasso data term (the smooth part; the penalty is the prox's)."""
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def lasso_with_abs(w, log_lam, batch):
    """The whole Lasso objective as one function, the ℓ1 term written with jnp.abs."""
    return half_mse(w, log_lam, batch) + jnp.exp(log_lam) * jnp.sum(jnp.abs(w))


PROBLEM = bl.Problem(inner=half_mse, outer=half_mse)
# What a user gets by writing the nonsmooth objective into `inner` and keeping the default condition
STATIONARY_PROBLEM = bl.Problem(inner=lasso_with_abs, outer=half_mse)

LASSO_PROX = bl.prox_l1(strength=jnp.exp)
ENET_PROX = bl.prox_elastic_net(l1=lambda h: jnp.exp(h[0]), l2=lambda h: jnp.exp(h[1]))


def load(seed: int, val_fraction: float, test_fraction: float):
    """(train, val, test) as (X, y) pairs of float64 arrays, and the feature names."""
    from sklearn.datasets import load_diabetes

    raw = load_diabetes()
    X, y = raw.data, raw.target
    n = len(X)
    n_val, n_test = round(val_fraction * n), round(test_fraction * n)
    perm = np.random.default_rng(seed).permutation(n)
    parts = (perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test])
    mean, std, y_mean = X[parts[0]].mean(0), X[parts[0]].std(0), y[parts[0]].mean()
    splits = tuple((jnp.asarray((X[i] - mean) / std), jnp.asarray(y[i] - y_mean)) for i in parts)
    return splits, list(raw.feature_names)


def fista(prox, args):
    """The forward method: `args.inner_steps` FISTA steps at η = 1/L."""
    return bl.proximal_gradient(prox, stepsize=1.0 / args.lipschitz, steps=args.inner_steps)


def implicit(prox, args):
    return bl.implicit(fista(prox, args), bl.cg(maxiter=100, tol=1e-12))


def lasso_path_range(train, decades: float):
    """[log(λ_max·10^−decades), log λ_max]: scikit-learn's LassoCV range (decades = 3 there);
    λ_max = ‖Xᵀy‖_∞/n is the smallest penalty whose solution is w = 0."""
    X, y = train
    log_max = float(jnp.log(jnp.max(jnp.abs(X.T @ y)) / X.shape[0]))
    return log_max - decades * np.log(10.0), log_max


def _plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# 1. The hypergradient against scikit-learn finite differences, and the stationarity condition
# ---------------------------------------------------------------------------------------------


def sklearn_fit(train, lam1: float, lam2: float = 0.0):
    """scikit-learn's solution of 1/(2n)‖y − Xw‖² + λ₁‖w‖₁ + ½λ₂‖w‖² (no intercept: y is centred)."""
    from sklearn.linear_model import ElasticNet, Lasso

    X, y = (np.asarray(a) for a in train)
    kw = {"fit_intercept": False, "tol": 1e-14, "max_iter": 1_000_000}
    if lam2 == 0.0:
        return Lasso(alpha=lam1, **kw).fit(X, y).coef_
    alpha = lam1 + lam2
    return ElasticNet(alpha=alpha, l1_ratio=lam1 / alpha, **kw).fit(X, y).coef_


def sklearn_val(data, log_lam) -> tuple[float, int]:
    """The validation loss and support size of scikit-learn's fit at the log-penalties."""
    lam = np.exp(np.atleast_1d(np.asarray(log_lam, dtype=float)))
    w = sklearn_fit(data[0], *lam)
    Xv, yv = (np.asarray(a) for a in data[1])
    return 0.5 * float(np.mean((Xv @ w - yv) ** 2)), int(np.sum(w != 0))


def finite_difference(data, log_lam, h: float) -> tuple[np.ndarray, bool]:
    """Central differences of scikit-learn's validation loss in each log-penalty; and whether
    the support is the same at every evaluated point (else a kink may lie in between)."""
    log_lam = np.atleast_1d(np.asarray(log_lam, dtype=float))
    grads, supports = [], {sklearn_val(data, log_lam)[1]}
    for i in range(len(log_lam)):
        e = np.zeros_like(log_lam)
        e[i] = h
        (up, s_up), (down, s_down) = sklearn_val(data, log_lam + e), sklearn_val(data, log_lam - e)
        grads.append((up - down) / (2 * h))
        supports |= {s_up, s_down}
    return np.asarray(grads), len(supports) == 1


def _stats(out) -> dict:
    return {k: float(v) for k, v in out.stats.items()}


def check_hypergradients(args, data, params0) -> dict:
    train, val, _ = data
    lasso = jax.jit(bl.hypergrad(PROBLEM, implicit(LASSO_PROX, args)))
    # The right forward solution (FISTA on the smooth part), differentiated through ∇(smooth + e^λ‖w‖₁) = 0
    solve = bl.solver(lambda lam, w0, batch: bl.response(PROBLEM, fista(LASSO_PROX, args))(lam, w0, batch))
    stationary = jax.jit(bl.hypergrad(STATIONARY_PROBLEM, bl.implicit(solve, bl.exact(), condition=bl.stationary())))
    rows = []
    for log_lam in args.check_at:
        lam = jnp.asarray(log_lam)
        ours, naive = lasso(lam, params0, train, val), stationary(lam, params0, train, val)
        (fd,), same_support = finite_difference(data, log_lam, args.fd_step)
        rows.append({
            "log_lam": log_lam, "support_size": int(ours.stats["support_size"]),
            "implicit_prox_l1": float(ours.grad), "sklearn_fd": float(fd),
            "rel_error": abs(float(ours.grad) - fd) / abs(fd), "fd_same_support": same_support,
            "implicit_stationary": float(naive.grad),
            "stationary_rel_error": abs(float(naive.grad) - fd) / abs(fd),
            "stats_prox_l1": _stats(ours), "stats_stationary": _stats(naive),
        })
        print(f"  log λ = {log_lam:5.2f} (support {rows[-1]['support_size']:2d}): implicit {float(ours.grad):10.4f}  "
              f"sklearn FD {fd:10.4f}  rel. error {rows[-1]['rel_error']:.1e}   "
              f"stationarity condition {float(naive.grad):10.4f}")
    enet = jax.jit(bl.hypergrad(PROBLEM, implicit(ENET_PROX, args)))
    enet_rows = []
    for point in args.enet_check_at:
        out = enet(jnp.asarray(point), params0, train, val)
        fd, same_support = finite_difference(data, point, args.fd_step)
        err = float(np.linalg.norm(np.asarray(out.grad) - fd) / np.linalg.norm(fd))
        enet_rows.append({"log_lams": list(point), "support_size": int(out.stats["support_size"]),
                          "implicit": np.asarray(out.grad).tolist(), "sklearn_fd": fd.tolist(),
                          "rel_error": err, "fd_same_support": same_support, "stats": _stats(out)})
        print(f"  elastic net at log λ = {tuple(point)}: implicit {np.round(np.asarray(out.grad), 4)}  "
              f"sklearn FD {np.round(fd, 4)}  rel. error {err:.1e}")
    # At λ >= λ_max the solution is w = 0: the support is empty and the hypergradient exactly zero
    above = args.lam_range[1] + 0.5
    flat = lasso(jnp.asarray(above), params0, train, val)
    above_max = {"log_lam": above, "grad": float(flat.grad), "support_size": int(flat.stats["support_size"])}
    print(f"  log λ = {above:.2f} > log λ_max: hypergradient {above_max['grad']}, support {above_max['support_size']}")
    return {"lasso": rows, "elastic_net": enet_rows, "fd_step": args.fd_step, "above_lambda_max": above_max}


def forward_accuracy(args, data, params0) -> dict:
    """The hypergradient is as accurate as the forward solve: FISTA steps against the error at a
    small λ, where FISTA converges slowest."""
    (fd,), _ = finite_difference(data, args.accuracy_at, args.fd_step)
    rows = []
    for steps in args.accuracy_steps:
        method = bl.implicit(bl.proximal_gradient(LASSO_PROX, stepsize=1.0 / args.lipschitz, steps=steps),
                             bl.cg(maxiter=100, tol=1e-12))
        out = jax.jit(bl.hypergrad(PROBLEM, method))(jnp.asarray(args.accuracy_at), params0, data[0], data[1])
        rows.append({"steps": steps, "grad": float(out.grad), "rel_error": abs(float(out.grad) - fd) / abs(fd),
                     "optimality_residual": float(out.stats["optimality_residual"])})
        print(f"  log λ = {args.accuracy_at}, {steps:5d} FISTA steps: optimality residual "
              f"{rows[-1]['optimality_residual']:.1e}, hypergradient rel. error {rows[-1]['rel_error']:.1e}")
    return {"log_lam": args.accuracy_at, "sklearn_fd": float(fd), "rows": rows}


# ---------------------------------------------------------------------------------------------
# 2./3. Tuning: hypergradient descent against grid and random search, same number of inner solves
# ---------------------------------------------------------------------------------------------


_RESPONSES: dict = {}


def losses_at(prox, args, data, params0, hparams) -> dict:
    """Validation and test loss (and support) of the model trained at `hparams`."""
    key = (id(prox), args.inner_steps, args.lipschitz)
    if key not in _RESPONSES:   # compile once per prox
        _RESPONSES[key] = jax.jit(bl.response(PROBLEM, fista(prox, args)))
    w = _RESPONSES[key](jnp.asarray(hparams), params0, data[0])
    return {"val": float(half_mse(w, None, data[1])), "test": float(half_mse(w, None, data[2])),
            "support_size": int(jnp.sum(w != 0))}


def hypergradient_descent(prox, args, data, params0, start) -> dict:
    """`bl.optimize`: `args.budget` warm-started inner solves, Adam on the log-penalties; the
    selected λ is the evaluated one with the lowest validation loss (the rule the searches use)."""
    began = time.perf_counter()
    result = bl.optimize(PROBLEM, implicit(prox, args), optax.adam(args.outer_lr), jnp.asarray(start), params0,
                         data[0], data[1], steps=args.budget, progress=False)
    seconds = time.perf_counter() - began
    h = result.history
    path = np.asarray(h["hparams"]).reshape(len(h), -1)
    best = int(np.argmin(h["value"]))
    return {"method": "hypergradient descent", "start": np.atleast_1d(start).tolist(),
            "inner_solves": len(h), "seconds": seconds,
            "path": path.tolist(), "path_values": h["value"].tolist(),
            "grad_norm": h["grad_norm"].tolist(),
            "max_optimality_residual": float(np.max(h["stats.optimality_residual"])),
            "max_solve_residual": float(np.max(h["stats.solve_residual"])),
            "selected": path[best].tolist(), **losses_at(prox, args, data, params0, path[best])}


def search(kind, prox, args, data, params0, candidates) -> dict:
    method = fista(prox, args)
    if kind == "grid search":
        found = bl.grid_search(PROBLEM, method, candidates, params0, data[0], data[1])
    else:
        lo, hi = (jnp.asarray(b) for b in zip(*candidates))
        sample = lambda k: jax.random.uniform(k, lo.shape, lo.dtype, lo, hi)  # noqa: E731
        found = bl.random_search(PROBLEM, method, sample, params0, data[0], data[1], num=args.budget,
                                 key=jax.random.key(args.seed))
    points = np.asarray(found.candidates).reshape(len(found.values), -1)
    return {"method": kind, "inner_solves": len(found.values), "seconds": found.wall_time,
            "candidates": points.tolist(), "values": np.asarray(found.values).tolist(),
            "selected": np.atleast_1d(np.asarray(found.best)).tolist(),
            **losses_at(prox, args, data, params0, found.best)}


def dense_curve(prox, args, data, params0, grid) -> dict:
    """Validation and test loss over a dense grid, for the figure only (not part of any budget)."""
    fit = jax.jit(jax.vmap(bl.response(PROBLEM, fista(prox, args)), in_axes=(0, None, None)))
    w = fit(grid, params0, data[0])
    loss = jax.vmap(half_mse, in_axes=(0, None, None))
    return {"val": np.asarray(loss(w, None, data[1])), "test": np.asarray(loss(w, None, data[2]))}


def tune_lasso(args, data, params0) -> dict:
    lo, hi = args.lam_range
    runs = [search("grid search", LASSO_PROX, args, data, params0, jnp.linspace(lo, hi, args.budget)),
            hypergradient_descent(LASSO_PROX, args, data, params0, (lo + hi) / 2)]
    # The validation loss has several local minima in λ: where does descent end from other starts?
    starts = np.linspace(lo, hi, args.starts + 2)[1:-1]
    others = [hypergradient_descent(LASSO_PROX, args, data, params0, s) for s in starts]
    dense = jnp.linspace(lo - 1.0, hi + 0.5, args.dense)
    return {"range": [lo, hi], "start": (lo + hi) / 2, "runs": runs, "other_starts": others,
            "dense": {"log_lam": np.asarray(dense).tolist(),
                      **{k: v.tolist() for k, v in dense_curve(LASSO_PROX, args, data, params0, dense).items()}}}


def tune_elastic_net(args, data, params0) -> dict:
    (lo1, hi1), (lo2, hi2) = args.lam_range, args.l2_range
    side = max(int(np.sqrt(args.budget)), 1)
    grid = jnp.stack(jnp.meshgrid(jnp.linspace(lo1, hi1, side), jnp.linspace(lo2, hi2, side), indexing="ij"), -1)
    start = [(lo1 + hi1) / 2, (lo2 + hi2) / 2]
    runs = [search("grid search", ENET_PROX, args, data, params0, grid.reshape(-1, 2)),
            search("random search", ENET_PROX, args, data, params0, [(lo1, hi1), (lo2, hi2)]),
            hypergradient_descent(ENET_PROX, args, data, params0, start)]
    a, b = np.linspace(lo1 - 0.5, hi1 + 0.5, args.dense_2d), np.linspace(lo2 - 0.5, hi2 + 0.5, args.dense_2d)
    mesh = jnp.stack(jnp.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2)
    curve = dense_curve(ENET_PROX, args, data, params0, mesh)
    return {"range": [[lo1, hi1], [lo2, hi2]], "start": start, "grid_side": side, "runs": runs,
            "dense": {"log_lam1": a.tolist(), "log_lam2": b.tolist(),
                      "val": curve["val"].reshape(len(a), len(b)).tolist()}}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _lasso_panel(ax, lasso, xlim=None, ylim=None, title=""):
    dense = lasso["dense"]
    grid, hd = lasso["runs"]
    ax.plot(dense["log_lam"], dense["val"], "-", color="tab:orange", label="validation loss")
    ax.plot(dense["log_lam"], dense["test"], "--", color="tab:green", label="test loss")
    ax.plot(np.ravel(grid["candidates"]), grid["values"], "x", color="k", markersize=7,
            label=f"grid search ({grid['inner_solves']} solves)")
    for i, run in enumerate(lasso["other_starts"]):
        ax.plot(np.ravel(run["path"]), run["path_values"], ".-", color="tab:purple", alpha=0.4, markersize=4,
                linewidth=0.6, label="descent from other starts" if i == 0 else None)
    path_x, path_y = np.ravel(hd["path"]), hd["path_values"]
    ax.plot(path_x, path_y, "o-", color="tab:blue", markersize=4, linewidth=0.8,
            label=f"hypergradient descent ({hd['inner_solves']} solves; ■ start)")
    ax.plot(path_x[0], path_y[0], "s", color="tab:blue", markersize=7)
    for run, colour in ((grid, "k"), (hd, "tab:blue")):
        ax.plot(run["selected"][0], run["val"], "*", color=colour, markersize=15, markeredgecolor="w")
    ax.set_xlabel("log λ (Lasso penalty e^λ‖w‖₁)")
    ax.set_ylabel("½ mean squared error")
    if xlim:
        ax.set_xlim(*xlim)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def figure(result: dict, path: pathlib.Path) -> None:
    plt = _plot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.8))
    lasso = result["lasso"]
    dense = lasso["dense"]
    best = float(np.min(dense["val"]))
    _lasso_panel(left, lasso, ylim=(0.98 * best, 1.25 * best),
                 title=f"diabetes, Lasso (the loss reaches {np.max(dense['val']):.0f} at λ_max)")
    left.legend(fontsize=7)
    # close-up of the validation loss around the selected penalties (★)
    chosen = [r["selected"][0] for r in lasso["runs"] + lasso["other_starts"]]
    lo, hi = min(chosen) - 0.6, max(chosen) + 0.4
    _lasso_panel(middle, lasso, xlim=(lo, hi), ylim=(0.9995 * best, 1.004 * best),
                 title="Lasso, close-up of the validation loss (★ selected)")

    enet = result["elastic_net"]
    d = enet["dense"]
    z = np.asarray(d["val"]).T
    levels = z.min() + np.concatenate([[0.0], 2.0 ** np.arange(-1, 12)])
    contour = right.contourf(d["log_lam1"], d["log_lam2"], z, levels=levels[levels <= z.max() + 1e3],
                             cmap="viridis_r", extend="max")
    fig.colorbar(contour, ax=right, label="validation loss")
    grid, rand, hd = enet["runs"]
    for run, marker, colour in ((grid, "x", "k"), (rand, "+", "tab:red")):
        pts = np.asarray(run["candidates"])
        right.plot(pts[:, 0], pts[:, 1], marker, color=colour, markersize=7,
                   label=f"{run['method']} ({run['inner_solves']} solves)")
    pts = np.asarray(hd["path"])
    right.plot(pts[:, 0], pts[:, 1], "o-", color="w", markeredgecolor="k", markeredgewidth=0.4,
               markersize=3.5, linewidth=0.8,
               label=f"hypergradient descent ({hd['inner_solves']} solves)")
    right.plot(pts[0, 0], pts[0, 1], "s", color="w", markeredgecolor="k", markersize=6)
    for run, colour in ((grid, "k"), (rand, "tab:red"), (hd, "w")):
        right.plot(*run["selected"], "*", color=colour, markersize=14, markeredgecolor="k")
    right.set_xlabel("log λ₁ (e^λ₁‖w‖₁)")
    right.set_ylabel("log λ₂ (½e^λ₂‖w‖²)")
    right.set_title("diabetes, elastic net: two log-penalties (★ selected)", fontsize=10)
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(point) -> str:
    return ", ".join(f"{x:.2f}" for x in point)


def table(result: dict) -> str:
    lines = ["| problem | method | inner solves | selected log λ | val loss | test loss | support | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, key in (("Lasso", "lasso"), ("elastic net", "elastic_net")):
        for r in result[key]["runs"] + result[key].get("other_starts", []):
            if "start" in r:
                r = {**r, "method": f"hypergradient descent from log λ = ({_fmt(r['start'])})"}
            lines.append(f"| {name} | {r['method']} | {r['inner_solves']} | {_fmt(r['selected'])} | {r['val']:.2f} "
                         f"| {r['test']:.2f} | {r['support_size']} | {r['seconds']:.2f} |")
    lines += ["", ("| log λ | support | implicit, prox_l1 condition | sklearn finite differences | relative error "
                   "| implicit, stationarity condition |"), "|---|---|---|---|---|---|"]
    for r in result["check"]["lasso"]:
        lines.append(f"| {r['log_lam']:.2f} | {r['support_size']} | {r['implicit_prox_l1']:.6g} | {r['sklearn_fd']:.6g} "
                     f"| {r['rel_error']:.1e} | {r['implicit_stationary']:.6g} |")
    acc = result["forward_accuracy"]
    lines += ["", (f"| FISTA steps (log λ = {acc['log_lam']:.2f}) | optimality residual | hypergradient "
                   "| relative error |"), "|---|---|---|---|"]
    for r in acc["rows"]:
        lines.append(f"| {r['steps']} | {r['optimality_residual']:.1e} | {r['grad']:.6g} | {r['rel_error']:.1e} |")
    lines += ["", "| elastic net log λ₁, log λ₂ | support | implicit | sklearn finite differences | relative error |",
              "|---|---|---|---|---|"]
    for r in result["check"]["elastic_net"]:
        lines.append(f"| {_fmt(r['log_lams'])} | {r['support_size']} | {_fmt(r['implicit'])} "
                     f"| {_fmt(r['sklearn_fd'])} | {r['rel_error']:.1e} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seeds the split (and random search)")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--inner-steps", type=int, default=2000, help="FISTA steps per inner solve")
    p.add_argument("--budget", type=int, default=25,
                   help="inner solves per tuning method (the elastic-net grid is ⌊√budget⌋²)")
    p.add_argument("--outer-lr", type=float, default=0.2, help="Adam's rate on the log-penalties")
    p.add_argument("--decades", type=float, default=3.0,
                   help="the λ range: λ_max·10^-decades .. λ_max (scikit-learn's LassoCV default: 3)")
    p.add_argument("--l2-range", type=float, nargs=2, default=(-4.0, 2.0), help="log λ₂ range (elastic net)")
    p.add_argument("--starts", type=int, default=4,
                   help="other starts of Lasso hypergradient descent, evenly inside the range")
    p.add_argument("--check-at", type=float, nargs="+", default=(-2.0, 0.0, 1.0, 2.0),
                   help="log λ values of the finite-difference check")
    p.add_argument("--accuracy-at", type=float, default=-2.0, help="log λ of the forward-accuracy study")
    p.add_argument("--accuracy-steps", type=int, nargs="+", default=(200, 500, 1000, 2000, 5000),
                   help="FISTA steps of the forward-accuracy study")
    p.add_argument("--fd-step", type=float, default=1e-4, help="central-difference step in log λ")
    p.add_argument("--dense", type=int, default=200, help="points of the plotted Lasso curve")
    p.add_argument("--dense-2d", type=int, default=40, help="points per side of the plotted elastic-net map")
    p.add_argument("--quick", action="store_true", help="a tiny run for the tests")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.quick:
        args.budget, args.starts, args.dense, args.dense_2d, args.check_at = 9, 2, 30, 8, (0.0, 2.0)
        args.accuracy_steps = (200,)
    args.enet_check_at = ((0.0, -1.0),) if args.quick else ((0.0, -1.0), (1.0, 0.0))
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data, features = load(args.seed, args.val_fraction, args.test_fraction)
    X = data[0][0]
    args.lipschitz = float(jnp.linalg.eigvalsh(X.T @ X / X.shape[0])[-1])
    args.lam_range = lasso_path_range(data[0], args.decades)
    params0 = jnp.zeros(X.shape[1])
    print(f"diabetes: {X.shape[0]}/{data[1][0].shape[0]}/{data[2][0].shape[0]} train/val/test, {X.shape[1]} "
          f"features; log λ range [{args.lam_range[0]:.2f}, {args.lam_range[1]:.2f}]; backend {jax.default_backend()}")
    import sklearn

    result = {"settings": {k: v for k, v in vars(args).items()}, "features": features,
              "sizes": [int(s[0].shape[0]) for s in data],
              "machine": {"backend": jax.default_backend(), "platform": platform.platform(),
                          "cpus": os.cpu_count(), "jax": jax.__version__, "sklearn": sklearn.__version__,
                          "bilevel": getattr(bl, "__version__", "unknown")}}
    print("hypergradient check:")
    result["check"] = check_hypergradients(args, data, params0)
    result["forward_accuracy"] = forward_accuracy(args, data, params0)
    for key, tune in (("lasso", tune_lasso), ("elastic_net", tune_elastic_net)):
        result[key] = tune(args, data, params0)
        for r in result[key]["runs"] + result[key].get("other_starts", []):
            name = r["method"] + (f" from ({_fmt(r['start'])})" if "start" in r else "")
            print(f"  {key:<12} {name:<34} {r['inner_solves']:3d} solves {r['seconds']:6.2f} s  "
                  f"log λ = ({_fmt(r['selected'])})  val {r['val']:.2f}  test {r['test']:.2f}")
    result["seconds"] = time.perf_counter() - began
    figure(result, out / "lasso_diabetes.png")
    (out / "lasso_diabetes.md").write_text(table(result))
    (out / "lasso_diabetes.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"done in {result['seconds']:.1f} s; wrote lasso_diabetes.png/.md/.json to {out}")
    return result


if __name__ == "__main__":
    main()
