"""Contract tests for fbp.nn's foundation layers.

The references are independent of fbp: ``jax.nn``'s activations and
``jax.vjp`` of plain ``jnp`` expressions.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import device_array, draw, init_shapes, numpy_params, rel_err

from fbp import nn

# name -> (fbp layer factory, independent jax reference of the forward)
ACTIVATIONS = {
    "identity": (nn.identity, lambda x: x),
    "sigmoid": (nn.sigmoid, jax.nn.sigmoid),
    "tanh": (nn.tanh, jnp.tanh),
    "relu": (nn.relu, jax.nn.relu),
    "leaky_relu": (nn.leaky_relu, jax.nn.leaky_relu),
    "leaky_relu(0.2)": (
        functools.partial(nn.leaky_relu, 0.2),
        functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
    ),
    "elu": (nn.elu, jax.nn.elu),
    "elu(0.5)": (functools.partial(nn.elu, 0.5), functools.partial(jax.nn.elu, alpha=0.5)),
    "gelu": (nn.gelu, functools.partial(jax.nn.gelu, approximate=True)),
    "gelu(exact)": (
        functools.partial(nn.gelu, approximate=False),
        functools.partial(jax.nn.gelu, approximate=False),
    ),
    "softplus": (nn.softplus, jax.nn.softplus),
}


def _activation_case(layer, reference, x, dy):
    """Forward and backward of ``layer`` next to jax.vjp of the reference."""
    y, cache = layer.forward({}, x)
    dparams, dx = layer.backward({}, cache, dy)
    y_ref, vjp = jax.vjp(reference, x)
    (dx_ref,) = vjp(dy)
    return y, dx, y_ref, dx_ref, dparams


def _activation_program(dtype):
    """Every activation's inputs at ``dtype`` and ONE function running them all."""
    layers = {name: (factory(), reference) for name, (factory, reference) in ACTIVATIONS.items()}
    inputs = {}
    for name in ACTIVATIONS:
        rng = np.random.default_rng(sum(map(ord, name)))
        # Wide range, including large magnitudes where naive formulas overflow,
        # plus exact zeros (the ReLU kink, where the derivative is taken as 0).
        x = 6 * rng.standard_normal((7, 33))
        x[0, :5] = [0.0, -0.0, 80.0, -80.0, 1e-30]
        inputs[name] = (
            device_array(x, dtype),
            device_array(rng.standard_normal(x.shape), dtype),
        )

    def run(inputs):
        return {name: _activation_case(*layers[name], x, dy) for name, (x, dy) in inputs.items()}

    return run, inputs


# float64 proves the math in the inner loop; float32's values are a slow sweep
# (as test_layer_contract's), its dtypes are checked fast without compiling.
@pytest.mark.parametrize("dtype", [pytest.param("float32", marks=pytest.mark.slow), "float64"])
def test_activation_matches_jax_reference(dtype):
    """Every activation against its jax.nn reference, in one program per dtype."""
    with jax.enable_x64(dtype == "float64"):
        run, inputs = _activation_program(dtype)
        results = jax.jit(run)(inputs)
    tol = 1e-12 if dtype == "float64" else 2e-6
    for name, (y, dx, y_ref, dx_ref, dparams) in results.items():
        assert y.dtype == dx.dtype == jnp.dtype(dtype), name
        assert dparams == {}, name
        assert rel_err(y, y_ref) < tol, name
        assert rel_err(dx, dx_ref) < tol, name
        assert np.all(np.isfinite(dx)), name


def test_activations_keep_float32():
    """The float32 program traced (jax.eval_shape), not compiled: y and dx stay float32."""
    run, inputs = _activation_program("float32")
    for name, (y, dx, y_ref, dx_ref, dparams) in jax.eval_shape(run, inputs).items():
        assert y.dtype == dx.dtype == y_ref.dtype == dx_ref.dtype == jnp.float32, name
        assert y.shape == dx.shape == inputs[name][0].shape and dparams == {}, name


