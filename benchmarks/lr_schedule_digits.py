"""Learning-rate (and momentum) schedules learned by hypergradient descent on scikit-learn's digits.

As in Maclaurin, Duvenaud & Adams (2015), the hyperparameters are a whole per-step schedule:
a small MLP (64-32-10, tanh, fixed random initialisation) is trained by T = 100 full-batch
steps of `bilevel.scheduled_sgd` on the digits training split, and the validation
cross-entropy after the T steps is the outer loss. Two schedules are meta-learned with Adam
over `--outer-steps` steps, each from the best constant found on a grid (so the learned
schedule starts where the constant baseline ends):

- rates only (plain gradient descent, hyperparameters log α_t), from the best constant α on a
  grid of `--grid` log-spaced rates;
- rates and momenta (hyperparameters log α_t and logit γ_t), from the best constant (α, γ) on
  that grid times γ ∈ {0.5, 0.8, 0.9, 0.95} (momentum γ = 0 is left out here: its logit is
  −∞, so it could not move).

Every candidate is judged by the validation loss after the T steps (the objective being
optimised) and, for reporting only, by the loss and accuracy on the held-out test split.
Writes results.json and results.md to --out and the figure to --figure.

    python benchmarks/lr_schedule_digits.py            # about two minutes on 2 CPU cores
    python benchmarks/lr_schedule_digits.py --quick    # a tiny smoke run (T = 10, 3 outer steps)
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
from bilevel._schedules import scheduled_sgd  # bl.scheduled_sgd

MOMENTA = (0.0, 0.5, 0.8, 0.9, 0.95)


def _mlp_init(seed: int, hidden: int):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"W1": jax.random.normal(k1, (64, hidden)) / 8.0, "b1": jnp.zeros(hidden),
            "W2": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden), "b2": jnp.zeros(10)}


def _logits(params, X):
    return jnp.tanh(X @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]


def cross_entropy(params, hparams, batch):
    del hparams
    X, y = batch
    z = _logits(params, X)
    return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], 1)[:, 0])


def accuracy(params, batch):
    X, y = batch
    return jnp.mean(jnp.argmax(_logits(params, X), axis=1) == y)


PROBLEM = bl.Problem(inner=cross_entropy, outer=cross_entropy)


def rates_only(h):
    return scheduled_sgd(jnp.exp(h["log_lr"]))


def rates_and_momenta(h):
    return scheduled_sgd(jnp.exp(h["log_lr"]), jax.nn.sigmoid(h["logit_m"]))


def _logit(p):
    return float(np.log(p / (1 - p))) if p > 0 else -30.0   # γ = 0 as sigmoid(−30) ≈ 1e-13 (grid only)


def _meta_train(opt_fn, h0, w0, train, val, steps, outer_steps, outer_lr):
    hg = jax.jit(bl.hypergrad(PROBLEM, bl.unroll(opt_fn, steps=steps)))
    adam = optax.adam(outer_lr)
    h, state, history = h0, adam.init(h0), []
    for _ in range(outer_steps):
        out = hg(h, w0, train, val)
        history.append(float(out.value))
        updates, state = adam.update(out.grad, state, h)
        h = optax.apply_updates(h, updates)
    history.append(float(hg(h, w0, train, val).value))
    return h, history


_RESPONDERS: dict = {}


def _judge(opt_fn, h, w0, train, val, test, steps) -> dict:
    key = (opt_fn, steps)
    if key not in _RESPONDERS:   # one compiled response per optimizer, reused for every schedule
        _RESPONDERS[key] = jax.jit(bl.response(PROBLEM, bl.unroll(opt_fn, steps=steps)))
    w = _RESPONDERS[key](h, w0, train)
    return {"val_loss": float(cross_entropy(w, None, val)), "test_loss": float(cross_entropy(w, None, test)),
            "val_acc": float(accuracy(w, val)), "test_acc": float(accuracy(w, test))}


def _grid(steps, rates, w0, train, val):
    """Validation loss after `steps` steps for every (rate, momentum) pair, one vmapped call."""
    respond = bl.response(PROBLEM, bl.unroll(rates_and_momenta, steps=steps))

    def loss(log_lr, logit_m):
        h = {"log_lr": jnp.full(steps, log_lr), "logit_m": jnp.full(steps, logit_m)}
        return cross_entropy(respond(h, w0, train), None, val)

    a, m = np.meshgrid(np.log(rates), [_logit(g) for g in MOMENTA], indexing="ij")
    vals = jax.jit(jax.vmap(loss))(jnp.asarray(a.ravel()), jnp.asarray(m.ravel()))
    return np.asarray(vals).reshape(a.shape)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="inner steps T (the schedules' length)")
    p.add_argument("--outer-steps", type=int, default=50)
    p.add_argument("--outer-lr", type=float, default=0.02, help="Adam's rate on log α_t and logit γ_t")
    p.add_argument("--grid", type=int, default=25, help="constant rates on the grid, log-spaced in [0.01, 100]")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="data split and initialisation")
    p.add_argument("--quick", action="store_true", help="T = 10, 3 outer steps, a 5-rate grid")
    p.add_argument("--out", default="benchmarks/results/lr_schedule")
    p.add_argument("--figure", default="docs/assets/lr_schedule_digits.png")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.outer_steps, args.grid = 10, 3, 5
    for name in ("steps", "outer_steps", "grid", "hidden"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if not args.outer_lr > 0:
        p.error(f"--outer-lr must be > 0; got {args.outer_lr}")

    began = time.perf_counter()
    data = bl.datasets.digits(seed=args.seed)
    train, val, test = (tuple(jnp.asarray(x) for x in split) for split in (data.train, data.val, data.test))
    w0, T = _mlp_init(args.seed, args.hidden), args.steps
    rates = np.logspace(-2, 2, args.grid)
    grid = _grid(T, rates, w0, train, val)
    grid = np.where(np.isfinite(grid), grid, np.inf)          # a diverged run is never the best
    i_gd = int(np.argmin(grid[:, 0]))
    i_a, i_m = np.unravel_index(int(np.argmin(grid[:, 1:])), grid[:, 1:].shape)   # γ > 0
    best_gd, best_pair = float(rates[i_gd]), (float(rates[i_a]), float(MOMENTA[1 + i_m]))

    h_gd0 = {"log_lr": jnp.full(T, np.log(best_gd))}
    h_mom0 = {"log_lr": jnp.full(T, np.log(best_pair[0])), "logit_m": jnp.full(T, _logit(best_pair[1]))}
    h_gd, hist_gd = _meta_train(rates_only, h_gd0, w0, train, val, T, args.outer_steps, args.outer_lr)
    h_mom, hist_mom = _meta_train(rates_and_momenta, h_mom0, w0, train, val, T, args.outer_steps,
                                  args.outer_lr)
    rows = {
        "best constant rate": _judge(rates_only, h_gd0, w0, train, val, test, T),
        "learned rate schedule": _judge(rates_only, h_gd, w0, train, val, test, T),
        "best constant rate and momentum (γ >= 0.5)": _judge(rates_and_momenta, h_mom0, w0, train, val, test, T),
        "learned rate and momentum schedules": _judge(rates_and_momenta, h_mom, w0, train, val, test, T),
    }
    seconds = time.perf_counter() - began
    result = {
        "setup": {"dataset": "digits", "split": [len(train[1]), len(val[1]), len(test[1])],
                  "model": f"MLP 64-{args.hidden}-10 tanh", "inner_steps": T,
                  "outer_steps": args.outer_steps, "outer_optimizer": f"adam({args.outer_lr})",
                  "grid_rates": rates.tolist(), "grid_momenta": list(MOMENTA), "seed": args.seed,
                  "jax": jax.__version__, "backend": jax.default_backend(),
                  "machine": platform.processor() or platform.machine(), "wall_time_s": seconds},
        "best_constant_rate": best_gd, "best_constant_rate_and_momentum": list(best_pair),
        "grid_val_loss": grid.tolist(), "rows": rows,
        "history": {"rates only": hist_gd, "rates and momenta": hist_mom},
        "learned": {"rates only": {"lr": np.exp(np.asarray(h_gd["log_lr"])).tolist()},
                    "rates and momenta": {"lr": np.exp(np.asarray(h_mom["log_lr"])).tolist(),
                                          "momentum": np.asarray(jax.nn.sigmoid(h_mom["logit_m"])).tolist()}},
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(_markdown(result))
    _figure(result, pathlib.Path(args.figure))
    print(_markdown(result))
    print(f"Wrote {out / 'results.json'}, {out / 'results.md'} and {args.figure}")
    return result


def _markdown(r: dict) -> str:
    s = r["setup"]
    lines = [
        (f"Digits ({s['split'][0]} train / {s['split'][1]} validation / {s['split'][2]} test), "
        f"{s['model']}, T = {s['inner_steps']} full-batch steps of scheduled_sgd; schedules "
        f"meta-learned with {s['outer_optimizer']} for {s['outer_steps']} outer steps from the best "
        f"constant of the grid (best constant rate {r['best_constant_rate']:.3g}; best constant pair "
        f"with momentum γ >= 0.5: rate {r['best_constant_rate_and_momentum'][0]:.3g}, momentum "
        f"{r['best_constant_rate_and_momentum'][1]:g}). Validation loss is the objective; the test "
        f"split is used only for this table. {s['backend']}, {s['wall_time_s']:.0f} s in all."),
        "",
        "| schedule | validation loss | test loss | validation acc. | test acc. |",
        "|---|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['val_loss']:.4f} | {row['test_loss']:.4f} | "
                     f"{100 * row['val_acc']:.1f}% | {100 * row['test_acc']:.1f}% |")
    return "\n".join(lines) + "\n"


def _figure(r: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = np.arange(r["setup"]["inner_steps"])
    learned = r["learned"]
    ax[0].plot(steps, learned["rates only"]["lr"], label="learned (rates only)")
    ax[0].plot(steps, learned["rates and momenta"]["lr"], label="learned (with momenta)")
    ax[0].axhline(r["best_constant_rate"], color="C0", ls="--", lw=1, label="best constant (rates only)")
    ax[0].axhline(r["best_constant_rate_and_momentum"][0], color="C1", ls="--", lw=1,
                  label="best constant (γ >= 0.5)")
    ax[0].set(xlabel="inner step t", ylabel="learning rate α_t", yscale="log", title="Rate schedules")
    ax[0].legend(fontsize=7)
    ax[1].plot(steps, learned["rates and momenta"]["momentum"], color="C1", label="learned")
    ax[1].axhline(r["best_constant_rate_and_momentum"][1], color="C1", ls="--", lw=1, label="best constant")
    ax[1].set(xlabel="inner step t", ylabel="momentum γ_t", title="Momentum schedule", ylim=(0, 1))
    ax[1].legend(fontsize=7)
    for i, (name, hist) in enumerate(r["history"].items()):
        ax[2].plot(hist, color=f"C{i}", label=f"learned ({name})")
    ax[2].set(xlabel="outer (Adam) step", ylabel="validation loss after T steps",
              title="Meta-training from the best constant")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
