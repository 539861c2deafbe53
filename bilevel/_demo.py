"""`bilevel demo`: tune L2 penalties of a logistic regression with every method and random search.

The problem: multinomial logistic regression `softmax(X W + b)` trained on the training split
with penalty `½ Σ exp(λ) ⊙ W²`, where λ holds one log-penalty per class (`per-class`, a
vector of `classes`) or per weight (`per-weight`, the shape of W); the validation
cross-entropy is the outer loss. Each gradient-based method runs `bilevel.optimize` with Adam
on λ from the same start; random search trains from scratch at as many random λ as the
gradient methods take outer steps. Every final λ is then judged the same way: a model trained
from scratch at λ with the evaluation training (more steps), scored on validation and test.

A judged row is marked *diverged* when that training from scratch ends with a non-finite
value or with a training objective above log(classes), the objective at the all-zero start:
the inner learning rate is too large for that λ, and its losses mean nothing. The plot's
curves are each method's validation loss *during* tuning (warm-started inner solves), so they
end at other values than the table; the plot and the table's footer both say so.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
import warnings
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
from ._optimize import OptimizeError, OptimizeWarning, optimize
from ._problem import Problem
from ._search import random_search
from ._unroll import truncate, unroll

FORWARD_MODE_LIMIT = 1000   # forward_mode carries an (hparams × params) Jacobian: skip beyond this
APPROXIMATE = ("implicit-neumann", "identity")   # deliberately inexact solves: no residual warning


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
        row = {"val_loss": float(cross_entropy(params, *val)), "test_loss": float(cross_entropy(params, *test)),
               "test_accuracy": float(accuracy(params, *test)),
               "train_objective": float(problem.inner(params, log_lam, train))}
        return {**row, "diverged": diverged(row, classes)}

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
        result, stopped, notes = _tune(name, chosen[name], problem, outer_lr, hparams0, params0, train, val,
                                       outer_steps, progress)
        seconds = time.perf_counter() - began
        steps_done = len(result.history)
        if steps_done:
            result.history.save(out / f"history_{name}.json")
            curves[name] = (np.cumsum(result.history["wall_time"]), result.history["value"])
        rows[name] = {**judge(result.hparams), "hypergradients": steps_done, "wall_time": seconds,
                      "stopped": stopped, "warnings": notes}
        say(_progress_line(name, rows[name]))
        for note in [stopped] * bool(stopped) + notes:
            say(textwrap.fill(note, 100, initial_indent="      ", subsequent_indent="      "))
    rows["random search"], curves["random search"] = _random(
        problem, full_training, shape, params0, train, val, outer_steps, seed, judge)
    say(_progress_line("random search", rows["random search"]))
    _write(out, rows, curves, data.name, penalty, classes=classes, inner_steps=inner_steps,
           eval_steps=eval_steps, lr=lr)
    return rows


def _tune(name, method, problem, outer_lr, hparams0, params0, train, val, outer_steps, progress):
    """`optimize` for one method: (result, why it stopped early or None, its warnings' messages).

    A failed step (a non-finite hypergradient, a diverged Neumann series) stops that method
    only: its row then judges the λ reached before the failure and says where it stopped.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OptimizeWarning)
        try:
            result = optimize(problem, method, optax.adam(outer_lr), hparams0, params0, train, val, outer_steps,
                              progress=progress, residual_warning=None if name in APPROXIMATE else 0.1)
            stopped = None
        except OptimizeError as err:
            result = err.result
            stopped = f"stopped at step {err.step} of {outer_steps}: {'; '.join(err.failures)}."
    for w in caught:
        if not issubclass(w.category, OptimizeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [str(w.message).removeprefix("bilevel.optimize: ") for w in caught if issubclass(w.category, OptimizeWarning)]
    return result, stopped, notes


def diverged(row: dict, classes: int) -> bool:
    """Whether a judged training blew up: a non-finite number, or a training objective above log(classes).

    At the all-zero start the training objective is exactly log(classes) (uniform
    predictions, no penalty), and a training that works only lowers it.
    """
    values = (row["val_loss"], row["test_loss"], row["train_objective"])
    return not all(math.isfinite(v) for v in values) or row["train_objective"] > math.log(classes)


def _markers(row: dict) -> list:
    """The flags a table row carries: diverged, stopped early, warned."""
    return (["diverged"] * bool(row["diverged"]) + ["stopped early"] * bool(row.get("stopped"))
            + ["warning"] * bool(row.get("warnings")))


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3g}"   # nan and inf print as such


def _progress_line(name: str, row: dict) -> str:
    flag = "".join(f"  ({m})" for m in _markers(row))
    return (f"  {name:<18} val {_number(row['val_loss'])}  test {_number(row['test_loss'])}  "
            f"{row['wall_time']:6.1f} s{flag}")


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


