"""Checkpoints for `bilevel.optimize`: equinox leaf serialisation plus a JSON manifest.

A checkpoint at outer step k is two files in the run's directory:

- `step_{k:08d}.eqx`: the driver state, written with `equinox.tree_serialise_leaves`;
- `step_{k:08d}.json`: the manifest: the step, the SHA-256 of the `.eqx` file, the run's
  fingerprint (hashes of the problem, method, optimizers, transform, initial values and state
  layout) and the history so far.

Both are written to a temporary name and renamed, the manifest last, so a manifest on disk
always describes a complete state file. Reading checks the hash and the fingerprint and
raises on any difference: a damaged or foreign checkpoint is never replaced by a fresh start.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import types
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

FORMAT = "bilevel-checkpoint/1"
_NAME = re.compile(r"^step_(\d{8})\.json$")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe(obj: Any, _seen: tuple = ()) -> str:
    """A deterministic text description of `obj`, stable across processes.

    Functions are described by module, name, bytecode, constants, defaults and closure
    contents (so `optax.sgd(0.1)` and `optax.sgd(0.2)` differ); arrays by shape, dtype and a
    hash of their bytes; modules and dataclasses by their fields. Memory addresses never
    enter, unlike `repr`. A cycle (a recursive closure) is cut at its second visit.
    """
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return repr(obj)
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        a = np.asarray(obj)
        return f"array{a.shape}{a.dtype}:{_sha(a.tobytes())[:16]}"
    if id(obj) in _seen or len(_seen) > 64:
        return f"<cycle {type(obj).__qualname__}>"
    d = functools.partial(describe, _seen=_seen + (id(obj),))
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__qualname__}({', '.join(d(x) for x in obj)})"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{d(k)}: {d(v)}" for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))) + "}"
    if isinstance(obj, functools.partial):
        return f"partial({d(obj.func)}, {d(obj.args)}, {d(obj.keywords)})"
    if isinstance(obj, types.CodeType):
        return f"code[{_sha(obj.co_code)[:16]}]{d(obj.co_consts)}"
    if hasattr(obj, "__wrapped__"):  # jax.jit, functools.wraps
        return f"wrapped({d(obj.__wrapped__)})"
    code = getattr(obj, "__code__", None)
    if code is not None:
        cells = tuple(c.cell_contents for c in (obj.__closure__ or ()) if _filled(c))
        return (f"fn {obj.__module__}.{obj.__qualname__}({d(code)}, "
                f"{d(obj.__defaults__)}, {d(obj.__kwdefaults__)}, {d(cells)})")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # eqx.Module included
        fields = {f.name: getattr(obj, f.name, None) for f in dataclasses.fields(obj)}
        return f"{type(obj).__qualname__}{d(fields)}"
    name = getattr(obj, "__qualname__", None)   # a class, a builtin function, a ufunc
    if isinstance(name, str):
        return f"{getattr(obj, '__module__', '')}.{name}"
    return type(obj).__qualname__


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
        return True
    except ValueError:  # an empty cell
        return False


def layout(tree) -> str:
    """The tree structure with each leaf's shape and dtype (not its values)."""
    shapes = jax.tree_util.tree_map(lambda x: (np.shape(x), str(getattr(x, "dtype", type(x).__name__))), tree)
    return str(jax.tree_util.tree_structure(tree)) + str(jax.tree_util.tree_leaves(shapes))


def fingerprint(parts: dict[str, str]) -> dict[str, str]:
    """Hash each described part, so a mismatch can name what changed."""
    return {name: _sha(text.encode())[:32] for name, text in parts.items()}


def _paths(directory: Path, step: int) -> tuple[Path, Path]:
    return directory / f"step_{step:08d}.eqx", directory / f"step_{step:08d}.json"


def checkpoint_steps(directory: Path) -> list[int]:
    """The steps with a manifest in `directory`, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name)))


def writable_dir(path) -> Path:
    """Create the directory `path` if needed and check that a file can be written there."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / ".bilevel-write-test"
    probe.write_bytes(b"")
    probe.unlink()
    return directory


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(directory: Path, step: int, state, fingerprint_: dict, history: dict, keep: int | None) -> Path:
    """Write the state and its manifest for `step`; keep only the newest `keep` checkpoints."""
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    data = buffer.getvalue()
    state_path, manifest_path = _paths(directory, step)
    _atomic_write(state_path, data)
    manifest = {"format": FORMAT, "step": step, "state_file": state_path.name, "sha256": _sha(data),
                "fingerprint": fingerprint_, "history": history}
    _atomic_write(manifest_path, json.dumps(manifest).encode())
    if keep is not None:
        for old in checkpoint_steps(directory)[:-keep]:
            for p in _paths(directory, old):
                p.unlink(missing_ok=True)
    return manifest_path


def _corrupted(path: Path, what: str) -> ValueError:
    return ValueError(
        f"The checkpoint {path} is corrupted: {what}. bilevel.optimize never replaces a damaged "
        "checkpoint with a fresh start. Delete the checkpoint files of that step to resume from an "
        "older one, or pass a new checkpoint_dir to start over."
    )


def load(directory: Path, like, fingerprint_: dict):
    """The newest checkpoint's `(step, state, history)`, checked; None when there is none."""
    steps = checkpoint_steps(directory)
    if not steps:
        return None
    state_path, manifest_path = _paths(directory, steps[-1])
    try:
        manifest = json.loads(manifest_path.read_text())
        step, digest, saved = manifest["step"], manifest["sha256"], manifest["fingerprint"]
        history = manifest["history"]
    except (ValueError, KeyError, TypeError) as err:
        raise _corrupted(manifest_path, f"its manifest cannot be read ({err})") from err
    if manifest.get("format") != FORMAT or step != steps[-1]:
        raise _corrupted(manifest_path, f"unexpected format {manifest.get('format')!r} or step {step!r}")
    _check_fingerprint(manifest_path, saved, fingerprint_)
    if not state_path.is_file():
        raise _corrupted(manifest_path, f"its state file {state_path.name} is missing")
    data = state_path.read_bytes()
    if _sha(data) != digest:
        raise _corrupted(state_path, "its SHA-256 does not match the manifest (a partial or altered write)")
    try:
        state = eqx.tree_deserialise_leaves(io.BytesIO(data), like)
    except Exception as err:  # eqx raises RuntimeError / TreePathError on layout changes
        raise _corrupted(state_path, f"it does not deserialise into this run's state ({err})") from err
    return step, state, history


def _check_fingerprint(path: Path, saved: dict, current: dict) -> None:
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        raise ValueError(
            f"The checkpoint {path} was written by a different run: its {', '.join(differing)} "
            "differ from this call's. Resuming would mix two runs. Pass the same problem, method, "
            "optimizers, transform, hparams0 and params0 as the run that wrote it, or a new "
            "checkpoint_dir to start a separate run."
        )
