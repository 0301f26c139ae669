"""A user's own layer as a first-class citizen of every fbp tool.

The layer is ``tests/user_layer.py``'s gated linear unit, written with the three
functions alone (``nn.Layer(init, forward, backward, name=...)``, no
``nn.Extensions``), inside ``dense → tanh → gated_linear → dense``. Every tool
must handle it through its generic fallbacks, each against an independent
reference: ``jax.grad`` and ``jax.vmap(jax.grad)`` of the same forward, and every
credit-assignment rule written out by hand in jax.numpy. A layer whose functions
were replaced (``nn.dense(3)._replace(backward=...)``) is such a user's layer too.
"""

import inspect
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from layer_helpers import init_shapes
from user_layer import gated_linear

import fbp
from fbp import diagnostics, losses, nn, rules, train, verify

LOSS = losses.softmax_cross_entropy
N_IN, BATCH, CLASSES = 4, 7, 3
USER = 2  # the user's layer's place in the model


def _model(user_layer=None):
    return nn.serial(nn.dense(5), nn.tanh(), user_layer or gated_linear(6), nn.dense(CLASSES))


@pytest.fixture(scope="module")
def problem():
    model = _model()
    param_shapes, _ = init_shapes(model, (N_IN,))
    rng = np.random.default_rng(0)

    def draw(leaf):  # biases non-zero, so that a misplaced one in the written-out rules shows
        scale = 1 / np.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.3
        return np.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    params = jax.tree.map(draw, param_shapes)
    x = np.asarray(rng.standard_normal((BATCH, N_IN)), np.float32)
    y = np.arange(BATCH, dtype=np.int32) % CLASSES
    return model, params, x, y


def _close(a, b, tol=1e-5):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol * 1e-1)


def _jax_grad(model, params, x, y):
    return jax.grad(lambda p: LOSS.value(model.apply(p, x), y))(params)


def _per_example_jax_grads(model, params, x, y):
    def one(p, x_n, y_n):
        return LOSS.value(model.apply(p, x_n[None]), y_n[None])

    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)


def _norms(per_example):
    return jnp.sqrt(
        sum(jnp.sum(jnp.square(g.reshape(BATCH, -1)), axis=1) for g in jax.tree.leaves(per_example))
    )


def _forgets_the_gate_path(layer):
    """A classic mistake: ``dx`` without the gate's path, ``da·Wᵀ`` alone (no ``dg·W_gateᵀ``)."""

    def backward(params, cache, dy):
        dparams, _ = layer.backward(params, cache, dy)
        _, _, s = cache
        return dparams, (dy * s) @ params["w"].T

    return layer._replace(backward=backward)


# --------------------------------------------------------------------------- gradient and verify


def test_the_layer_is_the_three_functions_alone():
    layer = gated_linear(6)
    assert layer.extensions is None and layer.structure is None and layer.children == ()
    assert verify.check_layer(layer, jax.random.key(0), (N_IN,)).ok


def test_value_and_grad_equals_jax_grad(computed):
    (value, grads), value_ref = computed["value_and_grad"]
    grads_ref = computed["jax.grad"]
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    _close(grads, grads_ref)


def test_check_model_passes_and_pins_a_wrong_backward_to_the_layer(problem):
    model, params, x, y = problem
    assert verify.check_model(model, LOSS, params, x, y).ok
    wrong = _model(_forgets_the_gate_path(gated_linear(6)))
    # The exact rows pin it: no finite differences (half of a check's program to compile).
    report = verify.check_model(wrong, LOSS, params, x, y, directions=0, coordinates=0)
    assert not report.ok
    culprit = report.culprit
    assert (culprit.path, culprit.leaf, culprit.method) == ((USER,), "dx", "vjp")
    assert culprit.kind == "gated_linear(→6)"
    with pytest.raises(
        verify.GradientCheckError, match=r"^serial layer 2 \(gated_linear\(→6\)\): leaf 'dx'"
    ):
        report.raise_if_failed()


