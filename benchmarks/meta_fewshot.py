"""Few-shot MNIST: 5-way 1-shot and 5-shot classification with MAML, first-order MAML and iMAML.

Tasks are built from MNIST digit classes, Omniglot-style:

- meta-training classes: the digits 0-4 of the file's `x_train` and their rotations by 90, 180
  and 270 degrees, each rotation a class of its own (20 classes);
- meta-test classes: the digits 5-9 of the file's `x_test`, unrotated (5 classes, so every test
  task is these 5 digits in a random label order, with fresh images).

A task: N = 5 classes drawn without replacement (in random order: the order is the labels),
K = 1 or 5 support images and 15 query images per class, all distinct. Tasks are sampled inside
the compiled programs from a key (index arithmetic on one `jax.random.uniform` draw; the
rotations are pixel permutations), a meta-batch of 16 as one `vmap` through `bilevel.over_tasks`.

Model: an MLP 784 -> 128 -> 64 -> 5 with ReLU, pixels in [0, 1], float32, softmax
cross-entropy. Methods (Finn et al. 2017; Rajeswaran et al. 2019):

- MAML: `Problem(ce, ce, start=lambda h: h)` and `bl.unroll(optax.sgd(0.4), 5)`, the
  meta-gradient through the 5 inner steps (second order);
- first-order MAML: the same with `bl.first_order(...)`;
- iMAML: `Problem(bl.anchored(ce, 1.0), ce)` with `bl.implicit(bl.unroll(optax.adam(0.01), 20),
  bl.cg(maxiter=10))`, the inner run starting at the meta-parameters (Adam: with SGD at 0.4,
  some tasks' inner runs diverged and meta-training made iMAML worse; the implicit
  meta-gradient depends only on the inner solution, so any optimizer that reaches it will do);
- no meta-learning: the MAML adaptation (5 SGD steps at 0.4) from the random initialisation
  that every method starts meta-training from.

Each method is meta-trained with Adam (1e-3) for the same number of meta-iterations, one
compiled `lax.scan` per chunk of iterations, and evaluated at the end of every chunk on the same
600 test tasks: mean query accuracy with a 95% interval 1.96 * std / sqrt(600). Test-time
adaptation is each method's own inner run (iMAML's keeps the proximal term).

Writes fewshot.json and fewshot.md to --out (benchmarks/results/meta) and meta_fewshot.png to
--assets (docs/assets).

    python benchmarks/meta_fewshot.py                  # the committed run: 9.2 min on 2 shared CPU cores (5.8 min CPU)
    python benchmarks/meta_fewshot.py --quick          # a tiny run (the tests')
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

ROOT = pathlib.Path(__file__).resolve().parent.parent
WAYS, QUERY, PIXELS = 5, 15, 784
SIZES = (PIXELS, 128, 64, WAYS)
METHODS = ("maml", "fomaml", "imaml")
NAMES = {"maml": "MAML", "fomaml": "first-order MAML", "imaml": "iMAML", "baseline": "no meta-learning"}
SHOTS = (1, 5)

# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


class Pool(NamedTuple):
    """The images of a set of classes: `images[b, i]` is image i of base digit b (uint8), and
    class c is base digit `classes[c, 0]` rotated by `classes[c, 1]` quarter turns."""

    images: jax.Array      # (bases, per_class, 784) uint8
    classes: jax.Array     # (num_classes, 2) int32


def rotations() -> np.ndarray:
    """(4, 784) pixel permutations: image[perm[k]] is the image turned k quarter turns."""
    grid = np.arange(PIXELS).reshape(28, 28)
    return np.stack([np.rot90(grid, k).reshape(-1) for k in range(4)]).astype(np.int32)


def _per_class(x, y, digits, rng) -> np.ndarray:
    """The images of each digit, shuffled, cut to the smallest class's count."""
    rows = [rng.permutation(np.flatnonzero(y == d)) for d in digits]
    m = min(len(r) for r in rows)
    return np.stack([x[r[:m]] for r in rows])


