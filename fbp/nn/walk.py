"""The one walker: how every tool goes inside a model, and the fallbacks it offers.

A model is a tree of layers. Combinators (``serial``, ``residual``,
``bidirectional``, or a user's own) *declare* what they contain in their
:class:`~fbp.nn.core.Structure`: the children, where each child's params and
cache sit, and how to rebuild the combinator around other children. A layer
with no declared structure is a leaf — a dense layer, a GRU, or a layer a user
wrote with the three functions alone. Nothing here reads a function's or a
layer's name.

:func:`leaves` lists the leaf layers in forward order as :class:`Site` values
(index, params path, cache path). :func:`forward` and :func:`backward` run a
model exactly as its own ``forward`` and ``backward`` do — they rebuild it
around instrumented leaves and call the combinators' own functions — but at
each leaf call a hook that receives a :class:`Visit`: the site, its params, its
input ``x``, its key, its cache and its output gradient ``dy``. The backprop
driver's rules, :mod:`fbp.verify`, :mod:`fbp.diagnostics` and
:func:`fbp.nn.update_batch_stats` are all built on these; no other code walks
a model.

Per-example gradients at a leaf (:func:`batch_l2`, :func:`batch_grad`) use the
layer's declared fast rule (:class:`~fbp.nn.core.Extensions`) where it has one,
and otherwise the generic fallback: the layer's own forward and backward run
on each example alone under ``jax.vmap`` — its hand rules, no autodiff. Where
no per-example gradient exists (batch norm in training mixes the examples) or
the fallback cannot reproduce the forward (a layer with parameters that draws
random numbers from its key) the call raises :class:`fbp.ConfigError` naming
the layer. :func:`feedback_weights` says which params a credit-assignment rule
replaces at a leaf: the declared ``weights``, or every floating-point leaf with
two or more axes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError, DTypeError, FbpError, ShapeError
from fbp.nn.core import Layer, Params, row_sq_norms

__all__ = [
    "Site",
    "Visit",
    "at_path",
    "at_path_of",
    "backward",
    "batch_grad",
    "batch_l2",
    "check_backward",
    "checked_backward",
    "contains",
    "feedback_weights",
    "forward",
    "instrument",
    "leaves",
    "plain_path",
    "reads",
    "replace_at",
    "tied_groups",
    "untape",
]

Path = tuple[Any, ...]


class Site(NamedTuple):
    """Where a leaf layer sits in a model.

    Attributes:
      index: its position among the model's leaf layers, in forward order.
      path: the keys from the model's params to the layer's params (ints into
        tuples, strings into dicts); ``()`` for the model itself.
      cache_path: the same into the model's cache.
      layer: the leaf layer.
      context: how the enclosing combinators describe it (``"in residual"``);
        empty when only ``serial`` encloses it.
      tied: its params are shared with another leaf layer (:func:`fbp.nn.tie`):
        both sites have the params' one path, and the model's gradient there
        is the sum of the two layers' ``dparams``.
    """

    index: int
    path: Path
    cache_path: Path
    layer: Layer
    context: str = ""
    tied: bool = False

    @property
    def label(self) -> str:
        """The params path as text, ``"2.0"``, or ``"model"`` for the model itself."""
        return ".".join(map(str, self.path)) if self.path else "model"

    @property
    def description(self) -> str:
        """``"layer 2.0 (dense(→8))"`` — for messages."""
        kind = f"{self.layer.name} {self.context}".strip()
        return f"model ({kind})" if not self.path else f"layer {self.label} ({kind})"


def leaves(model: Layer) -> tuple[Site, ...]:
    """Every leaf layer of ``model`` in forward order, with its paths.

    Example:
      >>> from fbp import nn
      >>> [s.label for s in nn.walk.leaves(nn.serial(nn.dense(4), nn.residual(nn.dense(4))))]
      ['0', '1']
    """
    if not isinstance(model, Layer):
        raise ConfigError("walk", f"expected a Layer, got {type(model).__name__}")
    sites: list[Site] = []

    def visit(layer: Layer, path: Path, cache_path: Path, context: str) -> None:
        structure = layer.structure
        if structure is None:
            sites.append(Site(len(sites), path, cache_path, layer, context))
            return
        inner = structure.label or context
        first = len(sites)
        for child, p, c in zip(
            layer.children, structure.param_paths, structure.cache_paths, strict=True
        ):
            visit(child, (*path, *p), (*cache_path, *c), inner)
        # Tied weights: a leaf at a target uses the source's params, so its
        # params path (in this combinator's own params) is the source's.
        for target, source in structure.shared:
            target, source = (*path, *target), (*path, *source)
            for i in range(first, len(sites)):
                if sites[i].path[: len(target)] == target:
                    new_path = (*source, *sites[i].path[len(target) :])
                    sites[i] = sites[i]._replace(path=new_path)
                    for j in range(first, len(sites)):
                        if sites[j].path == new_path:
                            sites[j] = sites[j]._replace(tied=True)

    visit(model, (), (), "")
    return tuple(sites)


def tied_groups(model: Layer) -> tuple[tuple[Site, ...], ...]:
    """The leaf layers that share params (:func:`fbp.nn.tie`), grouped by their one path.

    Example:
      >>> from fbp import nn
      >>> model = nn.tie(nn.serial(nn.embedding(9, 4), nn.unembedding(9)), {1: 0})
      >>> [[s.index for s in group] for group in nn.walk.tied_groups(model)]
      [[0, 1]]
    """
    groups: dict[Path, list[Site]] = {}
    for site in leaves(model):
        if site.tied:
            groups.setdefault(site.path, []).append(site)
    return tuple(tuple(g) for g in groups.values())


def contains(model: Layer, predicate: Callable[[Layer], bool]) -> bool:
    """Whether ``predicate`` holds for ``model`` or any layer among its ``children``, at any depth.

    Unlike :func:`leaves`, this also looks inside layers that list children
    without declaring a structure (whose insides no tool can reach), so that
    such a layer can be named in an error instead of silently skipped.
    """
    return predicate(model) or any(contains(child, predicate) for child in model.children)


def instrument(model: Layer, make_leaf: Callable[[Site], Layer]) -> Layer:
    """``model`` rebuilt with every leaf layer replaced by ``make_leaf(site)``.

    Combinators are rebuilt by their declared ``structure.rebuild``, so the
    result runs their own forward and backward around the new leaves.
    """
    sites = iter(leaves(model))

    def rebuild(layer: Layer) -> Layer:
        if layer.structure is None:
            return make_leaf(next(sites))
        return layer.structure.rebuild(*(rebuild(child) for child in layer.children))

    return rebuild(model)


@contextmanager
def at_path_of(site: Site) -> Iterator[None]:
    """Name ``site``'s position in any :class:`fbp.FbpError` raised inside (as ``serial`` does)."""
    try:
        yield
    except FbpError as error:
        error.layer_path = (*site.path, *error.layer_path)
        raise


