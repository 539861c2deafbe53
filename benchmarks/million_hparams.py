"""A million hyperparameters: one weight decay per parameter of a small convolutional network on MNIST.

The inner problem is a convolutional network trained with minibatch SGD on the mean
cross-entropy plus ½ Σᵢ e^{λᵢ} wᵢ², one log-decay λᵢ per parameter wᵢ (so H = P); the outer
problem is the cross-entropy on a validation split. The hyperparameters are tuned by SOBA
(Dagréou et al. 2022: one stochastic step on w, on the linear-system variable v ≈ −H⁻¹∇_wF and
on λ per step, `bl.soba`), the stochastic form of implicit differentiation, with Adam on λ.
The network (defaults): 3×3 conv 1→16, 2×2 max-pool, 3×3 conv 16→32, 2×2 max-pool, dense
1,568→640, dense 640→10, ReLU: P = 1,015,370 parameters. It is "small" in compute (two thin
convolutions); the width of the dense layer is what brings P past 10⁶.

Rows, all from the same initial weights and the same minibatch size and SGD step size:

- `no decay`: SGD on the cross-entropy alone (the untuned model);
- `decay e^λ₀`: SGD with the one scalar decay both tuned runs start from;
- `scalar grid`: SGD at each scalar decay of a grid, the best by validation loss (each grid
  point is a whole training run; their times add up);
- `scalar SOBA`: SOBA with one scalar log-decay (H = 1);
- `per-parameter SOBA`: SOBA with one log-decay per parameter (H = P).

Nothing of size P × H is formed: SOBA takes one Hessian-vector product and one
cross-derivative product ∇²_λw G v (a vector-Jacobian product) per step. The memory columns are
XLA's `memory_analysis()` of each compiled chunk (temp, arguments, outputs); the P × H
Jacobian dw/dλ in float32 would take P²·4 bytes (4 TB at the default size).

Time is the wall time of the compiled steps, without compilation and without the evaluations
between chunks of steps (full validation and test sets). Each step is one compiled call from
Python, not a `lax.scan` of steps: on XLA:CPU, convolutions inside a loop body take a slow path
(jax-ml/jax#12868), 3.5-5× slower per step here.

Writes million_hparams.json / million_hparams.md to --out (benchmarks/results/million_hparams)
and million_hparams.png to --assets (docs/assets); with --soba-seeds, million_hparams_seeds.json /
.md beside them.

    python benchmarks/million_hparams.py --mnist ../shared/data/mnist.npz     # about 14 minutes on 2 CPU cores
    python benchmarks/million_hparams.py --mnist ../shared/data/mnist.npz --soba-seeds 2   # SOBA at 2 more seeds
    python benchmarks/million_hparams.py --quick                              # a tiny run on digits (the tests')
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel as bl

# --- the network ---------------------------------------------------------------------------


def init_cnn(key, side: int, widths: tuple[int, int, int]) -> tuple:
    """He-initialised weights and zero biases: (k1, b1, k2, b2, W3, b3, W4, b4)."""
    c1, c2, hidden = widths
    flat = (side // 4) ** 2 * c2
    shapes = [((3, 3, 1, c1), 9), ((3, 3, c1, c2), 9 * c1), ((flat, hidden), flat), ((hidden, 10), hidden)]
    params = []
    for k, (shape, fan_in) in zip(jax.random.split(key, 4), shapes):
        params += [jax.random.normal(k, shape, jnp.float32) * math.sqrt(2.0 / fan_in),
                   jnp.zeros(shape[-1], jnp.float32)]
    return tuple(params)


def _conv(x, kernel, bias):
    """3×3 convolution with stride 2 ('SAME' padding: the side halves), then ReLU."""
    y = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + bias)


def apply_cnn(params, x):
    """Logits of images x: (n, side, side, 1)."""
    k1, b1, k2, b2, W3, b3, W4, b4 = params
    h = _conv(_conv(x, k1, b1), k2, b2)
    h = jax.nn.relu(h.reshape(h.shape[0], -1) @ W3 + b3)
    return h @ W4 + b4


def cross_entropy(params, batch):
    X, y = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_cnn(params, X), y))


def penalty(params, log_decay):
    """½ Σ e^λ w²: λ one scalar (an array of shape ()) or a tuple with one λ per parameter."""
    if isinstance(log_decay, tuple):
        return 0.5 * sum(jnp.sum(jnp.exp(l) * p**2) for p, l in zip(params, log_decay))
    return 0.5 * jnp.exp(log_decay) * sum(jnp.sum(p**2) for p in params)


PROBLEM = bl.Problem(inner=lambda w, lam, b: cross_entropy(w, b) + penalty(w, lam),
                     outer=lambda w, lam, b: cross_entropy(w, b))


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# --- data ----------------------------------------------------------------------------------


def load(args):
    """(train, val, test) as (images (n, side, side, 1) float32 in [0, 1], labels int32), and side."""
    if args.mnist:
        data, side = bl.datasets.mnist(args.mnist, num_train=args.num_train, num_val=args.num_val), 28
    else:
        data, side = bl.datasets.digits(seed=0), 8
    splits = []
    for X, y in (data.train, data.val, data.test):
        X = np.asarray(X, np.float32)
        if not args.mnist:
            X = X / 16.0  # digits' pixels are 0..16
        splits.append((jnp.asarray(X.reshape(-1, side, side, 1)), jnp.asarray(y, jnp.int32)))
    return splits, side


def evaluate(params, data, chunk: int = 1000):
    """Mean cross-entropy and accuracy on a whole split, in slices of `chunk` images."""
    X, y = data
    n = X.shape[0] // chunk * chunk
    losses, correct = [], []
    for X_, y_ in ((X[:n].reshape(-1, chunk, *X.shape[1:]), y[:n].reshape(-1, chunk)), (X[n:][None], y[n:][None])):
        if X_.shape[1] == 0:
            continue
        logits = jax.lax.map(lambda xy: apply_cnn(params, xy[0]), (X_, y_))
        losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, y_).reshape(-1))
        correct.append((jnp.argmax(logits, -1) == y_).reshape(-1))
    return jnp.mean(jnp.concatenate(losses)), jnp.mean(jnp.concatenate(correct).astype(jnp.float32))


# --- the runs ------------------------------------------------------------------------------


def memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    out = {f: int(getattr(mem, f"{f}_size_in_bytes")) for f in ("temp", "argument", "output")}
    out["total"] = sum(out.values())
    return out


class SGDState(NamedTuple):
    params: tuple
    log_decay: jax.Array  # one scalar; -inf for no decay term
    key: jax.Array
    step: jax.Array


def sgd_step(lr: float):
    """One SGD step on the inner loss at the state's fixed scalar decay (traced: a grid reuses the executable)."""
    def step(state: SGDState, inner) -> SGDState:
        _, batch = inner.draw(state.key, state.step)
        g = jax.grad(PROBLEM.inner)(state.params, state.log_decay, batch)
        params = jax.tree_util.tree_map(lambda w, d: w - lr * d, state.params, g)
        return state._replace(params=params, step=state.step + 1)
    return step


