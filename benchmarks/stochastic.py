"""Stochastic bilevel benchmark: single-loop drivers against full-batch implicit, Neumann, Clip-r, search.

Every method runs on three problems, 10 seeds each, the seeds of one method and step size
vmapped into one compiled call:

- `quadratic`: `bilevel.testing.BilevelQuadratic` (benchopt benchmark_bilevel's quadratic as
  per-sample quadratics; p = q = 10 here, the benchmark's 100 would not fit the time budget),
  metric ‖∇h(λ)‖², exact (h is quadratic: ∇h(λ) = ∇h(0) + ∇²h λ);
- `data_cleaning`: `bilevel.datasets.data_cleaning` (one weight σ(λᵢ) per training row, a share
  p of the labels redrawn; digits by default, MNIST with --mnist), metric test error;
- `logreg`: `bilevel.datasets.logreg_per_feature` (one ridge penalty e^{λⱼ} per feature), test error.

The test error is that of λ: the model retrained from scratch on the training rows at the
method's current λ (full-batch gradient descent to convergence), so that it depends on λ alone,
like ‖∇h(λ)‖². The test error of each method's own inner iterate (benchmark_bilevel's
convention) is reported beside it: BOME's w and F2SA's y are pulled toward the validation loss
and SGD iterates sit in a noise ball, so it mixes the quality of λ with that of the iterate.

Methods: the six stochastic drivers `bl.soba`, `bl.saba`, `bl.stocbio`, `bl.amigo`, `bl.f2sa`,
`bl.bome` on minibatches from `bl.sampler`; full-batch implicit differentiation
(`bl.hyperopt` with `bl.implicit(bl.unroll(sgd, T), bl.cg(...))`, warm-started inner
parameters and warm-started CG, `warm_start_solve=True`; no randomness, so it runs once); the
stochastic Neumann estimate of Lorraine et al. (2020) (`bl.implicit(..., bl.neumann(...),
curvature="per_term")` on `bl.per_step` minibatches, through `bl.hyperopt`); Clip-r online
optimisation (`bl.online(..., clip=r)`); and random search (train from scratch at random λ, keep
the best validation loss: `bl.random_search`'s computation, written with `bl.response` so that
the seeds vmap; the script checks it against `bl.random_search` on seed 0).

How it is measured. Each run advances in chunks of K steps, each chunk one compiled `lax.scan`
(compiled ahead of time, once per method; the step size is a traced argument, so a method's
step-size grid reuses the executable). At log-spaced chunk counts, outside the timed region, the
metric is evaluated for every seed. Wall time is the time of the chunk calls (10 seeds batched)
divided by the number of seeds, so "seconds" are per run; compilation is reported apart.
Oracle calls are counted in minibatch equivalents: a gradient, Hessian-vector product or
cross-derivative product on one minibatch counts 1 (the drivers' own `oracle_calls`), one on the
full training set counts n_train / batch_size. Every method gets the same oracle budget per
problem (a per-run time cap would stop a method earlier; the tables say when). Each method has a
grid of 3-4 step sizes (the outer step size; ξ for BOME); the best is the lowest final median
metric, and the tables report the whole grid. Curves are the median and the 20-80% band over seeds.

The goal: on data cleaning with p = 0.5, does the best stochastic method reach the full-batch
implicit method's final test error within one fifth of its wall time? Answered two ways (the
first time a median curve reaches the target; the time from which it stays there to the end of
the run), from the batched curves and again from unbatched single-seed runs.

`--scale PATH` (item 6, not run by CI) runs instead the large problems on MNIST in float32:
per-weight L2 (7,850 penalties on a linear softmax classifier, pixels in [0, 1]) and data
cleaning (20,000 row weights), end to end with SOBA, SABA, StocBiO and AmIGO, and reports each
compiled run's XLA memory (temp + argument + output bytes from `memory_analysis()`) against
P×H×4 bytes, the size of the Jacobian dw/dλ that these methods never form.

Writes <problem>.json and <problem>.md per problem and summary.json / summary.md (or scale.json /
scale.md) to --out (benchmarks/results/stochastic), and stochastic_<problem>.png to --assets
(docs/assets).

    python benchmarks/stochastic.py                          # about 15 minutes on 2 CPU cores
    python benchmarks/stochastic.py --mnist ../shared/data/mnist.npz --corruption 0.5 0.7 0.9
    python benchmarks/stochastic.py --scale ../shared/data/mnist.npz      # item 6, about 2 minutes
    python benchmarks/stochastic.py --quick --problems data_cleaning      # a tiny run (the tests')
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import platform
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel as bl
import bilevel.testing as blt

# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


class Spec(NamedTuple):
    """One benchmark problem with the settings every method uses on it."""

    name: str               # file stem, e.g. "data_cleaning"
    title: str
    problem: bl.Problem
    inner_data: Any
    outer_data: Any
    hparams0: Any
    params0: Any
    value: Callable         # value(hparams, metric_args, inner_full) -> the metric of λ
    iterate: Callable | None  # iterate(params, metric_args) -> the metric of the method's own w
    metric_args: Any
    metric_name: str
    log_metric: bool
    inner_batch: int
    outer_batch: int
    rho: float              # inner step size on minibatches (w, v, Neumann α)
    full_lr: Callable       # hparams -> step size of full-batch gradient descent (1/L there)
    retrain_curve: bool     # evaluate `value` at every point (else at the last one only)
    grids: dict             # method -> outer step sizes tried
    budget: int             # oracle calls per run (minibatch equivalents)
    search_box: tuple       # random search: λ ~ U[lo, hi] per hyperparameter
    penalty_final: float    # F2SA: μ reaches this at the end of the budget
    goal: bool = False      # the problem the goal is measured on


class Data(NamedTuple):
    """What the compiled chunks take as arguments (never closed over: no large constants)."""

    inner: bl.Sampler
    outer: bl.Sampler
    inner_full: Any
    outer_full: Any


def _rows(tree) -> int:
    return int(jax.tree_util.tree_leaves(tree)[0].shape[0])


def _num_hparams_of(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree))


def _num_hparams(spec: Spec) -> int:
    return _num_hparams_of(spec.hparams0)


def _num_params(spec: Spec) -> int:
    return _num_hparams_of(spec.params0)


def _gradient_norm_sq(hparams, args, inner_full):
    """‖∇h(λ)‖² for the quadratic: ∇h is affine in λ, ∇h(λ) = ∇h(0) + ∇²h λ exactly."""
    del inner_full
    g0, hess = args
    g = g0 + hess @ hparams
    return jnp.sum(g * g)


def _retrained_error(problem, params0, full_lr, steps):
    """The test error of λ: the model trained from scratch on all training rows at λ (`steps` of
    gradient descent at 1/L), so that it depends on λ alone, whatever inner iterate a method keeps."""
    def value(hparams, metric, inner_full):
        forward = bl.unroll(lambda h: optax.sgd(full_lr(h)), steps=steps)
        return metric(bl.response(problem, forward)(hparams, params0, inner_full))

    return value


def _iterate_error(params, metric):
    return metric(params)


def _constant(x):
    return lambda h: x


# Outer step-size grids. The data-cleaning hypergradient of λᵢ carries the 1/n of a mean over
# rows, hence outer step sizes of order n there.
GRIDS = {
    "quadratic": {"soba": (0.001, 0.003, 0.01, 0.03), "saba": (0.01, 0.03, 0.1, 0.3), "stocbio": (0.01, 0.03, 0.1),
                  "amigo": (0.01, 0.03, 0.1), "f2sa": (0.003, 0.01, 0.03), "bome": (0.03, 0.1, 0.3),
                  "implicit_cg": (0.3, 1.0, 2.0), "neumann": (0.01, 0.03, 0.1), "clip": (0.003, 0.01, 0.03),
                  "random_search": (1.0,)},
    "data_cleaning": {"soba": (100.0, 300.0, 1000.0, 3000.0), "saba": (10.0, 30.0, 100.0),
                      "stocbio": (100.0, 300.0, 1000.0, 3000.0), "amigo": (100.0, 300.0, 1000.0, 3000.0),
                      "f2sa": (300.0, 1000.0, 3000.0, 10000.0), "bome": (0.1, 0.3, 1.0, 3.0),
                      "implicit_cg": (30.0, 100.0, 300.0), "neumann": (100.0, 300.0, 1000.0, 3000.0),
                      "clip": (30.0, 100.0, 300.0, 1000.0), "random_search": (1.0,)},
    "logreg": {"soba": (0.3, 1.0, 3.0, 10.0), "saba": (1.0, 3.0, 10.0, 30.0), "stocbio": (0.3, 1.0, 3.0, 10.0),
               "amigo": (0.3, 1.0, 3.0), "f2sa": (0.03, 0.1, 0.3), "bome": (0.1, 0.3, 1.0, 3.0),
               "implicit_cg": (0.3, 1.0, 3.0), "neumann": (1.0, 3.0, 10.0, 30.0), "clip": (1.0, 3.0, 10.0),
               "random_search": (1.0,)},
}
# (Grids were widened or shifted where an earlier full run's best sat at an end; the quadratic's
# implicit CG stops at 2, below 2/λ_max(∇²h) = 2.6, where full-batch outer SGD diverges.)


def quadratic_spec(args) -> Spec:
    p, n = (3, 64) if args.quick else (10, 1024)
    exact = blt.BilevelQuadratic.sample(0, dim_inner=p, dim_outer=p, n_samples=n, max_condition=10.0,
                                        dtype=jnp.float32)
    zero = jnp.zeros(p, jnp.float32)
    g0, hess = exact.hypergrad(zero), exact.value_hessian()
    probe = jnp.linspace(-1.0, 1.0, p, dtype=jnp.float32)
    assert np.allclose(g0 + hess @ probe, exact.hypergrad(probe), rtol=1e-3, atol=1e-3)
    batch = 16 if args.quick else 32
    return Spec("quadratic", f"Quadratic (benchmark_bilevel's, p = q = {p}, {n} samples per level, κ = 10)",
                exact.problem, exact.inner_batch, exact.outer_batch, zero, exact.params0,
                _gradient_norm_sq, None, (g0, hess), "‖∇h(λ)‖²", True, batch, batch,
                rho=0.25, full_lr=_constant(1.0), retrain_curve=True, grids=GRIDS["quadratic"], budget=20_000,
                search_box=(-10.0, 10.0), penalty_final=10.0)


def _source(args):
    return ("mnist", {"path": args.mnist}) if args.mnist else ("digits", {})


def data_cleaning_spec(args, corruption: float) -> Spec:
    source, kw = _source(args)
    if args.quick:
        sizes, batch = {"n_train": 128, "n_val": 64}, 16
    elif source == "digits":
        sizes, batch = {"n_train": 896, "n_val": 448}, 32      # the digits' 899 / 449 rows, trimmed
    else:
        sizes, batch = {}, 50                                  # 20,000 / 5,000 rows
    bench = bl.datasets.data_cleaning(source, corruption=corruption, **sizes, **kw)
    # measured curvature (power iteration at λ = 0, all weights ½): digits 0.77 full batch, up to
    # 3.1 on a minibatch; MNIST 2.4 and 4.9. Weights near 1 double the data part.
    # On MNIST, standardising pixels that are almost constant on the training rows gives 733 rows
    # with ‖x‖² > 2,000 (up to 65,000; the median is 406): a minibatch holding one has a far larger
    # curvature than the full batch, hence the small minibatch step there.
    rho, full = (0.2, 1.0) if source == "digits" else (0.02, 0.2)
    suffix = ("" if source == "digits" else f"_{source}") + ("" if corruption == 0.5 else f"_p{corruption:g}")
    n = _rows(bench.inner_data)
    return Spec(f"data_cleaning{suffix}",
                f"Data cleaning ({source}, p = {corruption:g}: {n} row weights, linear softmax classifier)",
                bench.problem, bench.inner_data, bench.outer_data, bench.hparams0, bench.params0,
                _retrained_error(bench.problem, bench.params0, _constant(full), 100), _iterate_error,
                bench.metric, "test error", False, batch, batch, rho=rho, full_lr=_constant(full),
                retrain_curve=source == "digits", grids=_scaled(GRIDS["data_cleaning"], n / 896),
                budget=60_000 if source == "digits" else 200_000, search_box=(-3.0, 3.0),
                penalty_final=100.0, goal=corruption == 0.5)


def _scaled(grids: dict, factor: float) -> dict:
    """Data cleaning's outer step sizes scale with the number of rows (λᵢ's gradient is O(1/n))."""
    keep = ("bome", "random_search")
    return {m: v if m in keep else tuple(float(f"{x * factor:.3g}") for x in v) for m, v in grids.items()}


def logreg_spec(args) -> Spec:
    source, kw = _source(args)
    if args.quick:
        sizes, batch = {"n_train": 128, "n_val": 64}, 16
    elif source == "digits":
        sizes, batch = {"n_train": 896, "n_val": 448}, 32
    else:
        sizes, batch = {}, 50
    bench = bl.datasets.logreg_per_feature(source, **sizes, **kw)
    d = _num_hparams_of(bench.hparams0)
    # 1/L of the full-batch loss: the logistic part's curvature is below 2 on digits (10.2 on
    # MNIST), and the penalty adds max e^λ; minibatch curvature reaches 15 (22), hence ρ below
    data_l, rho = (2.0, 0.1) if source == "digits" else (10.5, 0.005)    # MNIST: see data_cleaning_spec
    full_lr = lambda h: 1.0 / (data_l + jnp.max(jnp.exp(h)))
    return Spec("logreg" + ("" if source == "digits" else f"_{source}"),
                f"Logistic regression, one ridge penalty per feature ({source}, even vs odd: {d} penalties)",
                bench.problem, bench.inner_data, bench.outer_data, bench.hparams0, bench.params0,
                _retrained_error(bench.problem, bench.params0, full_lr, 1000), _iterate_error,
                bench.metric, "test error", False, batch, batch, rho=rho, full_lr=full_lr,
                retrain_curve=source == "digits", grids=GRIDS["logreg"],
                budget=30_000 if source == "digits" else 200_000, search_box=(-6.0, 2.0), penalty_final=100.0)


# ---------------------------------------------------------------------------------------------
# Methods: each is init(spec, args, key, lr, data) -> state and chunk(spec, args, K, state, lr,
# data) -> (state, oracle calls), both pure and vmapped over seeds; lr is the gridded step size
# (traced, so one executable serves the grid).
# ---------------------------------------------------------------------------------------------


class Method(NamedTuple):
    name: str
    label: str
    kind: str                   # "stochastic", "full batch" or "search"
    grid_name: str
    init: Callable
    chunk: Callable
    hparams: Callable           # state -> λ
    params: Callable            # state -> w
    calls_per_step: Callable    # spec -> oracle calls per step (an estimate for CG), to size chunks
    init_calls: Callable = lambda spec: 0
    settings: Callable = lambda spec, args: {}


def _num_batches(spec: Spec) -> tuple[float, float]:
    return _rows(spec.inner_data) / spec.inner_batch, _rows(spec.outer_data) / spec.outer_batch


def _const(lr):
    return lambda t: lr


# --- the six drivers --------------------------------------------------------------------------

T_INNER, LINEAR, NEUMANN_TERMS = 10, 10, 10         # inner / linear-system steps per outer step
F2SA_INNER, BOME_INNER, BOME_ETA = 10, 10, 0.5      # benchmark_bilevel's defaults


def _soba(spec, lr, args):
    return bl.soba(spec.problem, spec.rho, optax.sgd(_const(lr)))


def _saba(spec, lr, args):
    return bl.saba(spec.problem, spec.rho, optax.sgd(_const(lr)))


def _stocbio(spec, lr, args):
    return bl.stocbio(spec.problem, spec.rho, optax.sgd(_const(lr)), inner_steps=T_INNER,
                      neumann_terms=NEUMANN_TERMS, neumann_lr=spec.rho)


def _amigo(spec, lr, args):
    return bl.amigo(spec.problem, spec.rho, optax.sgd(_const(lr)), inner_steps=T_INNER,
                    linear_steps=LINEAR, linear_lr=spec.rho)


def _f2sa_growth(spec, args) -> float:
    """δ such that μ_k = 1 + δk reaches `penalty_final` when the oracle budget is spent."""
    steps = spec.budget * args.budget_scale / (3 * F2SA_INNER + 3)
    return (spec.penalty_final - 1.0) / max(steps, 1.0)


def _f2sa(spec, lr, args):
    delta = _f2sa_growth(spec, args)
    # y steps on F + μ_k G are stable while α_k (L_F + μ_k L_G) < 2: α_k = ρ / μ_k
    return bl.f2sa(spec.problem, spec.rho, optax.sgd(_const(lr)), penalty0=1.0, penalty_growth=delta,
                   inner_steps=F2SA_INNER, penalized_lr=lambda k: spec.rho / (1.0 + delta * k),
                   common_batch=True)


def _bome(spec, lr, args):
    return bl.bome(spec.problem, _const(lr), inner_steps=BOME_INNER, eta=BOME_ETA, inner_lr=spec.rho)


def _driver_method(name, label, make, calls, *, saba=False, params=lambda s: s.params, settings=None):
    def init(spec, args, key, lr, data):
        driver = make(spec, lr, args)
        if saba:
            return driver.init(key, spec.hparams0, spec.params0, inner=data.inner, outer=data.outer)
        return driver.init(key, spec.hparams0, spec.params0)

    def chunk(spec, args, K, state, lr, data):
        state, infos = make(spec, lr, args).run(state, data.inner, data.outer, K)
        return state, jnp.sum(infos.oracle_calls).astype(jnp.float32)

    init_calls = (lambda spec: 3 * _num_batches(spec)[0] + _num_batches(spec)[1]) if saba else (lambda spec: 0)
    grid = "ξ (joint step size)" if name == "bome" else "outer SGD step size"
    return Method(name, label, "stochastic", grid, init, chunk, lambda s: s.hparams, params,
                  lambda spec: calls, init_calls, settings or (lambda spec, args: {}))


# --- full-batch implicit CG through bl.hyperopt ------------------------------------------------

FULL_INNER, CG_MAXITER, CG_TOL = 20, 50, 1e-4


def _hyperopt_cg(spec, lr, args):
    method = bl.implicit(bl.unroll(lambda h: optax.sgd(spec.full_lr(h)), steps=FULL_INNER),
                         bl.cg(maxiter=CG_MAXITER, tol=CG_TOL))
    return bl.hyperopt(spec.problem, method, optax.sgd(_const(lr)), warm_start_solve=True)


def _cg_init(spec, args, key, lr, data):
    return _hyperopt_cg(spec, lr, args).init(spec.hparams0, spec.params0)


def _cg_chunk(spec, args, K, state, lr, data):
    driver = _hyperopt_cg(spec, lr, args)
    state, infos = jax.lax.scan(lambda s, _: driver.step(s, data.inner_full, data.outer_full), state,
                                None, length=K)
    n_in, n_out = _num_batches(spec)
    # per outer step: T gradients, the warm start's residual, the CG iterations and the cross
    # product on the training set; one gradient on the validation set
    iters = infos.stats["solve_iterations"].astype(jnp.float32)
    return state, jnp.sum((FULL_INNER + 2 + iters) * n_in + n_out)


IMPLICIT_CG = Method(
    "implicit_cg", "implicit CG, full batch (ours)", "full batch", "outer SGD step size", _cg_init, _cg_chunk,
    lambda s: s.variables, lambda s: s.params,
    lambda spec: (FULL_INNER + 12) * _num_batches(spec)[0] + _num_batches(spec)[1],
    settings=lambda spec, args: {"inner_steps": FULL_INNER, "inner_lr": "1/L", "cg_maxiter": CG_MAXITER,
                                 "cg_tol": CG_TOL, "warm_start": True, "warm_start_solve": True})


# --- stochastic Neumann (Lorraine et al. 2020) through bl.hyperopt -------------------------------

NEU_INNER, NEU_TERMS = 10, 8         # terms < T − 1: each term gets its own minibatch


def _hyperopt_neumann(spec, lr, args):
    method = bl.implicit(bl.unroll(optax.sgd(spec.rho), steps=NEU_INNER),
                         bl.neumann(terms=NEU_TERMS, alpha=spec.rho), curvature="per_term")
    return bl.hyperopt(spec.problem, method, optax.sgd(_const(lr)))


def _neumann_init(spec, args, key, lr, data):
    return _hyperopt_neumann(spec, lr, args).init(spec.hparams0, spec.params0), key


def _neumann_chunk(spec, args, K, state, lr, data):
    driver = _hyperopt_neumann(spec, lr, args)

    def body(carry, _):
        s, key = carry
        k_in, k_out = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
        idx = jax.vmap(lambda i: data.inner.index(k_in, NEU_INNER * s.step + i))(jnp.arange(NEU_INNER))
        stacked = jax.tree_util.tree_map(lambda x: x[idx], data.inner.batches)
        _, outer_batch = data.outer.draw(k_out, s.step)
        s, _ = driver.step(s, bl.per_step(stacked), outer_batch)
        return (s, key), None

    state, _ = jax.lax.scan(body, state, None, length=K)
    return state, jnp.asarray(K * (NEU_INNER + NEU_TERMS + 2), jnp.float32)


NEUMANN = Method(
    "neumann", "implicit stochastic Neumann (ours)", "stochastic", "outer SGD step size", _neumann_init,
    _neumann_chunk, lambda s: s[0].variables, lambda s: s[0].params, lambda spec: NEU_INNER + NEU_TERMS + 2,
    settings=lambda spec, args: {"inner_steps": NEU_INNER, "neumann_terms": NEU_TERMS, "alpha": spec.rho,
                                 "curvature": "per_term", "warm_start": True})


# --- Clip-r online (Online Hyper-parameter Optimization, Algorithm 1) ---------------------------

CLIP_R, CLIP_WARMUP = 5.0, 10


def _online(spec, lr, args):
    return bl.online(spec.problem, optax.sgd(spec.rho), optax.sgd(_const(lr)), clip=CLIP_R, warmup=CLIP_WARMUP)


def _clip_init(spec, args, key, lr, data):
    return _online(spec, lr, args).init(spec.hparams0, spec.params0), key


def _clip_chunk(spec, args, K, state, lr, data):
    driver = _online(spec, lr, args)

    def body(carry, _):
        s, key = carry
        _, bi = data.inner.draw(jax.random.fold_in(key, 0), s.step)
        _, bo = data.outer.draw(jax.random.fold_in(key, 1), s.step)
        s, _ = driver.step(s, bi, bo)
        return (s, key), None

    state, _ = jax.lax.scan(body, state, None, length=K)
    return state, jnp.asarray(K * (2 + _num_hparams(spec)), jnp.float32)


CLIP = Method(
    "clip", f"Clip-{CLIP_R:g} online (ours)", "stochastic", "outer SGD step size", _clip_init, _clip_chunk,
    lambda s: s[0].hparams, lambda s: s[0].params, lambda spec: 2 + _num_hparams(spec),
    settings=lambda spec, args: {"clip": CLIP_R, "warmup": CLIP_WARMUP, "inner_lr": spec.rho,
                                 "oracle_calls_per_step": "1 inner gradient + H forward-mode directions "
                                                          "of it + 1 outer gradient"})


# --- random search ------------------------------------------------------------------------------

SEARCH_STEPS = 100


def _search_forward(spec):
    return bl.unroll(lambda h: optax.sgd(spec.full_lr(h)), steps=SEARCH_STEPS)


def _search_sample(spec):
    lo, hi = spec.search_box
    return lambda k: jax.random.uniform(k, jnp.shape(spec.hparams0), jnp.result_type(spec.hparams0), lo, hi)


def _search_init(spec, args, key, lr, data):
    value = jnp.asarray(jnp.inf, jnp.result_type(spec.hparams0))
    return value, spec.hparams0, spec.params0, key, jnp.zeros((), jnp.int32)


def _search_chunk(spec, args, K, state, lr, data):
    """K candidates drawn as bl.random_search(..., num=K, key=fold_in(key, chunk)) draws them."""
    best, best_h, best_w, key, count = state
    cands = jax.vmap(_search_sample(spec))(jax.random.split(jax.random.fold_in(key, count), K))
    respond = bl.response(spec.problem, _search_forward(spec))
    params = jax.vmap(lambda h: respond(h, spec.params0, data.inner_full))(cands)
    values = jax.vmap(lambda w, h: spec.problem.outer(w, h, data.outer_full))(params, cands)
    values = jnp.where(jnp.isfinite(values), values, jnp.inf)
    i = jnp.argmin(values)
    pick = lambda tree: jax.tree_util.tree_map(lambda x: x[i], tree)
    better = values[i] < best
    choose = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), new, old)
    state = (jnp.minimum(values[i], best), choose(pick(cands), best_h), choose(pick(params), best_w), key, count + 1)
    n_in, n_out = _num_batches(spec)
    return state, jnp.asarray(K * (SEARCH_STEPS * n_in + n_out), jnp.float32)


RANDOM_SEARCH = Method(
    "random_search", "random search", "search", "λ range (no step size)", _search_init, _search_chunk,
    lambda s: s[1], lambda s: s[2],
    lambda spec: SEARCH_STEPS * _num_batches(spec)[0] + _num_batches(spec)[1],
    settings=lambda spec, args: {"train_steps": SEARCH_STEPS, "inner_lr": "1/L",
                                 "box": list(spec.search_box)})


METHODS = {
    "soba": _driver_method("soba", "SOBA", _soba, 4),
    "saba": _driver_method("saba", "SABA", _saba, 4, saba=True),
    "stocbio": _driver_method("stocbio", "StocBiO", _stocbio, T_INNER + NEUMANN_TERMS + 2,
                              settings=lambda spec, args: {"inner_steps": T_INNER, "neumann_terms": NEUMANN_TERMS,
                                                           "neumann_lr": spec.rho}),
    "amigo": _driver_method("amigo", "AmIGO", _amigo, T_INNER + LINEAR + 2,
                            settings=lambda spec, args: {"inner_steps": T_INNER, "linear_steps": LINEAR,
                                                         "linear_lr": spec.rho}),
    "f2sa": _driver_method("f2sa", "F2SA", _f2sa, 3 * F2SA_INNER + 3, params=lambda s: s.y,
                           settings=lambda spec, args: {"inner_steps": F2SA_INNER, "penalty0": 1.0,
                                                        "penalty_growth": _f2sa_growth(spec, args),
                                                        "penalized_lr": "rho / mu_k", "common_batch": True}),
    "bome": _driver_method("bome", "BOME", _bome, BOME_INNER + 3,
                           settings=lambda spec, args: {"inner_steps": BOME_INNER, "eta": BOME_ETA,
                                                        "inner_lr": spec.rho}),
    "implicit_cg": IMPLICIT_CG,
    "neumann": NEUMANN,
    "clip": CLIP,
    "random_search": RANDOM_SEARCH,
}
STOCHASTIC = ("soba", "saba", "stocbio", "amigo", "f2sa", "bome", "neumann", "clip")

# ---------------------------------------------------------------------------------------------
# Running: chunks of K steps, timed; the metric between chunks, untimed
# ---------------------------------------------------------------------------------------------


def _data(spec: Spec) -> Data:
    return Data(bl.sampler(spec.inner_data, spec.inner_batch), bl.sampler(spec.outer_data, spec.outer_batch),
                spec.inner_data, spec.outer_data)


def _budget(spec, args) -> float:
    return spec.budget * args.budget_scale


def _steps_per_chunk(spec, method, args) -> int:
    """K such that the budget takes about `args.chunks` chunks (at least one step per chunk)."""
    return max(1, round(_budget(spec, args) / args.chunks / method.calls_per_step(spec)))


def _eval_points(spec, method, args, K) -> set:
    """Chunk counts after which the metric is evaluated: log-spaced up to the expected last."""
    per_chunk = K * method.calls_per_step(spec)
    last = max(1, math.ceil((_budget(spec, args) - method.init_calls(spec)) / per_chunk))
    return set(np.unique(np.round(np.geomspace(1, last, args.points))).astype(int).tolist())


class Compiled(NamedTuple):
    init: Any
    chunk: Any
    K: int
    compile_seconds: float


def compile_method(spec, method, args, data, seeds: int | None) -> Compiled:
    """AOT-compile init and one chunk (vmapped over `seeds` keys, or unbatched for None)."""
    K = _steps_per_chunk(spec, method, args)
    init = functools.partial(method.init, spec, args)
    chunk = functools.partial(method.chunk, spec, args, K)
    if seeds is not None:
        init, chunk = jax.vmap(init, in_axes=(0, None, None)), jax.vmap(chunk, in_axes=(0, None, None))
    lr = jnp.asarray(1.0, jnp.float32)
    keys = _keys(args, seeds)
    began = time.perf_counter()
    init_c = jax.jit(init).lower(keys, lr, data).compile()
    state = jax.eval_shape(init, keys, lr, data)
    chunk_c = jax.jit(chunk, donate_argnums=0).lower(state, lr, data).compile()
    return Compiled(init_c, chunk_c, K, time.perf_counter() - began)


def _keys(args, seeds):
    base = jax.random.key(args.seed)
    return jax.random.split(base, seeds) if seeds is not None else jax.random.split(base, 1)[0]


class Evaluator(NamedTuple):
    value: Any       # (hparams, metric_args, inner_full) -> the metric of λ, per seed
    iterate: Any     # (params, metric_args) -> the metric of the method's w, per seed; or None


def evaluator(spec, seeds) -> Evaluator:
    vm = (lambda f, axes: f) if seeds is None else (lambda f, axes: jax.vmap(f, in_axes=axes))
    value = jax.jit(vm(spec.value, (0, None, None)))
    iterate = None if spec.iterate is None else jax.jit(vm(spec.iterate, (0, None)))
    return Evaluator(value, iterate)


def _quantiles(metric) -> dict:
    """Median and 20/80% quantiles over seeds of each row of `metric` (points, seeds); inf where a
    seed is not finite (a diverged seed counts as the worst)."""
    m = np.where(np.isfinite(metric), metric, np.inf)
    q = lambda p: [float(np.quantile(row, p)) for row in m]
    return {"median": q(0.5), "q20": q(0.2), "q80": q(0.8)}


def run_config(spec, method, compiled: Compiled, ev: Evaluator, args, data, lr: float, seeds: int | None) -> dict:
    """One method at one step size: the curves of all seeds."""
    keys, lr_arr = _keys(args, seeds), jnp.asarray(lr, jnp.float32)
    n = 1 if seeds is None else seeds
    arr = lambda x: np.atleast_1d(np.asarray(x, dtype=np.float64))
    values, iterates = [], []

    def evaluate(state, last=False):
        if spec.retrain_curve or last:
            values.append(arr(ev.value(method.hparams(state), spec.metric_args, data.inner_full)))
        if ev.iterate is not None:
            iterates.append(arr(ev.iterate(method.params(state), spec.metric_args)))

    began = time.perf_counter()
    state = jax.block_until_ready(compiled.init(keys, lr_arr, data))
    elapsed = time.perf_counter() - began
    calls, chunks = float(method.init_calls(spec)), 0
    times, oracle = [elapsed / n], [calls]
    evaluate(state)
    points, stop = _eval_points(spec, method, args, compiled.K), "budget"
    while calls < _budget(spec, args):
        if elapsed / n >= args.max_seconds:
            stop = "time cap"
            break
        began = time.perf_counter()
        state, used = compiled.chunk(state, lr_arr, data)
        jax.block_until_ready(state)
        elapsed += time.perf_counter() - began
        calls += float(np.max(np.asarray(used)))
        chunks += 1
        last = calls >= _budget(spec, args) or elapsed / n >= args.max_seconds
        if chunks in points or last:
            times.append(elapsed / n)
            oracle.append(calls)
            evaluate(state, last=last)
    if not values:                  # no chunk ran (the budget was spent by init)
        values.append(arr(ev.value(method.hparams(state), spec.metric_args, data.inner_full)))
    curve = np.stack(values if spec.retrain_curve else iterates)          # (points, seeds)
    final_value = values[-1]
    out = {"lr": lr, "time": times, "oracle_calls": oracle, "metric": curve.tolist(), **_quantiles(curve),
           "curve_metric": "value" if spec.retrain_curve else "iterate",
           "final": _quantiles(final_value[None]), "diverged_seeds": int(np.sum(~np.isfinite(final_value))),
           "stopped_by": stop, "steps_per_chunk": compiled.K, "chunks": chunks, "batched_seconds": elapsed,
           "final_hparams_mean": float(np.mean(np.asarray(jax.tree_util.tree_leaves(method.hparams(state))[0])))}
    if iterates:
        out["iterate_metric"] = np.stack(iterates).tolist()
        out["final_iterate"] = _quantiles(iterates[-1][None])
    for k in ("median", "q20", "q80"):
        out["final_" + k] = out["final"][k][0]
    return out


def run_problem(spec: Spec, args) -> dict:
    data = _data(spec)
    evaluators = {}
    out = {}
    for name in args.methods:
        method = METHODS[name]
        jacobian = 4 * _num_params(spec) * _num_hparams(spec) * args.seeds
        if name == "clip" and jacobian > 2**31:
            print(f"  {method.label}: skipped, its Jacobians dθ/dλ would take {jacobian / 2**30:.1f} GiB "
                  f"({args.seeds} seeds × {_num_params(spec):,} × {_num_hparams(spec):,} floats)")
            continue
        grid = spec.grids[name][: args.grid_limit] if args.grid_limit else spec.grids[name]
        seeds = 1 if method.kind == "full batch" else args.seeds     # no randomness: one run
        if seeds not in evaluators:
            evaluators[seeds] = evaluator(spec, seeds)
        compiled = compile_method(spec, method, args, data, seeds)
        runs = [run_config(spec, method, compiled, evaluators[seeds], args, data, lr, seeds) for lr in grid]
        best = min(range(len(runs)), key=lambda i: (runs[i]["final_median"], -runs[i]["lr"]))
        out[name] = {"label": method.label, "kind": method.kind, "grid_name": method.grid_name, "seeds": seeds,
                     "grid": list(grid), "best_lr": runs[best]["lr"], "best": best, "runs": runs,
                     "compile_seconds": compiled.compile_seconds, "steps_per_chunk": compiled.K,
                     "settings": method.settings(spec, args)}
        r = runs[best]
        print(f"  {method.label:36s} best {r['lr']:<6g} final {spec.metric_name} {r['final_median']:.4g} "
              f"[{r['final_q20']:.4g}, {r['final_q80']:.4g}]" +
              (f" (iterate {r['final_iterate']['median'][0]:.4g})" if "final_iterate" in r else "") +
              f"  {r['oracle_calls'][-1]:.0f} calls, {r['time'][-1]:.3f} s/run ({r['stopped_by']}), "
              f"compile {compiled.compile_seconds:.1f} s; grid " +
              ", ".join(f"{x['lr']:g}: {x['final_median']:.3g}" for x in runs), flush=True)
    if "random_search" in args.methods:
        out["random_search"]["check"] = check_random_search(spec, args, data, out["random_search"])
    return out


def check_random_search(spec, args, data, result) -> dict:
    """A chunk of 8 candidates on seed 0 against bl.random_search with the same keys."""
    K = 8
    key = jax.random.fold_in(_keys(args, args.seeds)[0], 0)
    ref = bl.random_search(spec.problem, _search_forward(spec), _search_sample(spec), spec.params0,
                           spec.inner_data, spec.outer_data, num=K, key=key)
    state = _search_init(spec, args, _keys(args, args.seeds)[0], 1.0, data)
    state, _ = jax.jit(functools.partial(_search_chunk, spec, args, K))(state, 1.0, data)
    ours, theirs = float(state[0]), float(ref.best_value)
    agree = bool(np.isclose(ours, theirs, rtol=1e-4, atol=1e-6))
    print(f"  random search check (seed 0, {K} candidates): best validation loss {ours:.6g} here, "
          f"{theirs:.6g} from bl.random_search: {'agree' if agree else 'DISAGREE'}")
    return {"candidates": K, "best_value": ours, "bl_random_search_best_value": theirs, "agree": agree}


# ---------------------------------------------------------------------------------------------
# The goal: the best stochastic method against the full-batch implicit method's final error
# ---------------------------------------------------------------------------------------------


def _reach(curve_time, curve_metric, target) -> dict:
    """When a median curve first reaches `target`, and from when on it stays at or below it."""
    below = np.asarray(curve_metric) <= target
    first = int(np.argmax(below)) if below.any() else None
    above = np.flatnonzero(~below)
    stay = 0 if not above.size else (int(above[-1]) + 1 if above[-1] + 1 < len(below) else None)
    at = lambda i: None if i is None else float(curve_time[i])
    return {"time_to_target": at(first), "time_to_stay": at(stay)}


def _ratio(t, total):
    return None if t is None else t / total


def goal(spec, results, args) -> dict:
    """The stochastic methods' time to the full-batch method's final median metric, two ways: the
    first time their median reaches it, and the time from which it stays there."""
    full = results["implicit_cg"]["runs"][results["implicit_cg"]["best"]]
    # the curves' metric: of λ (retrained), or of the iterate where retraining every point is too dear
    target, full_time = full["median"][-1], full["time"][-1]
    full_reach = _reach(full["time"], full["median"], target)["time_to_target"]
    metric = spec.metric_name + ("" if spec.retrain_curve else " of the methods' own iterates")
    rows = []
    for name in STOCHASTIC:
        if name not in results:
            continue
        r = results[name]["runs"][results[name]["best"]]
        reach = _reach(r["time"], r["median"], target)
        calls = _reach(r["oracle_calls"], r["median"], target)["time_to_target"]
        rows.append({"method": name, "label": results[name]["label"], **reach,
                     "ratio": _ratio(reach["time_to_target"], full_time),
                     "ratio_stay": _ratio(reach["time_to_stay"], full_time),
                     "oracle_ratio": _ratio(calls, full["oracle_calls"][-1]),
                     "final_median": r["median"][-1], "best_median": float(np.min(r["median"]))})
    key = lambda field: lambda r: (r[field] is None, r[field] or 0.0)
    first, stay = min(rows, key=key("ratio")), min(rows, key=key("ratio_stay"))
    verdict_first = first["ratio"] is not None and first["ratio"] <= 0.2
    verdict_stay = stay["ratio_stay"] is not None and stay["ratio_stay"] <= 0.2
    n_test = _rows(spec.metric_args.args[0]) if hasattr(spec.metric_args, "args") else None
    out = {"problem": spec.name, "target": target, "full_batch_time": full_time,
           "full_batch_time_to_target": full_reach, "full_batch_lr": full["lr"], "methods": rows,
           "best": first["method"], "best_stay": stay["method"], "verdict_first_reach": verdict_first,
           "verdict_stays": verdict_stay, "test_rows": n_test}
    met = lambda v: "met" if v else "NOT met"
    head = (f"Target: the full-batch implicit method's final median {metric}, {target:.4g} (it gets there "
            f"after {full_reach:.3g} s of its {full_time:.3g} s per run). ")
    if first["ratio"] is None:
        out["statement"] = head + (f"No stochastic method's median reaches it (closest: {first['label']}, best median "
                                   f"{first['best_median']:.4g}): the goal is NOT met.")
    else:
        text = (f"First reaching it: {first['label']} after {first['time_to_target']:.3g} s per run, "
                f"{first['ratio']:.2f} of the full-batch wall time"
                + ("" if first["ratio_stay"] is not None else
                   f" (its median does not stay there: it ends at {first['final_median']:.4g})")
                + f": the goal (at most 1/5) is {met(verdict_first)}. ")
        if stay["ratio_stay"] is None:
            text += "No stochastic method's median stays at or below the target to the end of its run."
        else:
            text += (f"Reaching it and staying there to the end of the run: {stay['label']} from "
                     f"{stay['time_to_stay']:.3g} s per run, {stay['ratio_stay']:.2f} of the full-batch wall time: "
                     f"{met(verdict_stay)}.")
        out["statement"] = head + text
    if n_test:
        out["statement"] += f" (One test image is {1 / n_test:.4f} of test error.)"
    if args.confirm:
        names = [r["method"] for r in (first, stay) if r["time_to_target"] is not None]
        out["unbatched"] = confirm_unbatched(spec, results, args, list(dict.fromkeys(names)))
    print("  GOAL: " + out["statement"])
    return out


def confirm_unbatched(spec, results, args, names) -> dict:
    """Seed 0 alone (no vmap) for the full-batch method and the given stochastic ones: batching 10
    seeds makes small minibatch products cheaper per run than they are in a single run."""
    data = _data(spec)
    ev = evaluator(spec, None)
    runs = {}
    for m in ("implicit_cg", *names):
        compiled = compile_method(spec, METHODS[m], args, data, None)
        runs[m] = run_config(spec, METHODS[m], compiled, ev, args, data, results[m]["best_lr"], None)
    full = runs["implicit_cg"]
    target, full_time = full["median"][-1], full["time"][-1]
    metric = spec.metric_name + ("" if spec.retrain_curve else " (of its iterate)")
    statement = (f"Unbatched, seed 0 alone: the full-batch implicit method ends at {metric} {target:.4g} "
                 f"after {full_time:.3g} s")
    rows = {}
    for name in names:
        reach = _reach(runs[name]["time"], runs[name]["median"], target)
        t, stay = reach["time_to_target"], reach["time_to_stay"]
        rows[name] = {**reach, "ratio": _ratio(t, full_time), "ratio_stay": _ratio(stay, full_time)}
        statement += f"; {results[name]['label']} " + (
            "does not reach it" if t is None else
            f"first reaches it after {t:.3g} s ({t / full_time:.2f} of that)" +
            (f" and stays there from {stay:.3g} s ({stay / full_time:.2f})" if stay is not None
             else ", not staying there"))
    statement += "."
    print("  " + statement)
    return {"target": target, "full_batch_time": full_time, "methods": rows, "statement": statement,
            "curves": {k: {"time": v["time"], "oracle_calls": v["oracle_calls"], "metric": v["median"]}
                       for k, v in runs.items()}}


# ---------------------------------------------------------------------------------------------
# Output: tables, figures, JSON
# ---------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    if x is None or not np.isfinite(x):
        return "diverged" if x is not None else "–"
    return f"{x:.3g}" if abs(x) < 1e-3 or abs(x) >= 1e3 else f"{x:.4f}"


def table(spec, results) -> list[str]:
    iterate = spec.iterate is not None
    head = f"{spec.metric_name} of λ" if iterate else spec.metric_name
    lines = [f"| method | kind | {head}: final median [20%, 80%] |" + (" of its own w |" if iterate else "")
             + " best step size | grid (final medians) | oracle calls | s/run | stopped by | compile (s) |",
             "|---|---|---|" + ("---|" if iterate else "") + "---|---|---|---|---|---|"]
    for res in results.values():
        r = res["runs"][res["best"]]
        grid = ", ".join(f"{x['lr']:g}: {_fmt(x['final_median'])}" for x in res["runs"])
        own = ""
        if iterate:
            f = r["final_iterate"]
            own = f" {_fmt(f['median'][0])} [{_fmt(f['q20'][0])}, {_fmt(f['q80'][0])}] |"
        lines.append(f"| {res['label']} | {res['kind']} | {_fmt(r['final_median'])} [{_fmt(r['final_q20'])}, "
                     f"{_fmt(r['final_q80'])}] |{own} {r['lr']:g} | {grid} | {r['oracle_calls'][-1]:,.0f} | "
                     f"{r['time'][-1]:.3g} | {r['stopped_by']} | {res['compile_seconds']:.1f} |")
    return lines


def figure(spec, results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colors = plt.get_cmap("tab10").colors
    for i, (name, res) in enumerate(results.items()):
        r = res["runs"][res["best"]]
        style = {"color": colors[i % 10], "linestyle": "--" if res["kind"] != "stochastic" else "-"}
        for ax, x in zip(axes, (r["time"], r["oracle_calls"])):
            x = np.asarray(x)
            if x[0] <= 0:
                x = x.copy()
                x[0] = x[1] / 10 if len(x) > 1 else 1.0  # the start on a log axis
            ax.plot(x, r["median"], label=f"{res['label']} ({r['lr']:g})", lw=1.6, **style)
            ax.fill_between(x, r["q20"], r["q80"], color=style["color"], alpha=0.15, lw=0)
    for ax, xl in zip(axes, ("wall time per run (s)", "oracle calls (minibatch equivalents)")):
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3, which="both")
    if spec.log_metric:
        axes[0].set_yscale("log")
    axes[0].set_ylabel(spec.metric_name + " (median, 20–80% band)")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(spec.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rounded(tree):
    """Floats to 6 significant digits (the JSON files hold every seed's curve)."""
    if isinstance(tree, float):
        return float(f"{tree:.6g}")
    if isinstance(tree, dict):
        return {k: _rounded(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_rounded(v) for v in tree]
    return tree


def machine() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor(), "platform": platform.platform(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "python": platform.python_version()}


def write_problem(spec, results, args, out, assets, goal_result) -> dict:
    settings = {"seeds": args.seeds, "points": args.points, "budget": spec.budget * args.budget_scale,
                "max_seconds": args.max_seconds, "inner_batch": spec.inner_batch, "outer_batch": spec.outer_batch,
                "n_train": _rows(spec.inner_data), "n_val": _rows(spec.outer_data),
                "hparams": _num_hparams(spec), "params": _num_params(spec), "rho": spec.rho,
                "dtype": str(jnp.result_type(spec.hparams0)), "quick": args.quick}
    doc = {"problem": spec.name, "title": spec.title, "metric": spec.metric_name, "settings": settings,
           "machine": machine(), "methods": results}
    if goal_result is not None:
        doc["goal"] = goal_result
    (out / f"{spec.name}.json").write_text(json.dumps(_rounded(doc), separators=(",", ":"), default=float))
    png = assets / f"stochastic_{spec.name}.png"
    figure(spec, results, png)
    lines = [f"# {spec.title}", "",
             (f"{args.seeds} seeds per method and step size; budget {settings['budget']:,.0f} oracle calls per run "
              f"(minibatch equivalents; batch {spec.inner_batch} of {settings['n_train']} training rows, "
              f"{spec.outer_batch} of {settings['n_val']} validation rows); per-run time cap "
              f"{args.max_seconds:g} s; full-batch implicit CG has no randomness and runs once; "
              f"{settings['dtype']}. Metric: {spec.metric_name} "
              f"(the median over seeds, and the 20% and 80% quantiles). Figure: `{png.name}`."), ""]
    lines += ["<!-- --8<-- [start:table] -->"] + table(spec, results) + ["<!-- --8<-- [end:table] -->", ""]
    if goal_result is not None:
        lines += ["<!-- --8<-- [start:goal] -->", "**Goal:** " + goal_result["statement"], ""]
        if "unbatched" in goal_result:
            lines += [goal_result["unbatched"]["statement"], ""]
        lines += ["<!-- --8<-- [end:goal] -->", ""]
    (out / f"{spec.name}.md").write_text("\n".join(lines))
    return {"name": spec.name, "title": spec.title, "table": table(spec, results), "figure": png.name}


# ---------------------------------------------------------------------------------------------
# Item 6: the scale check on MNIST (float32, P×H never formed)
# ---------------------------------------------------------------------------------------------


def _cross_entropy(params, X, y):
    W, b = params
    logits = X @ W + b
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0])


