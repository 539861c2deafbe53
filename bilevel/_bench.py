"""The microbenchmark suite behind `bilevel bench` and `benchmarks/microbench.py`.

Every comparison is measured side by side in one process: each function is compiled
ahead of time (trace + lower and XLA compile timed separately), warmed up, then called in
interleaved rounds (one call of each per round, so drift in the machine's speed hits all of
them alike), and the median of the rounds is reported with its interquartile range.

Sections (each a function returning JSON-able rows):

- `ratios`: on ridge regression (n = 5,000, d = 1,000) and per-weight logistic regression
  on digits, in float32 and float64: the forward unroll alone, unroll, unroll(checkpoint),
  forward_mode, implicit(cg) and best_response beside hand-written JAX for the same
  mathematics (jax.grad through lax.scan; forward + k HVPs; jaxopt's custom_root).
- `memory`: XLA's planned temporary memory of unroll, unroll(checkpoint=√T) and
  forward_mode at T = 1k, 10k, 100k steps, d = 10k.
- `compile`: trace + lower and compile seconds at T = 100 and T = 100k.
- `vmap`: hypergradients at 1,024 hyperparameter values: one vmapped call vs a Python loop.
- `sharding`: a population sharded across 8 forced host devices (run in a subprocess).
- `lasso`: a Lasso hypergradient after 200 FISTA steps (n = 2,000, d = 500 in float32; n = 500,
  d = 125 in float64): implicit(proximal_gradient) with cg, gmres and normal_cg, unrolling,
  and jaxopt's custom_fixed_point beside a hand-written FISTA scan + masked CG on X_SᵀX_S/n,
  each hypergradient compared with the closed form on the support.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._best_response import best_response
from ._compile import hypergrad, response
from ._forward import forward_mode
from ._hypernets import linear_hypernet
from ._implicit import implicit
from ._linear_solvers import cg
from ._problem import Problem
from ._unroll import unroll

_tmap = jax.tree_util.tree_map


# ---------------------------------------------------------------- timing


def compile_fn(fn: Callable, *args):
    """`(compiled, trace_lower_s, compile_s)` for `jax.jit(fn)` at `args`."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def count_dots(compiled) -> int:
    """Dot (matrix-product) instructions in a compiled program's optimised HLO.

    Inside a loop body a dot counts once however many times the loop runs, so equal counts
    for two programs with the same loops mean the same matrix products per iteration.
    """
    return sum(" dot(" in line for line in compiled.as_text().splitlines())


def time_interleaved(calls: dict[str, tuple[Callable, tuple]], repeats: int) -> dict[str, dict]:
    """Median and quartiles of seconds per call, the calls interleaved round by round."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # warm-up
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": float(np.median(t)), "q25_s": float(np.percentile(t, 25)),
                   "q75_s": float(np.percentile(t, 75))} for name, t in times.items()}


# ---------------------------------------------------------------- problems


@dataclass(frozen=True)
class Case:
    """One benchmark problem: a bilevel problem, its data and its inner optimizer."""

    name: str
    problem: Problem
    hparams: Any           # the hyperparameters of the problem (many for per-weight)
    hparams_one: Any       # a single scalar hyperparameter, for forward_mode's row
    params0: Any
    inner_batch: Any
    outer_batch: Any
    lr: float
    momentum: float | None
    steps: int
    description: str

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return optax.sgd(self.lr, momentum=self.momentum)


def ridge_case(dtype, *, n: int = 5000, d: int = 1000, steps: int = 100, seed: int = 0) -> Case:
    """Ridge regression with one log-penalty, inner SGD at step 1/L."""
    from .testing import Ridge

    exact = Ridge.sample(seed, dim=d, n_train=n, max_condition=10.0, dtype=dtype)
    lr = 1.0 / float(jnp.linalg.eigvalsh(exact.hessian(exact.hparams)).max())
    return Case("ridge", exact.problem, exact.hparams, exact.hparams, exact.params0, exact.inner_batch,
                exact.outer_batch, lr, None, steps,
                f"ridge regression, n={n}, d={d}, 1 log-penalty, {steps} SGD steps (lr 1/L)")


def _cross_entropy(params, X, y):
    logits = X @ params["W"] + params["b"]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def logistic_problem() -> Problem:
    """Multinomial logistic regression with L2 penalties e^λ ⊙ W² (λ per weight or scalar)."""

    def inner(params, log_lam, batch):
        return _cross_entropy(params, *batch) + 0.5 * jnp.sum(jnp.exp(log_lam) * params["W"] ** 2)

    def outer(params, log_lam, batch):
        return _cross_entropy(params, *batch)

    return Problem(inner=inner, outer=outer)


def digits_case(dtype, *, steps: int = 100, seed: int = 0) -> Case:
    """Per-weight L2 logistic regression on scikit-learn's digits, SGD with momentum 0.9."""
    from . import datasets

    data = datasets.digits(seed=seed)
    (Xt, yt), (Xv, yv) = data.train, data.val
    features, classes = Xt.shape[1], data.num_classes
    params0 = {"W": jnp.zeros((features, classes), dtype), "b": jnp.zeros(classes, dtype)}
    batch = lambda X, y: (jnp.asarray(X, dtype), jnp.asarray(y))  # noqa: E731
    return Case("digits", logistic_problem(), jnp.full((features, classes), -4.0, dtype),
                jnp.asarray(-4.0, dtype), params0, batch(Xt, yt), batch(Xv, yv), 0.1, 0.9, steps,
                f"logistic regression on digits, {Xt.shape[0]} train rows, {features * classes} "
                f"per-weight log-penalties, {steps} SGD-momentum steps")


