"""Tests of fbp.nn.self_attention.

The references are independent of the hand-written backward: ``jax.vjp`` of
the layer's own forward, ``jax.nn.dot_product_attention`` for the forward, and
``jax.grad`` of composed forwards.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import (
    assert_model_matches_jax_grad,
    draw,
    init_shapes,
    sweep_against_vjp,
    trace_against_vjp,
)

from fbp import nn
from fbp.errors import ConfigError, DTypeError, ShapeError


def _projections(params, x, heads):
    batch, time, _ = x.shape
    features = params["w_o"].shape[0]
    qkv = x @ params["w_qkv"] + params["b_qkv"][None, None, :]
    return [
        qkv[..., i * features : (i + 1) * features].reshape(batch, time, heads, -1)
        for i in range(3)
    ]


def _reference_attention(params, x, heads, causal):
    """The documented equations, one head at a time, softmax written out."""
    q, k, v = _projections(params, x, heads)
    time, width = x.shape[1], q.shape[-1]
    outputs = []
    for h in range(heads):
        s = q[:, :, h] @ k[:, :, h].transpose(0, 2, 1) / np.sqrt(width)
        if causal:
            s = jnp.where(np.tril(np.ones((time, time), bool))[None], s, -np.inf)
        e = jnp.exp(s - s.max(axis=-1, keepdims=True))
        outputs.append((e / e.sum(axis=-1, keepdims=True)) @ v[:, :, h])
    return jnp.concatenate(outputs, axis=-1) @ params["w_o"] + params["b_o"][None, None, :]


def _jax_attention(params, x, heads, causal):
    """The same layer through jax.nn.dot_product_attention (its softmax runs in float32)."""
    q, k, v = _projections(params, x, heads)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    return o.reshape(*x.shape[:2], -1) @ params["w_o"] + params["b_o"][None, None, :]


# heads, features, n_in, batch, time, causal, seed: time 1 and one head included.
CASES = [
    (1, 4, 4, 2, 1, False, 0),
    (2, 6, 3, 3, 5, True, 1),
    (3, 9, 9, 2, 7, False, 2),
    (4, 8, 5, 1, 6, True, 3),
    (1, 3, 2, 2, 4, True, 4),
]


def _case_id(case):
    heads, features, n_in, batch, time, causal, seed = case
    causal = "-causal" if causal else ""
    return f"h{heads}-f{features}-in{n_in}-b{batch}-t{time}{causal}-s{seed}"


# The inner loop's cases: one head at time 1, four causal heads; the slow sweep
# runs the others. test_layer_contract holds three more to jax.vjp.
FAST_CASES = [CASES[0], CASES[3]]


# float64 proves the math in the inner loop; float32 (against jax.nn's attention)
# is a slow sweep, its dtypes traced fast by test_layer_contract.
@pytest.mark.parametrize(
    ("dtype", "cases"),
    [
        pytest.param("float64", FAST_CASES, id="float64-fast"),
        pytest.param("float32", FAST_CASES, id="float32-fast", marks=pytest.mark.slow),
        *(
            pytest.param(
                dtype,
                [c for c in CASES if c not in FAST_CASES],
                id=f"{dtype}-others",
                marks=pytest.mark.slow,
            )
            for dtype in ("float64", "float32")
        ),
    ],
)
def test_backward_matches_vjp_and_forward_matches_jax(dtype, cases):
    """The cases in one compiled program per dtype, with their reference forward: in
    float64 the backward against jax.vjp and the equations written out (to 1e-12); in
    float32 the forward against jax.nn.dot_product_attention, the backward traced only
    (shapes and dtypes: its values are float64's here, and float32's against jax.vjp
    test_layer_contract's slow float32 sweep, three attention cases)."""
    with jax.enable_x64(dtype == "float64"):
        by_id = {_case_id(case): case for case in cases}
        cases = {
            name: (
                nn.self_attention(heads, features, causal=causal, dtype=jnp.dtype(dtype)),
                (time, n_in),
                batch,
                seed,
            )
            for name, (heads, features, n_in, batch, time, causal, seed) in by_id.items()
        }

        def extra(name, params, x, y):
            heads, _, _, _, _, causal, _ = by_id[name]
            return _reference_attention(params, x, heads, causal)

        if dtype == "float64":
            failures, results = sweep_against_vjp(cases, dtype, extra)
        else:
            failures, _ = trace_against_vjp(cases, jnp.dtype(dtype))
            drawn = {
                name: draw(layer, shape, batch, dtype, seed)[1:3]
                for name, (layer, shape, batch, seed) in cases.items()
            }

            @jax.jit  # one program: every case's forward and jax.nn's
            def forwards(drawn):
                out = {}
                for name, (params, x) in drawn.items():
                    heads, _, _, _, _, causal, _ = by_id[name]
                    y = cases[name][0].apply(params, x)
                    out[name] = (y, _jax_attention(params, x, heads, causal))
                return out

            results = {name: (None, None, *ys) for name, ys in forwards(drawn).items()}
    assert not failures, "\n".join(failures)
    for name, (_, _, y, y_reference) in results.items():
        features, time = by_id[name][1], by_id[name][4]
        assert y.shape[1:] == (time, features), name
        if dtype == "float64":
            np.testing.assert_allclose(y, y_reference, rtol=1e-12, atol=1e-12, err_msg=name)
        else:
            assert y.dtype == jnp.float32, name
            np.testing.assert_allclose(y, y_reference, rtol=2e-5, atol=2e-6, err_msg=name)


def test_causal_attention_never_looks_ahead():
    layer = nn.self_attention(2, 4, causal=True)
    _, params, x, dy = draw(layer, (6, 4), 2, "float32", 0)

    @jax.jit  # one program for every step below
    def run(params, x, dy):
        y, cache = layer.forward(params, x)
        y_changed = layer.apply(params, x.at[:, 3:].add(1.0))
        _, dx = layer.backward(params, cache, jnp.zeros_like(dy).at[:, 2].set(dy[:, 2]))
        return y, y_changed, dx, cache["p"]

    y, y_changed, dx, p = run(params, x, dy)
    # The output at t depends on x[:, :t+1] only ...
    np.testing.assert_array_equal(y[:, :3], y_changed[:, :3])
    # ... so a gradient arriving at t = 2 reaches no later input.
    np.testing.assert_array_equal(dx[:, 3:], 0.0)
    assert np.all(np.abs(dx[:, :3]) > 0)
    # Masked scores have probability exactly zero.
    np.testing.assert_array_equal(np.triu(p, k=1), 0.0)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


def test_default_init_and_params():
    layer = nn.self_attention(4, 32)
    params, shape = layer.init(jax.random.key(0), (10, 16))
    assert shape == (10, 32)
    params = jax.tree.map(np.asarray, params)  # numpy: slicing below compiles nothing
    assert {k: v.shape for k, v in params.items()} == {
        "w_qkv": (16, 96),
        "b_qkv": (96,),
        "w_o": (32, 32),
        "b_o": (32,),
    }
    np.testing.assert_array_equal(params["b_qkv"], 0.0)
    np.testing.assert_array_equal(params["b_o"], 0.0)
    # Query, key and value blocks are drawn independently.
    assert not np.allclose(params["w_qkv"][:, :32], params["w_qkv"][:, 32:64])
    assert layer.name == "self_attention(heads=4, features=32)"


@pytest.mark.parametrize(
    "model_name",
    [
        "residual-attention",
        pytest.param("dense-causal-attention-last", marks=pytest.mark.slow),
    ],
)
def test_serial_composition_matches_jax_grad(model_name):
    models = {
        "residual-attention": nn.serial(
            nn.residual(nn.self_attention(2, 4)), nn.mean_over_time(), nn.dense(3)
        ),
        "dense-causal-attention-last": nn.serial(
            nn.dense(6),
            nn.residual(nn.serial(nn.self_attention(3, 6, causal=True), nn.gelu())),
            nn.last_step(),
            nn.dense(3),
        ),
    }
    assert_model_matches_jax_grad(models[model_name], (5, 4), 3, 4, len(model_name))


# --------------------------------------------------------------------------- errors


def test_heads_must_divide_features():
    with pytest.raises(
        ConfigError,
        match=r"self_attention\(heads=3, features=8\): heads must divide features, "
        r"but 8 is not a multiple of 3; try heads=2",
    ):
        nn.self_attention(3, 8)
    with pytest.raises(ConfigError, match=r"try heads=4"):
        nn.self_attention(5, 12)


@pytest.mark.parametrize(
    ("heads", "features", "what"), [(0, 8, "heads"), (2, -4, "features"), (2.0, 8, "heads")]
)
def test_bad_sizes_are_config_errors(heads, features, what):
    with pytest.raises(ConfigError, match=rf"self_attention: {what} must be a positive int"):
        nn.self_attention(heads, features)


def test_input_errors_name_the_layer_the_expected_and_the_actual():
    layer = nn.self_attention(2, 8, causal=True)
    _, params, _, _ = draw(layer, (5, 8), 1, "float32", 0)
    name = r"self_attention\(heads=2, features=8, causal\)"
    with pytest.raises(
        ShapeError,
        match=rf"{name}: expected input of shape \(batch, time, 8\), got \(4, 8\); "
        r"a sequence layer needs 3-D input",
    ):
        layer.forward(params, np.ones((4, 8), np.float32))
    with pytest.raises(ShapeError, match=rf"{name}: expected input of shape \(batch, time, 8\), "):
        layer.forward(params, np.ones((4, 5, 7), np.float32))
    with pytest.raises(DTypeError, match=rf"{name}: expected a floating-point input, got int32"):
        layer.forward(params, np.ones((4, 5, 8), np.int32))
    with pytest.raises(ShapeError, match=rf"{name}: expected input_shape \(time, features\)"):
        init_shapes(layer, (8,))
    other = nn.self_attention(4, 16)
    with pytest.raises(
        ShapeError,
        match=r"self_attention\(heads=4, features=16\): expected params \{'w_qkv': \(n_in, 48\), "
        r".*from another model",
    ):
        other.forward(params, np.ones((4, 5, 8), np.float32))
