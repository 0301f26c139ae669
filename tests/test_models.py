"""fbp.models: the reference networks' shapes and parameter counts.

Shapes come from ``jax.eval_shape`` (nothing is compiled); their accuracies
are measured in tests/test_cli.py and benchmarks/bench_rules_accuracy.py;
their docstring examples run in tests/test_docstrings.py.
"""

import math

import jax
import numpy as np
import pytest

import fbp
from fbp import cli, models


def _shapes(model, input_shape):
    """``(param shapes, output shape)`` of ``model`` at ``input_shape``, without compiling."""
    out_shape = []

    def init():
        params, shape = model.init(jax.random.key(0), input_shape)
        out_shape.append(tuple(shape))  # plain ints, seen at trace time
        return params

    params = jax.eval_shape(init)
    return jax.tree.map(lambda p: tuple(p.shape), params), out_shape[0]


def _count(param_shapes) -> int:
    return sum(math.prod(s) for s in jax.tree.leaves(param_shapes, is_leaf=_is_shape))


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


# (factory, input shape, output shape, parameter count) — the counts docs/results.md quotes.
MODELS = {
    "mnist1d_cnn": (models.mnist1d_cnn, (40,), (10,), 5210),
    "mnist1d_cnn (3 classes, 4 channels)": (
        lambda: models.mnist1d_cnn(3, channels=4),
        (40,),
        (3,),
        (5 * 1 * 4 + 4) + 2 * (3 * 4 * 4 + 4) + (5 * 4 * 3 + 3),
    ),
    "mnist1d_gru": (models.mnist1d_gru, (40,), (10,), 5110),
    "lenet5": (models.lenet5, (28, 28, 1), (10,), 61706),
    "lenet5 (3 classes)": (lambda: models.lenet5(3), (28, 28, 1), (3,), 61706 - 7 * 85),
    "mlp (8×8 in, 32-16 tanh, 3 out)": (
        lambda: models.mlp((32, 16), 3, "tanh"),
        (8, 8),
        (3,),
        (64 * 32 + 32) + (32 * 16 + 16) + (16 * 3 + 3),
    ),
    "mnist1d_mlp": (models.mnist1d_mlp, (40,), (10,), 40 * 256 + 256 + 256 * 257 + 2570),
    "nielsen 784-30-10": (models.nielsen, (784,), (10,), 23860),
    "nielsen, sigmoid outputs": (
        lambda: models.nielsen(sigmoid_outputs=True),
        (784,),
        (10,),
        23860,
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_output_shape_and_parameter_count(name):
    factory, input_shape, out_shape, count = MODELS[name]
    param_shapes, got = _shapes(factory(), input_shape)
    assert got == out_shape
    assert _count(param_shapes) == count


def test_lenet5_layers_are_lecun_1998_sizes():
    param_shapes, _ = _shapes(models.lenet5(), (28, 28, 1))
    weights = [p["w"] for p in param_shapes if "w" in p]
    assert weights == [(5, 5, 1, 6), (5, 5, 6, 16), (400, 120), (120, 84), (84, 10)]
    model = models.lenet5()
    out = jax.eval_shape(
        lambda p, x: model.apply(p, x),
        jax.eval_shape(lambda: model.init(jax.random.key(0), (28, 28, 1))[0]),
        jax.ShapeDtypeStruct((2, 28, 28, 1), "float32"),
    )
    assert out.shape == (2, 10)


def test_every_layer_with_weights_takes_part_in_the_rules():
    model = models.lenet5()
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), (28, 28, 1))[0])
    layers = fbp.backprop.feedback_layers(model, params)
    assert [f.site.label for f in layers] == ["0", "3", "7", "9", "11"]


def test_cli_keeps_its_old_names_as_aliases():
    assert cli.build_cnn1d is models.mnist1d_cnn
    assert cli.build_gru is models.mnist1d_gru
    assert fbp.models is models
    assert set(models.__all__) == {
        "generate",
        "gpt",
        "lenet5",
        "mlp",
        "mnist1d_cnn",
        "mnist1d_gru",
        "mnist1d_mlp",
        "nielsen",
    }
    assert cli.ACTIVATIONS is models.ACTIVATIONS


def test_mlp_layers_and_initialisation_follow_the_activation():
    relu = models.mlp((5,), 2, "relu")
    assert [layer.name for layer in relu.children] == ["flatten", "dense(→5)", "relu", "dense(→2)"]
    w_relu = relu.init(jax.random.key(0), (400,))[0][1]["w"]
    w_tanh = models.mlp((5,), 2, "tanh").init(jax.random.key(0), (400,))[0][1]["w"]
    # He-normal has twice LeCun-normal's variance: std ratio √2 (400·5 draws each).
    assert 1.25 < float(np.std(w_relu) / np.std(w_tanh)) < 1.6  # numpy: no programs
    assert models.nielsen(sigmoid_outputs=True).children[-1].name == "sigmoid"
    with pytest.raises(fbp.ConfigError, match=r"mlp: activation must be one of .*'swish'"):
        models.mlp((4,), 2, "swish")
