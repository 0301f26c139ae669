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


def draw(layer, input_shape, batch, dtype, seed):
    """Random params (biases non-zero), input and cotangent from a seeded numpy RNG.

    ``layer.init`` is only traced, for the shapes: drawing with numpy compiles
    nothing, while the initializers (truncated normals, QR) would cost more to
    compile than the whole check. Returns ``(out_shape, params, x, dy)``.
    """
    param_shapes, out_shape = init_shapes(layer, input_shape)
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), dtype)

    def draw_param(leaf):
        return normal(leaf.shape, 1 / np.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.5)

    params = jax.tree.map(draw_param, param_shapes)
    return out_shape, params, normal((batch, *input_shape)), normal((batch, *out_shape))
