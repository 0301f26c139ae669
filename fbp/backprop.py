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

The private walkers at the bottom (:func:`walk_forward`, :func:`walk_backward`)
run a model exactly as ``serial`` and ``residual`` do, but call a hook at each
leaf layer; :mod:`fbp.rules` and :mod:`fbp.diagnostics` are built on them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError, ShapeError, at_layer
from fbp.losses import Loss
from fbp.nn.core import Layer

__all__ = ["Rule", "grad", "to_jax", "value_and_grad", "value_grad_and_cache"]

Params = Any
Path = tuple[int, ...]


class Rule(Protocol):
    """What ``value_and_grad(..., rule=)`` needs of a credit-assignment rule.

    A rule replaces the error a dense layer sends back to the layer below:
    ordinary backprop sends ``dx = dy·Wᵀ``; a rule sends ``dense_dx(...)``
    instead. Each dense layer's own gradient stays local (``dW = xᵀ·dy``,
    ``db = Σ dy``), and every other layer's backward is left untouched. See
    :mod:`fbp.rules` for the built-in rules.
    """

    name: str

    def dense_dx(
        self, w: jax.Array, dy: jax.Array, *, index: int, output_error: jax.Array
    ) -> jax.Array:
        """The error sent below a dense layer with weight ``w`` of shape ``(n_in, n_out)``.

        Args:
          w: the layer's weight.
          dy: the error arriving at the layer's output, ``(batch, ..., n_out)``.
          index: the layer's position among the model's dense layers (forward order).
          output_error: ``∂L/∂pred``, the error at the model's output.

        Returns:
          ``dx`` of shape ``(batch, ..., n_in)``.
        """
        ...


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
        the model is walked through its ``serial``/``residual`` structure and
        each dense layer sends ``rule.dense_dx(...)`` to the layer below
        instead of ``dy·Wᵀ``; the result is then an *update direction*, not the
        gradient of the loss.

    Returns:
      ``f(params, x, y, *, key=None, train=True) -> (loss_value, grads)``.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(8), nn.tanh(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> x, labels = jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1])
      >>> value, grads = fbp.value_and_grad(model, losses.softmax_cross_entropy)(params, x, labels)
      >>> grads[0]["w"].shape
      (4, 8)
      >>> fa = fbp.rules.feedback_alignment(jax.random.key(1))
      >>> _, updates = fbp.value_and_grad(model, losses.softmax_cross_entropy, rule=fa)(
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
        pred, cache = model.forward(params, x, key=key, train=train)
        value = loss.value(pred, y)
        dpred = loss.grad(pred, y)
        grads, _ = model.backward(params, cache, dpred)
        return value, grads, cache

    return value_grad_cache_fn


def grad(model: Layer, loss: Loss, *, rule: Rule | None = None) -> Callable[..., Params]:
    """Like :func:`value_and_grad`, returning the gradients (or the rule's updates) alone.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (2,))
      >>> grads = fbp.grad(model, losses.mse)(params, jnp.ones((4, 2)), jnp.zeros((4, 3)))
    """
    f = value_and_grad(model, loss, rule=rule)

    def grad_fn(params, x, y, *, key=None, train=True):
        return f(params, x, y, key=key, train=train)[1]

    return grad_fn


# --------------------------------------------------------------------------- rules


def _value_grad_and_cache_with_rule(model: Layer, loss: Loss, rule: Rule):
    if not callable(getattr(rule, "dense_dx", None)):
        raise ConfigError(
            "value_and_grad",
            f"rule must have a dense_dx method (see fbp.rules), got {type(rule).__name__}",
        )
    dense_index = {path: i for i, (path, _) in enumerate(dense_layers(model))}

    def value_and_grad_fn(params, x, y, *, key=None, train=True):
        pred, cache = model.forward(params, x, key=key, train=train)
        value = loss.value(pred, y)
        dpred = loss.grad(pred, y)
        grads, _ = walk_backward(
            model, params, cache, dpred, rule_backward(rule, dense_index, dpred)
        )
        return value, grads, cache

    return value_and_grad_fn


def rule_backward(rule: Rule, dense_index: dict[Path, int], output_error: jax.Array):
    """A :func:`walk_backward` hook: ``rule`` at dense layers, ``layer.backward`` elsewhere."""

    def leaf(path, layer, params, cache, dy):
        if path not in dense_index:
            return layer.backward(params, cache, dy)
        w = dense_weight(layer, params)
        dparams, _ = layer.backward(params, cache, dy)  # dW, db stay local; dy·Wᵀ is unused
        dx = rule.dense_dx(w, dy, index=dense_index[path], output_error=output_error)
        return dparams, dx.astype(cache.dtype)

    return leaf


# --------------------------------------------------------------------------- walking a model


def is_serial(layer: Layer) -> bool:
    """Whether ``layer`` was built by :func:`fbp.nn.serial`."""
    return layer.name == "serial" and bool(layer.children) and _built_by(layer, "serial")


def is_residual(layer: Layer) -> bool:
    """Whether ``layer`` was built by :func:`fbp.nn.residual`."""
    return layer.name == "residual" and len(layer.children) == 1 and _built_by(layer, "residual")


def is_dense(layer: Layer) -> bool:
    """Whether ``layer`` was built by :func:`fbp.nn.dense` (params ``{"w", "b"?}``, cache ``x``)."""
    return layer.name.startswith("dense(") and _built_by(layer, "dense")


def is_conv(layer: Layer) -> bool:
    """Whether ``layer`` was built by :func:`fbp.nn.conv1d` or :func:`fbp.nn.conv2d`."""
    return layer.name.startswith("conv") and _built_by(layer, "_conv")


def is_layer_norm(layer: Layer) -> bool:
    """Whether ``layer`` was built by :func:`fbp.nn.layer_norm` (cache ``(x̂, 1/σ)``)."""
    return _built_by(layer, "layer_norm")


def is_embedding(layer: Layer) -> bool:
    """Whether ``layer`` was built by :func:`fbp.nn.embedding` (cache: the ids)."""
    return _built_by(layer, "embedding")


def is_elementwise(layer: Layer) -> bool:
    """Whether ``layer`` is a parameter-free elementwise activation (:func:`fbp.nn.elementwise`)."""
    return _built_by(layer, "elementwise")


def _built_by(layer: Layer, factory: str) -> bool:
    qualname = getattr(layer.backward, "__qualname__", "")
    return qualname.startswith(f"{factory}.<locals>.")


def leaf_layers(model: Layer, path: Path = ()) -> list[tuple[Path, Layer]]:
    """Every leaf layer in forward order, with its index path through ``serial``s."""
    if is_serial(model):
        out = []
        for i, child in enumerate(model.children):
            out += leaf_layers(child, (*path, i))
        return out
    if is_residual(model):
        return leaf_layers(model.children[0], path)
    return [(path, model)]


def dense_layers(model: Layer) -> list[tuple[Path, Layer]]:
    """The dense leaf layers in forward order (their position is the ``index`` rules get)."""
    return [(path, layer) for path, layer in leaf_layers(model) if is_dense(layer)]


def dense_weight(layer: Layer, params) -> jax.Array:
    """A dense layer's weight, checked: a 2-D ``params["w"]``."""
    w = params.get("w") if isinstance(params, dict) else None
    if w is None or jnp.ndim(w) != 2:
        raise ShapeError(
            layer.name,
            "expected dense params {'w': (n_in, n_out), 'b': (n_out,)}; "
            "are these params from another model?",
        )
    return w


def walk_forward(
    model: Layer,
    params,
    x: jax.Array,
    *,
    key: jax.Array | None,
    train: bool,
    on_leaf: Callable[..., None] | None = None,
    path: Path = (),
):
    """``model.forward`` as ``serial``/``residual`` run it, with a hook at each leaf.

    ``on_leaf(path, layer, x, y, cache)`` is called after each leaf layer's forward.

    Returns ``(y, cache)`` exactly as ``model.forward`` would (same keys split
    the same way, same cache structure).
    """
    if is_serial(model):
        n = len(model.children)
        if not isinstance(params, tuple | list) or len(params) != n:
            return model.forward(params, x, key=key, train=train)  # let serial raise its error
        keys = jax.random.split(key, n) if key is not None else (None,) * n
        caches = []
        for i, child in enumerate(model.children):
            with at_layer(i):
                x, cache = walk_forward(
                    child, params[i], x, key=keys[i], train=train, on_leaf=on_leaf, path=(*path, i)
                )
            caches.append(cache)
        return x, tuple(caches)
    if is_residual(model):
        fx, cache = walk_forward(
            model.children[0], params, x, key=key, train=train, on_leaf=on_leaf, path=path
        )
        if fx.shape != x.shape:
            return model.forward(params, x, key=key, train=train)  # let residual raise
        return x + fx, cache
    y, cache = model.forward(params, x, key=key, train=train)
    if on_leaf is not None:
        on_leaf(path, model, x, y, cache)
    return y, cache


def walk_backward(
    model: Layer,
    params,
    cache,
    dy: jax.Array,
    leaf_backward: Callable[..., tuple[Params, jax.Array]],
    path: Path = (),
):
    """``model.backward`` as ``serial``/``residual`` run it, with ``leaf_backward`` at each leaf.

    ``leaf_backward(path, layer, params, cache, dy) -> (dparams, dx)``;
    passing ``lambda path, layer, *a: layer.backward(*a)`` reproduces
    ``model.backward`` exactly.
    """
    if is_serial(model):
        n = len(model.children)
        dparams = [None] * n
        for i in reversed(range(n)):
            with at_layer(i):
                dparams[i], dy = walk_backward(
                    model.children[i], params[i], cache[i], dy, leaf_backward, (*path, i)
                )
        return tuple(dparams), dy
    if is_residual(model):
        dparams, dx_inner = walk_backward(model.children[0], params, cache, dy, leaf_backward, path)
        return dparams, dy + dx_inner
    return leaf_backward(path, model, params, cache, dy)


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
      >>> grads = jax.grad(objective)(params)         # fbp's backward, via custom_vjp
      >>> grads2 = jax.grad(fbp.backprop.to_jax(model, losses.softmax_cross_entropy))(
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
