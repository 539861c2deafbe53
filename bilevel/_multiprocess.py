"""Several JAX processes on one machine: a launcher, and the `bilevel multiprocess` demo.

`bilevel` has no distributed engine of its own. Its hypergradient functions are pure JAX, so
JAX's multi-controller runtime runs them unchanged: every process calls
`jax.distributed.initialize`, builds one `jax.sharding.Mesh` over `jax.devices()` (the devices of
*every* process), makes global arrays from the rows it holds, and calls the same `jax.jit`-ed
function. The sharded `jit` (GSPMD) inserts the collectives: with the inner and outer batches
split by rows, each process computes the losses, gradients and Hessian-vector products of its
rows and an all-reduce combines them, so the unrolled steps and every conjugate-gradient
iteration see the global batch.

This module starts such a run on localhost, over JAX's CPU collectives (gloo), so that a user can
watch it work before taking the same code to a cluster:

- `launch_local(target, processes)` starts `processes` Python processes, each joining one distributed
  runtime with a local coordinator, runs `target(*args)` in each and returns what each returned.
- `data_parallel(...)` and `population(...)` are the two demo programs (one hypergradient with
  its batches split across processes; a population of hyperparameters split across processes),
  and `reference(...)` computes both in this one process without any mesh.
- `main(argv)` is `bilevel multiprocess --processes N`: it runs both demos on N processes and
  prints them beside the single-process result.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import pickle
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

TOLERANCE = 1e-6
_FORCE_FLAG = "--xla_force_host_platform_device_count"


# ----------------------------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------------------------


def cpu_collectives_available() -> bool:
    """Whether this jaxlib can run collectives between CPU processes (gloo over TCP).

    **Returns:**

    `True` when the installed jaxlib was built with gloo CPU collectives, which `launch_local`
    needs; `False` otherwise (then a multi-process CPU run cannot combine results).

    **Example:**

    ```python
    import bilevel as bl

    print(bl.cpu_collectives_available())
    ```
    """
    try:
        from jax._src.lib import _jax as extension
    except ImportError:  # pragma: no cover - jaxlib before 0.6 named it xla_extension
        try:
            from jax._src.lib import xla_extension as extension
        except ImportError:
            return False
    return hasattr(extension, "make_gloo_tcp_collectives")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it), for a local coordinator."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _target_name(target) -> str:
    if isinstance(target, str):
        module, sep, name = target.partition(":")
        if not sep or not module or not name or not all(p.isidentifier() for p in module.split(".") + name.split(".")):
            raise ValueError(
                "launch_local requires target as 'package.module:function' (or a module-level function); "
                f"got {target!r}. Example: 'bilevel._multiprocess:data_parallel'."
            )
        return target
    if callable(target):
        module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
        if not module or module == "__main__" or "<" in name or not name:
            raise ValueError(
                "launch_local requires a function that the worker processes can import: defined at the top "
                f"level of an importable module, not a lambda, a local function or __main__; got "
                f"{getattr(target, '__qualname__', target)!r} from module {module!r}. Move it into a module "
                "file, or pass 'module:function'."
            )
        return f"{module}:{name}"
    raise TypeError(
        f"launch_local requires target as a function or a 'module:function' string; got {type(target).__name__}."
    )


def _check_positive_int(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where} requires {name} as a positive int; got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"{where} requires {name} >= 1; got {value}.")
    return int(value)


def _child_env(devices_per_process: int) -> dict:
    """The parent's environment without forced host devices, restricted to the CPU backend."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_FORCE_FLAG)]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["BILEVEL_MP_DEVICES"] = str(devices_per_process)
    # The targets must import in the children as they do here (test modules, a script's folder).
    paths = [p for p in sys.path if p] + env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def launch_local(
    target: Callable | str,
    processes: int,
    *,
    args: Sequence = (),
    devices_per_process: int = 1,
    x64: bool = True,
    timeout: float = 300.0,
) -> list:
    """Run a function in several local JAX processes joined by one distributed runtime.

    Starts `processes` Python processes on this machine. Each one selects the CPU backend with
    `devices_per_process` devices (any `--xla_force_host_platform_device_count` in `XLA_FLAGS`
    is dropped), enables float64 when `x64`, turns on JAX's gloo CPU collectives, calls
    `jax.distributed.initialize(coordinator_address="127.0.0.1:<free port>",
    num_processes=processes, process_id=i)`, and then runs `target(*args)`. After that
    `jax.devices()` in every process lists all `processes × devices_per_process` devices, and a
    mesh over them spans the processes, exactly as on a multi-host cluster.

    Each process returns a pytree of NumPy values; JAX arrays are converted when this process
    can read them whole (fully addressable or fully replicated). An array split across
    processes cannot be: return its `addressable_shards` (see `population`) or gather it with
    `jax.experimental.multihost_utils.process_allgather(x, tiled=True)`.

    If a process fails or the run exceeds `timeout` seconds, every process still running is
    killed and a `RuntimeError` reports which one failed, with the end of its output.

    **Arguments:**

    - `target`: a function defined at the top level of an importable module, or its name as
      `"package.module:function"`.
    - `processes`: the number of processes (>= 1).
    - `args`: positional arguments for `target`, pickled to each process.
    - `devices_per_process`: CPU devices each process exposes (default 1).
    - `x64`: enable float64 in the processes (default `True`).
    - `timeout`: seconds for the whole run (> 0).

    **Returns:**

    A list with what `target` returned in process 0, 1, ..., as NumPy values.

    **Example:**

    ```python
    import bilevel as bl

    if bl.cpu_collectives_available():
        # jax.process_index() and jax.device_count() in each of 2 processes:
        print(bl.launch_local("bilevel._multiprocess:process_info", 2, timeout=120))
    ```
    """
    where = "launch_local(target, processes)"
    name = _target_name(target)
    processes = _check_positive_int(processes, "processes", where)
    devices_per_process = _check_positive_int(devices_per_process, "devices_per_process", where)
    if not isinstance(x64, bool):
        raise TypeError(f"{where} requires x64 as a bool; got {type(x64).__name__} {x64!r}.")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"{where} requires timeout as a finite number of seconds > 0; got {timeout!r}.")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"{where} requires args as a tuple or list of positional arguments; got {type(args).__name__}.")
    if processes > 1 and not cpu_collectives_available():
        raise RuntimeError(
            "launch_local needs JAX's gloo CPU collectives to combine results across processes, and this "
            "jaxlib has none. Install a jaxlib wheel from PyPI (they include gloo), or run with "
            "processes=1."
        )

    with tempfile.TemporaryDirectory(prefix="bilevel_mp_") as tmp:
        tmp = Path(tmp)
        (tmp / "args.pkl").write_bytes(pickle.dumps(tuple(args)))
        coordinator = f"127.0.0.1:{free_port()}"
        env = _child_env(devices_per_process)
        children = []
        try:
            for i in range(processes):
                cmd = [sys.executable, "-m", "bilevel._multiprocess", "--worker", name,
                       "--coordinator", coordinator, "--num-processes", str(processes),
                       "--process-id", str(i), "--dir", str(tmp)] + (["--x64"] if x64 else [])
                log = open(tmp / f"log_{i}.txt", "wb")
                children.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL), log))
            deadline = time.monotonic() + timeout
            failed = None
            while True:
                codes = [p.poll() for p, _ in children]
                bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    failed = (bad[0], f"exited with status {codes[bad[0]]}")
                    break
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    waiting = [i for i, c in enumerate(codes) if c is None]
                    why = f"did not finish within timeout={timeout} s (processes still running: {waiting})"
                    failed = (waiting[0], why)
                    break
                time.sleep(0.05)
        finally:
            for p, log in children:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                log.close()
        if failed is not None:
            i, why = failed
            raise RuntimeError(
                f"launch_local: process {i} of {processes} ({name}) {why}; the others were stopped. "
                f"Command: {shlex.join(children[i][0].args)}\nEnd of its output:\n{_tail(tmp / f'log_{i}.txt')}"
            )
        return [pickle.loads((tmp / f"result_{i}.pkl").read_bytes()) for i in range(processes)]


