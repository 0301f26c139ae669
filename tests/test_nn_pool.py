"""Tests of fbp.nn.pool: max_pool and avg_pool, 1-D and 2-D.

References: ``jax.vjp`` of the layer's own forward, and ``lax.reduce_window``
(forward and its ``jax.vjp``) as an implementation that shares no code with
fbp's im2col.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from layer_helpers import TOL, device_array, init_shapes, rel_err

from fbp import nn
from fbp.errors import ConfigError, DTypeError, ShapeError


def _window_args(window, strides, padding, n):
    """``lax.reduce_window``'s arguments for an fbp pool on ``(batch, *spatial, c)``."""
    size = (window,) * n if isinstance(window, int) else tuple(window)
    strides = size if strides is None else (strides,) * n if isinstance(strides, int) else strides
    if isinstance(padding, int):
        padding = ((padding, padding),) * n
    elif not isinstance(padding, str) and n == 1 and isinstance(padding[0], int):
        padding = (tuple(padding),)
    if not isinstance(padding, str):
        padding = ((0, 0), *padding, (0, 0))
    return (1, *size, 1), (1, *strides, 1), padding, size


def _reference(kind, x, window, strides, padding):
    dims, step, pad, size = _window_args(window, strides, padding, x.ndim - 2)
    if kind == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, dims, step, pad)
    return lax.reduce_window(x, 0.0, lax.add, dims, step, pad) / np.prod(size)


CASES = [
    # window, strides, padding, input shape (no batch)
    (2, None, "VALID", (9, 3)),
    (3, 2, "SAME", (10, 2)),
    (3, 1, (1, 2), (7, 2)),
    ((2, 2), None, "VALID", (6, 7, 2)),
    ((3, 2), (2, 1), "SAME", (7, 5, 3)),
    ((3, 3), 1, ((1, 1), (2, 0)), (5, 5, 1)),
]
FACTORIES = {"max": nn.max_pool, "avg": nn.avg_pool}


def _hand_and_references(kind, layer, window, strides, padding, x, dy):
    y, cache = layer.forward({}, x)
    _, dx = layer.backward({}, cache, dy)
    _, vjp = jax.vjp(lambda x: layer.forward({}, x)[0], x)
    y_lax, vjp_lax = jax.vjp(lambda x: _reference(kind, x, window, strides, padding), x)
    return y, dx, vjp(dy)[0], y_lax, vjp_lax(dy)[0]


def _case_id(kind, window, strides, padding, shape):
    return f"{kind}-w{window}-s{strides}-p{padding}-in{shape}"


# The inner loop's cases, max and avg each: 1-D with explicit uneven padding and
# overlapping windows, 2-D SAME with uneven strides; the slow sweep runs the others.
# In float32 every case is traced only, in the inner loop (shapes and dtypes, nothing
# compiled): the values are float64's here, and test_layer_contract's slow float32
# sweep holds four pools (max and avg, 1-D and 2-D) to jax.vjp in float32.
FAST_CASES = [CASES[2], CASES[4]]


def test_fast_and_slow_cases_cover_every_case():
    assert sorted(map(str, FAST_CASES + [c for c in CASES if c not in FAST_CASES])) == sorted(
        map(str, CASES)
    )


def _setups(dtype, cases):
    """``{case id: (its function of x and dy, out_shape, x, dy)}`` for max and avg."""
    setups = {}
    for kind in FACTORIES:
        for window, strides, padding, shape in cases:
            layer = FACTORIES[kind](window, strides=strides, padding=padding)
            _, out_shape = init_shapes(layer, shape)
            rng = np.random.default_rng(len(shape) + sum(shape))
            x = device_array(rng.standard_normal((2, *shape)), dtype)  # continuous: no ties
            dy = device_array(rng.standard_normal((2, *out_shape)), dtype)
            run = functools.partial(_hand_and_references, kind, layer, window, strides, padding)
            setups[_case_id(kind, window, strides, padding, shape)] = (run, out_shape, x, dy)
    return setups


def _shape_failures(name, out_shape, x, y, dx):
    failures = []
    if not (y.shape == (2, *out_shape) and y.dtype == dx.dtype == x.dtype):
        failures.append(f"{name}: y {y.shape} {y.dtype}, dx {dx.dtype}")
    if dx.shape != x.shape:
        failures.append(f"{name}: dx shape {dx.shape}")
    return failures


