"""The layer contract, held by every case of :data:`fbp.nn.catalogue.LAYERS` and a user's layer.

For every case, in float32 and float64: the hand backward equals ``jax.vjp``
of the same forward (``dparams`` and ``dx``); ``y`` has the shape ``init``
announced and keeps the input's dtype; ``dparams`` mirrors ``params``
(structure, shapes, dtypes) and ``dx`` mirrors ``x`` (float0 for integer
ids); jit equals eager. Also: a bad input's message names the layer, the
docstring examples run, and every public layer factory has a case.

Compile time dominates on small machines, so each layer family (the module
of its factory) compiles ONE program per dtype holding every case's forward,
backward and ``jax.vjp`` (layers are static, params and inputs arguments).
The inner loop compiles the float64 one (the math); in float32 it traces the
same program with ``jax.eval_shape`` (shapes, dtypes, ``dparams`` mirroring
``params``; nothing compiled) and the slow sweep compares float32's values.
An eager run compiles one small program per operation and shape, more than
the family's whole jitted program: the inner loop runs one representative
case per family eagerly (:data:`EAGER`, float64, the same inputs) and compares
it with the jitted results; the slow sweep runs every other case eagerly in
float32. A new layer joins every test here by one line in the catalogue (or
in ``CASES``).
"""

import doctest
import functools
import importlib
import inspect
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import TOL, device_array, init_shapes, rel_err, tree_rel_errs
from user_layer import gated_linear

from fbp import nn
from fbp.errors import FbpError
from fbp.nn import catalogue
from fbp.nn.catalogue import Case

CASES = (
    *catalogue.LAYERS,
    Case("gated_linear", functools.partial(gated_linear, 3), (4,), "user-defined", bad_input=""),
)
BATCH = 3


class Drawn(NamedTuple):
    """One case's layer and its inputs at one dtype."""

    layer: nn.Layer
    out_shape: tuple[int, ...]
    params: object
    x: jax.Array
    dy: jax.Array
    key: jax.Array


def _draw(case, index, dtype):
    """Params (``init`` traced for the shapes only), input and cotangent, from numpy.

    Drawing with numpy compiles nothing. Every param leaf is drawn in ``dtype``
    (biases non-zero); running variances are kept positive.
    """
    layer = case.build()
    params, out_shape = init_shapes(layer, case.input_shape)
    rng = np.random.default_rng(index)

    def draw_leaf(path, leaf):
        scale = 1 / np.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.5
        values = scale * rng.standard_normal(leaf.shape)
        if any(getattr(k, "key", None) == "var" for k in path):
            values = 0.5 + np.abs(values)
        return device_array(values, dtype)

    params = jax.tree_util.tree_map_with_path(draw_leaf, params)
    shape = (BATCH, *case.input_shape)
    if case.vocab:
        x = device_array(rng.integers(0, case.vocab, shape), jnp.int32)  # with repeats
    else:
        x = device_array(rng.standard_normal(shape), dtype)
    dy = device_array(rng.standard_normal((BATCH, *out_shape)), dtype)
    return Drawn(layer, tuple(out_shape), params, x, dy, jax.random.key(index))


def _forward_and_backward(case, layer, params, x, dy, key):
    y, cache = layer.forward(params, x, **case.side_inputs(key))
    return y, layer.backward(params, cache, dy)


def _every_case(cases, layers, inputs):
    """Each case's hand forward and backward, and ``jax.vjp`` of the same forward."""
    results = []
    for case, layer, (params, x, dy, key) in zip(cases, layers, inputs, strict=True):
        y, (dparams, dx) = _forward_and_backward(case, layer, params, x, dy, key)
        side = case.side_inputs(key)
        _, vjp = jax.vjp(
            lambda p, x, layer=layer, side=side: layer.forward(p, x, **side)[0], params, x
        )
        results.append((y, dparams, dx, vjp(dy)))
    return results


def _factory(case):
    return getattr(case.build, "func", case.build)


def _family(case):
    return _factory(case).__module__.rsplit(".", 1)[-1]


FAMILIES = sorted({_family(case) for case in CASES})


def _family_inputs(family, dtype):
    """One family's cases, their draws at ``dtype``, and the family's function of the inputs."""
    cases = [(i, case) for i, case in enumerate(CASES) if _family(case) == family]
    drawn = [_draw(case, i, dtype) for i, case in cases]
    layers = tuple(d.layer for d in drawn)
    inputs = [(d.params, d.x, d.dy, d.key) for d in drawn]
    run = functools.partial(_every_case, tuple(case for _, case in cases), layers)
    return [case for _, case in cases], drawn, run, inputs


