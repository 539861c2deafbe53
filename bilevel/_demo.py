"""`bilevel demo`: tune L2 penalties of a logistic regression with every method and random search.

The problem: multinomial logistic regression `softmax(X W + b)` trained on the training split
with penalty `½ Σ exp(λ) ⊙ W²`, where λ holds one log-penalty per class (`per-class`, a
vector of `classes`) or per weight (`per-weight`, the shape of W); the validation
cross-entropy is the outer loss. Each gradient-based method runs `bilevel.optimize` with Adam
on λ from the same start; random search trains from scratch at as many random λ as the
gradient methods take outer steps. Every final λ is then judged the same way: a model trained
from scratch at λ with the evaluation training (more steps), scored on validation and test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import datasets
from ._compile import response
from ._forward import forward_mode
from ._implicit import implicit
from ._linear_solvers import cg, identity, neumann
from ._optimize import optimize
from ._problem import Problem
from ._search import random_search
from ._unroll import truncate, unroll

FORWARD_MODE_LIMIT = 1000   # forward_mode carries an (hparams × params) Jacobian: skip beyond this


def cross_entropy(params, X, y):
    logits = X @ params["W"] + params["b"]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def accuracy(params, X, y):
    return jnp.mean(jnp.argmax(X @ params["W"] + params["b"], axis=1) == y)


def make_problem() -> Problem:
    def inner(params, log_lam, batch):
        X, y = batch
        return cross_entropy(params, X, y) + 0.5 * jnp.sum(jnp.exp(log_lam) * params["W"] ** 2)

    def outer(params, log_lam, batch):
        X, y = batch
        return cross_entropy(params, X, y)

    return Problem(inner=inner, outer=outer)


def make_methods(inner_steps: int, lr: float, n_hparams: int) -> dict:
    forward = unroll(optax.sgd(lr, momentum=0.9), steps=inner_steps)
    methods = {
        "unroll": forward,
        "truncate": truncate(forward, last=max(1, inner_steps // 10)),
        "implicit-cg": implicit(forward, cg(maxiter=20, tol=1e-6)),
        "implicit-neumann": implicit(forward, neumann(terms=20, alpha=lr)),
        "identity": implicit(forward, identity()),
        "forward_mode": forward_mode(forward),
    }
    if n_hparams > FORWARD_MODE_LIMIT:
        del methods["forward_mode"]
    return methods


def _jnp_split(split):
    X, y = split
    return jnp.asarray(X), jnp.asarray(y)


def run(data: datasets.Dataset, out: Path, *, penalty: str, outer_steps: int, inner_steps: int,
        lr: float, outer_lr: float, eval_steps: int, log_lam0: float, seed: int, methods,
        progress: bool = False, say=print) -> dict:
    """Run every method and random search; write the table, histories and plot; return the table."""
    train, val, test = (_jnp_split(s) for s in (data.train, data.val, data.test))
    features, classes = train[0].shape[1], data.num_classes
    params0 = {"W": jnp.zeros((features, classes)), "b": jnp.zeros(classes)}
    shape = (classes,) if penalty == "per-class" else (features, classes)
    hparams0 = jnp.full(shape, log_lam0)
    problem = make_problem()
    n_hparams = int(np.prod(shape))
    full_training = unroll(optax.sgd(lr, momentum=0.9), steps=eval_steps)
    evaluate = jax.jit(response(problem, full_training))

    def judge(log_lam) -> dict:
        params = evaluate(log_lam, params0, train)
        return {"val_loss": float(cross_entropy(params, *val)), "test_loss": float(cross_entropy(params, *test)),
                "test_accuracy": float(accuracy(params, *test))}

    say(f"bilevel demo: {data.name}, {train[0].shape[0]}/{val[0].shape[0]}/{test[0].shape[0]} "
        f"train/val/test, {features} features, {classes} classes; {penalty} log-penalties "
        f"({n_hparams} hyperparameters) from log λ = {log_lam0}; {outer_steps} outer Adam steps "
        f"(lr {outer_lr}), {inner_steps} inner SGD-momentum steps (lr {lr}) per step, warm-started; "
        f"backend {jax.default_backend()}\n")
    rows, curves = {"start (no tuning)": {**judge(hparams0), "hypergradients": 0, "wall_time": 0.0}}, {}
    chosen = make_methods(inner_steps, lr, n_hparams)
    for name in methods:
        if name not in chosen:
            say(f"  {name}: skipped ({n_hparams} hyperparameters > {FORWARD_MODE_LIMIT})")
            continue
        began = time.perf_counter()
        result = optimize(problem, chosen[name], optax.adam(outer_lr), hparams0, params0, train, val,
                          outer_steps, progress=progress)
        seconds = time.perf_counter() - began
        result.history.save(out / f"history_{name}.json")
        curves[name] = (np.cumsum(result.history["wall_time"]), result.history["value"])
        rows[name] = {**judge(result.hparams), "hypergradients": outer_steps, "wall_time": seconds}
        say(f"  {name:<18} val {rows[name]['val_loss']:.4f}  test {rows[name]['test_loss']:.4f}  {seconds:6.1f} s")
    rows["random search"], curves["random search"] = _random(
        problem, full_training, shape, params0, train, val, outer_steps, seed, judge)
    say(f"  {'random search':<18} val {rows['random search']['val_loss']:.4f}  "
        f"test {rows['random search']['test_loss']:.4f}  {rows['random search']['wall_time']:6.1f} s")
    _write(out, rows, curves, data.name, penalty)
    return rows


def _random(problem, method, shape, params0, train, val, num, seed, judge):
    """Random search in five rounds (for a best-so-far curve), from scratch with `method`."""
    sample = lambda k: jax.random.uniform(k, shape, minval=-8.0, maxval=0.0)  # noqa: E731
    key, best, best_value, times, values, began = jax.random.key(seed), None, np.inf, [], [], time.perf_counter()
    rounds = min(5, num)
    for r in range(rounds):
        count = num // rounds + (r < num % rounds)
        found = random_search(problem, method, sample, params0, train, val, num=count,
                              key=jax.random.fold_in(key, r), chunk_size=16)
        if float(found.best_value) < best_value:
            best, best_value = found.best, float(found.best_value)
        times.append(time.perf_counter() - began)
        values.append(best_value)
    row = {**judge(best), "hypergradients": 0, "trainings": num, "wall_time": time.perf_counter() - began}
    return row, (np.array(times), np.array(values))


def _write(out: Path, rows: dict, curves: dict, name: str, penalty: str) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| method | val loss | test loss | test accuracy | hypergradients | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for method, r in rows.items():
        evals = r.get("trainings", r["hypergradients"])
        evals = f"{evals} trainings" if "trainings" in r else evals
        lines.append(f"| {method} | {r['val_loss']:.4f} | {r['test_loss']:.4f} | {r['test_accuracy']:.3f} "
                     f"| {evals} | {r['wall_time']:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, (t, v) in curves.items():
        ax.plot(t, v, label=method, marker="o" if method == "random search" else None, markersize=3)
    ax.set_xlabel("wall time (s, compilation included)")
    ax.set_ylabel("validation cross-entropy")
    ax.set_title(f"{name}: {penalty} L2 penalties tuned by each method")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "validation_vs_time.png", dpi=120)
    plt.close(fig)
