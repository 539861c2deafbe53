"""Every public name of `bilevel` is documented, and every docstring example runs."""

import inspect
import re

import pytest

import bilevel as bl

PUBLIC = {name: getattr(bl, name) for name in dir(bl) if not name.startswith("_")}
FUNCTIONS = {n: o for n, o in PUBLIC.items() if inspect.isfunction(o)}
METHODS_WITH_DOCS = [bl.Online.init, bl.Online.step, bl.Online.run, bl.HyperOpt.init, bl.HyperOpt.step,
                     bl.HypertrainGlobal.init, bl.HypertrainGlobal.step, bl.Hypertrain.init, bl.Hypertrain.step]


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


@pytest.mark.parametrize("code", list(_examples()))
def test_docstring_examples_run(code):
    exec(compile(code, "<docstring>", "exec"), {})
