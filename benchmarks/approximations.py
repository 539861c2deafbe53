"""The lecture's table of hypergradient approximations, measured on two exact problems.

Every approximation of the table in Duvenaud's lecture *Optimizing Millions of
Hyperparameters by Implicit Differentiation* (exact IFT; unrolled differentiation, Maclaurin
et al. 2015; L-step truncated unrolling; Larsen et al. 1996; Bengio 2000; T1−T2, Luketina et
al. 2016; the Neumann series, Lorraine et al. 2020; conjugate gradient, HOAG, Pedregosa 2016;
a hypernetwork, Lorraine & Duvenaud 2018; Bayesian optimisation), and those of the other
papers the library implements (DrMAD, Fu et al. 2016; forward mode / RTRL, Franceschi et al.
2017; forward mode with clipping, *Online Hyper-parameter Optimization*; first-order MAML;
GMRES; the stochastic Neumann estimate), each run as the `bilevel` method that implements it
on two problems of `bilevel.testing` whose exact hypergradients are known in closed form:

- `ridge`: `RidgePerCoordinate`, ridge regression with one log-penalty per coordinate (d
  hyperparameters). Forward solve: T full-batch gradient-descent steps (`optax.sgd(η)`,
  η = 1/λ_max(H)), enough to converge to w* at float64 precision.
- `unrolled`: `UnrolledQuadratic`, a quadratic with one log-penalty and T gradient-descent
  steps that stop short of the minimum from a random start, so that the T-step unrolled
  hypergradient and the IFT one differ; both (and DrMAD's) are known in closed form.

For each row: the relative error ‖g − g_exact‖/‖g_exact‖ of the method's hypergradient against
the exact (T → ∞, IFT) value, against the value of the approximation's own formula where it
is known in closed form (the T-step unrolled value for unrolled methods; the IFT, the
truncated Neumann series or H⁻¹ ≈ I evaluated at the forward solve's end point; DrMAD's
closed form), and the cost ratio: time of the compiled hypergradient ÷ time of the compiled
forward solve alone (`jax.jit(bl.response(problem, bl.unroll(sgd(η), T)))`), both warmed up
and run in alternation in one process, the median over the repeats of each pair's ratio.

    python benchmarks/approximations.py            # about two minutes on 2 CPU cores
    python benchmarks/approximations.py --quick    # tiny sizes (the test)
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
import bilevel.testing as blt

# ------------------------------------------------------------------------------------------
# Sizes.
# ------------------------------------------------------------------------------------------

FULL = dict(ridge_dim=100, ridge_condition=10.0, ridge_steps=400, uq_dim=100, uq_condition=100.0,
            uq_steps=200, terms=20, truncate=20, cg_few=5, per_step=64, per_step_rows=40, draws=16,
            hypernet_steps=2000, hypernet_samples=16, hypernet_sigma=0.01, repeats=25)
QUICK = dict(ridge_dim=6, ridge_condition=10.0, ridge_steps=400, uq_dim=5, uq_condition=10.0,
             uq_steps=20, terms=5, truncate=5, cg_few=2, per_step=16, per_step_rows=6, draws=4,
             hypernet_steps=200, hypernet_samples=4, hypernet_sigma=0.01, repeats=3)


def _rel(g, want) -> float:
    g, want = np.atleast_1d(np.asarray(g, np.float64)), np.atleast_1d(np.asarray(want, np.float64))
    scale = np.linalg.norm(want)
    return float(np.linalg.norm(g - want) / (scale if scale > 0 else 1.0))


def _neumann_matrix(H, alpha, terms):
    """α Σ_{j=0}^{terms} (I − αH)^j as a dense NumPy matrix."""
    d = H.shape[0]
    M, term, total = np.eye(d) - alpha * H, np.eye(d), np.eye(d)
    for _ in range(terms):
        term = term @ M
        total = total + term
    return alpha * total


# ------------------------------------------------------------------------------------------
# The two problems, with everything the rows need in NumPy float64.
# ------------------------------------------------------------------------------------------


def ridge_problem(sizes):
    """`RidgePerCoordinate` at log-penalties spread over [−1, 0], with its closed forms."""
    d = sizes["ridge_dim"]
    exact = blt.RidgePerCoordinate.sample(0, dim=d, max_condition=sizes["ridge_condition"],
                                          log_lam=np.linspace(-1.0, 0.0, d))
    X, y, Xv, yv = (np.asarray(a, np.float64) for a in (exact.X, exact.y, exact.Xv, exact.yv))
    lam = np.asarray(exact.hparams, np.float64)
    rho, n = np.exp(lam), X.shape[0]
    H = X.T @ X / n + np.diag(rho)
    w_star = np.linalg.solve(H, X.T @ y / n)
    g_w = Xv.T @ (Xv @ w_star - yv) / Xv.shape[0]          # ∂L_V/∂w at w*
    cross = rho * w_star                                    # ∂(∇_w L_T)/∂λ_i = ρ_i w_i e_i
    eigs = np.linalg.eigvalsh(H)
    eta = 1.0 / eigs[-1]

    def at_end(P):
        """−(∂²L_T/∂w∂λ)ᵀ P ∂L_V/∂w at w* (the forward solve converges to w*)."""
        return -cross * (P @ g_w)

    # The T gradient-descent steps from w = 0 in NumPy, and reverse mode through them by the
    # adjoint recursion: step t's λ-derivative is −η ρ ⊙ w_t, its w-Jacobian M = I − ηH.
    T, c, M = sizes["ridge_steps"], X.T @ y / n, np.eye(d) - eta * H
    ws = [np.zeros(d)]
    for _ in range(T):
        ws.append(ws[-1] - eta * (H @ ws[-1] - c))
    w_T = ws[-1]
    a_T = Xv.T @ (Xv @ w_T - yv) / Xv.shape[0]

    def reverse(points):
        """Σ_t −η ρ ⊙ p_t ⊙ M^{T−1−t} ∂L_V/∂w(w_T), points p_t = w_t (reverse mode) or the line."""
        total, adjoint = np.zeros(d), a_T
        for t in range(T - 1, -1, -1):
            total += -eta * rho * points[t] * adjoint
            adjoint = M @ adjoint
        return total

    unrolled_value = reverse(ws)
    drmad_value = reverse([(t / T) * w_T for t in range(T)])

    def closed_form_solve(log_lam, w0, batch):
        Xb, yb = batch
        Hb = Xb.T @ Xb / Xb.shape[0] + jnp.diag(jnp.exp(log_lam))
        return jnp.linalg.solve(Hb, Xb.T @ yb / Xb.shape[0])

    return dict(
        name="ridge", title=f"RidgePerCoordinate (d = {d} parameters and {d} log-penalties)",
        exact=exact, eta=eta, steps=sizes["ridge_steps"], condition=float(eigs[-1] / eigs[0]),
        ift=exact.hypergrad(exact.hparams), unrolled=unrolled_value, drmad=drmad_value,
        unrolled_name="T-step unrolled (NumPy adjoint recursion)",
        drmad_name="DrMAD's straight-line reverse pass (NumPy recursion)",
        identity=exact.identity_hypergrad(exact.hparams),
        neumann=lambda alpha, terms: at_end(_neumann_matrix(H, alpha, terms)),
        truncated=lambda last: at_end(_neumann_matrix(H, eta, last - 1)),
        ift_at_end=exact.hypergrad(exact.hparams),
        closed_form_solve=closed_form_solve,
        gn_model=lambda w, h, b: (b[0] @ w - b[1]) / jnp.sqrt(b[0].shape[0]),
        forward=f"{sizes['ridge_steps']} steps of gradient descent, optax.sgd(η), η = 1/λ_max(H), from w = 0",
        H=H, w_star=w_star,
    )


def unrolled_problem(sizes):
    """`UnrolledQuadratic` from a random start, T steps short of convergence."""
    d = sizes["uq_dim"]
    exact = blt.UnrolledQuadratic.sample(0, dim=d, steps=sizes["uq_steps"],
                                         max_condition=sizes["uq_condition"], w0_scale=1.0)
    lam = float(exact.hparams)
    Q, a, b, C, e, w0 = (np.asarray(x, np.float64) for x in (exact.Q, exact.a, exact.b, exact.C, exact.e, exact.w0))
    eta, T, rho = float(exact.lr), exact.steps, np.exp(lam)
    h, beta, z0 = a + rho, Q.T @ b, Q.T @ w0
    m = 1.0 - eta * h
    z = lambda t: m**t * z0 + (1 - m**t) * beta / h        # iterate t, eigenbasis
    zT = z(T)
    G = Q.T @ (C.T @ (C @ (Q @ zT) - e))                   # ∂L_V/∂w at w_T, eigenbasis

    def at_end(p):
        """−ρ w_Tᵀ P ∂L_V/∂w(w_T) with P = diag(p) in the eigenbasis (H = Q diag(h) Qᵀ)."""
        return -rho * np.sum(zT * p * G)

    def neumann(alpha, terms):
        r = 1.0 - alpha * h
        return at_end(alpha * sum(r**j for j in range(terms + 1)))

    def truncated(last):
        """Reverse mode through the last `last` steps: Σ_{t=T−L}^{T−1} M^{T−1−t}(−ηρ w_t)."""
        return sum(-eta * rho * np.sum(m ** (T - 1 - t) * z(t) * G) for t in range(T - last, T))

    def closed_form_solve(log_lam, w0_, batch):
        A, bb = batch
        return jnp.linalg.solve(A + jnp.exp(log_lam) * jnp.eye(A.shape[0]), bb)

    sqrt_a, Qj = jnp.sqrt(exact.a), exact.Q
    return dict(
        name="unrolled", title=f"UnrolledQuadratic (d = {d}, one log-penalty, T = {T} steps)",
        exact=exact, eta=eta, steps=T, condition=float(h.max() / h.min()),
        ift=exact.hypergrad(exact.hparams), unrolled=exact.unrolled_hypergrad(exact.hparams),
        drmad=exact.drmad_hypergrad(exact.hparams),
        unrolled_name="T-step unrolled (UnrolledQuadratic.unrolled_hypergrad)",
        drmad_name="DrMAD's straight-line reverse pass (UnrolledQuadratic.drmad_hypergrad)",
        identity=at_end(np.ones_like(h)),
        neumann=neumann, truncated=truncated, ift_at_end=at_end(1.0 / h),
        closed_form_solve=closed_form_solve,
        gn_model=lambda w, hh, bb: sqrt_a * (Qj.T @ w),   # L_T = ½‖A^{1/2}w‖² + (−bᵀw + ½e^λ‖w‖²)
        forward=f"{T} steps of gradient descent, optax.sgd(η), η = 1/(max eig(A) + e^λ), "
                "from a random w0 (not converged)",
    )


# ------------------------------------------------------------------------------------------
# The rows.
# ------------------------------------------------------------------------------------------


def rows(ctx, sizes):
    """(key, approximation, literature, `bilevel` call, method or None, own-formula target,
    its description). The method is built from the problem's forward solve."""
    eta, T = ctx["eta"], ctx["steps"]
    base = bl.unroll(optax.sgd(eta), T)
    K, L = sizes["terms"], sizes["truncate"]
    unrolled = ctx["unrolled"]
    ut = (unrolled, ctx["unrolled_name"])
    end = "w*" if ctx["name"] == "ridge" else "w_T"
    return [
        ("exact_ift", "Exact IFT", "",
         "implicit(solver(closed-form w*), exact())",
         bl.implicit(bl.solver(ctx["closed_form_solve"]), bl.exact()), ctx["ift"], "IFT at w*"),
        ("unroll", "Unrolled differentiation", "Maclaurin et al. 2015",
         "unroll(sgd(η), T)", base, *ut),
        ("truncate", f"L-step truncated unrolled differentiation (L = {L})", "",
         f"truncate(unroll(sgd(η), T), last={L})", bl.truncate(base, last=L), ctx["truncated"](L),
         "reverse mode through the last L iterates (closed form)"),
        ("drmad", "DrMAD", "Fu et al. 2016", "drmad(unroll(sgd(η), T))", bl.drmad(base),
         ctx["drmad"], ctx["drmad_name"]),
        ("forward_mode", "Forward mode / RTRL", "Franceschi et al. 2017",
         "forward_mode(unroll(sgd(η), T))", bl.forward_mode(base), *ut),
        ("clip", "Forward mode with clipping, Clip-r", "Online Hyper-parameter Optimization",
         "forward_mode(unroll(sgd(η), T), clip=r)", "clip", None, None),
        ("larsen", "Gauss-Newton curvature", "Larsen et al. 1996",
         "implicit(unroll(sgd(η), T), exact(), hessian=gauss_newton(model))",
         bl.implicit(base, bl.exact(), hessian=bl.gauss_newton(ctx["gn_model"])), ctx["ift_at_end"],
         f"IFT at {end} (G = H: the model is linear in w)"),
        ("bengio", "IFT at an approximate solution", "Bengio 2000",
         "implicit(unroll(sgd(η), T), exact())", bl.implicit(base, bl.exact()), ctx["ift_at_end"],
         f"IFT at {end}"),
        ("cg", "Conjugate gradient", "HOAG, Pedregosa 2016",
         "implicit(unroll(sgd(η), T), cg(maxiter=1000, tol=1e-12))",
         bl.implicit(base, bl.cg(maxiter=1000, tol=1e-12)), ctx["ift_at_end"], f"IFT at {end}"),
        ("cg_few", f"Conjugate gradient, {sizes['cg_few']} iterations", "HOAG, Pedregosa 2016",
         f"implicit(unroll(sgd(η), T), cg(maxiter={sizes['cg_few']}, tol=0))",
         bl.implicit(base, bl.cg(maxiter=sizes["cg_few"], tol=0.0)), None, None),
        ("gmres", "GMRES (exact solve)", "",
         "implicit(unroll(sgd(η), T), gmres(maxiter=20, tol=1e-12, restart=50))",
         bl.implicit(base, bl.gmres(maxiter=20, tol=1e-12, restart=50)), ctx["ift_at_end"], f"IFT at {end}"),
        ("neumann", f"Neumann series, {K} terms, α = η", "Lorraine et al. 2020",
         f"implicit(unroll(sgd(η), T), neumann(terms={K}, alpha=η))",
         bl.implicit(base, bl.neumann(terms=K, alpha=eta)), ctx["neumann"](eta, K),
         f"α Σ_(j≤{K}) (I − αH)^j at {end}"),
        ("identity", "T1−T2 (H⁻¹ ≈ I)", "Luketina et al. 2016",
         "implicit(unroll(sgd(η), T), identity())", bl.implicit(base, bl.identity()), ctx["identity"],
         f"H⁻¹ ≈ I at {end}"),
        ("per_term", "Stochastic Neumann series (curvature='per_term')", "Lorraine et al. 2020",
         "implicit(unroll(set_to_zero(), S), neumann(K, α), curvature='per_term') on per_step minibatches",
         "per_term", None, None),
        ("hypernet", "Hypernetwork (linear, fitted locally)", "Lorraine & Duvenaud 2018",
         "best_response(linear_hypernet(...)) after hypertrain_global", "hypernet", None, None),
        ("first_order", "First-order MAML", "Finn et al. 2017",
         "first_order(unroll(sgd(η), T))", bl.first_order(base), None, None),
        ("bayes_opt", "Bayesian optimisation", "Shahriari et al. 2016",
         "not implemented: random_search / grid_search", None, None, None),
    ]


