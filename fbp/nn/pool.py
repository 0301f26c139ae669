"""Max and average pooling over sequences and images, channels-last.

A pool slides a window of ``K`` taps over the spatial axes of
``(batch, length, channels)`` or ``(batch, height, width, channels)`` and
reduces each window per channel. Both layers gather the windows with the
im2col helper of :mod:`fbp.nn.conv` and send the gradient back with its
transpose (``col2im``), so overlapping windows add their shares::

    max:  y = x̃[argmax of the window]     dx = col2im(dy routed to each window's argmax)
    avg:  y = (1/K)·Σ_window x̃            dx = col2im(dy/K spread over the window)

The window size sets the dimensionality: an int or a 1-tuple pools a
sequence, a pair pools an image.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from fbp.errors import ConfigError
from fbp.nn.conv import (
    Padding,
    check_spatial_input,
    check_spatial_shape,
    normalize_padding,
    patches_to_input,
    positive_ints,
    resolve_window,
    window_patches,
)
from fbp.nn.core import Layer, check_float_input, check_no_params

__all__ = ["avg_pool", "max_pool"]


def _pool_config(kind: str, window, strides, padding):
    n = 1 if isinstance(window, int) else len(tuple(window)) if _iterable(window) else 0
    if n not in (1, 2):
        raise ConfigError(
            kind,
            f"window must be an int (1-D), a 1-tuple or a pair (2-D), got {window!r}",
        )
    size = positive_ints(kind, "window", window, n)
    strides = size if strides is None else positive_ints(kind, "strides", strides, n)
    padding = normalize_padding(kind, padding, n)
    if isinstance(padding, tuple) and any(max(p) >= k for p, k in zip(padding, size, strict=True)):
        raise ConfigError(
            kind,
            f"padding {padding} must be smaller than the window {size} on every side, "
            "or some windows would hold only padding",
        )
    name = f"{kind}({'×'.join(map(str, size))})"
    return n, size, strides, padding, name


def _iterable(value) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _pool(kind, window, strides, padding, forward_rule, backward_rule) -> Layer:
    n, size, strides, padding, name = _pool_config(kind, window, strides, padding)
    dilation = (1,) * n

    def init(key, input_shape):
        del key
        input_shape = check_spatial_shape(name, input_shape, n)
        geometry = resolve_window(name, size, strides, dilation, padding, input_shape[:-1])
        return {}, (*geometry.out, input_shape[-1])

    def forward(params, x, *, key=None, train=False):
        del key, train
        check_no_params(name, params)
        check_float_input(name, x)
        check_spatial_input(name, x, n, None)
        geometry = resolve_window(name, size, strides, dilation, padding, x.shape[1:-1])
        y, residual = forward_rule(x, geometry)
        carrier = jnp.zeros((0, *x.shape[1:]), x.dtype)  # the input's shape, no data
        return y, (residual, carrier)

    def backward(params, cache, dy):
        residual, carrier = cache
        geometry = resolve_window(name, size, strides, dilation, padding, carrier.shape[1:-1])
        dpatches = backward_rule(residual, dy, geometry)
        return {}, patches_to_input(dpatches, geometry).astype(carrier.dtype)

    return Layer(init, forward, backward, name=name)


def max_pool(
    window: int | Sequence[int],
    *,
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
) -> Layer:
    """Max pooling: each output is its window's largest input, per channel.

    ``y = x̃[a]`` with ``a`` the arg-max of the window, so the whole incoming
    gradient goes to that one input: ``dx = col2im(dy ⊙ onehot(a))``, summed
    where windows overlap.

    Tie rule: when several inputs of a window share the maximum, the *first*
    in the window (row-major over the window's taps) is the arg-max and gets
    all of the gradient; the others get none. The forward is written as that
    gather, ``take(window, argmax(window))``, so ``jax.vjp`` of the forward
    follows the same rule and equals the hand backward even on ties, as does
    ``lax.reduce_window``'s max (select-and-scatter). ``jnp.max`` over a
    window's axis splits a tie's gradient equally instead; all agree wherever
    the maximum is unique.

    Padding (``"SAME"`` or explicit) pads with −∞, so a padded position is
    never the maximum; explicit padding must be smaller than the window.

    Cache: the arg-max index of each window (``int8`` while the window has
    fewer than 128 taps: a quarter of a float32 output), and a zero-size array
    carrying the input's shape for ``col2im``.

    Args:
      window: taps per axis: an int or 1-tuple (1-D, ``(batch, length, c)``)
        or a pair (2-D, ``(batch, height, width, c)``).
      strides: step between windows; the window size by default
        (non-overlapping windows).
      padding: ``"VALID"`` (default), ``"SAME"``, an int or ``(low, high)``
        pairs per axis.

    Example:
      >>> import jax.numpy as jnp
      >>> from fbp import nn
      >>> pool = nn.max_pool(2)
      >>> x = jnp.array([[[1.0], [3.0], [2.0], [2.0]]])  # (batch 1, length 4, 1 channel)
      >>> y, cache = pool.forward({}, x)
      >>> y[0, :, 0]
      Array([3., 2.], dtype=float32)
      >>> pool.backward({}, cache, jnp.ones_like(y))[1][0, :, 0]  # the tie: first gets it
      Array([0., 1., 1., 0.], dtype=float32)
    """

    def forward_rule(x, geometry):
        patches = window_patches(x, geometry, pad_value=-jnp.inf)  # (batch, *out, K, c)
        index = jnp.argmax(patches, axis=-2)  # first maximum on ties
        y = jnp.take_along_axis(patches, index[..., None, :], axis=-2)[..., 0, :]
        small = jnp.int8 if geometry.taps < 128 else jnp.int32
        return y, index.astype(small)

    def backward_rule(index, dy, geometry):
        taps = jnp.arange(geometry.taps, dtype=index.dtype)
        taps = taps.reshape((1,) * (index.ndim - 1) + (geometry.taps, 1))
        hit = index[..., None, :] == taps  # (batch, *out, K, c)
        return jnp.where(hit, dy[..., None, :], jnp.zeros((), dy.dtype))

    return _pool("max_pool", window, strides, padding, forward_rule, backward_rule)


def avg_pool(
    window: int | Sequence[int],
    *,
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
) -> Layer:
    """Average pooling: each output is its window's mean, per channel.

    ``y = (1/K)·Σ_window x̃`` with ``K`` the window's taps, so every input in
    a window receives ``dy/K``: ``dx = col2im(dy/K)``, summed where windows
    overlap. Padded positions (``"SAME"`` or explicit) count as zeros in the
    mean — the divisor is always ``K`` (flax's and PyTorch's default
    ``count_include_pad``), which keeps the layer linear and its rule one line.

    Cache: only a zero-size array carrying the input's shape: the rule does
    not depend on ``x``.

    Args:
      window: taps per axis: an int or 1-tuple (1-D) or a pair (2-D).
      strides: step between windows; the window size by default.
      padding: ``"VALID"`` (default), ``"SAME"``, an int or ``(low, high)``
        pairs per axis; must be smaller than the window.

    Example:
      >>> import jax.numpy as jnp
      >>> from fbp import nn
      >>> pool = nn.avg_pool((2, 2))
      >>> y, cache = pool.forward({}, jnp.arange(16.0).reshape(1, 4, 4, 1))
      >>> y[0, :, :, 0]
      Array([[ 2.5,  4.5],
             [10.5, 12.5]], dtype=float32)
      >>> pool.backward({}, cache, jnp.ones_like(y))[1].shape
      (1, 4, 4, 1)
    """

    def forward_rule(x, geometry):
        patches = window_patches(x, geometry)
        return patches.sum(axis=-2) / geometry.taps, ()

    def backward_rule(residual, dy, geometry):
        del residual
        shape = (*dy.shape[:-1], geometry.taps, dy.shape[-1])
        return jnp.broadcast_to((dy / geometry.taps)[..., None, :], shape)

    return _pool("avg_pool", window, strides, padding, forward_rule, backward_rule)
