"""Every docstring example in fbp's public modules runs and prints what it shows.

One test per docstring. The few whose examples train a model or check a whole
one (seconds of compiling each) are marked slow; the functions they document
are exercised by the fast tests of their modules.

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

SLOW = {
    "fbp.models.generate",  # generates from a GPT (tests/test_gpt.py generates in the fast loop)
    "fbp.models.lenet5",  # initialises LeNet-5 (tests/test_models.py checks its shapes)
    "fbp.train.fit",  # trains on digits (tests/test_train.py fits in the fast loop)
    "fbp.train.fit_text",  # trains a GPT (tests/test_gpt.py's CLI test runs fit_text)
    # whole gradient checks (tests/test_verify.py runs them in the fast loop)
    "fbp.verify.__test__.check_layer",
    "fbp.verify.__test__.check_model",
    "fbp.verify.__test__.wrong_rules",
}


def _docstrings(name):
    """The docstrings of module ``name`` that hold examples, as ``doctest.DocTest``s."""
    return [
        test
        for test in doctest.DocTestFinder().find(importlib.import_module(name))
        if test.examples
    ]


CASES = [
    pytest.param(name, test.name, id=test.name, marks=[pytest.mark.slow] * (test.name in SLOW))
    for name in MODULES
    for test in _docstrings(name)
]


def test_every_module_has_examples_and_every_slow_name_exists():
    assert {name for name, *_ in (case.values for case in CASES)} == set(MODULES)
    assert {test for _, test in (case.values for case in CASES)} >= SLOW


@pytest.mark.parametrize(("module", "docstring"), CASES)
def test_docstring_examples_run(module, docstring, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    [test] = [test for test in _docstrings(module) if test.name == docstring]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {docstring}'s examples failed"
