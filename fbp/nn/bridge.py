"""An escape hatch: any JAX function as a ``Layer`` whose backward is ``jax.vjp``.

Everything else in :mod:`fbp.nn` has a hand-derived backward. :func:`from_jax`
does not: it asks JAX's autodiff for the vector-Jacobian product, so a layer
fbp does not (yet) have can sit inside an fbp model. Its name says so, and
:mod:`fbp.verify` reports checks it like any other layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from fbp.errors import ConfigError
from fbp.nn.core import Layer, Shape

__all__ = ["from_jax"]


def from_jax(
    fn: Callable[[Any, jax.Array], jax.Array],
    init: Callable[[jax.Array, Shape], tuple[Any, Shape]],
    *,
    name: str | None = None,
) -> Layer:
    """Wrap a JAX function as a ``Layer`` — backward by ``jax.vjp``, NOT hand-derived.

    Forward: ``y, vjp = jax.vjp(fn, params, x)``; the cache is ``vjp`` itself
    (a pytree of the residuals JAX's autodiff chose to keep), so backward is
    ``dparams, dx = vjp(dy)`` and nothing is recomputed. Use it for layers fbp
    has no hand-derived rule for; the layer's name carries the label
    ``[jax.vjp]`` so reports and error messages show that its backward is
    autodiff's. Credit-assignment rules (:mod:`fbp.rules`) refuse it with an
    error: its backward replays the forward's ``vjp`` and reads no weights
    that a feedback matrix could replace.

    Args:
      fn: ``fn(params, x) -> y``, with ``x`` and ``y`` carrying the batch axis.
        It takes no ``key`` or ``train``; close over constants instead.
      init: ``init(key, input_shape) -> (params, output_shape)``, shapes
        without the batch axis, as for any layer (``params`` may be ``{}``).
      name: for messages; defaults to ``fn``'s ``__name__``.

    Returns:
      A :class:`Layer` obeying the usual contract.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> def scale_init(key, shape):
      ...     return {"s": jnp.ones(shape[-1:])}, shape
      >>> def scale(params, x):
      ...     return x * params["s"][None, :]
      >>> layer = nn.from_jax(scale, scale_init)
      >>> layer.name
      'from_jax(scale) [jax.vjp]'
      >>> model = nn.serial(nn.dense(4), layer, nn.dense(2))
      >>> params, shape = model.init(jax.random.key(0), (3,))
    """
    if not callable(fn) or not callable(init):
        raise ConfigError("from_jax", "fn and init must both be callables")
    label = f"from_jax({name or getattr(fn, '__name__', 'fn')}) [jax.vjp]"

    def layer_init(key, input_shape):
        return init(key, tuple(input_shape))

    def forward(params, x, *, key=None, train=False):
        del key, train
        y, vjp = jax.vjp(fn, params, x)
        return y, vjp

    def backward(params, cache, dy):
        del params
        dparams, dx = cache(dy)
        return dparams, dx

    return Layer(layer_init, forward, backward, name=label)
