"""Credit-assignment rules: what a layer with weights sends back instead of its true error.

Backpropagation sends the error at a layer's output, ``dy``, to the layer
below through the layer's own weights (a dense layer: ``dx = dy·Wᵀ``) — which
needs the forward weights in the backward pass ("weight transport"). The
rules here replace that error and nothing else: each layer's own update stays
local (its ``dparams`` from its own backward), and layers without weights
(activations, pooling, normalisation) keep their hand-derived backward.
Select one without touching the model::

    f = fbp.value_and_grad(model, loss, rule=fbp.rules.feedback_alignment(key))

Every layer with weights takes part — dense, conv1d/conv2d, rnn/gru/lstm
(input and recurrent weights), self_attention and a user's own layer: which
params are weights is declared by the layer (``nn.Extensions(weights=...)``),
else every floating-point leaf with two or more axes. Feedback alignment and
sign symmetry run the layer's *own backward* for ``dx`` with each weight
swapped for its feedback matrix (so a GRU's error also travels back through
time by its feedback matrices, and a convolution's through the transposed
convolution of its feedback kernel); direct feedback alignment projects the
output error straight to the layer's input.

A rule is a small immutable NamedTuple with a ``layer_dx(site)`` method
(:class:`fbp.backprop.Rule`); the :class:`fbp.backprop.FeedbackSite` it
receives gives the layer's params, input, cache, ``dy``, the output error and
the numbering of its weights. Write your own the same way.

Fixed random feedback matrices are by default *regenerated inside the step*
from ``fold_in(key, number)``: deterministic, nothing to carry in the optimizer
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

from fbp.backprop import FeedbackSite, feedback_layers
from fbp.errors import ConfigError, ShapeError
from fbp.nn import walk
from fbp.nn.core import Layer

__all__ = [
    "Backprop",
    "DirectFeedbackAlignment",
    "FeedbackAlignment",
    "SignSymmetric",
    "backprop",
    "direct_feedback_alignment",
    "feedback_alignment",
    "feedback_layers",
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


def _fan_in(shape: tuple[int, ...]) -> int:
    """A weight's fan-in in fbp's ``(..., n_in, n_out)`` layouts: all axes but the last."""
    return max(1, math.prod(shape[:-1]))


# --------------------------------------------------------------------------- backprop


class Backprop(NamedTuple):
    """Ordinary backpropagation as a rule: every weight carries the error back as itself.

    ``value_and_grad(..., rule=backprop())`` equals ``rule=None`` (which is
    faster: it calls ``model.backward`` directly). Useful as a reference and as
    a template for your own rules.
    """

    name: str = "backprop"

    def layer_dx(self, site: FeedbackSite) -> jax.Array:
        """The layer's own ``dx`` (dense: ``dy·Wᵀ``)."""
        return site.dx_with(lambda w, number: w)


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
    """The fixed random feedback matrix number ``index``.

    ``B = scale · N(0, 1) / √fan`` drawn from ``fold_in(key, index)``, so it is
    the same at every step and differs between weights (feedback alignment
    numbers the model's weights, direct feedback alignment its layers with
    weights; see :func:`fbp.backprop.feedback_layers`).

    Args:
      key: the rule's key.
      index: the weight's (or layer's) number in the model.
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


def _layer_shapes(where: str, model: Layer, input_shape: Sequence[int], input_dtype: Any):
    """``model``'s layers with weights, its params' shapes and each leaf's input shape."""
    if not isinstance(model, Layer):
        raise ConfigError(where, f"expected a Layer, got {type(model).__name__}")

    def shapes():
        params, _ = model.init(jax.random.key(0), tuple(input_shape))
        inputs: dict[int, Any] = {}

        def on_leaf(site, p, x, y, cache):
            inputs[site.index] = x

        x = jnp.zeros((1, *input_shape), input_dtype)
        pred, _ = walk.forward(model, params, x, on_leaf=on_leaf)
        return params, inputs, pred

    params, inputs, pred = jax.eval_shape(shapes)
    return feedback_layers(model, params), params, inputs, pred


def _stored(rule: Any, index: int, shape: tuple[int, ...], what: str = "weight") -> jax.Array:
    """The precomputed ``B`` number ``index``, checked against the weight (or layer) met now."""
    matrices = rule.matrices
    if index >= len(matrices) or tuple(matrices[index].shape) != shape:
        got = tuple(matrices[index].shape) if index < len(matrices) else "none"
        raise ShapeError(
            f"{rule.name}, {what} {index}",
            f"needs a feedback matrix of shape {shape}, the precomputed one is {got}; "
            "were the matrices precomputed for another model?",
        )
    return matrices[index]


