"""Tests of fbp.nn.conv: conv1d and conv2d, in both implementations.

References are independent of the hand-written backward: ``jax.vjp`` of the
layer's own forward, ``lax.conv_general_dilated`` for the forward itself, and
``jax.grad`` of composed forwards. Configurations (kernel, stride, dilation,
padding, sizes) are drawn from seeded RNGs: random, yet reproducible and few
enough to keep compilations cheap.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from layer_helpers import TOL, device_array, init_shapes, numpy_params, rel_err, shape_failures

import fbp
import fbp.nn.conv
from fbp import losses, nn
from fbp.errors import ConfigError, DTypeError, ShapeError


def _hand_and_reference(layer, params, x, dy):
    """The hand backward and jax.vjp of the same forward, in one compiled program."""
    y, cache = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)
    _, vjp = jax.vjp(lambda p, x: layer.forward(p, x)[0], params, x)
    dparams_ref, dx_ref = vjp(dy)
    return y, dparams, dx, dparams_ref, dx_ref


def _draw(layer, input_shape, batch, dtype, seed):
    """Params (shapes from the traced init, values from numpy), input and cotangent."""
    shapes, out_shape = init_shapes(layer, input_shape)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: device_array(rng.standard_normal(s.shape), dtype), shapes)
    x = device_array(rng.standard_normal((batch, *input_shape)), dtype)
    dy = device_array(rng.standard_normal((batch, *out_shape)), dtype)
    return params, x, dy, out_shape


def _random_config(seed, n):
    """A random (kernel, strides, dilation, padding, spatial) for an n-D convolution."""
    rng = np.random.default_rng(seed)
    size = tuple(int(v) for v in rng.integers(1, 5, n))
    strides = tuple(int(v) for v in rng.integers(1, 4, n))
    dilation = tuple(int(v) for v in rng.integers(1, 3, n))
    kind = ["SAME", "VALID", "explicit"][seed % 3]
    padding = (
        kind
        if kind != "explicit"
        else tuple((int(rng.integers(0, 4)), int(rng.integers(0, 4))) for _ in range(n))
    )
    spans = [d * (k - 1) + 1 for k, d in zip(size, dilation, strict=True)]
    spatial = tuple(int(rng.integers(s, s + 8)) for s in spans)
    return size, strides, dilation, padding, spatial


def _reference_forward(params, x, size, strides, dilation, padding):
    n = len(size)
    dims = ("NWC", "WIO", "NWC") if n == 1 else ("NHWC", "HWIO", "NHWC")
    y = lax.conv_general_dilated(
        x, params["w"], strides, padding, rhs_dilation=dilation, dimension_numbers=dims
    )
    return y + params["b"].reshape((1,) * (n + 1) + (-1,))


def _sweep(cases, dtype, n_in, features, batch=3, traced=False):
    """Every case's hand backward, jax.vjp and lax forward in ONE compiled program.

    Returns the failing checks, each named by its case: an empty list passes.
    ``traced``: the program is traced only (``jax.eval_shape``, nothing compiled) and
    the shapes and dtypes checked, not the values.
    """
    setups = {}
    for n, seed, implementation in cases:
        size, strides, dilation, padding, spatial = _random_config(seed, n)
        factory = nn.conv1d if n == 1 else nn.conv2d
        layer = factory(
            features,
            size,
            strides=strides,
            dilation=dilation,
            padding=padding,
            implementation=implementation,
        )
        params, x, dy, out_shape = _draw(layer, (*spatial, n_in), batch, dtype, seed)
        name = f"{n}d-seed{seed}-{implementation}"
        setups[name] = (layer, (size, strides, dilation, padding), out_shape, (params, x, dy))

    @jax.jit
    def run(data):
        results = {}
        for name, (layer, config, _, _) in setups.items():
            params, x, dy = data[name]
            y, dparams, dx, dparams_ref, dx_ref = _hand_and_reference(layer, params, x, dy)
            results[name] = (
                y,
                dparams,
                dx,
                dparams_ref,
                dx_ref,
                _reference_forward(params, x, *config),
            )
        return results

    data = {name: setup[3] for name, setup in setups.items()}
    results = jax.eval_shape(run, data) if traced else run(data)
    failures = []
    for name, (_, _, out_shape, (params, x, _)) in setups.items():
        y, dparams, dx, dparams_ref, dx_ref, y_lax = results[name]
        failures += shape_failures(name, (y, dparams, dx), (params, x), batch, out_shape, dtype)
        if traced:
            refs = jax.tree.map(lambda a: (a.shape, a.dtype), (dparams_ref, dx_ref, y_lax))
            if refs != jax.tree.map(lambda a: (a.shape, a.dtype), (dparams, dx, y)):
                failures.append(f"{name}: references' shapes/dtypes {refs}")
            continue
        for key in params:
            if not rel_err(dparams[key], dparams_ref[key]) < TOL[dtype]:
                failures.append(f"{name}: d{key} rel err {rel_err(dparams[key], dparams_ref[key])}")
        if not rel_err(dx, dx_ref) < TOL[dtype]:
            failures.append(f"{name}: dx rel err {rel_err(dx, dx_ref)}")
        if dtype == "float64" and not rel_err(y, y_lax) < 1e-12:
            failures.append(f"{name}: forward vs lax rel err {rel_err(y, y_lax)}")
    return failures


IMPLEMENTATIONS = ["patches", "xla"]
CASES = [(n, seed) for n in (1, 2) for seed in range(6)]
# The inner loop's float64 cases: explicit padding in 1-D, VALID with strides
# and dilation in 2-D (seed % 3 picks the padding), both implementations; the
# slow sweep runs the others. test_layer_contract holds four more to jax.vjp.
FAST_CASES = [(1, 2), (2, 1)]


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param(FAST_CASES, id="fast"),
        pytest.param(
            [c for c in CASES if c not in FAST_CASES], id="others", marks=pytest.mark.slow
        ),
    ],
)
def test_backward_matches_vjp_and_forward_matches_lax_float64(x64, pairs):
    cases = [(n, seed, impl) for n, seed in pairs for impl in IMPLEMENTATIONS]
    failures = _sweep(cases, "float64", n_in=2, features=3)
    assert not failures, "\n".join(failures)


def test_float32_keeps_shapes_and_dtypes():
    """Traced only (nothing compiled): the values are float64's above, and float32's
    against jax.vjp test_layer_contract's slow float32 sweep (four convolutions, both
    implementations)."""
    pairs = [(1, 0), (1, 4), (2, 1), (2, 5)]
    cases = [(n, seed, impl) for n, seed in pairs for impl in IMPLEMENTATIONS]
    failures = _sweep(cases, "float32", n_in=3, features=4, traced=True)
    assert not failures, "\n".join(failures)


def test_the_two_implementations_agree_and_no_bias(x64):
    kw = {"strides": 2, "padding": "SAME", "use_bias": False}
    patches, xla = nn.conv1d(5, 3, **kw), nn.conv1d(5, 3, implementation="xla", **kw)
    params, x, dy, _ = _draw(patches, (9, 2), 2, "float64", 0)
    assert set(params) == {"w"}

    @jax.jit
    def both(params, x, dy):
        (y1, c1), (y2, c2) = patches.forward(params, x), xla.forward(params, x)
        return y1, y2, patches.backward(params, c1, dy), xla.backward(params, c2, dy)

    y1, y2, grads1, grads2 = both(params, x, dy)
    np.testing.assert_allclose(y1, y2, rtol=1e-12)
    for a, b in zip(grads1, grads2, strict=True):
        chex.assert_trees_all_close(a, b, rtol=1e-12, atol=1e-12)


def test_output_shapes_follow_padding_rules():
    # init_shapes traces layer.init (its output shape is computed from the
    # configuration) without running its initializers.
    _, shape = init_shapes(nn.conv1d(25, 5, strides=2), (40, 1))
    assert shape == (20, 25)  # SAME: ⌈40/2⌉
    _, shape = init_shapes(nn.conv1d(25, 5, strides=2, padding="VALID"), (40, 1))
    assert shape == (18, 25)  # ⌊(40 − 5)/2⌋ + 1
    _, shape = init_shapes(nn.conv2d(4, (3, 5), dilation=2, padding=((1, 0), (2, 2))), (9, 9, 1))
    assert shape == (6, 5, 4)  # 9 + 1 − 5 + 1, 9 + 4 − 9 + 1


def test_default_init_is_lecun_normal_over_the_fan_in():
    params, _ = nn.conv1d(64, 5).init(jax.random.key(0), (100, 32))
    assert params["w"].shape == (5, 32, 64) and params["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.std(params["w"]), 1 / np.sqrt(5 * 32), rtol=0.05)
    np.testing.assert_array_equal(params["b"], 0.0)


def test_bfloat16_params_keep_their_dtype():
    """bfloat16 params with bfloat16 or float32 inputs, both implementations: one program."""
    combos = [
        (x_dtype, impl) for x_dtype in (jnp.bfloat16, jnp.float32) for impl in IMPLEMENTATIONS
    ]
    layers = [nn.conv1d(4, 3, dtype=jnp.bfloat16, implementation=impl) for _, impl in combos]
    xs = [np.ones((2, 8, 2), x_dtype) for x_dtype, _ in combos]
    # init's dtypes need only a trace; the values are numpy draws (no initializer compiled)
    for layer in layers:
        assert {a.dtype for a in jax.tree.leaves(init_shapes(layer, (8, 2))[0])} == {
            jnp.dtype(jnp.bfloat16)
        }
    drawn = [numpy_params(layer, (8, 2)) for layer in layers]

    @jax.jit
    def run(params, xs):
        out = []
        for layer, p, x in zip(layers, params, xs, strict=True):
            y, cache = layer.forward(p, x)
            out.append((p, y, *layer.backward(p, cache, jnp.ones_like(y))))
        return out

    for (x_dtype, impl), (params, y, dparams, dx) in zip(combos, run(drawn, xs), strict=True):
        assert y.dtype == dx.dtype == x_dtype, impl  # promoted as dense's x @ w
        chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)


# --------------------------------------------------------------------------- composition


def _composed_matches_jax_grad(model, input_shape, classes):
    with jax.enable_x64(True):
        params, x, _, out_shape = _draw(model, input_shape, 4, "float64", 0)
        assert out_shape == (classes,)
        labels = device_array(np.random.default_rng(1).integers(0, classes, 4), jnp.int32)
        loss = losses.softmax_cross_entropy

        @jax.jit
        def both(params, x, labels):
            hand = fbp.value_and_grad(model, loss)(params, x, labels)
            ref = jax.value_and_grad(lambda p: loss.value(model.apply(p, x), labels))(params)
            return hand, ref

        (value, grads), (ref_value, ref_grads) = both(params, x, labels)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            assert rel_err(a, b) < 1e-10


def test_cnn_1d_matches_jax_grad():
    model = nn.serial(
        nn.conv1d(6, 5, strides=2),
        nn.relu(),
        nn.residual(nn.serial(nn.conv1d(6, 3), nn.tanh())),
        nn.max_pool(2),
        nn.conv1d(4, 3, padding="VALID", dilation=2, implementation="xla"),
        nn.avg_pool(2, strides=1, padding="SAME"),
        nn.flatten(),
        nn.dense(3),
    )
    _composed_matches_jax_grad(model, (24, 2), 3)


@pytest.mark.slow  # the 1-D network is the inner loop's representative
def test_cnn_2d_matches_jax_grad():
    model = nn.serial(
        nn.conv2d(4, 3, padding=1),
        nn.relu(),
        nn.max_pool((2, 2)),
        nn.conv2d(5, (2, 3), strides=(1, 2)),
        nn.avg_pool((2, 2), padding="SAME"),
        nn.flatten(),
        nn.dense(3),
    )
    _composed_matches_jax_grad(model, (8, 9, 2), 3)


# --------------------------------------------------------------------------- check_layer


# --------------------------------------------------------------------------- errors


def _zeros(layer, input_shape):
    """Zero params of the right shapes: layer.init traced only (its initializers would compile)."""
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init_shapes(layer, input_shape)[0])


def test_input_errors_name_the_layer_the_expected_and_the_actual():
    # Raised while tracing: the forwards are traced (jax.eval_shape), nothing is compiled.
    layer = nn.conv1d(25, 5)
    params = _zeros(layer, (40, 8))
    with pytest.raises(
        ShapeError,
        match=r"conv1d 8→25 \(k=5\): expected input of shape \(batch, length, 8\), "
        r"got \(32, 40\); is the batch axis missing\?",
    ):
        jax.eval_shape(layer.forward, params, np.ones((32, 40), np.float32))
    with pytest.raises(
        ShapeError, match=r"conv1d 8→25 \(k=5\): expected input of shape \(batch, length, 8\), got"
    ):
        jax.eval_shape(layer.forward, params, np.ones((32, 40, 3), np.float32))
    with pytest.raises(DTypeError, match=r"conv1d 8→25 \(k=5\): expected a floating-point input"):
        jax.eval_shape(layer.forward, params, np.ones((32, 40, 8), np.int32))
    layer2 = nn.conv2d(4, 3)
    params2 = _zeros(layer2, (6, 6, 3))
    with pytest.raises(
        ShapeError, match=r"conv2d 3→4 \(k=3×3\): expected input of shape \(batch, height, width, 3"
    ):
        jax.eval_shape(layer2.forward, params2, np.ones((2, 6, 3), np.float32))
    model = nn.serial(nn.conv1d(25, 5), nn.conv1d(4, 3))
    p = _zeros(model, (10, 1))
    wrong = _zeros(nn.conv1d(4, 3), (10, 8))
    with pytest.raises(
        ShapeError,
        match=r"serial layer 1 \(conv1d 8→4 \(k=3\)\): expected input of shape "
        r"\(batch, length, 8\), got \(2, 10, 25\)",
    ):
        jax.eval_shape(model.forward, (p[0], wrong), np.ones((2, 10, 1), np.float32))


def test_params_errors():
    layer = nn.conv1d(4, 3)
    with pytest.raises(ShapeError, match=r"conv1d\(→4, k=3\): expected params \{'w'"):
        layer.forward({"w": np.ones((3, 2, 4), np.float32)}, np.ones((1, 5, 2), np.float32))
    with pytest.raises(ShapeError, match=r"expected kernel 'w' of shape \(3, n_in, 4\), got"):
        layer.forward(
            {"w": np.ones((5, 2, 4), np.float32), "b": np.ones(4, np.float32)},
            np.ones((1, 5, 2), np.float32),
        )


def test_kernel_larger_than_the_padded_input():
    with pytest.raises(
        ShapeError,
        match=r"conv1d\(→4, k=5\): the kernel of size 5 spans 9 positions \(dilation 2\), "
        r"larger than the padded input's 6 \(size 6, padding \(0, 0\)\)",
    ):
        init_shapes(nn.conv1d(4, 5, dilation=2, padding="VALID"), (6, 1))
    layer = nn.conv2d(4, (3, 3), padding="VALID")
    params = _zeros(layer, (5, 5, 1))
    with pytest.raises(
        ShapeError,
        match=r"conv2d 1→4 \(k=3×3\): the kernel \(3, 3\) spans 3 "
        r"positions along width",
    ):
        layer.forward(params, np.ones((1, 5, 2, 1), np.float32))
    with pytest.raises(ShapeError, match=r"conv1d\(→4, k=3\): expected input_shape \(length, "):
        init_shapes(nn.conv1d(4, 3), (6,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"features": 0, "kernel_size": 3}, r"conv1d: features must be a positive int, got 0"),
        ({"features": 2, "kernel_size": 0}, r"kernel_size must be a positive int or 1 positive"),
        ({"features": 2, "kernel_size": 3, "strides": 0}, r"strides must be a positive int"),
        ({"features": 2, "kernel_size": 3, "dilation": -1}, r"dilation must be a positive int"),
        ({"features": 2, "kernel_size": 3, "padding": "FULL"}, r"padding must be 'SAME', 'VALID'"),
        ({"features": 2, "kernel_size": 3, "padding": -1}, r"padding must be non-negative"),
        ({"features": 2, "kernel_size": 3, "padding": (1, 2, 3)}, r"\[\(low, high\)\] pairs"),
        (
            {"features": 2, "kernel_size": 3, "implementation": "fft"},
            r"implementation must be 'patches' or 'xla', got 'fft'",
        ),
    ],
)
def test_bad_configurations(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        nn.conv1d(**kwargs)


def test_conv2d_bad_configurations():
    with pytest.raises(ConfigError, match=r"conv2d: kernel_size must be a positive int or 2"):
        nn.conv2d(2, (3, 3, 3))
    with pytest.raises(ConfigError, match=r"conv2d: padding must be .*\(low, high\), \(low"):
        nn.conv2d(2, 3, padding=(1, 1))
