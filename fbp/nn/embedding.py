"""Embedding lookup: integer ids to learned vectors, and its scatter-add gradient."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.errors import ConfigError, DTypeError, RangeError, ShapeError
from fbp.nn.core import Extensions, Initializer, Layer

__all__ = ["embedding"]


def embedding(
    vocab: int,
    features: int,
    *,
    w_init: Initializer | None = None,
    dtype: Any = jnp.float32,
) -> Layer:
    """Look up one row of a table per integer id: ``y[..., :] = E[ids[...], :]``.

    Params are ``{"embedding": (vocab, features)}`` (flax's name and layout).
    The lookup is a one-hot matmul in disguise, ``y = onehot(ids)·E``, so its
    gradient is ``dE = onehot(ids)ᵀ·dy``: each id's row receives the sum of
    the ``dy`` rows that looked it up — a scatter-add,
    ``dE = zeros.at[ids].add(dy)``, without building the one-hot matrix.

    ``dx`` convention: ids are integers, so there is no gradient with respect
    to them. The backward returns an array of ``ids``' shape with dtype
    ``jax.dtypes.float0`` — JAX's own cotangent for integer inputs, what
    ``jax.vjp`` returns for them and what ``jax.custom_vjp`` expects — rather
    than float zeros that would pretend ids were differentiable.

    Ids must lie in ``[0, vocab)``. Concrete ids out of range raise a
    ``RangeError`` at the call; under ``jit`` (values unknown at trace time)
    an out-of-range id — negative ones included, which would otherwise wrap
    around — looks up a row of NaN, so the mistake cannot pass silently, and
    contributes no gradient.

    Cache: ``ids`` (with out-of-range ones marked), all the scatter-add reads.

    Args:
      vocab: number of rows (distinct ids).
      features: length of each vector.
      w_init: initializer ``(key, shape, dtype)`` for the table; by default a
        normal with variance ``1/features`` (flax's ``Embed``).
      dtype: dtype of the table.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.embedding(10, 3)
      >>> params, shape = layer.init(jax.random.key(0), (5,))   # sequences of 5 ids
      >>> shape
      (5, 3)
      >>> ids = jnp.array([[1, 2, 2, 0, 9]])
      >>> y, cache = layer.forward(params, ids)
      >>> dparams, dx = layer.backward(params, cache, jnp.ones_like(y))
      >>> dparams["embedding"][:3, 0]                          # id 2 was looked up twice
      Array([1., 1., 2.], dtype=float32)
      >>> dx.dtype, dx.shape
      (dtype([('float0', 'V')]), (1, 5))
    """
    for what, value in (("vocab", vocab), ("features", features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError("embedding", f"{what} must be a positive int, got {value!r}")
    w_init = w_init or jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=-1, out_axis=0
    )
    name = f"embedding({vocab}→{features})"

    def init(key, input_shape):
        params = {"embedding": w_init(key, (vocab, features), dtype)}
        return params, (*tuple(input_shape), features)

    def forward(params, ids, *, key=None, train=False):
        del key, train
        table = _checked_table(params, vocab, features, name)
        dtype = getattr(ids, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise DTypeError(
                name,
                f"expected integer ids, got {dtype or type(ids).__name__}; "
                "an embedding looks up rows by index",
            )
        if jnp.ndim(ids) < 1:
            raise ShapeError(name, f"expected ids of shape (batch, ...), got {jnp.shape(ids)}")
        _check_ids_in_range(name, ids, vocab)
        # Out-of-range ids (only possible under jit) point past the table:
        # the lookup fills NaN and the scatter-add drops them.
        ids = jnp.where((ids >= 0) & (ids < vocab), ids, vocab)
        y = jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)
        return y, ids

    def backward(params, cache, dy):
        ids, table = cache, params["embedding"]
        rows = dy.reshape(-1, features).astype(table.dtype)
        d_table = jnp.zeros_like(table).at[ids.reshape(-1)].add(rows, mode="drop")
        return {"embedding": d_table}, np.zeros(ids.shape, jax.dtypes.float0)

    def batch_l2(params, cache, dy):
        # dE_n[v] = Σ_{t: id_nt = v} δ_nt, so ‖dE_n‖² = Σ_{t,s} [id_nt = id_ns]·(δ_nt·δ_ns):
        # a Gram matrix of the example's positions masked by equal ids (cost ∝ T²·features).
        dparams, dx = backward(params, cache, dy)
        batch = cache.shape[0]
        ids2 = cache.reshape(batch, -1)
        dy3 = dy.reshape(batch, ids2.shape[1], -1)
        same = ids2[:, :, None] == ids2[:, None, :]
        gram = jnp.einsum("btf,bsf->bts", dy3, dy3)
        return dparams, dx, {"embedding": jnp.sum(jnp.where(same, gram, 0), axis=(1, 2))}

    # No error flows into integer ids, so there is no weight transport for a
    # feedback rule to replace: weights=().
    extensions = Extensions(weights=(), batch_l2=batch_l2)
    return Layer(init, forward, backward, name=name, extensions=extensions)


def _check_ids_in_range(name: str, ids, vocab: int) -> None:
    if isinstance(ids, jax.core.Tracer):
        return
    values = np.asarray(ids)
    if values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab:
        raise RangeError(
            name,
            f"ids must lie in [0, {vocab}) for a table of {vocab} rows, "
            f"got values in [{low}, {high}]",
        )


def _checked_table(params, vocab: int, features: int, name: str) -> jax.Array:
    if not isinstance(params, dict) or set(params) != {"embedding"}:
        got = (
            jax.tree.map(lambda a: tuple(jnp.shape(a)), params)
            if isinstance(params, dict | tuple | list)
            else type(params).__name__
        )
        raise ShapeError(
            name,
            f"expected params {{'embedding': ({vocab}, {features})}}, got {got}; "
            "are these params from another model?",
        )
    table = params["embedding"]
    if jnp.shape(table) != (vocab, features):
        raise ShapeError(
            name,
            f"expected params {{'embedding': ({vocab}, {features})}}, got {jnp.shape(table)}; "
            "are these params from another model?",
        )
    return table