# ------------------------------------------------------------------------------------------
# Measurement.
# ------------------------------------------------------------------------------------------


def _paired_times(fn, args, forward, forward_args, repeats):
    """Median seconds of `fn(*args)` and of `forward(*forward_args)`, warmed up and run in
    alternation, and the median of the paired ratios (each hypergradient call divided by the
    forward call just before it, so that load from other processes cancels in the ratio)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(forward(*forward_args))
    t_fn, t_fwd = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(*forward_args))
        t_fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        t_fn.append(time.perf_counter() - t0)
    ratio = float(np.median(np.asarray(t_fn) / np.asarray(t_fwd)))
    return float(np.median(t_fn)), float(np.median(t_fwd)), ratio


def _entry(grad, ctx, target, target_name, times, **extra):
    seconds, forward_seconds, ratio = times
    unrolled = ctx["unrolled"]
    return {
        "grad": np.atleast_1d(np.asarray(grad, np.float64)).tolist(),
        "error_ift": _rel(grad, ctx["ift"]),
        "error_unrolled": None if unrolled is None else _rel(grad, unrolled),
        "error_target": None if target is None else _rel(grad, target),
        "target": target_name,
        "seconds": seconds, "forward_seconds": forward_seconds,
        "cost_ratio": ratio, **extra,
    }


def _clip_row(ctx, base, r, forward, fargs, args, repeats):
    """Clip-r with r = half the norm of the exact Jacobian dw_T/dλ, so the projection acts."""
    hg = jax.jit(bl.hypergrad(ctx["exact"].problem, bl.forward_mode(base, clip=r)))
    out = hg(*args)
    times = _paired_times(hg, args, forward, fargs, repeats)
    return _entry(out.grad, ctx, None, None, times, radius=r,
                  clip_fraction=float(out.stats["clip_fraction"]))


def _per_term_row(ctx, sizes, forward, fargs, repeats):
    """Stochastic Neumann at w*: `terms` Hessian-vector products, term k on minibatch k.

    The forward stays at its start w* (optax.set_to_zero()), so the row isolates the
    per-term sampling error; its mean over independent draws is the full-batch series."""
    exact, S, rows_, K = ctx["exact"], sizes["per_step"], sizes["per_step_rows"], sizes["terms"]
    X, y = np.asarray(exact.X), np.asarray(exact.y)
    n = X.shape[0]
    rng = np.random.default_rng(1)

    def draw():
        idx = np.stack([rng.choice(n, rows_, replace=False) for _ in range(S)])
        return X[idx], y[idx]

    draws = [draw() for _ in range(sizes["draws"])]
    # α below 1/λ_max of every minibatch Hessian, so each factor (I − αH_k) is a contraction.
    top = max(np.linalg.eigvalsh(Xs[k].T @ Xs[k] / rows_ + np.diag(np.exp(np.asarray(exact.hparams))))[-1]
              for Xs, _ in draws for k in range(S))
    alpha = 1.0 / top
    method = bl.implicit(bl.unroll(optax.set_to_zero(), S), bl.neumann(terms=K, alpha=alpha),
                         curvature="per_term")
    hg = jax.jit(bl.hypergrad(exact.problem, method))
    w_star = jnp.asarray(ctx["w_star"])
    one = (exact.hparams, w_star, bl.per_step(tuple(jnp.asarray(a) for a in draws[0])), exact.outer_batch)
    grads = np.stack([np.asarray(hg(exact.hparams, w_star, bl.per_step(tuple(jnp.asarray(a) for a in dr)),
                                    exact.outer_batch).grad) for dr in draws])
    series = ctx["neumann"](alpha, K)
    times = _paired_times(hg, one, forward, fargs, repeats)
    return _entry(grads[0], ctx, series, f"full-batch series α Σ_(j≤{K}) (I − αH)^j at w*, "
                  f"mean of {len(draws)} draws", times,
                  error_target=_rel(grads.mean(0), series), single_draw_error_target=_rel(grads[0], series),
                  series_error_ift=_rel(series, ctx["ift"]), alpha=alpha, minibatch_rows=rows_,
                  minibatches=S, draws=len(draws))


def _hypernet_row(ctx, sizes, forward, fargs, args, repeats):
    """A linear hypernet fitted locally around λ (draws λ + σε) with hypertrain_global."""
    exact = ctx["exact"]
    lam, sigma = exact.hparams, sizes["hypernet_sigma"]
    w_fwd = forward(*fargs)
    net = bl.linear_hypernet(w_fwd, lam, scale=sigma)
    trainer = bl.hypertrain_global(
        exact.problem, optax.adam(optax.exponential_decay(1e-2, sizes["hypernet_steps"], 0.01)),
        lambda k: lam + sigma * jax.random.normal(k, jnp.shape(lam), jnp.result_type(lam)),
        num_samples=sizes["hypernet_samples"])
    state0 = trainer.init(net, lam, w_fwd)

    @jax.jit
    def train(state, key, batch):
        keys = jax.random.split(key, sizes["hypernet_steps"])
        return jax.lax.scan(lambda s, k: trainer.step(s, k, batch), state, keys)

    key = jax.random.key(0)
    jax.block_until_ready(train(state0, key, exact.inner_batch))      # compile
    t0 = time.perf_counter()
    state, _losses = jax.block_until_ready(train(state0, key, exact.inner_batch))
    train_seconds = time.perf_counter() - t0
    hg = jax.jit(bl.hypergrad(exact.problem, bl.best_response(state.hypernet)))
    out = hg(*args)
    times = _paired_times(hg, args, forward, fargs, repeats)
    return _entry(out.grad, ctx, None, None, times, train_seconds=train_seconds,
                  train_ratio=train_seconds / times[1], train_steps=sizes["hypernet_steps"],
                  train_samples=sizes["hypernet_samples"], sigma=sigma,
                  inner_grad_norm=float(out.stats["inner_grad_norm"]))


def measure(ctx, sizes, repeats, log=print):
    exact = ctx["exact"]
    problem, T, eta = exact.problem, ctx["steps"], ctx["eta"]
    base = bl.unroll(optax.sgd(eta), T)
    forward = jax.jit(bl.response(problem, base))
    fargs = (exact.hparams, exact.params0, exact.inner_batch)
    args = (exact.hparams, exact.params0, exact.inner_batch, exact.outer_batch)
    results = {}
    for key, name, paper, call, method, target, target_name in rows(ctx, sizes):
        began = time.perf_counter()
        info = {"approximation": name, "paper": paper, "call": call}
        if method is None:
            info["status"] = "not implemented"
        elif method == "clip":
            r = 0.5 * results["forward_mode"]["jacobian_norm"]
            info.update(_clip_row(ctx, base, r, forward, fargs, args, repeats))
        elif method == "per_term":
            if ctx["name"] != "ridge":
                info["status"] = "n/a: needs minibatches of training rows (per_step data)"
            else:
                info.update(_per_term_row(ctx, sizes, forward, fargs, repeats))
        elif method == "hypernet":
            info.update(_hypernet_row(ctx, sizes, forward, fargs, args, repeats))
        else:
            hg = jax.jit(bl.hypergrad(problem, method))
            try:
                out = hg(*args)
            except TypeError as err:           # first_order refuses a λ inside L_T
                info["status"] = ("refused (TypeError): λ enters L_T, where first-order "
                                  "differentiation would give exactly 0")
                info["message"] = str(err)
                results[key] = info
                log(f"  {key:<13} refused")
                continue
            times = _paired_times(hg, args, forward, fargs, repeats)
            info.update(_entry(out.grad, ctx, target, target_name, times))
            if key == "forward_mode":
                info["jacobian_norm"] = float(out.stats["jacobian_norm"])
        results[key] = info
        if "error_ift" in info:
            tgt = "" if info["error_target"] is None else f"  vs own formula {info['error_target']:.2e}"
            log(f"  {key:<13} vs IFT {info['error_ift']:.2e}{tgt}  cost {info['cost_ratio']:.2f}x  "
                f"({time.perf_counter() - began:.1f} s)", flush=True)
    fsec = float(np.median([r["forward_seconds"] for r in results.values() if "forward_seconds" in r]))
    return {"title": ctx["title"], "forward": ctx["forward"], "steps": T, "eta": eta,
            "hessian_condition": ctx["condition"], "forward_seconds": fsec,
            "ift": np.atleast_1d(np.asarray(ctx["ift"], np.float64)).tolist(),
            "unrolled": np.atleast_1d(np.asarray(ctx["unrolled"], np.float64)).tolist(),
            "rows": results}


# ------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------


def _e(x):
    return "—" if x is None else f"{x:.1e}"


def markdown(result) -> str:
    probs = result["problems"]
    r, u = probs["ridge"], probs["unrolled"]
    lines = [
        (f"Relative hypergradient errors ‖g − g*‖/‖g*‖ and cost ÷ forward solve "
        f"({result['machine']}, {result['dtype']})."), "",
        (f"- **ridge**: {r['title']}; forward: {r['forward']}; κ(H) = {r['hessian_condition']:.1f}; "
        f"forward alone {r['forward_seconds'] * 1e3:.2f} ms."),
        (f"- **unrolled**: {u['title']}; forward: {u['forward']}; κ(H) = {u['hessian_condition']:.1f}; "
        f"forward alone {u['forward_seconds'] * 1e3:.2f} ms."), "",
        ("| approximation | `bilevel` method | ridge: vs IFT | ridge: vs T-step | ridge: vs own formula "
        "| ridge: cost | unrolled: vs IFT | unrolled: vs T-step | unrolled: vs own formula | unrolled: cost |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rr in r["rows"].items():
        uu = u["rows"][key]
        name = rr["approximation"] + (f" ({rr['paper']})" if rr["paper"] else "")
        cells = []
        for info in (rr, uu):
            keys = ("error_ift", "error_unrolled", "error_target")
            if "error_ift" not in info:
                cells += [info["status"].split(" (")[0].split(":")[0]] + ["—"] * len(keys)
                continue
            cells += [_e(info[k]) for k in keys] + [f"{info['cost_ratio']:.2f}×"]
        lines.append(f"| {name} | `{rr['call']}` | " + " | ".join(cells) + " |")
    lines += ["", "Own formulas (targets of the 'vs own formula' columns):", ""]
    for key, rr in r["rows"].items():
        uu = u["rows"][key]
        t = [x for x in (rr.get("target") and f"ridge: {rr['target']}", uu.get("target") and f"unrolled: {uu['target']}") if x]
        if t:
            lines.append(f"- {rr['approximation']}: " + "; ".join(t))
    notes = []
    for name, p in probs.items():
        rows_ = p["rows"]
        if "radius" in rows_["clip"]:
            notes.append(f"Clip-r on {name}: r = {rows_['clip']['radius']:.3g} (half of ‖dw_T/dλ‖), "
                         f"clipped at {rows_['clip']['clip_fraction']:.0%} of the steps.")
        if "train_seconds" in rows_["hypernet"]:
            h = rows_["hypernet"]
            notes.append(f"Hypernet on {name}: {h['train_steps']} Adam steps of {h['train_samples']} draws "
                         f"λ + {h['sigma']}·ε took {h['train_seconds']:.2f} s = {h['train_ratio']:.0f}× the forward "
                         f"solve (not in the cost column, which is one call of the fitted hypernet).")
        if "alpha" in rows_["per_term"]:
            s = rows_["per_term"]
            notes.append(f"Stochastic Neumann on {name}: {s['minibatches']} minibatches of {s['minibatch_rows']} "
                         f"rows, α = {s['alpha']:.3g} (below 1/λ_max of every minibatch Hessian), started at w*; "
                         f"the full-batch series at this α is {s['series_error_ift']:.1e} from the IFT; one draw is "
                         f"{s['single_draw_error_target']:.1e} from the full-batch series, the mean of "
                         f"{s['draws']} draws {s['error_target']:.1e}.")
        if "status" in rows_["first_order"]:
            notes.append(f"First-order MAML on {name}: {rows_['first_order']['status']}.")
    lines += ["", *("- " + n for n in notes)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "approximations")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; the test's setting)")
    parser.add_argument("--x64", action=argparse.BooleanOptionalAction, default=True,
                        help="float64 (default on; --no-x64 for float32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", args.x64)
    sizes = dict(QUICK if args.quick else FULL)
    repeats = args.repeats or sizes["repeats"]
    result = {"machine": f"{platform.machine()}, {jax.devices()[0].platform.upper()}, "
                         f"{len(__import__('os').sched_getaffinity(0))} cores",
              "dtype": "float64" if args.x64 else "float32", "jax": jax.__version__,
              "quick": args.quick, "sizes": sizes, "repeats": repeats, "problems": {}}
    t0 = time.perf_counter()
    for build in (ridge_problem, unrolled_problem):
        ctx = build(sizes)
        print(ctx["title"], flush=True)
        result["problems"][ctx["name"]] = measure(ctx, sizes, repeats)
    result["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "approximations.json").write_text(json.dumps(result, indent=1))
    (args.out / "approximations.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
