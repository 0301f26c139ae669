"""The fully connected layer, ``y = x·W + b``, and its hand-derived backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError, ShapeError
from fbp.nn.core import (
    Extensions,
    Initializer,
    Layer,
    check_batched,
    check_float_input,
    check_param_keys,
    row_sq_norms,
)
from fbp.nn.init import draw

__all__ = [
    "dense",
    "ones_rows",
    "outer_rows",
    "per_example_outer_grads",
    "per_example_outer_sq_norms",
]


def dense(
    features: int,
    *,
    use_bias: bool = True,
    w_init: Initializer | None = None,
    b_init: Initializer | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Layer:
    """A fully connected layer acting on the last axis: ``y = x·W + b``.

    Params are ``{"w": (n_in, features), "b": (features,)}`` (no ``"b"`` when
    ``use_bias=False``), so the forward reads like the math. With ``x`` of
    shape ``(batch, n_in)`` and ``dy = ∂L/∂y`` of shape ``(batch, features)``,
    the backward is::

        dW = xᵀ·dy        db = Σ_batch dy        dx = dy·Wᵀ

    Any axes between the batch and the last are treated as extra batch axes
    (so ``dense`` applies per time step to a sequence); their contributions to
    ``dW`` and ``db`` are summed too.

    Cache: ``x``, the only residual the backward needs (for ``dW``); ``W`` is
    already in params.

    Args:
      features: number of outputs.
      use_bias: whether to add ``b``.
      w_init: initializer ``(key, shape, dtype) -> array`` for ``W``. The
        default is LeCun normal (truncated normal, variance ``1/n_in``), as in
        flax; pass ``jax.nn.initializers.he_normal()`` for deep ReLU networks.
      b_init: initializer for ``b``; zeros by default.
        ``nn.init.torch_default()`` (for both) draws ``W`` and ``b`` from
        ``U(±1/√n_in)``, as ``torch.nn.Linear`` does.
      dtype: dtype of the parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.dense(3)
      >>> params, shape = layer.init(jax.random.key(0), (4,))
      >>> params["w"].shape, params["b"].shape, shape
      ((4, 3), (3,), (3,))
      >>> y, cache = layer.forward(params, jnp.ones((2, 4)))
      >>> dparams, dx = layer.backward(params, cache, jnp.ones_like(y))
      >>> dx.shape
      (2, 4)
    """
    if not isinstance(features, int) or isinstance(features, bool) or features < 1:
        raise ConfigError("dense", f"features must be a positive int, got {features!r}")
    w_init = w_init or jax.nn.initializers.lecun_normal()
    b_init = b_init or jax.nn.initializers.zeros

    def init(key, input_shape):
        if len(input_shape) < 1:
            raise ShapeError(f"dense(→{features})", "needs an input shape with at least one axis")
        n_in = input_shape[-1]
        w_key, b_key = jax.random.split(key)
        params = {"w": draw(w_init, w_key, (n_in, features), dtype, fan_in=n_in)}
        if use_bias:
            params["b"] = draw(b_init, b_key, (features,), dtype, fan_in=n_in)
        return params, (*input_shape[:-1], features)

    def forward(params, x, *, key=None, train=False):
        del key, train
        w = _checked_weights(params, use_bias, features)
        name = f"dense {w.shape[0]}→{w.shape[1]}"
        check_float_input(name, x)
        check_batched(name, x, f"(batch, {w.shape[0]})")
        if x.shape[-1] != w.shape[0]:
            raise ShapeError(
                name,
                f"expected input of shape (batch, {w.shape[0]}), got {tuple(x.shape)}",
            )
        y = jnp.einsum("...n,nm->...m", x, w)  # y = x·W (+ b below)
        if use_bias:
            y = y + _broadcast_last(params["b"], y.ndim)
        return y, x

    def backward(params, cache, dy):
        x, w = cache, params["w"]
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        # Contracting the batch axis of both operands (or W's output axis, for dx)
        # directly never materialises a transposed copy; XLA picks the layouts.
        dw = jnp.einsum("bn,bm->nm", x2, dy2)  # dW = xᵀ·dy
        dparams = {"w": dw.astype(w.dtype)}
        if use_bias:
            dparams["b"] = dy2.sum(axis=0).astype(params["b"].dtype)
        dx = jnp.einsum("...m,nm->...n", dy, w)  # dx = dy·Wᵀ
        return dparams, dx.astype(x.dtype)

    def batch_l2(params, cache, dy):
        dparams, dx = backward(params, cache, dy)
        sq_w, sq_b = per_example_outer_sq_norms(cache, dy)
        sq = {"w": sq_w, "b": sq_b} if use_bias else {"w": sq_w}
        return dparams, dx, sq

    def batch_grad(params, cache, dy):
        dparams, dx = backward(params, cache, dy)
        g_w, g_b = per_example_outer_grads(cache, dy)
        g = {"w": g_w.astype(params["w"].dtype)}
        if use_bias:
            g["b"] = g_b.astype(params["b"].dtype)
        return dparams, dx, g

    def outer_factors(params, cache, dy):
        # Example n's dW_n = Σ_t x_ntᵀ·δ_nt and db_n = Σ_t 1·δ_nt: the pairs (x, δ)
        # and (1, δ), from which fbp.quantities forms Σ_n dW_n² = (x²)ᵀ·(δ²) (on
        # vectors, T = 1), Kronecker factors xᵀx and δᵀδ, or clipped sums xᵀ·(c ⊙ δ).
        dparams, dx = backward(params, cache, dy)
        x3, dy3 = outer_rows(cache, dy)
        factors = {"w": (x3, dy3)}
        if use_bias:
            factors["b"] = (ones_rows(dy3), dy3)
        return dparams, dx, factors

    extensions = Extensions(
        weights=("w",), batch_l2=batch_l2, batch_grad=batch_grad, outer_factors=outer_factors
    )
    return Layer(init, forward, backward, name=f"dense(→{features})", extensions=extensions)


def outer_rows(x: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` and ``dy`` as ``(batch, T, features)``: every axis between batch and features is T.

    The pair a dense rule shared over steps or positions declares in
    ``Extensions.outer_factors`` (example ``n``'s ``dW_n = Σ_t x_ntᵀ·dy_nt``).
    """
    batch = x.shape[0]
    return x.reshape(batch, -1, x.shape[-1]), dy.reshape(batch, -1, dy.shape[-1])


