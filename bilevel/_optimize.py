"""The outer loop: an optax optimizer on the hyperparameters, driven by a method's hypergradient.

`hyperopt(...)` is the loop as a pure `init`/`step` pair (scan it, vmap it); `optimize(...)`
steps it from Python with a history, a progress bar, checkpoints and resume.
"""

from __future__ import annotations

import collections
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checkpoint as ckpt
from ._base import AbstractMethod, tree_norm
from ._compile import _check_problem_method, hypergrad
from ._implicit import Implicit
from ._problem import Problem, check_hparams, refuse_start, tree_summary

PyTree = Any


class HyperOptState(NamedTuple):
    """The state of the outer loop (a pytree: scan it, vmap it, checkpoint it).

    **Fields:**

    - `variables`: what the outer optimizer moves, u; the problem sees `transform(u)`
      (u is the hyperparameters themselves when there is no transform).
    - `opt_state`: the outer optimizer's state.
    - `params`: the inner parameters the next inner solve starts from (the last solution
      under warm start, else `params0`).
    - `step`: the number of outer steps taken, an int32 scalar.
    - `adjoint`: with `warm_start_solve`, the last backward linear solve's solution (the
      next solve starts from it); `None` otherwise.
    """

    variables: PyTree
    opt_state: PyTree
    params: PyTree
    step: jax.Array
    adjoint: PyTree = None


class HyperOptInfo(NamedTuple):
    """What one outer step reports.

    **Fields:**

    - `value`: the validation loss at this step's hyperparameters (before the update).
    - `grad_norm`: ‖dL_V/du‖, the norm of the hypergradient the optimizer received.
    - `hparams`: the hyperparameters evaluated at this step, `transform(u)`.
    - `stats`: the method's diagnostics (`bilevel.HypergradResult.stats`).
    """

    value: jax.Array
    grad_norm: jax.Array
    hparams: PyTree
    stats: dict


def _identity(u):
    return u


def _strong(x):
    """`x` as an array without JAX's weak type, so the state's types never drift between steps."""
    return jnp.asarray(x, dtype=jnp.result_type(x)) if eqx.is_array_like(x) else x


def _like(new, old):
    """`new` with `old`'s dtype (a scan carry, and a jit cache key, must keep its types)."""
    return jnp.asarray(new, dtype=old.dtype) if eqx.is_array(old) else new