def at_path(tree: Any, path: Path) -> Any:
    """The subtree of ``tree`` at ``path`` (a tuple of indices and keys)."""
    for depth, key in enumerate(path):
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            where = ".".join(map(str, path[:depth])) or "the top"
            raise ShapeError(
                "walk",
                f"expected an entry {key!r} at {where} of a {type(tree).__name__} of params "
                "(or cache); are these params from another model?",
            ) from None
    return tree


def replace_at(tree: Any, path: Path, value: Any) -> Any:
    """A copy of ``tree`` (nested tuples, lists and dicts) with ``value`` at ``path``."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, key: replace_at(tree[key], rest, value)}
    items = list(tree)
    items[key] = replace_at(items[key], rest, value)
    if isinstance(tree, list):
        return items
    return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)


# --------------------------------------------------------------------------- forward and backward


class Record(NamedTuple):
    """What an instrumented leaf keeps: its own cache, and its input and key."""

    cache: Any
    x: jax.Array
    key: jax.Array | None


class Visit(NamedTuple):
    """What a leaf hook receives in :func:`backward`.

    Attributes:
      site: where the layer sits.
      params: its params.
      x: its input in the forward pass.
      key: the key its forward received (``None`` without one).
      train: the forward's mode.
      cache: its own cache.
      dy: the gradient arriving at its output.
    """

    site: Site
    params: Params
    x: jax.Array
    key: jax.Array | None
    train: bool
    cache: Any
    dy: jax.Array

    @property
    def layer(self) -> Layer:
        """The leaf layer."""
        return self.site.layer

    def backward(self, params: Params | None = None) -> tuple[Params, jax.Array]:
        """The layer's own backward here; ``params`` replaces its params (feedback rules)."""
        return self.layer.backward(self.params if params is None else params, self.cache, self.dy)