def ones_rows(g: jax.Array) -> jax.Array:
    """A bias's input side ``a = 1``, ``(batch, T, 1)``, for ``g`` of shape ``(batch, T, q)``."""
    return jnp.ones((*g.shape[:2], 1), g.dtype)


def per_example_outer_grads(x: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each example's dense gradients ``(Σ_t x_t·δ_tᵀ, Σ_t δ_t)``, shapes ``(batch, n_in, n_out)``
    and ``(batch, n_out)``.

    ``x`` is ``(batch, ..., n_in)`` and ``dy`` ``(batch, ..., n_out)``; the
    axes between the batch and the features (time steps, positions) are summed.
    """
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])
    dy3 = dy.reshape(batch, -1, dy.shape[-1])
    # dW_n = Σ_t x_ntᵀ·δ_nt, db_n = Σ_t δ_nt
    return jnp.einsum("btn,btm->bnm", x3, dy3), dy3.sum(axis=1)


def per_example_outer_sq_norms(x: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(‖Σ_t x_t·δ_tᵀ‖², ‖Σ_t δ_t‖²)`` of each example, without forming gradients when cheaper.

    On ``(batch, n_in)`` inputs example ``n``'s weight gradient is the outer
    product ``x_n·δ_nᵀ``, so ``‖dW_n‖² = ‖x_n‖²·‖δ_n‖²`` (Goodfellow, 2015,
    "Efficient per-example gradient computations"). With extra axes
    ``(batch, T, n_in)`` (a sequence, or a convolution's output positions),
    ``dW_n = Σ_t x_nt·δ_ntᵀ`` is a sum of outer products; then either the Gram
    form ``‖dW_n‖² = Σ_{t,s} (x_nt·x_ns)(δ_nt·δ_ns)`` (cost ∝ T²(n_in+n_out)) or
    the explicit ``dW_n`` (cost ∝ T·n_in·n_out), whichever is cheaper.

    Returns:
      Two ``(batch,)`` arrays: the weight's and the bias's squared norms.
    """
    if x.ndim == 2:
        sq_dy = row_sq_norms(dy)
        return row_sq_norms(x) * sq_dy, sq_dy
    batch, n_in, n_out = x.shape[0], x.shape[-1], dy.shape[-1]
    x3 = x.reshape(batch, -1, n_in)
    dy3 = dy.reshape(batch, -1, n_out)
    steps = x3.shape[1]
    if steps * (n_in + n_out) < n_in * n_out:
        gram_x = jnp.einsum("btn,bsn->bts", x3, x3)  # x_nt·x_ns
        gram_dy = jnp.einsum("btm,bsm->bts", dy3, dy3)  # δ_nt·δ_ns
        sq_w = jnp.sum(gram_x * gram_dy, axis=(1, 2))
    else:
        sq_w = row_sq_norms(jnp.einsum("btn,btm->bnm", x3, dy3))  # ‖Σ_t x_ntᵀ·δ_nt‖²
    return sq_w, row_sq_norms(dy3.sum(axis=1))


def _broadcast_last(v: jax.Array, ndim: int) -> jax.Array:
    """``v`` of shape ``(n,)`` reshaped to ``(1, ..., 1, n)`` with ``ndim`` axes."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _checked_weights(params, use_bias: bool, features: int) -> jax.Array:
    expected = "{'w': (n_in, n_out), 'b': (n_out,)}" if use_bias else "{'w': (n_in, n_out)}"
    check_param_keys("dense", params, {"w", "b"} if use_bias else {"w"}, expected)
    w = params["w"]
    if jnp.ndim(w) != 2:
        raise ShapeError("dense", f"expected a 2-D weight 'w', got shape {jnp.shape(w)}")
    if w.shape[1] != features:
        raise ShapeError(
            f"dense(→{features})",
            f"expected weight 'w' of shape (n_in, {features}), got {tuple(w.shape)}; "
            "are these params from another model?",
        )
    if use_bias and jnp.shape(params["b"]) != (w.shape[1],):
        raise ShapeError(
            f"dense {w.shape[0]}→{w.shape[1]}",
            f"expected bias 'b' of shape ({w.shape[1]},), got {jnp.shape(params['b'])}",
        )
    return w
