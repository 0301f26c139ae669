"""Inverted dropout: drop each unit with probability ``rate`` while training."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError
from fbp.nn.core import Layer, check_float_input, check_no_params

__all__ = ["dropout"]


def dropout(rate: float) -> Layer:
    """Inverted dropout: each unit is *dropped* (set to 0) with probability ``rate``.

    Note the meaning of ``rate``: it is the probability of dropping, as in
    flax, PyTorch and Keras (``jax.example_libraries.stax.Dropout(rate)``
    instead *keeps* with probability ``rate``). In training
    (``train=True``), with ``m`` a mask of independent Bernoulli(1 − rate)
    draws from ``key``::

        y = m ⊙ x / (1 − rate)        dx = m ⊙ dy / (1 − rate)

    so the expected activation is unchanged and inference needs no
    rescaling: with ``train=False`` the layer is the identity (``dx = dy``)
    and needs no key.

    Cache: the boolean keep-mask ``m`` in training (one byte per unit; it is
    the only thing the rule reads, and the key need not be kept); nothing at
    inference.

    Args:
      rate: probability of dropping a unit, in ``[0, 1)``. ``rate=0`` is the
        identity in both modes.

    Raises:
      ConfigError: for ``rate`` outside ``[0, 1)``, and from the forward when
        ``train=True`` (and ``rate > 0``) but no ``key`` is given.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.dropout(0.5)
      >>> x = jnp.ones((2, 4))
      >>> y, mask = layer.forward({}, x, key=jax.random.key(0), train=True)
      >>> bool(jnp.all((y == 0) | (y == 2)))     # dropped, or kept and scaled by 1/(1 − 0.5)
      True
      >>> layer.backward({}, mask, jnp.ones_like(y))[1].shape
      (2, 4)
      >>> bool(jnp.all(layer.apply({}, x) == x))  # inference: the identity
      True
    """
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ConfigError("dropout", f"rate must be a number in [0, 1), got {rate!r}")
    if not 0 <= rate < 1:
        raise ConfigError(
            "dropout",
            f"rate is the probability of dropping a unit and must lie in [0, 1), got {rate}",
        )
    rate = float(rate)
    scale = 1.0 / (1.0 - rate)
    name = f"dropout({rate:g})"

    def init(key, input_shape):
        del key
        return {}, tuple(input_shape)

    def forward(params, x, *, key: Any = None, train: bool = False):
        check_no_params(name, params)
        check_float_input(name, x)
        if not train or rate == 0:
            return x, ()
        if key is None:
            raise ConfigError(
                name,
                "train=True needs a key= to draw the dropout mask; pass one "
                "(fbp.value_and_grad(...)(params, x, y, key=key)) or use train=False",
            )
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype)), keep

    def backward(params, cache, dy):
        if not isinstance(cache, jax.Array):  # inference (or rate 0): the identity
            return {}, dy
        return {}, jnp.where(cache, dy * scale, jnp.zeros((), dy.dtype))

    return Layer(init, forward, backward, name=name)