def _per_weight_inner(params, log_lam, batch):
    """Mean cross-entropy + ½ Σ e^{λ} ⊙ w², one log-penalty per weight (W and b: 7,850 on MNIST)."""
    X, y = batch
    return _cross_entropy(params, X, y) + 0.5 * sum(jnp.sum(jnp.exp(l) * p**2) for p, l in zip(params, log_lam))


def _per_weight_outer(params, log_lam, batch):
    del log_lam
    return _cross_entropy(params, *batch)


PER_WEIGHT = bl.Problem(inner=_per_weight_inner, outer=_per_weight_outer)


def per_weight_problem(path, log_lam0: float = -4.0):
    """Pixels in [0, 1] (not standardised: see data_cleaning_spec on MNIST's near-constant pixels)."""
    data = bl.datasets.mnist(path, num_train=20_000, num_val=5_000, standardize=False)
    (Xt, yt), (Xv, yv), (Xs, ys) = ((jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.int32))
                                    for X, y in (data.train, data.val, data.test))
    params0 = (jnp.zeros((784, 10), jnp.float32), jnp.zeros(10, jnp.float32))
    hparams0 = (jnp.full((784, 10), log_lam0, jnp.float32), jnp.full(10, log_lam0, jnp.float32))
    metric = jax.tree_util.Partial(lambda X, y, p: jnp.mean(jnp.argmax(X @ p[0] + p[1], 1) != y, dtype=jnp.float32),
                                   Xs, ys)
    return PER_WEIGHT, (Xt, yt), (Xv, yv), hparams0, params0, metric


