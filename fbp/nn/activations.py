"""Elementwise activations, each with its derivative written next to it.

An activation ``y = f(x)`` has the backward ``dx = dy ⊙ f'(x)``. What differs
between them is which residual the backward keeps: the cheapest one from which
``f'(x)`` can be read without redoing the forward's work. Each docstring says
which and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError
from fbp.nn.core import Extensions, Layer, check_float_input, check_no_params

__all__ = [
    "elu",
    "gelu",
    "identity",
    "leaky_relu",
    "relu",
    "sigmoid",
    "softplus",
    "tanh",
]


def elementwise(
    name: str,
    forward: Callable[[jax.Array], tuple[jax.Array, object]],
    backward: Callable[[object, jax.Array], jax.Array],
) -> Layer:
    """Build a parameter-free elementwise ``Layer`` from its two rules.

    Args:
      name: the activation's name, for messages.
      forward: ``x -> (y, cache)``.
      backward: ``(cache, dy) -> dx``.
    """

    def init(key, input_shape):
        del key
        return {}, tuple(input_shape)

    def layer_forward(params, x, *, key=None, train=False):
        del key, train
        check_no_params(name, params)
        check_float_input(name, x)
        return forward(x)

    def layer_backward(params, cache, dy):
        return {}, backward(cache, dy)

    return Layer(
        init, layer_forward, layer_backward, name=name, extensions=Extensions(elementwise=True)
    )


def identity() -> Layer:
    """``y = x``; ``dx = dy``. Caches nothing."""
    return elementwise("identity", lambda x: (x, ()), lambda cache, dy: dy)


def sigmoid() -> Layer:
    """``y = σ(x) = 1 / (1 + e⁻ˣ)``; ``dx = dy ⊙ y(1 − y)``.

    Caches ``y``: σ' is a function of the output alone, so the input need not
    be kept and nothing is recomputed.
    """

    def forward(x):
        y = jax.nn.sigmoid(x)
        return y, y

    return elementwise("sigmoid", forward, lambda y, dy: dy * y * (1 - y))


def tanh() -> Layer:
    """``y = tanh(x)``; ``dx = dy ⊙ (1 − y²)``.

    Caches ``y``, for the same reason as :func:`sigmoid`.
    """

    def forward(x):
        y = jnp.tanh(x)
        return y, y

    return elementwise("tanh", forward, lambda y, dy: dy * (1 - y * y))


def relu() -> Layer:
    """``y = max(x, 0)``; ``dx = dy ⊙ [x > 0]``.

    Caches the boolean mask ``x > 0`` (one byte per element, a quarter of a
    float32 activation). The derivative at ``x = 0`` is taken as 0, as in JAX.
    A NaN input stays NaN, as in ``jax.nn.relu``, so a NaN upstream shows in
    the loss instead of vanishing here.
    """

    def forward(x):
        return jax.nn.relu(x), x > 0

    return elementwise("relu", forward, lambda mask, dy: jnp.where(mask, dy, 0).astype(dy.dtype))


def leaky_relu(negative_slope: float = 0.01) -> Layer:
    """``y = x`` for ``x ≥ 0``, else ``negative_slope·x``; ``dx = dy`` or ``negative_slope·dy``.

    Caches the boolean mask ``x ≥ 0``. At ``x = 0`` the derivative is 1, as
    ``jax.nn.leaky_relu``'s (which uses ``x >= 0``).
    """
    slope = float(negative_slope)

    def forward(x):
        mask = x >= 0
        return jnp.where(mask, x, slope * x), mask

    def backward(mask, dy):
        return jnp.where(mask, dy, slope * dy)

    return elementwise(f"leaky_relu({slope:g})", forward, backward)


def elu(alpha: float = 1.0) -> Layer:
    """``y = x`` for ``x > 0``, else ``α(eˣ − 1)``; ``dx = dy`` or ``dy ⊙ (y + α)``.

    Caches ``y``: for ``x ≤ 0`` the derivative ``α·eˣ`` equals ``y + α``, and
    ``y > 0`` exactly when ``x > 0``, so the exponential is not recomputed.
    ``alpha`` must be positive (otherwise the sign of ``y`` would not tell
    the branch).
    """
    alpha = float(alpha)
    if not alpha > 0:
        raise ConfigError("elu", f"alpha must be positive, got {alpha}")

    def forward(x):
        y = jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))
        return y, y

    def backward(y, dy):
        return jnp.where(y > 0, dy, dy * (y + alpha))

    return elementwise(f"elu({alpha:g})", forward, backward)


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def gelu(approximate: bool = True) -> Layer:
    """Gaussian error linear unit, ``y = x·Φ(x)``.

    Exact: ``dx = dy ⊙ (Φ(x) + x·φ(x))``, caching ``x`` and ``Φ(x)``.

    Approximate (the tanh form of Hendrycks & Gimpel, as ``jax.nn.gelu``):
    ``y = ½x(1 + t)`` with ``t = tanh(u)``, ``u = √(2/π)(x + 0.044715x³)``, so
    ``dx = dy ⊙ (½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²))``, caching
    ``x`` and ``t`` (the forward's tanh is reused, not recomputed).
    """
    if approximate:

        def forward(x):
            t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
            return 0.5 * x * (1 + t), (x, t)

        def backward(cache, dy):
            x, t = cache
            du_dx = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
            return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du_dx)

    else:

        def forward(x):
            cdf = jax.scipy.stats.norm.cdf(x)
            return x * cdf, (x, cdf)

        def backward(cache, dy):
            x, cdf = cache
            return dy * (cdf + x * jax.scipy.stats.norm.pdf(x))

    return elementwise("gelu" if approximate else "gelu(exact)", forward, backward)


def softplus() -> Layer:
    """``y = log(1 + eˣ)``, computed stably; ``dx = dy ⊙ σ(x) = dy ⊙ (1 − e⁻ʸ)``.

    Caches ``y``: since ``e⁻ʸ = 1 − σ(x)``, the derivative is
    ``−expm1(−y)``, accurate for tiny ``y`` too.
    """

    def forward(x):
        y = jnp.logaddexp(x, 0)
        return y, y

    return elementwise("softplus", forward, lambda y, dy: -dy * jnp.expm1(-y))
