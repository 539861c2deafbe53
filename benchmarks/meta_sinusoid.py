"""Meta-learning benchmark: sinusoid regression with MAML, first-order MAML and iMAML.

The few-shot regression problem of Finn et al. (2017): each task is y = A sin(x − φ) with
amplitude A ~ U[0.1, 5], phase φ ~ U[0, π] and inputs x ~ U[−5, 5]; a task gives K = 10
support points (the inner data) and 10 query points (the outer data). The model is a
1 → 40 → 40 → 1 ReLU network (a dict of arrays, plain jax.numpy), float32.

Three meta-learners of its initialisation, each meta-trained with Adam (meta step size 1e-3)
on meta-batches of 25 tasks drawn from a key inside one jitted meta-step (`bl.over_tasks`
vmaps the tasks; a `lax.scan` runs a chunk of meta-steps):

- MAML: `Problem(inner=mse, outer=mse, start=lambda h: h)` with `bl.unroll(optax.sgd(0.01),
  steps)`, exact second-order meta-gradient through the inner steps;
- first-order MAML: the same with `bl.first_order(bl.unroll(...))`;
- iMAML (Rajeswaran et al. 2019): inner loss `bl.anchored(mse, mu)` (the task loss plus
  (μ/2)‖w − λ‖²), `bl.implicit(bl.unroll(optax.adam(lr), steps), bl.cg(maxiter, tol))`, no
  start: the inner run starts at the meta-parameters (passed as params0). The inner optimizer
  is Adam: the implicit meta-gradient depends only on the inner solution, and plain SGD at 0.01
  diverged on some tasks once the meta-parameters had moved to sharper regions.

Every method is evaluated at a handful of meta-iterations on the same 600 fresh test tasks
(K = 10 support points, 100 query points each): the query MSE after the method's own
adaptation (its inner loop from the meta-learned parameters) and after 10 plain SGD steps at
0.01 (Finn et al.'s test-time protocol), mean and 95% interval over tasks.

Then two measurements:

- speed: the meta-gradient of 32 tasks as one `jax.jit(bl.over_tasks(hg))` call against a
  Python loop of 32 calls of the jitted per-task `hg`; medians of interleaved repeats,
  compilation excluded;
- memory: XLA's `memory_analysis()` of the compiled meta-gradient of a meta-batch of 25 tasks
  with a wider network (1 → 256 → 256 → 1) for MAML without and with `checkpoint=`,
  first-order MAML and iMAML at 5 and 50 inner steps.

Writes sinusoid.json and sinusoid.md to --out (benchmarks/results/meta) and meta_sinusoid.png
to --assets (docs/assets).

    python benchmarks/meta_sinusoid.py            # 3.5-6 minutes on 2 CPU cores
    python benchmarks/meta_sinusoid.py --quick    # a tiny run (the tests')
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import pathlib
import platform
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel as bl

F32 = jnp.float32
METHODS = ("maml", "fomaml", "imaml")
LABELS = {"maml": "MAML", "fomaml": "first-order MAML", "imaml": "iMAML (CG)"}

# ---------------------------------------------------------------------------------------------
# Tasks and model
# ---------------------------------------------------------------------------------------------


def sample_tasks(key, num_tasks: int, support: int, query: int):
    """Stacked sinusoid tasks: ((x_s, y_s), (x_q, y_q)) with a leading task axis, shapes (n, k, 1)."""
    ka, kp, ks, kq = jax.random.split(key, 4)
    amp = jax.random.uniform(ka, (num_tasks, 1, 1), F32, 0.1, 5.0)
    phase = jax.random.uniform(kp, (num_tasks, 1, 1), F32, 0.0, math.pi)
    xs = jax.random.uniform(ks, (num_tasks, support, 1), F32, -5.0, 5.0)
    xq = jax.random.uniform(kq, (num_tasks, query, 1), F32, -5.0, 5.0)
    wave = lambda x: amp * jnp.sin(x - phase)
    return (xs, wave(xs)), (xq, wave(xq))


def init_mlp(key, sizes) -> dict:
    """A ReLU network as a dict of arrays (Glorot-uniform weights, zero biases)."""
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        bound = math.sqrt(6.0 / (a + b))
        params[f"w{i}"] = jax.random.uniform(sub, (a, b), F32, -bound, bound)
        params[f"b{i}"] = jnp.zeros((b,), F32)
    return params


def mlp(params, x):
    n = len(params) // 2
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def mse(params, hparams, batch):
    del hparams
    x, y = batch
    return jnp.mean((mlp(params, x) - y) ** 2)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


class Config(NamedTuple):
    maml_steps: int = 5        # MAML and first-order MAML inner SGD steps
    inner_lr: float = 0.01
    imaml_steps: int = 15      # iMAML inner Adam steps on the anchored loss
    imaml_lr: float = 0.01
    mu: float = 5.0            # iMAML proximal strength
    cg_iters: int = 5
    cg_tol: float = 1e-4


def imaml_optimizer(cfg: Config) -> optax.GradientTransformation:
    """iMAML's inner optimizer: Adam. The implicit meta-gradient depends on the inner solution
    only, not on the path to it; with plain SGD at 0.01 some tasks' inner runs diverged."""
    return optax.adam(cfg.imaml_lr)