# ---------------------------------------------------------------- hand-written baselines


def hand_forward(case: Case, hparams, params0):
    """The inner optimizer written out by hand in a lax.scan (no optax, no bilevel)."""
    grad = jax.grad(case.problem.inner)
    mu, lr = case.momentum, case.lr

    def step(carry, _):
        w, v = carry
        g = grad(w, hparams, case.inner_batch)
        v = g if mu is None else _tmap(lambda vi, gi: mu * vi + gi, v, g)
        return (_tmap(lambda wi, vi: wi - lr * vi, w, v), v), None

    return jax.lax.scan(step, (params0, _tmap(jnp.zeros_like, params0)), None, length=case.steps)[0][0]


def hand_unroll(case: Case):
    """value_and_grad of the validation loss through the hand-written scan."""
    return jax.value_and_grad(lambda h, w0: case.problem.outer(hand_forward(case, h, w0), h, case.outer_batch))


def hand_forward_hvps(case: Case, k: int):
    """The forward scan, then k Hessian-vector products at its end point (linearised once)."""

    def run(h, w0):
        w = hand_forward(case, h, w0)
        _, hvp = jax.linearize(lambda p: jax.grad(case.problem.inner)(p, h, case.inner_batch), w)
        return jax.lax.fori_loop(0, k, lambda i, v: hvp(v), w)

    return run


def jaxopt_implicit(case: Case, k: int):
    """jaxopt's implicit_diff.custom_root on the same forward scan, CG with k iterations."""
    from jaxopt import implicit_diff, linear_solve

    grad = jax.grad(case.problem.inner)
    solve = lambda matvec, b: linear_solve.solve_cg(matvec, b, maxiter=k, tol=0.0)  # noqa: E731

    @implicit_diff.custom_root(lambda w, h: grad(w, h, case.inner_batch), solve=solve)
    def solver(w0, h):
        return hand_forward(case, h, w0)

    return jax.value_and_grad(lambda h, w0: case.problem.outer(solver(w0, h), h, case.outer_batch))


def hand_best_response(case: Case, hypernet):
    """value_and_grad of the validation loss through the hypernet, written by hand."""
    return jax.value_and_grad(lambda h, w0: case.problem.outer(hypernet(h), h, case.outer_batch))


# ---------------------------------------------------------------- ratios


def _value_grad(fn):
    """A bilevel hypergradient function reduced to (value, grad), like the hand-written ones."""
    def value_grad(*args):
        out = fn(*args)
        return out.value, out.grad

    return value_grad


def _bilevel_calls(case: Case, k: int, net) -> dict[str, tuple[Callable, Any]]:
    """name -> (function of (hparams, params0), hparams) for every bilevel row."""
    p, opt, t = case.problem, case.optimizer, case.steps
    hg = lambda m: lambda h, w0: hypergrad(p, m)(h, w0, case.inner_batch, case.outer_batch)  # noqa: E731
    return {
        "forward unroll": (lambda h, w0: response(p, unroll(opt, t))(h, w0, case.inner_batch), case.hparams),
        "forward unroll (1 hparam)": (lambda h, w0: response(p, unroll(opt, t))(h, w0, case.inner_batch),
                                      case.hparams_one),
        "unroll": (_value_grad(hg(unroll(opt, t))), case.hparams),
        "unroll, full result": (hg(unroll(opt, t)), case.hparams),
        "unroll(checkpoint=√T)": (_value_grad(hg(unroll(opt, t, checkpoint=max(1, round(t**0.5))))),
                                  case.hparams),
        "forward_mode (1 hparam)": (_value_grad(hg(forward_mode(unroll(opt, t)))), case.hparams_one),
        f"implicit(cg({k}))": (_value_grad(hg(implicit(unroll(opt, t), cg(maxiter=k, tol=0.0)))), case.hparams),
        f"implicit(cg({k})), full result": (hg(implicit(unroll(opt, t), cg(maxiter=k, tol=0.0))), case.hparams),
        "best_response(linear)": (_value_grad(hg(best_response(net))), case.hparams),
    }


def _hand_calls(case: Case, k: int, net) -> dict[str, tuple[Callable, Any]]:
    calls = {
        "hand-written unroll (jax.grad through lax.scan)": (hand_unroll(case), case.hparams),
        f"hand-written forward + {k} HVPs": (hand_forward_hvps(case, k), case.hparams),
        "hand-written best response": (hand_best_response(case, net), case.hparams),
    }
    try:
        calls[f"jaxopt custom_root (cg {k})"] = (jaxopt_implicit(case, k), case.hparams)
    except ImportError:
        pass  # reported as a missing row; `pip install jaxopt` to compare
    return calls


