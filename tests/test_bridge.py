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
from layer_helpers import side_input_probe

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
    params, _ = model.init(jax.random.key(0), (4,))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    y = jax.random.randint(jax.random.key(2), (6,), 0, 3)
    return model, params, x, y


def test_grad_of_to_jax_objective_equals_fbp_and_autodiff(setup):
    model, params, x, y = setup
    objective = to_jax(model, LOSS)
    grads = jax.jit(jax.grad(objective))(params, x, y)
    chex.assert_trees_all_close(grads, fbp.grad(model, LOSS)(params, x, y), rtol=1e-6, atol=1e-7)
    reference = jax.grad(lambda p: LOSS.value(model.apply(p, x), y))(params)
    chex.assert_trees_all_close(grads, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(objective(params, x, y), LOSS.value(model.apply(params, x), y))


def test_to_jax_passes_verification(setup):
    model, params, x, y = setup

    def plain(p, x, y):  # independent: autodiff and finite differences of the forward
        return LOSS.value(model.apply(p, x, train=True), y)

    report = verify.check_grad(plain, jax.grad(to_jax(model, LOSS)), params, x, y)
    assert report.ok, str(report)


def test_to_jax_apply_gives_param_and_input_gradients(setup):
    model, params, x, y = setup
    apply = to_jax(model)
    np.testing.assert_allclose(apply(params, x), model.apply(params, x), rtol=1e-6)

    def f(p, x):
        return LOSS.value(apply(p, x), y)

    def ref(p, x):
        return LOSS.value(model.apply(p, x), y)

    got = jax.jit(jax.grad(f, argnums=(0, 1)))(params, x)
    want = jax.grad(ref, argnums=(0, 1))(params, x)
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
    g = jax.grad(lambda x: apply({}, x).sum())(jnp.ones((2, 3)))
    np.testing.assert_array_equal(g, 3 * np.ones((2, 3)))
    assert calls


def test_vmap_through_to_jax_gives_per_example_gradients(setup):
    model, params, x, y = setup
    objective = to_jax(model, LOSS)
    per_example = jax.jit(
        jax.vmap(jax.grad(lambda p, xi, yi: objective(p, xi[None], yi[None])), in_axes=(None, 0, 0))
    )(params, x, y)
    reference = jax.vmap(
        jax.grad(lambda p, xi, yi: LOSS.value(model.apply(p, xi[None]), yi[None])),
        in_axes=(None, 0, 0),
    )(params, x, y)
    chex.assert_trees_all_close(per_example, reference, rtol=1e-5, atol=1e-6)
    # Their mean is the batch gradient.
    mean = jax.tree.map(lambda g: g.mean(axis=0), per_example)
    chex.assert_trees_all_close(mean, fbp.grad(model, LOSS)(params, x, y), rtol=1e-5, atol=1e-6)


def test_to_jax_passes_key_and_train():
    model, params, seen = side_input_probe()
    to_jax(model)(params, jnp.ones((2, 3)))
    assert seen["train"] is False
    to_jax(model, losses.mse)(params, jnp.ones((2, 3)), jnp.ones((2, 2)), key=jax.random.key(1))
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
    params, shape = layer.init(jax.random.key(0), (5,))
    assert shape == (5,)
    x = jax.random.normal(jax.random.key(1), (3, 5))
    y, cache = layer.forward(params, x)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    dparams, dx = jax.jit(layer.backward)(params, cache, dy)
    chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)
    _, vjp = jax.vjp(lambda p, x: jnp.sin(x) * p["s"][None, :], params, x)
    chex.assert_trees_all_close((dparams, dx), vjp(dy), rtol=1e-6)
    assert nn.from_jax(_scaled_sine, _scale_init, name="scale").name == "from_jax(scale) [jax.vjp]"


def test_from_jax_inside_a_model_trains_and_verifies():
    model = nn.serial(nn.dense(6), nn.from_jax(_scaled_sine, _scale_init), nn.dense(3))
    params, _ = model.init(jax.random.key(0), (4,))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    y = jax.random.randint(jax.random.key(2), (5,), 0, 3)
    grads = jax.jit(fbp.grad(model, LOSS))(params, x, y)
    reference = jax.grad(lambda p: LOSS.value(model.apply(p, x), y))(params)
    chex.assert_trees_all_close(grads, reference, rtol=1e-5, atol=1e-6)
    report = verify.check_model(model, LOSS, params, x, y)
    assert report.ok, str(report)


def test_from_jax_rejects_non_callables():
    with pytest.raises(fbp.ConfigError, match="from_jax"):
        nn.from_jax(_scaled_sine, None)