# --------------------------------------------------------------------------- rules, written out


def _written_out(params, x, y, send):
    """The model's backward pass by hand, the error below each layer with weights from ``send``.

    ``send(layer, products, e)``: ``layer`` numbers the layers with weights (0
    the first dense, 1 the gated layer, 2 the top dense), ``products`` are the
    ``(δ, W, number)`` whose ``δ·Wᵀ`` backprop would sum (``number`` numbers
    the model's weights: the gated layer's ``w`` is 1, its ``w_gate`` 2), and
    ``e`` the output error.
    """
    p1, _, pg, p3 = params
    h = jnp.tanh(x @ p1["w"] + p1["b"][None, :])
    a = h @ pg["w"] + pg["b"][None, :]
    s = jax.nn.sigmoid(h @ pg["w_gate"] + pg["b_gate"][None, :])
    u = a * s
    logits = u @ p3["w"] + p3["b"][None, :]
    e = (jax.nn.softmax(logits) - jax.nn.one_hot(y, CLASSES)) / BATCH
    g3 = {"w": u.T @ e, "b": e.sum(0)}
    du = send(2, [(e, p3["w"], 3)], e)
    da, dg = du * s, du * a * s * (1 - s)
    gg = {"w": h.T @ da, "b": da.sum(0), "w_gate": h.T @ dg, "b_gate": dg.sum(0)}
    dz = send(1, [(da, pg["w"], 1), (dg, pg["w_gate"], 2)], e) * (1 - h * h)
    g1 = {"w": x.T @ dz, "b": dz.sum(0)}
    return (g1, {}, gg, g3)


KEY = jax.random.key(11)


def _through(feedback):
    """Backprop's products with each weight ``W`` (number ``n``) replaced by ``feedback(W, n)``."""

    def send(layer, products, e):
        return sum(delta @ feedback(w, number).T for delta, w, number in products)

    return send


def _dfa_send(layer, products, e):
    n_in = products[0][1].shape[0]
    b = rules.feedback_matrix(KEY, layer, (n_in, CLASSES), jnp.float32, fan=CLASSES)
    return e @ b.T


RULES = {
    "backprop": (rules.backprop(), _through(lambda w, n: w)),
    "feedback_alignment": (
        rules.feedback_alignment(KEY),
        _through(lambda w, n: rules.feedback_matrix(KEY, n, w.shape, w.dtype, fan=w.shape[0])),
    ),
    "sign_symmetric": (
        rules.sign_symmetric(),
        _through(lambda w, n: jnp.sign(w) * jnp.mean(jnp.abs(w))),
    ),
    "direct_feedback_alignment": (rules.direct_feedback_alignment(KEY), _dfa_send),
}


