"""Every ```python block of the documentation pages runs.

Each page is one test: its blocks run in order in one shared namespace, because the
snippets of a page build on each other. Two exceptions:

- a block is skipped when the line immediately before its opening fence is
  `<!-- docs-test: skip -->`;
- a block with a file name (```` ```python title="sharded.py" ````) is a standalone script
  that the reader saves and runs on its own, so it runs in a fresh namespace and leaves the
  page's namespace untouched.

The reproduction pages (whose numbers come from the benchmark scripts) and the API
reference (whose examples are the docstrings, run by tests/test_docs.py) are not run here.

tests/conftest.py has already forced 8 host CPU devices and enabled float64, which is what
the pages assume. The pages' examples are small, so the time goes into compiling them, not
running them; the tests below therefore compile with XLA's optimisations mostly switched
off (`jax_disable_most_optimizations`), which roughly halves their time.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import NamedTuple

import jax
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
SKIP_MARKER = "<!-- docs-test: skip -->"
EXCLUDED = {Path("api.md")}
EXCLUDED_DIRS = {"reproductions"}

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def _pages() -> list[Path]:
    pages = []
    for path in sorted(DOCS.rglob("*.md")):
        rel = path.relative_to(DOCS)
        if rel in EXCLUDED or rel.parts[0] in EXCLUDED_DIRS:
            continue
        pages.append(rel)
    return pages


class Block(NamedTuple):
    line: int  # 1-based line of the opening fence
    code: str
    skipped: bool  # preceded by the skip marker
    standalone: bool  # has a title="file.py": a script of its own


def python_blocks(text: str) -> list[Block]:
    """Every fenced block whose language is `python`, in page order."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        close = re.compile(rf"^{re.escape(indent)}{fence[0]}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        language = info.split()[0] if info else ""
        if language == "python":
            skipped = i > 0 and lines[i - 1].strip() == SKIP_MARKER
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            blocks.append(Block(i + 1, code, skipped, "title=" in info))
        i = end + 1
    return blocks


def test_the_block_parser():
    text = "\n".join([
        "```python",
        "a = 1",
        "```",
        "<!-- docs-test: skip -->",
        '```python title="x.py"',
        "b = 2",
        "```",
        "```bash",
        "echo hi",
        "```",
        "!!! note",
        "    ```python",
        "    c = 3",
        "    ```",
    ])
    assert python_blocks(text) == [
        Block(1, "a = 1", False, False),
        Block(5, "b = 2", True, True),
        Block(12, "c = 3", False, False),
    ]


@pytest.fixture(scope="module")
def quick_compilation():
    """Compile with few optimisations while the pages run; restore the setting after."""
    name = "jax_disable_most_optimizations"
    previous = jax.config.read(name)
    jax.config.update(name, True)
    yield
    jax.config.update(name, previous)


@pytest.fixture
def restore_global_state():
    """Undo what pages change for the rest of the session.

    The sharding how-to sets XLA_FLAGS (harmless once JAX has started, but it should not
    leak), and the testing guide registers and loads its own hypothesis profile.
    """
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
    try:
        from hypothesis import settings
    except ImportError:  # pragma: no cover
        return
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.mark.parametrize("page", _pages(), ids=str)
def test_page_runs(page, tmp_path, monkeypatch, quick_compilation, restore_global_state):
    blocks = python_blocks((DOCS / page).read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{page} has no python blocks")
    monkeypatch.chdir(tmp_path)  # a page may write files; keep them out of the checkout
    page_namespace: dict = {"__name__": f"docs_{page.stem}"}
    for block in blocks:
        if block.skipped:
            continue
        namespace = {"__name__": "__main__"} if block.standalone else page_namespace
        exec(compile(block.code, f"docs/{page}:{block.line}", "exec"), namespace)


# ---------------------------------------------------------------- the README's example

README = DOCS.parent / "README.md"


def _section_blocks(path: Path, heading: str) -> list[str]:
    """The python blocks under a `## heading`, up to the next `## ` heading."""
    text = path.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return [block.code for block in python_blocks(text[start : end if end != -1 else None])]


def test_readme_example_is_the_home_page_example():
    """The README's "Use it" example and the docs home page's first hypergradient cannot drift apart."""
    readme = _section_blocks(README, "Use it")[:2]
    home = _section_blocks(DOCS / "index.md", "A first hypergradient")
    assert len(home) == 2 and readme == home


def test_readme_example_sweep_finds_an_interior_optimum(quick_compilation):
    """The README's 64-point sweep brackets the best λ: its hypergradient changes sign inside.

    (An earlier example drew the validation inputs with the training key, so they equalled
    the training inputs plus 0.1 and the best λ was −∞.)
    """
    import numpy as np

    namespace: dict = {"__name__": "readme"}
    for code in _section_blocks(README, "Use it")[:2]:
        exec(compile(code, "README.md", "exec"), namespace)
    grads, values = np.asarray(namespace["many"].grad), np.asarray(namespace["many"].value)
    assert grads[0] < 0 < grads[-1], grads
    assert 0 < values.argmin() < len(values) - 1