def pools(path, seed: int) -> tuple[Pool, Pool]:
    """Meta-train pool (digits 0-4 of x_train, 4 rotations each) and meta-test pool (5-9 of x_test)."""
    data = np.load(path)
    rng = np.random.default_rng(seed)
    x_train, x_test = (data[k].reshape(len(data[k]), -1) for k in ("x_train", "x_test"))
    train = _per_class(x_train, data["y_train"], range(5), rng)
    test = _per_class(x_test, data["y_test"], range(5, 10), rng)
    train_classes = np.array([(b, r) for r in range(4) for b in range(5)], np.int32)
    test_classes = np.array([(b, 0) for b in range(5)], np.int32)
    return (Pool(jnp.asarray(train), jnp.asarray(train_classes)),
            Pool(jnp.asarray(test), jnp.asarray(test_classes)))


def _draws(shots: int, num_classes: int) -> int:
    return num_classes + 2 * WAYS * (shots + QUERY)


def sample_task(u, pool: Pool, perms, shots: int):
    """One task from uniforms `u` (`_draws(shots, classes)` of them): (support, query), each
    (x (5·n, 784) float32, y (5·n,) int32) with n = shots or 15.

    The classes are the first 5 of a random order of all classes (that order is the labels);
    each class's n images are distinct: n sorted draws from [0, m − n] plus 0, 1, ..., n − 1,
    in a random order. (One `uniform` call feeds everything: each `jax.random` call site adds
    a threefry program that XLA takes about a second to compile.)"""
    c, n, m = pool.classes.shape[0], shots + QUERY, pool.images.shape[1]
    chosen = jnp.argsort(u[:c])[:WAYS]
    u_index, u_order = u[c:].reshape(2, WAYS, n)
    index = jnp.sort(jnp.floor(u_index * (m - n + 1)).astype(jnp.int32), axis=1) + jnp.arange(n)
    index = jnp.take_along_axis(index, jnp.argsort(u_order, axis=1), axis=1)
    base, turns = pool.classes[chosen, 0], pool.classes[chosen, 1]
    pixels = pool.images[base[:, None], index]                                  # (5, n, 784)
    pixels = jnp.take_along_axis(pixels, perms[turns][:, None, :], axis=2)
    x = pixels.astype(jnp.float32) / 255.0
    y = jnp.broadcast_to(jnp.arange(WAYS, dtype=jnp.int32)[:, None], (WAYS, n))
    flat = lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
    return ((flat(x[:, :shots]), flat(y[:, :shots])), (flat(x[:, shots:]), flat(y[:, shots:])))


def uniforms(key, shape: tuple, pool: Pool, shots: int):
    """The uniforms of `shape` tasks (one `jax.random` call for a whole chunk or test set)."""
    return jax.random.uniform(key, (*shape, _draws(shots, pool.classes.shape[0])), jnp.float32)


def sample_tasks(u, pool: Pool, perms, shots: int):
    """Tasks stacked along a first axis, one per row of `u`."""
    return jax.vmap(lambda row: sample_task(row, pool, perms, shots))(u)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def init_mlp(key) -> list:
    """He-normal weights, zero biases, float32."""
    keys = jax.random.split(key, len(SIZES) - 1)
    return [{"w": jax.random.normal(k, (a, b), jnp.float32) * jnp.sqrt(2.0 / a).astype(jnp.float32),
             "b": jnp.zeros(b, jnp.float32)} for k, a, b in zip(keys, SIZES[:-1], SIZES[1:])]


def logits(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params, hparams, batch):
    del hparams
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def accuracy(params, batch):
    x, y = batch
    return jnp.mean(jnp.argmax(logits(params, x), -1) == y)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


def imaml_optimizer(args) -> optax.GradientTransformation:
    """iMAML's inner optimizer: the implicit meta-gradient depends on the inner solution only,
    so any optimizer that reaches it will do (`--imaml-optimizer`)."""
    return (optax.adam if args.imaml_optimizer == "adam" else optax.sgd)(args.imaml_lr)


