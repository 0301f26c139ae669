"""The layer contract and its composition: ``Layer``, ``serial``, ``residual``, reshapes.

A layer is three pure functions::

    init(key, input_shape)                      -> (params, output_shape)
    forward(params, x, *, key=None, train=False) -> (y, cache)
    backward(params, cache, dy)                 -> (dparams, dx)

Shapes given to ``init`` exclude the batch axis; ``x`` and ``y`` carry it.
``backward`` is the hand-derived vector-Jacobian product: given ``dy = ∂L/∂y``
it returns ``dparams = ∂L/∂params`` (same structure, shapes and dtypes as
``params``) and ``dx = ∂L/∂x``. ``cache`` holds exactly the residuals that
``backward`` reads, as a pytree of arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError, DTypeError, ShapeError, at_layer

__all__ = [
    "Extensions",
    "Layer",
    "Params",
    "Shape",
    "Structure",
    "flatten",
    "reshape",
    "residual",
    "serial",
]

Params = Any  # a pytree of arrays
Initializer = Callable[..., jax.Array]  # (key, shape, dtype) -> array, as jax.nn.initializers
Cache = Any  # a pytree of arrays
Shape = tuple[int, ...]


class Structure(NamedTuple):
    """What a combinator contains, declared by the factory that builds it.

    The walker (:mod:`fbp.nn.walk`) reads this and nothing else to go inside a
    model: a layer whose ``structure`` is ``None`` is a leaf, whatever its
    ``children``.

    Attributes:
      rebuild: ``rebuild(*children) -> Layer``, the same combinator built
        around other children (with the same params and cache layout). The
        walker rebuilds a model around instrumented leaves and runs the
        combinators' own forward and backward, so it never re-implements them.
      param_paths: for each child, the keys leading from the combinator's
        params to the child's (``serial``: ``((0,), (1,), ...)``;
        ``residual``: ``((),)``).
      cache_paths: the same for the combinator's cache.
      label: how a leaf inside is described in reports, e.g. ``"in residual"``.
      shared: pairs ``(target, source)`` of params paths, relative to the
        params the children see, for tied weights (:func:`fbp.nn.tie`): the
        leaf layer at ``target`` uses the params at ``source`` (the
        combinator's own params hold ``None`` at ``target``). The walker gives
        both leaves ``source``'s path and marks them ``Site.tied``.
    """

    rebuild: Callable[..., Layer]
    param_paths: tuple[tuple[Any, ...], ...]
    cache_paths: tuple[tuple[Any, ...], ...]
    label: str = ""
    shared: tuple[tuple[tuple[Any, ...], tuple[Any, ...]], ...] = ()


class Extensions(NamedTuple):
    """What a leaf layer declares besides its backward, for tools beyond the gradient.

    Every field is optional: where a layer declares nothing, each tool uses a
    generic fallback that is always right (see :mod:`fbp.nn.walk`), or raises
    an error naming the layer where no right answer exists.

    Attributes:
      weights: the keys of ``params`` holding the weights that carry the error
        backward (``("w",)`` for dense), which credit-assignment rules
        (:mod:`fbp.rules`) replace with feedback matrices. ``None``: every
        floating-point leaf with two or more axes. ``()``: none.
      batch_l2: a fast per-example rule, ``(params, cache, dy) -> (dparams,
        dx, sq)``: the backward's own results and, for every leaf of
        ``params``, each example's squared gradient norm ``‖g_n‖²`` (shape
        ``(batch,)``), where ``g_n`` is example ``n``'s share of ``dparams``
        (the ``g_n`` sum to ``dparams``). Fallback: the layer's own forward and
        backward run on each example alone under ``jax.vmap``.
      batch_grad: like ``batch_l2`` with each ``g_n`` itself in place of
        ``‖g_n‖²``: every leaf of ``params`` with a leading batch axis.
      mixes_examples: why per-example quantities do not exist for this layer
        in training (its forward mixes the examples of a batch, as batch
        normalisation does), or ``None``.
      elementwise: the layer is a parameter-free elementwise map ``y = f(x)``,
        so ``backward(params, cache, 1)`` is ``f'(x)`` (used for saturation).
      update_stats: ``(params, cache, momentum) -> params`` for a layer with
        running statistics outside the gradient (batch norm), which
        :func:`fbp.nn.update_batch_stats` calls after each step.
      outer_factors: ``(params, cache, dy) -> (dparams, dx, factors)``: the
        backward's own results and, for every leaf of ``params`` (a dict), a
        pair ``(a, g)`` of shapes ``(batch, T, p)`` and ``(batch, T, q)`` with
        example ``n``'s share of that leaf's gradient equal to
        ``Σ_t a_ntᵀ·g_nt`` reshaped to the leaf's shape (dense: ``(x, dy)``
        for ``w`` and ``(1, dy)`` for ``b``; ``T`` counts time steps or output
        positions, 1 for a dense layer on vectors). From these
        :mod:`fbp.quantities` reads sums of squared gradients, Kronecker
        factors and clipped sums without materialising per-example gradients.
        Fallback: per-example gradients from ``batch_grad`` or the walker.
    """

    weights: tuple[str, ...] | None = None
    batch_l2: Callable[..., tuple[Params, jax.Array, Params]] | None = None
    batch_grad: Callable[..., tuple[Params, jax.Array, Params]] | None = None
    mixes_examples: str | None = None
    elementwise: bool = False
    update_stats: Callable[..., Params] | None = None
    outer_factors: Callable[..., tuple[Params, jax.Array, Params]] | None = None


class _LayerFields(NamedTuple):
    init: Callable[[jax.Array, Shape], tuple[Params, Shape]]
    forward: Callable[..., tuple[jax.Array, Cache]]
    backward: Callable[[Params, Cache, jax.Array], tuple[Params, jax.Array]]
    name: str = "layer"
    children: tuple[Layer, ...] = ()
    structure: Structure | None = None
    extensions: Extensions | None = None


class Layer(_LayerFields):
    """A differentiable layer as three pure functions (see the module docstring).

    Attributes:
      init: ``(key, input_shape) -> (params, output_shape)``.
      forward: ``(params, x, *, key=None, train=False) -> (y, cache)``.
      backward: ``(params, cache, dy) -> (dparams, dx)``.
      name: a short description used in error messages and reports.
      children: the sub-layers of a combinator (``serial``, ``residual``,
        ``bidirectional``); empty for a leaf layer.
      structure: a combinator's declared :class:`Structure` (how the walker
        goes inside it); ``None`` for a leaf layer.
      extensions: a leaf layer's declared :class:`Extensions` (fast rules for
        per-example gradients, which params are weights, ...); ``None``: the
        generic fallbacks apply.

    A layer written with the three functions alone,
    ``Layer(init, forward, backward, name="mine")``, is a leaf that every tool
    handles through its fallbacks. ``layer._replace(...)`` that changes
    ``init``, ``forward`` or ``backward`` drops ``structure`` and
    ``extensions`` (they described the old functions) unless given again:
    ``dense(3)._replace(backward=mine)`` is a user's leaf layer, and
    ``serial(...)._replace(backward=mine)`` is checked as one layer, not
    walked into.
    """

    __slots__ = ()

    def apply(
        self, params: Params, x: jax.Array, *, key: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """The forward output alone: ``layer.forward(params, x, ...)[0]``."""
        return self.forward(params, x, key=key, train=train)[0]

    def _replace(self, **changes: Any) -> Layer:
        """A copy with ``changes``; new functions drop the declarations of the old ones."""
        if changes.keys() & {"init", "forward", "backward"}:
            changes.setdefault("structure", None)
            changes.setdefault("extensions", None)
        return super()._replace(**changes)


# --------------------------------------------------------------------------- checks
# Shared by every layer: all run on static shapes and dtypes, at trace time.


def check_float_input(name: str, x: jax.Array) -> None:
    """Raise ``DTypeError`` unless ``x`` is a floating-point array."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise DTypeError(name, f"expected a floating-point input, got {dtype or type(x).__name__}")