def compile_step(step, state, *data):
    """`step(state, *data) -> state`, compiled once, the state's buffers donated; and its compile time.

    One compiled step called from Python rather than K steps in one `lax.scan`: on XLA:CPU a
    convolution inside a loop body runs on a slow path (jax-ml/jax#12868; measured here 5× slower
    per SGD step, 3.5× per SOBA step); the per-call dispatch is < 1 % of a step.
    """
    began = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, *data).compile()
    return compiled, time.perf_counter() - began


def timed_run(name, compiled, state, data, params_of, args, val, test) -> tuple[dict, object]:
    """`args.chunks` chunks of `args.steps / args.chunks` compiled steps; validation and test metrics after each, untimed."""
    evaluate_jit = jax.jit(evaluate)
    curve = {"seconds": [0.0], "val_loss": [], "val_accuracy": [], "test_loss": [], "test_accuracy": []}

    def record(params):
        for split, d in (("val", val), ("test", test)):
            loss, acc = evaluate_jit(params, d)
            curve[f"{split}_loss"].append(float(loss))
            curve[f"{split}_accuracy"].append(float(acc))

    state = jax.tree_util.tree_map(jnp.copy, state)  # the steps donate it
    record(params_of(state))
    elapsed = 0.0
    for c in range(args.chunks):
        began = time.perf_counter()
        for _ in range(args.steps // args.chunks):
            state = compiled(state, *data)
        state = jax.block_until_ready(state)
        elapsed += time.perf_counter() - began
        curve["seconds"].append(elapsed)
        record(params_of(state))
        print(f"  {name}: chunk {c + 1}/{args.chunks}, {elapsed:7.1f} s, val loss {curve['val_loss'][-1]:.4f}, "
              f"test accuracy {curve['test_accuracy'][-1]:.4f}", flush=True)
    row = {"curve": curve, "seconds": elapsed, "final": {k: v[-1] for k, v in curve.items() if k != "seconds"}}
    return row, state


def decay_summary(log_decay, names) -> dict:
    """Per layer: quantiles of the learned decays e^λ."""
    out = {}
    if not isinstance(log_decay, tuple):
        names, log_decay = ("all parameters",), (log_decay,)
    for name, l in zip(names, log_decay):
        d = np.exp(np.asarray(l, np.float64)).reshape(-1)
        out[name] = {"size": int(d.size), **{f"q{q}": float(np.quantile(d, q / 100)) for q in (5, 50, 95)}}
    return out


LAYERS = ("conv1 kernel", "conv1 bias", "conv2 kernel", "conv2 bias", "dense kernel", "dense bias",
          "output kernel", "output bias")


def soba_rows(args, params0, key, inner, outer, val, test, label: str = "") -> dict:
    """SOBA with one scalar log-decay and with one per parameter: the same step sizes, Adam on λ."""
    lam0 = jnp.asarray(args.log_decay0, jnp.float32)
    rows = {}
    for name, h0 in (("scalar SOBA", lam0),
                     ("per-parameter SOBA", tuple(jnp.full(p.shape, lam0) for p in params0))):
        driver = bl.soba(PROBLEM, args.lr, optax.adam(args.outer_lr))
        state = driver.init(key, h0, params0)
        compiled, compile_seconds = compile_step(lambda s, i, o, d=driver: d.step(s, i, o)[0], state, inner, outer)
        row, state = timed_run(name + label, compiled, state, (inner, outer), lambda s: s.params, args, val, test)
        row.update(compile_seconds=compile_seconds, memory=memory(compiled), H=count(h0),
                   hparams=decay_summary(state.hparams, LAYERS))
        rows[name] = row
    return rows


def setup(args):
    (train, val, test), side = load(args)
    inner = bl.sampler(train, args.batch, drop_remainder=True)
    outer = bl.sampler(val, args.batch, drop_remainder=True)
    return (train, val, test), side, inner, outer


def seeds_run(args, out: pathlib.Path) -> dict:
    """Scalar and per-parameter SOBA again at `--soba-seeds` more seeds (new initial weights and
    minibatch order, as the no-decay spread); their test accuracies beside the main run's."""
    (_, val, test), side, inner, outer = setup(args)
    main_run = json.loads((out / "million_hparams.json").read_text())
    seeds = list(range(args.seed + 1, args.seed + 1 + args.soba_seeds))
    accuracy = {"no decay": main_run["no_decay_test_accuracy_by_seed"],
                **{name: [main_run["rows"][name]["final"]["test_accuracy"]] for name in ("scalar SOBA",
                                                                                          "per-parameter SOBA")}}
    for seed in seeds:
        params0 = init_cnn(jax.random.key(seed), side, tuple(args.widths))
        for name, row in soba_rows(args, params0, jax.random.key(seed), inner, outer, val, test,
                                   f", seed {seed}").items():
            accuracy[name].append(row["final"]["test_accuracy"])
    doc = {"seeds": [args.seed, *seeds], "test_accuracy": accuracy, "machine": machine()}
    (out / "million_hparams_seeds.json").write_text(json.dumps(doc, indent=1))
    lines = ["| method | " + " | ".join(f"seed {s}" for s in doc["seeds"]) + " | mean |",
             "|---" * (len(doc["seeds"]) + 2) + "|"]
    for name, accs in accuracy.items():
        cells = [f"{100 * accs[i]:.2f} %" if i < len(accs) else "not run" for i in range(len(doc["seeds"]))]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {100 * float(np.mean(accs)):.2f} % |")
    (out / "million_hparams_seeds.md").write_text("\n".join(["<!-- --8<-- [start:table] -->", *lines,
                                                             "<!-- --8<-- [end:table] -->", ""]))
    print("\n".join(lines))
    return doc


def run(args) -> dict:
    (train, val, test), side, inner, outer = setup(args)
    params0 = init_cnn(jax.random.key(args.seed), side, tuple(args.widths))
    P = count(params0)
    print(f"P = {P:,} parameters; training {train[0].shape[0]:,}, validation {val[0].shape[0]:,}, "
          f"test {test[0].shape[0]:,} images; {args.steps} steps of {args.batch}", flush=True)
    key = jax.random.key(args.seed)
    lam0 = jnp.asarray(args.log_decay0, jnp.float32)
    rows = {}

    # SGD at a fixed scalar decay (-inf: no decay); H counts the hyperparameters tuned
    sgd0 = SGDState(params0, lam0, jax.random.fold_in(key, 1), jnp.int32(0))
    sgd, sgd_compile = compile_step(sgd_step(args.lr), sgd0, inner)

    sgd_seconds = []

    def sgd_row(name, log_decay, H):
        row, _ = timed_run(name, sgd, sgd0._replace(log_decay=jnp.float32(log_decay)), (inner,),
                           lambda s: s.params, args, val, test)
        row.update(compile_seconds=sgd_compile, memory=memory(sgd), H=H)
        sgd_seconds.append(row["seconds"])
        return row

    rows["no decay"] = sgd_row("no decay", -jnp.inf, 0)
    spread = [rows["no decay"]["final"]["test_accuracy"]]
    for seed in range(args.seed + 1, args.seed + 1 + args.spread_seeds):
        other = SGDState(init_cnn(jax.random.key(seed), side, tuple(args.widths)), jnp.float32(-jnp.inf),
                         jax.random.fold_in(jax.random.key(seed), 1), jnp.int32(0))
        spread.append(timed_run(f"no decay, seed {seed}", sgd, other, (inner,), lambda s: s.params, args, val,
                                test)[0]["final"]["test_accuracy"])
    untuned = f"decay {math.exp(args.log_decay0):.0e} (untuned)"
    rows[untuned] = sgd_row("decay e^λ₀", args.log_decay0, 0)
    grid = {math.exp(args.log_decay0): {**rows[untuned], "H": 1}}  # e^λ₀ is a grid point too
    grid.update({d: sgd_row(f"decay {d:g}", math.log(d), 1) for d in args.grid})
    best = min(grid, key=lambda d: grid[d]["final"]["val_loss"])
    rows["scalar grid"] = {**grid[best], "best_decay": best, "seconds": sum(g["seconds"] for g in grid.values()),
                           "grid": {f"{d:g}": g["final"] for d, g in grid.items()}}

    rows.update(soba_rows(args, params0, key, inner, outer, val, test))
    for row in rows.values():
        row["p_times_h_bytes"] = P * row["H"] * 4
    return {"P": P, "sgd_seconds": min(sgd_seconds), "no_decay_test_accuracy_by_seed": spread, "sizes": {k: int(d[0].shape[0]) for k, d in (("train", train), ("val", val), ("test", test))},
            "rows": rows}


# --- output --------------------------------------------------------------------------------


def machine() -> dict:
    return {"machine": platform.machine(), "platform": platform.platform(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "python": platform.python_version()}


def _bytes(b) -> str:
    return f"{b / 2**40:,.1f} TiB" if b >= 2**40 else f"{b / 2**20:,.1f} MiB"


def table(result, settings) -> list[str]:
    rows, P = result["rows"], result["P"]
    reference = result["sgd_seconds"]  # the fastest SGD run: runs earlier in the process may share the CPU
    lines = [("| method | hyperparameters tuned | test accuracy | test loss | validation loss | time (s) | "
              "× one SGD run | XLA temp | XLA arguments + outputs | P × H × 4 bytes |"), "|---" * 10 + "|"]
    for name, r in rows.items():
        f, mem = r["final"], r["memory"]
        label = f"{name} (best {r['best_decay']:g})" if "best_decay" in r else name
        lines.append(f"| {label} | {r['H']:,} | {100 * f['test_accuracy']:.2f} % | {f['test_loss']:.4f} | "
                     f"{f['val_loss']:.4f} | {r['seconds']:.1f} | {r['seconds'] / reference:.2f} | "
                     f"{_bytes(mem['temp'])} | {_bytes(mem['argument'] + mem['output'])} | "
                     f"{_bytes(r['p_times_h_bytes'])} |")
    lines.append("")
    lines.append(f"P = {P:,} parameters; {settings['steps']} steps of {settings['batch']} images "
                 f"({result['sizes']['train']:,} training, {result['sizes']['val']:,} validation, "
                 f"{result['sizes']['test']:,} test images); the scalar grid is "
                 f"{', '.join(f'{d:g}' for d in sorted([math.exp(settings['log_decay0']), *settings['grid']]))} "
                 "and its time the sum of its runs.")
    spread = result["no_decay_test_accuracy_by_seed"]
    if len(spread) > 1:
        lines.append(f"Seed-to-seed spread (initial weights and minibatch order) of the no-decay model's test "
                     f"accuracy over {len(spread)} seeds: {100 * min(spread):.2f} % to {100 * max(spread):.2f} %.")
    learned = rows["per-parameter SOBA"]["hparams"]
    lines += ["", ("Learned per-parameter decays e^λ (start e^λ₀ = "
                   f"{math.exp(settings['log_decay0']):.1e}; scalar SOBA ends at "
                   f"{rows['scalar SOBA']['hparams']['all parameters']['q50']:.2e}), by layer:"), "",
              "| layer | parameters | 5 % | median | 95 % |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {s['size']:,} | {s['q5']:.2e} | {s['q50']:.2e} | {s['q95']:.2e} |" for n, s in learned.items()]
    return lines


def plot(result, steps: int, path) -> None:
    """Validation loss and test accuracy against SGD steps (the times are in the table)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in result["rows"].items():
        if name == "scalar grid":
            name = f"scalar grid's best ({r['best_decay']:g})"
        c = r["curve"]
        x = np.linspace(0, steps, len(c["val_loss"]))
        axes[0].plot(x, c["val_loss"], marker=".", label=name)
        axes[1].plot(x, [100 * a for a in c["test_accuracy"]], marker=".", label=name)
    axes[0].set(xlabel="steps", ylabel="validation cross-entropy", yscale="log")
    axes[1].set(xlabel="steps", ylabel="test accuracy (%)")
    finals = [100 * r["final"]["test_accuracy"] for r in result["rows"].values()]
    axes[1].set_ylim(max(0, min(finals) - 3), min(100, max(finals) + 0.5))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"One weight decay per parameter, P = H = {result['P']:,} (SOBA), against scalar decays")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", default=None, metavar="NPZ", help="MNIST .npz (default: scikit-learn's digits)")
    p.add_argument("--num-train", type=int, default=10_000)
    p.add_argument("--num-val", type=int, default=10_000)
    p.add_argument("--widths", type=int, nargs=3, default=[16, 32, 640], help="conv1, conv2 channels; dense width")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="SGD step size of w (and of SOBA's v)")
    p.add_argument("--outer-lr", type=float, default=0.001, help="Adam step size of λ")
    p.add_argument("--log-decay0", type=float, default=math.log(1e-4))
    p.add_argument("--grid", type=float, nargs="+", default=[1e-5, 1e-3, 1e-2],
                   help="scalar decays tried besides e^λ₀ (which is on the grid too)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spread-seeds", type=int, default=2, help="more seeds of the no-decay run, for its spread")
    p.add_argument("--soba-seeds", type=int, default=0,
                   help="instead of the main run: both SOBA rows at this many more seeds (reads the main run's json)")
    p.add_argument("--quick", action="store_true", help="a tiny run on digits")
    p.add_argument("--out", default="benchmarks/results/million_hparams")
    p.add_argument("--assets", default="docs/assets")
    args = p.parse_args(argv)
    if args.quick:
        args.mnist, args.widths, args.steps, args.chunks, args.batch, args.grid = None, [2, 4, 16], 20, 2, 32, [1e-3, 1e-2]
        args.spread_seeds = 0
    if args.steps % args.chunks:
        p.error(f"--steps ({args.steps}) must be a multiple of --chunks ({args.chunks})")
    if args.soba_seeds:
        return seeds_run(args, pathlib.Path(args.out))
    began = time.perf_counter()
    result = run(args)
    settings = {k: getattr(args, k) for k in ("mnist", "num_train", "num_val", "widths", "steps", "chunks", "batch",
                                              "lr", "outer_lr", "log_decay0", "grid", "seed", "spread_seeds")}
    doc = {"settings": settings, "machine": machine(), "seconds": time.perf_counter() - began, **result}
    out, assets = pathlib.Path(args.out), pathlib.Path(args.assets)
    out.mkdir(parents=True, exist_ok=True)
    assets.mkdir(parents=True, exist_ok=True)
    (out / "million_hparams.json").write_text(json.dumps(doc, indent=1))
    lines = ["# A million hyperparameters: per-parameter weight decay (SOBA)", "", "<!-- --8<-- [start:table] -->",
             *table(result, settings), "<!-- --8<-- [end:table] -->", ""]
    (out / "million_hparams.md").write_text("\n".join(lines))
    plot(result, args.steps, assets / "million_hparams.png")
    print("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()