def _nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes"))


def _scale_run(driver, saba: bool, steps: int, h0, w0, inner, outer, metric) -> dict:
    """One driver's whole run as one compiled call (data and state as arguments); its XLA memory."""
    def init(key, h, w, i, o):
        return driver.init(key, h, w, inner=i, outer=o) if saba else driver.init(key, h, w)

    key = jax.random.key(0)
    init = jax.jit(init).lower(key, h0, w0, inner, outer).compile()
    began = time.perf_counter()
    state = jax.block_until_ready(init(key, h0, w0, inner, outer))
    init_seconds = time.perf_counter() - began
    began = time.perf_counter()
    compiled = jax.jit(lambda s, i, o: driver.run(s, i, o, steps)[0]).lower(state, inner, outer).compile()
    compile_seconds = time.perf_counter() - began
    mem = compiled.memory_analysis()
    temp, arg, out = (int(getattr(mem, f)) for f in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                      "output_size_in_bytes"))
    evaluate = jax.jit(lambda w, m: m(w))
    before = float(evaluate(state.params, metric))
    began = time.perf_counter()
    state = jax.block_until_ready(compiled(state, inner, outer))
    seconds = time.perf_counter() - began
    after = float(evaluate(state.params, metric))
    return {"steps": steps, "test_error_before": before, "test_error_after": after, "finite": bool(np.isfinite(after)),
            "seconds": seconds, "init_seconds": init_seconds, "compile_seconds": compile_seconds, "temp_bytes": temp,
            "argument_bytes": arg, "output_bytes": out, "total_bytes": temp + arg + out, "state_bytes": _nbytes(state),
            "data_bytes": _nbytes((inner, outer))}