@pytest.fixture(scope="module")
def computed(problem):
    """What every tool computes on the model with the user's layer, and the references,
    all in ONE compiled program (one each would cost many times more to compile); each
    test below reads its part."""
    model, params, x, y = problem
    wrong = _model(_forgets_the_gate_path(gated_linear(6)))

    @jax.jit
    def run(params, x, y):
        out = {
            "value_and_grad": (
                fbp.value_and_grad(model, LOSS)(params, x, y),
                LOSS.value(model.apply(params, x), y),
            ),
            "jax.grad": _jax_grad(model, params, x, y),
            "true": fbp.grad(model, LOSS)(params, x, y),
            "rules": {
                name: (
                    fbp.grad(model, LOSS, rule=rule)(params, x, y),
                    _written_out(params, x, y, send),
                )
                for name, (rule, send) in RULES.items()
            },
        }
        rule, send = RULES["feedback_alignment"]
        _, updates, angles = diagnostics.value_grad_and_angles(model, LOSS, rule)(params, x, y)
        out["angles"] = (updates, angles, _written_out(params, x, y, send))

        # Per-example norms and clipping: the reference, the norms and the clipped gradient.
        per_example = _per_example_jax_grads(model, params, x, y)
        want = _norms(per_example)
        norms = diagnostics.per_example_grad_norms(model, LOSS)(params, x, y)
        bound = jnp.median(want)  # about half the examples are clipped (a traced bound)
        clipped = diagnostics.value_clipped_grad_and_norms(model, LOSS, l2_norm_clip=1.0)
        value, grads, clipped_norms = clipped(params, x, y, l2_norm_clip=bound)
        factor = jnp.minimum(1.0, bound / want)
        expected = jax.tree.map(lambda g: jnp.tensordot(factor, g, axes=1) / BATCH, per_example)
        out["per_example"] = (want, norms, grads, expected, clipped_norms, value)

        # Gradient flow, and the user's layer's output and incoming gradient.
        _, grads, flow = diagnostics.value_grad_and_flow(model, LOSS)(params, x, y)
        h = model.children[1].apply(params[1], model.children[0].apply(params[0], x))
        u = model.children[USER].apply(params[USER], h)
        du = jax.grad(lambda u: LOSS.value(model.children[3].apply(params[3], u), y))(u)
        out["flow"] = (grads, flow, u, du)

        # jax.grad through to_jax, of the model and of one with a wrong backward.
        out["to_jax"] = {
            name: (
                jax.grad(fbp.backprop.to_jax(m, LOSS))(params, x, y),
                fbp.grad(m, LOSS)(params, x, y),
                _jax_grad(m, params, x, y),
            )
            for name, m in (("right", model), ("wrong", wrong))
        }
        return out

    return jax.device_get(run(params, x, y))  # numpy: comparing them compiles nothing


@pytest.mark.parametrize("name", RULES)
def test_every_rule_changes_the_layers_dx_as_it_says(problem, computed, name):
    model, params, _, _ = problem
    layers = fbp.backprop.feedback_layers(model, params)
    assert [(f.site.path, f.weights) for f in layers] == [
        ((0,), ((("w",), 0),)),
        ((USER,), ((("w",), 1), (("w_gate",), 2))),  # undeclared: every float leaf with ≥ 2 axes
        ((3,), ((("w",), 3),)),
    ]
    (got, written), true = computed["rules"][name], computed["true"]
    _close(got, written)
    if name == "backprop":
        _close(got, true, 1e-6)
    else:  # the first layer learns from the error the user's layer sent: not backprop's
        assert not np.allclose(got[0]["w"], true[0]["w"], rtol=1e-2)
        _close(got[3], true[3])  # the top layer sees the true error


# --------------------------------------------------------------------------- diagnostics


def test_per_example_norms_and_clipping_follow_the_layers_own_rules(computed):
    want, norms, grads, expected, clipped_norms, value = computed["per_example"]
    _, value_ref = computed["value_and_grad"]
    np.testing.assert_allclose(norms, want, rtol=1e-5)
    _close(grads, expected)
    np.testing.assert_allclose(clipped_norms, want, rtol=1e-5)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)


def test_gradient_flow_reads_the_layer(problem, computed):
    model = problem[0]
    (grads, flow, u, du), true = computed["flow"], computed["jax.grad"]
    _close(grads, true)
    np.testing.assert_allclose(flow.activation_rms[USER], np.sqrt(np.mean(u * u)), rtol=1e-5)
    np.testing.assert_allclose(flow.delta_norm[USER], np.linalg.norm(du), rtol=1e-5)
    grad_norm = np.sqrt(sum(np.sum(g * g) for g in jax.tree.leaves(true[USER])))
    np.testing.assert_allclose(flow.grad_norm[USER], grad_norm, rtol=1e-5)
    assert np.isnan(flow.saturation[USER])  # not an elementwise activation
    assert diagnostics.layer_names(model)[USER] == "2 gated_linear(→6)"