def hypergradient(name: str, cfg: Config, steps: int | None = None, checkpoint: int | None = None) -> Callable:
    """The per-task meta-gradient hg(meta_params, params0, support, query) of one method."""
    if name == "imaml":
        problem = bl.Problem(inner=bl.anchored(mse, cfg.mu), outer=mse)
        inner = bl.unroll(imaml_optimizer(cfg), steps or cfg.imaml_steps, checkpoint=checkpoint)
        return bl.hypergrad(problem, bl.implicit(inner, bl.cg(maxiter=cfg.cg_iters, tol=cfg.cg_tol)))
    problem = bl.Problem(inner=mse, outer=mse, start=lambda h: h)
    method = bl.unroll(optax.sgd(cfg.inner_lr), steps or cfg.maml_steps, checkpoint=checkpoint)
    return bl.hypergrad(problem, bl.first_order(method) if name == "fomaml" else method)


@functools.cache
def batched(name: str, cfg: Config, steps: int, checkpoint: int | None = None) -> Callable:
    """The jitted meta-gradient of a meta-batch, one object per setting (so XLA compiles it once)."""
    return jax.jit(bl.over_tasks(hypergradient(name, cfg, steps=steps, checkpoint=checkpoint)))


def default_steps(name: str, cfg: Config) -> int:
    return cfg.imaml_steps if name == "imaml" else cfg.maml_steps


def params0_of(name: str, meta):
    """What the hypergradient takes as params0: None with a start (MAML), else λ (iMAML)."""
    return meta if name == "imaml" else None


def adapt(name: str, cfg: Config, meta, support):
    """The method's own test-time adaptation of one task: its inner loop from the meta-parameters."""
    if name == "imaml":
        loss = bl.anchored(mse, cfg.mu)
        opt = imaml_optimizer(cfg)
        step = lambda c, _: _opt_step(opt, lambda w: loss(w, meta, support), c)
        return jax.lax.scan(step, (meta, opt.init(meta)), None, length=cfg.imaml_steps)[0][0]
    return _sgd(lambda w: mse(w, None, support), meta, cfg.inner_lr, cfg.maml_steps)


def _opt_step(opt, loss, carry):
    w, state = carry
    updates, state = opt.update(jax.grad(loss)(w), state, w)
    return (optax.apply_updates(w, updates), state), None


def _sgd(loss, w, lr, steps):
    step = lambda w, _: (jax.tree_util.tree_map(lambda a, g: a - lr * g, w, jax.grad(loss)(w)), None)
    return jax.lax.scan(step, w, None, length=steps)[0]


# ---------------------------------------------------------------------------------------------
# Meta-training and evaluation
# ---------------------------------------------------------------------------------------------


def make_train_chunk(name: str, cfg: Config, meta_batch: int, chunk: int, meta_lr: float):
    """One jitted call = `chunk` Adam meta-steps, each on a fresh meta-batch drawn from the key."""
    meta_grad = bl.over_tasks(hypergradient(name, cfg))
    opt = optax.adam(meta_lr)

    def step(carry, key):
        meta, state = carry
        support, query = sample_tasks(key, meta_batch, 10, 10)
        out = meta_grad(meta, params0_of(name, meta), support, query)
        updates, state = opt.update(out.grad, state, meta)
        return (optax.apply_updates(meta, updates), state), out.value

    @jax.jit
    def train_chunk(meta, state, key):
        (meta, state), values = jax.lax.scan(step, (meta, state), jax.random.split(key, chunk))
        return meta, state, jnp.mean(values)

    return train_chunk, opt


