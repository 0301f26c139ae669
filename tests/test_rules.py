"""fbp.rules: alternative credit assignment through ``value_and_grad(..., rule=)``.

Each rule is checked against the same algorithm written out by hand in plain
jax.numpy (deltas computed explicitly, feedback matrices drawn from the
documented recipe); ordinary backprop as a rule against ``jax.grad``; and
feedback alignment and DFA must train a dense network on digits to ≥ 90 %
test accuracy while their updates' angle with the true gradient (measured by
``fbp.diagnostics.value_grad_and_angles``) falls from ~90° well below it.

No layer with weights is left on backprop: one model holds every public layer
family with weights and a user's own layer (``tests/user_layer.py``), and below
each the error each rule sends is checked — against the layer's own backward
with its weights swapped, and written out in jax.numpy/lax for dense, the
convolutions (the transposed convolution with ``B``), the RNN and the GRU
(backpropagation through time with ``B_x``, ``B_h``). The inner loop checks a
representative model (dense, conv2d, the user's layer); the slow sweep a model
of the other layer families (conv1d, the recurrent ones, self_attention).

JAX compile time dominates on a small CI machine: params and inputs are drawn
with numpy (``init`` traced for the shapes only) and each check runs jitted.
"""

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from layer_helpers import assert_trees_close, device_array, init_shapes, rel_err
from user_layer import gated_linear

import fbp
from fbp import data, diagnostics, losses, nn, rules

LOSS = losses.softmax_cross_entropy


def _random_params(model, input_shape, rng):
    """Numpy draws for ``model``'s params (``init`` traced for the shapes only: eager
    jax.random compiles per shape); weights of variance ``1/fan_in``, vectors ``N(0, 0.1²)``."""

    def draw(a):
        if len(a.shape) >= 2:
            return jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[0]), a.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype)

    return jax.tree.map(draw, init_shapes(model, input_shape)[0])


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _setup(widths=(7, 6, 3), n_in=5, batch=9, seed=0):
    layers = []
    for width in widths[:-1]:
        layers += [nn.dense(width), nn.tanh()]
    model = nn.serial(*layers, nn.dense(widths[-1]))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[0]), a.dtype),
        init_shapes(model, (n_in,))[0],
    )
    x = jnp.asarray(rng.standard_normal((batch, n_in)), jnp.float32)
    y = jnp.asarray(rng.integers(0, widths[-1], batch), jnp.int32)
    return model, params, x, y


def _manual(params, x, y, feedback):
    """The rule written out: tanh MLP, ``feedback(l, w, dy, e) -> dx`` replaces ``dy·Wᵀ``."""
    hs = [x]
    for p in params[::2][:-1]:
        hs.append(jnp.tanh(hs[-1] @ p["w"] + p["b"][None, :]))
    last = params[-1]
    logits = hs[-1] @ last["w"] + last["b"][None, :]
    e = (jax.nn.softmax(logits) - jax.nn.one_hot(y, logits.shape[1])) / x.shape[0]
    dense = list(params[::2])
    grads = [None] * len(dense)
    dy = e
    for l in reversed(range(len(dense))):
        grads[l] = {"w": hs[l].T @ dy, "b": dy.sum(0)}
        if l > 0:
            dh = feedback(l, dense[l]["w"], dy, e)
            dy = dh * (1 - hs[l] ** 2)
    out = []
    for g in grads[:-1]:
        out += [g, {}]
    return tuple([*out, grads[-1]])


def _close(a, b, tol=1e-5):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol * 1e-1)


def test_backprop_rule_equals_plain_backprop_and_autodiff():
    model = nn.serial(
        nn.dense(6), nn.relu(), nn.residual(nn.serial(nn.dense(6), nn.gelu())), nn.dense(3)
    )
    rng = np.random.default_rng(0)
    params, x = _random_params(model, (4,), rng), _normal(rng, 5, 4)
    y = jnp.array([0, 1, 2, 0, 1])

    @jax.jit  # everything in one compiled program
    def run(params, x, y):
        return (
            fbp.value_and_grad(model, LOSS, rule=rules.backprop())(params, x, y),
            fbp.value_and_grad(model, LOSS)(params, x, y),
            jax.grad(lambda p: LOSS.value(model.apply(p, x), y))(params),
            fbp.grad(model, LOSS, rule=rules.backprop())(params, x, y),
        )

    (value, grads), (value0, grads0), autodiff, rule_grads = run(params, x, y)
    _close(grads, grads0, 1e-6)
    np.testing.assert_allclose(value, value0)
    _close(grads, autodiff)
    _close(rule_grads, grads0, 1e-6)