def _to_host(x):
    import jax

    if isinstance(x, jax.Array):
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        raise TypeError(
            f"a launched function returned a jax.Array of shape {x.shape} split across processes "
            f"({x.sharding}); this process holds only part of it. Return its addressable_shards, or "
            "gather it with jax.experimental.multihost_utils.process_allgather(x, tiled=True)."
        )
    return x


def _worker(argv: Sequence[str]) -> int:
    """One launched process: join the runtime, run the target, write its result."""
    parser = argparse.ArgumentParser(prog="python -m bilevel._multiprocess")
    parser.add_argument("--worker", required=True, metavar="MODULE:FUNCTION")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--x64", action="store_true")
    a = parser.parse_args(argv)

    import jax

    if a.x64:
        jax.config.update("jax_enable_x64", True)
    devices = int(os.environ.get("BILEVEL_MP_DEVICES", "1"))
    if devices != 1:
        jax.config.update("jax_num_cpu_devices", devices)
    if a.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=a.coordinator, num_processes=a.num_processes,
                                   process_id=a.process_id, initialization_timeout=120)
    module, _, name = a.worker.partition(":")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    args = pickle.loads((Path(a.dir) / "args.pkl").read_bytes())
    result = jax.tree_util.tree_map(_to_host, fn(*args))
    (Path(a.dir) / f"result_{a.process_id}.pkl").write_bytes(pickle.dumps(result))
    if a.num_processes > 1:
        jax.distributed.shutdown()
    return 0