def check_no_params(name: str, params: Params) -> None:
    """Raise ``ShapeError`` unless ``params`` is empty (a parameter-free layer)."""
    if jax.tree.leaves(params):
        raise ShapeError(
            name,
            f"takes no parameters, got {_describe_tree(params)}; "
            "are these params from another model?",
        )


def check_batched(name: str, x: jax.Array, expected: str) -> None:
    """Raise ``ShapeError`` if ``x`` lacks the leading batch axis."""
    if jnp.ndim(x) < 2:
        raise ShapeError(
            name,
            f"expected input of shape {expected}, got {tuple(jnp.shape(x))}; "
            "is the batch axis missing?",
        )


def check_positive_int(name: str, what: str, value: Any) -> int:
    """Return ``value`` if it is a positive int (not a bool); else raise ``ConfigError``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(name, f"{what} must be a positive int, got {value!r}")
    return value


def check_sequence_shape(name: str, input_shape: Shape) -> tuple[int, int]:
    """``init``'s check: one example of a sequence is ``(time, features)``."""
    input_shape = tuple(input_shape)
    if len(input_shape) != 2:
        raise ShapeError(
            name,
            f"expected input_shape (time, features), got {input_shape}; "
            "a sequence layer needs 3-D input (batch, time, features)",
        )
    return input_shape