class HyperOpt(eqx.Module):
    """The outer loop as an `init`/`step` pair. See `bilevel.hyperopt`."""

    problem: Problem = eqx.field(static=True)
    method: AbstractMethod
    outer_optimizer: optax.GradientTransformation = eqx.field(static=True)
    transform: Callable = eqx.field(static=True)
    warm_start: bool = eqx.field(static=True)
    warm_start_solve: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        where = "hyperopt(problem, method, outer_optimizer, ...)"
        _check_problem_method(self.problem, self.method, where)
        refuse_start(self.problem, where)
        if not isinstance(self.outer_optimizer, optax.GradientTransformation):
            raise TypeError(
                f"{where} requires `outer_optimizer` to be an optax.GradientTransformation for the "
                f"hyperparameters, e.g. optax.adam(0.05); got {type(self.outer_optimizer).__name__}."
            )
        if not callable(self.transform):
            raise TypeError(
                f"{where} requires `transform` to be None or a function from the optimizer's "
                f"variables to the hyperparameters, e.g. jnp.exp; got {self.transform!r}."
            )
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"{where} requires `warm_start` to be True or False; got {self.warm_start!r}.")
        if not isinstance(self.warm_start_solve, bool):
            raise TypeError(
                f"{where} requires `warm_start_solve` to be True or False; got {self.warm_start_solve!r}.")
        if self.warm_start_solve and not isinstance(self.method, Implicit):
            raise ValueError(
                f"{where}: warm_start_solve=True carries the backward linear solve's solution "
                f"between outer steps, which only bilevel.implicit(...) has; got "
                f"{type(self.method).__name__}. Drop warm_start_solve for this method."
            )

    def init(self, hparams0, params0) -> HyperOptState:
        """The state at outer step 0.

        **Arguments:**

        - `hparams0`: the starting variables u₀ of the outer optimizer (the hyperparameters
          themselves when there is no `transform`; e.g. log-penalties with `transform=jnp.exp`).
        - `params0`: the inner parameters the first inner solve starts from.

        **Returns:**

        A `HyperOptState`.
        """
        check_hparams(hparams0, "HyperOpt.init(hparams0, params0)")
        self._check_transform(hparams0)
        adjoint = None
        if self.warm_start_solve:   # the first solve starts from zero (the zero tree of params0's arrays)
            adjoint = jax.tree_util.tree_map(
                jnp.zeros_like, eqx.filter(params0, eqx.is_inexact_array))
        state = HyperOptState(hparams0, self.outer_optimizer.init(hparams0), params0,
                              jnp.zeros((), jnp.int32), adjoint)
        return jax.tree_util.tree_map(_strong, state)

    def _check_transform(self, variables) -> None:
        try:
            out = jax.eval_shape(self.transform, variables)
        except Exception as err:
            raise TypeError(
                f"hyperopt's transform failed on the variables {tree_summary(variables)}: {err}. "
                "It must map the optimizer's variables to the hyperparameters the losses take."
            ) from err
        check_hparams(out, "hyperopt's transform output (the hyperparameters)")

    def step(self, state: HyperOptState, inner_batch, outer_batch) -> tuple[HyperOptState, HyperOptInfo]:
        """One outer step: a hypergradient at `transform(u)`, then the optimizer's update of u.

        **Arguments:**

        - `state`: a `HyperOptState` from `init` or a previous `step`.
        - `inner_batch`: the inner data for this step's solve (one batch,
          `bilevel.per_step(stacked)`, or `None`).
        - `outer_batch`: the validation batch (or `None`).

        **Returns:**

        `(state, info)`: the next `HyperOptState` and a `HyperOptInfo`.
        """
        if not isinstance(state, HyperOptState):
            raise TypeError(
                "HyperOpt.step(state, inner_batch, outer_batch) requires the HyperOptState returned "
                f"by HyperOpt.init or HyperOpt.step; got {type(state).__name__}."
            )
        hparams, pull = jax.vjp(self.transform, state.variables)
        out = hypergrad(self.problem, self.method)(hparams, state.params, inner_batch, outer_batch,
                                                   adjoint0=state.adjoint)
        (grad,) = pull(out.grad)
        updates, opt_state = self.outer_optimizer.update(grad, state.opt_state, state.variables)
        variables = optax.apply_updates(state.variables, updates)
        params = out.params if self.warm_start else state.params
        info = HyperOptInfo(out.value, tree_norm(grad), hparams, out.stats)
        adjoint = out.adjoint if self.warm_start_solve else None
        new = HyperOptState(variables, opt_state, params, state.step + 1, adjoint)
        return jax.tree_util.tree_map(_like, new, state), info


def hyperopt(
    problem: Problem,
    method: AbstractMethod,
    outer_optimizer: optax.GradientTransformation,
    *,
    transform: Callable | None = None,
    warm_start: bool = True,
    warm_start_solve: bool = False,
) -> HyperOpt:
    """The outer loop of hyperparameter optimisation as a pure `init`/`step` pair (optax style).

    Each `step` computes the method's hypergradient at `transform(u)`, pulls it back to the
    optimizer's variables u, and applies one `outer_optimizer` update. With `warm_start`, the
    inner parameters reached at one outer step start the next inner solve. Everything is a
    pure function of a `HyperOptState`, so a whole run can be one `jax.lax.scan` and a
    population of runs one `jax.vmap`. `bilevel.optimize` steps the same pair from Python.

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `method`: a method (`bilevel.unroll`, `bilevel.implicit(...)`, `bilevel.forward_mode(...)`, ...).
    - `outer_optimizer`: an optax optimizer for the hyperparameters, e.g. `optax.adam(0.05)`.
    - `transform`: optional function u -> hyperparameters, e.g. `jnp.exp` to optimise
      penalties in log space; the default is the identity.
    - `warm_start`: start each inner solve from the previous one's parameters (default True).
    - `warm_start_solve`: for `bilevel.implicit`, start each backward linear solve from the
      previous outer step's solution, carried in `state.adjoint` (default False). As λ moves
      little between outer steps, CG and GMRES then reach their tolerance in far fewer
      iterations; `neumann(terms=k)` continues its Richardson iteration, so its result
      approaches the exact solve over the run. `stats["solve_residual"]` reports each
      solve's accuracy either way.

    **Returns:**

    A `HyperOpt` with `init(hparams0, params0)` and `step(state, inner_batch, outer_batch)`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    method = bl.implicit(bl.unroll(optax.sgd(0.5), steps=20), bl.cg(maxiter=10))
    driver = bl.hyperopt(problem, method, optax.adam(0.1), transform=jnp.exp)
    state = driver.init(jnp.asarray(-1.0), jnp.zeros(3))          # u = log λ
    state, infos = jax.lax.scan(lambda s, _: driver.step(s, None, None), state, None, length=100)
    print(jnp.exp(state.variables))                                # → 1.0, where w* = 0.5
    ```
    """
    transform = _identity if transform is None else transform
    return HyperOpt(problem, method, outer_optimizer, transform, warm_start, warm_start_solve)


