"""Bridges between fbp and JAX: ``fbp.backprop.to_jax`` and ``fbp.nn.from_jax``.

References are independent of fbp's rules: ``jax.grad`` of the plain forward
(``model.apply`` traced by autodiff) and, through ``fbp.verify.check_grad``,
central finite differences in float64.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import numpy_params, side_input_probe

import fbp
from fbp import losses, nn, verify
from fbp.backprop import to_jax

LOSS = losses.softmax_cross_entropy


def _model():
    return nn.serial(
        nn.dense(8),
        nn.relu(),
        nn.residual(nn.serial(nn.dense(8), nn.tanh())),
        nn.dense(3),
    )


@pytest.fixture(scope="module")
def setup():
    model = _model()
    params = numpy_params(model, (4,))
    rng = np.random.default_rng(1)
    x = np.float32(rng.standard_normal((6, 4)))
    y = rng.integers(0, 3, 6, dtype=np.int32)
    return model, params, x, y


def test_grad_of_to_jax_objective_equals_fbp_and_autodiff(setup):
    model, params, x, y = setup
    objective = to_jax(model, LOSS)

    @jax.jit  # to_jax's gradient and value, and their references, in one compiled program
    def run(params, x, y):
        return (
            jax.grad(objective)(params, x, y),
            fbp.grad(model, LOSS)(params, x, y),
            jax.grad(lambda p: LOSS.value(model.apply(p, x), y))(params),
            objective(params, x, y),
            LOSS.value(model.apply(params, x), y),
        )

    grads, hand, reference, value, value_ref = run(params, x, y)
    chex.assert_trees_all_close(grads, hand, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(grads, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, value_ref)


def test_to_jax_passes_verification(setup):
    model, params, x, y = setup

    def plain(p, x, y):  # independent: autodiff and finite differences of the forward
        return LOSS.value(model.apply(p, x, train=True), y)

    report = verify.check_grad(plain, jax.grad(to_jax(model, LOSS)), params, x, y)
    assert report.ok, str(report)


def test_to_jax_apply_gives_param_and_input_gradients(setup):
    model, params, x, y = setup
    apply = to_jax(model)

    def f(p, x):
        return LOSS.value(apply(p, x), y)

    def ref(p, x):
        return LOSS.value(model.apply(p, x), y)

    @jax.jit  # both applies and both gradients in one compiled program
    def run(params, x):
        return (
            apply(params, x),
            model.apply(params, x),
            jax.grad(f, argnums=(0, 1))(params, x),
            jax.grad(ref, argnums=(0, 1))(params, x),
        )

    out, out_ref, got, want = run(params, x)
    np.testing.assert_allclose(out, out_ref, rtol=1e-6)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_to_jax_uses_fbps_backward_not_autodiff():
    calls = []

    def forward(params, x, *, key=None, train=False):
        return 2 * x, ()

    def backward(params, cache, dy):
        calls.append(1)
        return {}, 3 * dy  # deliberately not the derivative of the forward

    odd = nn.Layer(lambda k, s: ({}, s), forward, backward, name="odd")
    apply = to_jax(odd)
    g = jax.jit(jax.grad(lambda x: apply({}, x).sum()))(np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(g, 3 * np.ones((2, 3)))
    assert calls


def test_vmap_through_to_jax_gives_per_example_gradients(setup):
    model, params, x, y = setup
    objective = to_jax(model, LOSS)

    @jax.jit  # the per-example gradients, their references and the batch's in one program
    def run(params, x, y):
        per_example = jax.vmap(
            jax.grad(lambda p, xi, yi: objective(p, xi[None], yi[None])), in_axes=(None, 0, 0)
        )(params, x, y)
        reference = jax.vmap(
            jax.grad(lambda p, xi, yi: LOSS.value(model.apply(p, xi[None]), yi[None])),
            in_axes=(None, 0, 0),
        )(params, x, y)
        return per_example, reference, fbp.grad(model, LOSS)(params, x, y)

    per_example, reference, batch = jax.device_get(run(params, x, y))
    chex.assert_trees_all_close(per_example, reference, rtol=1e-5, atol=1e-6)
    # Their mean is the batch gradient.
    mean = jax.tree.map(lambda g: g.mean(axis=0), per_example)
    chex.assert_trees_all_close(mean, batch, rtol=1e-5, atol=1e-6)


def test_to_jax_passes_key_and_train():
    model, params, seen = side_input_probe()
    ones = np.ones((2, 3), np.float32)
    # Traced, not compiled (jax.eval_shape): seen records what the forward was given.
    jax.eval_shape(to_jax(model), params, ones)
    assert seen["train"] is False
    jax.eval_shape(
        lambda key: to_jax(model, losses.mse)(params, ones, np.ones((2, 2), np.float32), key=key),
        jax.random.key(1),
    )
    assert seen["train"] is True and seen["key"] is not None


def test_to_jax_rejects_non_layers():
    with pytest.raises(fbp.ConfigError, match="model must be a Layer"):
        to_jax(lambda p, x: x)
    with pytest.raises(fbp.ConfigError, match="loss must be a Loss"):
        to_jax(nn.dense(2), lambda p, y: 0.0)


# --------------------------------------------------------------------------- from_jax


def _scale_init(key, shape):
    return {"s": 1.0 + 0.1 * jax.random.normal(key, shape[-1:])}, shape


def _scaled_sine(params, x):
    return jnp.sin(x) * params["s"][None, :]


def test_from_jax_layer_is_labelled_and_obeys_the_contract():
    layer = nn.from_jax(_scaled_sine, _scale_init)
    assert layer.name == "from_jax(_scaled_sine) [jax.vjp]"
    shapes = []

    def init(key):  # run in one compiled program; the output shape is static
        params, shape = layer.init(key, (5,))
        shapes.append(shape)
        return params

    params = jax.jit(init)(jax.random.key(0))
    assert shapes == [(5,)]
    rng = np.random.default_rng(1)
    x, dy = np.float32(rng.standard_normal((3, 5))), np.float32(rng.standard_normal((3, 5)))

    @jax.jit  # the layer's passes and jax.vjp of the plain function in one compiled program
    def run(params, x, dy):
        y, cache = layer.forward(params, x)
        _, vjp = jax.vjp(lambda p, x: jnp.sin(x) * p["s"][None, :], params, x)
        return y, layer.backward(params, cache, dy), vjp(dy)

    y, (dparams, dx), want = run(params, x, dy)
    assert y.shape == dy.shape
    chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)
    chex.assert_trees_all_close((dparams, dx), want, rtol=1e-6)
    assert nn.from_jax(_scaled_sine, _scale_init, name="scale").name == "from_jax(scale) [jax.vjp]"


def test_from_jax_inside_a_model_trains_and_verifies():
    model = nn.serial(nn.dense(6), nn.from_jax(_scaled_sine, _scale_init), nn.dense(3))
    params = numpy_params(model, (4,))
    rng = np.random.default_rng(1)
    x, y = np.float32(rng.standard_normal((5, 4))), rng.integers(0, 3, 5, dtype=np.int32)

    @jax.jit  # fbp's gradient and its reference in one compiled program
    def run(params, x, y):
        reference = jax.grad(lambda p: LOSS.value(model.apply(p, x), y))(params)
        return fbp.grad(model, LOSS)(params, x, y), reference

    grads, reference = run(params, x, y)
    chex.assert_trees_all_close(grads, reference, rtol=1e-5, atol=1e-6)
    report = verify.check_model(model, LOSS, params, x, y)
    assert report.ok, str(report)


def test_from_jax_rejects_non_callables():
    with pytest.raises(fbp.ConfigError, match="from_jax"):
        nn.from_jax(_scaled_sine, None)