def test_feedback_alignment_is_backprop_through_fixed_random_matrices():
    model, params, x, y = _setup()
    key = jax.random.key(42)

    def feedback(l, w, dy, e):
        n_in = w.shape[0]
        b = jax.random.normal(jax.random.fold_in(key, l), w.shape) / math.sqrt(n_in)
        return dy @ b.T

    @jax.jit  # the rule, the written-out rule and backprop in one compiled program
    def run(params, x, y):
        return (
            fbp.grad(model, LOSS, rule=rules.feedback_alignment(key))(params, x, y),
            _manual(params, x, y, feedback),
            fbp.grad(model, LOSS)(params, x, y),
        )

    got, manual, true = run(params, x, y)
    _close(got, manual)
    # Only the top layer's update is the true gradient.
    _close(got[-1], true[-1])
    assert not np.allclose(got[0]["w"], true[0]["w"], rtol=1e-2)


def test_feedback_matrices_are_deterministic_in_the_key():
    model, params, x, y = _setup()

    def bottom_update(key, scale=1.0):
        rule = rules.feedback_alignment(key, scale=scale)
        return lambda p, x, y: fbp.grad(model, LOSS, rule=rule)(p, x, y)[0]["w"]

    @jax.jit  # the four rules in one compiled program
    def run(params, x, y):
        keys = (jax.random.key(1), jax.random.key(1), jax.random.key(2))
        return [bottom_update(k)(params, x, y) for k in keys] + [
            bottom_update(jax.random.key(1), scale=2.0)(params, x, y)
        ]

    f, g, h, scaled = run(params, x, y)
    np.testing.assert_array_equal(f, g)
    assert not np.allclose(f, h)
    # Two feedback matrices below the top layer, each doubled: the bottom update is ×4.
    np.testing.assert_allclose(scaled, 4 * f, rtol=1e-5, atol=1e-7)


def test_precomputed_matrices_give_the_same_updates():
    """Matrices drawn once equal those drawn in the step, through residual blocks too:
    feedback alignment and DFA, both in one compiled program."""
    block = nn.residual(nn.serial(nn.dense(6), nn.tanh()))
    model = nn.serial(nn.dense(6), nn.tanh(), block, nn.dense(4), nn.tanh(), nn.dense(3))
    rng = np.random.default_rng(0)
    params, x = _random_params(model, (5,), rng), _normal(rng, 8, 5)
    y = jnp.arange(8) % 3
    in_step = {
        "fa": rules.feedback_alignment(jax.random.key(9), scale=1.5),
        "dfa": rules.direct_feedback_alignment(jax.random.key(9), scale=1.5),
    }

    @jax.jit  # the draws and both rules' updates in one compiled program
    def run(params, x, y):
        out = {}
        for name, rule in in_step.items():
            fixed = rule.precomputed(model, (5,))
            want = fbp.grad(model, LOSS, rule=rule)(params, x, y)
            out[name] = fixed.matrices, want, fbp.grad(model, LOSS, rule=fixed)(params, x, y)
        return out

    other = nn.serial(nn.dense(7), nn.tanh(), nn.dense(3))
    other_params = _random_params(other, (5,), rng)
    for name, (matrices, want, got) in run(params, x, y).items():
        rule = in_step[name]
        fixed = rule._replace(matrices=matrices)  # what precomputed returned, outside the program
        assert rule.matrices is None and len(fixed.matrices) == 4, name
        _close(got, want, 1e-6)
        # The matrices belong to the model they were drawn for.
        with pytest.raises(
            fbp.ShapeError,
            match=r"(weight|layer with weights) \d\).*precomputed one is \(\d+, \d+\)",
        ):
            jax.eval_shape(fbp.grad(other, LOSS, rule=fixed), other_params, x, y)  # tracing


def test_direct_feedback_alignment_sends_the_output_error_to_every_layer():
    model, params, x, y = _setup(widths=(7, 6, 5, 3))
    key = jax.random.key(3)

    def feedback(l, w, dy, e):
        n_in, classes = w.shape[0], e.shape[1]
        b = jax.random.normal(jax.random.fold_in(key, l), (n_in, classes)) / math.sqrt(classes)
        return e @ b.T

    @jax.jit  # the rule and the written-out rule in one compiled program
    def run(params, x, y):
        rule = rules.direct_feedback_alignment(key)
        return fbp.grad(model, LOSS, rule=rule)(params, x, y), _manual(params, x, y, feedback)

    got, manual = run(params, x, y)
    _close(got, manual)


def test_sign_symmetric_feedback():
    model, params, x, y = _setup()

    def feedback(l, w, dy, e):
        return dy @ (jnp.sign(w) * jnp.abs(w).mean()).T

    @jax.jit  # the rule and the written-out rule in one compiled program
    def run(params, x, y):
        return (
            fbp.grad(model, LOSS, rule=rules.sign_symmetric())(params, x, y),
            _manual(params, x, y, feedback),
        )

    got, manual = run(params, x, y)
    _close(got, manual)


