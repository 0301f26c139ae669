"""fbp.rules: alternative credit assignment through ``value_and_grad(..., rule=)``.

Each rule is checked against the same algorithm written out by hand in plain
jax.numpy (deltas computed explicitly, feedback matrices drawn from the
documented recipe); ordinary backprop as a rule against ``jax.grad``; and
feedback alignment and DFA must train a dense network on digits to ≥ 90 %
test accuracy while their updates' angle with the true gradient (measured by
``fbp.diagnostics.value_grad_and_angles``) falls from ~90° well below it.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbp
from fbp import data, diagnostics, losses, nn, rules

LOSS = losses.softmax_cross_entropy


def _setup(widths=(7, 6, 3), n_in=5, batch=9, seed=0):
    layers = []
    for width in widths[:-1]:
        layers += [nn.dense(width), nn.tanh()]
    model = nn.serial(*layers, nn.dense(widths[-1]))
    k_init, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    params, _ = model.init(k_init, (n_in,))
    x = jax.random.normal(k_x, (batch, n_in))
    y = jax.random.randint(k_y, (batch,), 0, widths[-1])
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
    params, _ = model.init(jax.random.key(0), (4,))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    y = jnp.array([0, 1, 2, 0, 1])
    value, grads = jax.jit(fbp.value_and_grad(model, LOSS, rule=rules.backprop()))(params, x, y)
    value0, grads0 = fbp.value_and_grad(model, LOSS)(params, x, y)
    _close(grads, grads0, 1e-6)
    np.testing.assert_allclose(value, value0)
    _close(grads, jax.grad(lambda p: LOSS.value(model.apply(p, x), y))(params))
    _close(fbp.grad(model, LOSS, rule=rules.backprop())(params, x, y), grads0, 1e-6)


def test_feedback_alignment_is_backprop_through_fixed_random_matrices():
    model, params, x, y = _setup()
    key = jax.random.key(42)

    def feedback(l, w, dy, e):
        n_in = w.shape[0]
        b = jax.random.normal(jax.random.fold_in(key, l), w.shape) / math.sqrt(n_in)
        return dy @ b.T

    got = jax.jit(fbp.grad(model, LOSS, rule=rules.feedback_alignment(key)))(params, x, y)
    _close(got, _manual(params, x, y, feedback))
    # Only the top layer's update is the true gradient.
    true = fbp.grad(model, LOSS)(params, x, y)
    _close(got[-1], true[-1])
    assert not np.allclose(got[0]["w"], true[0]["w"], rtol=1e-2)


def test_feedback_matrices_are_deterministic_in_the_key():
    model, params, x, y = _setup()
    f = fbp.grad(model, LOSS, rule=rules.feedback_alignment(jax.random.key(1)))
    g = fbp.grad(model, LOSS, rule=rules.feedback_alignment(jax.random.key(1)))
    h = fbp.grad(model, LOSS, rule=rules.feedback_alignment(jax.random.key(2)))
    np.testing.assert_array_equal(f(params, x, y)[0]["w"], g(params, x, y)[0]["w"])
    assert not np.allclose(f(params, x, y)[0]["w"], h(params, x, y)[0]["w"])
    scaled = fbp.grad(model, LOSS, rule=rules.feedback_alignment(jax.random.key(1), scale=2.0))
    # Two feedback matrices below the top layer, each doubled: the bottom update is ×4.
    np.testing.assert_allclose(
        scaled(params, x, y)[0]["w"], 4 * f(params, x, y)[0]["w"], rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize(
    "make_rule", [rules.feedback_alignment, rules.direct_feedback_alignment], ids=["fa", "dfa"]
)
def test_precomputed_matrices_give_the_same_updates(make_rule):
    """Matrices drawn once equal those drawn in the step, through residual blocks too."""
    block = nn.residual(nn.serial(nn.dense(6), nn.tanh()))
    model = nn.serial(nn.dense(6), nn.tanh(), block, nn.dense(4), nn.tanh(), nn.dense(3))
    params, _ = model.init(jax.random.key(0), (5,))
    x = jax.random.normal(jax.random.key(1), (8, 5))
    y = jnp.arange(8) % 3
    rule = make_rule(jax.random.key(9), scale=1.5)
    fixed = rule.precomputed(model, (5,))
    assert rule.matrices is None and len(fixed.matrices) == 4
    want = jax.jit(fbp.grad(model, LOSS, rule=rule))(params, x, y)
    got = jax.jit(fbp.grad(model, LOSS, rule=fixed))(params, x, y)
    _close(got, want, 1e-6)
    # The matrices belong to the model they were drawn for.
    other = nn.serial(nn.dense(7), nn.tanh(), nn.dense(3))
    other_params, _ = other.init(jax.random.key(0), (5,))
    with pytest.raises(
        fbp.ShapeError, match=r"(weight|layer with weights) \d\).*precomputed one is \(\d+, \d+\)"
    ):
        fbp.grad(other, LOSS, rule=fixed)(other_params, x, y)


def test_direct_feedback_alignment_sends_the_output_error_to_every_layer():
    model, params, x, y = _setup(widths=(7, 6, 5, 3))
    key = jax.random.key(3)

    def feedback(l, w, dy, e):
        n_in, classes = w.shape[0], e.shape[1]
        b = jax.random.normal(jax.random.fold_in(key, l), (n_in, classes)) / math.sqrt(classes)
        return e @ b.T

    got = jax.jit(fbp.grad(model, LOSS, rule=rules.direct_feedback_alignment(key)))(params, x, y)
    _close(got, _manual(params, x, y, feedback))


def test_sign_symmetric_feedback():
    model, params, x, y = _setup()

    def feedback(l, w, dy, e):
        return dy @ (jnp.sign(w) * jnp.abs(w).mean()).T

    got = jax.jit(fbp.grad(model, LOSS, rule=rules.sign_symmetric()))(params, x, y)
    _close(got, _manual(params, x, y, feedback))


def test_rules_leave_other_layers_backward_untouched():
    # No dense layer: every rule is ordinary backprop.
    def init(key, shape):
        return {"s": jnp.full(shape[-1:], 1.5)}, shape

    model = nn.serial(nn.from_jax(lambda p, x: jnp.sin(x) * p["s"][None, :], init), nn.tanh())
    params, _ = model.init(jax.random.key(0), (3,))
    x, y = jax.random.normal(jax.random.key(1), (4, 3)), jnp.zeros((4, 3))
    want = fbp.grad(model, losses.mse)(params, x, y)
    for rule in (rules.feedback_alignment(jax.random.key(0)), rules.sign_symmetric()):
        _close(fbp.grad(model, losses.mse, rule=rule)(params, x, y), want, 1e-6)


def test_feedback_rules_work_on_sequences():
    model = nn.serial(nn.dense(6), nn.tanh(), nn.dense(4))
    params, _ = model.init(jax.random.key(0), (5, 3))
    x = jax.random.normal(jax.random.key(2), (2, 5, 3))
    y = jnp.zeros((2, 5, 4))
    grads = fbp.grad(model, losses.mse, rule=rules.feedback_alignment(jax.random.key(1)))(
        params, x, y
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    # DFA projects the whole (flattened) output error of an example to the layer's input.
    dfa = rules.direct_feedback_alignment(jax.random.key(1))
    got = fbp.grad(model, losses.mse, rule=dfa)(params, x, y)
    pred = model.apply(params, x)
    e = losses.mse.grad(pred, y).reshape(2, -1)
    b = rules.feedback_matrix(jax.random.key(1), 1, (5 * 6, 5 * 4), jnp.float32, fan=20)
    h = jnp.tanh(x @ params[0]["w"] + params[0]["b"][None, None, :])
    delta = (e @ b.T).reshape(2, 5, 6) * (1 - h * h)
    np.testing.assert_allclose(got[0]["w"], jnp.einsum("btf,bth->fh", x, delta), rtol=1e-5)


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
    grads = fbp.grad(model, LOSS, rule=Zero())(params, x, y)
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
def test_feedback_alignment_trains_digits_and_aligns(make_rule, digits):
    accuracy, angles = _train_with_angles(make_rule(jax.random.key(7)), digits)
    assert accuracy >= 0.90, accuracy
    hidden = angles[:, :-1]  # the top layer's update is exact (angle 0)
    np.testing.assert_allclose(angles[:, -1], 0.0, atol=1e-2)
    assert np.all(hidden[0] > 75), hidden[0]  # random feedback: ~orthogonal at first
    assert np.all(hidden[-1] < 65), hidden[-1]  # then aligned, well below 90°
    assert np.all(hidden[0] - hidden[-1] > 15), angles