def forward(
    model: Layer,
    params: Params,
    x: jax.Array,
    *,
    key: jax.Array | None = None,
    train: bool = False,
    on_leaf: Callable[..., None] | None = None,
) -> tuple[jax.Array, Any]:
    """``model.forward``, recording each leaf's input; ``on_leaf`` sees each leaf's output.

    Returns ``(y, tape)``: ``y`` exactly as ``model.forward`` gives it, and the
    tape, ``model``'s cache with every leaf's cache wrapped in a :class:`Record`,
    for :func:`backward`. ``on_leaf(site, params, x, y, cache)`` is called after
    each leaf's forward (it returns nothing).
    """

    def make_leaf(site: Site) -> Layer:
        layer = site.layer

        def leaf_forward(p, x, *, key=None, train=False):
            y, cache = layer.forward(p, x, key=key, train=train)
            if on_leaf is not None:
                on_leaf(site, p, x, y, cache)
            return y, Record(cache, x, key)

        return layer._replace(forward=leaf_forward)

    return instrument(model, make_leaf).forward(params, x, key=key, train=train)


def untape(model: Layer, tape: Any) -> Any:
    """``model``'s own cache from a :func:`forward` tape (each leaf's :class:`Record` unwrapped)."""
    for site in leaves(model):
        tape = replace_at(tape, site.cache_path, at_path(tape, site.cache_path).cache)
    return tape


def backward(
    model: Layer,
    params: Params,
    tape: Any,
    dy: jax.Array,
    leaf_backward: Callable[[Visit], tuple[Params, jax.Array]] | None = None,
    *,
    train: bool = False,
) -> tuple[Params, jax.Array]:
    """``model.backward`` from a :func:`forward` tape, with ``leaf_backward`` at each leaf.

    ``leaf_backward(visit) -> (dparams, dx)`` replaces each leaf's backward;
    ``None`` (or ``lambda v: v.backward()``) reproduces ``model.backward``.
    Hooks may record what they see in a dict or list closed over: the leaves are
    visited once each, last layer first, within the caller's trace. ``train``
    is the mode the tape was recorded in (hooks read it from the visit).
    """
    hook = leaf_backward or Visit.backward

    def make_leaf(site: Site) -> Layer:
        def leaf_backward_fn(p, record, dy):
            return hook(Visit(site, p, record.x, record.key, train, record.cache, dy))

        return site.layer._replace(backward=leaf_backward_fn)

    return instrument(model, make_leaf).backward(params, tape, dy)