def check_sequence(name: str, x: jax.Array, features: int | None = None) -> None:
    """Raise unless ``x`` is a float ``(batch, time, features)`` array.

    Shared by every sequence layer; runs on static shapes, at trace time.

    Args:
      name: the layer's description, for the message.
      x: the input.
      features: the expected size of the last axis, or ``None`` for any.
    """
    check_float_input(name, x)
    expected = f"(batch, time, {'features' if features is None else features})"
    if jnp.ndim(x) != 3:
        raise ShapeError(
            name,
            f"expected input of shape {expected}, got {tuple(jnp.shape(x))}; "
            "a sequence layer needs 3-D input",
        )
    if features is not None and x.shape[-1] != features:
        raise ShapeError(name, f"expected input of shape {expected}, got {tuple(x.shape)}")


def check_param_keys(name: str, params: Params, keys: set[str], expected: str) -> None:
    """Raise ``ShapeError`` unless ``params`` is a dict with exactly ``keys``.

    ``expected`` describes the layout for the message, e.g. ``"{'w': (n_in, n_out)}"``.
    """
    if not isinstance(params, dict) or set(params) != keys:
        got = (
            jax.tree.map(lambda a: tuple(jnp.shape(a)), params)
            if isinstance(params, dict | tuple | list)
            else type(params).__name__
        )
        raise ShapeError(
            name, f"expected params {expected}, got {got}; are these params from another model?"
        )


def row_sq_norms(a: jax.Array) -> jax.Array:
    """Squared norm of each example's slice, ``(batch, ...) -> (batch,)`` (at least float32)."""
    a = a.astype(jnp.float32) if a.dtype in (jnp.float16, jnp.bfloat16) else a
    return jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1)


def _describe_tree(tree: Params) -> str:
    shapes = jax.tree.map(lambda a: tuple(jnp.shape(a)), tree)
    return str(shapes)


# --------------------------------------------------------------------------- serial


def serial(*layers: Layer) -> Layer:
    """Compose layers left to right; the composition is itself a ``Layer``.

    Forward runs each child in turn and collects their caches; backward runs
    right to left, handing each child's ``dx`` to the child before it as its
    ``dy`` — the delta recursion of backpropagation. Params (and caches) are
    tuples of the children's. A ``key`` is split into one key per child.

    Errors raised by a child are re-raised with its index, e.g.
    ``serial layer 2 (dense 64→10): expected input of shape (batch, 64), ...``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> model = nn.serial(nn.dense(32), nn.relu(), nn.dense(10))
      >>> params, out_shape = model.init(jax.random.key(0), (64,))
      >>> out_shape
      (10,)
      >>> model.apply(params, jnp.ones((5, 64))).shape
      (5, 10)
    """
    if not layers:
        raise ConfigError("serial", "needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise ConfigError(
                "serial",
                f"argument {i} is a {type(layer).__name__}, not a Layer; "
                "did you forget to call it, e.g. nn.relu() rather than nn.relu?",
            )
    n = len(layers)
    name = f"serial of {n} layers"

    def init(key, input_shape):
        keys = jax.random.split(key, n)
        params, shape = [], tuple(input_shape)
        for i, (layer, k) in enumerate(zip(layers, keys, strict=True)):
            with at_layer(i):
                p, shape = layer.init(k, shape)
            params.append(p)
        return tuple(params), shape

    def forward(params, x, *, key=None, train=False):
        if not isinstance(params, tuple | list) or len(params) != n:
            got = f"{len(params)} entries" if isinstance(params, tuple | list) else type(params)
            raise ShapeError(
                name,
                f"expected params as a tuple of {n} entries (one per layer), got {got}; "
                "are these params from another model?",
            )
        keys = jax.random.split(key, n) if key is not None else (None,) * n
        caches = []
        for i, (layer, p, k) in enumerate(zip(layers, params, keys, strict=True)):
            with at_layer(i):
                x, cache = layer.forward(p, x, key=k, train=train)
            caches.append(cache)
        return x, tuple(caches)

    def backward(params, cache, dy):
        dparams = [None] * n
        for i in reversed(range(n)):
            with at_layer(i):
                dparams[i], dy = layers[i].backward(params[i], cache[i], dy)
        return tuple(dparams), dy

    return Layer(
        init,
        forward,
        backward,
        name="serial",
        children=tuple(layers),
        structure=Structure(
            rebuild=serial,
            param_paths=tuple((i,) for i in range(n)),
            cache_paths=tuple((i,) for i in range(n)),
        ),
    )


# --------------------------------------------------------------------------- residual


