"""Credit-assignment rules: what a dense layer sends back instead of ``dy·Wᵀ``.

Backpropagation sends the error at a dense layer's output, ``dy``, to the
layer below as ``dx = dy·Wᵀ`` — which needs the forward weights in the
backward pass ("weight transport"). The rules here replace that one product
and nothing else: each dense layer's own update stays local (``dW = xᵀ·dy``,
``db = Σ_batch dy``), activations and every other layer keep their
hand-derived backward. Select one without touching the model::

    f = fbp.value_and_grad(model, loss, rule=fbp.rules.feedback_alignment(key))

A rule is a small immutable NamedTuple with a ``dense_dx(w, dy, *, index,
output_error)`` method (:class:`fbp.backprop.Rule`); ``index`` is the dense
layer's position in the model (forward order, nested ``serial`` and
``residual`` walked into). Write your own the same way.

Fixed random feedback matrices are by default *regenerated inside the step*
from ``fold_in(key, index)``: deterministic, nothing to carry in the optimizer
state or checkpoint, and the rule stays a small value that can be built
before the params exist. The price is drawing the normals every step:
measured on 2 CPU cores, a 784-1024-1024-10 network at batch 256, feedback
alignment's gradient took 16.8 ms against backprop's 11.3 ms (its ``B`` have
the weights' sizes); direct feedback alignment's ``B`` are only
``n_in × classes`` and its step (9.7 ms) was no slower than backprop's, as the
error skips the layer-to-layer products. ``rule.precomputed(model,
input_shape)`` draws the same matrices once and carries them in the rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.backprop import is_dense, is_residual, is_serial
from fbp.errors import ConfigError, ShapeError
from fbp.nn.core import Layer

__all__ = [
    "Backprop",
    "DirectFeedbackAlignment",
    "FeedbackAlignment",
    "SignSymmetric",
    "backprop",
    "direct_feedback_alignment",
    "feedback_alignment",
    "feedback_matrix",
    "sign_symmetric",
]


def _check_key(where: str, key) -> None:
    if not isinstance(key, jax.Array):
        raise ConfigError(where, f"key must be a JAX key, e.g. jax.random.key(0), got {key!r}")


def _check_scale(where: str, scale) -> float:
    scale = float(scale)
    if not scale > 0:
        raise ConfigError(where, f"scale must be positive, got {scale}")
    return scale


def _dot_transposed(dy: jax.Array, b: jax.Array) -> jax.Array:
    """``dy·Bᵀ`` over the last axis of ``dy``: ``(..., n_out) × (n_in, n_out) -> (..., n_in)``."""
    return jax.lax.dot_general(dy, b, (((dy.ndim - 1,), (1,)), ((), ())))


# --------------------------------------------------------------------------- backprop


class Backprop(NamedTuple):
    """Ordinary backpropagation as a rule: ``dx = dy·Wᵀ``.

    ``value_and_grad(..., rule=backprop())`` equals ``rule=None`` (which is
    faster: it calls ``model.backward`` directly). Useful as a reference and as
    a template for your own rules.
    """

    name: str = "backprop"

    def dense_dx(self, w, dy, *, index, output_error):
        """``dy·Wᵀ``."""
        del index, output_error
        return _dot_transposed(dy, w)


def backprop() -> Backprop:
    """The identity rule, ordinary backpropagation (see :class:`Backprop`).

    Example:
      >>> import fbp
      >>> fbp.rules.backprop().name
      'backprop'
    """
    return Backprop()


# --------------------------------------------------------------------------- feedback alignment


def feedback_matrix(
    key: jax.Array, index: int, shape: tuple[int, ...], dtype, fan: int, scale: float = 1.0
) -> jax.Array:
    """The fixed random feedback matrix of dense layer ``index``.

    ``B = scale · N(0, 1) / √fan`` drawn from ``fold_in(key, index)``, so it is
    the same at every step and differs between layers.

    Args:
      key: the rule's key.
      index: the dense layer's position in the model.
      shape: ``B``'s shape.
      dtype: ``B``'s dtype (the weight's).
      fan: the variance divisor.
      scale: multiplies ``B``.

    Returns:
      ``B``.

    Example:
      >>> import jax, fbp
      >>> fbp.rules.feedback_matrix(jax.random.key(0), 1, (4, 3), "float32", fan=4).shape
      (4, 3)
    """
    b = jax.random.normal(jax.random.fold_in(key, index), shape, dtype)
    return b * jnp.asarray(scale / math.sqrt(fan), dtype)


def _dense_weight_shapes(model: Layer, input_shape: Sequence[int]) -> list[Any]:
    """Shapes and dtypes of ``model``'s dense weights, in the order rules index them."""
    if not isinstance(model, Layer):
        raise ConfigError("precomputed", f"expected a Layer, got {type(model).__name__}")
    params, _ = jax.eval_shape(lambda: model.init(jax.random.key(0), tuple(input_shape)))
    out: list[Any] = []

    def walk(layer: Layer, p: Any) -> None:
        if is_serial(layer):
            for child, child_params in zip(layer.children, p, strict=True):
                walk(child, child_params)
        elif is_residual(layer):
            walk(layer.children[0], p)
        elif is_dense(layer):
            out.append(p["w"])

    walk(model, params)
    return out