def test_alignment_angles_include_the_layer(computed):
    updates, angles, written = computed["angles"]
    true = computed["jax.grad"]
    _close(updates, written)

    def angle(layer, keys):
        a = np.concatenate([np.ravel(updates[layer][k]) for k in keys]).astype(np.float64)
        b = np.concatenate([np.ravel(true[layer][k]) for k in keys]).astype(np.float64)
        return np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))

    assert angles.shape == (3,)  # dense, the user's layer, dense
    np.testing.assert_allclose(angles[1], angle(USER, ["w", "w_gate"]), atol=1e-2)
    np.testing.assert_allclose(angles[0], angle(0, ["w"]), atol=1e-2)
    assert angles[2] < 0.1  # the top layer sees the true error


# --------------------------------------------------------------------------- bridges and training


def test_jax_grad_through_to_jax_runs_the_layers_backward(computed):
    # It is the layer's own backward, not autodiff of its forward: a wrong one shows.
    out = computed["to_jax"]
    _close(out["right"][0], out["right"][1])
    got, hand, autodiff = out["wrong"]
    _close(got, hand)
    assert not np.allclose(got[0]["w"], autodiff[0]["w"], rtol=1e-3)


@pytest.mark.parametrize(
    # make_step compiles a step per rule: a rule's step is a sweep beyond backprop's
    # (the rule's own gradient through the layer is tested above, in the inner loop).
    "name",
    ["backprop", pytest.param("feedback_alignment", marks=pytest.mark.slow)],
)
def test_make_step_trains_the_layer(problem, name):
    model, params, x, y = problem
    rule, send = RULES[name]
    step = train.make_step(model, LOSS, optax.sgd(0.1), rule=None if name == "backprop" else rule)
    start = jax.device_put(jax.tree.map(np.array, params))  # make_step donates them
    new, _, value = step(start, optax.sgd(0.1).init(start), x, y)
    # The rule written out by hand, and the loss, in a small program of its own: the
    # ``computed`` fixture's would be compiled again when xdist runs this test in another
    # process than the tests that read it.
    written, value_ref = jax.device_get(  # numpy: the update below compiles nothing
        jax.jit(lambda p, x, y: (_written_out(p, x, y, send), LOSS.value(model.apply(p, x), y)))(
            params, x, y
        )
    )
    _close(new, jax.tree.map(lambda p, g: p - np.float32(0.1) * g, params, written))
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)


# --------------------------------------------------------------------------- a replaced backward


def test_a_dense_layer_with_a_replaced_backward_is_a_users_layer():
    """``_replace(backward=...)`` drops dense's declared fast rules: the per-example norms
    then come from the user's backward (here one that halves ``dW``) through the fallback."""
    dense = nn.dense(3)

    def halves_dw(params, cache, dy):
        dparams, dx = dense.backward(params, cache, dy)
        return {**dparams, "w": dparams["w"] / 2}, dx

    layer = dense._replace(backward=halves_dw)
    assert layer.extensions is None and dense.extensions.batch_l2 is not None
    model = nn.serial(layer)
    rng = np.random.default_rng(1)
    params = ({"w": np.float32(rng.standard_normal((N_IN, 3)) / 2), "b": np.zeros(3, np.float32)},)
    x = np.float32(rng.standard_normal((BATCH, N_IN)))
    y = np.arange(BATCH, dtype=np.int32) % 3

    @jax.jit  # the norms and their references in one compiled program
    def run(params, x, y):
        per_example = _per_example_jax_grads(model, params, x, y)
        halved = ({"w": per_example[0]["w"] / 2, "b": per_example[0]["b"]},)  # the user's dW
        norms = diagnostics.per_example_grad_norms(model, LOSS)(params, x, y)
        return norms, _norms(halved), _norms(per_example)

    norms, want, unhalved = run(params, x, y)
    np.testing.assert_allclose(norms, want, rtol=1e-5)
    assert not np.allclose(norms, unhalved, rtol=1e-3)
    # Its weight is still a weight: every float leaf with two or more axes.
    layers = fbp.backprop.feedback_layers(model, params)
    assert [(f.site.path, f.weights) for f in layers] == [((0,), ((("w",), 0),))]


# --------------------------------------------------------------------------- README


def test_readme_shows_this_layer():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert inspect.getsource(gated_linear) in readme
