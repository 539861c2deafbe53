"""Every public name of `bilevel` is documented, and every docstring example runs.

The examples are small, so their time is compilation (most of it LLVM's backend
optimisation): like the documentation pages (tests/test_docs_pages.py) they run with
`jax_disable_most_optimizations`.
"""

import inspect
import re

import jax
import pytest

import bilevel as bl

PUBLIC = {name: getattr(bl, name) for name in dir(bl) if not name.startswith("_")}
FUNCTIONS = {n: o for n, o in PUBLIC.items() if inspect.isfunction(o)}
METHODS_WITH_DOCS = [bl.Online.init, bl.Online.step, bl.Online.run, bl.HyperOpt.init, bl.HyperOpt.step,
                     bl.HypertrainGlobal.init, bl.HypertrainGlobal.step, bl.Hypertrain.init, bl.Hypertrain.step]
METHODS_WITH_DOCS += [getattr(cls, name) for cls in (bl.SOBA, bl.SABA, bl.StocBiO, bl.AmIGO, bl.F2SA, bl.BOME)
                      for name in ("init", "step", "run")]
METHODS_WITH_DOCS += [bl.Sampler.index, bl.Sampler.draw, bl.Sampler.indices, bl.SABAMemory.flushed]


def _examples():
    for name, obj in sorted(PUBLIC.items()):
        doc = inspect.getdoc(obj) or ""
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc, re.S)):
            yield pytest.param(block, id=f"{name}-{i}")


def test_every_public_name_has_a_docstring():
    for name, obj in PUBLIC.items():
        if inspect.ismodule(obj) or name == "__version__" or isinstance(obj, str):
            continue
        assert inspect.getdoc(obj), name


def test_every_public_function_has_arguments_returns_and_an_example():
    for name, fn in FUNCTIONS.items():
        doc = inspect.getdoc(fn)
        sections = ["**Returns:**", "**Example:**"]
        if inspect.signature(fn).parameters:
            sections.append("**Arguments:**")
        for section in sections:
            assert section in doc, (name, section)
    for fn in METHODS_WITH_DOCS:
        assert "**Returns:**" in inspect.getdoc(fn), fn


@pytest.fixture(scope="module")
def quick_compilation():
    """Compile with few optimisations while the examples run; restore the setting after."""
    name = "jax_disable_most_optimizations"
    previous = jax.config.read(name)
    jax.config.update(name, True)
    yield
    jax.config.update(name, previous)


@pytest.mark.parametrize("code", list(_examples()))
def test_docstring_examples_run(code, quick_compilation):
    exec(compile(code, "<docstring>", "exec"), {})


def test_the_docs_site_loads_nothing_from_the_network():
    """MathJax is vendored (docs/javascripts/mathjax) and the theme's web fonts are off, so an
    offline build or `mkdocs serve` renders its maths: no script, style or font from a URL."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    config = (root / "mkdocs.yml").read_text(encoding="utf-8")
    assets = []
    for section in ("extra_javascript", "extra_css"):
        block = re.search(rf"^{section}:\n((?:[ \t]+-.*\n?)+)", config, re.M)
        assets += [re.sub(r"\s+#.*", "", line.split("-", 1)[1]).strip() for line in block[1].splitlines()] if block else []
    assert "javascripts/mathjax/tex-chtml.js" in assets
    for asset in assets:
        assert not re.match(r"[a-z]+://|//", asset), f"{asset} is fetched from the network"
        assert (root / "docs" / asset).is_file(), asset
    fonts = root / "docs/javascripts/mathjax/output/chtml/fonts/woff-v2"
    assert (fonts / "MathJax_Main-Regular.woff").is_file() and len(list(fonts.glob("*.woff"))) == 23
    assert re.search(r"^  font: false\b", config, re.M), "theme.font must be false (Google Fonts is a network fetch)"
