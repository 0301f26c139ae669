"""The fully connected layer, ``y = x·W + b``, and its hand-derived backward."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from fbp.errors import ConfigError, ShapeError
from fbp.nn.core import Layer, check_batched, check_float_input, check_param_keys

__all__ = ["dense"]

Initializer = Callable[..., jax.Array]


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
        params = {"w": w_init(w_key, (n_in, features), dtype)}
        if use_bias:
            params["b"] = b_init(b_key, (features,), dtype)
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
        y = x @ w
        if use_bias:
            y = y + _broadcast_last(params["b"], y.ndim)
        return y, x

    def backward(params, cache, dy):
        x, w = cache, params["w"]
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        # dW = xᵀ·dy: contract the batch axis of both operands directly, without
        # materialising a transpose; XLA picks the operand layout.
        dw = lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())))
        dparams = {"w": dw.astype(w.dtype)}
        if use_bias:
            dparams["b"] = dy2.sum(axis=0).astype(params["b"].dtype)
        dx = lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
        return dparams, dx.astype(x.dtype)

    return Layer(init, forward, backward, name=f"dense(→{features})")


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