def test_rules_leave_other_layers_backward_untouched():
    # No dense layer: every rule is ordinary backprop.
    def init(key, shape):
        return {"s": jnp.full(shape[-1:], 1.5)}, shape

    model = nn.serial(nn.from_jax(lambda p, x: jnp.sin(x) * p["s"][None, :], init), nn.tanh())
    params = ({"s": jnp.full((3,), 1.5)}, {})
    x, y = _normal(np.random.default_rng(1), 4, 3), jnp.zeros((4, 3))
    rules_ = (rules.feedback_alignment(jax.random.key(0)), rules.sign_symmetric())

    @jax.jit  # backprop and both rules in one compiled program
    def run(params, x, y):
        want = fbp.grad(model, losses.mse)(params, x, y)
        return want, [fbp.grad(model, losses.mse, rule=rule)(params, x, y) for rule in rules_]

    want, got = run(params, x, y)
    for grads in got:
        _close(grads, want, 1e-6)


def test_feedback_rules_work_on_sequences():
    model = nn.serial(nn.dense(6), nn.tanh(), nn.dense(4))
    rng = np.random.default_rng(0)
    params, x = _random_params(model, (5, 3), rng), _normal(rng, 2, 5, 3)
    y = jnp.zeros((2, 5, 4))

    @jax.jit  # both rules and the written-out DFA update in one compiled program
    def run(params, x, y):
        grads = fbp.grad(model, losses.mse, rule=rules.feedback_alignment(jax.random.key(1)))(
            params, x, y
        )
        # DFA projects the whole (flattened) output error of an example to the layer's input.
        dfa = rules.direct_feedback_alignment(jax.random.key(1))
        got = fbp.grad(model, losses.mse, rule=dfa)(params, x, y)
        pred = model.apply(params, x)
        e = losses.mse.grad(pred, y).reshape(2, -1)
        b = rules.feedback_matrix(jax.random.key(1), 1, (5 * 6, 5 * 4), jnp.float32, fan=20)
        h = jnp.tanh(x @ params[0]["w"] + params[0]["b"][None, None, :])
        delta = (e @ b.T).reshape(2, 5, 6) * (1 - h * h)
        return grads, got[0]["w"], jnp.einsum("btf,bth->fh", x, delta)

    grads, got, want = run(params, x, y)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_rule_errors():
    model, params, x, y = _setup()
    with pytest.raises(fbp.ConfigError, match="rule must have a layer_dx method"):
        fbp.value_and_grad(model, LOSS, rule="feedback_alignment")
    with pytest.raises(fbp.ConfigError, match="key must be a JAX key"):
        rules.feedback_alignment(0)
    with pytest.raises(fbp.ConfigError, match="scale must be positive"):
        rules.direct_feedback_alignment(jax.random.key(0), scale=0.0)
    with pytest.raises(fbp.ShapeError, match="are these params from another model"):
        fbp.grad(model, LOSS, rule=rules.sign_symmetric())((params[0], {}, {"v": 1}), x, y)


def test_custom_rule_protocol():
    class Zero(tuple):  # any object with layer_dx: here, no error reaches lower layers
        name = "zero"

        def layer_dx(self, site):
            return jnp.zeros_like(site.visit.x)

    model, params, x, y = _setup()
    grads = jax.jit(fbp.grad(model, LOSS, rule=Zero()))(params, x, y)
    assert np.all(grads[0]["w"] == 0) and np.any(grads[-1]["w"] != 0)


# --------------------------------------------------------------------------- training on digits


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _train_with_angles(rule, digits, epochs=12, batch=32, lr=3e-3):
    """Adam on a 64-64-64-10 tanh MLP with ``rule``'s updates; per-epoch mean angles."""
    model = nn.serial(nn.dense(64), nn.tanh(), nn.dense(64), nn.tanh(), nn.dense(10))
    params, _ = model.init(jax.random.key(0), digits.input_shape)
    x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
    steps = len(x) // batch
    opt = optax.adam(lr)
    f = diagnostics.value_grad_and_angles(model, LOSS, rule)

    @jax.jit
    def run(params, key):
        def epoch(carry, k):
            idx = jax.random.permutation(k, len(x))[: steps * batch].reshape(steps, batch)

            def step(carry, i):
                p, s = carry
                _, updates, angles = f(p, x[i], y[i])
                u, s = opt.update(updates, s, p)
                return (optax.apply_updates(p, u), s), angles

            carry, angles = jax.lax.scan(step, carry, idx)
            return carry, angles.mean(axis=0)

        init = (params, opt.init(params))
        (params, _), angles = jax.lax.scan(epoch, init, jax.random.split(key, epochs))
        return params, angles

    params, angles = run(params, jax.random.key(1))
    accuracy = fbp.train.evaluate(model, params, digits.x_test, digits.y_test)["accuracy"]
    return accuracy, np.asarray(angles)


@pytest.mark.parametrize(
    "make_rule", [rules.feedback_alignment, rules.direct_feedback_alignment], ids=["fa", "dfa"]
)
@pytest.mark.slow
def test_feedback_alignment_trains_digits_and_aligns(make_rule, digits):
    accuracy, angles = _train_with_angles(make_rule(jax.random.key(7)), digits)
    assert accuracy >= 0.90, accuracy
    hidden = angles[:, :-1]  # the top layer's update is exact (angle 0)
    np.testing.assert_allclose(angles[:, -1], 0.0, atol=1e-2)
    assert np.all(hidden[0] > 75), hidden[0]  # random feedback: ~orthogonal at first
    assert np.all(hidden[-1] < 65), hidden[-1]  # then aligned, well below 90°
    assert np.all(hidden[0] - hidden[-1] > 15), angles


