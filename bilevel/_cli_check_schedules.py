"""`bilevel check` rows for learning-rate and momentum schedules (Maclaurin et al. 2015): the
unrolled hypergradient of `scheduled_sgd` against the adjoint recursion of
`bilevel.testing.QuadraticSchedule` (NumPy float64, no autodiff)."""

from __future__ import annotations


def check_rows(x64: bool) -> list[dict]:
    """Compare the library's schedule hypergradients with the closed form on a small quadratic.

    Runs `bilevel.hypergrad(exact.problem, exact.method())` (unroll of `scheduled_sgd`) on a
    `QuadraticSchedule` with 4 weights and 20 steps, with and without a momentum schedule, in
    float64 when `x64` (which switches JAX's 64-bit mode on) and float32 otherwise.

    **Arguments:**

    - `x64`: compute in float64 (True) or float32 (False).

    **Returns:**

    One dict per row, `{"name", "value", "target", "rel_error", "exact", "note"}`: `value`
    is the norm of the library's hypergradient with respect to one schedule, `target` the
    norm of the closed form, and `rel_error` the relative error of the whole vector,
    `‖g − g_exact‖ / ‖g_exact‖` (all exact methods: `exact` is True).
    """
    if not isinstance(x64, bool):
        raise TypeError(f"check_rows(x64) requires x64 to be True or False; got {x64!r}.")
    import jax

    if x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    import bilevel as bl
    from bilevel.testing._schedules import QuadraticSchedule

    dtype = jnp.float64 if x64 else jnp.float32
    rows = []
    for momentum in (False, True):
        exact = QuadraticSchedule.sample(0, dim=4, steps=20, momentum=momentum, dtype=dtype)
        hg = jax.jit(bl.hypergrad(exact.problem, exact.method()))
        out = hg(exact.hparams, exact.params0, exact.inner_batch, exact.outer_batch)
        want = exact.hypergrad(exact.hparams)
        for key, target in want.items():
            got = np.asarray(out.grad[key], np.float64)
            err = float(np.linalg.norm(got - target) / np.linalg.norm(target))
            label, plural = (("momentum", "momenta") if key == "momentum"
                             else ("learning rate", "learning rates"))
            rows.append({
                "name": f"scheduled_sgd {'with' if momentum else 'without'} momentum: ∂/∂{label} schedule",
                "value": float(np.linalg.norm(got)),
                "target": float(np.linalg.norm(target)),
                "rel_error": err,
                "exact": True,
                "note": (f"‖hypergradient‖ over the 20 per-step {plural} vs the adjoint recursion "
                         "(Maclaurin et al. 2015) in NumPy float64; rel_error of the whole vector"),
            })
    return rows
