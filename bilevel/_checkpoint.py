"""Checkpoints for `bilevel.optimize`: equinox leaf serialisation plus a JSON manifest.

A checkpoint at outer step k is two files in the run's directory:

- `step_{k:08d}.eqx`: the driver state, written with `equinox.tree_serialise_leaves`;
- `step_{k:08d}.json`: the manifest: the step, the SHA-256 of the `.eqx` file, the run's
  fingerprint (hashes of the problem, method, optimizers, transform, initial values, state
  layout and the user's own `fingerprint=`), the history so far, and the SHA-256 of all of
  that, so an edited manifest (a changed history column, say) is detected.

Both are written to a temporary name and renamed, the manifest last, so a manifest on disk
always describes a complete state file. Reading checks the hashes and the fingerprint and
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
import sys
import types
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

FORMAT = "bilevel-checkpoint/2"
_NAME = re.compile(r"^step_(\d{8})\.json$")

# Packages whose functions are described by their code and closure only: the globals they read
# are fixed for the life of the process. Everything else (a script, a notebook, a test module)
# is user code, whose global reads are described too.
_LIBRARIES = frozenset({"bilevel", "jax", "jaxlib", "numpy", "optax", "equinox", "lineax",
                        "optimistix", "scipy", "flax", "haiku", "chex", "ml_dtypes", "builtins"})
_MAX_ITEMS = 10_000           # a longer list, tuple, dict or set is not described item by item
_MAX_HASHED_BYTES = 1 << 28   # a bigger array is hashed from a sample of its bytes
_MAX_DEPTH = 64
_BUDGET = 200_000             # objects visited per description


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_library(module: str | None) -> bool:
    """Whether `module` belongs to an installed library rather than to the user's own code."""
    top = (module or "").partition(".")[0]
    if top in _LIBRARIES or top in sys.stdlib_module_names:
        return True
    file = getattr(sys.modules.get(top), "__file__", None) or ""
    return "site-packages" in file or "dist-packages" in file