@functools.cache
def _results(family, dtype):
    """One family's cases, draws and its one compiled program's results at ``dtype``."""
    with jax.enable_x64(dtype == "float64"):
        cases, drawn, run, inputs = _family_inputs(family, dtype)
        jitted = jax.jit(run)(inputs)
    return cases, drawn, jitted


def _shapes(family, dtype):
    """The same as :func:`_results`, traced only: the results' shapes and dtypes (no compile)."""
    with jax.enable_x64(dtype == "float64"):
        cases, drawn, run, inputs = _family_inputs(family, dtype)
        return cases, drawn, jax.eval_shape(run, inputs)


def _close(a, b, tol):
    if a.dtype == jax.dtypes.float0 or b.dtype == jax.dtypes.float0:
        return a.dtype == b.dtype and a.shape == b.shape
    return rel_err(a, b) < tol


def _contract_failures(case, drawn, jitted, dtype, *, numeric=True):
    """What ``case`` breaks of the contract at ``dtype``, as messages (empty: none).

    ``numeric=False`` (``jitted`` holds shapes and dtypes, :func:`_shapes`)
    checks all but the comparisons with ``jax.vjp``'s values.
    """
    y, dparams, dx, (dparams_ref, dx_ref) = jitted
    tol, failures = TOL[dtype], []
    if y.shape != (BATCH, *drawn.out_shape):
        failures.append(f"y has shape {y.shape}, init announced (batch, *{drawn.out_shape})")
    expected_y_dtype = drawn.x.dtype if not case.vocab else jnp.dtype(dtype)
    if y.dtype != expected_y_dtype:
        failures.append(f"y is {y.dtype}, the input {expected_y_dtype}")
    try:
        chex.assert_trees_all_equal_shapes_and_dtypes(dparams, drawn.params)
    except AssertionError as error:
        failures.append(f"dparams does not mirror params: {error}")
    else:
        for path, err in tree_rel_errs(dparams, dparams_ref) if numeric else []:
            if err >= tol:
                failures.append(f"dparams{path} differs from jax.vjp's by {err:.1e}")
    if dx.shape != drawn.x.shape:
        failures.append(f"dx has shape {dx.shape}, x {drawn.x.shape}")
    expected_dx_dtype = jax.dtypes.float0 if case.vocab else drawn.x.dtype
    if dx.dtype != expected_dx_dtype:
        failures.append(f"dx is {dx.dtype}, expected {expected_dx_dtype}")
    elif numeric and not _close(dx, dx_ref, tol):
        failures.append(f"dx differs from jax.vjp's by {rel_err(dx, dx_ref):.1e}")
    return [f"{case.title}: {failure}" for failure in failures]


# float64 proves the math in the inner loop; in float32 the inner loop checks
# what the dtype can break without running a program (shapes, dtypes: traced
# with ``jax.eval_shape``), and the slow sweep compares the values too.
#
# The same test compares the family's jitted results with eager runs (see EAGER
# below): in float64 the inner loop's representative case, in float32 the slow
# sweep's every other case. One test per family and dtype uses its compiled
# program, so xdist never compiles it twice in two processes.
@pytest.mark.parametrize("dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", FAMILIES)
def test_hand_backward_equals_vjp_and_dparams_mirror_params_and_jit_equals_eager(family, dtype):
    cases, drawn, jitted = _results(family, dtype)
    failures = [
        failure
        for case, d, j in zip(cases, drawn, jitted, strict=True)
        for failure in _contract_failures(case, d, j, dtype)
    ]
    failures += _eager_failures(family, _eager_titles(family, dtype), dtype)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_keeps_shapes_and_dtypes_and_dparams_mirror_params(family):
    cases, drawn, shapes = _shapes(family, "float32")
    failures = [
        failure
        for case, d, j in zip(cases, drawn, shapes, strict=True)
        for failure in _contract_failures(case, d, j, "float32", numeric=False)
    ]
    assert not failures, "\n".join(failures)


# One case per family runs eagerly in the inner loop: a cheap one that still
# takes the family's own code path (scan, patches, index cache, id check, key).
EAGER = {
    "activations": "gelu",
    "attention": "self_attention (causal)",
    "bridge": "from_jax (jax.vjp bridge)",
    "conv": "conv1d",
    "core": "serial",
    "dense": "dense",
    "dropout": "dropout (training)",
    "embedding": "embedding",
    "norm": "batch_norm (training)",
    "pool": "max_pool (1-D)",
    "recompute": "recompute (GELU and dense)",
    "recurrent": "rnn",
    "tie": "tie (embedding read out by the tied head)",
    "user_layer": "gated_linear (user-defined)",
}