# ----------------------------------------------------------------------------------------------
# The demo: a logistic regression with one L2 log-penalty per feature
# ----------------------------------------------------------------------------------------------


def process_info() -> dict:
    """What one launched process sees: its index, the process count and the devices."""
    import jax

    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count()}


def demo_data(seed: int = 0, *, rows: int = 96, dim: int = 16) -> dict:
    """The demo's data, as NumPy arrays: the same in every process for the same seed.

    Binary labels from a noisy linear rule; `rows` training and `rows` validation rows of
    `dim` features, a `(8, dim)` population of log-penalties from -4 to 0, and the single
    setting `log_lam` = -2 for the data-parallel hypergradient.
    """
    rng = np.random.RandomState(seed)
    w_true = rng.randn(dim)
    X, Xv = rng.randn(rows, dim), rng.randn(rows, dim)
    y = (X @ w_true + 0.5 * rng.randn(rows) > 0).astype(np.float64)
    yv = (Xv @ w_true + 0.5 * rng.randn(rows) > 0).astype(np.float64)
    population = np.linspace(-4.0, 0.0, 8)[:, None] + np.linspace(0.0, 0.5, dim)[None, :]
    return {"train": (X, y), "val": (Xv, yv), "log_lam": np.full(dim, -2.0), "w0": np.zeros(dim),
            "population": population}


def demo_hypergrad():
    """The demo's hypergradient function (not jitted): implicit differentiation with CG.

    Inner: mean logistic loss + ½ Σ exp(λ) ⊙ w² minimised by 100 SGD steps (rate 0.5);
    outer: the mean validation logistic loss; backward: CG, at most 50 iterations, tol 1e-10.
    Both losses are means over the whole (global) batch, whatever the sharding.
    """
    import jax.numpy as jnp
    import optax

    from ._compile import hypergrad
    from ._implicit import implicit
    from ._linear_solvers import cg
    from ._problem import Problem
    from ._unroll import unroll

    def logistic(w, batch):
        X, y = batch
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    problem = Problem(inner=lambda w, lam, b: logistic(w, b) + 0.5 * jnp.sum(jnp.exp(lam) * w**2),
                      outer=lambda w, lam, b: logistic(w, b))
    return hypergrad(problem, implicit(unroll(optax.sgd(0.5), steps=100), cg(maxiter=50, tol=1e-10)))


def _summary(result) -> dict:
    return {"value": result.value, "grad": result.grad, "params": result.params,
            **{k: result.stats[k] for k in ("solve_iterations", "solve_residual", "inner_grad_norm")}}


