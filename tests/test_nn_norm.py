"""Tests of fbp.nn.norm: layer_norm, batch_norm and its functional running statistics.

References: ``jax.vjp`` of each layer's own forward (in training and inference
mode), the normalization written out in plain ``jax.numpy``, ``jax.grad`` of
composed forwards, and optax's own update rules for the statistics' zero
gradient.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from layer_helpers import TOL, device_array, init_shapes, numpy_params, rel_err

import fbp
import fbp.nn.norm
from fbp import losses, nn
from fbp.errors import ConfigError, DTypeError, ShapeError


def _hand_and_reference(layer, train, params, x, dy):
    y, cache = layer.forward(params, x, train=train)
    dparams, dx = layer.backward(params, cache, dy)
    _, vjp = jax.vjp(lambda p, x: layer.forward(p, x, train=train)[0], params, x)
    dparams_ref, dx_ref = vjp(dy)
    return y, dparams, dx, dparams_ref, dx_ref


def _draw(layer, input_shape, batch, dtype, seed):
    """Params of the init's structure with random values (variances positive), x and dy."""
    params, out_shape = init_shapes(layer, input_shape)  # traced: shapes only
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        values = rng.standard_normal(leaf.shape)
        if any(getattr(k, "key", None) == "var" for k in path):
            values = 0.5 + np.abs(values)
        return device_array(values, dtype)

    params = jax.tree_util.tree_map_with_path(draw, params)
    x = device_array(1.5 + 2 * rng.standard_normal((batch, *input_shape)), dtype)
    dy = device_array(rng.standard_normal((batch, *out_shape)), dtype)
    return params, x, dy


def _normalize(x, axes, mean=None, var=None, epsilon=1e-5):
    mean = jnp.mean(x, axis=axes, keepdims=True) if mean is None else mean
    var = jnp.var(x, axis=axes, keepdims=True) if var is None else var
    return (x - mean) / jnp.sqrt(var + epsilon)


def _affine(params, x_hat):
    n = x_hat.ndim
    y = x_hat
    if "scale" in params:
        y = y * params["scale"].reshape((1,) * (n - 1) + (-1,))
    if "bias" in params:
        y = y + params["bias"].reshape((1,) * (n - 1) + (-1,))
    return y


SHAPES = [(6,), (5, 3), (4, 3, 2)]
AFFINE = [{}, {"use_scale": False}, {"use_bias": False}]


def _norm_formula(kind, train, params, x):
    """The normalization written out in plain jnp: the reference forward."""
    if kind == "layer_norm":
        return _affine(params, _normalize(x, -1))
    axes = tuple(range(x.ndim - 1))
    if train:
        return _affine(params, _normalize(x, axes))
    stats = jax.tree.map(lambda v: v.reshape((1,) * (x.ndim - 1) + (-1,)), params["stats"])
    return _affine(params, _normalize(x, axes, stats["mean"], stats["var"]))


def _norm_program(dtype):
    """layer_norm, and batch_norm training and inference, on every (shape, affine): their
    draws at ``dtype`` and ONE function running them all."""
    cases = {}
    for shape, affine in zip(SHAPES, AFFINE, strict=True):
        cases[f"layer_norm-{shape}-{affine}"] = (
            "layer_norm",
            nn.layer_norm(**affine),
            False,
            shape,
        )
        for train in (True, False):
            cases[f"batch_norm-{shape}-{affine}-train={train}"] = (
                "batch_norm", nn.batch_norm(**affine), train, shape
            )  # fmt: skip
    drawn = {
        name: _draw(layer, shape, 4, dtype, len(shape))
        for name, (_, layer, _, shape) in cases.items()
    }

    def run(drawn):
        out = {}
        for name, (params, x, dy) in drawn.items():
            kind, layer, train, _ = cases[name]
            out[name] = (
                _hand_and_reference(layer, train, params, x, dy),
                _norm_formula(kind, train, params, x),
            )
        return out

    return run, drawn


