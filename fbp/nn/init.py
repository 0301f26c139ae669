"""Initializers ``(key, shape, dtype) -> array`` that ``jax.nn.initializers`` lacks.

Every layer with weights takes ``w_init`` and ``b_init`` (recurrent layers
``w_x_init``, ``w_h_init`` and ``b_init``): any ``jax.nn.initializers``
function, or one of these.

- :func:`uniform`: ``U(−bound, bound)`` (``jax.nn.initializers.uniform`` draws
  from ``[0, scale)``).
- :func:`torch_default`: PyTorch's default initialisation, ``U(±1/√fan_in)``
  for the weights *and the biases* of ``torch.nn.Linear``, ``Conv1d`` and
  ``Conv2d``, and ``U(±1/√hidden)`` for everything in ``torch.nn.RNN``,
  ``GRU`` and ``LSTM``. A bias has no fan-in of its own, so the layers that
  take it (:func:`fbp.nn.dense`, :func:`fbp.nn.conv1d`, :func:`fbp.nn.conv2d`,
  :func:`fbp.nn.rnn`, :func:`fbp.nn.gru`, :func:`fbp.nn.lstm`) hand it their
  weight's fan-in (the recurrent ones their ``hidden``) through
  :func:`draw`.

Example:
  >>> import jax
  >>> from fbp import nn
  >>> torch = nn.init.torch_default()
  >>> layer = nn.dense(10, w_init=torch, b_init=torch)
  >>> params, _ = layer.init(jax.random.key(0), (100,))
  >>> bool(abs(params["w"]).max() <= 0.1), bool(abs(params["b"]).max() <= 0.1)
  (True, True)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError
from fbp.nn.core import Initializer, Shape

__all__ = ["FanInUniform", "draw", "torch_default", "uniform"]


def uniform(bound: float) -> Initializer:
    """``U(−bound, bound)``, elementwise and independent.

    Args:
      bound: half-width of the interval, ``> 0``.

    Returns:
      An initializer ``(key, shape, dtype=float32) -> array``.

    Example:
      >>> import jax
      >>> from fbp import nn
      >>> w = nn.init.uniform(0.5)(jax.random.key(0), (1000,))
      >>> bool(-0.5 <= w.min()), bool(w.max() < 0.5), bool(w.min() < -0.4)
      (True, True, True)
    """
    if not (isinstance(bound, int | float) and math.isfinite(bound) and bound > 0):
        raise ConfigError("nn.init.uniform", f"bound must be a finite number > 0, got {bound!r}")

    def init(key: jax.Array, shape: Shape, dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class FanInUniform(NamedTuple):
    """``U(−scale/√fan_in, scale/√fan_in)``; :func:`torch_default` is ``scale = 1``.

    Called as an ordinary initializer on a weight, it reads the fan-in off the
    shape: every axis but the last (dense ``(n_in, n_out)``: ``n_in``; a
    convolution's ``(*kernel, n_in, n_out)``: ``kernel size · n_in``). A bias
    has no fan-in in its shape; the layer gives it with ``fan_in=`` (see
    :func:`draw`), and without it a 1-D shape is refused rather than drawn
    with a made-up bound.

    Attributes:
      scale: the bound times ``√fan_in``.
    """

    scale: float = 1.0

    def __call__(
        self, key: jax.Array, shape: Shape, dtype: Any = jnp.float32, *, fan_in: int | None = None
    ) -> jax.Array:
        """Draw an array of ``shape``; ``fan_in`` overrides the one read off ``shape``."""
        if fan_in is None:
            if len(shape) < 2:
                raise ConfigError(
                    "nn.init.torch_default",
                    f"cannot read a fan-in off the shape {tuple(shape)}: pass it to a layer "
                    "that gives its weight's fan-in to the bias (dense, conv1d, conv2d, rnn, "
                    "gru, lstm), or use nn.init.uniform(1 / fan_in ** 0.5)",
                )
            fan_in = math.prod(shape[:-1])
        bound = self.scale / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default() -> FanInUniform:
    """PyTorch's default initialisation: ``U(±1/√fan_in)`` for weights and biases.

    ``torch.nn.Linear`` and ``torch.nn.Conv1d``/``Conv2d`` (``reset_parameters``)
    draw the weight with ``kaiming_uniform_(w, a=√5)``, whose bound
    ``gain·√(3/fan_in)`` with ``gain = √(2/(1 + a²)) = √(1/3)`` is
    ``1/√fan_in``, and the bias from ``U(±1/√fan_in)`` with the weight's
    fan-in. ``torch.nn.RNN``, ``GRU`` and ``LSTM`` draw every weight and bias
    from ``U(±1/√hidden)``; fbp's recurrent layers give ``hidden`` as the
    fan-in when handed this initializer. (fbp's recurrent ``b`` is PyTorch's
    ``b_ih + b_hh`` wherever the two add up; it is drawn once, so its spread
    is that of one of the two, not of their sum.)

    The authors of MNIST-1D (Greydanus, 2020, "Scaling down deep learning")
    trained their models with these defaults; :func:`fbp.models.mnist1d_cnn`
    and :func:`fbp.models.mnist1d_gru` use it.

    Returns:
      A :class:`FanInUniform` with scale 1, usable as ``w_init`` and ``b_init``.

    Example:
      >>> import jax
      >>> from fbp import nn
      >>> conv = nn.conv1d(25, 3, w_init=nn.init.torch_default(), b_init=nn.init.torch_default())
      >>> params, _ = conv.init(jax.random.key(0), (10, 25))
      >>> bound = 1 / (3 * 25) ** 0.5           # fan-in: kernel 3 × 25 channels
      >>> bool(abs(params["w"]).max() <= bound), bool(abs(params["b"]).max() <= bound)
      (True, True)
    """
    return FanInUniform(1.0)


def draw(init: Initializer, key: jax.Array, shape: Shape, dtype: Any, *, fan_in: int) -> jax.Array:
    """Call ``init``, telling a :class:`FanInUniform` the fan-in of the layer it serves.

    Layers draw their params through this, so ``b_init=nn.init.torch_default()``
    gets the weight's fan-in; any other initializer is called as
    ``init(key, shape, dtype)``.

    Args:
      init: the initializer.
      key, shape, dtype: as for any initializer.
      fan_in: the fan-in the layer's own default rule uses (a dense layer's
        ``n_in``, a convolution's ``kernel size · n_in``, a recurrent layer's
        ``hidden``).

    Returns:
      The drawn array.

    Example:
      >>> import jax
      >>> from fbp import nn
      >>> b = nn.init.draw(nn.init.torch_default(), jax.random.key(0), (10,), "float32", fan_in=4)
      >>> bool(abs(b).max() <= 0.5)
      True
    """
    if isinstance(init, FanInUniform):
        return init(key, shape, dtype, fan_in=fan_in)
    return init(key, shape, dtype)