TARGETS = (
    # (label, numerator row, denominator row, target)
    ("unroll ÷ hand-written jax.grad through lax.scan", "unroll",
     "hand-written unroll (jax.grad through lax.scan)", 1.05),
    ("unroll ÷ forward unroll alone", "unroll", "forward unroll", 3.0),
    ("implicit(cg(k)) ÷ jaxopt custom_root, same forward and CG iterations", "implicit(cg({k}))",
     "jaxopt custom_root (cg {k})", 1.0),
    ("implicit(cg(k)) ÷ (forward + k HVPs)", "implicit(cg({k}))", "hand-written forward + {k} HVPs", 1.2),
    ("forward_mode ÷ forward unroll alone, 1 hparam", "forward_mode (1 hparam)", "forward unroll (1 hparam)", 2.5),
    ("best_response ÷ hand-written jax.grad through the hypernet", "best_response(linear)",
     "hand-written best response", 1.05),
)


def _max_rel_diff(a, b) -> float:
    a, b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)]), \
        np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(b)])
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(b.dtype).tiny))


def ratios(case: Case, *, cg_iters: int = 20, repeats: int = 21) -> dict:
    """Time every row on one case; return the rows, the target ratios and value agreement."""
    net = linear_hypernet(case.params0, case.hparams, key=jax.random.key(0))
    calls = {**_bilevel_calls(case, cg_iters, net), **_hand_calls(case, cg_iters, net)}
    compiled, rows = {}, {}
    for name, (fn, h) in calls.items():
        exe, lower_s, compile_s = compile_fn(fn, h, case.params0)
        compiled[name] = (exe, (h, case.params0))
        rows[name] = {"trace_lower_s": lower_s, "compile_s": compile_s, "dots": count_dots(exe)}
    for name, timing in time_interleaved(compiled, repeats).items():
        rows[name].update(timing)
    outputs = {name: exe(*args) for name, (exe, args) in compiled.items()}
    targets = []
    for label, num, den, target in TARGETS:
        num, den = num.format(k=cg_iters), den.format(k=cg_iters)
        if num not in rows or den not in rows:
            targets.append({"label": label, "missing": den if den not in rows else num, "target": target})
            continue
        ratio = rows[num]["median_s"] / rows[den]["median_s"]
        spread = (rows[num]["q75_s"] - rows[num]["q25_s"]) / rows[num]["median_s"] + \
            (rows[den]["q75_s"] - rows[den]["q25_s"]) / rows[den]["median_s"]
        targets.append({"label": label, "numerator": num, "denominator": den, "ratio": ratio,
                        "relative_spread": spread, "target": target, "met": ratio <= target})
    agree = {
        "unroll vs hand-written (grad)": _max_rel_diff(outputs["unroll"][1],
                                                         outputs["hand-written unroll (jax.grad through lax.scan)"][1]),
    }
    jaxopt_row = f"jaxopt custom_root (cg {cg_iters})"
    if jaxopt_row in outputs:
        agree["implicit(cg) vs jaxopt (grad)"] = _max_rel_diff(outputs[f"implicit(cg({cg_iters}))"][1],
                                                               outputs[jaxopt_row][1])
    return {"case": case.name, "description": case.description, "dtype": _dtype_name(case.params0), "steps": case.steps,
            "cg_iters": cg_iters, "repeats": repeats, "rows": rows, "targets": targets,
            "max_relative_difference": agree}


def _dtype_name(tree) -> str:
    return jnp.result_type(*jax.tree_util.tree_leaves(tree)).name


# ---------------------------------------------------------------- memory and compile time


def quadratic(d: int) -> Problem:
    """½ Σ a_i (w_i − b_i)² + ½ e^λ ‖w‖² against ½ ‖w − c‖²: cheap steps, d parameters."""
    rng = np.random.default_rng(0)
    a, b, c = (jnp.asarray(x) for x in (rng.uniform(1.0, 10.0, d), rng.normal(size=d), rng.normal(size=d)))
    return Problem(inner=lambda w, lam, _: 0.5 * jnp.sum(a * (w - b) ** 2) + 0.5 * jnp.exp(lam) * jnp.sum(w**2),
                   outer=lambda w, lam, _: 0.5 * jnp.sum((w - c) ** 2))


def _memory_methods(t: int) -> dict:
    sgd = optax.sgd(0.05)
    return {"unroll": unroll(sgd, t), "unroll(checkpoint=√T)": unroll(sgd, t, checkpoint=max(1, round(t**0.5))),
            "forward_mode": forward_mode(unroll(sgd, t))}


def memory(*, d: int = 10_000, steps=(1_000, 10_000, 100_000), dtype=jnp.float32) -> list[dict]:
    """XLA's planned temporary bytes of each compiled hypergradient (compiled, never run)."""
    problem, rows = quadratic(d), []
    args = (jnp.zeros((), dtype), jnp.zeros(d, dtype), None, None)
    for t in steps:
        row = {"steps": t}
        for name, method in _memory_methods(t).items():
            exe = jax.jit(hypergrad(problem, method)).lower(*args).compile()
            row[name] = int(exe.memory_analysis().temp_size_in_bytes)
        rows.append(row)
    return rows


def compile_times(*, d: int = 10_000, steps=(100, 100_000), dtype=jnp.float32) -> list[dict]:
    """Trace + lower and XLA compile seconds of each method's hypergradient at each T."""
    problem, rows = quadratic(d), []
    args = (jnp.zeros((), dtype), jnp.zeros(d, dtype))
    for t in steps:
        methods = {**_memory_methods(t), "implicit(cg(20))": implicit(unroll(optax.sgd(0.05), t), cg(20, 0.0))}
        for name, method in methods.items():
            fn = _value_grad(lambda h, w0, m=method: hypergrad(problem, m)(h, w0, None, None))
            _, lower_s, compile_s = compile_fn(fn, *args)
            rows.append({"steps": t, "method": name, "trace_lower_s": lower_s, "compile_s": compile_s})
    return rows