def _stored(rule: Any, index: int, shape: tuple[int, ...]) -> jax.Array:
    """The precomputed ``B`` of dense layer ``index``, checked against the layer met now."""
    matrices = rule.matrices
    if index >= len(matrices) or tuple(matrices[index].shape) != shape:
        got = tuple(matrices[index].shape) if index < len(matrices) else "none"
        raise ShapeError(
            f"{rule.name} (dense layer {index})",
            f"needs a feedback matrix of shape {shape}, the precomputed one is {got}; "
            "were the matrices precomputed for another model?",
        )
    return matrices[index]


class FeedbackAlignment(NamedTuple):
    """Feedback alignment (Lillicrap et al., 2016): ``dx = dy·Bᵀ``, ``B`` fixed and random.

    ``B`` has ``W``'s shape ``(n_in, n_out)`` and ``W``'s default distribution
    (LeCun normal, variance ``scale²/n_in``), drawn from ``fold_in(key, index)``
    (see :func:`feedback_matrix`). The forward weights then learn to align
    with ``B``, so the updates come to point within 90° of the true gradient.

    Attributes:
      key: source of every feedback matrix.
      scale: multiplies ``B``.
      name: ``"feedback_alignment"``.
      matrices: ``None`` (draw each ``B`` inside the step), or every dense
        layer's ``B`` in order, from :meth:`precomputed`.
    """

    key: jax.Array
    scale: float = 1.0
    name: str = "feedback_alignment"
    matrices: tuple[jax.Array, ...] | None = None

    def matrix(self, index: int, w_shape: tuple[int, ...], dtype: Any) -> jax.Array:
        """Dense layer ``index``'s ``B`` (shape ``w_shape``): precomputed, or drawn now."""
        shape = tuple(w_shape)
        if self.matrices is not None:
            return _stored(self, index, shape)
        return feedback_matrix(self.key, index, shape, dtype, fan=shape[0], scale=self.scale)

    def dense_dx(self, w, dy, *, index, output_error):
        """``dy·Bᵀ`` with ``B`` the layer's fixed random matrix."""
        del output_error
        return _dot_transposed(dy, self.matrix(index, w.shape, w.dtype).astype(w.dtype))

    def precomputed(self, model: Layer, input_shape: Sequence[int]) -> FeedbackAlignment:
        """The same rule with every ``B`` of ``model`` drawn once and stored in ``matrices``.

        The matrices equal those drawn inside the step, so the updates are
        identical; the step no longer draws normals (on the 784-1024-1024-10
        network that was a third of feedback alignment's step time). The rule
        then belongs to ``model``: another model's layers raise ``ShapeError``.
        """
        weights = _dense_weight_shapes(model, input_shape)
        return self._replace(
            matrices=tuple(self.matrix(i, w.shape, w.dtype) for i, w in enumerate(weights))
        )


def feedback_alignment(key: jax.Array, *, scale: float = 1.0) -> FeedbackAlignment:
    """Feedback alignment: each dense layer sends its error back through a fixed random ``B``.

    Lillicrap, Cownden, Tweed & Akerman (2016), "Random synaptic feedback
    weights support error backpropagation for deep learning", Nature
    Communications 7:13276. See :class:`FeedbackAlignment`.

    Args:
      key: JAX key; the feedback matrices are deterministic functions of it
        and the dense layer's position.
      scale: multiplies every ``B`` (default: ``W``'s LeCun-normal scale).

    Returns:
      The rule, for ``fbp.value_and_grad(model, loss, rule=...)``.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(16), nn.tanh(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> rule = fbp.rules.feedback_alignment(jax.random.key(1))
      >>> f = fbp.value_and_grad(model, losses.softmax_cross_entropy, rule=rule)
      >>> loss, updates = f(params, jnp.ones((2, 4)), jnp.array([0, 2]))
    """
    _check_key("feedback_alignment", key)
    return FeedbackAlignment(key, _check_scale("feedback_alignment", scale))