def _timed(fn, *args, repeats: int = 5):
    """fn(*args), the seconds of the first call (compilation and one run) and the median of
    `repeats` further calls. Every process calls the same number of times."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return out, first, float(np.median(runs)) if runs else float("nan")


def _collectives(compiled_text: str) -> list[str]:
    ops = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    return [op for op in ops if f" {op}(" in compiled_text or f"{op}-start(" in compiled_text]


def data_parallel(seed: int = 0, rows: int = 96, dim: int = 16, repeats: int = 5) -> dict:
    """Run in every launched process: one hypergradient with its batches split across processes.

    A one-axis mesh `("data",)` spans every device of every process. Each process takes from
    `demo_data` only the rows its devices hold (as it would read its own shard of a dataset
    from disk) and `jax.make_array_from_process_local_data` assembles the global batches;
    hyperparameters and the start point are replicated. The jitted `demo_hypergrad` then runs
    on the global arrays: its means, gradients and Hessian-vector products are computed per
    shard and combined by all-reduces.

    **Returns:** `value`, `grad`, `params` and CG's `solve_iterations`, `solve_residual`, the
    `inner_grad_norm`, `local_rows` (training rows this process held), `collectives` (the
    collective operations in the compiled program), `first_call_seconds` (compilation and one
    run) and `run_seconds` (the median of `repeats` further calls; NaN for none).
    """
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    data = demo_data(seed, rows=rows, dim=dim)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    if rows % mesh.size:
        raise ValueError(f"data_parallel requires rows divisible by the {mesh.size} devices; got rows={rows}.")
    by_rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def global_rows(a):
        index = by_rows.addressable_devices_indices_map(a.shape)
        starts = sorted({idx[0].start or 0 for idx in index.values()})
        stops = sorted({idx[0].stop if idx[0].stop is not None else a.shape[0] for idx in index.values()})
        local = a[starts[0]:stops[-1]]          # the contiguous block this process holds
        return jax.make_array_from_process_local_data(by_rows, local, a.shape)

    def global_replicated(a):
        return jax.make_array_from_process_local_data(replicated, a, a.shape)

    train = tuple(global_rows(a) for a in data["train"])
    val = tuple(global_rows(a) for a in data["val"])
    lam, w0 = global_replicated(data["log_lam"]), global_replicated(data["w0"])
    hg = jax.jit(demo_hypergrad())
    out, first, run = _timed(hg, lam, w0, train, val, repeats=repeats)
    compiled = hg.lower(lam, w0, train, val).compile()      # cached: for reading its collectives
    return {**_summary(out), "local_rows": sum(s.data.shape[0] for s in train[0].addressable_shards),
            "collectives": _collectives(compiled.as_text()), "first_call_seconds": first, "run_seconds": run}


def population(seed: int = 0, rows: int = 96, dim: int = 16, split: str = "jit", repeats: int = 5) -> dict:
    """Run in every launched process: a population of hyperparameters split across processes.

    The `(8, dim)` population of `demo_data` is split over a one-axis mesh `("pop",)` of every
    device (8 must be a multiple of the device count); data and start point are replicated, and
    each member is trained where it lives.

    - `split="jit"`: `jax.jit(jax.vmap(hg, in_axes=(0, None, None, None)))` on the sharded
      population. Under `vmap`, CG's while loop runs until *every* member has converged (the
      others are masked), and that "all converged" test spans the mesh: the compiled program
      has one all-reduce of a boolean per CG iteration, so the processes step together.
    - `split="shard_map"`: the same `vmap` inside `jax.shard_map` over `("pop",)`: each device
      loops until its own members converge, and the program has no collectives at all.

    **Returns:** this process's members only: `members` (their indices in the population) and
    their `value`, `grad`, `params`, `solve_iterations`, `solve_residual`, `inner_grad_norm`;
    `collectives` (in the compiled program), `first_call_seconds` and `run_seconds`.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    data = demo_data(seed, rows=rows, dim=dim)
    mesh = Mesh(np.array(jax.devices()), ("pop",))
    members = data["population"].shape[0]
    if members % mesh.size:
        raise ValueError(
            f"population splits {members} members over {mesh.size} devices, which does not divide; "
            "use 1, 2, 4 or 8 devices in all."
        )
    by_member, replicated = NamedSharding(mesh, P("pop")), NamedSharding(mesh, P())

    def put(a, sharding):
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    lams = put(data["population"], by_member)
    w0 = put(data["w0"], replicated)
    train = tuple(put(a, replicated) for a in data["train"])
    val = tuple(put(a, replicated) for a in data["val"])
    if split not in ("jit", "shard_map"):
        raise ValueError(f"population requires split='jit' or 'shard_map'; got {split!r}.")
    sweep = jax.vmap(demo_hypergrad(), in_axes=(0, None, None, None))
    if split == "shard_map":
        sweep = jax.shard_map(sweep, mesh=mesh, in_specs=(P("pop"), P(), P(), P()), out_specs=P("pop"))
    sweep = jax.jit(sweep)
    out, first, run = _timed(sweep, lams, w0, train, val, repeats=repeats)
    compiled = sweep.lower(lams, w0, train, val).compile()

    def mine(x):                                  # this process's rows, in population order
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])

    shards = sorted(out.value.addressable_shards, key=lambda s: s.index[0].start or 0)
    index = np.concatenate([np.arange(members)[s.index[0]] for s in shards])
    return {"members": index, **{k: mine(v) for k, v in _summary(out).items()},
            "collectives": _collectives(compiled.as_text()), "first_call_seconds": first, "run_seconds": run}