# float64 proves the math in the inner loop; float32's values are a slow sweep
# (as test_layer_contract's), its dtypes are checked fast without compiling.
@pytest.mark.parametrize("dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
def test_norms_match_vjp_and_the_formula(dtype):
    """Every (norm, shape, affine) case in one program per dtype."""
    with jax.enable_x64(dtype == "float64"):
        run, drawn = _norm_program(dtype)
        results = jax.jit(run)(drawn)
    for name, ((y, dparams, dx, dparams_ref, dx_ref), reference) in results.items():
        params, x, _ = drawn[name]
        assert y.shape == x.shape and y.dtype == dtype, name
        chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)
        assert dx.shape == x.shape and dx.dtype == x.dtype, name
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(dparams), jax.tree.leaves(dparams_ref), strict=True
        ):
            assert rel_err(a, b) < TOL[dtype], (name, jax.tree_util.keystr(path))
        assert rel_err(dx, dx_ref) < TOL[dtype], name
        assert rel_err(y, reference) < TOL[dtype], name


def test_norms_keep_float32():
    """The float32 program traced (jax.eval_shape), not compiled: y, dparams, dx keep float32."""
    run, drawn = _norm_program("float32")
    for name, ((y, dparams, dx, _, _), reference) in jax.eval_shape(run, drawn).items():
        params, x, _ = drawn[name]
        assert y.shape == reference.shape == x.shape and y.dtype == jnp.float32, name
        chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)
        assert dx.shape == x.shape and dx.dtype == jnp.float32, name


def test_batch_norm_statistics_have_zero_gradient_in_training():
    layer = nn.batch_norm()
    params, x, dy = _draw(layer, (3,), 5, "float32", 0)

    @jax.jit  # one program: training and inference
    def run(params, x, dy):
        out = {}
        for train in (True, False):
            _, cache = layer.forward(params, x, train=train)
            out[train] = cache, layer.backward(params, cache, dy)[0]
        return out

    out = run(params, x, dy)
    dparams = out[True][1]
    np.testing.assert_array_equal(dparams["stats"]["mean"], 0.0)
    np.testing.assert_array_equal(dparams["stats"]["var"], 0.0)
    cache, dparams = out[False]
    assert cache.mean is None and cache.var is None
    assert np.all(dparams["stats"]["mean"] != 0)  # inference: a genuine input of the function


def test_caches_hold_the_documented_residuals():
    # Shapes only: the forwards are traced (jax.eval_shape), not compiled.
    _, (x_hat, inv_std) = jax.eval_shape(
        nn.layer_norm().forward,
        nn.layer_norm().init(None, (4,))[0],
        jax.ShapeDtypeStruct((2, 3, 4), jnp.float32),
    )
    assert x_hat.shape == (2, 3, 4) and inv_std.shape == (2, 3, 1)
    layer = nn.batch_norm()
    params, _ = layer.init(None, (5, 4))
    _, cache = jax.eval_shape(
        functools.partial(layer.forward, train=True),
        params,
        jax.ShapeDtypeStruct((2, 5, 4), jnp.float32),
    )
    assert isinstance(cache, nn.BatchNormCache)
    assert cache.x_hat.shape == (2, 5, 4)
    assert cache.inv_std.shape == cache.mean.shape == cache.var.shape == (4,)


def test_default_init():
    params, shape = nn.batch_norm().init(jax.random.key(0), (7, 3))
    assert shape == (7, 3)
    chex.assert_trees_all_equal(
        params,
        {
            "scale": jnp.ones(3),
            "bias": jnp.zeros(3),
            "stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)},
        },
    )
    params, _ = nn.layer_norm(use_bias=False, dtype=jnp.bfloat16).init(None, (5,))
    assert set(params) == {"scale"} and params["scale"].dtype == jnp.bfloat16


# --------------------------------------------------------------------------- composition


def _composed_matches_jax_grad(model, input_shape, train):
    with jax.enable_x64(True):
        params, x, _ = _draw(model, input_shape, 6, "float64", 0)
        labels = np.random.default_rng(1).integers(0, 3, 6).astype(np.int32)
        loss = losses.softmax_cross_entropy

        @jax.jit  # one program: fbp's gradients and autodiff's
        def run(params, x, labels):
            return fbp.value_and_grad(model, loss)(params, x, labels, train=train), (
                jax.value_and_grad(lambda p: loss.value(model.apply(p, x, train=train), labels))(
                    params
                )
            )

        (value, grads), (ref_value, ref_grads) = run(params, x, labels)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
        # A bias feeding batch norm has a zero gradient (the mean removes it):
        # judge each leaf against the largest gradient of the model, not its own.
        floor = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(ref_grads))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) < 1e-10 * max(floor, 1e-30)