def _footer(rows: dict, curves: dict, *, classes: int, inner_steps: int, eval_steps: int, lr: float) -> list:
    """The notes printed under the table: how rows are judged, how the curves differ, what went wrong."""
    notes = [f"Every row is judged alike: its final λ retrained from scratch ({eval_steps} steps) and scored on "
             "validation and test. The curves in validation_vs_time.png are the validation loss *during* tuning, "
             f"at warm-started inner parameters ({inner_steps} steps per outer step), so they end at other values "
             "than this table."]
    start = rows["start (no tuning)"]["val_loss"]
    worse = [m for m, r in rows.items()
             if m not in ("start (no tuning)", "random search") and not r["diverged"] and r["val_loss"] > start]
    if worse:
        notes.append(f"Worse than the start (no tuning): {', '.join(worse)}. Tuning moved λ the wrong way for the "
                     "retrained model in this run: a biased hypergradient (the short horizon of truncation, few "
                     "Neumann terms, H⁻¹ ≈ I) or the gap between warm-started tuning and retraining from scratch.")
    search = rows.get("random search")
    if search and not search["diverged"] and search["val_loss"] > start:
        notes.append(f"Random search: none of its {search['trainings']} draws beat the start (no tuning).")
    rising = _rising(curves)
    if rising:
        notes.append(f"Tuning curves that end above their first point: {', '.join(rising)}. The validation loss rose "
                     "while they tuned: their hypergradient moved λ the wrong way.")
    if any(r["diverged"] for r in rows.values()):
        notes.append(f"A (diverged) row: the training from scratch at that λ ended with non-finite values or a training "
                     f"objective above log {classes} = {math.log(classes):.3f} (its value at the all-zero start), so "
                     f"its losses mean nothing: the inner learning rate (--lr {lr:g}) is too large for that λ. "
                     "Lower --lr.")
    for method, r in rows.items():
        if r.get("stopped"):
            notes.append(f"{method} (stopped early): bilevel.optimize {r['stopped']} Its row judges the λ reached "
                         "before that step.")
        for note in r.get("warnings", []):
            notes.append(f"{method} (warning): {note}")
    return notes


def _rising(curves: dict) -> list:
    """The tuning curves that end above their first value."""
    return [m for m, (_, v) in curves.items() if m != "random search" and len(v) > 1 and v[-1] > v[0]]


def _caption(rows: dict, curves: dict, *, inner_steps: int, eval_steps: int) -> str:
    """The text under the plot: what the lines and the crosses are, and which lines end above their start."""
    caption = (f"Lines: validation loss during tuning, at warm-started inner parameters ({inner_steps} steps per "
               f"outer step); random search: best so far, each trained from scratch. ×: the table's value, the final "
               f"λ retrained from scratch ({eval_steps} steps), which is why lines end elsewhere.")
    rising = _rising(curves)
    if rising:
        caption += f" Ending above their start ({', '.join(rising)}): the hypergradient moved λ the wrong way."
    diverged_rows = [m for m, r in rows.items() if r["diverged"]]
    if diverged_rows:
        caption += f" Diverged, not marked: {', '.join(diverged_rows)} (lower --lr)."
    return caption


def _write(out: Path, rows: dict, curves: dict, name: str, penalty: str, *, classes: int, inner_steps: int,
           eval_steps: int, lr: float) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| method | val loss | test loss | test accuracy | hypergradients | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for method, r in rows.items():
        evals = r.get("trainings", r["hypergradients"])
        evals = f"{evals} trainings" if "trainings" in r else evals
        flag = "".join(f" ({m})" for m in _markers(r))
        lines.append(f"| {method}{flag} | {_number(r['val_loss'])} | {_number(r['test_loss'])} | "
                     f"{r['test_accuracy']:.3f} | {evals} | {r['wall_time']:.1f} |")
    notes = _footer(rows, curves, classes=classes, inner_steps=inner_steps, eval_steps=eval_steps, lr=lr)
    (out / "results.md").write_text("\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.4))
    for method, (t, v) in curves.items():
        (line,) = ax.plot(t, v, label=method, marker="o" if method == "random search" else None, markersize=3)
        row = rows[method]
        if method != "random search" and not row["diverged"]:
            ax.plot(t[-1], row["val_loss"], marker="x", markersize=7, linestyle="none", color=line.get_color())
    ax.plot([], [], marker="x", linestyle="none", color="0.3", label="final λ retrained (the table)")
    ax.set_xlabel("wall time (s, compilation included)")
    ax.set_ylabel("validation cross-entropy")
    ax.set_title(f"{name}: {penalty} L2 penalties tuned by each method")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    caption = _caption(rows, curves, inner_steps=inner_steps, eval_steps=eval_steps)
    caption = textwrap.fill(caption, 115)
    fig.text(0.01, 0.01, caption, fontsize=7, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.015 + 0.027 * (caption.count("\n") + 1), 1, 1))
    fig.savefig(out / "validation_vs_time.png", dpi=120)
    plt.close(fig)
