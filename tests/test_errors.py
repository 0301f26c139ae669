"""Bad input fails at trace time with a message naming the layer, expected and actual."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import init_shapes

import fbp
from fbp import losses, nn


def _zeros_like_init(model, input_shape):
    """Params of the model's shapes, all zeros: ``init`` traced, not run (nothing compiles)."""
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init_shapes(model, input_shape)[0])


def ones(shape, dtype=np.float32):
    """numpy ones: no compiled program per shape, as ``jnp.ones`` would be."""
    return np.ones(shape, dtype)


@pytest.fixture(scope="module")
def mlp():
    model = nn.serial(nn.dense(64), nn.relu(), nn.dense(10))
    return model, _zeros_like_init(model, (64,))


def test_wrong_input_width_names_layer_index_kind_and_shapes(mlp):
    model, params = mlp
    with pytest.raises(
        fbp.ShapeError,
        match=r"serial layer 0 \(dense 64→64\): expected input of shape \(batch, 64\), got \(32, 32\)",
    ) as info:
        model.apply(params, ones((32, 32)))
    assert info.value.layer_path == (0,)
    assert info.value.layer == "dense 64→64"


def test_errors_fire_at_trace_time_under_jit(mlp):
    model, params = mlp
    f = jax.jit(fbp.value_and_grad(model, losses.softmax_cross_entropy))
    with pytest.raises(fbp.ShapeError, match=r"serial layer 0 \(dense 64→64\)"):
        f(params, ones((8, 63)), np.zeros(8, np.int32))


def test_missing_batch_axis(mlp):
    model, params = mlp
    with pytest.raises(fbp.ShapeError, match=r"got \(64,\); is the batch axis missing\?"):
        model.apply(params, ones(64))


def test_params_from_a_model_of_another_depth(mlp):
    model, _ = mlp
    other = nn.serial(nn.dense(64), nn.relu(), nn.dense(32), nn.relu(), nn.dense(10))
    other_params = _zeros_like_init(other, (64,))
    with pytest.raises(
        fbp.ShapeError,
        match=r"expected params as a tuple of 3 entries .*got 5 entries.*another model",
    ):
        model.apply(other_params, ones((2, 64)))


def test_params_from_a_model_of_another_width(mlp):
    model, _ = mlp
    other = nn.serial(nn.dense(32), nn.relu(), nn.dense(10))
    other_params = _zeros_like_init(other, (64,))
    with pytest.raises(
        fbp.ShapeError,
        match=r"serial layer 0 \(dense\(→64\)\): expected weight 'w' of shape \(n_in, 64\), "
        r"got \(64, 32\); are these params from another model\?",
    ):
        model.apply(other_params, ones((2, 64)))


def test_params_shifted_by_one_layer(mlp):
    model, params = mlp
    shifted = (params[1], params[0], params[2])
    with pytest.raises(fbp.ShapeError, match=r"serial layer 0 \(dense\): expected params \{'w'"):
        model.apply(shifted, ones((2, 64)))
    with pytest.raises(fbp.ShapeError, match=r"serial layer 1 \(relu\): takes no parameters"):
        model.apply((params[0], params[0], params[2]), ones((2, 64)))


def test_wrong_bias_shape():
    layer = nn.dense(3)
    params = _zeros_like_init(layer, (2,))
    params["b"] = np.zeros(4, np.float32)
    with pytest.raises(
        fbp.ShapeError, match=r"dense 2→3: expected bias 'b' of shape \(3,\), got \(4,\)"
    ):
        layer.apply(params, ones((1, 2)))


def test_nested_serial_reports_the_full_path():
    model = nn.serial(nn.flatten(), nn.serial(nn.dense(8), nn.tanh(), nn.dense(4)))
    params = _zeros_like_init(model, (2, 3))
    with pytest.raises(fbp.ShapeError, match=r"serial layer 1\.0 \(dense 6→8\)") as info:
        model.apply(params, ones((5, 7)))
    assert info.value.layer_path == (1, 0)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_non_float_input(mlp, dtype):
    model, params = mlp
    with pytest.raises(
        fbp.DTypeError,
        match=rf"serial layer 0 \(dense 64→64\): expected a floating-point input, got {jnp.dtype(dtype)}",
    ):
        model.apply(params, ones((2, 64), dtype))


def test_non_float_input_to_an_activation():
    with pytest.raises(
        fbp.DTypeError, match=r"sigmoid: expected a floating-point input, got int32"
    ):
        nn.sigmoid().apply({}, ones((2, 3), jnp.int32))