def residual(layer: Layer) -> Layer:
    """``y = x + f(x)``: a skip connection around ``layer``.

    Backward sums the two paths: ``dx = dy + f.backward(dy)``, and the params'
    gradient is the inner layer's. The inner layer must keep the shape.
    Params and cache are the inner layer's.
    """
    if not isinstance(layer, Layer):
        raise ConfigError("residual", f"expected a Layer, got {type(layer).__name__}")

    def init(key, input_shape):
        params, out_shape = layer.init(key, input_shape)
        if tuple(out_shape) != tuple(input_shape):
            raise ShapeError(
                f"residual({layer.name})",
                f"the inner layer must keep the shape, but maps {tuple(input_shape)} "
                f"to {tuple(out_shape)}",
            )
        return params, tuple(input_shape)

    def forward(params, x, *, key=None, train=False):
        fx, cache = layer.forward(params, x, key=key, train=train)
        if fx.shape != x.shape:
            raise ShapeError(
                f"residual({layer.name})",
                f"the inner layer must keep the shape, but maps {x.shape} to {fx.shape}",
            )
        return x + fx, cache

    def backward(params, cache, dy):
        dparams, dx_inner = layer.backward(params, cache, dy)
        return dparams, dy + dx_inner

    return Layer(
        init,
        forward,
        backward,
        name="residual",
        children=(layer,),
        structure=Structure(
            rebuild=residual, param_paths=((),), cache_paths=((),), label="in residual"
        ),
    )


# --------------------------------------------------------------------------- flatten


def flatten() -> Layer:
    """Flatten all but the batch axis: ``(batch, d1, d2, ...) -> (batch, d1·d2·...)``.

    Backward reshapes ``dy`` back. The cache is a zero-size array of shape
    ``(0, d1, d2, ...)``: it carries the input's shape and dtype through jit
    while holding no data.
    """

    def init(key, input_shape):
        del key
        return {}, (math.prod(input_shape),)

    def forward(params, x, *, key=None, train=False):
        del key, train
        check_no_params("flatten", params)
        check_batched("flatten", x, "(batch, ...)")
        shape_carrier = jnp.zeros((0, *x.shape[1:]), x.dtype)
        return x.reshape(x.shape[0], -1), shape_carrier

    def backward(params, cache, dy):
        return {}, dy.reshape(dy.shape[0], *cache.shape[1:])

    return Layer(init, forward, backward, name="flatten")


# --------------------------------------------------------------------------- reshape


def _resolve_shape(name: str, input_shape: Shape, shape: Shape) -> Shape:
    """``shape`` with its one ``-1`` filled in, checked to hold ``input_shape``'s elements."""
    size = math.prod(input_shape)
    known = math.prod(d for d in shape if d != -1)
    if shape.count(-1) == 1 and known > 0 and size % known == 0:
        shape = tuple(size // known if d == -1 else d for d in shape)
    if math.prod(shape) != size or any(d < 0 for d in shape):
        raise ShapeError(
            name,
            f"cannot reshape per-example input of shape {tuple(input_shape)} ({size} elements) "
            f"to {tuple(shape)}",
        )
    return shape


def reshape(shape: Shape) -> Layer:
    """Reshape each example: ``(batch, *in_shape) -> (batch, *shape)``; one entry may be ``-1``.

    The batch axis is kept and not part of ``shape``. For example ``reshape((-1, 1))``
    turns mnist1d's ``(batch, 40)`` signals into ``(batch, 40, 1)`` sequences of
    one feature for a recurrent or convolutional layer. Backward reshapes ``dy``
    back (a reshape's Jacobian is a permutation-free identity on the elements);
    the cache is a zero-size array carrying the input's shape, as for :func:`flatten`.

    Args:
      shape: the per-example output shape; ints, at most one ``-1``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = reshape((-1, 1))
      >>> params, out_shape = layer.init(jax.random.key(0), (40,))
      >>> out_shape
      (40, 1)
      >>> layer.apply(params, jnp.ones((8, 40))).shape
      (8, 40, 1)
    """
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ConfigError("reshape", f"shape must be a tuple of ints, got {shape!r}") from None
    if shape.count(-1) > 1 or any(d < -1 or d == 0 for d in shape):
        raise ConfigError(
            "reshape", f"shape must hold positive ints and at most one -1, got {shape}"
        )
    name = f"reshape({shape})"

    def init(key, input_shape):
        del key
        return {}, _resolve_shape(name, tuple(input_shape), shape)

    def forward(params, x, *, key=None, train=False):
        del key, train
        check_no_params(name, params)
        check_batched(name, x, "(batch, ...)")
        out = _resolve_shape(name, tuple(x.shape[1:]), shape)
        return x.reshape(x.shape[0], *out), jnp.zeros((0, *x.shape[1:]), x.dtype)

    def backward(params, cache, dy):
        return {}, dy.reshape(dy.shape[0], *cache.shape[1:])

    return Layer(init, forward, backward, name=name)
