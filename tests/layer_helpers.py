"""Helpers shared by the layer test modules: random draws and comparisons.

Imported as ``from layer_helpers import ...``: pytest puts ``tests/`` on
``sys.path`` (rootdir-relative, no package), as for ``conftest.py``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

TOL = {"float64": 1e-10, "float32": 1e-5}


def device_array(values, dtype) -> jax.Array:
    """``values`` (numpy) as a jax array of ``dtype``, with no compilation.

    ``jnp.asarray(values, dtype)`` compiles a small conversion program for
    every new shape; casting in numpy and ``jax.device_put`` compiles none.
    """
    return jax.device_put(np.asarray(values, dtype))


def rel_err(a, b) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b), initial=0.0), 1e-30)
    return np.max(np.abs(a - b), initial=0.0) / scale


def tree_rel_errs(tree, ref) -> list[tuple[str, float]]:
    """``(path, relative error)`` of every leaf of ``tree`` against ``ref``'s (same structure)."""
    paths = jax.tree_util.tree_leaves_with_path(tree)
    return [
        (jax.tree_util.keystr(path), rel_err(a, b))
        for (path, a), b in zip(paths, jax.tree.leaves(ref), strict=True)
    ]


def assert_trees_close(tree, ref, tol) -> None:
    """Same structure, and every leaf within ``tol`` relative error (leaf path in the message)."""
    chex.assert_trees_all_equal_structs(tree, ref)
    for path, a in jax.tree_util.tree_leaves_with_path(tree):
        b = functools.reduce(lambda t, k: t[k.key if hasattr(k, "key") else k.idx], path, ref)
        assert rel_err(a, b) < tol, (jax.tree_util.keystr(path), rel_err(a, b))


def hand_and_reference(layer, params, x, dy):
    """The hand backward and jax.vjp of the same forward, in one compiled program."""
    y, cache = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)
    y_ref, vjp = jax.vjp(lambda p, x: layer.forward(p, x)[0], params, x)
    dparams_ref, dx_ref = vjp(dy)
    return y, dparams, dx, y_ref, dparams_ref, dx_ref


def init_shapes(layer, input_shape):
    """``layer.init`` traced, not run: the params' shapes and the output shape."""
    out_shape = []

    def init(key):
        params, shape = layer.init(key, input_shape)
        out_shape.append(shape)
        return params

    return jax.eval_shape(init, jax.random.key(0)), out_shape[0]


def numpy_params(model, input_shape, seed=0):
    """Params of ``model``'s shapes and dtypes from a seeded numpy generator, as numpy arrays.

    ``init`` is traced, not run (its initializers would compile a program per
    shape); matrices are scaled by ``1/√fan_in``, everything else (biases
    included) by 0.3, so no leaf is zero.
    """
    rng = np.random.default_rng(seed)

    def draw_leaf(leaf):
        scale = 1 / np.sqrt(leaf.shape[0]) if leaf.ndim == 2 else 0.3
        return np.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree.map(draw_leaf, init_shapes(model, input_shape)[0])


def normal32(seed, *shape):
    """A float32 numpy array of standard normals from ``default_rng(seed)`` (compiles nothing)."""
    return np.float32(np.random.default_rng(seed).standard_normal(shape))


def draw(layer, input_shape, batch, dtype, seed):
    """Random params (biases non-zero), input and cotangent from a seeded numpy RNG.

    ``layer.init`` is only traced, for the shapes: drawing with numpy compiles
    nothing, while the initializers (truncated normals, QR) would cost more to
    compile than the whole check. Returns ``(out_shape, params, x, dy)``.
    """
    param_shapes, out_shape = init_shapes(layer, input_shape)
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0):
        return device_array(scale * rng.standard_normal(shape), dtype)

    def draw_param(leaf):
        return normal(leaf.shape, 1 / np.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.5)

    params = jax.tree.map(draw_param, param_shapes)
    return out_shape, params, normal((batch, *input_shape)), normal((batch, *out_shape))


def sweep_against_vjp(cases, dtype, extra=None):
    """Many layers' hand backward against ``jax.vjp``, in ONE compiled program.

    ``cases`` maps a case name to ``(layer, input_shape, batch, seed)``; each
    draws its own params, input and cotangent (:func:`draw`). ``extra(name,
    params, x, y)``, if given, is traced into the same program and its result
    returned (a reference forward, say). Checks, per case: ``y``'s shape and
    dtype, ``y`` equal to the vjp's forward, ``dparams``' and ``dx``'s shapes
    and dtypes, and their relative errors under ``TOL[dtype]``.

    Returns ``(failures, results)``: the failed checks, each a line naming its
    case, and ``{name: (params, x, y, extra_result)}``.
    """
    drawn = {
        name: draw(layer, shape, batch, dtype, seed)
        for name, (layer, shape, batch, seed) in cases.items()
    }

    @jax.jit
    def run(data):
        out = {}
        for name, (params, x, dy) in data.items():
            y, dparams, dx, y_ref, dparams_ref, dx_ref = hand_and_reference(
                cases[name][0], params, x, dy
            )
            more = None if extra is None else extra(name, params, x, y)
            out[name] = (y, dparams, dx, y_ref, dparams_ref, dx_ref, more)
        return out

    outputs = run({name: d[1:] for name, d in drawn.items()})
    failures, results = [], {}
    for name, (out_shape, params, x, _) in drawn.items():
        y, dparams, dx, y_ref, dparams_ref, dx_ref, more = outputs[name]
        batch = cases[name][2]
        failures += shape_failures(name, (y, dparams, dx), (params, x), batch, out_shape, dtype)
        if not np.array_equal(y, y_ref):
            failures.append(
                f"{name}: y differs from jax.vjp's forward, rel err {rel_err(y, y_ref)}"
            )
        failures += [
            f"{name}: d{path} rel err {e}"
            for path, e in tree_rel_errs(dparams, dparams_ref)
            if not e < TOL[dtype]
        ]
        if not rel_err(dx, dx_ref) < TOL[dtype]:
            failures.append(f"{name}: dx rel err {rel_err(dx, dx_ref)}")
        results[name] = (params, x, y, more)
    return failures, results