def check_backward(visit: Visit, dparams: Params, dx: Any) -> None:
    """Raise unless ``dparams`` mirrors the leaf's params and ``dx`` its input (trace time).

    The contract says ``dparams`` has exactly the structure, shapes and dtypes
    of ``params``, and ``dx`` the shape of ``x``: a wrong shape would otherwise
    be broadcast by an optimizer (training silently on a wrong gradient) or
    fail deep inside optax or the next layer with a message naming no layer.
    Shapes are static, so the check costs nothing at run time.
    """
    layer = visit.layer.name
    want, got = jax.tree.structure(visit.params), jax.tree.structure(dparams)
    if want != got:
        raise ShapeError(
            layer,
            f"backward returned dparams {_shapes(dparams)} for params {_shapes(visit.params)}; "
            "dparams must mirror params (same keys and nesting)",
        )
    for (path, p), d in zip(
        jax.tree_util.tree_flatten_with_path(visit.params)[0], jax.tree.leaves(dparams), strict=True
    ):
        name = jax.tree_util.keystr(path) or "params"
        if not jnp.issubdtype(jnp.result_type(p), jnp.inexact):
            raise DTypeError(
                layer,
                f"param {name} has dtype {jnp.result_type(p)}; params must be floating-point "
                "(an integer param's gradient would be truncated to zero)",
            )
        if jnp.shape(d) != jnp.shape(p):
            raise ShapeError(
                layer,
                f"backward returned d{name} of shape {jnp.shape(d)} for a param of shape "
                f"{jnp.shape(p)}",
            )
        if jnp.result_type(d) != jnp.result_type(p):
            raise DTypeError(
                layer,
                f"backward returned d{name} of dtype {jnp.result_type(d)} for a param of dtype "
                f"{jnp.result_type(p)}",
            )
    if jnp.issubdtype(jnp.result_type(visit.x), jnp.inexact) and jnp.shape(dx) != jnp.shape(
        visit.x
    ):
        raise ShapeError(
            layer,
            f"backward returned dx of shape {jnp.shape(dx)} for an input of shape "
            f"{jnp.shape(visit.x)}",
        )


def checked_backward(visit: Visit) -> tuple[Params, jax.Array]:
    """The leaf's own backward, checked by :func:`check_backward`: the driver's default hook."""
    dparams, dx = visit.backward()
    check_backward(visit, dparams, dx)
    return dparams, dx


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda a: tuple(jnp.shape(a)), tree)


# --------------------------------------------------------------------------- per-example gradients


def _per_example_check(visit: Visit, what: str) -> None:
    reason = visit.layer.extensions and visit.layer.extensions.mixes_examples
    if reason and visit.train:
        raise ConfigError(
            visit.layer.name,
            f"{what} does not exist in training: {reason}. Use train=False (the running "
            "statistics make examples independent) or a model without it",
        )


def reads(fn: Callable[..., Any], *args: Any) -> tuple[bool, ...]:
    """For each argument of ``fn(*args)``, whether its computation reads any of its arrays.

    Found from ``fn``'s jaxpr at trace time (nothing runs): an argument that no
    operation consumes and no output is cannot influence the result. Used to
    refuse, with an error, what a generic fallback cannot do for a layer — a
    forward that draws from its key, a backward that ignores its weights.
    """
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    used |= {id(v) for v in jaxpr.outvars}
    out, start = [], 0
    for arg in args:
        n = len(jax.tree.leaves(arg))
        out.append(any(id(v) in used for v in jaxpr.invars[start : start + n]))
        start += n
    return tuple(out)


def _reads_key(visit: Visit) -> bool:
    """Whether the layer's forward uses its key (then a per-example re-run draws other numbers)."""
    if visit.key is None:
        return False
    layer, params, x, train = visit.layer, visit.params, visit.x, visit.train
    return reads(lambda k: layer.forward(params, x, key=k, train=train)[0], visit.key)[0]


def _fallback_batch_grad(visit: Visit, what: str) -> Params:
    """Each example's share of ``dparams`` by the layer's own rules, one example at a time."""
    if _reads_key(visit):
        raise ConfigError(
            visit.layer.name,
            f"{what}: this layer has parameters, declares no per-example rule and draws random "
            "numbers from its key, which a forward re-run on one example cannot reproduce; "
            "declare Extensions(batch_grad=...) or batch_l2 on the layer",
        )
    layer, params, key, train = visit.layer, visit.params, visit.key, visit.train

    def one(x_n, dy_n):
        _, cache = layer.forward(params, x_n[None], key=key, train=train)
        return layer.backward(params, cache, dy_n[None])[0]

    return jax.vmap(one)(visit.x, visit.dy)