# ---------------------------------------------------------------- vmap and sharding


def _population(case: Case, size: int, seed: int = 0):
    """`size` hyperparameter values spread around the case's own (log-penalties ± 1)."""
    noise = jax.random.uniform(jax.random.key(seed), (size,) + jnp.shape(case.hparams), minval=-1.0, maxval=1.0)
    return (case.hparams + noise).astype(jnp.result_type(case.hparams))


def vmap_throughput(case: Case, *, population: int = 1024, loop_calls: int | None = None,
                    repeats: int = 3) -> dict:
    """Hypergradients per second: one vmapped call over the population vs a loop of jitted calls."""
    hs = _population(case, population)
    hg = _population_fn(case)
    fn = lambda h, w0: hg(h, w0, case.inner_batch, case.outer_batch)  # noqa: E731
    one, batched = jax.jit(fn), jax.jit(jax.vmap(fn, in_axes=(0, None)))
    loop_calls = population if loop_calls is None else min(loop_calls, population)
    vmapped = time_interleaved({"vmapped": (batched, (hs, case.params0))}, repeats)["vmapped"]["median_s"]
    jax.block_until_ready(one(hs[0], case.params0))
    loops = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready([one(hs[i], case.params0) for i in range(loop_calls)])
        loops.append(time.perf_counter() - t0)
    loop = float(np.median(loops))
    check = _max_rel_diff(one(hs[-1], case.params0)[1], batched(hs, case.params0)[1][-1])
    return {"case": case.name, "dtype": _dtype_name(case.params0), "method": "unroll", "steps": case.steps,
            "population": population, "loop_calls": loop_calls, "vmapped_s": vmapped, "loop_s": loop,
            "vmapped_per_s": population / vmapped, "loop_per_s": loop_calls / loop,
            "speedup": (population / vmapped) / (loop_calls / loop), "max_relative_difference": check}


def small_ridge_case(dtype, *, steps: int = 100) -> Case:
    """A small ridge problem (n = 100, d = 20) for the population rows."""
    return ridge_case(dtype, n=100, d=20, steps=steps)


def tiny_ridge_case(dtype, *, steps: int = 100) -> Case:
    """A tiny ridge problem (n = 20, d = 5): one call is all loop and dispatch overhead."""
    return ridge_case(dtype, n=20, d=5, steps=steps)


CASES = {"ridge": ridge_case, "digits": digits_case, "ridge-small": small_ridge_case, "ridge-tiny": tiny_ridge_case}


def _population_fn(case: Case):
    """(hparams, params0, inner_batch, outer_batch) -> (value, grad) of the unroll hypergradient."""
    return _value_grad(hypergrad(case.problem, unroll(case.optimizer, case.steps)))


def sharded_population(case: Case, *, population: int = 64, devices=(1, 2, 4, 8), repeats: int = 3) -> list[dict]:
    """Seconds per call of a vmapped population sharded over 1, 2, 4, ... devices."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    fn = jax.vmap(_population_fn(case), in_axes=(0, None, None, None))
    hs, rows, reference = _population(case, population), [], None
    for n in devices:
        mesh = Mesh(np.array(jax.devices()[:n]), ("population",))
        shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
        args = (shard(hs, PartitionSpec("population")),
                *(_tmap(lambda x: shard(x, PartitionSpec()), a)
                  for a in (case.params0, case.inner_batch, case.outer_batch)))
        exe, _, compile_s = compile_fn(fn, *args)
        seconds = time_interleaved({"sharded": (exe, args)}, repeats)["sharded"]["median_s"]
        grads = np.asarray(exe(*args)[1])
        reference = grads if reference is None else reference
        rows.append({"devices": n, "seconds": seconds, "compile_s": compile_s,
                     "per_second": population / seconds, "max_relative_difference": _max_rel_diff(grads, reference)})
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    return rows


def sharding_subprocess(case: str = "digits", *, population: int = 64, devices: int = 8, steps: int = 100,
                        repeats: int = 3) -> dict:
    """Run `sharded_population` in a fresh process with `devices` forced host (CPU) devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
    counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= devices and population % n == 0]
    spec = json.dumps({"case": case, "population": population, "devices": counts, "steps": steps,
                       "repeats": repeats})
    code = "import sys; from bilevel._bench import _sharding_child; _sharding_child(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the sharding benchmark's subprocess failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sharding_child(spec: str) -> None:
    spec = json.loads(spec)
    case = CASES[spec["case"]](jnp.float32, steps=spec["steps"])
    rows = sharded_population(case, population=spec["population"], devices=spec["devices"],
                              repeats=spec["repeats"])
    print(json.dumps({"case": case.name, "description": case.description, "population": spec["population"],
                      "host_cpus": os.cpu_count(), "rows": rows}))


# ---------------------------------------------------------------- lasso