def shape_failures(name, hand, inputs, batch, out_shape, dtype):
    """``y`` of shape ``(batch, *out_shape)`` in ``dtype``, ``dparams`` mirroring ``params``
    and ``dx`` mirroring ``x`` (shapes and dtypes): the failed checks, each naming ``name``."""
    (y, dparams, dx), (params, x) = hand, inputs
    failures = []
    if not (y.shape == (batch, *out_shape) and y.dtype == dtype):
        failures.append(f"{name}: y {y.shape} {y.dtype}, expected {(batch, *out_shape)} {dtype}")
    spec = jax.tree.map(lambda a: (a.shape, a.dtype), dparams)
    if spec != jax.tree.map(lambda a: (a.shape, a.dtype), params):
        failures.append(f"{name}: dparams shapes/dtypes {spec}")
    if not (dx.shape == x.shape and dx.dtype == x.dtype):
        failures.append(f"{name}: dx {dx.shape} {dx.dtype}")
    return failures


def trace_against_vjp(cases, dtype):
    """:func:`sweep_against_vjp`'s shape and dtype checks, traced only (``jax.eval_shape``:
    nothing compiled), for a dtype whose values another sweep compares.

    ``cases`` as for :func:`sweep_against_vjp`. Checks, per case: ``y``'s shape and dtype,
    ``dparams`` mirroring ``params`` and ``dx`` mirroring ``x`` (shapes and dtypes), and
    ``jax.vjp``'s results of the same shapes and dtypes. Returns ``(failures, params)``:
    the failed checks, each a line naming its case, and ``{name: params' shapes}``.
    """
    failures, shapes = [], {}
    for name, (layer, input_shape, batch, _) in cases.items():
        params, out_shape = init_shapes(layer, input_shape)
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), params)
        x = jax.ShapeDtypeStruct((batch, *input_shape), dtype)
        dy = jax.ShapeDtypeStruct((batch, *out_shape), dtype)
        y, dparams, dx, y_ref, dparams_ref, dx_ref = jax.eval_shape(
            functools.partial(hand_and_reference, layer), params, x, dy
        )
        failures += shape_failures(name, (y, dparams, dx), (params, x), batch, out_shape, dtype)
        refs = jax.tree.map(lambda a: (a.shape, a.dtype), (y_ref, dparams_ref, dx_ref))
        if refs != jax.tree.map(lambda a: (a.shape, a.dtype), (y, dparams, dx)):
            failures.append(f"{name}: jax.vjp's shapes/dtypes {refs}")
        shapes[name] = params
    return failures, shapes


def assert_model_matches_jax_grad(model, input_shape, classes, batch, seed):
    """A whole model's loss and gradients against ``jax.value_and_grad``, in float64 (1e-10).

    Draws params and inputs with :func:`draw` and integer labels in ``[0, classes)``;
    softmax cross-entropy on the model's output.
    """
    from fbp import losses, value_and_grad

    with jax.enable_x64(True):
        out_shape, params, x, _ = draw(model, input_shape, batch, "float64", seed)
        assert out_shape == (classes,)
        labels = device_array(np.random.default_rng(seed).integers(0, classes, batch), jnp.int32)
        loss = losses.softmax_cross_entropy

        @jax.jit  # one program: fbp's value and gradients, and autodiff's
        def both(params, x, labels):
            def reference(params):
                return loss.value(model.apply(params, x), labels)

            return value_and_grad(model, loss)(params, x, labels), jax.value_and_grad(reference)(
                params
            )

        (value, grads), (ref_value, ref_grads) = both(params, x, labels)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
        assert_trees_close(grads, ref_grads, 1e-10)


def side_input_probe():
    """``(model, params, seen)``: ``serial(probe, dense(2))`` on ``(3,)`` inputs whose probe
    layer records the ``key`` and ``train`` its forward receives into the dict ``seen``."""
    from fbp import nn

    seen = {}

    def forward(params, x, *, key=None, train=False):
        seen.update(key=key, train=train)
        return x, ()

    probe = nn.Layer(lambda k, s: ({}, s), forward, lambda p, c, dy: ({}, dy), name="probe")
    model = nn.serial(probe, nn.dense(2))
    params, _ = model.init(jax.random.key(0), (3,))
    return model, params, seen