def test_labels_out_of_range(mlp):
    model, params = mlp
    f = fbp.value_and_grad(model, losses.softmax_cross_entropy)
    with pytest.raises(
        fbp.RangeError,
        match=r"softmax_cross_entropy: labels must lie in \[0, 10\) for 10 classes, got values in \[0, 10\]",
    ):
        f(params, ones((3, 64)), np.int32([0, 10, 3]))
    with pytest.raises(fbp.RangeError, match=r"got values in \[-1, 3\]"):
        f(params, ones((3, 64)), np.array([0, -1, 3]))


def test_labels_of_the_wrong_shape(mlp):
    model, params = mlp
    f = jax.jit(fbp.value_and_grad(model, losses.softmax_cross_entropy))
    with pytest.raises(
        fbp.ShapeError,
        match=r"softmax_cross_entropy: expected integer labels of shape \(4,\) for logits of shape "
        r"\(4, 10\), got \(4, 1\)",
    ):
        f(params, ones((4, 64)), np.zeros((4, 1), np.int32))
    with pytest.raises(
        fbp.ShapeError, match=r"expected integer labels of shape \(4,\).*got \(5,\)"
    ):
        f(params, ones((4, 64)), np.zeros(5, np.int32))
    with pytest.raises(
        fbp.ShapeError,
        match=r"expected one-hot or probability targets of shape \(4, 10\), got \(4, 9\)",
    ):
        f(params, ones((4, 64)), np.zeros((4, 9), np.float32))


def test_targets_of_the_wrong_shape_or_dtype_for_mse():
    with pytest.raises(
        fbp.ShapeError,
        match=r"mse: expected targets of the predictions' shape \(2, 3\), got \(2,\)",
    ):
        losses.mse.value(ones((2, 3)), ones(2))
    with pytest.raises(fbp.DTypeError, match=r"mse: expected floating-point targets, got int32"):
        losses.mse.grad(ones((2, 3)), ones((2, 3), jnp.int32))
    with pytest.raises(
        fbp.DTypeError, match=r"sigmoid_binary_cross_entropy: expected floating-point predictions"
    ):
        losses.sigmoid_binary_cross_entropy.value(ones((2, 3), jnp.int32), ones((2, 3)))


def test_bad_configurations():
    with pytest.raises(fbp.ConfigError, match=r"dense: features must be a positive int, got 0"):
        nn.dense(0)
    with pytest.raises(fbp.ConfigError, match=r"did you forget to call it, e\.g\. nn\.relu\(\)"):
        nn.serial(nn.dense(3), nn.relu)
    with pytest.raises(fbp.ConfigError, match=r"elu: alpha must be positive"):
        nn.elu(-1.0)
    with pytest.raises(fbp.ConfigError, match=r"model must be a Layer"):
        fbp.value_and_grad(lambda x: x, losses.mse)
    with pytest.raises(fbp.ConfigError, match=r"loss must be a Loss"):
        fbp.value_and_grad(nn.relu(), lambda p, t: 0.0)


def test_residual_must_keep_the_shape():
    with pytest.raises(
        fbp.ShapeError, match=r"residual\(dense\(→3\)\): the inner layer must keep the shape"
    ):
        nn.residual(nn.dense(3)).init(jax.random.key(0), (4,))


def test_errors_are_standard_exception_types():
    assert issubclass(fbp.ShapeError, ValueError)
    assert issubclass(fbp.DTypeError, TypeError)
    assert issubclass(fbp.ConfigError, ValueError)


def test_labels_closed_over_inside_jit_are_checked_without_tracer_errors(mlp):
    model, params = mlp
    labels = jnp.array([0, 10, 3])
    f = fbp.value_and_grad(model, losses.softmax_cross_entropy)
    with pytest.raises(fbp.RangeError, match=r"labels must lie in \[0, 10\)"):
        jax.jit(lambda p, x: f(p, x, labels))(params, ones((3, 64)))


def test_relu_keeps_nan_as_jax_does():
    """A NaN input used to come out as 0: a finite loss with NaN gradients."""
    x = np.float32([[np.nan, -1.0, 0.0, 2.0]])
    dy = np.float32([[3.0, 3.0, 3.0, 3.0]])
    layer = nn.relu()
    model = nn.serial(nn.dense(2), nn.relu(), nn.dense(3))
    params = _zeros_like_init(model, (2,))

    @jax.jit  # the layer, jax's relu and a model's loss in one compiled program
    def run(x, dy, params, model_x):
        y, cache = layer.forward({}, x)
        _, dx = layer.backward({}, cache, dy)
        _, vjp = jax.vjp(jax.nn.relu, x)
        value, _ = fbp.value_and_grad(model, losses.softmax_cross_entropy)(
            params, model_x, np.int32([1])
        )
        return y, jax.nn.relu(x), dx, vjp(dy)[0], value

    y, y_ref, dx, dx_ref, value = run(x, dy, params, np.float32([[np.nan, 1.0]]))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    assert np.isnan(value)