@pytest.mark.parametrize(
    "train",
    [True, pytest.param(False, marks=pytest.mark.slow)],  # training: the representative
    ids=["train", "inference"],
)
def test_cnn_with_norms_matches_jax_grad(train):
    model = nn.serial(
        nn.conv1d(4, 3),
        nn.batch_norm(),
        nn.relu(),
        nn.residual(nn.serial(nn.dense(4), nn.layer_norm(), nn.tanh())),
        nn.max_pool(2),
        nn.flatten(),
        nn.dense(3),
    )
    _composed_matches_jax_grad(model, (8, 2), train)


# --------------------------------------------------------------------------- running statistics


def _bn_model():
    return nn.serial(
        nn.dense(4),
        nn.batch_norm(),
        nn.relu(),
        nn.residual(nn.serial(nn.dense(4), nn.batch_norm(use_scale=False))),
        nn.dense(2),
    )


def test_update_batch_stats_is_an_exponential_moving_average():
    model = _bn_model()
    params, x, _ = _draw(model, (3,), 8, "float32", 2)

    @jax.jit  # one program: the update and its independent reference
    def run(params, x):
        _, cache = model.forward(params, x, train=True)
        new = nn.update_batch_stats(model, params, cache, momentum=0.75)
        # Independent: recompute each batch-norm layer's input and its statistics.
        h1 = x @ params[0]["w"] + params[0]["b"][None, :]
        h2 = jnp.maximum(model.children[1].apply(params[1], h1, train=True), 0)
        h3 = h2 @ params[3][0]["w"] + params[3][0]["b"][None, :]
        return new, h1, h3

    new, h1, h3 = jax.tree.map(np.asarray, run(params, x))
    numpy = jax.tree.map(np.asarray, params)
    for p, p_new, h in ((numpy[1], new[1], h1), (numpy[3][1], new[3][1], h3)):
        np.testing.assert_allclose(
            p_new["stats"]["mean"], 0.75 * p["stats"]["mean"] + 0.25 * h.mean(0), rtol=1e-5
        )
        np.testing.assert_allclose(
            p_new["stats"]["var"], 0.75 * p["stats"]["var"] + 0.25 * h.var(0), rtol=1e-5
        )
    # Everything else untouched; the structure and dtypes kept.
    chex.assert_trees_all_equal_shapes_and_dtypes(new, params)
    for i in (0, 4):
        chex.assert_trees_all_equal(new[i], params[i])
    chex.assert_trees_all_equal(new[1]["scale"], params[1]["scale"])


def test_precise_batch_stats_then_inference_equals_training_on_that_batch():
    model = _bn_model()
    params, x, _ = _draw(model, (3,), 16, "float32", 3)

    @jax.jit  # one program
    def run(params, x):
        _, cache = model.forward(params, x, train=True)
        params = nn.update_batch_stats(model, params, cache, momentum=0.0)
        return model.apply(params, x, train=False), model.apply(params, x, train=True)

    inference, training = run(params, x)
    np.testing.assert_allclose(inference, training, rtol=1e-4, atol=1e-4)


def test_optimizers_leave_statistics_alone():
    model = _bn_model()
    params, x, _ = _draw(model, (3,), 8, "float32", 4)
    labels = np.arange(8, dtype=np.int32) % 2
    mask = nn.trainable_mask(params)
    assert mask[1]["stats"] == {"mean": False, "var": False} and mask[1]["scale"] is True
    optimizers = {
        "adam": optax.adam(1e-1),
        "sgd momentum": optax.sgd(1e-1, momentum=0.9),
        "masked adamw": optax.chain(
            optax.masked(optax.add_decayed_weights(0.5), mask), optax.adam(1e-1)
        ),
        # Unmasked weight decay would move them: the reason for the mask.
        "adamw": optax.adamw(1e-1, weight_decay=0.5),
    }

    @jax.jit  # one program: the gradient and three steps of every optimizer
    def run(params, x, labels):
        grads = fbp.grad(model, losses.softmax_cross_entropy)(params, x, labels)
        out = {}
        for name, opt in optimizers.items():
            state, p = opt.init(params), params
            for _ in range(3 if name != "adamw" else 1):
                updates, state = opt.update(grads, state, p)
                p = optax.apply_updates(p, updates)
            out[name] = p
        return out

    out = run(params, x, labels)
    for name in ("adam", "sgd momentum", "masked adamw"):
        p = out[name]
        chex.assert_trees_all_equal(p[1]["stats"], params[1]["stats"], custom_message=name)
        assert not np.array_equal(p[1]["scale"], params[1]["scale"])
    assert not np.array_equal(out["adamw"][1]["stats"]["var"], params[1]["stats"]["var"])