def demo(seed: int = 0, rows: int = 96, dim: int = 16, repeats: int = 5) -> dict:
    """Run in every launched process: `data_parallel`, then `population` split by `jit` and by
    `shard_map`.

    **Returns:** `{"data_parallel": ..., "population": ..., "population_shard_map": ...}`, this
    process's results of each.
    """
    return {"data_parallel": data_parallel(seed, rows, dim, repeats),
            "population": population(seed, rows, dim, "jit", repeats),
            "population_shard_map": population(seed, rows, dim, "shard_map", repeats)}


def reference(seed: int = 0, rows: int = 96, dim: int = 16) -> dict:
    """Both demos in this one process, on one device, without any mesh: the values to match.

    **Returns:** `{"data_parallel": {...}, "population": {...}}` with the same fields as
    `data_parallel` and `population` (the population whole).
    """
    import jax

    data = demo_data(seed, rows=rows, dim=dim)
    device = jax.devices()[0]
    put = lambda tree: jax.device_put(tree, device)
    hg = demo_hypergrad()
    one, *t_one = _timed(jax.jit(hg), *put((data["log_lam"], data["w0"], data["train"], data["val"])))
    sweep = jax.jit(jax.vmap(hg, in_axes=(0, None, None, None)))
    many, *t_many = _timed(sweep, *put((data["population"], data["w0"], data["train"], data["val"])))
    times = lambda t: {"first_call_seconds": t[0], "run_seconds": t[1]}
    host = lambda d: {k: np.asarray(v) for k, v in d.items()}
    return {"data_parallel": {**host(_summary(one)), **times(t_one)},
            "population": {"members": np.arange(data["population"].shape[0]), **host(_summary(many)),
                           **times(t_many)}}


def combine_population(results: Sequence[dict]) -> dict:
    """Put the per-process results of `population` back into one population, in order."""
    order = np.argsort(np.concatenate([r["members"] for r in results]))
    keys = [k for k in results[0] if not k.endswith("seconds") and k != "collectives"]
    out = {k: np.concatenate([np.atleast_1d(r[k]) for r in results])[order] for k in keys}
    out.update({k: max(r[k] for r in results) for k in results[0] if k.endswith("seconds")})
    return out


_COMPARED = ("value", "grad", "params", "solve_iterations", "solve_residual", "inner_grad_norm")


def differences(got: dict, want: dict) -> dict:
    """Largest absolute difference per compared field (value, grad, params, CG's stats)."""
    return {k: float(np.max(np.abs(np.asarray(got[k], np.float64) - np.asarray(want[k], np.float64))))
            for k in _COMPARED}


# ----------------------------------------------------------------------------------------------
# `bilevel multiprocess`
# ----------------------------------------------------------------------------------------------