@pytest.mark.parametrize(
    ("dtype", "cases"),
    [
        pytest.param("float64", FAST_CASES, id="float64"),
        pytest.param(
            "float64",
            [c for c in CASES if c not in FAST_CASES],
            id="float64-others",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_backward_matches_vjp_and_reduce_window(dtype, cases):
    """Every (kind, case) in ONE compiled program; failures listed by case."""
    with jax.enable_x64(dtype == "float64"):
        setups = _setups(dtype, cases)

        @jax.jit
        def run_all(data):
            return {name: setups[name][0](x, dy) for name, (x, dy) in data.items()}

        results = run_all({name: (x, dy) for name, (_, _, x, dy) in setups.items()})
        failures = []
        for name, (_, out_shape, x, _) in setups.items():
            y, dx, dx_vjp, y_lax, dx_lax = results[name]
            failures += _shape_failures(name, out_shape, x, y, dx)
            for what, a, b in [
                ("y vs lax", y, y_lax),
                ("dx vs vjp", dx, dx_vjp),
                ("dx vs lax", dx, dx_lax),
            ]:
                if not rel_err(a, b) < TOL[dtype]:
                    failures.append(f"{name}: {what} rel err {rel_err(a, b)}")
        assert not failures, "\n".join(failures)


def test_float32_keeps_shapes_and_dtypes():
    """Every (kind, case) in float32, traced with ``jax.eval_shape`` (nothing compiled):
    y, dx and the references' shapes and dtypes."""
    setups = _setups("float32", CASES)
    failures = []
    for name, (run, out_shape, x, dy) in setups.items():
        y, dx, *refs = jax.eval_shape(run, x, dy)
        failures += _shape_failures(name, out_shape, x, y, dx)
        if [(r.shape, r.dtype) for r in refs] != [(a.shape, a.dtype) for a in (dx, y, dx)]:
            failures.append(f"{name}: references {refs}")
    assert not failures, "\n".join(failures)


def test_max_pool_tie_rule_first_maximum_gets_all():
    pool = nn.max_pool(3, strides=1)
    x = np.array([2.0, 5.0, 5.0, 1.0, 5.0], np.float32).reshape(1, 5, 1)
    g = np.array([1.0, 10.0, 100.0], np.float32).reshape(1, 3, 1)
    ones = np.ones((1, 3, 1), np.float32)

    @jax.jit  # one compiled program for every step below
    def run(x, g, ones):
        y, cache = pool.forward({}, x)
        _, dx = pool.backward({}, cache, g)
        _, vjp = jax.vjp(lambda x: pool.forward({}, x)[0], x)
        _, vjp_lax = jax.vjp(lambda x: _reference("max", x, 3, 1, "VALID"), x)
        split = jax.grad(lambda w: jnp.max(w))(x[0, 1:4, 0])
        return y, dx, vjp(g)[0], vjp_lax(ones)[0], pool.backward({}, cache, ones)[1], split

    y, dx, dx_vjp, dx_lax_ones, dx_ones, split = run(x, g, ones)
    np.testing.assert_array_equal(y[0, :, 0], [5.0, 5.0, 5.0])
    # windows [2,5,5], [5,5,1], [5,1,5]: the first 5 of each gets everything.
    np.testing.assert_array_equal(dx[0, :, 0], [0.0, 11.0, 100.0, 0.0, 0.0])
    # jax.vjp of fbp's forward follows the same rule, even on ties ...
    np.testing.assert_array_equal(dx_vjp, dx)
    # lax.reduce_window's max (select-and-scatter) also routes to the first maximum ...
    np.testing.assert_array_equal(dx_lax_ones, dx_ones)
    # ... while jnp.max over a window splits a tie equally: only ties differ.
    np.testing.assert_array_equal(split, [0.5, 0.5, 0.0])


def test_max_pool_2d_ties_in_row_major_order():
    pool = nn.max_pool((2, 2))

    @jax.jit
    def run(x):
        y, cache = pool.forward({}, x)
        return pool.backward({}, cache, jnp.full_like(y, 3.0))[1]

    dx = run(np.ones((1, 2, 2, 1), np.float32))
    np.testing.assert_array_equal(dx[0, :, :, 0], [[3.0, 0.0], [0.0, 0.0]])


def test_max_pool_caches_a_small_index():
    pool = nn.max_pool((2, 2))
    _, (index, carrier) = jax.jit(lambda x: pool.forward({}, x))(np.zeros((2, 4, 4, 3), np.float32))
    assert index.dtype == jnp.int8 and index.shape == (2, 2, 2, 3)
    assert carrier.size == 0 and carrier.shape[1:] == (4, 4, 3)


# --------------------------------------------------------------------------- errors


def test_input_errors():
    with pytest.raises(
        ShapeError,
        match=r"max_pool\(2\): expected input of shape \(batch, length, channels\), got \(32, 40\)",
    ):
        nn.max_pool(2).forward({}, np.ones((32, 40), np.float32))
    with pytest.raises(
        ShapeError, match=r"avg_pool\(2×2\): expected input of shape \(batch, height, width, chan"
    ):
        nn.avg_pool((2, 2)).forward({}, np.ones((3, 4, 4), np.float32))
    with pytest.raises(DTypeError, match=r"max_pool\(2\): expected a floating-point input"):
        nn.max_pool(2).forward({}, np.ones((3, 4, 1), np.int32))
    with pytest.raises(ShapeError, match=r"max_pool\(2\): takes no parameters"):
        nn.max_pool(2).forward({"w": np.ones(2, np.float32)}, np.ones((3, 4, 1), np.float32))
    with pytest.raises(ShapeError, match=r"max_pool\(5\): the kernel of size 5 spans 5 positions"):
        init_shapes(nn.max_pool(5), (4, 1))
    with pytest.raises(ShapeError, match=r"avg_pool\(2×2\): expected input_shape \(height, width"):
        init_shapes(nn.avg_pool((2, 2)), (4, 1))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0,), {}, r"max_pool: window must be a positive int or 1 positive ints, got 0"),
        (((2, 2, 2),), {}, r"max_pool: window must be an int \(1-D\), a 1-tuple or a pair"),
        ((2,), {"strides": 0}, r"max_pool: strides must be a positive int"),
        ((2,), {"padding": 2}, r"max_pool: padding \(\(2, 2\),\) must be smaller than the window"),
        ((2,), {"padding": "full"}, r"max_pool: padding must be 'SAME', 'VALID' or explicit"),
    ],
)
def test_bad_configurations(args, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        nn.max_pool(*args, **kwargs)
    with pytest.raises(ConfigError, match=message.replace("max_pool", "avg_pool")):
        nn.avg_pool(*args, **kwargs)
