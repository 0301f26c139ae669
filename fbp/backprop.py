"""The backpropagation driver: forward, loss gradient, backward — no autodiff.

:func:`value_and_grad` is the whole algorithm in four lines: run the model
forward keeping each layer's cache, evaluate the loss, seed the backward pass
with the loss's hand-derived gradient, and let ``model.backward`` carry it
right to left. Nothing here calls ``jax.grad`` or ``jax.vjp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from fbp.errors import ConfigError
from fbp.losses import Loss
from fbp.nn.core import Layer

__all__ = ["grad", "value_and_grad"]

Params = Any


def _check(model: Layer, loss: Loss) -> None:
    if not isinstance(model, Layer):
        raise ConfigError("value_and_grad", f"model must be a Layer, got {type(model).__name__}")
    if not isinstance(loss, Loss):
        raise ConfigError("value_and_grad", f"loss must be a Loss, got {type(loss).__name__}")


def value_and_grad(model: Layer, loss: Loss) -> Callable[..., tuple[jax.Array, Params]]:
    """Build ``f(params, x, y, *, key=None, train=True) -> (loss_value, grads)``.

    ``grads`` has the structure, shapes and dtypes of ``params`` and is computed
    by the layers' hand-written backward rules. ``key`` and ``train`` are passed
    to every layer's forward (``train=True`` by default: gradients are for
    training, so dropout and batch statistics are on). ``f`` is pure and
    jit-able.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(8), nn.tanh(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> x, labels = jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1])
      >>> value, grads = fbp.value_and_grad(model, losses.softmax_cross_entropy)(params, x, labels)
      >>> grads[0]["w"].shape
      (4, 8)
    """
    _check(model, loss)

    def value_and_grad_fn(params, x, y, *, key=None, train=True):
        pred, cache = model.forward(params, x, key=key, train=train)
        value = loss.value(pred, y)
        dpred = loss.grad(pred, y)
        grads, _ = model.backward(params, cache, dpred)
        return value, grads

    return value_and_grad_fn


def grad(model: Layer, loss: Loss) -> Callable[..., Params]:
    """Like :func:`value_and_grad`, returning the gradients alone."""
    f = value_and_grad(model, loss)

    def grad_fn(params, x, y, *, key=None, train=True):
        return f(params, x, y, key=key, train=train)[1]

    return grad_fn