def batch_grad(visit: Visit, *, adds_tied_uses: bool = False) -> tuple[Params, jax.Array, Params]:
    """``(dparams, dx, g)``: the backward, and each example's share ``g_n`` of ``dparams``.

    Every leaf of ``g`` has ``dparams``'s shape with a leading batch axis and
    ``Σ_n g_n = dparams``. The layer's declared ``batch_grad`` rule if any,
    else the per-example fallback (see the module docstring).

    At a site whose params are tied to another's (``visit.site.tied``), ``g``
    is this use's share only; the model's per-example gradient is the sum over
    the uses (:func:`tied_groups`). A caller that adds them says so with
    ``adds_tied_uses=True``; otherwise this raises :class:`fbp.ConfigError`
    naming the layer, so that no tool treats the two uses as independent.
    """
    _per_example_check(visit, "a per-example gradient")
    if visit.site.tied and not adds_tied_uses:
        raise ConfigError(
            visit.site.description,
            "shares its params with another layer (nn.tie): its per-example gradient is one "
            "use's share, and the model's is the sum over the uses (walk.tied_groups); "
            "pass adds_tied_uses=True where the caller adds them",
        )
    ext = visit.layer.extensions
    if ext is not None and ext.batch_grad is not None:
        return ext.batch_grad(visit.params, visit.cache, visit.dy)
    dparams, dx = visit.backward()
    if not jax.tree.leaves(visit.params):
        return dparams, dx, dparams
    return dparams, dx, _fallback_batch_grad(visit, "per-example gradients")


def batch_l2(visit: Visit) -> tuple[Params, jax.Array, Params]:
    """``(dparams, dx, sq)``: the backward, and ``‖g_n‖²`` per params leaf, shape ``(batch,)``.

    The layer's declared ``batch_l2`` rule, else squares of its ``batch_grad``
    rule, else the per-example fallback.
    """
    _per_example_check(visit, "a per-example gradient norm")
    if visit.site.tied:
        raise ConfigError(
            visit.site.description,
            "shares its params with another layer (nn.tie): the model's per-example "
            "gradient of a shared parameter is the sum of its uses', so one use's squared "
            "norm is not the model's; take walk.batch_grad at every use, add them, then "
            "square (fbp.diagnostics does)",
        )
    ext = visit.layer.extensions
    if ext is not None and ext.batch_l2 is not None:
        return ext.batch_l2(visit.params, visit.cache, visit.dy)
    dparams, dx, g = batch_grad(visit)
    return dparams, dx, jax.tree.map(row_sq_norms, g)


# --------------------------------------------------------------------------- feedback weights


def feedback_weights(site: Site, params: Params) -> tuple[Path, ...]:
    """The params paths (inside the layer's params) a credit-assignment rule replaces.

    The layer's declared ``extensions.weights``, else every floating-point
    leaf with two or more axes (a weight matrix or kernel; biases, scales and
    statistics are vectors).
    """
    ext = site.layer.extensions
    if ext is not None and ext.weights is not None:
        missing = [k for k in ext.weights if not isinstance(params, dict) or k not in params]
        if missing:
            raise ConfigError(
                site.description,
                f"declares weights {list(ext.weights)} but its params have no {missing}",
            )
        return tuple((k,) for k in ext.weights)
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jnp.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            out.append(plain_path(path))
    return tuple(out)


def plain_path(key_path: Any) -> Path:
    """A ``jax.tree_util`` key path as the plain indices and dict keys it stands for."""
    out = []
    for key in key_path:
        for attr in ("idx", "key", "name"):
            if hasattr(key, attr):
                out.append(getattr(key, attr))
                break
        else:
            raise ConfigError("walk", f"cannot follow the params path entry {key!r}")
    return tuple(out)
