"""Losses as ``(value, grad)`` pairs, with the gradient derived by hand.

``value(pred, target)`` is a scalar averaged as each docstring says;
``grad(pred, target)`` is ``∂value/∂pred``, already divided by the same count,
and fused where the algebra fuses (softmax with cross-entropy, sigmoid with
binary cross-entropy), so the backward pass starts from one cheap, stable
expression.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.errors import DTypeError, RangeError, ShapeError

__all__ = ["Loss", "mse", "sigmoid_binary_cross_entropy", "softmax_cross_entropy"]


class Loss(NamedTuple):
    """A loss: ``value(pred, target) -> scalar`` and ``grad(pred, target) -> dpred``.

    Attributes:
      value: the loss, averaged (see each loss's docstring).
      grad: its hand-derived gradient with respect to ``pred``.
      name: used in error messages and reports.
    """

    value: Callable[[jax.Array, jax.Array], jax.Array]
    grad: Callable[[jax.Array, jax.Array], jax.Array]
    name: str = "loss"


def _check_float(name: str, what: str, a: jax.Array) -> None:
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
        raise DTypeError(name, f"expected floating-point {what}, got {jnp.result_type(a)}")


def _check_same_shape(name: str, pred: jax.Array, target: jax.Array) -> None:
    _check_float(name, "predictions", pred)
    _check_float(name, "targets", target)
    if jnp.shape(pred) != jnp.shape(target):
        raise ShapeError(
            name,
            f"expected targets of the predictions' shape {tuple(jnp.shape(pred))}, "
            f"got {tuple(jnp.shape(target))}",
        )


# --------------------------------------------------------------------------- mse


def _mse_value(pred, target):
    _check_same_shape("mse", pred, target)
    return jnp.mean(jnp.square(pred - target))


def _mse_grad(pred, target):
    _check_same_shape("mse", pred, target)
    return (2 / pred.size) * (pred - target)


mse = Loss(_mse_value, _mse_grad, "mse")
"""Mean squared error over all elements: ``L = mean((pred − target)²)``.

``∂L/∂pred = 2(pred − target) / N`` with ``N`` the number of elements.
Equals ``optax.losses.squared_error(pred, target).mean()``.
"""


# --------------------------------------------------------------------------- softmax CE


def _split_target(name: str, target):
    """``target`` or ``(target, mask)``: the targets and the mask (``None`` without one)."""
    if isinstance(target, tuple | list):
        if len(target) != 2:
            raise ShapeError(
                name,
                f"expected targets, or a pair (targets, mask), got a sequence of {len(target)}",
            )
        return target[0], target[1]
    return target, None


def _class_targets(name: str, logits: jax.Array, target: jax.Array, mask=None) -> jax.Array:
    """Integer labels ``(...)`` or targets ``(..., classes)`` as floats ``(..., classes)``."""
    _check_float(name, "logits", logits)
    if jnp.ndim(logits) < 2:
        raise ShapeError(
            name,
            f"expected logits of shape (batch, ..., classes), got {tuple(jnp.shape(logits))}",
        )
    lead, classes = tuple(logits.shape[:-1]), logits.shape[-1]
    if mask is not None and tuple(jnp.shape(mask)) != lead:
        raise ShapeError(
            name,
            f"expected a mask of shape {lead} (the logits' leading axes) for logits of shape "
            f"{tuple(logits.shape)}, got {tuple(jnp.shape(mask))}",
        )
    target_dtype = jnp.result_type(target)
    if jnp.issubdtype(target_dtype, jnp.integer):
        if tuple(jnp.shape(target)) != lead:
            raise ShapeError(
                name,
                f"expected integer labels of shape {lead} for logits of shape "
                f"{tuple(logits.shape)}, got {tuple(jnp.shape(target))}",
            )
        if mask is None or not isinstance(mask, jax.core.Tracer):
            shown = target if mask is None else np.asarray(target)[np.asarray(mask) != 0]
            check_labels_in_range(name, shown, classes)
        return jax.nn.one_hot(target, classes, dtype=logits.dtype)
    if jnp.issubdtype(target_dtype, jnp.floating):
        if tuple(jnp.shape(target)) != tuple(logits.shape):
            raise ShapeError(
                name,
                f"expected one-hot or probability targets of shape {tuple(logits.shape)}, "
                f"got {tuple(jnp.shape(target))}",
            )
        return target.astype(logits.dtype)
    raise DTypeError(name, f"expected integer labels or float targets, got {target_dtype}")


def check_labels_in_range(name: str, labels, classes: int) -> None:
    """Raise ``RangeError`` if concrete ``labels`` fall outside ``[0, classes)``.

    Under ``jit`` label values are not known at trace time; there an
    out-of-range label has an all-zero one-hot row, and
    :func:`softmax_cross_entropy`'s value becomes NaN so the mistake cannot
    pass silently (:func:`fbp.train.fit` also checks its whole dataset up front).
    """
    if isinstance(labels, jax.core.Tracer):
        return
    labels = np.asarray(labels)  # on the host: inside a jit trace, jnp ops would be staged
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise RangeError(
            name,
            f"labels must lie in [0, {classes}) for {classes} classes, "
            f"got values in [{low}, {high}]",
        )


def _weights(logits, mask):
    """Each position's weight in the mean, ``(...)``, already divided by the count."""
    lead = logits.shape[:-1]
    if mask is None:
        return jnp.full(lead, 1 / math.prod(lead), logits.dtype)
    m = jnp.asarray(mask).astype(logits.dtype)
    return m / jnp.maximum(m.sum(), 1)


def _sce_value(logits, target):
    name = "softmax_cross_entropy"
    target, mask = _split_target(name, target)
    t = _class_targets(name, logits, target, mask)
    # −Σ_c t_c·log softmax(z)_c; log_softmax shifts by max(z) first, so neither
    # large logits nor a tiny loss (lse ≈ z_label) lose precision.
    per_position = -(t * jax.nn.log_softmax(logits, axis=-1)).sum(axis=-1)
    if jnp.issubdtype(jnp.result_type(target), jnp.integer):
        in_range = (target >= 0) & (target < logits.shape[-1])
        if mask is not None:
            in_range = in_range | (jnp.asarray(mask) == 0)
        per_position = jnp.where(in_range, per_position, jnp.nan)
    if mask is None:
        return jnp.mean(per_position)
    w = _weights(logits, mask)
    # A masked position contributes 0 (not 0·NaN if its label is padding).
    return jnp.sum(jnp.where(w != 0, w * per_position, 0))


def _sce_grad(logits, target):
    name = "softmax_cross_entropy"
    target, mask = _split_target(name, target)
    t = _class_targets(name, logits, target, mask)
    # softmax as exp(log_softmax): the same expression as the value's, so when a
    # step computes both, XLA computes the row max and logsumexp once.
    p = jnp.exp(jax.nn.log_softmax(logits, axis=-1))
    # d/dz [Σ_c t_c (logsumexp(z) − z_c)] = softmax(z)·Σ_c t_c − t; Σ_c t_c = 1 for labels.
    w = _weights(logits, mask)[..., None]
    return (p * t.sum(axis=-1, keepdims=True) - t) * w


softmax_cross_entropy = Loss(_sce_value, _sce_grad, "softmax_cross_entropy")
"""Softmax cross-entropy, averaged over the batch (and over positions for sequences).

``L = mean(logsumexp(z) − Σ_c t_c·z_c)`` over every position of logits ``z``
of shape ``(batch, ..., classes)`` — ``(batch, classes)`` for a classifier,
``(batch, T, vocab)`` for a language model — with targets ``t`` given as
integer labels of the leading shape ``(batch, ...)`` or one-hot / probability
rows of the logits' shape. Stable for large logits (logsumexp). The fused
gradient is ``(softmax(z) − t) / N`` with ``N`` the number of positions (for
rows of ``t`` that sum to 1). Equals
``optax.losses.softmax_cross_entropy(z, t).mean()`` and its
``_with_integer_labels`` twin.

Padding: pass the pair ``(t, mask)`` as the target, ``mask`` of the leading
shape (``1``/``True`` where a position counts); then ``L`` is the mean over
the unmasked positions, ``L = Σ m·ℓ / Σ m``, its gradient ``m·(softmax(z) −
t) / Σ m``, and masked labels may hold anything (``-1`` padding included).

Example:
  >>> import jax.numpy as jnp
  >>> z = jnp.zeros((2, 3, 5))                       # (batch, T, vocab)
  >>> labels = jnp.array([[1, 2, 3], [4, 0, -1]])    # the last one is padding
  >>> mask = labels >= 0
  >>> float(softmax_cross_entropy.value(z, (labels, mask)))   # log 5
  1.6094379425048828
  >>> softmax_cross_entropy.grad(z, (labels, mask))[1, 2]
  Array([0., 0., 0., 0., 0.], dtype=float32)
"""


# --------------------------------------------------------------------------- sigmoid BCE


def _bce_value(logits, target):
    _check_same_shape("sigmoid_binary_cross_entropy", logits, target)
    # −t·log σ(z) − (1 − t)·log(1 − σ(z)) = softplus(z) − t·z, computed stably.
    return jnp.mean(jnp.logaddexp(logits, 0) - target * logits)


def _bce_grad(logits, target):
    _check_same_shape("sigmoid_binary_cross_entropy", logits, target)
    return (jax.nn.sigmoid(logits) - target) / logits.size


sigmoid_binary_cross_entropy = Loss(_bce_value, _bce_grad, "sigmoid_binary_cross_entropy")
"""Binary cross-entropy on logits, averaged over all elements.

``L = mean(softplus(z) − t·z)``, stable for large ``|z|``; targets ``t`` in
[0, 1] have the logits' shape. The fused gradient is ``(σ(z) − t) / N``.
Equals ``optax.losses.sigmoid_binary_cross_entropy(z, t).mean()``.
"""
