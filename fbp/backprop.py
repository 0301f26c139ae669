"""The backpropagation driver: forward, loss gradient, backward — no autodiff.

:func:`value_and_grad` is the whole algorithm in four lines: run the model
forward keeping each layer's cache, evaluate the loss, seed the backward pass
with the loss's hand-derived gradient, and let ``model.backward`` carry it
right to left. Nothing here calls ``jax.grad`` or ``jax.vjp``.

Because the backward pass is explicit, it can be changed: ``rule=`` runs a
different credit-assignment rule (feedback alignment and friends, see
:mod:`fbp.rules`) through the same model, and :func:`to_jax` goes the other
way, handing fbp's hand-derived rules to ``jax.grad`` through
``jax.custom_vjp`` so an fbp model composes with any JAX code.

With a rule, the model is run by the one walker (:mod:`fbp.nn.walk`), which
hands each leaf layer its params, input, cache and output gradient: every layer
with weights — dense, convolution, recurrent, attention, a user's own — sends
the rule's error below it; the others run their own backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError, ShapeError
from fbp.losses import Loss
from fbp.nn import walk
from fbp.nn.core import Layer
from fbp.nn.walk import Site, Visit

__all__ = [
    "FeedbackLayer",
    "FeedbackSite",
    "Rule",
    "feedback_layers",
    "grad",
    "to_jax",
    "value_and_grad",
    "value_grad_and_cache",
]

Params = Any
Path = tuple[Any, ...]


class FeedbackLayer(NamedTuple):
    """A layer with weights, as credit-assignment rules number it.

    Attributes:
      site: where the layer sits (:class:`fbp.nn.walk.Site`).
      index: its position among the model's layers with weights (forward order).
      weights: ``(path, number)`` per weight the rule replaces: the path inside
        the layer's params (``("w",)``) and the weight's position among all the
        model's weights (forward order; a dense-only model numbers its weights
        as its layers).
    """

    site: Site
    index: int
    weights: tuple[tuple[Path, int], ...]


class FeedbackSite(NamedTuple):
    """What a rule sees at one layer with weights during the backward pass.

    Attributes:
      visit: the layer's :class:`fbp.nn.walk.Visit` (params, input ``x``, cache,
        output gradient ``dy``); ``visit.backward(params)`` runs the layer's own
        backward with other params, e.g. feedback matrices in place of weights.
      layer: the :class:`FeedbackLayer` (its index and weights).
      output_error: ``∂L/∂pred``, the error at the model's output.
    """

    visit: Visit
    layer: FeedbackLayer
    output_error: jax.Array

    def dx_with(self, replace: Callable[[jax.Array, int], jax.Array]) -> jax.Array:
        """The layer's own ``dx`` with each weight ``W`` (number ``i``) set to ``replace(W, i)``.

        Only ``dx`` is read: the layer's ``dparams`` stay the true local ones.
        """
        visit, paths = self.visit, [path for path, _ in self.layer.weights]

        def dx_for(*weights):
            params = visit.params
            for path, w in zip(paths, weights, strict=True):
                params = walk.replace_at(params, path, w)
            return visit.backward(params)[1]

        weights = [walk.at_path(visit.params, path) for path in paths]
        ignored = [
            p for p, read in zip(paths, walk.reads(dx_for, *weights), strict=True) if not read
        ]
        if ignored:
            raise ConfigError(
                visit.layer.name,
                f"its backward computes dx without reading the weights {ignored} it is given, "
                "so a feedback rule cannot replace them; a backward must use the params passed "
                "to it (or the layer must declare nn.Extensions(weights=...) without them)",
            )
        swapped = [
            replace(w, number).astype(w.dtype)
            for w, (_, number) in zip(weights, self.layer.weights, strict=True)
        ]
        return dx_for(*swapped)


class Rule(Protocol):
    """What ``value_and_grad(..., rule=)`` needs of a credit-assignment rule.

    Backpropagation sends the error at a layer's output back through the
    layer's own weights (dense: ``dx = dy·Wᵀ``). A rule replaces the error
    each layer *with weights* sends to the layer below with ``layer_dx(site)``;
    every layer's own gradient stays local (its ``dparams`` from its own
    backward), and layers without weights keep their backward. Which params
    are weights is declared by the layer (``Extensions.weights``), else every
    floating-point leaf with two or more axes. See :mod:`fbp.rules`.
    """

    name: str

    def layer_dx(self, site: FeedbackSite) -> jax.Array:
        """The error sent below the layer at ``site``: an array of its input's shape."""
        ...