def test_relu_derivative_at_zero_is_zero_like_jax():
    @jax.jit
    def run(x):
        _, cache = nn.relu().forward({}, x)
        _, dx = nn.relu().backward({}, cache, jnp.ones_like(x))
        (dx_jax,) = jax.vjp(jax.nn.relu, x)[1](jnp.ones_like(x))
        return dx, dx_jax

    dx, dx_jax = run(np.zeros((1, 3), np.float32))
    np.testing.assert_array_equal(dx, 0.0)
    np.testing.assert_array_equal(dx, dx_jax)


def test_activation_caches_are_the_cheapest_residual():
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    smooth = [(nn.sigmoid, jax.nn.sigmoid), (nn.tanh, jnp.tanh), (nn.elu, jax.nn.elu)]

    @jax.jit  # one program: every cache and its reference
    def run(x):
        masks = [factory().forward({}, x)[1] for factory in (nn.relu, nn.leaky_relu)]
        kept = [(factory().forward({}, x)[1], fn(x)) for factory, fn in smooth]
        return masks, kept, nn.identity().forward({}, x)[1]

    masks, kept, identity_cache = run(x)
    # ReLU-family keep a boolean mask; sigmoid/tanh/softplus/elu keep the output.
    assert [mask.dtype for mask in masks] == [jnp.bool_, jnp.bool_]
    for cache, reference in kept:
        np.testing.assert_allclose(cache, reference, rtol=1e-6)
        assert cache.shape == x.shape
    assert identity_cache == ()


def _dense_reference(params, x):
    return x @ params["w"] + params["b"][None, :]


def _hand_and_vjp(layer, reference, params, x, dy):
    """``layer``'s forward and hand backward, and ``jax.vjp`` of an independent ``reference``."""
    y, cache = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)
    y_ref, vjp = jax.vjp(reference, params, x)
    return y, dparams, dx, y_ref, *vjp(dy)


def test_dense_backward_matches_vjp(x64):
    """Three sizes (batch 1 among them) and a sequence input, in one program."""
    cases = {}
    for seed in range(3):
        n_in, n_out, batch = 3 + 5 * seed, 7 - 2 * seed, 1 + 8 * seed
        cases[f"seed {seed}"] = (nn.dense(n_out, dtype=jnp.float64), (n_in,), batch, seed)
    # On sequences dense sums over every leading axis.
    cases["sequence"] = (nn.dense(4, dtype=jnp.float64), (5, 3), 2, 3)
    drawn = {
        name: draw(layer, shape, batch, "float64", seed)
        for name, (layer, shape, batch, seed) in cases.items()
    }

    def reference(p, x):
        return x @ p["w"] + p["b"].reshape((1,) * (x.ndim - 1) + (-1,))

    results = jax.jit(
        lambda data: {name: _hand_and_vjp(cases[name][0], reference, *data[name]) for name in cases}
    )({name: d[1:] for name, d in drawn.items()})
    for name, (y, dparams, dx, y_ref, dparams_ref, dx_ref) in results.items():
        params = drawn[name][1]
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, err_msg=name)
        chex.assert_trees_all_close(dparams, dparams_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12, err_msg=name)
        chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)
    assert drawn["sequence"][0] == (5, 4)
    assert [drawn[f"seed {seed}"][0] for seed in range(3)] == [(7,), (5,), (3,)]


def test_dense_without_bias_and_custom_init():
    layer = nn.dense(3, use_bias=False, w_init=jax.nn.initializers.ones)

    @jax.jit  # one program: init, forward and backward
    def run(key, x):
        params, _ = layer.init(key, (2,))
        y, cache = layer.forward(params, x)
        return params, y, layer.backward(params, cache, jnp.ones_like(y))[0]

    params, y, dparams = run(jax.random.key(0), np.ones((4, 2), np.float32))
    assert set(params) == {"w"}
    np.testing.assert_array_equal(params["w"], 1.0)
    np.testing.assert_array_equal(y, 2.0)
    assert set(dparams) == {"w"}
    np.testing.assert_array_equal(dparams["w"], 4.0)