class History:
    """The per-step record of a `bilevel.optimize` run: named columns of equal length.

    Columns: `step`, `value`, `grad_norm`, `wall_time` (seconds of that step, compile
    included on the first), one `stats.<name>` column per method diagnostic, and either
    `hparams` (each step's hyperparameters, flattened) or, for many hyperparameters,
    `hparams.mean`, `hparams.min`, `hparams.max`, `hparams.norm`.
    Index it by column name for a NumPy array (`history["value"]`); `columns` holds the same
    values as lists of plain Python floats and ints, and `row(i)` one step's values. `save(path)`
    writes `.json` or `.npz`; `History.load(path)` reads either back.
    """

    def __init__(self, columns: dict | None = None):
        self.columns = {k: list(np.asarray(v).tolist()) for k, v in (columns or {}).items()}

    def append(self, row: dict) -> None:
        """Add one step's values (scalars, or a flat list for `hparams`), as plain Python numbers."""
        for key, value in row.items():
            self.columns.setdefault(key, []).append(_plain(value))

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self.columns[key])

    def row(self, index: int) -> dict:
        """Step `index`'s values by column name (plain Python numbers; negative indices count back)."""
        return {key: column[index] for key, column in self.columns.items()}

    def keys(self):
        """The column names."""
        return self.columns.keys()

    def __len__(self) -> int:
        return len(self.columns.get("step", []))

    def __repr__(self) -> str:
        return f"History({len(self)} steps; columns {', '.join(self.columns)})"

    def save(self, path) -> Path:
        """Write the history to `path`: JSON for a `.json` suffix, NumPy's `.npz` otherwise."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.columns))
        else:
            np.savez(path, **{k: np.asarray(v) for k, v in self.columns.items()})
        return path

    @classmethod
    def load(cls, path) -> "History":
        """Read a history written by `save`."""
        path = Path(path)
        if path.suffix == ".json":
            return cls(json.loads(path.read_text()))
        with np.load(path) as data:
            return cls({k: data[k] for k in data.files})


class OptimizeResult(NamedTuple):
    """What `bilevel.optimize` returns.

    **Fields:**

    - `hparams`: the final hyperparameters, `transform(u)`.
    - `state`: the final `HyperOptState` (its `variables` are u; its `params` the last inner solution).
    - `history`: a `History` of every step, including steps run before a resume.
    """

    hparams: PyTree
    state: HyperOptState
    history: History


class OptimizeError(RuntimeError):
    """`bilevel.optimize` stopped at a step that failed (see its `on_failure` argument).

    **Attributes:**

    - `step`: the failed outer step (as in `history["step"]`).
    - `failures`: what failed at that step, one line each.
    - `result`: an `OptimizeResult` holding the state and history before that step.
    - `checkpoint`: the manifest of the newest checkpoint on disk (the state before the failed
      step when `checkpoint_dir` was given), or None.
    """

    def __init__(self, message: str, step: int, failures: list[str], result, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.failures, self.result, self.checkpoint = step, failures, result, checkpoint


class OptimizeWarning(RuntimeWarning):
    """A `bilevel.optimize` run whose hypergradients look unreliable: a failed step under
    `on_failure="warn"`, a linear solve that stays inexact, a Hessian with negative curvature."""


@eqx.filter_jit
def _jit_step(driver: HyperOpt, state, inner_batch, outer_batch):
    return driver.step(state, inner_batch, outer_batch)


@eqx.filter_jit
def _jit_transform(driver: HyperOpt, variables):
    return driver.transform(variables)


_SHARED: collections.OrderedDict = collections.OrderedDict()   # description hash -> PyTreeDef
_SHARED_SIZE = 16


def _shared(driver: HyperOpt) -> HyperOpt:
    """`driver` rebuilt on the static parts of an earlier driver described identically.

    `eqx.filter_jit` keys its cache on the static parts by identity, and `optax.adam(0.1)`
    builds new functions at every call; reusing an identical earlier driver's static parts
    lets a second `optimize` call reuse the compiled step. Only exact descriptions are
    shared (`_checkpoint.describe_exact`): anything that can only be named keeps its identity.
    """
    text = ckpt.describe_exact(eqx.filter(driver, eqx.is_array, inverse=True))
    if text is None:
        return driver
    key = hashlib.sha256(text.encode()).hexdigest()
    leaves = jax.tree_util.tree_leaves(driver)
    treedef = _SHARED.pop(key, None)
    if treedef is None or treedef.num_leaves != len(leaves):
        treedef = jax.tree_util.tree_structure(driver)
    _SHARED[key] = treedef
    while len(_SHARED) > _SHARED_SIZE:
        _SHARED.popitem(last=False)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _batch(data, step: int):
    return data(step) if callable(data) else data


def _plain(value):
    """`value` as plain Python numbers (a NumPy or JAX scalar prints as `np.float64(...)`)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value).tolist()
    return value