class _Describer:
    """One description: the objects on the current path (cycles), a budget, and exactness."""

    def __init__(self):
        self.exact = True
        self.budget = _BUDGET

    def inexact(self, text: str) -> str:
        self.exact = False
        return text

    def __call__(self, obj: Any, path: tuple = ()) -> str:
        self.budget -= 1
        if self.budget < 0:
            return self.inexact("<too large to describe>")
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            return repr(obj)
        if isinstance(obj, types.ModuleType):
            return f"module {obj.__name__}"
        if id(obj) in path:
            return f"<cycle {type(obj).__qualname__}>"
        if len(path) > _MAX_DEPTH:
            return self.inexact(f"<nested too deep {type(obj).__qualname__}>")
        try:
            if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
                return self.array(obj)
            return self.compound(obj, functools.partial(self, path=path + (id(obj),)))
        except Exception:  # an attribute that raises, an array that cannot be read: name it only
            return self.inexact(f"<{type(obj).__module__}.{type(obj).__qualname__} object>")

    def array(self, obj) -> str:
        if jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
            obj = jax.random.key_data(obj)
        a = np.ascontiguousarray(np.asarray(obj))
        if a.dtype.hasobject:   # its bytes are addresses
            return self.inexact(f"array{a.shape}{a.dtype}")
        data = a.tobytes() if a.nbytes <= _MAX_HASHED_BYTES else self.sample(a)
        return f"array{a.shape}{a.dtype}:{_sha(data)[:16]}"

    def sample(self, a: np.ndarray) -> bytes:
        self.exact = False   # two huge arrays that differ only between the sampled bytes look equal
        flat = a.reshape(-1)
        return flat[:: max(1, flat.size // (1 << 20))].tobytes()

    def compound(self, obj, d) -> str:
        if isinstance(obj, (list, tuple, dict, set, frozenset)) and len(obj) > _MAX_ITEMS:
            return self.inexact(f"{type(obj).__qualname__}[{len(obj)} items]")
        if isinstance(obj, (list, tuple)):
            return f"{type(obj).__qualname__}({', '.join(d(x) for x in obj)})"
        if isinstance(obj, (set, frozenset)):
            return f"{type(obj).__qualname__}({', '.join(sorted(d(x) for x in obj))})"
        if isinstance(obj, dict):
            items = sorted((d(k), d(v)) for k, v in obj.items())
            return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
        if isinstance(obj, functools.partial):
            return f"partial({d(obj.func)}, {d(obj.args)}, {d(obj.keywords)})"
        if isinstance(obj, types.CodeType):
            return f"code[{_sha(obj.co_code)[:16]}]{d(obj.co_consts)}{obj.co_names}"
        if isinstance(obj, types.MethodType):
            return f"method({d(obj.__func__)}, {d(obj.__self__)})"
        if isinstance(obj, property):
            return f"property({d(obj.fget)}, {d(obj.fset)}, {d(obj.fdel)})"
        if hasattr(obj, "__wrapped__"):  # jax.jit, jax.custom_jvp, functools.wraps, staticmethod
            return f"wrapped({d(obj.__wrapped__)})"
        if isinstance(getattr(obj, "__code__", None), types.CodeType):
            return self.function(obj, d)
        if isinstance(obj, type):
            return self.cls(obj, d)
        if dataclasses.is_dataclass(obj):  # an instance (eqx.Module included); classes are above
            fields = {f.name: getattr(obj, f.name, None) for f in dataclasses.fields(obj)}
            return f"{d(type(obj))}{d(fields)}"
        name = getattr(obj, "__qualname__", None)   # a builtin function, a ufunc
        if isinstance(name, str):
            return f"{getattr(obj, '__module__', '')}.{name}"
        return self.inexact(f"<{type(obj).__module__}.{type(obj).__qualname__} object>")

    def function(self, fn, d) -> str:
        cells = tuple(c.cell_contents for c in (fn.__closure__ or ()) if _filled(c))
        text = (f"fn {fn.__module__}.{fn.__qualname__}({d(fn.__code__)}, "
                f"{d(fn.__defaults__)}, {d(fn.__kwdefaults__)}, {d(cells)}")
        if not is_library(fn.__module__):
            text += f", globals {d(_globals_read(fn))}"
        return text + ")"

    def cls(self, cls: type, d) -> str:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if is_library(cls.__module__):
            return name
        members = {k: v for k, v in vars(cls).items()
                   if callable(v) or isinstance(v, (staticmethod, classmethod, property))}
        return f"class {name}({d(cls.__bases__)}, {d(members)})"


def _code_names(code: types.CodeType) -> set[str]:
    """The names a code object and the functions nested in it load (globals and attributes)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _globals_read(fn) -> dict:
    """The module globals `fn` can read, by name: `jnp`, `SCALE`, a helper function..."""
    space = getattr(fn, "__globals__", {})
    return {name: space[name] for name in sorted(_code_names(fn.__code__)) if name in space}


def describe(obj: Any) -> str:
    """A deterministic text description of `obj`, stable across processes.

    Functions are described by module, name, bytecode, the names they use (so `jnp.sin` and
    `jnp.cos` differ), constants, defaults and closure contents (so `optax.sgd(0.1)` and
    `optax.sgd(0.2)` differ); a function of the user's own code (not of an installed
    library) also by the module globals it reads: numbers, strings and arrays by value,
    helper functions and classes recursively, modules by name. Arrays are described by shape,
    dtype and a hash of their bytes; modules and dataclasses by their fields. Memory addresses
    never enter, unlike `repr`. A cycle (a recursive function) is cut at its second visit.
    """
    return _Describer()(obj)


def describe_exact(obj: Any) -> str | None:
    """`describe(obj)`, or None when part of `obj` can only be named, not described.

    An object of an arbitrary class (neither a function, a dataclass, a container nor an
    array), a container of more than 10,000 items or an array of more than 256 MiB cannot be
    told apart from another of its kind by its description; two objects whose exact
    descriptions are equal compute the same thing.
    """
    describer = _Describer()
    text = describer(obj)
    return text if describer.exact else None


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


def manifest_path(directory: Path, step: int) -> Path:
    """The manifest file of the checkpoint at `step`."""
    return _paths(directory, step)[1]


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


def _content_hash(manifest: dict) -> str:
    """The SHA-256 of everything in a manifest but this hash itself (keys sorted, so stable)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha(json.dumps(body, sort_keys=True).encode())


def save(directory: Path, step: int, state, fingerprint_: dict, history: dict, keep: int | None) -> Path:
    """Write the state and its manifest for `step`; keep only the newest `keep` checkpoints."""
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    data = buffer.getvalue()
    state_path, manifest_path_ = _paths(directory, step)
    _atomic_write(state_path, data)
    manifest = {"format": FORMAT, "step": step, "state_file": state_path.name, "sha256": _sha(data),
                "fingerprint": fingerprint_, "history": history}
    manifest["manifest_sha256"] = _content_hash(manifest)
    _atomic_write(manifest_path_, json.dumps(manifest).encode())
    if keep is not None:
        for old in checkpoint_steps(directory)[:-keep]:
            for p in _paths(directory, old):
                p.unlink(missing_ok=True)
    return manifest_path_


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
    state_path, manifest_path_ = _paths(directory, steps[-1])
    try:
        manifest = json.loads(manifest_path_.read_text())
        step, digest, saved = manifest["step"], manifest["sha256"], manifest["fingerprint"]
        history = manifest["history"]
    except (ValueError, KeyError, TypeError) as err:
        raise _corrupted(manifest_path_, f"its manifest cannot be read ({err})") from err
    _check_manifest(manifest_path_, manifest, steps[-1])
    _check_fingerprint(manifest_path_, saved, fingerprint_)
    if not state_path.is_file():
        raise _corrupted(manifest_path_, f"its state file {state_path.name} is missing")
    data = state_path.read_bytes()
    if _sha(data) != digest:
        raise _corrupted(state_path, "its SHA-256 does not match the manifest (a partial or altered write)")
    try:
        state = eqx.tree_deserialise_leaves(io.BytesIO(data), like)
    except Exception as err:  # eqx raises RuntimeError / TreePathError on layout changes
        raise _corrupted(state_path, f"it does not deserialise into this run's state ({err})") from err
    return step, state, history


def _check_manifest(path: Path, manifest: dict, step: int) -> None:
    found = manifest.get("format")
    if found != FORMAT:
        raise ValueError(
            f"The checkpoint {path} has format {found!r}; this version of bilevel reads {FORMAT!r} "
            "(older checkpoints hold no hash of their manifest and a fingerprint computed "
            "differently, so they cannot be checked). Pass a new checkpoint_dir to start a new run, "
            "or resume it with the bilevel version that wrote it."
        )
    if manifest["step"] != step:
        raise _corrupted(path, f"it names step {manifest['step']!r} but its file name says {step}")
    if manifest.get("manifest_sha256") != _content_hash(manifest):
        raise _corrupted(path, "its content does not match the SHA-256 it was written with (the "
                               "history or another field was edited after it was saved)")


def _check_fingerprint(path: Path, saved: dict, current: dict) -> None:
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        verb = "differs" if len(differing) == 1 else "differ"
        raise ValueError(
            f"The checkpoint {path} was written by a different run: its {', '.join(differing)} "
            f"{verb} from this call's. Resuming would mix two runs. Pass the same problem (the "
            "same loss code and the same globals it reads), method, optimizers, transform, "
            "hparams0, params0 and fingerprint as the run that wrote it, or a new checkpoint_dir "
            "to start a separate run."
        )
