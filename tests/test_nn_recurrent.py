"""Tests of fbp.nn.recurrent: rnn, gru, lstm, bidirectional and the time-pooling layers.

The references are independent of the hand-written backward: ``jax.vjp`` of
each layer's own forward, ``jax.grad`` of composed forwards, and plain
step-by-step ``jnp`` transcriptions of the documented equations (one step
function each, run over time by ``lax.scan``: compiled once, not per step).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from layer_helpers import (
    assert_model_matches_jax_grad,
    draw,
    init_shapes,
    numpy_params,
    sweep_against_vjp,
    trace_against_vjp,
)

from fbp import nn
from fbp.errors import ConfigError, DTypeError, ShapeError

# --------------------------------------------------------------------------- references


def _sigmoid(a):
    return 1 / (1 + jnp.exp(-a))


def _over_time(step, carry, x, reverse):
    """``step(carry, x_t) -> (carry, h_t)`` over the time axis (1) of ``x``, last to first
    if ``reverse``; the outputs in time order. ``lax.scan`` rather than a Python loop: the
    step is compiled once, not once per time step."""
    _, hs = lax.scan(step, carry, jnp.swapaxes(x, 0, 1), reverse=reverse)
    return jnp.swapaxes(hs, 0, 1)


def _reference_rnn(params, x, reverse):
    w_x, w_h, b = params["w_x"], params["w_h"], params["b"]

    def step(h, xt):
        h = jnp.tanh(xt @ w_x + h @ w_h + b[None, :])
        return h, h

    return _over_time(step, jnp.zeros((x.shape[0], w_h.shape[0]), x.dtype), x, reverse)


def _reference_gru(params, x, reverse):
    """torch.nn.GRU's equations, gates (r, z, n), each with its own slices."""
    n = params["w_h"].shape[0]
    w_x, w_h, b, b_hn = params["w_x"], params["w_h"], params["b"], params["b_hn"]
    w_ir, w_iz, w_in = w_x[:, :n], w_x[:, n : 2 * n], w_x[:, 2 * n :]
    w_hr, w_hz, w_hn = w_h[:, :n], w_h[:, n : 2 * n], w_h[:, 2 * n :]
    b_r, b_z, b_in = b[None, :n], b[None, n : 2 * n], b[None, 2 * n :]

    def step(h, xt):
        r = _sigmoid(xt @ w_ir + h @ w_hr + b_r)
        z = _sigmoid(xt @ w_iz + h @ w_hz + b_z)
        cand = jnp.tanh(xt @ w_in + b_in + r * (h @ w_hn + b_hn[None, :]))
        h = (1 - z) * cand + z * h
        return h, h

    return _over_time(step, jnp.zeros((x.shape[0], n), x.dtype), x, reverse)


def _reference_lstm(params, x, reverse):
    """torch.nn.LSTM's equations, gates (i, f, g, o)."""
    n = params["w_h"].shape[0]
    a_x = jnp.einsum("btf,fg->btg", x, params["w_x"])

    def step(state, a_xt):
        h, c = state
        a = a_xt + h @ params["w_h"] + params["b"][None, :]
        i, f = _sigmoid(a[:, :n]), _sigmoid(a[:, n : 2 * n])
        g, o = jnp.tanh(a[:, 2 * n : 3 * n]), _sigmoid(a[:, 3 * n :])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((x.shape[0], n), x.dtype)
    return _over_time(step, (zeros, zeros), a_x, reverse)


KINDS = {
    "rnn": (nn.rnn, _reference_rnn, 1),
    "gru": (nn.gru, _reference_gru, 3),
    "lstm": (nn.lstm, _reference_lstm, 4),
}

# kind, hidden, reverse, batch, time, n_in, seed: time 1 and hidden 1 included.
CASES = [
    ("rnn", 1, False, 1, 1, 1, 0),
    ("rnn", 5, True, 3, 7, 4, 1),
    ("rnn", 8, False, 2, 12, 3, 2),
    ("gru", 6, False, 2, 1, 1, 3),
    ("gru", 4, True, 3, 9, 5, 4),
    ("gru", 7, False, 1, 12, 2, 5),
    ("lstm", 1, True, 2, 3, 1, 6),
    ("lstm", 5, False, 3, 10, 4, 7),
    ("lstm", 3, True, 1, 1, 2, 8),
]


