"""Tests of fbp.nn.dropout: inverted dropout with an explicit key.

References: ``jax.vjp`` of the layer's own forward (same key, so the same
mask), ``jax.grad`` of a composed forward, and the mask's statistics.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import TOL, device_array, draw, numpy_params

import fbp
from fbp import losses, nn
from fbp.errors import ConfigError, DTypeError, ShapeError

CASES = [(0.5, (7, 3)), (0.1, (4, 5, 2)), (0.9, (6,))]  # (rate, shape)


def _dropout_program(dtype):
    """Every (rate, shape)'s input and cotangent at ``dtype`` and ONE function running them."""
    layers = [nn.dropout(rate) for rate, _ in CASES]
    rng = np.random.default_rng(0)
    inputs = [
        (
            device_array(rng.standard_normal((3, *shape)), dtype),
            device_array(rng.standard_normal((3, *shape)), dtype),
        )
        for _, shape in CASES
    ]

    def run(inputs, key):
        out = []
        for layer, (x, dy) in zip(layers, inputs, strict=True):
            y, cache = layer.forward({}, x, key=key, train=True)
            _, vjp = jax.vjp(lambda x, layer=layer: layer.forward({}, x, key=key, train=True)[0], x)
            out.append((y, cache, layer.backward({}, cache, dy), vjp(dy)[0]))
        return out

    return run, inputs


# float64 proves the math in the inner loop; float32's values are a slow sweep
# (as test_layer_contract's), its dtypes are checked fast without compiling.
@pytest.mark.parametrize("dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
def test_backward_matches_vjp_with_the_same_key(dtype):
    """Every (rate, shape) in one program per dtype."""
    with jax.enable_x64(dtype == "float64"):
        run, inputs = _dropout_program(dtype)
        results = jax.jit(run)(inputs, jax.random.key(1))
    for (rate, _), (x, dy), (y, mask, (dparams, dx), dx_ref) in zip(
        CASES, inputs, results, strict=True
    ):
        assert dparams == {} and mask.dtype == jnp.bool_ and mask.shape == x.shape
        assert y.dtype == dx.dtype == x.dtype
        np.testing.assert_allclose(dx, dx_ref, rtol=TOL[dtype], atol=0)
        np.testing.assert_allclose(
            y, np.where(mask, np.asarray(x) / (1 - rate), 0), rtol=TOL[dtype]
        )
        np.testing.assert_allclose(
            dx, np.where(mask, np.asarray(dy) / (1 - rate), 0), rtol=TOL[dtype]
        )


def test_float32_keeps_its_dtype():
    """The float32 program traced (jax.eval_shape), not compiled: y and dx stay float32."""
    run, inputs = _dropout_program("float32")
    results = jax.eval_shape(run, inputs, jax.random.key(1))
    for (x, _), (y, mask, (dparams, dx), dx_ref) in zip(inputs, results, strict=True):
        assert dparams == {} and mask.dtype == jnp.bool_ and mask.shape == x.shape
        assert y.dtype == dx.dtype == dx_ref.dtype == jnp.float32
        assert y.shape == dx.shape == x.shape


def test_rate_is_the_probability_of_dropping():
    x = np.ones((200, 500), np.float32)
    y, mask = jax.tree.map(
        np.asarray,  # numpy: the statistics below compile nothing
        jax.jit(lambda x, key: nn.dropout(0.3).forward({}, x, key=key, train=True))(
            x, jax.random.key(0)
        ),
    )
    dropped = 1 - float(mask.mean())
    assert abs(dropped - 0.3) < 0.005  # 1e5 draws: standard error 0.0015
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.7], rtol=1e-6)
    assert abs(float(y.mean()) - 1.0) < 0.01  # inverted: the mean is kept


def test_different_keys_draw_different_masks():
    layer, x = nn.dropout(0.5), np.ones((4, 8), np.float32)
    a, b = jax.jit(lambda x, k0, k1: [layer.apply({}, x, key=k, train=True) for k in (k0, k1)])(
        x, jax.random.key(0), jax.random.key(1)
    )
    assert not np.array_equal(a, b)


def test_inference_and_rate_zero_are_the_identity():
    x = device_array(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
    for layer, kw in (
        (nn.dropout(0.5), {}),
        (nn.dropout(0.5), {"key": jax.random.key(0)}),
        (nn.dropout(0.0), {"train": True}),
    ):
        y, cache = layer.forward({}, x, **kw)
        np.testing.assert_array_equal(y, x)
        assert cache == ()
        np.testing.assert_array_equal(layer.backward({}, cache, 2 * x)[1], 2 * x)


def test_composed_matches_jax_grad_with_the_same_key():
    model = nn.serial(nn.dense(16), nn.relu(), nn.dropout(0.5), nn.dense(3), nn.dropout(0.2))
    with jax.enable_x64(True):
        _, params, x, _ = draw(model, (5,), 8, "float64", 0)  # numpy draws: nothing compiles
        labels = device_array(np.random.default_rng(0).integers(0, 3, 8), jnp.int32)
        key, loss = jax.random.key(7), losses.softmax_cross_entropy

        @jax.jit  # one program: fbp's gradients and autodiff's, with the same key
        def both(params, x, labels, key):
            def reference(p):
                return loss.value(model.apply(p, x, key=key, train=True), labels)

            return fbp.value_and_grad(model, loss)(params, x, labels, key=key), (
                jax.value_and_grad(reference)(params)
            )

        (value, grads), (ref_value, ref_grads) = both(params, x, labels, key)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rate_out_of_range(rate):
    with pytest.raises(
        ConfigError,
        match=r"dropout: rate is the probability of dropping a unit and must lie in \[0, 1\), got",
    ):
        nn.dropout(rate)


@pytest.mark.parametrize("rate", [True, "0.5", None])
def test_rate_not_a_number(rate):
    with pytest.raises(ConfigError, match=r"dropout: rate must be a number in \[0, 1\), got"):
        nn.dropout(rate)


def test_train_without_a_key():
    with pytest.raises(ConfigError, match=r"dropout\(0.5\): train=True needs a key= to draw"):
        nn.dropout(0.5).forward({}, np.ones((2, 3), np.float32), train=True)
    model = nn.serial(nn.dense(3), nn.dropout(0.5))
    params = numpy_params(model, (2,))
    x, y = np.ones((4, 2), np.float32), np.ones((4, 3), np.float32)
    with pytest.raises(ConfigError, match=r"serial layer 1 \(dropout\(0.5\)\): train=True needs"):
        jax.eval_shape(fbp.value_and_grad(model, losses.mse), params, x, y)  # raised while tracing


def test_input_errors():
    with pytest.raises(DTypeError, match=r"dropout\(0.5\): expected a floating-point input"):
        nn.dropout(0.5).forward({}, np.ones((2, 3), np.int32))
    with pytest.raises(ShapeError, match=r"dropout\(0.5\): takes no parameters"):
        nn.dropout(0.5).forward({"w": np.ones(3, np.float32)}, np.ones((2, 3), np.float32))
