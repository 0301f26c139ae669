"""Recomputation: trade a little compute in backward for the memory of a layer's cache.

``recompute(layer)`` keeps only the layer's input in its cache and runs the
layer's forward again in backward to rebuild the rest — llm.c's
``recompute`` option, gradient checkpointing at one layer. Under ``jit`` the
re-run computes only what the backward reads: in ``recompute(serial(gelu(),
dense(n)))`` the dense layer's matmul output is never read again, so XLA drops
it and what is recomputed is the GELU alone, while the cache shrinks from
three ``(batch, T, 4·width)`` arrays (GELU's ``x`` and ``tanh``, the dense
layer's input) to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError
from fbp.nn.core import Layer

__all__ = ["recompute"]


def recompute(layer: Layer) -> Layer:
    """``layer`` caching only its input; backward re-runs its forward for the rest.

    Forward: ``y, _ = layer.forward(params, x)``, cache ``(x, key, mode)``.
    Backward: ``_, cache = layer.forward(params, x)`` again, then
    ``layer.backward(params, cache, dy)``. The same params, outputs and
    gradients as ``layer``; a forward that draws from its key redraws the same
    numbers (the key is kept). A leaf for every tool (the per-example
    fallbacks and the verifier run its forward and backward as they are).

    Args:
      layer: any layer; a cheap one whose cache is large (GELU and what
        follows it) is what pays.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> block = nn.recompute(nn.serial(nn.gelu(), nn.dense(3)))
      >>> params, _ = block.init(jax.random.key(0), (4,))
      >>> y, cache = block.forward(params, jnp.ones((2, 4)))
      >>> cache[0].shape                                  # the input alone
      (2, 4)
      >>> dparams, dx = block.backward(params, cache, jnp.ones_like(y))
      >>> dx.shape
      (2, 4)
    """
    if not isinstance(layer, Layer):
        raise ConfigError("recompute", f"expected a Layer, got {type(layer).__name__}")

    def forward(params, x, *, key=None, train=False):
        y, _ = layer.forward(params, x, key=key, train=train)
        # The mode rides in the cache as a static shape: an empty array of rank 1 or 2.
        mode = jnp.zeros((0,) * (2 if train else 1), jnp.int8)
        return y, (x, key, mode)

    def backward(params, cache, dy):
        x, key, mode = cache
        # One barrier over the input and the incoming gradient (as jax.checkpoint
        # does): the re-run can neither be merged with the forward's own
        # (common-subexpression elimination) nor scheduled before dy exists, either
        # of which would keep the forward's arrays alive after all.
        x, dy = jax.lax.optimization_barrier((x, dy))
        _, inner = layer.forward(params, x, key=key, train=mode.ndim == 2)
        return layer.backward(params, inner, dy)

    def init(key, input_shape):
        return layer.init(key, input_shape)

    return Layer(init, forward, backward, name=f"recompute({layer.name})")