@dataclass(frozen=True)
class LassoCase:
    """A Lasso hypergradient: ½‖Xw − y‖²/n + e^λ‖w‖₁ fitted by FISTA, validation ½ MSE."""

    name: str
    train: tuple          # (X, y)
    val: tuple            # (X_val, y_val)
    log_lam: jax.Array    # the hyperparameter λ (the penalty is e^λ)
    params0: jax.Array
    stepsize: float       # 1/L, L the largest eigenvalue of XᵀX/n
    steps: int
    description: str


def _half_mse(w, log_lam, batch):
    del log_lam
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def lasso_problem() -> Problem:
    """Training and validation ½ MSE; the ℓ1 penalty e^λ‖w‖₁ enters through the prox."""
    return Problem(inner=_half_mse, outer=_half_mse)


def lasso_case(dtype, *, n: int = 2000, d: int = 500, steps: int = 200, rho: float = 0.5,
               lam_fraction: float = 0.05, seed: int = 0) -> LassoCase:
    """A synthetic sparse regression: d/5 true nonzeros, features correlated along an AR(1)
    chain (ρ = `rho`), unit noise, n/2 validation rows, e^λ = `lam_fraction` × λ_max."""
    rng = np.random.default_rng(seed)
    w_true = np.zeros(d)
    w_true[rng.choice(d, max(1, d // 5), replace=False)] = 2.0 * rng.normal(size=max(1, d // 5))

    def design(rows):
        z = rng.normal(size=(rows, d))
        x = z.copy()
        for j in range(1, d):
            x[:, j] = rho * x[:, j - 1] + np.sqrt(1.0 - rho**2) * z[:, j]
        return x, x @ w_true + rng.normal(size=rows)

    (X, y), (Xv, yv) = design(n), design(n // 2)
    lam = lam_fraction * np.max(np.abs(X.T @ y)) / n
    stepsize = 1.0 / float(np.linalg.eigvalsh(X.T @ X / n).max())
    c = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return LassoCase("lasso", (c(X), c(y)), (c(Xv), c(yv)), c(np.log(lam)), jnp.zeros(d, dtype), stepsize,
                     steps, f"Lasso, n={n}, d={d}, AR(1) features ρ={rho}, e^λ = {lam_fraction} λ_max, "
                     f"{steps} FISTA steps (step 1/L)")


def hand_fista(case: LassoCase, log_lam, w0):
    """FISTA written out by hand in a lax.scan (no bilevel): the same iteration as
    `bilevel.proximal_gradient(prox_l1(jnp.exp), 1/L, steps)`.

    The gradient is written r @ X, as jax.grad writes it: with X a closed-over constant, XLA
    folds `X.T @ r` into a second, transposed copy of X, and on CPU the loop then streams two
    matrices instead of one (15–30% slower at n = 2,000, d = 500 in float64, measured here).
    """
    X, y = case.train
    eta, lam = case.stepsize, jnp.exp(log_lam)

    def step(carry, _):
        w, v, t = carry
        u = v - eta * ((X @ v - y) @ X) / X.shape[0]   # r @ X, not X.T @ r (see the docstring)
        w_new = jnp.sign(u) * jnp.maximum(jnp.abs(u) - eta * lam, 0.0)
        t_new = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
        return (w_new, w_new + ((t - 1.0) / t_new) * (w_new - w), t_new), None

    t0 = jnp.ones((), w0.dtype)
    return jax.lax.scan(step, (w0, w0, t0), None, length=case.steps)[0][0]


def _hand_cg(matvec, b, k: int):
    """k iterations of plain conjugate gradient from zero (guarded against an exact solve)."""

    def body(_, state):
        x, r, p, rs = state
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        alpha = rs / jnp.where(pap != 0, pap, 1.0)
        x, r = x + alpha * p, r - alpha * ap
        rs_new = jnp.vdot(r, r)
        return x, r, r + (rs_new / jnp.where(rs != 0, rs, 1.0)) * p, rs_new

    return jax.lax.fori_loop(0, k, body, (jnp.zeros_like(b), b, b, jnp.vdot(b, b)))[0]


def hand_lasso(case: LassoCase, k: int):
    """(value, hypergradient) by hand: the FISTA scan, then the closed form on the support S,
    dL_V/dλ = −e^λ sign(w_S)ᵀ (X_SᵀX_S/n)⁻¹ ∇L_V(w)_S, the inverse applied by k CG
    iterations on the masked operator u ↦ m ⊙ Xᵀ(X(m ⊙ u))/n (written (X(m ⊙ u))ᵀX)."""
    X = case.train[0]

    def run(log_lam, w0):
        w = hand_fista(case, log_lam, w0)
        value, g = jax.value_and_grad(_half_mse)(w, log_lam, case.val)
        m = (w != 0).astype(w.dtype)
        u = _hand_cg(lambda v: m * ((X @ (m * v)) @ X) / X.shape[0], m * g, k)
        return value, -jnp.exp(log_lam) * jnp.vdot(jnp.sign(w), u)

    return run


def jaxopt_lasso(case: LassoCase, solve=None):
    """jaxopt's implicit_diff.custom_fixed_point on the same FISTA scan, the fixed point
    w = prox_lasso(w − η∇f(w), e^λ, η) (not restricted to a support); `solve=None` is
    jaxopt's default (solve_normal_cg with jax.scipy's default tol 1e-5 and maxiter)."""
    from jaxopt import implicit_diff, prox

    def fixed_point(w, log_lam):
        g = jax.grad(_half_mse)(w, log_lam, case.train)
        return prox.prox_lasso(w - case.stepsize * g, jnp.exp(log_lam), case.stepsize)

    deco = implicit_diff.custom_fixed_point(fixed_point) if solve is None else \
        implicit_diff.custom_fixed_point(fixed_point, solve=solve)
    solver = deco(lambda w0, log_lam: hand_fista(case, log_lam, w0))
    return jax.value_and_grad(lambda h, w0: _half_mse(solver(w0, h), h, case.val))


def lasso_closed_form(case: LassoCase, w) -> tuple[float, int]:
    """(hypergradient, support size) in float64 NumPy with a dense solve on the support of w."""
    X = np.asarray(case.train[0], np.float64)
    Xv, yv = (np.asarray(a, np.float64) for a in case.val)
    w = np.asarray(w, np.float64)
    s = w != 0
    g = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    u = np.linalg.solve(X[:, s].T @ X[:, s] / X.shape[0], g[s])
    return float(-np.exp(float(case.log_lam)) * np.sign(w[s]) @ u), int(s.sum())


LASSO_BASELINE = "hand-written: FISTA scan + masked CG({k}) on X_SᵀX_S/n"


def _lasso_calls(case: LassoCase, k: int) -> dict[str, Callable]:
    """name -> function of (log_lam, params0) returning (value, hypergradient)."""
    from ._linear_solvers import gmres, normal_cg
    from ._optimality import prox_l1
    from ._proximal import proximal_gradient

    fista = proximal_gradient(prox_l1(jnp.exp), case.stepsize, case.steps)
    hg = lambda m: _value_grad(lambda h, w0: hypergrad(lasso_problem(), m)(h, w0, case.train, case.val))  # noqa: E731
    calls = {
        LASSO_BASELINE.format(k=k): hand_lasso(case, k),
        f"implicit(proximal_gradient, cg({k}))": hg(implicit(fista, cg(maxiter=k, tol=0.0))),
        f"implicit(proximal_gradient, gmres(restart={k}, maxiter=1))":
            hg(implicit(fista, gmres(maxiter=1, tol=0.0, restart=k))),
        f"implicit(proximal_gradient, normal_cg({k}))": hg(implicit(fista, normal_cg(maxiter=k, tol=0.0))),
        "unroll: grad through the FISTA steps": hg(fista),
    }
    try:
        from jaxopt import linear_solve
    except ImportError:
        return calls  # without jaxopt its two rows are left out; `pip install jaxopt` to compare
    ncg = lambda matvec, b: linear_solve.solve_normal_cg(matvec, b, maxiter=k, tol=0.0)  # noqa: E731
    calls["jaxopt custom_fixed_point, default solve (normal CG, tol 1e-5)"] = jaxopt_lasso(case)
    calls[f"jaxopt custom_fixed_point, solve_normal_cg({k})"] = jaxopt_lasso(case, ncg)
    return calls


def lasso(case: LassoCase, *, cg_iters: int = 20, repeats: int = 11) -> dict:
    """Time every Lasso hypergradient beside the hand-written one; compare each with the closed form."""
    start = time.perf_counter()
    calls = _lasso_calls(case, cg_iters)
    args = (case.log_lam, case.params0)
    compiled, rows = {}, {}
    for name, fn in calls.items():
        exe, lower_s, compile_s = compile_fn(fn, *args)
        compiled[name] = (exe, args)
        rows[name] = {"trace_lower_s": lower_s, "compile_s": compile_s, "dots": count_dots(exe)}
    for name, timing in time_interleaved(compiled, repeats).items():
        rows[name].update(timing)
    exact, support = lasso_closed_form(case, jax.jit(lambda h, w0: hand_fista(case, h, w0))(*args))
    base = rows[LASSO_BASELINE.format(k=cg_iters)]["median_s"]
    for name, (exe, _) in compiled.items():
        value, grad = exe(*args)
        rows[name].update(value=float(value), grad=float(grad), ratio=rows[name]["median_s"] / base,
                          closed_form_rel_diff=abs(float(grad) - exact) / abs(exact))
    d = case.params0.shape[0]
    return {"case": case.name, "description": case.description, "dtype": _dtype_name(case.params0),
            "n": case.train[0].shape[0], "d": d, "steps": case.steps, "cg_iters": cg_iters, "repeats": repeats,
            "support_size": support, "closed_form_grad": exact, "baseline": LASSO_BASELINE.format(k=cg_iters),
            "rows": rows, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- the suite

SECTIONS = ("ratios", "memory", "compile", "vmap", "sharding", "lasso")
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}
FULL = {"steps": 100, "ridge": {}, "memory_d": 10_000, "memory_steps": (1_000, 10_000, 100_000),
        "compile_steps": (100, 100_000), "population": 1024, "ridge_population": 64, "shard_population": 64,
        "lasso": {"float32": {"n": 2000, "d": 500}, "float64": {"n": 500, "d": 125}}, "lasso_steps": 200,
        "lasso_repeats": 11}
QUICK = {"steps": 10, "ridge": {"n": 200, "d": 50}, "memory_d": 1_000, "memory_steps": (100, 1_000),
         "compile_steps": (10, 1_000), "population": 8, "ridge_population": 4, "shard_population": 8,
         "lasso": {"float32": {"n": 100, "d": 20}, "float64": {"n": 100, "d": 20}}, "lasso_steps": 50,
         "lasso_repeats": 3}


def _case(name: str, dtype, sizes: dict) -> Case:
    extra = sizes["ridge"] if name == "ridge" else {}
    return CASES[name](DTYPES[dtype], steps=sizes["steps"], **extra)


def run_suite(*, sections=SECTIONS, problems=("ridge", "digits"), dtypes=("float32", "float64"),
              repeats: int = 21, cg_iters: int = 20, quick: bool = False, devices: int = 8,
              progress: Callable[[str], None] = lambda message: None) -> dict:
    """Run the chosen sections; return everything measured as one JSON-able dict.

    float64 cases need `jax_enable_x64`; the suite turns it on (float32 cases stay float32).
    """
    jax.config.update("jax_enable_x64", True)
    sizes = QUICK if quick else FULL
    result = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "jax": jax.__version__,
              "host_cpus": os.cpu_count(), "quick": quick, "repeats": repeats}
    if "ratios" in sections:
        result["ratios"] = []
        for name in problems:
            for dtype in dtypes:
                progress(f"ratios: {name} {dtype}")
                result["ratios"].append(ratios(_case(name, dtype, sizes), cg_iters=cg_iters, repeats=repeats))
    if "memory" in sections:
        progress("memory")
        result["memory"] = {"d": sizes["memory_d"], "rows": memory(d=sizes["memory_d"], steps=sizes["memory_steps"])}
    if "compile" in sections:
        progress("compile")
        result["compile"] = {"d": sizes["memory_d"], "rows": compile_times(d=sizes["memory_d"],
                                                                            steps=sizes["compile_steps"])}
    if "vmap" in sections:
        result["vmap"] = []
        for name, population in (("ridge-tiny", sizes["population"]), ("ridge-small", sizes["population"]),
                                 ("digits", sizes["population"]),
                                 ("ridge", sizes["ridge_population"])):
            progress(f"vmap: {name}")
            case = _case(name, "float32", sizes)
            result["vmap"].append({**vmap_throughput(case, population=population), "description": case.description})
    if "sharding" in sections:
        progress("sharding")
        result["sharding"] = sharding_subprocess("digits", population=sizes["shard_population"], devices=devices,
                                                 steps=sizes["steps"])
    if "lasso" in sections:
        result["lasso"] = []
        for dtype in dtypes:
            progress(f"lasso: {dtype}")
            case = lasso_case(DTYPES[dtype], steps=sizes["lasso_steps"], **sizes["lasso"][dtype])
            result["lasso"].append(lasso(case, cg_iters=cg_iters, repeats=min(repeats, sizes["lasso_repeats"])))
    return result


# ---------------------------------------------------------------- markdown


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _verdict(t: dict) -> str:
    if "missing" in t:
        return f"not run ({t['missing']} unavailable)"
    if t["met"]:
        return "met"
    within = t["ratio"] <= t["target"] * (1 + t["relative_spread"] / 2)
    return "parity within noise" if within else "**missed**"


def _ratio_tables(runs: list[dict]) -> list[str]:
    heads = [f"{r['case']} {r['dtype']}" for r in runs]
    lines = ["## Target ratios", "",
             "Median time ÷ median time, measured side by side (interleaved rounds) in one process; "
             "± is the sum of the two rows' relative interquartile ranges.", "",
             "| measurement | target | " + " | ".join(heads) + " |",
             "|---|---|" + "---|" * len(heads)]
    for i, (label, *_rest, target) in enumerate(TARGETS):
        cells = []
        for r in runs:
            t = r["targets"][i]
            cells.append(_verdict(t) if "missing" in t else
                         f"{t['ratio']:.2f}× ± {t['relative_spread']:.2f} ({_verdict(t)})")
        lines.append(f"| {label} | ≤ {target}× | " + " | ".join(cells) + " |")
    lines += ["", "Largest relative difference between the hypergradients of each pair:", "",
              "| pair | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for pair in runs[0]["max_relative_difference"]:
        cells = [f"{r['max_relative_difference'].get(pair, float('nan')):.1e}" for r in runs]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return lines


def _timing_table(r: dict) -> list[str]:
    base = r["rows"]["forward unroll"]["median_s"]
    lines = ["", f"### {r['case']}, {r['dtype']}: {r['description']}; CG {r['cg_iters']} iterations, "
             f"{r['repeats']} rounds", "",
             "| row | median | IQR | ÷ forward unroll | dot ops in the HLO | trace + lower | compile |",
             "|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {_ms(row['median_s'])} | {_ms(row['q25_s'])} – {_ms(row['q75_s'])} | "
                     f"{row['median_s'] / base:.2f}× | {row['dots']} | {row['trace_lower_s']:.2f} s | "
                     f"{row['compile_s']:.2f} s |")
    return lines


def _memory_table(m: dict) -> list[str]:
    names = [k for k in m["rows"][0] if k != "steps"]
    lines = ["", "## Peak temporary memory", "",
             f"XLA's planned temporary memory of the compiled hypergradient (`memory_analysis().temp_size_in_bytes`), "
             f"d = {m['d']:,}, float32; compiled, not run.", "",
             "| steps T | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in m["rows"]:
        lines.append(f"| {row['steps']:,} | " + " | ".join(_mib(row[k]) for k in names) + " |")
    first, last = m["rows"][0], m["rows"][-1]
    growth = last["steps"] / first["steps"]
    lines += ["", f"Growth from T = {first['steps']:,} to {last['steps']:,} ({growth:,.0f}× the steps; "
              f"√ of that is {growth ** 0.5:,.1f}×): " + ", ".join(
                  f"{k} {last[k] / first[k]:,.1f}×" for k in names) + "."]
    return lines


def _compile_table(c: dict) -> list[str]:
    steps = sorted({row["steps"] for row in c["rows"]})
    total = {(row["method"], row["steps"]): row["trace_lower_s"] + row["compile_s"] for row in c["rows"]}
    methods = list(dict.fromkeys(row["method"] for row in c["rows"]))
    lines = ["", "## Compile time", "",
             f"Trace + lower + XLA compile seconds of the hypergradient, d = {c['d']:,} (target: T = "
             f"{steps[-1]:,} within 1.5× of T = {steps[0]:,}).", "",
             "| method | " + " | ".join(f"T = {t:,}" for t in steps) + " | ratio |", "|---|" + "---|" * (len(steps) + 1)]
    for m in methods:
        ratio = total[(m, steps[-1])] / total[(m, steps[0])]
        lines.append(f"| {m} | " + " | ".join(f"{total[(m, t)]:.2f} s" for t in steps) + f" | {ratio:.2f}× |")
    return lines


def _vmap_table(rows: list[dict]) -> list[str]:
    lines = ["", "## Populations: one vmapped call vs a Python loop of jitted calls", "",
             "Unroll hypergradients (value and grad) at hyperparameter values spread around the default; "
             "the loop dispatches every call before waiting (jax's asynchronous dispatch), float32.", "",
             "| problem | population | vmapped | loop | vmapped / s | loop / s | throughput gain |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['description']} | {r['population']:,} | {_ms(r['vmapped_s'])} | "
                     f"{_ms(r['loop_s'])} ({r['loop_calls']:,} calls) | {r['vmapped_per_s']:,.1f} | "
                     f"{r['loop_per_s']:,.1f} | {r['speedup']:.1f}× |")
    return lines


def _sharding_table(s: dict) -> list[str]:
    lines = ["", "## A population sharded across forced host devices", "",
             f"{s['description']}; population {s['population']} sharded along its axis "
             f"(`NamedSharding`), {s['host_cpus']} host CPUs.", "",
             "| devices | seconds per call | hypergradients / s | speedup | max rel. difference to 1 device |",
             "|---|---|---|---|---|"]
    for row in s["rows"]:
        lines.append(f"| {row['devices']} | {row['seconds']:.3f} | {row['per_second']:,.1f} | "
                     f"{row['speedup']:.2f}× | {row['max_relative_difference']:.1e} |")
    return lines


def _lasso_table(r: dict) -> list[str]:
    lines = ["", f"### Lasso, {r['dtype']}: {r['description']}", "",
             f"Support: {r['support_size']} of {r['d']} coordinates. Closed form (dense solve on the support, "
             f"float64 NumPy, at the hand-written forward's end point): {r['closed_form_grad']:.10g}. Linear solves: "
             f"{r['cg_iters']} iterations (tol 0) unless said; {r['repeats']} rounds; the case took "
             f"{r['seconds']:.1f} s (compiles included).", "",
             "| row | median | IQR | ÷ hand-written | rel. diff. to closed form | dot ops in the HLO | trace + lower "
             "| compile |", "|---|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {_ms(row['median_s'])} | {_ms(row['q25_s'])} – {_ms(row['q75_s'])} | "
                     f"{row['ratio']:.2f}× | {row['closed_form_rel_diff']:.1e} | {row['dots']} | "
                     f"{row['trace_lower_s']:.2f} s | {row['compile_s']:.2f} s |")
    return lines


def _lasso_tables(runs: list[dict]) -> list[str]:
    lines = ["", "## Lasso hypergradients: support-restricted implicit differentiation", "",
             "dL_V/dλ for ½‖Xw − y‖²/n + e^λ‖w‖₁ after a fixed number of FISTA steps, every row the same "
             "forward pass; time ÷ the hand-written FISTA scan + masked CG on X_SᵀX_S/n, measured side by "
             "side (interleaved rounds)."]
    for r in runs:
        lines += _lasso_table(r)
    return lines


def markdown(result: dict) -> str:
    """The suite's results as markdown tables."""
    lines = [f"Device: {result['device']} ({result['backend']}, {result['host_cpus']} host CPUs), jax "
             f"{result['jax']}{', quick sizes' if result['quick'] else ''}.", ""]
    if result["quick"]:
        lines += ["Quick sizes are a smoke test: calls take microseconds, so the ratios below are mostly "
                  "call overhead and noise. Judge the targets on a full run.", ""]
    if result.get("ratios"):
        lines += _ratio_tables(result["ratios"])
        lines += ["", "## Timings"]
        for r in result["ratios"]:
            lines += _timing_table(r)
    if "memory" in result:
        lines += _memory_table(result["memory"])
    if "compile" in result:
        lines += _compile_table(result["compile"])
    if "vmap" in result:
        lines += _vmap_table(result["vmap"])
    if "sharding" in result:
        lines += _sharding_table(result["sharding"])
    if result.get("lasso"):
        lines += _lasso_tables(result["lasso"])
    return "\n".join(lines) + "\n"