def _row(step: int, info: HyperOptInfo, seconds: float, full_hparams: bool) -> dict:
    """One history row from a step's `info`, already on the host."""
    row = {"step": step, "value": float(info.value), "grad_norm": float(info.grad_norm), "wall_time": seconds}
    for name, stat in info.stats.items():
        row[f"stats.{name}"] = float(np.linalg.norm(np.ravel(np.asarray(stat)).astype(float)))
    flat = np.concatenate([np.ravel(np.asarray(x, dtype=float)) for x in jax.tree_util.tree_leaves(info.hparams)])
    if full_hparams:
        row["hparams"] = flat.tolist()
    else:
        row.update({"hparams.mean": float(flat.mean()), "hparams.min": float(flat.min()),
                    "hparams.max": float(flat.max()), "hparams.norm": float(np.linalg.norm(flat))})
    return row


_FIXES = {
    "value": "Check the data and the losses for NaN or inf, and whether the inner solve diverged "
             "(stats.inner_grad_norm; a lower inner learning rate helps).",
    "hypergradient": "Check the data for NaN or inf, and whether the inner solve or the linear solve "
                     "diverged (stats.inner_grad_norm, stats.solve_residual); a lower outer learning "
                     "rate or optax.clip_by_global_norm guards against one huge outer step.",
    "neumann_diverged": "The Neumann series α Σ (I − αH)^j converges only when 0 < α < 2/λ_max(H) "
                        "and H is positive definite: lower bilevel.neumann's `alpha`, or use "
                        "bilevel.cg (or bilevel.gmres for an indefinite Hessian).",
    "diverged": "The method reports that one of its iterations diverged: check its settings "
                "(step sizes, iteration counts) against its documentation.",
    "stats": "The method's diagnostics are not finite: the inner or the linear solve broke down; "
             "check the data for NaN or inf and lower the inner learning rate.",
    "hparams": "The outer optimizer stepped to non-finite hyperparameters: lower its learning rate "
               "or clip its updates (optax.clip_by_global_norm).",
}


def _finite(x) -> bool:
    return bool(np.all(np.isfinite(np.asarray(x))))