class DirectFeedbackAlignment(NamedTuple):
    """Direct feedback alignment (Nøkland, 2016): ``dx = e·Bᵀ`` with ``e = ∂L/∂pred``.

    Every dense layer sends back the *output* error ``e`` (batch, classes)
    projected through its own fixed random ``B`` of shape ``(n_in, classes)``,
    variance ``scale²/classes``, drawn from ``fold_in(key, index)``; the
    activation below then multiplies by its derivative as usual. So hidden
    layer ``l`` learns from ``(e·B_{l+1}ᵀ) ⊙ f'(a_l)``, and no error travels
    through the layers above it: the updates of all layers can be computed at
    once. The last dense layer, whose ``dy`` is ``e`` itself, learns exactly
    as in backprop.

    Requires 2-D errors: the model's output and each dense layer's output must
    be ``(batch, features)`` (no sequence axes).

    Attributes:
      key: source of every feedback matrix.
      scale: multiplies ``B``.
      name: ``"direct_feedback_alignment"``.
      matrices: ``None`` (draw each ``B`` inside the step), or every dense
        layer's ``B`` in order, from :meth:`precomputed`.
    """

    key: jax.Array
    scale: float = 1.0
    name: str = "direct_feedback_alignment"
    matrices: tuple[jax.Array, ...] | None = None

    def matrix(self, index: int, n_in: int, classes: int, dtype: Any) -> jax.Array:
        """Dense layer ``index``'s ``(n_in, classes)`` ``B``: precomputed, or drawn now."""
        if self.matrices is not None:
            return _stored(self, index, (n_in, classes))
        return feedback_matrix(
            self.key, index, (n_in, classes), dtype, fan=classes, scale=self.scale
        )

    def precomputed(self, model: Layer, input_shape: Sequence[int]) -> DirectFeedbackAlignment:
        """The same rule with every ``B`` of ``model`` drawn once and stored in ``matrices``.

        See :meth:`FeedbackAlignment.precomputed`; ``classes`` is the model's
        output width.
        """
        weights = _dense_weight_shapes(model, input_shape)
        classes = weights[-1].shape[-1] if weights else 0
        return self._replace(
            matrices=tuple(
                self.matrix(i, w.shape[0], classes, w.dtype) for i, w in enumerate(weights)
            )
        )

    def dense_dx(self, w, dy, *, index, output_error):
        """``e·Bᵀ`` with ``e`` the output error and ``B`` the layer's ``(n_in, classes)`` matrix."""
        n_in, n_out = w.shape
        if output_error.ndim != 2 or dy.ndim != 2:
            raise ShapeError(
                f"dense {n_in}→{n_out} (direct_feedback_alignment)",
                "needs (batch, features) errors at the model output and at every dense "
                f"layer, got output error {tuple(output_error.shape)} and dy "
                f"{tuple(dy.shape)}; use feedback_alignment for sequence models",
            )
        b = self.matrix(index, n_in, output_error.shape[1], w.dtype).astype(w.dtype)
        return _dot_transposed(output_error.astype(w.dtype), b)


def direct_feedback_alignment(key: jax.Array, *, scale: float = 1.0) -> DirectFeedbackAlignment:
    """Direct feedback alignment: the output error goes straight to every hidden layer.

    Nøkland (2016), "Direct Feedback Alignment Provides Learning in Deep Neural
    Networks", NeurIPS. See :class:`DirectFeedbackAlignment`.

    Args:
      key: JAX key; the feedback matrices are deterministic functions of it
        and the dense layer's position.
      scale: multiplies every ``B``.

    Returns:
      The rule, for ``fbp.value_and_grad(model, loss, rule=...)``.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(16), nn.tanh(), nn.dense(16), nn.tanh(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> rule = fbp.rules.direct_feedback_alignment(jax.random.key(1))
      >>> updates = fbp.grad(model, losses.softmax_cross_entropy, rule=rule)(
      ...     params, jnp.ones((2, 4)), jnp.array([0, 2]))
    """
    _check_key("direct_feedback_alignment", key)
    return DirectFeedbackAlignment(key, _check_scale("direct_feedback_alignment", scale))


# --------------------------------------------------------------------------- sign symmetry


class SignSymmetric(NamedTuple):
    """Sign-symmetric feedback (Liao, Leibo & Poggio, 2016): ``dx = dy·(sign(W)·mean|W|)ᵀ``.

    The feedback shares only the signs of the forward weights, not their
    magnitudes; the common magnitude ``mean|W|`` (per layer, treated as a
    constant) keeps the error's scale close to backprop's. No randomness.

    Attributes:
      name: ``"sign_symmetric"``.
    """

    name: str = "sign_symmetric"

    def dense_dx(self, w, dy, *, index, output_error):
        """``dy·(sign(W)·mean|W|)ᵀ``."""
        del index, output_error
        w = jax.lax.stop_gradient(w)
        return _dot_transposed(dy, jnp.sign(w) * jnp.mean(jnp.abs(w)))


def sign_symmetric() -> SignSymmetric:
    """Sign-symmetric feedback: the error travels back through ``sign(W)``.

    See :class:`SignSymmetric`.

    Liao, Leibo & Poggio (2016), "How Important Is Weight Symmetry in
    Backpropagation?", AAAI.

    Returns:
      The rule, for ``fbp.value_and_grad(model, loss, rule=...)``.

    Example:
      >>> import fbp
      >>> fbp.rules.sign_symmetric().name
      'sign_symmetric'
    """
    return SignSymmetric()
