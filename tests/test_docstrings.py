"""Every docstring example in fbp's public modules runs and prints what it shows.

One test per docstring. The inner loop runs those whose examples compile
nothing or next to nothing (:data:`FAST`); the others (a model's init, eager ops and jitted
functions compile programs, 0.2-2 s apiece; a few train or check a whole
model) are slow, and the functions they document are exercised by the fast
tests of their modules.

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

# Examples compile: a model's init, an eager op, a jitted function each
# compile a program (0.2-2 s apiece), so the inner loop runs only the
# examples that compile (next to) nothing and the others are slow, as pyproject's
# policy allows for docstring examples; the functions they document are
# called by the fast tests of their modules (tests/test_<module>.py).
FAST = {
    "fbp.backprop.feedback_layers",  # on jax.eval_shape's params
    "fbp.checkpoint.save_checkpoint",
    "fbp.data.load",
    "fbp.data.load_text",
    "fbp.data.stdlib_text",
    "fbp.diagnostics.layer_names",
    # the models' shapes and parameter counts, on jax.eval_shape's params
    "fbp.models.gpt",
    "fbp.models.lenet5",
    "fbp.models.mlp",
    "fbp.models.mnist1d_cnn",
    "fbp.models.mnist1d_gru",
    "fbp.models.mnist1d_mlp",
    "fbp.models.nielsen",
    "fbp.nn.walk.leaves",
    "fbp.nn.walk.tied_groups",
    "fbp.optim.adam",
    "fbp.rules.backprop",
    "fbp.rules.sign_symmetric",
    "fbp.train.History",
    "fbp.train.gpt_optimizer",
    "fbp.verify.__test__.tolerances_for",
}


def _docstrings(name):
    """The docstrings of module ``name`` that hold examples, as ``doctest.DocTest``s."""
    return [
        test
        for test in doctest.DocTestFinder().find(importlib.import_module(name))
        if test.examples
    ]


CASES = [
    pytest.param(name, test.name, id=test.name, marks=[pytest.mark.slow] * (test.name not in FAST))
    for name in MODULES
    for test in _docstrings(name)
]


def test_every_module_has_examples_and_every_fast_name_exists():
    assert {name for name, *_ in (case.values for case in CASES)} == set(MODULES)
    assert {test for _, test in (case.values for case in CASES)} >= FAST


@pytest.mark.parametrize(("module", "docstring"), CASES)
def test_docstring_examples_run(module, docstring, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    [test] = [test for test in _docstrings(module) if test.name == docstring]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {docstring}'s examples failed"