def meta_method(name: str, args):
    """(problem, method, uses_start) of one meta-learning method."""
    if name == "imaml":
        problem = bl.Problem(bl.anchored(cross_entropy, args.mu), cross_entropy)
        inner = bl.unroll(imaml_optimizer(args), args.imaml_steps)
        return problem, bl.implicit(inner, bl.cg(maxiter=args.cg_iters, tol=1e-8)), False
    problem = bl.Problem(cross_entropy, cross_entropy, start=lambda h: h)
    inner = bl.unroll(optax.sgd(args.inner_lr), args.inner_steps)
    return problem, (bl.first_order(inner) if name == "fomaml" else inner), True


def adaptation(name: str, args):
    """The test-time inner run: `respond(meta_params, support) -> adapted params`."""
    if name == "imaml":
        problem = bl.Problem(bl.anchored(cross_entropy, args.mu), cross_entropy)
        respond = bl.response(problem, bl.unroll(imaml_optimizer(args), args.imaml_steps))
    else:   # MAML, first-order MAML and the baseline: plain SGD steps from the meta-parameters
        problem = bl.Problem(cross_entropy, cross_entropy)
        respond = bl.response(problem, bl.unroll(optax.sgd(args.inner_lr), args.inner_steps))
    return lambda h, support: respond(h, h, support)


def make_train(name: str, args, shots: int, chunk: int):
    """A compiled chunk of `chunk` meta-iterations: (h, opt_state, key, pool, perms) -> (h, opt_state, losses)."""
    problem, method, uses_start = meta_method(name, args)
    meta = bl.over_tasks(bl.hypergrad(problem, method))
    optimizer = optax.adam(args.meta_lr)

    def step(carry, u, pool, perms):
        h, state = carry
        support, query = sample_tasks(u, pool, perms, shots)
        out = meta(h, None if uses_start else h, support, query)
        updates, state = optimizer.update(out.grad, state, h)
        return (optax.apply_updates(h, updates), state), out.value

    @jax.jit
    def train(h, state, key, pool, perms):
        u = uniforms(key, (chunk, args.meta_batch), pool, shots)
        carry, losses = jax.lax.scan(lambda c, row: step(c, row, pool, perms), (h, state), u)
        return (*carry, losses)

    return train, optimizer


def make_eval(name: str, args, shots: int):
    """Compiled: (h, key, pool, perms) -> per-task query accuracy of `args.test_tasks` tasks."""
    adapt = adaptation(name, args)

    def one(u, h, pool, perms):
        support, query = sample_task(u, pool, perms, shots)
        return accuracy(adapt(h, support), query)

    @jax.jit
    def evaluate(h, key, pool, perms):
        u = uniforms(key, (args.test_tasks,), pool, shots)
        return jax.lax.map(lambda row: one(row, h, pool, perms), u, batch_size=min(100, args.test_tasks))

    return evaluate


def summary(acc) -> dict:
    acc = np.asarray(acc, np.float64)
    return {"accuracy": float(acc.mean()), "ci95": float(1.96 * acc.std() / math.sqrt(len(acc)))}