def _case_id(case):
    kind, hidden, reverse, batch, time, n_in, seed = case
    return f"{kind}-h{hidden}{'-rev' if reverse else ''}-b{batch}-t{time}-in{n_in}-s{seed}"


# --------------------------------------------------------------------------- backward


POOLING = {
    "last_step": (nn.last_step, lambda x: x[:, -1, :]),
    "mean_over_time": (nn.mean_over_time, lambda x: jnp.mean(x, axis=1)),
    "max_over_time": (nn.max_over_time, lambda x: jnp.max(x, axis=1)),
}


def _check(failures, name, check, *args, **kwargs):
    """Run an ``np.testing`` check; a failure becomes a line naming the case."""
    try:
        check(*args, **kwargs)
    except AssertionError as error:
        failures.append(f"{name}: {error}")


def _add_bidirectional_and_pooling(cases, references, d):
    bidirectional = nn.bidirectional(nn.lstm(3, dtype=d), nn.gru(2, reverse=True, dtype=d))
    cases["bidirectional"] = (bidirectional, (6, 2), 3, 11)
    references["bidirectional"] = lambda params, x: jnp.concatenate(
        [
            nn.lstm(3, dtype=d).apply(params[0], x),
            nn.gru(2, reverse=True, dtype=d).apply(params[1], x),
        ],
        axis=-1,
    )
    for pool_name, (factory, formula) in POOLING.items():
        for time, seed in [(1, 0), (7, 1)]:
            cases[f"{pool_name}-t{time}"] = (factory(), (time, 3), 4, seed)
            references[f"{pool_name}-t{time}"] = lambda params, x, formula=formula: formula(x)


# The inner loop's representatives: one case per kind (two reversed) against the
# equations, the bidirectional and the poolings, forward only, in one program.
# Their hand backward against jax.vjp is test_layer_contract's (rnn, gru, lstm,
# bidirectional and the poolings, in both precisions); the sweep below is slow.
# Four steps suffice for the recurrence.
FAST_CASES = [
    ("rnn", 3, True, 2, 4, 2, 1),
    ("gru", 3, True, 2, 4, 2, 4),
    ("lstm", 3, False, 2, 4, 2, 7),
]