class FeedbackAlignment(NamedTuple):
    """Feedback alignment (Lillicrap et al., 2016): errors travel back through fixed random ``B``.

    Each weight ``W`` of the model has its own ``B`` of ``W``'s shape and
    ``W``'s default distribution (LeCun normal, variance ``scale²/fan_in``,
    ``fan_in`` the product of all axes but the last), drawn from
    ``fold_in(key, number)`` with ``number`` the weight's position in the
    model (:func:`feedback_matrix`). A layer's ``dx`` is its own backward's
    with every weight swapped for its ``B`` — ``dy·Bᵀ`` for a dense layer, the
    transposed convolution with ``B`` for a convolution, backpropagation
    through time by ``B_x`` and ``B_h`` for a recurrent layer — while its
    ``dparams`` stay the true local gradients. The forward weights then learn
    to align with ``B``, so the updates come to point within 90° of the true
    gradient.

    Attributes:
      key: source of every feedback matrix.
      scale: multiplies ``B``.
      name: ``"feedback_alignment"``.
      matrices: ``None`` (draw each ``B`` inside the step), or every weight's
        ``B`` in order, from :meth:`precomputed`.
    """

    key: jax.Array
    scale: float = 1.0
    name: str = "feedback_alignment"
    matrices: tuple[jax.Array, ...] | None = None

    def matrix(self, index: int, w_shape: tuple[int, ...], dtype: Any) -> jax.Array:
        """Weight number ``index``'s ``B`` (shape ``w_shape``): precomputed, or drawn now."""
        shape = tuple(w_shape)
        if self.matrices is not None:
            return _stored(self, index, shape)
        return feedback_matrix(self.key, index, shape, dtype, fan=_fan_in(shape), scale=self.scale)

    def layer_dx(self, site: FeedbackSite) -> jax.Array:
        """The layer's own ``dx`` with each weight replaced by its fixed random ``B``."""
        return site.dx_with(lambda w, number: self.matrix(number, w.shape, w.dtype))

    def precomputed(
        self, model: Layer, input_shape: Sequence[int], *, input_dtype: Any = jnp.float32
    ) -> FeedbackAlignment:
        """The same rule with every ``B`` of ``model`` drawn once and stored in ``matrices``.

        The matrices equal those drawn inside the step, so the updates are
        identical; the step no longer draws normals (on the 784-1024-1024-10
        network that was a third of feedback alignment's step time). The rule
        then belongs to ``model``: another model's weights raise ``ShapeError``.
        ``input_dtype`` is the input's (integer for a model that starts with
        an embedding).
        """
        layers, params, _, _ = _layer_shapes("precomputed", model, input_shape, input_dtype)
        matrices = []
        for layer in layers:
            for path, number in layer.weights:
                w = walk.at_path(walk.at_path(params, layer.site.path), path)
                matrices.append(self.matrix(number, w.shape, w.dtype))
        return self._replace(matrices=tuple(matrices))


def feedback_alignment(key: jax.Array, *, scale: float = 1.0) -> FeedbackAlignment:
    """Feedback alignment: each layer sends its error back through fixed random ``B``.

    Lillicrap, Cownden, Tweed & Akerman (2016), "Random synaptic feedback
    weights support error backpropagation for deep learning", Nature
    Communications 7:13276. See :class:`FeedbackAlignment`.

    Args:
      key: JAX key; the feedback matrices are deterministic functions of it
        and the weight's (or layer's) position.
      scale: multiplies every ``B`` (default: ``W``'s LeCun-normal scale).

    Returns:
      The rule, for ``fbp.value_and_grad(model, loss, rule=...)``.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(16), nn.tanh(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> rule = fbp.rules.feedback_alignment(jax.random.key(1))
      >>> f = jax.jit(fbp.value_and_grad(model, losses.softmax_cross_entropy, rule=rule))
      >>> loss, updates = f(params, jnp.ones((2, 4)), jnp.array([0, 2]))
    """
    _check_key("feedback_alignment", key)
    return FeedbackAlignment(key, _check_scale("feedback_alignment", scale))


