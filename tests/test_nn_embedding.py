"""Tests of fbp.nn.embedding: lookup, scatter-add gradient, float0 dx, id checks.

References: ``jax.vjp`` of the layer's own forward, numpy indexing and
``np.add.at`` for the lookup and its gradient, ``jax.grad`` of composed
forwards, and :func:`fbp.backprop.to_jax` (``jax.custom_vjp`` must accept the
float0 cotangent for integer ids).

``fbp.verify.check_layer`` is given integer ids through ``inputs=``: it
checks the table's gradient (``jax.vjp`` and finite differences) and that
``dx`` is the float0 cotangent, and it catches wrong rules.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import TOL, device_array, init_shapes, numpy_params

import fbp
from fbp import losses, nn
from fbp.errors import ConfigError, DTypeError, RangeError, ShapeError

SCATTER_CASES = [(7, (5,)), (3, (4, 6)), (50, (2, 3, 4))]  # (vocab, ids shape)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_backward_is_the_scatter_add_and_matches_vjp(dtype):
    """Every (vocab, ids shape) case in one compiled program per dtype."""
    with jax.enable_x64(dtype == "float64"):
        layers, inputs = [], []
        for vocab, ids_shape in SCATTER_CASES:
            layer = nn.embedding(vocab, 4, dtype=dtype)
            params, out_shape = init_shapes(layer, ids_shape[1:])
            assert out_shape == (*ids_shape[1:], 4)
            rng = np.random.default_rng(vocab)
            table = device_array(rng.standard_normal(params["embedding"].shape), dtype)
            ids = device_array(rng.integers(0, vocab, ids_shape), jnp.int32)  # with repeats
            dy = device_array(rng.standard_normal((*ids_shape, 4)), dtype)
            layers.append(layer)
            inputs.append(({"embedding": table}, ids, dy))

        @jax.jit
        def run(inputs):
            out = []
            for layer, (params, ids, dy) in zip(layers, inputs, strict=True):
                y, cache = layer.forward(params, ids)
                _, vjp = jax.vjp(lambda p, i, layer=layer: layer.forward(p, i)[0], params, ids)
                out.append((y, layer.backward(params, cache, dy), vjp(dy)))
            return out

        for (vocab, ids_shape), (params, ids, dy), result in zip(
            SCATTER_CASES, inputs, run(inputs), strict=True
        ):
            y, (dparams, dx), (dparams_ref, dx_ref) = result
            assert y.shape == (*ids_shape, 4) and y.dtype == dtype, vocab
            table = np.asarray(params["embedding"])
            np.testing.assert_array_equal(y, table[np.asarray(ids)])
            expected = np.zeros_like(table)
            np.add.at(expected, np.asarray(ids).reshape(-1), np.asarray(dy).reshape(-1, 4))
            np.testing.assert_allclose(dparams["embedding"], expected, rtol=TOL[dtype], atol=1e-6)
            np.testing.assert_allclose(
                dparams["embedding"], dparams_ref["embedding"], rtol=TOL[dtype], atol=1e-6
            )
            chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)
            # No gradient for integer ids: float0, as jax.vjp's own cotangent.
            assert dx.dtype == dx_ref.dtype == jax.dtypes.float0 and dx.shape == ids.shape


def test_default_init_and_dtype():
    params, shape = nn.embedding(1000, 64).init(jax.random.key(0), ())
    assert shape == (64,) and params["embedding"].shape == (1000, 64)
    np.testing.assert_allclose(np.std(params["embedding"]), 1 / 8, rtol=0.05)
    params, _ = nn.embedding(5, 2, dtype=jnp.bfloat16).init(jax.random.key(0), (3,))
    assert params["embedding"].dtype == jnp.bfloat16


def test_out_of_range_ids_under_jit_give_nan_rows_and_no_gradient():
    layer = nn.embedding(6, 2)
    params = numpy_params(layer, (4,))
    ids = np.array([[1, -1, 6, 2]], np.int32)

    @jax.jit
    def run(params, ids):
        y, cache = layer.forward(params, ids)
        return y, layer.backward(params, cache, jnp.ones_like(y))[0]

    y, dparams = jax.tree.map(np.asarray, run(params, ids))  # numpy: indexing compiles nothing
    assert np.all(np.isnan(y[0, 1:3])) and np.all(np.isfinite(y[0, [0, 3]]))
    np.testing.assert_array_equal(dparams["embedding"][:, 0], [0, 1, 1, 0, 0, 0])


def test_composed_models_match_jax_grad():
    """Both models, their references and the custom_vjp route in one compiled program."""
    models = {
        "flatten": nn.serial(nn.embedding(11, 3), nn.flatten(), nn.dense(2)),
        "gru": nn.serial(nn.embedding(11, 3), nn.gru(4), nn.last_step(), nn.dense(2)),
    }
    loss = losses.softmax_cross_entropy
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        ids = device_array(rng.integers(0, 11, (6, 5)), jnp.int64)
        labels = device_array(rng.integers(0, 2, 6), jnp.int64)
        params = {
            name: jax.tree.map(
                lambda a: device_array(0.5 * rng.standard_normal(a.shape), jnp.float64),
                init_shapes(model, (5,))[0],
            )
            for name, model in models.items()
        }

        @jax.jit
        def run(params):
            out = {}
            for name, model in models.items():
                value, grads = fbp.value_and_grad(model, loss)(params[name], ids, labels)
                ref_value, ref_grads = jax.value_and_grad(
                    lambda p, model=model: loss.value(model.apply(p, ids), labels)
                )(params[name])
                # The float0 dx passes through jax.custom_vjp (fbp.backprop.to_jax).
                objective = fbp.backprop.to_jax(model, loss)
                custom = jax.grad(objective)(params[name], ids, labels)
                out[name] = (value, grads, ref_value, ref_grads, custom)
            return out

        for name, (value, grads, ref_value, ref_grads, custom) in run(params).items():
            assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(params[name]))
            np.testing.assert_allclose(value, ref_value, rtol=1e-12, err_msg=name)
            chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-12)
            chex.assert_trees_all_close(custom, ref_grads, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- errors


def test_id_errors():
    layer = nn.embedding(10, 3)
    params = numpy_params(layer, (4,))
    with pytest.raises(
        RangeError,
        match=r"embedding\(10→3\): ids must lie in \[0, 10\) for a table of 10 rows, "
        r"got values in \[0, 10\]",
    ):
        layer.forward(params, jnp.array([[0, 10, 2, 3]]))
    with pytest.raises(RangeError, match=r"got values in \[-1, 3\]"):
        layer.forward(params, np.array([[0, -1, 2, 3]]))
    with pytest.raises(
        DTypeError, match=r"embedding\(10→3\): expected integer ids, got float32; an embedding"
    ):
        layer.forward(params, np.ones((2, 4), np.float32))
    with pytest.raises(
        ShapeError, match=r"embedding\(10→3\): expected ids of shape \(batch, ...\)"
    ):
        layer.forward(params, np.array(3, np.int32))


def test_params_errors():
    layer = nn.embedding(10, 3)
    with pytest.raises(
        ShapeError, match=r"expected params \{'embedding': \(10, 3\)\}, got \(10, 4\)"
    ):
        layer.forward({"embedding": np.ones((10, 4), np.float32)}, np.zeros((1, 2), np.int32))
    with pytest.raises(ShapeError, match=r"expected params \{'embedding': \(10, 3\)\}, got \{'w'"):
        layer.forward({"w": np.ones((10, 3), np.float32)}, np.zeros((1, 2), np.int32))


@pytest.mark.parametrize(
    ("vocab", "features", "message"),
    [(0, 3, "vocab must be a positive int, got 0"), (5, 2.0, "features must be a positive int")],
)
def test_bad_configurations(vocab, features, message):
    with pytest.raises(ConfigError, match=rf"embedding: {message}"):
        nn.embedding(vocab, features)


@pytest.mark.parametrize("ids_shape", [(4, 6), pytest.param((3, 2, 5), marks=pytest.mark.slow)])
def test_check_layer_verifies_an_embedding_on_integer_ids(ids_shape):
    from fbp import verify

    layer = nn.embedding(5, 3)  # 5 ids, many positions: repeats are certain
    ids = device_array(np.random.default_rng(0).integers(0, 5, ids_shape), jnp.int32)
    report = verify.check_layer(layer, jax.random.key(1), ids_shape[1:], inputs=ids)
    assert report.ok, report

    def overwriting(params, cache, dy):  # .set instead of .add: repeated ids lose rows
        rows = dy.reshape(-1, 3)
        table = jnp.zeros_like(params["embedding"]).at[cache.reshape(-1)].set(rows)
        return {"embedding": table}, np.zeros(cache.shape, jax.dtypes.float0)

    def float_dx(params, cache, dy):  # an ordinary zero array is not integer ids' cotangent
        dparams, _ = layer.backward(params, cache, dy)
        return dparams, jnp.zeros(cache.shape, jnp.float32)

    for wrong in (overwriting, float_dx):
        bad = layer._replace(backward=wrong)
        report = verify.check_layer(bad, jax.random.key(1), ids_shape[1:], inputs=ids)
        assert not report.ok, wrong.__name__
    assert "float0" in str(report)
    with pytest.raises(ConfigError, match=r"inputs must have shape \(batch, \*input_shape\)"):
        verify.check_layer(layer, jax.random.key(1), (7,), inputs=ids)
