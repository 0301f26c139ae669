"""Update rules written out as ``optax.GradientTransformation``s.

Each rule is a factory returning ``GradientTransformation(init, update)`` with
a small NamedTuple state, so fbp's rules and optax's interchange freely and
combine with ``optax.chain``. Hyperparameter names and defaults follow optax.
``updates`` are to be *added* to the params (``optax.apply_updates``), so they
carry the minus sign of descent.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["SgdState", "sgd"]

ScalarOrSchedule = float | optax.Schedule


def _learning_rate(learning_rate: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """The learning rate at step ``count`` (a constant, or a schedule evaluated at it)."""
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate)


class SgdState(NamedTuple):
    """State of :func:`sgd`: the number of updates so far (for schedules)."""

    count: jax.Array


def sgd(learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
    """Plain stochastic gradient descent: ``θ ← θ − η·g``.

    Args:
      learning_rate: ``η``, a float or an optax schedule ``step -> η``.

    Returns:
      An ``optax.GradientTransformation``; equal to ``optax.sgd(learning_rate)``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from fbp import optim
      >>> opt = optim.sgd(0.1)
      >>> params = {"w": jnp.ones(2)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones(2)}, state)
      >>> optax.apply_updates(params, updates)["w"]
      Array([0.9, 0.9], dtype=float32)
    """

    def init(params):
        del params
        return SgdState(count=jnp.zeros([], jnp.int32))

    def update(grads, state, params=None):
        del params
        eta = _learning_rate(learning_rate, state.count)
        updates = jax.tree.map(lambda g: (-eta * g).astype(g.dtype), grads)
        return updates, SgdState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init, update)