def make_evaluate(name: str, cfg: Config):
    @jax.jit
    def evaluate(meta, support, query):
        def one(s, q):
            own = adapt(name, cfg, meta, s)
            sgd10 = _sgd(lambda w: mse(w, None, s), meta, cfg.inner_lr, 10)
            return jnp.stack([mse(meta, None, q), mse(own, None, q), mse(sgd10, None, q)])
        return jax.vmap(one)(support, query)
    return evaluate


DIVERGED = 1e4     # a query MSE above this (or not finite) means the adaptation blew up


def _interval(per_task: np.ndarray) -> dict:
    """Mean and 95% interval over the tasks whose adaptation did not diverge; their count; the median."""
    per_task = np.asarray(per_task, np.float64)
    ok = np.isfinite(per_task) & (per_task < DIVERGED)
    kept = per_task[ok]
    mean = float(kept.mean()) if len(kept) else float("nan")
    half = 1.96 * float(kept.std(ddof=1)) / math.sqrt(len(kept)) if len(kept) > 1 else float("nan")
    median = float(np.median(np.where(np.isnan(per_task), np.inf, per_task)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "ci95": half, "median": median,
            "diverged": int((~ok).sum())}


def train_and_evaluate(name, cfg, args, test_tasks, log_at) -> dict:
    train_chunk, opt = make_train_chunk(name, cfg, args.meta_batch, args.chunk, args.meta_lr)
    evaluate = make_evaluate(name, cfg)
    meta = init_mlp(jax.random.key(args.seed), (1, 40, 40, 1))
    state = opt.init(meta)
    key = jax.random.key(args.seed + 1)           # the same meta-batches for every method
    curve = {"iteration": [], "pre": [], "own": [], "sgd10": [], "train_loss": [], "seconds": []}
    t0 = time.perf_counter()
    train_chunk = train_chunk.lower(meta, state, key).compile()      # compiled once, ahead of time
    compile_seconds = time.perf_counter() - t0
    train_seconds, done, loss = 0.0, 0, float("nan")
    for target in log_at:
        while done < target:
            key, sub = jax.random.split(key)
            t0 = time.perf_counter()
            meta, state, value = train_chunk(meta, state, sub)
            loss = float(value)
            train_seconds += time.perf_counter() - t0
            done += args.chunk
        per_task = np.asarray(evaluate(meta, *test_tasks))
        curve["iteration"].append(done)
        curve["train_loss"].append(loss)
        curve["seconds"].append(train_seconds)
        for j, col in enumerate(("pre", "own", "sgd10")):
            curve[col].append(_interval(per_task[:, j]))
    return {"label": LABELS[name], "curve": curve, "final": {c: curve[c][-1] for c in ("pre", "own", "sgd10")},
            "train_seconds": train_seconds, "compile_seconds": compile_seconds}


# ---------------------------------------------------------------------------------------------
# Speed and memory
# ---------------------------------------------------------------------------------------------


def speed(name, cfg, tasks: int, repeats: int, seed: int) -> dict:
    """One vmapped jitted call over `tasks` tasks against a Python loop of per-task jitted calls."""
    per_task = jax.jit(hypergradient(name, cfg))
    meta_batch = batched(name, cfg, default_steps(name, cfg))
    meta = init_mlp(jax.random.key(seed), (1, 40, 40, 1))
    support, query = sample_tasks(jax.random.key(seed + 7), tasks, 10, 10)
    task = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)
    singles = [(task(support, i), task(query, i)) for i in range(tasks)]
    p0 = params0_of(name, meta)

    def loop():
        outs = [per_task(meta, p0, s, q).grad for s, q in singles]
        jax.block_until_ready(outs)

    def vmapped():
        jax.block_until_ready(meta_batch(meta, p0, support, query).grad)

    fns = {"loop": loop, "vmap": vmapped}
    if name == "maml":                     # the same meta-gradient written by hand, for scale
        hand_one, hand_batch = _hand_maml(cfg)
        fns["hand_loop"] = lambda: jax.block_until_ready([hand_one(meta, s, q) for s, q in singles])
        fns["hand_vmap"] = lambda: jax.block_until_ready(hand_batch(meta, support, query))
    for fn in fns.values():                # compile all (excluded)
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):               # interleaved
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    lo, vm = med["loop"], med["vmap"]
    hand = {}
    if name == "maml":
        diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in zip(
            jax.tree_util.tree_leaves(meta_batch(meta, p0, support, query).grad),
            jax.tree_util.tree_leaves(hand_batch(meta, support, query))))
        hand = {"hand_loop_seconds": med["hand_loop"], "hand_vmap_seconds": med["hand_vmap"],
                "hand_ratio": med["hand_loop"] / med["hand_vmap"], "hand_max_rel_diff": diff}
    # the two agree: the loop's mean gradient is the vmapped call's
    loop_mean = jax.tree_util.tree_map(lambda *g: jnp.mean(jnp.stack(g), 0),
                                       *[per_task(meta, p0, s, q).grad for s, q in singles])
    err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in zip(
        jax.tree_util.tree_leaves(meta_batch(meta, p0, support, query).grad), jax.tree_util.tree_leaves(loop_mean)))
    return {"label": LABELS[name], "tasks": tasks, "repeats": repeats, "loop_seconds": lo, "vmap_seconds": vm,
            "ratio": lo / vm, "max_rel_diff": err, **hand}