# --------------------------------------------------------------------------- every layer with weights
#
# One model holds every public layer family with weights (and a user's own layer),
# each between two probes: identity layers whose gradient is the error arriving at
# them, so a rule's `dx` below each layer and the `dy` it received are read off
# `fbp.grad`'s output. One jitted program per rule, one for all the references.

BATCH, CLASSES, SEQ = 3, 3, (6, 4)
TOL = 1e-4


def _probe(batch):
    """``y = x + shift``, so ``dshift = dy``: reads the error arriving at it.

    ``shift`` has one entry per element of the batch's input and is 1-D, so no
    rule counts it as a weight. Below a layer it reads the ``dx`` the layer
    sends down; above it, the ``dy`` the layer receives.
    """

    def init(key, shape):
        return {"shift": jnp.zeros(batch * math.prod(shape))}, tuple(shape)

    def forward(params, x, *, key=None, train=False):
        return x + params["shift"].reshape(x.shape), ()

    def backward(params, cache, dy):
        return {"shift": dy.reshape(-1)}, dy

    return nn.Layer(init, forward, backward, name="probe")


class Probed(NamedTuple):
    index: int  # the layer's position in the serial model
    below: int  # the probe under it (reads its dx)
    above: int  # the probe over it (reads its dy)


def _probed(*items):
    """``serial`` of ``items``, each ``(label, layer)`` between probes; plain layers as given."""
    layers, where = [], {}
    for item in items:
        if isinstance(item, nn.Layer):
            layers.append(item)
            continue
        label, layer = item
        if not layers or layers[-1].name != "probe":
            layers.append(_probe(BATCH))
        layers += [layer, _probe(BATCH)]
        where[label] = Probed(len(layers) - 2, len(layers) - 3, len(layers) - 1)
    return nn.serial(*layers), where


class ConvSpec(NamedTuple):
    strides: tuple
    dilation: tuple
    dims: tuple


CONV = {
    "conv1d": ConvSpec((1,), (2,), ("NWC", "WIO", "NWC")),
    "conv2d": ConvSpec((2, 1), (1, 1), ("NHWC", "HWIO", "NHWC")),
}


def _every_layer_model(which: str):
    """Every public layer family with weights and a user's layer (``"every"``), the
    representative ones the inner loop checks (``"representative"``: dense, a convolution
    and the user's layer, each but the user's with a written-out reference), or the others,
    under a dense head (``"other"``). Every weight costs a random feedback matrix drawn in
    the test's program (and its layer a DFA matrix): the representative model keeps few."""
    if which == "other":
        return _probed(
            ("conv1d", nn.conv1d(4, 3, dilation=2, implementation="xla")),  # (6, 4) -> (6, 4)
            ("rnn", nn.rnn(4)),
            ("gru", nn.gru(4)),
            ("lstm", nn.lstm(4)),
            ("bidirectional", nn.bidirectional(nn.gru(3), nn.lstm(2, reverse=True))),  # -> (6, 5)
            ("self_attention", nn.self_attention(2, 4)),  # -> (6, 4)
            nn.flatten(),
            ("top", nn.dense(CLASSES)),
        )
    if which == "representative":
        return _probed(
            ("dense", nn.dense(4)),  # on a sequence: (6, 4) -> (6, 4)
            nn.reshape((6, 4, 1)),
            ("conv2d", nn.conv2d(2, 3, strides=(2, 1))),  # patches form: -> (3, 4, 2)
            nn.flatten(),
            ("user", gated_linear(6)),
            ("top", nn.dense(CLASSES)),
        )
    return _probed(
        ("dense", nn.dense(5)),  # on a sequence: (6, 4) -> (6, 5)
        ("conv1d", nn.conv1d(4, 3, dilation=2, implementation="xla")),  # -> (6, 4)
        nn.reshape((6, 4, 1)),
        ("conv2d", nn.conv2d(2, 3, strides=(2, 1))),  # patches form: -> (3, 4, 2)
        nn.reshape(SEQ),
        ("rnn", nn.rnn(5)),
        ("gru", nn.gru(4)),
        ("lstm", nn.lstm(4)),
        ("bidirectional", nn.bidirectional(nn.gru(3), nn.lstm(2, reverse=True))),  # -> (6, 5)
        ("self_attention", nn.self_attention(2, 4)),  # -> (6, 4)
        nn.flatten(),
        ("user", gated_linear(6)),
        ("top", nn.dense(CLASSES)),
    )