class DirectFeedbackAlignment(NamedTuple):
    """Direct feedback alignment (Nøkland, 2016): ``dx = e·Bᵀ`` with ``e = ∂L/∂pred``.

    Every layer with weights sends back the *output* error ``e`` projected
    through its own fixed random ``B`` of shape ``(n_in, classes)``, variance
    ``scale²/classes``, drawn from ``fold_in(key, index)`` with ``index`` the
    layer's position among the layers with weights; the activation below then
    multiplies by its derivative as usual. ``n_in`` and ``classes`` are the
    sizes of one example's input and output, flattened (a convolution's input
    ``(L, C)`` has ``n_in = L·C``). So hidden layer ``l`` learns from
    ``(e·B_{l+1}ᵀ) ⊙ f'(a_l)``, and no error travels through the layers above
    it: the updates of all layers can be computed at once. The last layer,
    whose ``dy`` is ``e`` itself, learns exactly as in backprop.

    Attributes:
      key: source of every feedback matrix.
      scale: multiplies ``B``.
      name: ``"direct_feedback_alignment"``.
      matrices: ``None`` (draw each ``B`` inside the step), or every layer's
        ``B`` in order, from :meth:`precomputed`.
    """

    key: jax.Array
    scale: float = 1.0
    name: str = "direct_feedback_alignment"
    matrices: tuple[jax.Array, ...] | None = None

    def matrix(self, index: int, n_in: int, classes: int, dtype: Any) -> jax.Array:
        """Layer ``index``'s ``(n_in, classes)`` ``B``: precomputed, or drawn now."""
        if self.matrices is not None:
            return _stored(self, index, (n_in, classes), "layer with weights")
        return feedback_matrix(
            self.key, index, (n_in, classes), dtype, fan=classes, scale=self.scale
        )

    def precomputed(
        self, model: Layer, input_shape: Sequence[int], *, input_dtype: Any = jnp.float32
    ) -> DirectFeedbackAlignment:
        """The same rule with every ``B`` of ``model`` drawn once and stored in ``matrices``.

        See :meth:`FeedbackAlignment.precomputed`.
        """
        layers, params, inputs, pred = _layer_shapes("precomputed", model, input_shape, input_dtype)
        classes = math.prod(pred.shape[1:])
        matrices = []
        for layer in layers:
            x = inputs[layer.site.index]
            w = walk.at_path(walk.at_path(params, layer.site.path), layer.weights[0][0])
            matrices.append(self.matrix(layer.index, math.prod(x.shape[1:]), classes, w.dtype))
        return self._replace(matrices=tuple(matrices))

    def layer_dx(self, site: FeedbackSite) -> jax.Array:
        """``e·Bᵀ`` with ``e`` the output error and ``B`` the layer's ``(n_in, classes)`` matrix."""
        x, e = site.visit.x, site.output_error
        w = walk.at_path(site.visit.params, site.layer.weights[0][0])
        batch = x.shape[0]
        e2 = e.reshape(batch, -1).astype(w.dtype)
        n_in = math.prod(x.shape[1:])
        b = self.matrix(site.layer.index, n_in, e2.shape[1], w.dtype).astype(w.dtype)
        dx = jax.lax.dot_general(e2, b, (((1,), (1,)), ((), ())))  # e·Bᵀ
        return dx.reshape(x.shape)


def direct_feedback_alignment(key: jax.Array, *, scale: float = 1.0) -> DirectFeedbackAlignment:
    """Direct feedback alignment: the output error goes straight to every hidden layer.

    Nøkland (2016), "Direct Feedback Alignment Provides Learning in Deep Neural
    Networks", NeurIPS. See :class:`DirectFeedbackAlignment`.

    Args:
      key: JAX key; the feedback matrices are deterministic functions of it
        and the weight's (or layer's) position.
      scale: multiplies every ``B``.

    Returns:
      The rule, for ``fbp.value_and_grad(model, loss, rule=...)``.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(16), nn.tanh(), nn.dense(16), nn.tanh(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> rule = fbp.rules.direct_feedback_alignment(jax.random.key(1))
      >>> updates = jax.jit(fbp.grad(model, losses.softmax_cross_entropy, rule=rule))(
      ...     params, jnp.ones((2, 4)), jnp.array([0, 2]))
    """
    _check_key("direct_feedback_alignment", key)
    return DirectFeedbackAlignment(key, _check_scale("direct_feedback_alignment", scale))


# --------------------------------------------------------------------------- sign symmetry


class SignSymmetric(NamedTuple):
    """Sign-symmetric feedback (Liao, Leibo & Poggio, 2016): errors travel back through ``sign(W)``.

    Each weight ``W`` is replaced in the layer's backward by
    ``sign(W)·mean|W|`` (dense: ``dx = dy·(sign(W)·mean|W|)ᵀ``): the feedback
    shares only the signs of the forward weights, not their magnitudes; the
    common magnitude ``mean|W|`` (per weight, treated as a constant) keeps the
    error's scale close to backprop's. No randomness.

    Attributes:
      name: ``"sign_symmetric"``.
    """

    name: str = "sign_symmetric"

    def layer_dx(self, site: FeedbackSite) -> jax.Array:
        """The layer's own ``dx`` with each weight ``W`` replaced by ``sign(W)·mean|W|``."""

        def signs(w, number):
            del number
            w = jax.lax.stop_gradient(w)
            return jnp.sign(w) * jnp.mean(jnp.abs(w))

        return site.dx_with(signs)


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
