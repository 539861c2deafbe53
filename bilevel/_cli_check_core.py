"""`bilevel check` rows for DrMAD and Gauss-Newton curvature, each against its closed form."""

from __future__ import annotations


def _rel(value: float, target: float) -> float:
    return abs(value - target) / abs(target) if target else abs(value)


def check_rows(x64: bool) -> list[dict]:
    """DrMAD on `UnrolledQuadratic` (exact against its straight-line closed form, and its error
    against the exact unrolled value); Gauss-Newton on zero-residual nonlinear least squares."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import bilevel as bl
    import bilevel.testing as blt

    dtype = jnp.float64 if x64 else jnp.float32
    exact = blt.UnrolledQuadratic.sample(0, dim=6, steps=100, dtype=dtype)
    h = exact.hparams
    out = jax.jit(bl.hypergrad(exact.problem, bl.drmad(bl.unroll(optax.sgd(exact.lr), steps=exact.steps))))(
        h, exact.params0, exact.inner_batch, exact.outer_batch)
    value, straight, unrolled = float(out.grad), float(exact.drmad_hypergrad(h)), float(exact.unrolled_hypergrad(h))
    rows = [
        dict(name="drmad vs its straight-line closed form", value=value, target=straight,
             rel_error=_rel(value, straight), exact=True, note="UnrolledQuadratic, 100 GD steps"),
        dict(name="drmad vs the exact unrolled hypergradient", value=value, target=unrolled,
             rel_error=_rel(value, unrolled), exact=False, note="the price of the straight-line path"),
    ]
    rng = np.random.default_rng(0)
    C = jnp.asarray(rng.normal(size=(4, 4)) / 4, dtype)
    w_star = jnp.asarray(rng.normal(size=4), dtype)
    model = lambda w: w + 0.5 * jnp.tanh(C @ w)  # noqa: E731
    lam = model(w_star)                          # zero residual at w*: Gauss-Newton is exact
    problem = bl.Problem(inner=lambda w, l, b: 0.5 * jnp.sum((model(w) - l) ** 2),
                         outer=lambda w, l, b: 0.5 * jnp.sum((w - 1.0) ** 2))
    method = bl.implicit(bl.solver(lambda l, w0, b: w0), bl.exact(),
                         hessian=bl.gauss_newton(lambda w, l, b: model(w) - l))
    grad = jax.jit(bl.hypergrad(problem, method))(lam, w_star, None, None).grad
    J = np.asarray(jax.jacfwd(model)(w_star), np.float64)
    target = np.linalg.solve(J.T, np.asarray(w_star, np.float64) - 1.0)
    err = float(np.linalg.norm(np.asarray(grad, np.float64) - target) / np.linalg.norm(target))
    rows.append(dict(name="gauss-newton, zero-residual least squares", value=float(np.linalg.norm(grad)),
                     target=float(np.linalg.norm(target)), rel_error=err, exact=True,
                     note="vs J⁻ᵀ∂L_V/∂w (norms shown)"))
    return rows
