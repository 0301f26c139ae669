"""fbp.value_and_grad on random networks against jax.grad of the same forward.

The hand-derived gradients (of the params and of the input) must equal
autodiff's over depths 1–6, widths 1–64, every activation, every loss,
batch sizes 1–33 and many seeds: to 1e-5 relative in float32, 1e-10 in
float64. Hypothesis draws the architectures.
"""

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import device_array, init_shapes, numpy_params, side_input_probe

import fbp
from fbp import losses, nn

ACTIVATIONS = {
    "identity": nn.identity,
    "sigmoid": nn.sigmoid,
    "tanh": nn.tanh,
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "elu": nn.elu,
    "gelu": nn.gelu,
    "gelu_exact": lambda: nn.gelu(approximate=False),
    "softplus": nn.softplus,
}
LOSSES = {
    "mse": losses.mse,
    "softmax_cross_entropy": losses.softmax_cross_entropy,
    "softmax_cross_entropy_onehot": losses.softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": losses.sigmoid_binary_cross_entropy,
}


@st.composite
def networks(draw):
    depth = draw(st.integers(1, 6))
    widths = draw(st.lists(st.integers(1, 64), min_size=depth, max_size=depth))
    activations = draw(
        st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=depth - 1, max_size=depth - 1)
    )
    return {
        "n_in": draw(st.integers(1, 64)),
        "widths": widths,
        "activations": activations,
        "loss": draw(st.sampled_from(sorted(LOSSES))),
        "batch": draw(st.integers(1, 33)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _build(spec, dtype):
    """The spec's model and loss, and numpy draws of its params, input and targets.

    ``init`` is only traced (for the shapes): numpy draws compile nothing, while
    eager ``jax.random`` draws compile a program for every new shape.
    """
    layers = []
    for width, activation in zip(spec["widths"][:-1], spec["activations"], strict=True):
        layers += [nn.dense(width, dtype=dtype), ACTIVATIONS[activation]()]
    n_out = spec["widths"][-1]
    if spec["loss"].startswith("softmax"):
        n_out = max(n_out, 2)
    layers.append(nn.dense(n_out, dtype=dtype))
    model = nn.serial(*layers)
    shapes, (classes,) = init_shapes(model, (spec["n_in"],))
    rng = np.random.default_rng(spec["seed"])

    def draw(leaf):  # weights of variance 1/fan_in; non-zero biases (a generic point)
        scale = 1 / np.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.1
        return device_array(scale * rng.standard_normal(leaf.shape), dtype)

    params = jax.tree.map(draw, shapes)
    batch = spec["batch"]
    x = device_array(rng.standard_normal((batch, spec["n_in"])), dtype)
    labels = rng.integers(0, classes, batch)
    if spec["loss"] == "softmax_cross_entropy":
        y = device_array(labels, jnp.int32)
    elif spec["loss"] == "softmax_cross_entropy_onehot":
        y = device_array(np.eye(classes)[labels], dtype)
    elif spec["loss"] == "sigmoid_binary_cross_entropy":
        y = device_array(rng.random((batch, classes)) < 0.5, dtype)
    else:
        y = device_array(rng.standard_normal((batch, classes)), dtype)
    return model, LOSSES[spec["loss"]], params, x, y


def _hand_and_autodiff(model, loss, params, x, y):
    value, grads = fbp.value_and_grad(model, loss)(params, x, y)
    pred, cache = model.forward(params, x, train=True)
    _, dx = model.backward(params, cache, loss.grad(pred, y))
    reference = jax.value_and_grad(lambda p, x: loss.value(model.apply(p, x), y), argnums=(0, 1))
    value_ref, (grads_ref, dx_ref) = reference(params, x)
    return (value, grads, dx), (value_ref, grads_ref, dx_ref)


def _max_rel_err(a_tree, b_tree):
    errors = []
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.max(np.abs(b), initial=0.0)
        err = np.max(np.abs(a - b), initial=0.0)
        # A leaf whose true gradient vanishes (a dead ReLU unit) must vanish too.
        errors.append(err / scale if scale > 1e-30 else err * 1e30)
    return max(errors)


def _check(specs, dtype, tol):
    """Every spec's hand gradients against autodiff's, all in ONE compiled program.

    Compile time dominates on small machines: many networks in one program cost
    far less than one program each. A failure names every spec that missed. A spec
    drawn twice (hypothesis's first list repeats its simplest network) is built and
    checked once: the same spec is the same network, inputs and results.
    """
    specs = list({json.dumps(spec, sort_keys=True): spec for spec in specs}.values())
    built = [_build(spec, dtype) for spec in specs]

    @jax.jit
    def run(data):
        return [
            _hand_and_autodiff(model, loss, *d)
            for (model, loss, *_), d in zip(built, data, strict=True)
        ]

    outputs = run([b[2:] for b in built])
    failures = []
    for spec, (_, _, params, x, _), ((value, grads, dx), (value_ref, grads_ref, dx_ref)) in zip(
        specs, built, outputs, strict=True
    ):
        try:
            chex.assert_trees_all_equal_structs(grads, params)
            chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
            assert dx.shape == x.shape and dx.dtype == x.dtype, (dx.shape, dx.dtype)
            np.testing.assert_allclose(value, value_ref, rtol=tol, atol=tol)
            assert _max_rel_err(grads, grads_ref) < tol, "grads"
            assert _max_rel_err(dx, dx_ref) < tol, "dx"
        except AssertionError as error:
            failures.append(f"{spec}: {error}")
    assert not failures, "\n".join(failures)


# Hypothesis draws lists of networks, each list checked in one compiled program:
# the slow tests see about FBP_HYPOTHESIS_EXAMPLES networks each, in a few programs.
NETWORKS_PER_EXAMPLE = 5
EXAMPLES = max(2, settings.default.max_examples // NETWORKS_PER_EXAMPLE + 1)
network_lists = st.lists(networks(), min_size=NETWORKS_PER_EXAMPLE, max_size=NETWORKS_PER_EXAMPLE)


@pytest.mark.slow
@settings(max_examples=EXAMPLES)
@given(network_lists)
def test_random_networks_float32(specs):
    _check(specs, jnp.float32, 1e-5)


@pytest.mark.slow
@settings(max_examples=EXAMPLES)
@given(network_lists)
def test_random_networks_float64(specs):
    with jax.enable_x64(True):
        _check(specs, jnp.float64, 1e-10)


@settings(max_examples=2)
@given(st.lists(networks(), min_size=3, max_size=3))
def test_a_few_random_networks_in_both_precisions(specs):
    """The fast loop's sample of the two tests above: two lists (hypothesis's first
    is its simplest network), one compiled program per list and precision."""
    _check(specs, jnp.float32, 1e-5)
    with jax.enable_x64(True):
        _check(specs, jnp.float64, 1e-10)


def _activation_and_loss_specs(pairs):
    return [
        {
            "n_in": 5,
            "widths": [7, 6, 4],
            "activations": [activation, activation],
            "loss": loss_name,
            "batch": 9,
            "seed": 3,
        }
        for activation, loss_name in pairs
    ]


# The inner loop pairs each activation with one loss, every loss used; the
# slow sweep runs every other pair.
ACTIVATION_LOSS_PAIRS = [
    (activation, sorted(LOSSES)[i % len(LOSSES)])
    for i, activation in enumerate(sorted(ACTIVATIONS))
]


def test_every_activation_and_every_loss_float64():
    """Each activation between two hidden layers, each with a loss, every loss used: one program."""
    assert {loss for _, loss in ACTIVATION_LOSS_PAIRS} == set(LOSSES)
    with jax.enable_x64(True):
        _check(_activation_and_loss_specs(ACTIVATION_LOSS_PAIRS), jnp.float64, 1e-10)


@pytest.mark.slow
def test_every_activation_with_every_other_loss_float64():
    pairs = [
        (activation, loss_name)
        for activation in sorted(ACTIVATIONS)
        for loss_name in sorted(LOSSES)
        if (activation, loss_name) not in ACTIVATION_LOSS_PAIRS
    ]
    with jax.enable_x64(True):
        _check(_activation_and_loss_specs(pairs), jnp.float64, 1e-10)


def test_issue_example_digits_shaped_network_and_jit_equals_eager():
    """The issue's digits-shaped network: fbp's eager value and grad against autodiff,
    and against fbp's own jitted ``value_and_grad`` and ``grad`` (one test: the eager
    run compiles a program per operation, which another xdist process would repeat)."""
    model = nn.serial(nn.dense(64), nn.relu(), nn.dense(10))
    out_shape = init_shapes(model, (64,))[1]
    params = jax.tree.map(jax.device_put, numpy_params(model, (64,)))  # numpy: no init programs
    rng = np.random.default_rng(0)
    x = device_array(rng.random((32, 64)), jnp.float32)
    labels = device_array(rng.integers(0, 10, 32), jnp.int32)
    f = fbp.value_and_grad(model, losses.softmax_cross_entropy)
    eager = f(params, x, labels)
    loss, grads = eager
    assert out_shape == (10,)
    loss_ref, grads_ref = jax.jit(
        jax.value_and_grad(lambda p: losses.softmax_cross_entropy.value(model.apply(p, x), labels))
    )(params)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    assert _max_rel_err(grads, grads_ref) < 1e-5
    jitted = jax.jit(f)(params, x, labels)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)
    grads = jax.jit(fbp.grad(model, losses.softmax_cross_entropy))(params, x, labels)
    chex.assert_trees_all_close(grads, eager[1], rtol=1e-6, atol=1e-7)


def test_value_and_grad_passes_key_and_train_to_layers():
    model, params, seen = side_input_probe()
    x, y = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)
    f = fbp.value_and_grad(model, losses.mse)
    # The layers see key and train at trace time: traced (jax.eval_shape), not compiled.
    jax.eval_shape(f, params, x, y)
    assert seen["train"] is True and seen["key"] is None
    jax.eval_shape(lambda key: f(params, x, y, key=key, train=False), jax.random.key(1))
    assert seen["train"] is False and seen["key"] is not None


def test_value_and_grad_uses_no_autodiff(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("fbp.value_and_grad must not call jax autodiff")

    model = nn.serial(nn.dense(4), nn.sigmoid(), nn.dense(3))
    params = numpy_params(model, (2,))
    f = fbp.value_and_grad(model, losses.softmax_cross_entropy)
    for name in ("grad", "vjp", "value_and_grad", "jvp", "linearize"):
        monkeypatch.setattr(jax, name, forbidden)
    # Traced with the patch in place (jit runs f's Python once), one program.
    value, _ = jax.jit(f)(params, np.ones((3, 2), np.float32), np.array([0, 1, 2], np.int32))
    assert np.isfinite(value)


# --------------------------------------------------------------------------- trace-time checks


def _with_backward(backward):
    dense = nn.dense(3)
    return nn.serial(nn.dense(4), nn.tanh(), dense._replace(backward=backward(dense.backward)))


def _short_dx(b):
    return lambda p, c, dy: (b(p, c, dy)[0], b(p, c, dy)[1][:, :-1])


WRONG_BACKWARDS = {
    # name: (backward wrapper, message); each would otherwise train silently or fail deep in optax
    "broadcastable dW": (
        lambda b: (
            lambda p, c, dy: ({**b(p, c, dy)[0], "w": b(p, c, dy)[0]["w"][:1]}, b(p, c, dy)[1])
        ),
        r"serial layer 2 \(dense\(→3\)\): backward returned d\['w'\] of shape \(1, 3\) for a "
        r"param of shape \(4, 3\)",
    ),
    "transposed dW": (
        lambda b: lambda p, c, dy: ({**b(p, c, dy)[0], "w": b(p, c, dy)[0]["w"].T}, b(p, c, dy)[1]),
        r"d\['w'\] of shape \(3, 4\) for a param of shape \(4, 3\)",
    ),
    "missing db": (
        lambda b: lambda p, c, dy: ({"w": b(p, c, dy)[0]["w"]}, b(p, c, dy)[1]),
        r"backward returned dparams \{'w': \(4, 3\)\} for params \{'b': \(3,\), 'w': \(4, 3\)\}",
    ),
    "dx one column short": (
        _short_dx,
        r"serial layer 2 \(dense\(→3\)\): backward returned dx of shape \(5, 3\) for an input "
        r"of shape \(5, 4\)",
    ),
    "float16 dW for float32 params": (
        lambda b: (
            lambda p, c, dy: (
                {**b(p, c, dy)[0], "w": b(p, c, dy)[0]["w"].astype(jnp.float16)},
                b(p, c, dy)[1],
            )
        ),
        r"d\['w'\] of dtype float16 for a param of dtype float32",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG_BACKWARDS))
def test_a_backward_that_breaks_the_contract_is_named_at_trace_time(case):
    wrap, message = WRONG_BACKWARDS[case]
    model = _with_backward(wrap)
    # Shapes only: the error is raised while tracing, so nothing is compiled.
    params = init_shapes(model, (2,))[0]
    x, y = (jax.ShapeDtypeStruct((5, n), jnp.float32) for n in (2, 3))
    with pytest.raises((fbp.ShapeError, fbp.DTypeError), match=message):
        jax.eval_shape(fbp.value_and_grad(model, losses.mse), params, x, y)
    step = fbp.train.make_step(model, losses.mse, optax.sgd(0.1))
    with pytest.raises((fbp.ShapeError, fbp.DTypeError), match=message):
        jax.eval_shape(step, params, jax.eval_shape(optax.sgd(0.1).init, params), x, y)


def test_the_checked_driver_compiles_to_the_plain_forward_and_backward():
    """The walker's checks run at trace time: the compiled program is model.forward/backward's."""
    model = nn.serial(nn.dense(8), nn.relu(), nn.residual(nn.serial(nn.dense(8), nn.tanh())))
    params = numpy_params(model, (4,))
    x, y = np.ones((3, 4), np.float32), np.zeros((3, 8), np.float32)

    def plain(p, x, y):
        pred, cache = model.forward(p, x, train=True)
        return losses.mse.value(pred, y), model.backward(p, cache, losses.mse.grad(pred, y))[0]

    def ops(f):
        text = jax.jit(f).lower(params, x, y).compile().as_text()
        found = (re.search(r"=.*?\s([a-z][a-z0-9-]*)\(", line) for line in text.splitlines())
        return sorted(m.group(1) for m in found if m)

    assert ops(fbp.value_and_grad(model, losses.mse)) == ops(plain)


def test_integer_params_are_refused_rather_than_trained_with_truncated_gradients():
    model = nn.serial(nn.dense(3), nn.tanh(), nn.dense(2))
    params = numpy_params(model, (4,))
    params = (params[0], params[1], jax.tree.map(lambda a: a.astype(np.int32), params[2]))
    x, y = np.ones((2, 4), np.float32), np.zeros((2, 2), np.float32)
    with pytest.raises(
        fbp.DTypeError,
        match=r"serial layer 2 \(dense\(→2\)\): param \['b'\] has dtype int32; params must be "
        r"floating-point",
    ):
        jax.eval_shape(fbp.value_and_grad(model, losses.mse), params, x, y)  # raised while tracing