def test_forward_matches_the_equations_float64(x64):
    d = jnp.dtype("float64")
    cases, references = {}, {}
    for case in FAST_CASES:
        kind, hidden, reverse, batch, time, n_in, seed = case
        factory, reference, _ = KINDS[kind]
        cases[_case_id(case)] = (
            factory(hidden, reverse=reverse, dtype=d),
            (time, n_in),
            batch,
            seed,
        )
        references[_case_id(case)] = functools.partial(
            lambda reference, reverse, params, x: reference(params, x, reverse), reference, reverse
        )
    _add_bidirectional_and_pooling(cases, references, d)
    drawn = {
        name: draw(layer, shape, batch, "float64", seed)[1:3]
        for name, (layer, shape, batch, seed) in cases.items()
    }

    @jax.jit
    def run(drawn):
        return {
            name: (cases[name][0].apply(params, x), references[name](params, x))
            for name, (params, x) in drawn.items()
        }

    failures = []
    for name, (y, reference) in run(drawn).items():
        if name in references and name.split("-")[0] in KINDS:
            _check(failures, name, np.testing.assert_allclose, y, reference, rtol=1e-12, atol=1e-12)
        else:
            _check(failures, name, np.testing.assert_array_equal, y, reference)
    assert len(drawn) == len(FAST_CASES) + 7
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("group", ["rnn", "gru", "lstm", "bidirectional-pooling"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_backward_matches_vjp_and_forward_matches_references(dtype, group):
    """rnn/gru/lstm (CASES), bidirectional and the time poolings, one program per group.

    In float64, against jax.vjp (layer_helpers.sweep_against_vjp) and against a
    reference forward traced into the same program: the step-by-step equations, the
    two directions applied alone, the pooling's jnp formula. In float32 the same cases
    are traced only (layer_helpers.trace_against_vjp: shapes and dtypes of y, dparams
    and dx, nothing compiled): the values are float64's here, and float32's values of
    every kind against jax.vjp are test_layer_contract's slow float32 sweep.
    """
    in_group = [case for case in CASES if case[0] == group]
    d = jnp.dtype(dtype)
    cases, references = {}, {}
    for case in in_group:
        kind, hidden, reverse, batch, time, n_in, seed = case
        factory, reference, _ = KINDS[kind]
        name = _case_id(case)
        cases[name] = (factory(hidden, reverse=reverse, dtype=d), (time, n_in), batch, seed)
        references[name] = functools.partial(
            lambda reference, reverse, params, x: reference(params, x, reverse),
            reference,
            reverse,
        )
    if group == "bidirectional-pooling":
        _add_bidirectional_and_pooling(cases, references, d)

    def extra(name, params, x, y):
        return references[name](params, x)

    if dtype == "float32":
        failures, params_of = trace_against_vjp(cases, d)
        results = None
    else:
        with jax.enable_x64(True):
            failures, results = sweep_against_vjp(cases, dtype, extra)
        params_of = {name: result[0] for name, result in results.items()}
    for case in in_group:
        kind, hidden, _, _, _, n_in, _ = case
        gates, name = KINDS[kind][2], _case_id(case)
        params = params_of[name]
        shapes = {key: params[key].shape for key in ("w_x", "w_h", "b")}
        expected = {
            "w_x": (n_in, gates * hidden),
            "w_h": (hidden, gates * hidden),
            "b": (gates * hidden,),
        }
        if shapes != expected:
            failures.append(f"{name}: params shapes {shapes}, expected {expected}")
        if results is not None:
            _, _, y, reference = results[name]
            _check(failures, name, np.testing.assert_allclose, y, reference, rtol=1e-12, atol=1e-12)
    if group != "bidirectional-pooling" or results is None:
        assert not failures, "\n".join(failures)
        return
    _, _, y, reference = results["bidirectional"]
    if y.shape != (3, 6, 5):
        failures.append(f"bidirectional: y shape {y.shape}")
    _check(failures, "bidirectional", np.testing.assert_array_equal, y, reference)
    for name in cases:
        if name.split("-")[0] in POOLING:
            _, _, y, reference = results[name]
            _check(failures, name, np.testing.assert_array_equal, y, reference)
    assert not failures, "\n".join(failures)


def test_bidirectional_flag_is_the_combinator_of_both_directions():
    layer = nn.gru(6, bidirectional=True)
    assert layer.name == "bidirectional(gru(→6), gru(→6, reverse))"
    assert [c.name for c in layer.children] == ["gru(→6)", "gru(→6, reverse)"]
    # The MNIST-1D paper's shape: 40 steps of one feature, 6 units each way.
    shape, params, x, _ = draw(layer, (40, 1), 2, "float32", 0)
    assert shape == (40, 12)
    combinator = nn.bidirectional(nn.gru(6), nn.gru(6, reverse=True))
    chex.assert_trees_all_equal_shapes_and_dtypes(init_shapes(combinator, (40, 1))[0], params)
    y, y_combinator = jax.jit(lambda p, x: (layer.apply(p, x), combinator.apply(p, x)))(params, x)
    np.testing.assert_array_equal(y, y_combinator)
    for factory in (nn.rnn, nn.lstm):
        assert init_shapes(factory(3, bidirectional=True), (5, 2))[1] == (5, 6)


def test_reverse_equals_running_on_the_flipped_sequence():
    """rnn, gru and lstm, in one program."""
    layers = {kind: (KINDS[kind][0](4), KINDS[kind][0](4, reverse=True)) for kind in sorted(KINDS)}
    drawn = {kind: draw(layer, (6, 3), 2, "float32", 0)[1:3] for kind, (layer, _) in layers.items()}

    @jax.jit
    def run(drawn):
        out = {}
        for kind, (params, x) in drawn.items():
            forward, reverse = layers[kind]
            y_flipped = jnp.flip(forward.apply(params, jnp.flip(x, axis=1)), axis=1)
            out[kind] = (reverse.apply(params, x), y_flipped)
        return out

    for kind, (y_reverse, y_flipped) in run(drawn).items():
        np.testing.assert_allclose(y_reverse, y_flipped, rtol=1e-6, atol=1e-6, err_msg=kind)


# --------------------------------------------------------------------------- time pooling


def test_max_over_time_splits_ties_like_jax():
    # Ties (e.g. after a ReLU) share dy equally, exactly as jax.grad of jnp.max.
    x = np.array([[[0.0, 1.0], [0.0, 3.0], [0.0, 3.0], [-1.0, 2.0]]], np.float32)
    layer = nn.max_over_time()
    dy = np.array([[3.0, 2.0]], np.float32)

    @jax.jit  # one program: the hand backward and jax's
    def run(x, dy):
        _, cache = layer.forward({}, x)
        _, dx = layer.backward({}, cache, dy)
        (dx_ref,) = jax.vjp(lambda x: jnp.max(x, axis=1), x)[1](dy)
        return cache, dx, dx_ref

    cache, dx, dx_ref = run(x, dy)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(dx[0, :, 0], [1.0, 1.0, 1.0, 0.0])
    assert cache.dtype == jnp.bool_


# --------------------------------------------------------------------------- jit, caches


def test_caches_hold_the_documented_residuals():
    x = np.ones((2, 5, 3), np.float32)
    cache_keys = {
        nn.rnn: {"x", "h"},
        nn.gru: {"x", "h", "r", "z", "n", "g_n"},
        nn.lstm: {"x", "h", "c", "tanh_c", "i", "f", "g", "o"},
    }
    layers = [factory(4) for factory in cache_keys]
    params = [draw(layer, (5, 3), 2, "float32", 0)[1] for layer in layers]
    caches = jax.jit(
        lambda params, x: [layer.forward(p, x)[1] for layer, p in zip(layers, params, strict=True)]
    )(params, x)
    for keys, cache in zip(cache_keys.values(), caches, strict=True):
        assert set(cache) == keys
        np.testing.assert_array_equal(cache["x"], x)
        for key in keys - {"x"}:
            assert cache[key].shape == (5, 2, 4)  # time-major, as the scans read them
    for factory in (nn.last_step, nn.mean_over_time):
        assert jax.eval_shape(factory().forward, {}, x)[1].size == 0


def test_default_init():
    layer = nn.gru(16)
    params, _ = layer.init(jax.random.key(0), (3, 64))
    for gate in range(3):
        block = params["w_h"][:, 16 * gate : 16 * (gate + 1)]
        np.testing.assert_allclose(block.T @ block, np.eye(16), atol=1e-5)  # orthogonal
    assert abs(float(np.std(params["w_x"])) * 8 - 1) < 0.15  # LeCun: variance 1/n_in
    np.testing.assert_array_equal(params["b"], 0.0)
    np.testing.assert_array_equal(params["b_hn"], 0.0)
    layer = nn.rnn(2, w_x_init=jax.nn.initializers.ones, w_h_init=jax.nn.initializers.zeros)
    params, _ = layer.init(jax.random.key(0), (3, 2))
    np.testing.assert_array_equal(params["w_x"], 1.0)
    np.testing.assert_array_equal(params["w_h"], 0.0)


def test_bfloat16_params_init_and_keep_their_dtype():
    # The default orthogonal init is drawn in float32 (CPU's QR has no bfloat16):
    # lowering the init for this machine proves it; its dtypes need only a trace.
    layer = nn.gru(4, dtype=jnp.bfloat16)
    jax.jit(lambda key: layer.init(key, (5, 3))[0]).lower(jax.random.key(0))
    assert all(
        leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(init_shapes(layer, (5, 3))[0])
    )

    @jax.jit  # one program: forward and backward
    def run(params, x):
        y, cache = layer.forward(params, x)
        return y, *layer.backward(params, cache, jnp.ones_like(y))

    params = numpy_params(layer, (5, 3))
    y, dparams, dx = run(params, np.ones((2, 5, 3), jnp.bfloat16))
    assert y.dtype == dx.dtype == jnp.bfloat16
    chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))