def _failures(info: HyperOptInfo, variables) -> list[tuple[str, str, str]]:
    """`(check, what failed, how to fix it)` for each check that a step (its host `info`) fails,
    a solver's own divergence flag first: the NaNs that follow it are its consequences."""
    stats = {name: np.asarray(stat) for name, stat in sorted(info.stats.items())}
    out = [(name, f"stats['{name}'] is True", _FIXES.get(name, _FIXES["diverged"]))
           for name, stat in stats.items() if stat.dtype == bool and name.endswith("_diverged") and stat.any()]
    if not _finite(info.value):
        out.append(("value", f"the validation loss (value) is {float(info.value)}", _FIXES["value"]))
    if not _finite(info.grad_norm):
        out.append(("grad_norm", f"the hypergradient is not finite (grad_norm = {float(info.grad_norm)})",
                    _FIXES["hypergradient"]))
    out += [(name, f"stats['{name}'] = {stat.tolist()} is not finite", _FIXES["stats"])
            for name, stat in stats.items() if stat.dtype != bool and not _finite(stat)]
    if not all(_finite(x) for x in jax.tree_util.tree_leaves(variables)):
        out.append(("variables", "the outer update made the optimizer's variables non-finite",
                    _FIXES["hparams"]))
    return out


class _Monitor:
    """The failure policy's warnings and the warnings about inexact solves, each once per run."""

    def __init__(self, on_failure: str, residual_warning: float | None, min_steps: int):
        self.on_failure, self.threshold, self.min_steps = on_failure, residual_warning, min_steps
        self.residuals: list[float] = []
        self.warned: set[str] = set()

    def messages(self, k: int, info: HyperOptInfo, failures: list[tuple[str, str, str]]) -> list[str]:
        """The warnings step `k` raises, each kind only the first time."""
        out = []
        new = [f for f in failures if f"failure {f[0]}" not in self.warned]
        if self.on_failure == "warn" and new:
            self.warned.update(f"failure {check}" for check, _, _ in new)
            out.append(f"bilevel.optimize: at step {k}, {_describe_failures(new)} The run carries "
                       "on (on_failure='warn'); later steps that fail the same way are recorded in "
                       "the history without another warning.")
        curvature = [n for n, v in info.stats.items() if n.endswith("_negative_curvature") and np.any(v)]
        for name in curvature:
            out += self._once(name, (
                f"bilevel.optimize: at step {k}, stats['{name}'] is True: conjugate gradients met a "
                "direction with pᵀHp ≤ 0, so the Hessian of the inner loss at the inner solution is "
                "not positive definite (the inner solve has not reached a minimum, or the inner loss "
                "is not convex there) and CG's answer is unreliable. Converge the inner solve "
                "further, or use bilevel.gmres (or bilevel.exact on a small problem), which solve "
                "indefinite systems."))
        if self.threshold is not None and "solve_residual" in info.stats:
            out += self._residual(k, float(np.max(np.asarray(info.stats["solve_residual"]))))
        return out

    def _residual(self, k: int, residual: float) -> list[str]:
        self.residuals.append(residual)
        n, high = len(self.residuals), sum(r > self.threshold for r in self.residuals)
        if n < self.min_steps or 2 * high <= n or residual <= self.threshold:
            return []
        return self._once("solve_residual", (
            f"bilevel.optimize: stats['solve_residual'] (‖Hx − b‖/‖b‖ of the implicit backward "
            f"solve) is {residual:.3g} at step {k}, above residual_warning={self.threshold:g} in "
            f"{high} of the {n} steps so far, so the hypergradients are only approximate. Give the "
            "linear solver more iterations (e.g. bilevel.cg(maxiter=...)), converge the inner solve "
            "better (more inner steps, so that ∇_w L_T ≈ 0 where the Hessian is taken), or use "
            "bilevel.gmres if the Hessian is indefinite. If the approximation is deliberate "
            "(bilevel.identity, a short Neumann series), pass residual_warning=None."))

    def _once(self, kind: str, message: str) -> list[str]:
        if kind in self.warned:
            return []
        self.warned.add(kind)
        return [message]


def _describe_failures(failures) -> str:
    """What failed, then how to fix the first failure (the likeliest cause of the others)."""
    return "; ".join(what for _, what, _ in failures) + ". " + failures[0][2]


