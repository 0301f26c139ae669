"""Embeddings: ids to learned vectors (scatter-add gradient), positions, and the read-out.

:func:`embedding` looks up a row per integer id; :func:`positional_embedding`
adds a learned vector per position of a sequence (GPT-2's ``wpe``);
:func:`unembedding` reads vectors out as scores over the vocabulary through a
table of the embedding's layout, ``y = x·Eᵀ``, so that :func:`fbp.nn.tie`
can share one table between the two ends of a language model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.errors import ConfigError, DTypeError, RangeError, ShapeError
from fbp.nn.core import Extensions, Initializer, Layer, check_float_input, row_sq_norms
from fbp.nn.dense import per_example_outer_grads, per_example_outer_sq_norms

__all__ = ["embedding", "positional_embedding", "unembedding"]


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
        gram = jnp.einsum("btf,bsf->bts", dy3, dy3)  # δ_nt·δ_ns
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


# --------------------------------------------------------------------------- positions


def positional_embedding(
    context: int,
    *,
    w_init: Initializer | None = None,
    dtype: Any = jnp.float32,
) -> Layer:
    """Add a learned vector per position: ``y[n, t, :] = x[n, t, :] + P[t, :]``.

    For sequences ``(batch, T, features)`` with ``T ≤ context``. Params are
    ``{"embedding": (context, features)}`` (GPT-2's ``wpe``); a sequence
    shorter than ``context`` uses the first ``T`` rows. The addition is
    broadcast over the batch, so its backward sums over the batch::

        dP[t] = Σ_n dy[n, t]   (t < T; rows t ≥ T get 0)      dx = dy

    Example ``n``'s share of ``dP`` is ``dy[n]`` itself, so its squared norm
    is ``‖dy_n‖²`` (the per-example rule declared for the walker). No cache
    but the input's length, carried as a zero-size array ``(0, T)``.

    Args:
      context: the longest sequence (rows of the table).
      w_init: initializer ``(key, shape, dtype)``; normal with standard
        deviation 0.02 by default (GPT-2's).
      dtype: dtype of the table.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.positional_embedding(8)
      >>> params, shape = layer.init(jax.random.key(0), (5, 3))
      >>> params["embedding"].shape, shape
      ((8, 3), (5, 3))
      >>> y, cache = layer.forward(params, jnp.zeros((2, 5, 3)))
      >>> dparams, dx = layer.backward(params, cache, jnp.ones_like(y))
      >>> dparams["embedding"][:, 0]              # two examples at positions 0..4
      Array([2., 2., 2., 2., 2., 0., 0., 0.], dtype=float32)
    """
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise ConfigError(
            "positional_embedding", f"context must be a positive int, got {context!r}"
        )
    w_init = w_init or jax.nn.initializers.normal(0.02)
    name = f"positional_embedding(context={context})"

    def check_length(time: int) -> None:
        if time > context:
            raise ShapeError(
                name,
                f"a sequence of {time} positions is longer than the context of {context}; "
                f"crop it to the last {context} (or build the model with a longer context)",
            )

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 2:
            raise ShapeError(name, f"expected input_shape (time, features), got {input_shape}")
        check_length(input_shape[0])
        return {"embedding": w_init(key, (context, input_shape[1]), dtype)}, input_shape

    def forward(params, x, *, key=None, train=False):
        del key, train
        check_float_input(name, x)
        if not isinstance(params, dict) or set(params) != {"embedding"}:
            raise ShapeError(
                name,
                f"expected params {{'embedding': ({context}, features)}}, got "
                f"{jax.tree.map(jnp.shape, params)}; are these params from another model?",
            )
        table = params["embedding"]
        if jnp.ndim(x) != 3 or x.shape[-1] != table.shape[1]:
            raise ShapeError(
                name,
                f"expected input of shape (batch, time, {table.shape[1]}), got "
                f"{tuple(jnp.shape(x))}",
            )
        check_length(x.shape[1])
        time = x.shape[1]
        y = x + table[None, :time, :].astype(x.dtype)
        return y, jnp.zeros((0, time), x.dtype)

    def backward(params, cache, dy):
        table, time = params["embedding"], cache.shape[1]
        rows = dy.sum(axis=0).astype(table.dtype)
        d_table = jnp.zeros_like(table).at[:time].set(rows)
        return {"embedding": d_table}, dy

    def batch_l2(params, cache, dy):
        dparams, dx = backward(params, cache, dy)
        return dparams, dx, {"embedding": row_sq_norms(dy)}

    def batch_grad(params, cache, dy):
        dparams, dx = backward(params, cache, dy)
        table, time = params["embedding"], cache.shape[1]
        g = jnp.zeros((dy.shape[0], *table.shape), table.dtype).at[:, :time].set(dy)
        return dparams, dx, {"embedding": g}

    # Adding a table moves no error through a weight: nothing for a feedback rule.
    extensions = Extensions(weights=(), batch_l2=batch_l2, batch_grad=batch_grad)
    return Layer(init, forward, backward, name=name, extensions=extensions)


# --------------------------------------------------------------------------- read-out


def unembedding(
    vocab: int,
    *,
    w_init: Initializer | None = None,
    dtype: Any = jnp.float32,
) -> Layer:
    """Scores over a vocabulary through an embedding-layout table: ``y = x·Eᵀ``.

    Params are ``{"embedding": (vocab, features)}`` — exactly
    :func:`embedding`'s layout, so :func:`fbp.nn.tie` can make a language
    model's output head read its input embedding's table (GPT-2 and nanoGPT
    do). A dense layer without bias whose weight is stored transposed; the
    rules are the dense ones with the roles of the axes swapped::

        y = x·Eᵀ       dE = dyᵀ·x   (vocab × features)       dx = dy·E

    No transposed copy of ``E`` is made in either direction: each product
    contracts the axes where they lie. Cache: ``x`` (for ``dE``). Example
    ``n``'s share of ``dE`` is ``Σ_t dy_nt·x_ntᵀ`` (the dense per-example
    rule, declared for the walker).

    Args:
      vocab: number of rows of the table (scores per position).
      w_init: initializer ``(key, shape, dtype)`` for the table when untied;
        normal with standard deviation 0.02 by default (GPT-2's).
      dtype: dtype of the table.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> head = nn.unembedding(10)
      >>> params, shape = head.init(jax.random.key(0), (5, 4))
      >>> params["embedding"].shape, shape
      ((10, 4), (5, 10))
      >>> y, cache = head.forward(params, jnp.ones((2, 5, 4)))
      >>> dparams, dx = head.backward(params, cache, jnp.ones_like(y))
      >>> dparams["embedding"].shape, dx.shape
      ((10, 4), (2, 5, 4))
    """
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise ConfigError("unembedding", f"vocab must be a positive int, got {vocab!r}")
    w_init = w_init or jax.nn.initializers.normal(0.02)
    name = f"unembedding(→{vocab})"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 1:
            raise ShapeError(name, "needs an input shape with at least one axis")
        params = {"embedding": w_init(key, (vocab, input_shape[-1]), dtype)}
        return params, (*input_shape[:-1], vocab)

    def forward(params, x, *, key=None, train=False):
        del key, train
        if not isinstance(params, dict) or set(params) != {"embedding"}:
            raise ShapeError(
                name,
                f"expected params {{'embedding': ({vocab}, features)}}, got "
                f"{jax.tree.map(jnp.shape, params)}; are these params from another model?",
            )
        table = params["embedding"]
        check_float_input(name, x)
        if jnp.ndim(x) < 2 or x.shape[-1] != table.shape[1] or table.shape[0] != vocab:
            raise ShapeError(
                name,
                f"expected input of shape (batch, ..., {table.shape[1]}) and a table "
                f"({vocab}, {table.shape[1]}), got input {tuple(jnp.shape(x))} and table "
                f"{tuple(table.shape)}",
            )
        y = jnp.einsum("...f,vf->...v", x, table)  # y = x·Eᵀ (no transposed copy of E)
        return y, x

    def backward(params, cache, dy):
        x, table = cache, params["embedding"]
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        d_table = jnp.einsum("pv,pf->vf", dy2, x2)  # dE = dyᵀ·x, summed over positions
        dx = jnp.einsum("...v,vf->...f", dy, table)  # dx = dy·E
        return {"embedding": d_table.astype(table.dtype)}, dx.astype(x.dtype)

    def batch_l2(params, cache, dy):
        dparams, dx = backward(params, cache, dy)
        sq, _ = per_example_outer_sq_norms(cache, dy)  # ‖Σ_t x_t·δ_tᵀ‖² = ‖Σ_t δ_t·x_tᵀ‖²
        return dparams, dx, {"embedding": sq}

    def batch_grad(params, cache, dy):
        dparams, dx = backward(params, cache, dy)
        g, _ = per_example_outer_grads(dy, cache)  # Σ_t δ_t·x_tᵀ: (batch, vocab, features)
        return dparams, dx, {"embedding": g.astype(params["embedding"].dtype)}

    extensions = Extensions(weights=("embedding",), batch_l2=batch_l2, batch_grad=batch_grad)
    return Layer(init, forward, backward, name=name, extensions=extensions)