HELP = "run a data-parallel hypergradient and a population on N local processes; compare with one process"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `bilevel multiprocess`."""
    p.add_argument("--processes", type=int, default=2, help="local JAX processes (default 2)")
    p.add_argument("--devices-per-process", type=int, default=1,
                   help="CPU devices in each process (default 1); processes × devices must divide 8")
    p.add_argument("--rows", type=int, default=96,
                   help="training and validation rows (default 96); a multiple of processes × devices")
    p.add_argument("--dim", type=int, default=16, help="features, one log-penalty each (default 16)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the run is stopped (default 600)")


def check_args(args) -> str | None:
    """A message when the options of `bilevel multiprocess` cannot work, else None."""
    if min(args.processes, args.devices_per_process, args.rows, args.dim) < 1:
        return (f"--processes, --devices-per-process, --rows and --dim must be >= 1; got --processes "
                f"{args.processes} --devices-per-process {args.devices_per_process} --rows {args.rows} "
                f"--dim {args.dim}")
    devices = args.processes * args.devices_per_process
    if 8 % devices:
        return (f"processes × devices per process must divide 8 (the population has 8 members); got "
                f"{args.processes} × {args.devices_per_process}")
    if args.rows % devices:
        return f"--rows must be a multiple of processes × devices per process ({devices}); got {args.rows}"
    if not 0 < args.timeout < math.inf:
        return f"--timeout must be > 0; got {args.timeout}"
    return None


def run(args) -> int:
    """`bilevel multiprocess`: both demos on N processes beside the single-process reference."""
    import jax

    jax.config.update("jax_enable_x64", True)
    n, k = args.processes, args.devices_per_process
    print(f"Starting {n} local JAX process(es) with {k} CPU device(s) each (jax {jax.__version__}, "
          f"gloo collectives, coordinator on 127.0.0.1); float64; {args.rows} rows × {args.dim} features.")
    start = time.perf_counter()
    results = launch_local("bilevel._multiprocess:demo", n, args=(args.seed, args.rows, args.dim),
                           devices_per_process=k, timeout=args.timeout)
    wall = time.perf_counter() - start
    dp, pop = [r["data_parallel"] for r in results], [r["population"] for r in results]
    pop_sm = [r["population_shard_map"] for r in results]
    ref = reference(args.seed, args.rows, args.dim)
    table = [("data parallel", f"process {i}", r, ref["data_parallel"]) for i, r in enumerate(dp)]
    table.append(("population, jit", "all processes", combine_population(pop), ref["population"]))
    table.append(("population, shard_map", "all processes", combine_population(pop_sm), ref["population"]))
    worst = 0.0
    print()
    print("| run | where | hypergradient (first entries) | CG iterations | max abs difference vs 1 process |")
    print("|---|---|---|---|---|")
    for what, where, got, want in table:
        diff = differences(got, want)
        worst = max(worst, *diff.values())
        grad = np.asarray(got["grad"]).reshape(-1)[:3]
        iters = np.unique(np.asarray(got["solve_iterations"])).tolist()
        print(f"| {what} | {where} | {np.array2string(grad, precision=6)} | {iters} | {max(diff.values()):.1e} |")
    print()
    print("| run | 1 process: first call, then per call | "
          f"{n} processes: first call, then per call (slowest process) |")
    print("|---|---|---|")
    for what, got, want in (("data parallel", dp, ref["data_parallel"]), ("population, jit", pop, ref["population"]),
                            ("population, shard_map", pop_sm, ref["population"])):
        first, per = max(r["first_call_seconds"] for r in got), max(r["run_seconds"] for r in got)
        print(f"| {what} | {want['first_call_seconds']:.2f} s, {want['run_seconds'] * 1e3:.1f} ms | "
              f"{first:.2f} s, {per * 1e3:.1f} ms |")
    print()
    print(f"Data parallel: each process held {dp[0]['local_rows']} of {args.rows} training rows; the "
          f"compiled program combines them with {', '.join(dp[0]['collectives']) or 'no collectives'}.")
    why = " (CG's stopping test under vmap spans the population)" if pop[0]["collectives"] else ""
    print(f"Population: process i trained members {[r['members'].tolist() for r in pop]}; collectives "
          f"with jit: {', '.join(pop[0]['collectives']) or 'none'}{why}, with shard_map: "
          f"{', '.join(pop_sm[0]['collectives']) or 'none'}.")
    print(f"Wall time {wall:.1f} s for the launch (process start-up, compilation and runs; "
          f"{os.cpu_count()} CPU cores on this machine).")
    ok = worst <= TOLERANCE
    print(("OK" if ok else "MISMATCH") + f": largest difference {worst:.1e} (tolerance {TOLERANCE:g}).")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bilevel._multiprocess [--processes N ...]`, or a worker when `--worker` is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        return _worker(argv)
    p = argparse.ArgumentParser(prog="bilevel multiprocess", description=HELP)
    add_arguments(p)
    args = p.parse_args(argv)
    if (problem := check_args(args)) is not None:
        p.error(problem)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
