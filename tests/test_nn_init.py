"""fbp.nn.init: the bounds and spreads PyTorch's defaults draw, on every layer that takes them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import nn
from fbp.errors import ConfigError


def _check_uniform(a, bound):
    """``a`` looks like U(−bound, bound): inside it, reaching near both ends, variance bound²/3."""
    a = np.asarray(a, np.float64).ravel()
    assert np.abs(a).max() <= bound * (1 + 1e-6), (np.abs(a).max(), bound)
    if a.size >= 200:
        assert a.min() < -0.9 * bound and a.max() > 0.9 * bound
        # the standard error of the variance of n uniforms is about 0.9·(bound²/3)/√n
        assert abs(a.var() / (bound**2 / 3) - 1) < 5 / math.sqrt(a.size), a.var()
        assert abs(a.mean()) < 4 * bound / math.sqrt(3 * a.size)


def test_uniform_is_symmetric_and_refuses_a_bad_bound():
    _check_uniform(nn.init.uniform(0.3)(jax.random.key(0), (50, 40)), 0.3)
    assert nn.init.uniform(0.3)(jax.random.key(0), (3,), jnp.float16).dtype == jnp.float16
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ConfigError, match="bound must be a finite number > 0"):
            nn.init.uniform(bad)


def test_torch_default_reads_the_fan_in_of_a_weight_and_refuses_a_bare_bias():
    torch = nn.init.torch_default()
    _check_uniform(torch(jax.random.key(0), (3, 25, 64)), 1 / math.sqrt(75))
    with pytest.raises(ConfigError, match=r"cannot read a fan-in off the shape \(10,\)"):
        torch(jax.random.key(0), (10,))
    # given the fan-in, a bias is drawn with the weight's bound
    _check_uniform(torch(jax.random.key(1), (4000,), fan_in=16), 0.25)


@pytest.mark.parametrize(
    ("layer", "input_shape", "fan_in"),
    [
        (lambda i: nn.dense(300, w_init=i, b_init=i), (50,), 50),
        (lambda i: nn.conv1d(400, 3, w_init=i, b_init=i), (12, 7), 3 * 7),
        (lambda i: nn.conv2d(300, (3, 2), w_init=i, b_init=i), (6, 6, 5), 3 * 2 * 5),
    ],
    ids=["dense", "conv1d", "conv2d"],
)
def test_dense_and_conv_draw_weight_and_bias_from_the_weights_fan_in(layer, input_shape, fan_in):
    params, _ = layer(nn.init.torch_default()).init(jax.random.key(0), input_shape)
    for leaf in ("w", "b"):
        _check_uniform(params[leaf], 1 / math.sqrt(fan_in))


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_recurrent_layers_draw_every_param_from_one_over_root_hidden(kind):
    torch = nn.init.torch_default()
    layer = getattr(nn, kind)(100, w_x_init=torch, w_h_init=torch, b_init=torch)
    params, _ = layer.init(jax.random.key(0), (5, 3))
    assert set(params) == ({"w_x", "w_h", "b", "b_hn"} if kind == "gru" else {"w_x", "w_h", "b"})
    for leaf in params.values():
        _check_uniform(leaf, 0.1)
    # without b_init the biases stay zero
    plain, _ = getattr(nn, kind)(100).init(jax.random.key(0), (5, 3))
    assert not any(np.any(plain[k]) for k in plain if k.startswith("b"))


def test_bidirectional_gru_passes_b_init_to_both_directions():
    layer = nn.gru(8, bidirectional=True, b_init=nn.init.uniform(0.5))
    params, _ = layer.init(jax.random.key(0), (4, 2))
    for direction in params:
        assert np.all(np.abs(direction["b"]) <= 0.5) and np.any(direction["b"])
        assert np.any(direction["b_hn"])


@pytest.mark.slow  # whole models (18 init programs); the layer tests above keep each draw fast
def test_mnist1d_models_draw_as_pytorch_does_unless_told_otherwise():
    cnn, _ = fbp.models.mnist1d_cnn().init(jax.random.key(0), (40,))
    bounds = {
        1: 1 / math.sqrt(5),
        3: 1 / math.sqrt(75),
        5: 1 / math.sqrt(75),
        8: 1 / math.sqrt(125),
    }
    for index, bound in bounds.items():
        for leaf in ("w", "b"):
            _check_uniform(cnn[index][leaf], bound)
        assert np.abs(cnn[index]["b"]).max() > 0.5 * bound
    gru, _ = fbp.models.mnist1d_gru().init(jax.random.key(0), (40,))
    for direction in gru[1]:
        for leaf in direction.values():
            _check_uniform(leaf, 1 / math.sqrt(6))
    _check_uniform(gru[3]["w"], 1 / math.sqrt(480))
    _check_uniform(gru[3]["b"], 1 / math.sqrt(480))
    zeros = jax.nn.initializers.zeros
    plain, _ = fbp.models.mnist1d_cnn(b_init=zeros).init(jax.random.key(0), (40,))
    assert not np.any(plain[1]["b"]) and np.any(plain[1]["w"])