def _hand_maml(cfg: Config):
    """MAML's meta-gradient written directly in JAX (jax.grad through a lax.scan of SGD steps):
    per task, and for a meta-batch as jax.vmap with the mean."""
    def loss(meta, support, query):
        def step(w, _):
            g = jax.grad(mse)(w, None, support)
            return jax.tree_util.tree_map(lambda a, b: a - cfg.inner_lr * b, w, g), None
        return mse(jax.lax.scan(step, meta, None, length=cfg.maml_steps)[0], None, query)

    one = jax.jit(jax.grad(loss))
    batch = jax.jit(lambda meta, S, Q: jax.tree_util.tree_map(
        lambda g: jnp.mean(g, 0), jax.vmap(jax.grad(loss), (None, 0, 0))(meta, S, Q)))
    return one, batch


def memory(name, cfg, steps: int, checkpoint: int | None, width: int, meta_batch: int, seed: int) -> dict:
    """XLA's memory analysis of the compiled meta-gradient of a meta-batch (not run)."""
    fn = batched(name, cfg, steps, checkpoint)
    meta = init_mlp(jax.random.key(seed), (1, width, width, 1))
    support, query = sample_tasks(jax.random.key(seed), meta_batch, 10, 10)
    t0 = time.perf_counter()
    mem = fn.lower(meta, params0_of(name, meta), support, query).compile().memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "generated_code_size_in_bytes")
    row = {f: int(getattr(mem, f)) for f in fields} if mem is not None else {}
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(meta))
    return {"label": LABELS[name], "steps": steps, "checkpoint": checkpoint, "width": width, "meta_batch": meta_batch,
            "params": n_params, "compile_seconds": time.perf_counter() - t0, **row}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _fmt_ci(x: dict) -> str:
    if x.get("diverged"):
        return f"diverged on {x['diverged']} tasks (median {x['median']:.3g})"
    return f"{x['mean']:.3f} ± {x['ci95']:.3f}"


