"""Every docstring example in fbp's public modules runs and prints what it shows.

(``tests/test_layer_contract.py`` runs the examples of every module of
``fbp.nn`` that holds a catalogued layer, and of ``fbp.nn.catalogue``.)
"""

import doctest
import importlib

import pytest

MODULES = [
    "fbp.backprop",
    "fbp.checkpoint",
    "fbp.cli",
    "fbp.data",
    "fbp.diagnostics",
    "fbp.models",
    "fbp.nn.init",
    "fbp.nn.walk",
    "fbp.optim",
    "fbp.quantities",
    "fbp.rules",
    "fbp.train",
    "fbp.verify",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {name}'s examples failed"