# Every weight of each layer, in the order rules number them: (leaf inside the layer, key).
# Declared by the layer (recurrent: w_x then w_h), else — the user's layer — every
# float leaf with two or more axes, in params order ("w" < "w_gate").
WEIGHTS = {
    "dense": [((), "w")],
    "conv1d": [((), "w")],
    "conv2d": [((), "w")],
    "rnn": [((), "w_x"), ((), "w_h")],
    "gru": [((), "w_x"), ((), "w_h")],
    "lstm": [((), "w_x"), ((), "w_h")],
    "bidirectional": [((0,), "w_x"), ((0,), "w_h"), ((1,), "w_x"), ((1,), "w_h")],
    "self_attention": [((), "w_qkv"), ((), "w_o")],
    "user": [((), "w"), ((), "w_gate")],
    "top": [((), "w")],
}


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, key: _set(tree[key], rest, value)}
    return tuple(_set(t, rest, value) if i == key else t for i, t in enumerate(tree))


def _leaves_with_weights(label):
    return list(dict.fromkeys(leaf for leaf, _ in WEIGHTS[label]))


def _transported(a, w, b, spec):
    """``einsum(spec, a, w)`` in value, whose error to ``a`` goes back through ``b`` instead of ``w``."""
    through_b = jnp.einsum(spec, a, b)
    return through_b + jax.lax.stop_gradient(jnp.einsum(spec, a, w) - through_b)


def _gru_written_out(p, fb, x):
    """PyTorch's GRU in jax.numpy; its products with ``W_x`` and ``W_h`` send the error back
    through ``fb``'s. Its ``jax.vjp`` in ``x`` is backpropagation through time at the true
    activations with ``B_x``, ``B_h`` transporting the error: what a rule's GRU must send.
    (Not ``jax.vjp`` of the GRU run with ``B`` as its weights: its gates would differ.)"""
    n = p["w_h"].shape[0]
    a_x = _transported(x, p["w_x"], fb["w_x"], "btf,fg->tbg") + p["b"][None, None, :]

    def step(h, a_x_t):
        a_h = _transported(h, p["w_h"], fb["w_h"], "bh,hg->bg")
        r = jax.nn.sigmoid(a_x_t[:, :n] + a_h[:, :n])
        z = jax.nn.sigmoid(a_x_t[:, n : 2 * n] + a_h[:, n : 2 * n])
        c = jnp.tanh(a_x_t[:, 2 * n :] + r * (a_h[:, 2 * n :] + p["b_hn"][None, :]))
        h = (1 - z) * c + z * h
        return h, h

    _, hs = jax.lax.scan(step, jnp.zeros((x.shape[0], n), x.dtype), a_x)
    return hs.transpose(1, 0, 2)


def _rnn_written_out(p, fb, x):
    """The Elman RNN in jax.numpy, ``h_t = tanh(x_t·W_x + h_{t−1}·W_h + b)``, sending the
    error back through ``fb``'s ``B_x``, ``B_h`` (as :func:`_gru_written_out`)."""
    a_x = _transported(x, p["w_x"], fb["w_x"], "btf,fg->tbg") + p["b"][None, None, :]

    def step(h, a_x_t):
        h = jnp.tanh(a_x_t + _transported(h, p["w_h"], fb["w_h"], "bh,hg->bg"))
        return h, h

    _, hs = jax.lax.scan(step, jnp.zeros((x.shape[0], p["w_h"].shape[0]), x.dtype), a_x)
    return hs.transpose(1, 0, 2)


def _conv(x, w, spec):
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=spec.strides,
        padding="SAME",
        rhs_dilation=spec.dilation,
        dimension_numbers=spec.dims,
    )


def _bias(b, ndim):
    return b.reshape((1,) * (ndim - 1) + b.shape)


class Reference(NamedTuple):
    dparams: object  # jax.vjp of the layer's forward in its params: the true local gradient
    dx_true: object  # jax.vjp in its input: backprop's dx at the same dy
    dx_rule: object  # the layer's own backward with its weights swapped for their feedback
    dx_one_true: tuple  # the same with one weight at a time left as it was


class WrittenOut(NamedTuple):
    y: object  # the layer's output, written out (checks the written-out forward)
    dx: object  # the rule's dx, written out with jax.numpy / lax / jax.vjp
    dw: object  # the weight's true gradient, written out (dense, conv)


class EveryLayer(NamedTuple):
    model: nn.Layer
    where: dict
    params: tuple
    x: jax.Array
    y: jax.Array
    shapes: list  # the input of every layer of the serial model, then the output
    reference: object
    which: str  # "every" layer family, the "representative" ones, or the "other" ones