def _failure_error(k: int, failures, result: OptimizeResult, checkpoint: Path | None) -> OptimizeError:
    whats = [what for _, what, _ in failures]
    kept = (f"OptimizeError.result holds the state and history of steps 0-{k - 1}" if k else
            "No step had succeeded; OptimizeError.result holds the starting state")
    saved = (f"; the last good checkpoint is {checkpoint} (resume=True continues from it)"
             if checkpoint is not None else "")
    message = (f"bilevel.optimize stopped at step {k}: {_describe_failures(failures)} {kept}{saved}. "
               "Pass on_failure='warn' (or 'continue') to carry on regardless.")
    return OptimizeError(message, k, whats, result, checkpoint)


def _check_int(value, name: str, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(
            f"optimize(...) requires `{name}` to be an int >= {minimum}"
            f"{' or None' if allow_none else ''}; got {value!r}."
        )


def _prepare_dir(directory, resume: bool) -> Path:
    try:
        path = ckpt.writable_dir(directory)
    except OSError as err:
        raise OSError(
            f"optimize(...) cannot write checkpoints to {str(directory)!r}: {err}. Pass a "
            "checkpoint_dir you can write to (or checkpoint_dir=None for no checkpoints)."
        ) from err
    if not resume and ckpt.checkpoint_steps(path):
        raise FileExistsError(
            f"optimize(...) found checkpoints of an earlier run in {str(path)!r} and resume=False. "
            "Pass resume=True to continue that run, or a new checkpoint_dir to start another."
        )
    return path


def _fingerprint(driver: HyperOpt, state: HyperOptState, user: str) -> dict:
    parts = {
        "problem": ckpt.describe(driver.problem),
        "method": ckpt.describe(driver.method),
        "outer_optimizer": ckpt.describe(driver.outer_optimizer),
        "transform": ckpt.describe(driver.transform),
        "warm_start": repr(driver.warm_start),
        "warm_start_solve": repr(driver.warm_start_solve),
        "initial values": ckpt.describe((state.variables, state.params)),
        "state layout": ckpt.layout(state),
        "fingerprint": user,
    }
    return ckpt.fingerprint(parts)


def _user_fingerprint(value) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(
            "optimize(...) requires `fingerprint` to be None or a JSON value (a str, number, bool, "
            "or a list or dict of them) naming what the run depends on beyond its arguments, e.g. "
            f"fingerprint='train.csv v3'; got {type(value).__name__} {value!r} ({err})."
        ) from err


def _check_policy(on_failure, residual_warning) -> None:
    if on_failure not in ("raise", "warn", "continue"):
        raise ValueError(
            "optimize(...) requires `on_failure` to be 'raise' (stop at a failed step), 'warn' "
            f"(warn and carry on) or 'continue' (carry on silently); got {on_failure!r}."
        )
    number = isinstance(residual_warning, (int, float, np.floating)) and not isinstance(residual_warning, bool)
    if residual_warning is not None and not (number and residual_warning > 0):
        raise ValueError(
            "optimize(...) requires `residual_warning` to be a relative residual > 0 (e.g. 0.1) or "
            f"None to switch the warning off; got {residual_warning!r}."
        )


def _progress(steps: int, start: int, progress: bool | None):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc="bilevel.optimize", unit="step")