def feedback_layers(model: Layer, params: Params) -> tuple[FeedbackLayer, ...]:
    """The layers of ``model`` with weights, in forward order, numbered as rules number them.

    Args:
      model: the network.
      params: its params, or their shapes (``jax.eval_shape`` of ``init``).

    Example:
      >>> import jax, fbp
      >>> from fbp import nn
      >>> model = nn.serial(nn.conv1d(4, 3), nn.relu(), nn.flatten(), nn.dense(2))
      >>> params = jax.eval_shape(lambda: model.init(jax.random.key(0), (10, 1))[0])  # shapes do
      >>> [(f.site.label, f.weights) for f in fbp.backprop.feedback_layers(model, params)]
      [('0', ((('w',), 0),)), ('3', ((('w',), 1),))]
    """
    out: list[FeedbackLayer] = []
    count = 0
    for site in walk.leaves(model):
        paths = walk.feedback_weights(site, walk.at_path(params, site.path))
        if paths:
            numbered = tuple((path, count + i) for i, path in enumerate(paths))
            out.append(FeedbackLayer(site, len(out), numbered))
            count += len(paths)
    return tuple(out)


def _check(model: Layer, loss: Loss, where: str = "value_and_grad") -> None:
    if not isinstance(model, Layer):
        raise ConfigError(where, f"model must be a Layer, got {type(model).__name__}")
    if not isinstance(loss, Loss):
        raise ConfigError(where, f"loss must be a Loss, got {type(loss).__name__}")


def value_and_grad(
    model: Layer, loss: Loss, *, rule: Rule | None = None
) -> Callable[..., tuple[jax.Array, Params]]:
    """Build ``f(params, x, y, *, key=None, train=True) -> (loss_value, grads)``.

    ``grads`` has the structure, shapes and dtypes of ``params`` and is computed
    by the layers' hand-written backward rules. ``key`` and ``train`` are passed
    to every layer's forward (``train=True`` by default: gradients are for
    training, so dropout and batch statistics are on). ``f`` is pure and
    jit-able.

    Args:
      model: the network.
      loss: its loss.
      rule: ``None`` (the default) is ordinary backpropagation, exactly
        ``model.backward`` with no overhead. Otherwise a credit-assignment rule
        from :mod:`fbp.rules` (e.g. ``fbp.rules.feedback_alignment(key)``):
        the model is walked (:mod:`fbp.nn.walk`) and every layer with weights
        sends ``rule.layer_dx(...)`` to the layer below instead of its true
        ``dx``; the result is then an *update direction*, not the gradient of
        the loss.

    Returns:
      ``f(params, x, y, *, key=None, train=True) -> (loss_value, grads)``.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(8), nn.tanh(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> x, labels = jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1])
      >>> f = jax.jit(fbp.value_and_grad(model, losses.softmax_cross_entropy))
      >>> value, grads = f(params, x, labels)
      >>> grads[0]["w"].shape
      (4, 8)
      >>> fa = fbp.rules.feedback_alignment(jax.random.key(1))
      >>> _, updates = jax.jit(fbp.value_and_grad(model, losses.softmax_cross_entropy, rule=fa))(
      ...     params, x, labels)
    """
    value_grad_cache = value_grad_and_cache(model, loss, rule=rule)

    def value_and_grad_fn(params, x, y, *, key=None, train=True):
        value, grads, _ = value_grad_cache(params, x, y, key=key, train=train)
        return value, grads

    return value_and_grad_fn