# --------------------------------------------------------------------------- composition


def _composed_case(model, input_shape, classes, seed):
    assert_model_matches_jax_grad(model, input_shape, classes, 5, seed)


@pytest.mark.parametrize(
    "model_name",
    [
        pytest.param("gru-last_step-dense", marks=pytest.mark.slow),
        "bigru-flatten-dense",  # the inner loop's representative: MNIST-1D's classifier
        pytest.param("lstm-rnn-mean-dense", marks=pytest.mark.slow),
        pytest.param("rnn-max-dense", marks=pytest.mark.slow),
    ],
)
def test_serial_composition_matches_jax_grad(model_name):
    models = {
        # The MNIST-1D paper's classifier: a bidirectional GRU read in full.
        "bigru-flatten-dense": nn.serial(nn.gru(6, bidirectional=True), nn.flatten(), nn.dense(4)),
        "gru-last_step-dense": nn.serial(nn.gru(5), nn.last_step(), nn.dense(3)),
        "lstm-rnn-mean-dense": nn.serial(
            nn.lstm(4), nn.rnn(3, reverse=True), nn.mean_over_time(), nn.dense(3)
        ),
        "rnn-max-dense": nn.serial(nn.rnn(6), nn.relu(), nn.max_over_time(), nn.dense(3)),
    }
    classes = 4 if model_name.startswith("bigru") else 3
    _composed_case(models[model_name], (9, 2), classes, seed=len(model_name))