def optimize(
    problem: Problem,
    method: AbstractMethod,
    outer_optimizer: optax.GradientTransformation,
    hparams0: PyTree,
    params0: PyTree,
    inner_data,
    outer_data,
    steps: int,
    *,
    transform: Callable | None = None,
    warm_start: bool = True,
    warm_start_solve: bool = False,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    keep: int | None = 3,
    resume: bool = False,
    progress: bool | None = None,
    record_hparams: str = "auto",
    callback: Callable | None = None,
    on_failure: str = "raise",
    residual_warning: float | None = 0.1,
    fingerprint=None,
) -> OptimizeResult:
    """Run hyperparameter optimisation: `steps` outer steps of `bilevel.hyperopt`, from Python.

    Each step is one compiled call, compiled once: new hyperparameter values never recompile,
    and neither does a second call with the same problem and an identically built method and
    optimizer (a fresh `optax.adam(0.1)` included). The loop records a `History`, shows a
    progress bar on a terminal, and with `checkpoint_dir` saves the state and history every
    `checkpoint_every` steps (and when interrupted with Ctrl-C). `resume=True` continues from
    the newest checkpoint, and the resumed run ends with exactly the hyperparameters an
    uninterrupted run would reach.

    **Failed steps.** A step fails when its validation loss, its hypergradient, a diagnostic in
    `stats` or the updated hyperparameters are not finite, or when a `stats` flag named
    `*_diverged` is set (e.g. `neumann_diverged`). By default the run then stops with an
    `OptimizeError` that names the step and what failed; the failed step's state is neither
    kept nor saved (`error.result` holds the state before it, and with `checkpoint_dir` that
    state is the newest checkpoint). Separately, an `OptimizeWarning` is issued, once per run,
    when the implicit backward solve's `stats["solve_residual"]` is above `residual_warning`
    in more than half of the steps so far (checked from the fifth step of the call on, or
    from its last in a shorter run), and when conjugate gradients meets negative curvature
    (`stats["solve_negative_curvature"]`).

    **Resume checks.** A checkpoint is refused, with an error naming what differs, when it was
    written by a different run or was damaged or edited. The run's fingerprint covers: the
    losses' code, constants, defaults and closures, the names they use (`jnp.sin` is not
    `jnp.cos`) and, for functions of your own code (not of an installed library), the module
    globals they read: numbers, strings and arrays by value, helper functions and classes
    recursively; the method and both optimizers with their settings; the transform,
    `warm_start`, `hparams0`, `params0` and the state's layout; and `fingerprint`. It cannot
    see data read from files, objects of arbitrary classes beyond their type, or what an
    installed library's functions read: name those in `fingerprint`. The history stored in a
    checkpoint is covered by a SHA-256, so an edited history is refused too.

    **Arguments:**

    - `problem`: a `bilevel.Problem`.
    - `method`: a method (`bilevel.unroll`, `bilevel.implicit(...)`, ...).
    - `outer_optimizer`: an optax optimizer for the hyperparameters.
    - `hparams0`: the starting variables u₀ (the hyperparameters, or their pre-image under `transform`).
    - `params0`: the inner parameters the first inner solve starts from.
    - `inner_data`, `outer_data`: a batch (or `None`) used at every outer step, or a function
      `step -> batch` (e.g. a fresh minibatch per outer step; it must depend only on the
      step, so that a resumed run sees the same data).
    - `steps`: the total number of outer steps, an int >= 1 (a resumed run stops here too).
    - `transform`: optional u -> hyperparameters, e.g. `jnp.exp` for log-space penalties.
    - `warm_start`: start each inner solve from the previous solution (default True).
    - `warm_start_solve`: for `bilevel.implicit`, start each backward linear solve from the
      previous step's solution (see `bilevel.hyperopt`; default False).
    - `checkpoint_dir`: a directory for checkpoints, or `None` for none.
    - `checkpoint_every`: save every this many steps (and at the end).
    - `keep`: how many checkpoints to keep (the newest), or `None` for all.
    - `resume`: continue from the newest checkpoint in `checkpoint_dir` (starts from step 0
      when there is none). Without it, a directory holding checkpoints is an error.
    - `progress`: show a progress bar; default: only when stderr is a terminal.
    - `record_hparams`: `"all"` (each step's hyperparameters, flattened), `"summary"` (mean,
      min, max, norm) or `"auto"` (all up to 100 scalars, else the summary).
    - `callback`: optional `callback(step, state, info)` called after each step (a return
      value of `False` stops the run early).
    - `on_failure`: what a failed step does: `"raise"` (default) stops with an
      `OptimizeError`; `"warn"` issues an `OptimizeWarning` (once for each kind of failure)
      and carries on; `"continue"` carries on silently. Either way the history records the
      failed steps' values.
    - `residual_warning`: warn when the relative residual of the implicit backward solve stays
      above this (default 0.1); `None` switches the warning off.
    - `fingerprint`: optional JSON value (a string, number, list or dict) describing what the
      run depends on that the automatic fingerprint cannot see, e.g. a data file's version;
      a resume with a different value is refused.

    **Returns:**

    An `OptimizeResult(hparams, state, history)`.

    **Example:**

    ```python
    import tempfile
    import jax.numpy as jnp, optax
    import bilevel as bl

    problem = bl.Problem(
        inner=lambda w, lam, _: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * w @ w,
        outer=lambda w, lam, _: 0.5 * jnp.sum((w - 0.5) ** 2),
    )
    method = bl.implicit(bl.unroll(optax.sgd(0.5), steps=20), bl.cg(maxiter=10))
    run = tempfile.mkdtemp()
    result = bl.optimize(problem, method, optax.adam(0.1), jnp.asarray(-1.0), jnp.zeros(3),
                         None, None, steps=100, transform=jnp.exp, checkpoint_dir=run,
                         fingerprint="toy problem v1")
    print(result.hparams, result.history["value"][-1])   # λ → 1.0
    result.history.save(f"{run}/history.json")
    ```
    """
    driver = hyperopt(problem, method, outer_optimizer, transform=transform, warm_start=warm_start,
                      warm_start_solve=warm_start_solve)
    _check_int(steps, "steps", 1)
    _check_int(checkpoint_every, "checkpoint_every", 1)
    _check_int(keep, "keep", 1, allow_none=True)
    if record_hparams not in ("auto", "all", "summary"):
        raise ValueError(f"optimize(...) requires record_hparams in 'auto', 'all', 'summary'; got {record_hparams!r}.")
    if callback is not None and not callable(callback):
        raise TypeError(f"optimize(...) requires `callback` to be None or callable; got {callback!r}.")
    _check_policy(on_failure, residual_warning)
    user_fingerprint = _user_fingerprint(fingerprint)
    state = driver.init(hparams0, params0)
    compiled = _shared(driver)
    n_hparams = sum(np.size(x) for x in jax.tree_util.tree_leaves(_jit_transform(compiled, state.variables)))
    full = record_hparams == "all" or (record_hparams == "auto" and n_hparams <= 100)
    history, directory, fp = History(), None, None
    if checkpoint_dir is not None:
        directory = _prepare_dir(checkpoint_dir, resume)
        fp = _fingerprint(driver, state, user_fingerprint)
        loaded = ckpt.load(directory, state, fp) if resume else None
        if loaded is not None:
            _, state, columns = loaded
            history = History(columns)
    start = int(state.step)
    if start > steps:
        raise ValueError(
            f"optimize(...) resumed at step {start} from {str(directory)!r}, past steps={steps}. "
            f"Pass steps >= {start} to continue that run."
        )
    bar = _progress(steps, start, progress)
    monitor = _Monitor(on_failure, residual_warning, min(5, steps - start))
    saved_at, failed = start, None

    def save():
        ckpt.save(directory, int(state.step), state, fp, history.columns, keep)

    try:
        for k in range(start, steps):
            began = time.perf_counter()
            new_state, info = _jit_step(compiled, state, _batch(inner_data, k), _batch(outer_data, k))
            jax.block_until_ready(new_state)
            info = jax.device_get(info)
            seconds = time.perf_counter() - began
            failures = _failures(info, new_state.variables)
            if failures and on_failure == "raise":
                failed = (k, failures)
                break
            for message in monitor.messages(k, info, failures):
                warnings.warn(message, OptimizeWarning, stacklevel=2)
            state = new_state
            history.append(_row(k, info, seconds, full))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(value=f"{float(info.value):.4g}", grad=f"{float(info.grad_norm):.2g}")
            if directory is not None and (k + 1) % checkpoint_every == 0:
                save()
                saved_at = k + 1
            if callback is not None and callback(k, state, info) is False:
                break
    except KeyboardInterrupt:
        if directory is not None and int(state.step) != saved_at:
            save()
        raise
    finally:
        if bar is not None:
            bar.close()
    if directory is not None and int(state.step) != saved_at:
        save()
    result = OptimizeResult(_jit_transform(compiled, state.variables), state, history)
    if failed is not None:
        last = ckpt.checkpoint_steps(directory) if directory is not None else []
        raise _failure_error(*failed, result, ckpt.manifest_path(directory, last[-1]) if last else None)
    return result