def markdown(doc: dict) -> str:
    s, cfg = doc["settings"], doc["settings"]["config"]
    lines = ["# Sinusoid regression: MAML, first-order MAML, iMAML", "",
             (f"{s['iterations']:,} meta-iterations per method (Finn et al. 2017 used 70,000), meta-batch "
              f"{s['meta_batch']} tasks, Adam {s['meta_lr']:g}; 1 → 40 → 40 → 1 ReLU network, float32; "
              f"MAML and first-order MAML: {cfg['maml_steps']} inner SGD steps at {cfg['inner_lr']:g}; iMAML: "
              f"{cfg['imaml_steps']} Adam steps at {cfg['imaml_lr']:g} on the task loss + (μ/2)‖w − λ‖², μ = "
              f"{cfg['mu']:g}, CG {cfg['cg_iters']} iterations (tol {cfg['cg_tol']:g}). Test: {s['test_tasks']} "
              f"fresh tasks, K = 10 support and {s['test_query']} query points each; query MSE, mean ± 95% "
              f"interval over tasks; an adaptation diverged when its query MSE is not finite or above "
              f"{DIVERGED:g}. Seed {s['seed']}."), "",
             "<!-- --8<-- [start:table] -->",
             ("| method | before adaptation | own adaptation | 10 SGD steps (0.01) | final train query loss | "
              "train time (s) | compile (s) |"),
             "|---|---|---|---|---|---|---|"]
    for res in doc["methods"].values():
        f = res["final"]
        lines.append(f"| {res['label']} | {_fmt_ci(f['pre'])} | {_fmt_ci(f['own'])} | {_fmt_ci(f['sgd10'])} | "
                     f"{res['curve']['train_loss'][-1]:.3f} | {res['train_seconds']:.1f} | "
                     f"{res['compile_seconds']:.1f} |")
    lines += ["<!-- --8<-- [end:table] -->", "", "Query MSE after the method's own adaptation, by meta-iteration:", "",
              "<!-- --8<-- [start:curve] -->"]
    its = next(iter(doc["methods"].values()))["curve"]["iteration"]
    lines += ["| method | " + " | ".join(f"{i:,}" for i in its) + " |", "|---|" + "---|" * len(its)]
    for res in doc["methods"].values():
        lines.append(f"| {res['label']} | " + " | ".join(_fmt_ci(x) for x in res["curve"]["own"]) + " |")
    lines += ["<!-- --8<-- [end:curve] -->", "", "## Speed", "", "<!-- --8<-- [start:speed] -->",
              (f"| method | Python loop of {doc['speed'][0]['tasks']} jitted calls (ms) | one vmapped jitted call "
               "(ms) | ratio | max relative difference |"), "|---|---|---|---|---|"]
    for r in doc["speed"]:
        lines.append(f"| {r['label']} | {1e3 * r['loop_seconds']:.2f} | {1e3 * r['vmap_seconds']:.2f} | "
                     f"{r['ratio']:.1f}× | {r['max_rel_diff']:.1e} |")
    hand = [r for r in doc["speed"] if "hand_ratio" in r]
    for r in hand:
        lines.append(f"| {r['label']}, written by hand in JAX (`jax.grad` through a `lax.scan`) | "
                     f"{1e3 * r['hand_loop_seconds']:.2f} | {1e3 * r['hand_vmap_seconds']:.2f} | "
                     f"{r['hand_ratio']:.1f}× | {r['hand_max_rel_diff']:.1e} |")
    lines += ["<!-- --8<-- [end:speed] -->", "", (f"Medians of {doc['speed'][0]['repeats']} interleaved repeats, "
              "compilation excluded; the last column compares the vmapped mean gradient with the loop's "
              "(for the hand-written row: with the library's vmapped meta-gradient)."), "",
              "## Memory", "", "<!-- --8<-- [start:memory] -->",
              "| method | inner steps | checkpoint | temp (MiB) | arguments (MiB) | output (MiB) |", "|---|---|---|---|---|---|"]
    for r in doc["memory"]:
        temp, arg, out = (r.get(k, float("nan")) / 2**20 for k in
                          ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"))
        lines.append(f"| {r['label']} | {r['steps']} | {r['checkpoint'] or '–'} | {temp:.2f} | {arg:.2f} | {out:.2f} |")
    m = doc["memory"][0]
    lines += ["<!-- --8<-- [end:memory] -->", "",
              (f"XLA's `memory_analysis()` of the compiled meta-gradient (not run) of a meta-batch of "
               f"{m['meta_batch']} tasks with a 1 → {m['width']} → {m['width']} → 1 network ({m['params']:,} "
               "parameters), float32."), ""]
    return "\n".join(lines)


def figure(doc: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10").colors
    for i, res in enumerate(doc["methods"].values()):
        c = res["curve"]
        x = np.asarray(c["iteration"])
        for ax, col in zip(axes, ("own", "sgd10")):
            bad = np.array([p.get("diverged", 0) > 0 for p in c[col]])   # not plotted
            mean = np.where(bad, np.nan, [p["mean"] for p in c[col]])
            half = np.where(bad, np.nan, [p["ci95"] for p in c[col]])
            ax.plot(x, mean, "o-", color=colors[i], label=res["label"], lw=1.6, ms=4)
            ax.fill_between(x, mean - half, mean + half, color=colors[i], alpha=0.2, lw=0)
    s = doc["settings"]
    titles = ("after the method's own adaptation", "after 10 SGD steps at 0.01 (points where some task diverged: omitted)")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("meta-iteration")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"query MSE on {s['test_tasks']} test tasks (mean, 95% interval)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Sinusoid regression, K = 10 (meta-batch {s['meta_batch']}, Adam {s['meta_lr']:g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor(), "platform": platform.platform(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _log_points(iterations: int, chunk: int, points: int) -> list[int]:
    """About `points` log-spaced multiples of `chunk`, ending at `iterations`."""
    n = iterations // chunk
    grid = np.unique(np.round(np.geomspace(1, n, points)).astype(int))
    return [int(g) * chunk for g in grid]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=None, help="meta-iterations per method")
    p.add_argument("--chunk", type=int, default=None, help="meta-steps per compiled call")
    p.add_argument("--points", type=int, default=7, help="evaluations along training")
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--test-tasks", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--speed-repeats", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few meta-iterations, few test tasks (the tests)")
    p.add_argument("--out", default="benchmarks/results/meta")
    p.add_argument("--assets", default="docs/assets")
    args = p.parse_args(argv)
    quick = {"iterations": 20, "chunk": 10, "test_tasks": 20, "speed_repeats": 2}
    full = {"iterations": 10000, "chunk": 250, "test_tasks": 600, "speed_repeats": 15}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.iterations % args.chunk:
        p.error(f"--iterations ({args.iterations}) must be a multiple of --chunk ({args.chunk})")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out, assets = pathlib.Path(args.out), pathlib.Path(args.assets)
    out.mkdir(parents=True, exist_ok=True)
    assets.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    test_query = 100
    test_tasks = sample_tasks(jax.random.key(10_000 + args.seed), args.test_tasks, 10, test_query)
    log_at = _log_points(args.iterations, args.chunk, args.points)
    t_start = time.perf_counter()
    methods = {}
    for name in args.methods:
        methods[name] = train_and_evaluate(name, cfg, args, test_tasks, log_at)
        print(f"{LABELS[name]}: own adaptation {_fmt_ci(methods[name]['final']['own'])}, "
              f"{methods[name]['train_seconds']:.1f} s", flush=True)
    speed_rows = [speed(name, cfg, 32, args.speed_repeats, args.seed) for name in args.methods[:1 if args.quick else None]]
    for r in speed_rows:
        print(f"speed {r['label']}: loop {1e3 * r['loop_seconds']:.2f} ms, vmap {1e3 * r['vmap_seconds']:.2f} ms, "
              f"{r['ratio']:.1f}×", flush=True)
    if args.quick:     # the speed check's program, already compiled: compiling dominates a quick run
        name = args.methods[0]
        width, mb, plan = 40, 32, [(name, default_steps(name, cfg), None)]
    else:
        width, mb, steps = 256, 25, (5, 50)
        plan = [("maml", T, None) for T in steps] + [("maml", T, max(2, round(math.sqrt(T)))) for T in steps]
        plan += [("fomaml", T, None) for T in steps] + [("imaml", T, None) for T in steps]
    memory_rows = [memory(n, cfg, T, k, width, mb, args.seed) for n, T, k in plan]
    doc = {"settings": {"iterations": args.iterations, "chunk": args.chunk, "meta_batch": args.meta_batch,
                        "meta_lr": args.meta_lr, "test_tasks": args.test_tasks, "test_query": test_query,
                        "support": 10, "query": 10, "seed": args.seed, "quick": args.quick,
                        "config": cfg._asdict(), "dtype": "float32"},
           "machine": machine(), "methods": methods, "speed": speed_rows, "memory": memory_rows,
           "total_seconds": time.perf_counter() - t_start}
    (out / "sinusoid.json").write_text(json.dumps(doc, indent=1))
    (out / "sinusoid.md").write_text(markdown(doc))
    figure(doc, assets / "meta_sinusoid.png")
    print(f"total {doc['total_seconds']:.0f} s; wrote {out / 'sinusoid.json'}, {out / 'sinusoid.md'}, "
          f"{assets / 'meta_sinusoid.png'}")
    return doc


if __name__ == "__main__":
    main()