def value_grad_and_cache(
    model: Layer, loss: Loss, *, rule: Rule | None = None
) -> Callable[..., tuple[jax.Array, Params, Any]]:
    """Like :func:`value_and_grad`, also returning the forward pass's cache.

    ``f(params, x, y, *, key=None, train=True) -> (loss_value, grads, cache)``.
    The cache is what the training step needs besides the gradient, e.g. the
    batch statistics that :func:`fbp.nn.update_batch_stats` folds into a
    batch-norm layer's running statistics. Under ``jit`` an unused cache costs
    nothing.
    """
    _check(model, loss)
    if rule is not None:
        return _value_grad_and_cache_with_rule(model, loss, rule)

    def value_grad_cache_fn(params, x, y, *, key=None, train=True):
        # The walker runs exactly model.forward and model.backward, and checks at
        # trace time that every layer's dparams mirror its params and its dx its
        # input (free at run time: the program is the same).
        pred, tape = walk.forward(model, params, x, key=key, train=train)
        value = loss.value(pred, y)
        dpred = loss.grad(pred, y)
        grads, _ = walk.backward(model, params, tape, dpred, walk.checked_backward, train=train)
        return value, grads, walk.untape(model, tape)

    return value_grad_cache_fn


def grad(model: Layer, loss: Loss, *, rule: Rule | None = None) -> Callable[..., Params]:
    """Like :func:`value_and_grad`, returning the gradients (or the rule's updates) alone.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (2,))
      >>> grads = jax.jit(fbp.grad(model, losses.mse))(params, jnp.ones((4, 2)), jnp.zeros((4, 3)))
    """
    f = value_and_grad(model, loss, rule=rule)

    def grad_fn(params, x, y, *, key=None, train=True):
        return f(params, x, y, key=key, train=train)[1]

    return grad_fn


# --------------------------------------------------------------------------- rules


def _value_grad_and_cache_with_rule(model: Layer, loss: Loss, rule: Rule):
    if not callable(getattr(rule, "layer_dx", None)):
        raise ConfigError(
            "value_and_grad",
            f"rule must have a layer_dx method (see fbp.rules), got {type(rule).__name__}",
        )

    def value_and_grad_fn(params, x, y, *, key=None, train=True):
        pred, tape = walk.forward(model, params, x, key=key, train=train)
        value = loss.value(pred, y)
        dpred = loss.grad(pred, y)
        hook = rule_backward(rule, feedback_layers(model, params), dpred)
        grads, _ = walk.backward(model, params, tape, dpred, hook, train=train)
        return value, grads, walk.untape(model, tape)

    return value_and_grad_fn


def rule_backward(
    rule: Rule, layers: tuple[FeedbackLayer, ...], output_error: jax.Array
) -> Callable[[Visit], tuple[Params, jax.Array]]:
    """A :func:`fbp.nn.walk.backward` hook: ``rule`` at layers with weights, backward elsewhere."""
    by_index = {f.site.index: f for f in layers}

    def leaf(visit: Visit):
        layer = by_index.get(visit.site.index)
        if layer is None or not jnp.issubdtype(jnp.result_type(visit.x), jnp.floating):
            return visit.backward()  # no weights, or no error flows into integer ids
        dparams, dx_true = visit.backward()  # the layer's own gradient stays local
        walk.check_backward(visit, dparams, dx_true)
        dx = rule.layer_dx(FeedbackSite(visit, layer, output_error))
        if jnp.shape(dx) != jnp.shape(visit.x):
            raise ShapeError(
                f"{visit.layer.name} ({rule.name})",
                f"the rule's dx has shape {jnp.shape(dx)}, the layer's input {jnp.shape(visit.x)}",
            )
        return dparams, dx.astype(visit.x.dtype)

    return leaf