def run_method(name, args, shots, train_pool, test_pool, perms, h0, evaluate, test_key) -> dict:
    """Meta-train one method for `args.iterations`, evaluating after every chunk."""
    train, optimizer = make_train(name, args, shots, args.chunk)
    h, state = h0, optimizer.init(h0)
    key = jax.random.fold_in(jax.random.key(args.seed), 1000 * shots + METHODS.index(name))
    began = time.perf_counter()
    compiled = train.lower(h, state, key, train_pool, perms).compile()
    compile_seconds = time.perf_counter() - began
    curve, losses, seconds = [{"iteration": 0, **summary(evaluate(h, test_key, test_pool, perms))}], [], 0.0
    for c in range(args.iterations // args.chunk):
        began = time.perf_counter()
        h, state, chunk_losses = compiled(h, state, jax.random.fold_in(key, c), train_pool, perms)
        chunk_losses = np.asarray(chunk_losses)
        seconds += time.perf_counter() - began
        losses.append(float(chunk_losses.mean()))
        curve.append({"iteration": (c + 1) * args.chunk, **summary(evaluate(h, test_key, test_pool, perms))})
        print(f"  {NAMES[name]:>16}, {shots}-shot, it {curve[-1]['iteration']:5d}: meta-loss {losses[-1]:.3f}, "
              f"test {100 * curve[-1]['accuracy']:.1f}% ({seconds:.1f} s)", flush=True)
    return {**{k: curve[-1][k] for k in ("accuracy", "ci95")}, "curve": curve, "meta_loss": losses,
            "train_seconds": seconds, "seconds_per_iteration": seconds / args.iterations,
            "compile_seconds": compile_seconds}


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor(), "platform": platform.platform(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "python": platform.python_version()}


def _cell(r) -> str:
    return f"{100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f}"


def table(results, settings: dict) -> list[str]:
    """Rows: the baseline (MAML's adaptation from the random initialisation), then each method;
    after iMAML, iMAML's own adaptation from the random initialisation (its iteration-0 point)."""
    shots, methods = settings["shots"], settings["methods"]
    lines = ["| method | " + " | ".join(f"5-way {s}-shot (%)" for s in shots) + " | meta-training time ("
             + " / ".join(f"{s}-shot" for s in shots) + ") |", "|---" * (len(shots) + 2) + "|"]
    rows = [("no meta-learning (5 SGD steps from the random init)", [results[f"{s}-shot"]["baseline"] for s in shots])]
    for name in methods:
        rows.append((NAMES[name], [results[f"{s}-shot"][name] for s in shots]))
    if "imaml" in methods:
        rows.append(("no meta-learning, iMAML's inner run (its iteration 0)",
                     [{**results[f"{s}-shot"]["imaml"]["curve"][0], "train_seconds": 0.0} for s in shots]))
    for label, cells in rows:
        seconds = " / ".join(f"{c['train_seconds']:.0f} s" for c in cells) if cells[0]["train_seconds"] else "–"
        lines.append(f"| {label} | " + " | ".join(_cell(c) for c in cells) + f" | {seconds} |")
    return lines


def markdown(doc: dict) -> str:
    """fewshot.md from fewshot.json's content; the table sits between snippet markers."""
    settings, results = doc["settings"], doc["results"]
    intro = (
        f"5-way classification, meta-trained on digits 0-4 and their rotations (20 classes), tested on digits "
        f"5-9: query accuracy on {settings['test_tasks']} test tasks (15 queries per class), mean ± 95% interval "
        f"(1.96 std / sqrt(tasks)). {settings['iterations']} meta-iterations of {settings['meta_batch']} tasks "
        f"for each method and setting; meta-training time excludes compilation and evaluation. Total run time "
        f"{doc['seconds'] / 60:.1f} min on {doc['machine']['machine']} ({doc['machine']['backend']}). "
        f"Command: `{doc['command']}`.")
    return "\n".join([
        "# Few-shot MNIST: MAML, first-order MAML, iMAML", "", intro, "",
        "<!-- --8<-- [start:table] -->", *table(results, settings), "<!-- --8<-- [end:table] -->", ""])


def figure(results, args, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.shots), figsize=(5 * len(args.shots), 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, shots in zip(axes, args.shots):
        res = results[f"{shots}-shot"]
        base = res["baseline"]
        for name in args.methods:
            color = f"C{METHODS.index(name)}"
            its = [p["iteration"] for p in res[name]["curve"]]
            acc = np.array([p["accuracy"] for p in res[name]["curve"]])
            ci = np.array([p["ci95"] for p in res[name]["curve"]])
            ax.plot(its, 100 * acc, color=color, label=NAMES[name])
            ax.fill_between(its, 100 * (acc - ci), 100 * (acc + ci), color=color, alpha=0.2)
        ax.axhline(100 * base["accuracy"], color="gray", ls="--", label=f"{NAMES['baseline']} (5 SGD steps)")
        ax.axhline(100 / WAYS, color="gray", ls=":", lw=0.8, label="chance")
        ax.set_title(f"5-way {shots}-shot, digits 5-9 ({args.test_tasks} test tasks)")
        ax.set_xlabel(f"meta-iterations ({args.meta_batch} tasks each)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test query accuracy (%), 95% interval")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results, args, argv, out, assets, seconds) -> dict:
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "assets", "mnist")}
    doc = {"split": {"meta_train": "digits 0-4 of x_train, rotated by 0/90/180/270 degrees: 20 classes",
                     "meta_test": "digits 5-9 of x_test, unrotated: 5 classes"},
           "ways": WAYS, "query_per_class": QUERY, "model": "MLP 784-128-64-5, ReLU, float32",
           "command": f"python benchmarks/meta_fewshot.py {' '.join(argv or [])}".rstrip(),
           "settings": settings, "results": results, "seconds": seconds, "machine": machine()}
    (out / "fewshot.json").write_text(json.dumps(doc, indent=1))
    (out / "fewshot.md").write_text(markdown(doc))
    figure(results, args, assets / "meta_fewshot.png")
    return doc


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist.npz"),
                   help="the MNIST .npz (x_train, y_train, x_test, y_test)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "meta"))
    p.add_argument("--assets", default=str(ROOT / "docs" / "assets"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny run: 4 meta-iterations, 20 test tasks")
    p.add_argument("--iterations", type=int, default=300, help="meta-iterations per method and setting")
    p.add_argument("--chunk", type=int, default=50, help="meta-iterations between evaluations")
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--inner-steps", type=int, default=5, help="MAML's and the baseline's SGD steps")
    p.add_argument("--imaml-steps", type=int, default=20)
    p.add_argument("--imaml-lr", type=float, default=0.01, help="iMAML's inner step size")
    p.add_argument("--imaml-optimizer", choices=("sgd", "adam"), default="adam", help="iMAML's inner optimizer")
    p.add_argument("--mu", type=float, default=1.0, help="iMAML's proximal strength")
    p.add_argument("--cg-iters", type=int, default=10)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--shots", nargs="+", type=int, choices=SHOTS, default=list(SHOTS))
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.chunk, args.test_tasks, args.meta_batch = 4, 2, 20, 4
    if args.iterations % args.chunk:
        p.error(f"--iterations ({args.iterations}) must be a multiple of --chunk ({args.chunk})")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out, assets = pathlib.Path(args.out), pathlib.Path(args.assets)
    out.mkdir(parents=True, exist_ok=True)
    assets.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    train_pool, test_pool = pools(args.mnist, args.seed)
    perms = jnp.asarray(rotations())
    h0 = init_mlp(jax.random.key(args.seed))
    results = {}
    for shots in args.shots:
        test_key = jax.random.fold_in(jax.random.key(args.seed + 1), shots)   # the same tasks for every method
        plain, anchored = make_eval("maml", args, shots), make_eval("imaml", args, shots)
        base = summary(plain(h0, test_key, test_pool, perms))
        print(f"{shots}-shot: no meta-learning {100 * base['accuracy']:.1f} ± {100 * base['ci95']:.1f}%", flush=True)
        res = {"baseline": {**base, "train_seconds": 0.0}}
        for name in args.methods:
            evaluate = anchored if name == "imaml" else plain
            res[name] = run_method(name, args, shots, train_pool, test_pool, perms, h0, evaluate, test_key)
        results[f"{shots}-shot"] = res
    seconds = time.perf_counter() - began
    doc = write(results, args, argv, out, assets, seconds)
    print("\n".join(table(results, doc["settings"])))
    print(f"done in {seconds / 60:.1f} min")
    return doc


if __name__ == "__main__":
    main()