# --------------------------------------------------------------------------- errors


def test_sequence_layers_reject_2d_input():
    layer = nn.gru(6)
    _, params, _, _ = draw(layer, (40, 40), 1, "float32", 0)
    message = (
        r"gru\(→6\): expected input of shape \(batch, time, 40\), got \(32, 40\); "
        r"a sequence layer needs 3-D input"
    )
    with pytest.raises(ShapeError, match=message):
        layer.forward(params, np.ones((32, 40), np.float32))
    for factory in (nn.last_step, nn.mean_over_time, nn.max_over_time):
        name = factory().name
        with pytest.raises(ShapeError, match=rf"{name}: expected input of shape \(batch, time, "):
            factory().forward({}, np.ones((32, 40), np.float32))


def test_errors_name_the_layer_the_expected_and_the_actual():
    layer = nn.lstm(3, reverse=True)
    _, params, _, _ = draw(layer, (5, 4), 1, "float32", 0)
    with pytest.raises(
        ShapeError, match=r"lstm\(→3, reverse\): expected input of shape \(batch, time, 4\), "
    ):
        jax.eval_shape(layer.forward, params, np.ones((2, 5, 7), np.float32))
    with pytest.raises(DTypeError, match=r"rnn\(→2\): expected a floating-point input, got int32"):
        jax.eval_shape(
            nn.rnn(2).forward, numpy_params(nn.rnn(2), (3, 1)), np.ones((1, 3, 1), np.int32)
        )
    with pytest.raises(ShapeError, match=r"gru\(→4\): expected input_shape \(time, features\)"):
        init_shapes(nn.gru(4), (40,))
    with pytest.raises(
        ShapeError,
        match=r"gru\(→4\): expected params \{'w_x': \(n_in, 12\), 'w_h': \(4, 12\), "
        r"'b': \(12,\), 'b_hn': \(4,\)\}, got .*from another model",
    ):
        jax.eval_shape(nn.gru(4).forward, params, np.ones((2, 5, 4), np.float32))
    with pytest.raises(ShapeError, match=r"serial layer 1 \(gru\(→4\)\): expected input of shape"):
        model = nn.serial(nn.dense(3), nn.gru(4))
        jax.eval_shape(model.forward, numpy_params(model, (5, 2)), np.ones((5, 2), np.float32))
    with pytest.raises(ShapeError, match=r"last_step: needs at least one time step"):
        nn.last_step().init(jax.random.key(0), (0, 3))
    with pytest.raises(ShapeError, match=r"max_over_time: needs at least one time step"):
        jax.eval_shape(nn.max_over_time().forward, {}, np.ones((2, 0, 3), np.float32))
    with pytest.raises(ShapeError, match=r"mean_over_time: takes no parameters"):
        jax.eval_shape(
            nn.mean_over_time().forward, {"w": np.ones(2, np.float32)}, np.ones((2, 1, 3))
        )


@pytest.mark.parametrize("hidden", [0, -3, 2.5, True, "6"])
@pytest.mark.parametrize("factory", [nn.rnn, nn.gru, nn.lstm])
def test_bad_hidden_is_a_config_error(factory, hidden):
    with pytest.raises(ConfigError, match=r"hidden must be a positive int, got"):
        factory(hidden)


def test_bad_bidirectional_configurations():
    with pytest.raises(ConfigError, match=r"gru: reverse=True and bidirectional=True together"):
        nn.gru(3, reverse=True, bidirectional=True)
    with pytest.raises(ConfigError, match=r"bidirectional: backward_layer is a function"):
        nn.bidirectional(nn.gru(3), nn.gru)
    layer = nn.bidirectional(nn.gru(3), nn.last_step())
    with pytest.raises(ShapeError, match=r"the two directions must agree on all but the last"):
        init_shapes(layer, (4, 2))  # traced: the check needs no drawn params
    with pytest.raises(ShapeError, match=r"expected params as a tuple of 2 entries"):
        nn.gru(3, bidirectional=True).forward({}, np.ones((1, 4, 2), np.float32))


# --------------------------------------------------------------------------- fbp.verify