def test_dense_default_init_is_lecun_normal():
    # Variance 1/n_in: with 4096 inputs the sample std is within a few % of 1/64.
    params = jax.jit(lambda key: nn.dense(256).init(key, (4096,))[0])(jax.random.key(0))
    assert abs(float(np.std(params["w"])) * 64 - 1) < 0.05
    np.testing.assert_array_equal(params["b"], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_gradients_keep_the_params_dtype(dtype):
    layer = nn.dense(5, dtype=dtype)

    @jax.jit  # one program: init, forward and backward
    def run(key, x):
        params, _ = layer.init(key, (3,))
        y, cache = layer.forward(params, x)
        return params, *layer.backward(params, cache, jnp.ones_like(y))

    params, dparams, dx = run(jax.random.key(0), np.ones((2, 3), dtype))
    chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)
    assert dx.dtype == dtype


def test_flatten_round_trips_shapes():
    layer = nn.flatten()
    params, shape = layer.init(jax.random.key(0), (2, 3, 4))
    assert params == {} and shape == (24,)
    x = np.arange(48.0, dtype=np.float32).reshape(2, 2, 3, 4)

    @jax.jit
    def run(x):
        y, cache = layer.forward(params, x)
        return y, cache, layer.backward(params, cache, y)[1]

    y, cache, dx = run(x)
    assert y.shape == (2, 24) and cache.size == 0
    np.testing.assert_array_equal(dx, x)


def test_serial_threads_shapes_keys_and_reverses_backward(x64):
    model = nn.serial(
        nn.flatten(), nn.dense(6, dtype=jnp.float64), nn.tanh(), nn.dense(2, dtype=jnp.float64)
    )
    params = jax.jit(lambda key: model.init(key, (2, 3))[0])(jax.random.key(0))
    assert init_shapes(model, (2, 3))[1] == (2,)
    assert isinstance(params, tuple) and len(params) == 4
    assert params[1]["w"].shape == (6, 6) and params[3]["w"].shape == (6, 2)
    # Children get different keys.
    assert not np.allclose(params[1]["w"][:2, :2], params[3]["w"][:2, :2])
    rng = np.random.default_rng(1)
    x = device_array(rng.standard_normal((5, 2, 3)), jnp.float64)
    dy = device_array(rng.standard_normal((5, 2)), jnp.float64)
    y, dparams, dx, y_apply, dparams_ref, dx_ref = jax.jit(
        functools.partial(_hand_and_vjp, model, model.apply)
    )(params, x, dy)
    chex.assert_trees_all_close(dparams, dparams_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12)
    assert model.children[2].name == "tanh"
    np.testing.assert_array_equal(y_apply, y)


def test_residual_sums_both_paths(x64):
    model = nn.residual(nn.serial(nn.dense(4, dtype=jnp.float64), nn.sigmoid()))
    assert init_shapes(model, (4,))[1] == (4,)
    params = numpy_params(model, (4,))
    rng = np.random.default_rng(1)
    x = device_array(rng.standard_normal((3, 4)), jnp.float64)
    dy = device_array(rng.standard_normal((3, 4)), jnp.float64)
    ref = lambda p, x: x + jax.nn.sigmoid(x @ p[0]["w"] + p[0]["b"][None, :])  # noqa: E731
    y, dparams, dx, y_ref, dparams_ref, dx_ref = jax.jit(
        functools.partial(_hand_and_vjp, model, ref)
    )(params, x, dy)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    chex.assert_trees_all_close(dparams, dparams_ref, rtol=1e-12)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12)


def test_side_inputs_are_a_fixed_keyword_set():
    layer = nn.relu()
    with pytest.raises(TypeError):
        layer.forward({}, np.ones((1, 2)), trian=True)  # a typo is an error
    with pytest.raises(TypeError):
        layer.forward({}, np.ones((1, 2)), jax.random.key(0))  # key is keyword-only
