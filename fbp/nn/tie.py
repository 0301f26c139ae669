"""Tied weights: one parameter used in two places of a model, its gradient the sum of both uses.

``tie(model, {target: source})`` is a combinator around ``model``: the leaf
layer whose params sit at ``target`` uses the params of the leaf layer at
``source`` (same structure, shapes and dtypes) instead of its own. GPT-2's
output head reads the token embedding's table this way
(:func:`fbp.nn.unembedding` has the embedding's layout, ``y = x·Eᵀ``).

The tie is two linear maps, declared in its :class:`~fbp.nn.core.Structure`
so that every tool sees it:

- *expand* (forward): the inner model's params are the tie's with a copy of
  ``params[source]`` placed at ``target`` (the tie's own params hold ``None``
  there, so checkpoints, optimizers and their masks see one parameter);
- *fold* (backward, its transpose): ``d source = (inner d source) + (inner d
  target)`` — the gradient of a shared parameter is the sum of its uses'.

Both are linear, so a per-example gradient folds the same way: example
``n``'s gradient of the shared table is the sum of its two uses' shares, and
its squared norm is *not* the sum of their squared norms. The walker
(:mod:`fbp.nn.walk`) gives both leaf layers the same params path and marks
them ``Site.tied``; its per-example norm rule refuses a tied site (naming it)
and :mod:`fbp.diagnostics` adds the per-example gradients of the uses before
squaring.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError, ShapeError
from fbp.nn.core import Layer, Structure

__all__ = ["tie"]

Path = tuple[Any, ...]


def _as_path(name: str, path: Any) -> Path:
    path = (path,) if isinstance(path, int | str) else path
    if not isinstance(path, tuple) or not all(isinstance(k, int | str) for k in path):
        raise ConfigError(name, f"a path is a tuple of ints and strings, got {path!r}")
    return path


def _get(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _put(tree: Any, path: Path, value: Any) -> Any:
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, key: _put(tree[key], rest, value)}
    items = list(tree)
    items[key] = _put(items[key], rest, value)
    return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)


def _label(path: Path) -> str:
    return ".".join(map(str, path)) or "model"


def tie(model: Layer, ties: Mapping[Any, Any]) -> Layer:
    """``model`` with the leaf layer at each ``target`` path using the params at ``source``.

    Args:
      model: the model (typically a ``serial``).
      ties: ``{target: source}``: params paths (tuples of indices and keys, as
        :func:`fbp.nn.walk.leaves` reports them; an int for a top-level
        index) of two leaf layers with params of the same structure, shapes
        and dtypes. A source cannot itself be a target.

    Returns:
      A ``Layer`` whose params are ``model``'s with ``None`` at each target;
      forward copies the source's params to the target, backward adds the
      target's gradient into the source's (see the module docstring).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> model = nn.tie(
      ...     nn.serial(nn.embedding(10, 4), nn.tanh(), nn.unembedding(10)), {2: 0}
      ... )
      >>> params, shape = model.init(jax.random.key(0), (3,))
      >>> shape, params[2]
      ((3, 10), None)
      >>> y, cache = model.forward(params, jnp.array([[1, 2, 3]]))
      >>> dparams, _ = model.backward(params, cache, jnp.ones_like(y))
      >>> dparams[0]["embedding"].shape, dparams[2]
      ((10, 4), None)
    """
    if not isinstance(model, Layer):
        raise ConfigError("tie", f"expected a Layer, got {type(model).__name__}")
    if not isinstance(ties, Mapping) or not ties:
        raise ConfigError("tie", f"ties must be a non-empty dict {{target: source}}, got {ties!r}")
    pairs = tuple((_as_path("tie", t), _as_path("tie", s)) for t, s in ties.items())
    name = "tie(" + ", ".join(f"{_label(t)}←{_label(s)}" for t, s in pairs) + ")"
    targets = {t for t, _ in pairs}
    for target, source in pairs:
        if source in targets:
            raise ConfigError(name, f"source {_label(source)} is itself tied to another source")
        if target == source:
            raise ConfigError(name, f"target and source are the same path {_label(target)}")
    _check_leaf_paths(name, model, pairs)

    def expand(params):
        for target, source in pairs:
            try:
                own = _get(params, target)
                shared = _get(params, source)
            except (KeyError, IndexError, TypeError):
                raise ShapeError(
                    name,
                    f"expected params with entries at {_label(target)} and {_label(source)}; "
                    "are these params from another model?",
                ) from None
            if own is not None:
                raise ShapeError(
                    name,
                    f"expected None at the tied path {_label(target)} (it uses "
                    f"{_label(source)}'s params), got {_shapes(own)}; are these the untied "
                    "model's params?",
                )
            params = _put(params, target, shared)
        return params

    def fold(dparams):
        for target, source in pairs:
            summed = jax.tree.map(jnp.add, _get(dparams, source), _get(dparams, target))
            dparams = _put(_put(dparams, source, summed), target, None)
        return dparams

    def init(key, input_shape):
        params, out_shape = model.init(key, input_shape)
        for target, source in pairs:
            a, b = _get(params, target), _get(params, source)
            if _shapes(a) != _shapes(b):
                raise ShapeError(
                    name,
                    f"the tied layers need params of one layout, but {_label(target)} has "
                    f"{_shapes(a)} and {_label(source)} has {_shapes(b)}",
                )
            params = _put(params, target, None)
        return params, out_shape

    def forward(params, x, *, key=None, train=False):
        return model.forward(expand(params), x, key=key, train=train)

    def backward(params, cache, dy):
        dparams, dx = model.backward(expand(params), cache, dy)
        return fold(dparams), dx

    return Layer(
        init,
        forward,
        backward,
        name=name,
        children=(model,),
        structure=Structure(
            rebuild=lambda inner: tie(inner, dict(pairs)),
            param_paths=((),),
            cache_paths=((),),
            shared=pairs,
        ),
    )


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda a: (tuple(jnp.shape(a)), str(jnp.result_type(a))), tree)


def _check_leaf_paths(name: str, model: Layer, pairs) -> None:
    """Each path must be the params path of one leaf layer of ``model``."""
    from fbp.nn import walk

    paths = {site.path: site for site in walk.leaves(model)}
    for target, source in pairs:
        for what, path in (("target", target), ("source", source)):
            if path not in paths:
                known = ", ".join(_label(p) for p in paths) or "none"
                raise ConfigError(
                    name,
                    f"{what} {_label(path)} is not the params path of a leaf layer "
                    f"(the model's leaf layers sit at {known})",
                )