def _eager_failures(family, titles, dtype):
    """Where the eager run of the cases titled ``titles`` differs from the jitted one."""
    cases, drawn, jitted = _results(family, dtype)
    failures = []
    with jax.enable_x64(dtype == "float64"):
        for case, d, (y, dparams, dx, _) in zip(cases, drawn, jitted, strict=True):
            if case.title not in titles:
                continue
            eager_y, (eager_dparams, eager_dx) = _forward_and_backward(
                case, d.layer, d.params, d.x, d.dy, d.key
            )
            compared = (
                ("y", y, eager_y),
                ("dparams", dparams, eager_dparams),
                ("dx", dx, eager_dx),
            )
            for what, a, b in compared:
                leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
                if not all(_close(u, v, TOL[dtype]) for u, v in leaves):
                    failures.append(f"{case.title}: jit differs from eager in {what}")
    return failures


def test_every_family_has_one_eager_case():
    titles = {case.title: _family(case) for case in CASES}
    assert sorted(EAGER) == FAMILIES
    assert all(titles.get(title) == family for family, title in EAGER.items()), EAGER


def _eager_titles(family, dtype):
    """The cases run eagerly: in float64 (the inner loop, whose jitted program it has
    compiled) the family's representative; in float32 (the slow sweep, against
    float32's jitted program, which it compiles anyway) every other case."""
    if dtype == "float64":
        return {EAGER[family]}
    return {case.title for case in CASES if _family(case) == family} - {EAGER[family]}


def test_eager_cases_cover_every_case_once():
    for family in FAMILIES:
        titles = [case.title for case in CASES if _family(case) == family]
        both = [*_eager_titles(family, "float64"), *_eager_titles(family, "float32")]
        assert sorted(both) == sorted(titles), family


@pytest.mark.parametrize("case", [c for c in CASES if c.bad_input], ids=lambda c: c.title)
def test_a_bad_input_names_the_layer(case):
    drawn = _draw(case, 0, "float32")
    shape = drawn.x.shape
    if case.bad_input == "features":
        shape = (*shape[:-1], shape[-1] + 1)
        dtype = drawn.x.dtype
    else:  # floats for ids, integers for floats
        dtype = jnp.float32 if case.vocab else jnp.int32
    bad = jax.ShapeDtypeStruct(shape, dtype)
    with pytest.raises(FbpError, match=case.message):
        jax.eval_shape(
            lambda p, x: drawn.layer.forward(p, x, **case.side_inputs(drawn.key)),
            drawn.params,
            bad,
        )


MODULES = sorted({_factory(case).__module__ for case in CASES} | {"fbp.nn.catalogue"})
# Factories whose docstrings have no example yet (their modules' other examples still run).
WITHOUT_EXAMPLES = {
    "identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "softplus",
    "elementwise", "flatten", "residual", "gated_linear",
}  # fmt: skip


# The layers' examples run eagerly, as a reader would (one compiled program
# per operation and shape, 1-5 s a module): slow, as pyproject's policy
# allows for docstring examples; the inner loop runs every layer through the
# tests above. The catalogue's example compiles nothing.
@pytest.mark.parametrize(
    "module",
    [m if m == "fbp.nn.catalogue" else pytest.param(m, marks=pytest.mark.slow) for m in MODULES],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {module}'s examples failed"


def test_every_layer_factory_shows_an_example():
    finder = doctest.DocTestFinder(recurse=False)
    without = {
        case.name
        for case in CASES
        if not any(test.examples for test in finder.find(_factory(case), globs={}))
    }
    assert without == WITHOUT_EXAMPLES


def _public_layer_factories():
    for name in nn.__all__:
        factory = getattr(nn, name)
        if callable(factory) and not inspect.isclass(factory):
            returns = inspect.signature(factory).return_annotation
            if returns in ("Layer", nn.Layer):
                yield name


def _missing(cases):
    """Public layer factories of ``fbp.nn`` without a case of their exact name."""
    return set(_public_layer_factories()) - {case.name for case in cases}


def test_every_public_layer_has_a_case_by_exact_name():
    missing = _missing(catalogue.LAYERS)
    assert not missing, f"fbp.nn.catalogue has no case for {sorted(missing)}"
    for case in catalogue.LAYERS:
        assert _factory(case) is getattr(nn, case.name), f"{case.title} builds another factory"


def test_a_missing_layer_is_noticed_by_its_exact_name():
    # max_over_time shares its prefix with max_pool and mean_over_time.
    without = [case for case in catalogue.LAYERS if case.name != "max_over_time"]
    assert _missing(without) == {"max_over_time"}
    assert "update_batch_stats" not in set(_public_layer_factories())  # not a layer factory