# --------------------------------------------------------------------------- to_jax


def to_jax(model: Layer, loss: Loss | None = None) -> Callable[..., jax.Array]:
    """The model (or model + loss) as a JAX function whose derivatives are fbp's rules.

    Wraps the forward in ``jax.custom_vjp`` whose backward is ``model.backward``
    (and ``loss.grad``), so ``jax.grad``, ``jax.vjp`` and everything built on
    them (``jax.value_and_grad``, optax's helpers, your own code) differentiate
    through fbp's hand-derived rules instead of tracing the forward. The result
    composes with any JAX code and with ``jax.jit`` and ``jax.vmap``. Reverse
    mode only: ``jax.jvp`` (and so ``jax.hessian``) is not available through a
    ``custom_vjp``.

    Args:
      model: the network.
      loss: optional. Without it the function is ``apply(params, x, *,
        key=None, train=False) -> y``, differentiable in ``params`` and ``x``.
        With it, ``objective(params, x, y, *, key=None, train=True) -> scalar``,
        so ``jax.grad(to_jax(model, loss))`` equals ``fbp.grad(model, loss)``.
        The targets ``y`` are constants: their cotangent is zero.

    Returns:
      The wrapped function.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(8), nn.relu(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> apply = fbp.backprop.to_jax(model)
      >>> x, labels = jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1])
      >>> objective = lambda p: losses.softmax_cross_entropy.value(apply(p, x), labels)
      >>> grads = jax.jit(jax.grad(objective))(params)    # fbp's backward, via custom_vjp
      >>> grads2 = jax.jit(jax.grad(fbp.backprop.to_jax(model, losses.softmax_cross_entropy)))(
      ...     params, x, labels)
    """
    if not isinstance(model, Layer):
        raise ConfigError("to_jax", f"model must be a Layer, got {type(model).__name__}")
    if loss is not None and not isinstance(loss, Loss):
        raise ConfigError("to_jax", f"loss must be a Loss, got {type(loss).__name__}")

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def _apply(train, params, x, key):
        return model.forward(params, x, key=key, train=train)[0]

    def _apply_fwd(train, params, x, key):
        y, cache = model.forward(params, x, key=key, train=train)
        return y, (params, cache)

    def _apply_bwd(train, residuals, dy):
        params, cache = residuals
        dparams, dx = model.backward(params, cache, dy)
        return dparams, dx, None

    _apply.defvjp(_apply_fwd, _apply_bwd)

    if loss is None:

        def apply(params, x, *, key=None, train=False):
            return _apply(train, params, x, key)

        apply.__doc__ = f"{model.name} as a JAX function; jax.grad uses fbp's backward."
        return apply

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def _objective(train, params, x, y, key):
        return loss.value(model.forward(params, x, key=key, train=train)[0], y)

    def _objective_fwd(train, params, x, y, key):
        pred, cache = model.forward(params, x, key=key, train=train)
        return loss.value(pred, y), (params, cache, loss.grad(pred, y), y)

    def _objective_bwd(train, residuals, dvalue):
        params, cache, dpred, y = residuals
        dparams, dx = model.backward(params, cache, dvalue * dpred)
        return dparams, dx, _zero_cotangent(y), None

    _objective.defvjp(_objective_fwd, _objective_bwd)

    def objective(params, x, y, *, key=None, train=True):
        return _objective(train, params, x, y, key)

    objective.__doc__ = f"{loss.name} of {model.name}; jax.grad uses fbp's backward."
    return objective


def _zero_cotangent(y: jax.Array):
    """The cotangent of the targets: fbp's losses do not differentiate them (zeros / float0)."""
    if jnp.issubdtype(jnp.result_type(y), jnp.inexact):
        return jnp.zeros_like(y)
    return None