def test_update_batch_stats_errors():
    # The errors are raised at trace time: everything here is traced (jax.eval_shape), not run.
    model = _bn_model()
    params = init_shapes(model, (3,))[0]
    x = jax.ShapeDtypeStruct((4, 3), jnp.float32)

    def update_after(train, **kwargs):
        def f(params, x):
            _, cache = model.forward(params, x, train=train)
            return nn.update_batch_stats(model, params, cache, **kwargs)

        return jax.eval_shape(f, params, x)

    with pytest.raises(
        ConfigError,
        match=r"^serial layer 1 \(batch_norm\): update_batch_stats: the cache holds no batch "
        r"statistics; pass the cache of model.forward\(params, x, train=True\)",
    ):
        update_after(False)
    for momentum in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\], got"):
            update_after(True, momentum=momentum)
    bn = nn.batch_norm()
    wrapped = nn.Layer(
        bn.init, bn.forward, lambda *a: bn.backward(*a), name="wrapper", children=(bn,)
    )
    with pytest.raises(
        ConfigError, match=r"wrapper holds a batch_norm inside a layer that declares no structure"
    ):
        nn.update_batch_stats(wrapped, *bn.init(None, (2,))[:1], None)
    # A model without batch norm is returned as is.
    plain = nn.serial(nn.dense(2))
    p = numpy_params(plain, (3,))
    new = jax.jit(lambda p, x: nn.update_batch_stats(plain, p, plain.forward(p, x)[1]))(
        p, np.ones((1, 3), np.float32)
    )
    chex.assert_trees_all_equal(new, p)


# --------------------------------------------------------------------------- check_layer


# --------------------------------------------------------------------------- errors


def test_input_errors():
    params, _ = nn.batch_norm().init(None, (16,))
    with pytest.raises(
        ShapeError,
        match=r"batch_norm\(16\): expected input of shape \(batch, ..., 16\), got \(32, 8\)",
    ):
        nn.batch_norm().forward(params, np.ones((32, 8), np.float32))
    with pytest.raises(
        ShapeError, match=r"batch_norm\(16\): expected input of shape .* got \(16,\)"
    ):
        nn.batch_norm().forward(params, np.ones((16,), np.float32))
    with pytest.raises(DTypeError, match=r"batch_norm\(16\): expected a floating-point input"):
        nn.batch_norm().forward(params, np.ones((2, 16), np.int32))
    lparams, _ = nn.layer_norm().init(None, (4,))
    with pytest.raises(
        ShapeError,
        match=r"layer_norm\(4\): expected input of shape \(batch, ..., 4\), got \(2, 5\)",
    ):
        nn.layer_norm().forward(lparams, np.ones((2, 5), np.float32))


def test_params_errors():
    params, _ = nn.batch_norm().init(None, (3,))
    with pytest.raises(
        ShapeError, match=r"batch_norm: expected params with entries \{'bias', 'scale', 'stats'\}"
    ):
        nn.batch_norm().forward(
            {"scale": params["scale"], "bias": params["bias"]}, jnp.ones((2, 3))
        )
    with pytest.raises(
        ShapeError, match=r"expected params\['stats'\] with entries \{'mean', 'var'\}"
    ):
        nn.batch_norm().forward(
            {**params, "stats": {"mean": params["stats"]["mean"]}}, jnp.ones((2, 3))
        )
    with pytest.raises(
        ShapeError, match=r"layer_norm: expected every param of shape \(features,\)"
    ):
        nn.layer_norm().forward({"scale": jnp.ones(3), "bias": jnp.ones(4)}, jnp.ones((2, 3)))


@pytest.mark.parametrize("factory", [nn.layer_norm, nn.batch_norm])
@pytest.mark.parametrize("epsilon", [0.0, -1e-5, "1e-5"])
def test_bad_epsilon(factory, epsilon):
    with pytest.raises(ConfigError, match=r"epsilon must be a positive number, got"):
        factory(epsilon=epsilon)