def scale_check(args) -> dict:
    """Both MNIST problems end to end with SOBA, SABA, StocBiO and AmIGO; XLA memory per compiled chunk."""
    bench = bl.datasets.data_cleaning("mnist", corruption=0.5, path=args.scale, dtype=jnp.float32)
    problems = {
        "per_weight_l2": (*per_weight_problem(args.scale), args.scale_rho[0], args.scale_lr[0]),
        "data_cleaning": (bench.problem, bench.inner_data, bench.outer_data, bench.hparams0, bench.params0,
                          bench.metric, args.scale_rho[1], args.scale_lr[1]),
    }
    drivers = {
        "soba": lambda p, rho, lr: bl.soba(p, rho, lr),
        "saba": lambda p, rho, lr: bl.saba(p, rho, lr),
        "stocbio": lambda p, rho, lr: bl.stocbio(p, rho, lr, inner_steps=T_INNER, neumann_terms=NEUMANN_TERMS,
                                                 neumann_lr=rho),
        "amigo": lambda p, rho, lr: bl.amigo(p, rho, lr, inner_steps=T_INNER, linear_steps=LINEAR, linear_lr=rho),
    }
    results = {}
    for pname, (problem, inner_data, outer_data, h0, w0, metric, rho, lr) in problems.items():
        P, H = _num_hparams_of(w0), _num_hparams_of(h0)
        inner, outer = bl.sampler(inner_data, 50), bl.sampler(outer_data, 50)
        print(f"scale check: {pname}: P = {P:,} parameters, H = {H:,} hyperparameters, "
              f"P×H×4 bytes = {P * H * 4 / 2**20:,.0f} MiB")
        rows = {}
        for name, make in drivers.items():
            steps = args.scale_steps if name in ("soba", "saba") else max(1, args.scale_steps // (T_INNER + 12))
            rows[name] = _scale_run(make(problem, rho, lr), name == "saba", steps, h0, w0, inner, outer, metric)
            r = rows[name]
            rows[name].update({"lr": lr, "rho": rho, "p_times_h_bytes": P * H * 4,
                               "ratio_to_p_times_h": r["total_bytes"] / (P * H * 4)})
            print(f"  {name:8s} {steps:5d} steps in {r['seconds']:6.1f} s: test error {r['test_error_before']:.4f} -> "
                  f"{r['test_error_after']:.4f}; XLA memory temp {r['temp_bytes'] / 2**20:7.1f} + args "
                  f"{r['argument_bytes'] / 2**20:7.1f} + out {r['output_bytes'] / 2**20:7.1f} = "
                  f"{r['total_bytes'] / 2**20:7.1f} MiB = {r['ratio_to_p_times_h']:.3f} × P×H×4", flush=True)
        results[pname] = {"P": P, "H": H, "p_times_h_bytes": P * H * 4, "drivers": rows}
    return results


def write_scale(results, args, out) -> None:
    doc = {"settings": {"mnist": str(args.scale), "steps": args.scale_steps, "dtype": "float32",
                        "batch_size": 50}, "machine": machine(), "problems": results}
    (out / "scale.json").write_text(json.dumps(doc, indent=1))
    lines = ["# Scale check on MNIST (float32)", "",
             ("Each driver's whole run is one compiled call; memory is XLA's `memory_analysis()` of that "
              "executable (temp + argument + output bytes; arguments include the data and the state, "
              "SABA's state its memory tables)."), "",
             "<!-- --8<-- [start:table] -->",
             ("| problem | P | H | P×H×4 | driver | steps | s | test error before → after | temp | args | out | "
              "total | total / P×H×4 |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    for pname, res in results.items():
        for name, r in res["drivers"].items():
            lines.append(f"| {pname} | {res['P']:,} | {res['H']:,} | {mib(res['p_times_h_bytes'])} | {name} | "
                         f"{r['steps']} | {r['seconds']:.1f} | "
                         f"{r['test_error_before']:.4f} → {r['test_error_after']:.4f} | "
                         f"{mib(r['temp_bytes'])} | {mib(r['argument_bytes'])} | {mib(r['output_bytes'])} | "
                         f"{mib(r['total_bytes'])} | {r['ratio_to_p_times_h']:.3f} |")
    peak = max((r["total_bytes"], p) for p, res in results.items() for r in res["drivers"].values())
    temp = max(r["temp_bytes"] for res in results.values() for r in res["drivers"].values())
    lines += ["<!-- --8<-- [end:table] -->", "", "<!-- --8<-- [start:statement] -->",
              f"The largest temporary allocation of any run is {temp / 2**20:,.1f} MiB; the largest compiled "
              f"run takes {peak[0] / 2**20:,.1f} MiB in all ({peak[1]}); a P×H array "
              "(the Jacobian dw/dλ that forward-mode or Clip-r methods carry) would take "
              + " and ".join(f"{mib(res['p_times_h_bytes'])} for {p}" for p, res in results.items())
              + ". No P×H array is formed: the drivers only take Hessian-vector and cross-derivative products.",
              "<!-- --8<-- [end:statement] -->", ""]
    (out / "scale.md").write_text("\n".join(lines))
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="+", default=["quadratic", "data_cleaning", "logreg"],
                   choices=["quadratic", "data_cleaning", "logreg"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--corruption", nargs="+", type=float, default=[0.5],
                   help="data cleaning's corrupted share(s) p (0.5 is the goal's problem)")
    p.add_argument("--mnist", default=None, help="MNIST .npz: run data cleaning and logreg on it instead of digits")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--points", type=int, default=25, help="metric evaluations per run (log-spaced in chunks)")
    p.add_argument("--chunks", type=int, default=200,
                   help="chunks per run: K = budget / chunks / oracle calls per step")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every problem's oracle budget")
    p.add_argument("--max-seconds", type=float, default=6.0,
                   help="cap on the time per run of one method at one step size (batched time / seeds)")
    p.add_argument("--grid-limit", type=int, default=None, help="use only the first N step sizes of each grid")
    p.add_argument("--confirm", dest="force_confirm", action="store_true",
                   help="run the unbatched timing of the goal even with --quick")
    p.add_argument("--no-confirm", dest="confirm", action="store_false",
                   help="skip the unbatched single-seed timing of the goal")
    p.add_argument("--scale", default=None, metavar="MNIST_NPZ", help="run the item-6 scale check instead")
    p.add_argument("--scale-steps", type=int, default=2000)
    p.add_argument("--scale-lr", type=float, nargs=2, default=[1.0, 1e4],
                   help="outer SGD step sizes of the scale check: per-weight L2, data cleaning")
    p.add_argument("--scale-rho", type=float, nargs=2, default=[0.05, 0.02],
                   help="inner (and linear-system) step sizes of the scale check: per-weight L2, data cleaning")
    p.add_argument("--quick", action="store_true", help="tiny problems, 2 seeds, one step size (the tests)")
    p.add_argument("--out", default="benchmarks/results/stochastic")
    p.add_argument("--assets", default="docs/assets")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.points, args.chunks, args.grid_limit, args.budget_scale = 2, 3, 4, 1, 0.02
        args.confirm = args.force_confirm
        args.scale_steps = min(args.scale_steps, 20)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out, assets = pathlib.Path(args.out), pathlib.Path(args.assets)
    out.mkdir(parents=True, exist_ok=True)
    assets.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    if args.scale:
        results = scale_check(args)
        write_scale(results, args, out)
        return {"scale": results, "seconds": time.perf_counter() - began}
    specs = []
    for name in args.problems:
        if name == "quadratic":
            specs.append(quadratic_spec(args))
        elif name == "data_cleaning":
            specs += [data_cleaning_spec(args, p) for p in args.corruption]
        else:
            specs.append(logreg_spec(args))
    summary, goal_result = [], None
    for spec in specs:
        print(f"{spec.title}: budget {_budget(spec, args):,.0f} oracle calls, {args.seeds} seeds", flush=True)
        results = run_problem(spec, args)
        g = goal(spec, results, args) if spec.goal and "implicit_cg" in results and \
            any(m in results for m in STOCHASTIC) else None
        goal_result = goal_result or g
        summary.append(write_problem(spec, results, args, out, assets, g))
    seconds = time.perf_counter() - began
    doc = {"problems": [s["name"] for s in summary], "goal": goal_result, "seconds": seconds,
           "settings": {k: v for k, v in vars(args).items()}, "machine": machine()}
    (out / "summary.json").write_text(json.dumps(doc, indent=1, default=float))
    lines = ["# Stochastic bilevel benchmark", "", f"Total run time {seconds / 60:.1f} min on {platform.machine()} "
             f"({jax.default_backend()}). Command: `python benchmarks/stochastic.py "
             f"{' '.join(argv) if argv else ''}`".rstrip() + ".", ""]
    for s in summary:
        lines += ["## " + s["title"], ""] + s["table"] + ["", f"![{s['name']}](../../../docs/assets/{s['figure']})", ""]
    if goal_result is not None:
        lines += ["## Goal", "", goal_result["statement"], ""]
        if "unbatched" in goal_result:
            lines += [goal_result["unbatched"]["statement"], ""]
    (out / "summary.md").write_text("\n".join(lines))
    print(f"done in {seconds / 60:.1f} min")
    return doc


if __name__ == "__main__":
    main()