def _make_reference(model, where):
    children = model.children

    def written_out(label, p, fb, h, dy):
        if label in ("dense", "top"):  # dx = dy·Bᵀ, dW = xᵀ·dy over all but the last axis
            y = jnp.einsum("...i,io->...o", h, p["w"]) + _bias(p["b"], h.ndim)
            dx = jnp.einsum("...o,io->...i", dy, fb["w"])
            dw = h.reshape(-1, h.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
            return WrittenOut(y, dx, dw)
        if label in CONV:  # dx: the transposed convolution of dy with B; dW: vjp at W
            spec = CONV[label]
            y, vjp_w = jax.vjp(lambda w: _conv(h, w, spec), p["w"])
            (dx,) = jax.vjp(lambda x: _conv(x, fb["w"], spec), h)[1](dy)
            return WrittenOut(y + _bias(p["b"], y.ndim), dx, vjp_w(dy)[0])
        if label in ("rnn", "gru"):
            written = _rnn_written_out if label == "rnn" else _gru_written_out
            y, vjp_x = jax.vjp(lambda x: written(p, fb, x), h)
            return WrittenOut(y, vjp_x(dy)[0], None)
        return None

    @jax.jit
    def reference(params, x, y, feedback, dys):
        hs = [x]
        for layer, p in zip(children, params, strict=True):
            hs.append(layer.apply(p, hs[-1]))
        e = jax.grad(lambda pred: LOSS.value(pred, y))(hs[-1])  # the output error
        refs, written = {}, {}
        for label, at in where.items():
            layer, p, h, dy, fb = (
                children[at.index],
                params[at.index],
                hs[at.index],
                dys[label],
                feedback[label],
            )
            _, cache = layer.forward(p, h)
            dparams, dx_true = jax.vjp(layer.apply, p, h)[1](dy)
            one_true = tuple(
                layer.backward(_set(fb, (*leaf, k), _get(p, (*leaf, k))), cache, dy)[1]
                for leaf, k in WEIGHTS[label]
            )
            refs[label] = Reference(dparams, dx_true, layer.backward(fb, cache, dy)[1], one_true)
            written[label] = written_out(label, p, fb, h, dy)
        return hs, e, refs, written

    return lambda *args: jax.tree.map(np.asarray, reference(*args))


@functools.cache
def _every(which: str) -> EveryLayer:
    model, where = _every_layer_model(which)
    param_shapes, _ = init_shapes(model, SEQ)
    rng = np.random.default_rng(0)

    def draw(leaf):  # device_array: jnp.asarray would compile a conversion per shape
        scale = 1 / np.sqrt(leaf.shape[-2]) if len(leaf.shape) >= 2 else 0.3
        return device_array(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    params = jax.tree.map(draw, param_shapes)
    x = device_array(rng.standard_normal((BATCH, *SEQ)), jnp.float32)
    y = device_array(rng.integers(0, CLASSES, BATCH), jnp.int32)

    def inputs(params):
        hs = [x]
        for layer, p in zip(model.children, params, strict=True):
            hs.append(layer.apply(p, hs[-1]))
        return hs

    shapes = [h.shape for h in jax.eval_shape(inputs, params)]
    return EveryLayer(model, where, params, x, y, shapes, _make_reference(model, where), which)


# The inner loop checks the representative layers; the slow sweep the other ones.
MODELS = ["representative", pytest.param("other", marks=pytest.mark.slow)]


def _read(every, grads, probe):
    """The error a probe saw: its ``shift``'s gradient, in the shape of its input."""
    return grads[probe]["shift"].reshape(every.shapes[probe])


def _swapped(every, make):
    """Each layer's params with weight number ``n``, ``W``, replaced by ``make(W, n)``;
    and the list of those replacements in the order of ``n``."""
    feedback, matrices = {}, []
    for label, at in every.where.items():
        tree = every.params[at.index]
        for leaf, key in WEIGHTS[label]:
            path = (*leaf, key)
            matrices.append(make(_get(tree, path), len(matrices)))
            tree = _set(tree, path, matrices[-1])
        feedback[label] = tree
    return feedback, matrices


def _fa_matrix(key):
    def make(w, number):  # W's shape, variance 1/fan_in (all axes but the last)
        return rules.feedback_matrix(key, number, w.shape, w.dtype, fan=math.prod(w.shape[:-1]))

    return make


def _sign_matrix(w, number):
    return jnp.sign(w) * jnp.mean(jnp.abs(w))


FA_KEY = jax.random.key(5)

# The rules that swap weights: how each draws a weight's feedback matrix, and the rule
# (feedback alignment handed its matrices in the model's weight order).
FEEDBACK_RULES = {
    "feedback_alignment": (
        _fa_matrix(FA_KEY),
        lambda matrices: rules.FeedbackAlignment(FA_KEY, matrices=tuple(matrices)),
    ),
    "sign_symmetric": (_sign_matrix, lambda matrices: rules.sign_symmetric()),
}


def test_feedback_layers_number_every_weight_in_forward_order():
    every = _every("every")
    layers = fbp.backprop.feedback_layers(every.model, every.params)
    got = [(f.site.path, path, number) for f in layers for path, number in f.weights]
    want = [
        ((at.index, *leaf), (key,), n)
        for n, (label, at, leaf, key) in enumerate(
            (label, at, leaf, key)
            for label, at in every.where.items()
            for leaf, key in WEIGHTS[label]
        )
    ]
    assert got == want  # the probes (1-D params) and the reshapes have no weights
    # Layers with weights (direct feedback alignment's numbering): one per leaf layer.
    leaves = [
        (at.index, *leaf)
        for label, at in every.where.items()
        for leaf in _leaves_with_weights(label)
    ]
    assert [f.site.path for f in layers] == leaves
    assert [f.index for f in layers] == list(range(len(leaves)))
    # The inner loop's representative model and the slow sweep's other one hold every family.
    labels = {*_every_layer_model("representative")[1], *_every_layer_model("other")[1]}
    assert labels == set(every.where)


DFA_KEY = jax.random.key(6)


def _dfa_matrices(every):
    """DFA's ``B`` of each layer with weights, ``(n_in flattened, classes)``, by the recipe
    (a bidirectional layer holds two); and the rule's own in-step draws, in the same order."""
    in_step = rules.direct_feedback_alignment(DFA_KEY)
    out, drawn, number = {}, [], 0
    for label, at in every.where.items():
        n_in = math.prod(every.shapes[at.index][1:])
        out[label] = []
        for _ in _leaves_with_weights(label):
            out[label].append(
                rules.feedback_matrix(DFA_KEY, number, (n_in, CLASSES), jnp.float32, fan=CLASSES)
            )
            drawn.append(in_step.matrix(number, n_in, CLASSES, jnp.float32))
            number += 1
    return out, drawn


def _grads_of_every_rule(every):
    """Each rule's matrices (checked against the rule's own in-step draws) and its
    ``fbp.grad``: the three rules' gradients in ONE compiled program, their forward shared.

    Feedback alignment and DFA are handed their matrices, as a ``precomputed`` rule
    carries them: the normal draws compiled into the step would double the compile time.
    """

    @jax.jit
    def matrices(params):
        swapped, drawn = {}, {}
        for name, (make_matrix, _) in FEEDBACK_RULES.items():
            feedback, matrices = _swapped(every._replace(params=params), make_matrix)
            swapped[name] = (feedback, matrices)
        in_step = rules.feedback_alignment(FA_KEY)
        fa_matrices = swapped["feedback_alignment"][1]
        drawn["feedback_alignment"] = [
            in_step.matrix(n, b.shape, b.dtype) for n, b in enumerate(fa_matrices)
        ]
        dfa, drawn["direct_feedback_alignment"] = _dfa_matrices(every)
        return swapped, dfa, drawn

    swapped, dfa, drawn = matrices(every.params)
    dfa_ordered = [b for label in every.where for b in dfa[label]]
    for mine, in_step in (
        (swapped["feedback_alignment"][1], drawn["feedback_alignment"]),  # N(0, 1)/√fan_in
        (dfa_ordered, drawn["direct_feedback_alignment"]),
    ):
        for b, b_in_step in zip(mine, in_step, strict=True):
            np.testing.assert_array_equal(b_in_step, b)
    all_rules = {name: make(swapped[name][1]) for name, (_, make) in FEEDBACK_RULES.items()}
    all_rules["direct_feedback_alignment"] = rules.DirectFeedbackAlignment(
        DFA_KEY, matrices=tuple(dfa_ordered)
    )

    @jax.jit
    def grads(params, x, y):
        return {
            name: fbp.grad(every.model, LOSS, rule=r)(params, x, y) for name, r in all_rules.items()
        }

    got = jax.tree.map(np.asarray, grads(every.params, every.x, every.y))
    feedback = {name: swapped[name][0] for name in FEEDBACK_RULES}
    return got, feedback, dfa


def _check_swapped(every, grads, feedback):
    """FA and sign symmetry: below every layer with weights the error is the layer's own
    backward with each weight swapped for its feedback matrix — not backprop's, and no
    weight left out — while the layer's dparams stay the true local gradient."""
    dys = {label: _read(every, grads, at.above) for label, at in every.where.items()}
    hs, e, refs, written = every.reference(every.params, every.x, every.y, feedback, dys)
    # The top layer receives the output error itself.
    assert rel_err(dys["top"], e) < TOL
    for label, at in every.where.items():
        ref = refs[label]
        got = _read(every, grads, at.below)
        assert rel_err(got, ref.dx_rule) < TOL, label
        assert rel_err(got, ref.dx_true) > 0.05, f"{label}: backprop's dx"
        for (leaf, key), dx in zip(WEIGHTS[label], ref.dx_one_true, strict=True):
            assert rel_err(got, dx) > 1e-2, f"{label}: {key} at {leaf} is not swapped"
        assert_trees_close(grads[at.index], ref.dparams, TOL)
        # The rule written out independently: dense, both convolutions, the RNN and the GRU.
        w = written[label]
        if w is not None:
            assert rel_err(w.y, hs[at.index + 1]) < TOL, f"{label}: written-out forward"
            assert rel_err(got, w.dx) < TOL, f"{label}: written-out dx"
            if w.dw is not None:
                assert rel_err(grads[at.index]["w"], w.dw) < TOL, f"{label}: written-out dW"


def _check_direct(every, grads, matrices):
    """DFA: below every layer with weights the projected output error ``e·Bᵀ``."""
    dys = {label: _read(every, grads, at.above) for label, at in every.where.items()}
    unchanged = {label: every.params[at.index] for label, at in every.where.items()}
    _, e, refs, _ = every.reference(every.params, every.x, every.y, unchanged, dys)
    e = e.reshape(BATCH, -1)
    for label, bs in matrices.items():
        at = every.where[label]
        want = sum(e @ np.asarray(b).T for b in bs)  # e·Bᵀ
        got = _read(every, grads, at.below)
        assert rel_err(got, want.reshape(every.shapes[at.index])) < TOL, label
        assert rel_err(got, refs[label].dx_true) > 0.05, f"{label}: backprop's dx"
        assert_trees_close(grads[at.index], refs[label].dparams, TOL)


@pytest.mark.parametrize("which", MODELS)
def test_every_rule_replaces_the_error_below_every_layer_with_weights(which):
    """Feedback alignment and sign symmetry swap every weight of every layer; direct
    feedback alignment sends the projected output error below every layer. One program
    for the three rules' gradients, one for all the references."""
    every = _every(which)
    grads, feedback, dfa_matrices = _grads_of_every_rule(every)
    for name in FEEDBACK_RULES:
        _check_swapped(every, grads[name], feedback[name])
    _check_direct(every, grads["direct_feedback_alignment"], dfa_matrices)


def test_layers_without_weights_declare_none_and_keep_their_backward():
    """Embedding: integer ids carry no error, so there is no weight transport to replace —
    its 2-D table would count as a weight by default, hence ``weights=()``. Layer and batch
    norm: their scale and bias act per feature (elementwise), so ``dx`` never goes through
    a weight matrix; batch norm's running statistics are not trained at all."""
    model = nn.serial(nn.embedding(10, 4), nn.layer_norm(), nn.batch_norm())
    rng = np.random.default_rng(0)
    params = _random_params(model, (5,), rng)
    params[2]["stats"]["var"] = jnp.ones(4)  # running variances are positive
    for layer in model.children:
        assert layer.extensions.weights == ()
    assert fbp.backprop.feedback_layers(model, params) == ()
    undeclared = nn.serial(model.children[0]._replace(extensions=None))
    assert len(fbp.backprop.feedback_layers(undeclared, (params[0],))) == 1
    ids = jnp.asarray(rng.integers(0, 10, (3, 5)), jnp.int32)
    y = _normal(rng, 3, 5, 4)
    rules_ = (
        rules.feedback_alignment(jax.random.key(3)),
        rules.sign_symmetric(),
        rules.direct_feedback_alignment(jax.random.key(3)),
    )

    @jax.jit  # backprop and the three rules in one compiled program
    def run(params, ids, y):
        want = fbp.grad(model, losses.mse)(params, ids, y)
        return want, [fbp.grad(model, losses.mse, rule=rule)(params, ids, y) for rule in rules_]

    want, got = run(params, ids, y)
    for grads in got:
        chex.assert_trees_all_equal(grads, want)


def test_feedback_alignment_refuses_a_from_jax_layer_rather_than_leave_it_on_backprop():
    # from_jax's backward replays the forward's jax.vjp: no weight a feedback matrix
    # could replace is read there, so the rule says so instead of sending backprop's dx.
    def init(key, shape):
        return {"w": jax.random.normal(key, (shape[-1], 3)) / 2}, (3,)

    layer = nn.from_jax(lambda p, x: jnp.tanh(x @ p["w"]), init, name="tanh_dense")
    model = nn.serial(_probe(4), layer)
    rng = np.random.default_rng(0)
    params, x, y = _random_params(model, (5,), rng), _normal(rng, 4, 5), jnp.zeros((4, 3))
    assert len(fbp.backprop.feedback_layers(model, params)) == 1  # its w is a weight
    rule = rules.feedback_alignment(jax.random.key(2))
    with pytest.raises(
        fbp.ConfigError,
        match=r"serial layer 1 \(from_jax\(tanh_dense\) \[jax.vjp\]\): its backward computes dx "
        r"without reading the weights",
    ):
        jax.eval_shape(fbp.grad(model, losses.mse, rule=rule), params, x, y)  # while tracing


def test_a_backward_that_ignores_its_weights_is_refused_not_left_on_backprop():
    dense = nn.dense(3)

    def replay(params, cache, dy):  # reads W from a closure instead of the params it is given
        return dense.backward(frozen, cache, dy)

    model = nn.serial(_probe(2), nn.Layer(dense.init, dense.forward, replay, name="replayed"))
    rng = np.random.default_rng(0)
    params, x, y = _random_params(model, (4,), rng), _normal(rng, 2, 4), jnp.zeros((2, 3))
    frozen = params[1]
    rule = rules.feedback_alignment(jax.random.key(2))
    with pytest.raises(
        fbp.ConfigError,
        match=r"serial layer 1 \(replayed\): its backward computes dx without reading the "
        r"weights \[\('w',\)\]",
    ):
        jax.eval_shape(fbp.grad(model, losses.mse, rule=rule), params, x, y)  # while tracing
