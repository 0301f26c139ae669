"""The three checks — a model, a layer, any gradient function — each one jitted program.

Each check draws its finite-difference probes on the host, runs one jitted
program that computes the hand gradient, its exact reference and every probe
(compiled once per model, loss and shapes, and reused), and turns what comes
back into :class:`~fbp.verify.report.LeafCheck` rows. Little else compiles:
:func:`check_layer`'s input and cotangent, and the move off a kink, are drawn
with numpy generators seeded by the key (an eager ``jax.random`` draw compiles
a random program for every new shape), and casts to float64 are made in numpy;
only a layer's own ``init`` draws eagerly, with programs shared by every layer
of the same parameter shapes. A model is gone through
by the one walker, :mod:`fbp.nn.walk`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.errors import ConfigError
from fbp.losses import Loss, check_labels_in_range
from fbp.nn import walk
from fbp.nn.core import Layer
from fbp.verify.exact import (
    compare_exact,
    compare_trees,
    mirrors,
    path_name,
    structure_row,
    structure_rows,
    to64,
)
from fbp.verify.finite_differences import (
    FdValues,
    discrete,
    fd_rows,
    fd_values,
    make_probes,
    step_offsets,
)
from fbp.verify.report import GradCheckReport, LeafCheck, Where
from fbp.verify.tolerances import Tolerances, tolerances_for

__all__ = ["check_grad", "check_layer", "check_model"]

Params = Any


def _normal(key: jax.Array, shape: Sequence[int], dtype) -> np.ndarray:
    """Standard normals from a numpy generator seeded by ``key``'s bits: deterministic
    in the key, and nothing to compile (an eager ``jax.random.normal`` compiles a
    random program for every new shape)."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    return rng.standard_normal(tuple(shape)).astype(dtype)


def _where(site: walk.Site) -> Where:
    kind = f"{site.layer.name} {site.context}".strip()
    return Where(site.description, kind, site.path)


def _param_owner(sites: Sequence[walk.Site], param_path) -> tuple[walk.Site, tuple]:
    """Which leaf layer a params path belongs to, and the path inside that layer."""
    keys = walk.plain_path(param_path)
    best = max((s for s in sites if keys[: len(s.path)] == s.path), key=lambda s: len(s.path))
    return best, tuple(param_path)[len(best.path) :]


def _has_structure_row(rows: Sequence[LeafCheck]) -> bool:
    return any(r.method == "structure" for r in rows)


def _layer_vjp(layer: Layer, params, x, key, train, dy):
    """``jax.vjp`` of the layer's own forward: ``(dparams, dx)`` (``dx`` None for integer x)."""
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
        _, vjp = jax.vjp(lambda p, x: layer.forward(p, x, key=key, train=train)[0], params, x)
        return vjp(dy)
    _, vjp = jax.vjp(lambda p: layer.forward(p, x, key=key, train=train)[0], params)
    return vjp(dy)[0], None


class LayerResult(NamedTuple):
    """One leaf layer in the model program: its hand rule and ``jax.vjp`` at the same point."""

    dparams: Params
    ref_dparams: Params
    dx: Any
    ref_dx: Any
    x: jax.Array
    key: jax.Array | None
    dy: jax.Array

    @property
    def dx_misshapen(self) -> bool:
        """Whether the hand ``dx`` has another shape than the layer's input (static)."""
        return self.ref_dx is not None and jnp.shape(self.dx) != jnp.shape(self.ref_dx)


class ModelResult(NamedTuple):
    """What the model program returns.

    Attributes:
      dpred, ref_dpred: the loss's hand gradient and ``jax.grad`` of its value.
      layers: one :class:`LayerResult` per leaf layer, by site index.
      hand: ``model.backward``'s gradient end to end — ``None`` when a layer
        passes on a ``dx`` of the wrong shape, so that it cannot run.
      ref: ``jax.grad`` of the loss of the whole model.
      fd: the finite-difference probes of the loss.
    """

    dpred: jax.Array
    ref_dpred: jax.Array
    layers: tuple[LayerResult, ...]
    hand: Params | None
    ref: Params
    fd: FdValues


def _compare_at_leaves(train: bool, out: dict):
    """A walker hook: each leaf layer's hand rule next to ``jax.vjp``, recorded in ``out``."""

    def leaf(visit: walk.Visit):
        dparams, dx = visit.backward()
        ref_p, ref_x = _layer_vjp(visit.layer, visit.params, visit.x, visit.key, train, visit.dy)
        result = LayerResult(dparams, ref_p, dx, ref_x, visit.x, visit.key, visit.dy)
        out[visit.site.index] = result
        if ref_x is None:
            return ref_p, dx
        # Pass the hand dx on, as the real backward does — unless it cannot even
        # stand in for the reference (wrong shape), which the row reports.
        return ref_p, ref_x if result.dx_misshapen else jnp.asarray(dx, ref_x.dtype)

    return leaf


@functools.lru_cache(maxsize=64)
def _redraw_program(layer: Layer, train: bool):
    """The layer's hand rule and ``jax.vjp`` at one point, as one jitted program (run
    eagerly, its operations compiled a program each: a dozen or two per layer)."""

    def program(p, x, key, dy):
        _, cache = layer.forward(p, x, key=key, train=train)
        dparams, dx = layer.backward(p, cache, dy)
        return (dparams, dx, *_layer_vjp(layer, p, x, key, train, dy))

    return jax.jit(program)


def _redraw_exact(layer, where, p, x, key, train, dy, tol) -> list[LeafCheck] | None:
    """Re-check one layer at a slightly moved input; rows if all pass there, else ``None``.

    A hand rule and ``jax.vjp`` may pick different (equally valid) subgradients
    exactly on a kink — a max-pool tie, say. Moving the input by ~1e-7 of its
    scale breaks such ties; a wrong rule stays wrong. The move is drawn with
    numpy (seeded): a ``jax.random`` draw would compile a program per shape;
    the layer runs as one jitted program (:func:`_redraw_program`).
    """
    x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
        return None
    scale = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    scale = scale if scale > 0 else 1.0
    noise = np.random.default_rng(7).standard_normal(x.shape)
    x2 = jax.device_put(np.asarray(x + 1e-7 * scale * noise, x.dtype))
    dparams, dx, ref_p, ref_x = jax.device_get(_redraw_program(layer, bool(train))(p, x2, key, dy))
    rows = compare_trees(where, dparams, ref_p, "vjp", tol)
    rows.append(compare_exact(where, "dx", "vjp", dx, ref_x, tol))
    if not all(r.passed for r in rows):
        return None
    note = "the input sat on a kink; checked at an input moved by 1e-7 of its scale"
    return [r._replace(skipped=1, message=note) for r in rows]


@functools.lru_cache(maxsize=64)
def _model_program(model: Layer, loss: Loss, train: bool):
    """One jitted program per (model, loss): every exact comparison and every FD probe."""

    def program(params, x, y, key, probes, ts) -> ModelResult:
        pred, tape = walk.forward(model, params, x, key=key, train=train)
        dpred = loss.grad(pred, y)
        ref_dpred = jax.grad(lambda pr: loss.value(pr, y))(pred)
        recorded: dict[int, LayerResult] = {}
        walk.backward(model, params, tape, dpred, _compare_at_leaves(train, recorded), train=train)
        layers = tuple(recorded[i] for i in range(len(recorded)))

        # End to end, as fbp.value_and_grad runs it — unless a layer passes on a
        # dx of the wrong shape (known here, at trace time), which would make the
        # layers before it fail with a broadcasting error instead of a report.
        hand = None
        if not any(r.dx_misshapen for r in layers):
            pred2, cache = model.forward(params, x, key=key, train=train)
            hand, _ = model.backward(params, cache, loss.grad(pred2, y))

        def value(p):
            return loss.value(model.apply(p, x, key=key, train=train), y)

        ref = jax.grad(value)(params)

        def phi(p):
            out, cache = model.forward(p, x, key=key, train=train)
            return loss.value(out, y), discrete(cache)

        fd = fd_values(phi, params, *probes, ts)
        return ModelResult(dpred, ref_dpred, layers, hand, ref, fd)

    return jax.jit(program)


def _check_side_inputs(where: str, forward_kw: dict) -> None:
    unknown = set(forward_kw) - {"key", "train"}
    if unknown:
        raise ConfigError(
            where,
            f"unknown side inputs {sorted(unknown)}; a layer's forward takes only key= and train=",
        )


def check_model(
    model: Layer,
    loss: Loss,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array | None = None,
    train: bool = True,
    directions: int = 4,
    coordinates: int = 8,
    seed: int = 0,
    tolerances: Tolerances | None = None,
) -> GradCheckReport:
    """Check a whole model and loss: layer by layer exactly, end to end by finite differences.

    In float64, whatever the model's dtype: the loss gradient ``dpred`` is
    compared with ``jax.grad`` of the loss value; then, walking from the loss
    backwards, every leaf layer's ``dparams`` and ``dx`` with ``jax.vjp`` of
    that layer at the same cached input and incoming ``dy`` (nested ``serial``
    and ``residual`` are walked into); the gradient ``fbp.value_and_grad``
    computes end to end with ``jax.grad`` of the whole; and finally the loss is
    probed with central differences along ``directions`` random directions
    over all parameters and at ``coordinates`` sampled coordinates per leaf.
    Everything runs in one jitted program, compiled once per model, loss and
    shapes (checking the same model again reuses it). A layer whose backward
    returns ``dparams`` or ``dx`` of the wrong structure or shape fails with a
    ``"structure"`` row naming it and the leaf.

    Args:
      model: the model to check.
      loss: its loss.
      params: the point to check at (any floating dtype; cast to float64).
      x: a batch of inputs.
      y: the batch's targets.
      key: random key passed to every layer's forward (dropout), as in training.
      train: passed to every layer's forward (``True`` by default, as for
        training).
      directions: random directional derivatives over all parameters at once.
      coordinates: sampled coordinates per leaf (seeded by the leaf's path).
      seed: seed of the random directions.
      tolerances: overrides the per-dtype defaults (:data:`DEFAULT_TOLERANCES`).

    Returns:
      A :class:`GradCheckReport`; ``report.raise_if_failed()`` names the first
      failing layer walking back from the loss, and its leaf.

    Example:
      >>> import jax, fbp
      >>> from fbp import nn, losses, verify
      >>> model = nn.serial(nn.dense(8), nn.tanh(), nn.dense(4))
      >>> params, _ = model.init(jax.random.key(0), (6,))
      >>> x = jax.random.normal(jax.random.key(1), (7, 6))
      >>> y = jax.numpy.array([0, 1, 2, 3, 0, 1, 2])
      >>> verify.check_model(model, losses.softmax_cross_entropy, params, x, y).ok
      True
    """
    if not isinstance(model, Layer):
        raise ConfigError("check_model", f"model must be a Layer, got {type(model).__name__}")
    if not isinstance(loss, Loss):
        raise ConfigError("check_model", f"loss must be a Loss, got {type(loss).__name__}")
    if y is not None and jnp.issubdtype(jnp.result_type(y), jnp.integer) and jnp.ndim(y) == 1:
        # Labels reach the loss as tracers inside the program; check them here.
        out_shape = jax.eval_shape(lambda p, x: model.apply(p, x, key=key, train=train), params, x)
        check_labels_in_range(loss.name, y, out_shape.shape[-1])

    rows: list[LeafCheck] = []
    loss_where = Where(f"loss ({loss.name})", f"loss {loss.name}")
    end_where = Where("model (end to end)", model.name)
    with jax.enable_x64(True):
        params64, x64, y64 = to64(params), to64(x), to64(y)
        probes = make_probes(params64, int(directions), int(coordinates), int(seed))
        run = _model_program(model, loss, bool(train))
        loss_dtype = jax.eval_shape(
            lambda p: loss.value(model.apply(p, x64, key=key, train=train), y64), params64
        ).dtype
        fd_tol = tolerances or tolerances_for(loss_dtype)
        out: ModelResult = jax.device_get(
            run(params64, x64, y64, key, probes.arrays(), step_offsets(fd_tol.steps))
        )

        rows.append(compare_exact(loss_where, "dpred", "vjp", out.dpred, out.ref_dpred, tolerances))
        sites = walk.leaves(model)
        redrawn = False
        for site in reversed(sites):
            where = _where(site)
            got = out.layers[site.index]
            layer_rows = compare_trees(where, got.dparams, got.ref_dparams, "vjp", tolerances)
            if got.ref_dx is not None:
                layer_rows.append(compare_exact(where, "dx", "vjp", got.dx, got.ref_dx, tolerances))
            if not all(r.passed for r in layer_rows) and not _has_structure_row(layer_rows):
                p = walk.at_path(params64, site.path)
                again = _redraw_exact(
                    site.layer, where, p, got.x, got.key, train, got.dy, tolerances
                )
                if again is not None:
                    layer_rows, redrawn = again, True
            rows.extend(layer_rows)

        misshapen = [s for s in reversed(sites) if out.layers[s.index].dx_misshapen]
        if misshapen:
            got = out.layers[misshapen[0].index]
            rows.append(
                structure_row(
                    end_where,
                    "params",
                    f"model.backward not run: {misshapen[0].description} passes on dx of shape "
                    f"{tuple(np.shape(got.dx))} for its input of shape {tuple(np.shape(got.x))}",
                )
            )
        else:
            end_rows = compare_trees(end_where, out.hand, out.ref, "grad", tolerances)
            if redrawn:
                note = "differs only through a layer redrawn off a kink (see above)"
                end_rows = [
                    r
                    if r.passed or r.method == "structure"
                    else r._replace(passed=True, message=note)
                    for r in end_rows
                ]
            rows.extend(end_rows)
            # Native dtype: value_and_grad's gradient must mirror params as given.
            native = jax.eval_shape(
                lambda p: model.backward(
                    p,
                    model.forward(p, x, key=key, train=train)[1],
                    model.apply(p, x, key=key, train=train),
                )[0],
                params,
            )
            rows.extend(structure_rows(Where("model (native dtype)", model.name), params, native))

            if not _has_structure_row(end_rows):

                def leaf_where(param_path):
                    site, inner = _param_owner(sites, param_path)
                    return _where(site), path_name(inner)

                usable = out.hand is not None and mirrors(out.hand, params64)
                rows.extend(
                    fd_rows(
                        out.fd,
                        out.hand if usable else None,
                        params64,
                        probes,
                        fd_tol,
                        float(jnp.finfo(loss_dtype).eps),
                        Where("model", model.name),
                        leaf_where,
                    )
                )
    return GradCheckReport(rows, title=f"check_model({model.name}, {loss.name})")


class LayerCheckResult(NamedTuple):
    """What the layer program returns: the hand rule, ``jax.vjp``, and the probes.

    With integer inputs, ``dx`` and ``ref_dx`` are both a boolean: whether the
    hand ``dx`` is the ``float0`` cotangent of the input's shape.
    """

    dparams: Params
    ref_dparams: Params
    dx: Any
    ref_dx: Any
    fd: FdValues


@functools.lru_cache(maxsize=64)
def _layer_program(layer: Layer, key_given: bool, train: bool, discrete_x: bool = False):
    """The jitted check of one layer; with ``discrete_x`` the input (integer ids) is
    held fixed: finite differences run over params only, and ``dx`` must be the
    ``float0`` cotangent JAX gives integer inputs."""

    def program(params, x, fwd_key, dy, probes, ts) -> LayerCheckResult:
        kw = {"key": fwd_key if key_given else None, "train": train}
        _, cache = layer.forward(params, x, **kw)
        dparams, dx = layer.backward(params, cache, dy)
        ref_p, ref_x = _layer_vjp(layer, params, x, kw["key"], train, dy)
        if discrete_x:
            dx_ok = getattr(dx, "dtype", None) == jax.dtypes.float0 and (
                jnp.shape(dx) == jnp.shape(x)
            )
            dx = ref_x = jnp.asarray(dx_ok)

        def phi(point):
            out, cache = layer.forward(point["params"], point.get("x", x), **kw)
            return jnp.vdot(out, dy), discrete(cache)

        point = {"params": params} if discrete_x else {"params": params, "x": x}
        fd = fd_values(phi, point, *probes, ts)
        return LayerCheckResult(dparams, ref_p, dx, ref_x, fd)

    return jax.jit(program)


def check_layer(
    layer: Layer,
    key: jax.Array,
    input_shape: Sequence[int],
    /,
    *,
    batch_size: int = 3,
    directions: int = 4,
    coordinates: int = 8,
    tolerances: Tolerances | None = None,
    inputs: Any = None,
    **forward_kw: Any,
) -> GradCheckReport:
    """Draw params and inputs and check ``layer.backward``, both ``dparams`` and ``dx``.

    References: ``jax.vjp`` of ``layer.forward`` with a random cotangent ``dy``
    (exact, whole arrays), and central finite differences in float64 of
    ``⟨forward(params, x), dy⟩`` — whose gradient is exactly what
    ``backward(params, cache, dy)`` claims — over params and input together.
    Also checks that ``dparams`` has the structure, shapes and dtypes of
    ``params`` at the layer's own dtype. Inputs on a kink (ReLU at 0) are
    skipped by the finite differences and redrawn for the exact check.

    Args:
      layer: the layer to check.
      key: JAX key for params, inputs and the cotangent (positional).
      input_shape: one example's shape (no batch axis), as for ``layer.init``.
      batch_size: examples in the drawn batch.
      directions: random directional derivatives over params and input at once.
      coordinates: sampled coordinates per leaf (seeded by the leaf's path).
      tolerances: overrides the per-dtype defaults (:data:`DEFAULT_TOLERANCES`).
      inputs: the batch to check at, ``(batch, *input_shape)``, instead of a
        standard-normal draw — e.g. integer ids for :func:`fbp.nn.embedding`.
        Integer inputs are held fixed: finite differences run over the params,
        and ``dx`` must be the ``float0`` zeros JAX gives integer inputs.
      **forward_kw: side inputs for the forward: ``key=`` (dropout) and
        ``train=``; anything else is an error.

    Returns:
      A :class:`GradCheckReport`.

    Example:
      >>> import jax
      >>> from fbp import nn, verify
      >>> verify.check_layer(nn.dense(4), jax.random.key(0), (3,)).ok
      True
      >>> ids = jax.numpy.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 0]])
      >>> verify.check_layer(nn.embedding(10, 3), jax.random.key(0), (5,), inputs=ids).ok
      True
    """
    if not isinstance(layer, Layer):
        raise ConfigError("check_layer", f"expected a Layer, got {type(layer).__name__}")
    _check_side_inputs("check_layer", forward_kw)
    fwd_key, train = forward_kw.get("key"), bool(forward_kw.get("train", False))
    k_init, k_x, k_dy, k_fd = jax.random.split(key, 4)
    params, _ = layer.init(k_init, tuple(input_shape))
    if inputs is None:
        x = jax.device_put(_normal(k_x, (batch_size, *input_shape), np.float32))
    else:
        x = jnp.asarray(inputs)
        if x.ndim < 1 or tuple(x.shape[1:]) != tuple(input_shape):
            raise ConfigError(
                "check_layer",
                f"inputs must have shape (batch, *input_shape) = (batch, "
                f"{', '.join(map(str, input_shape))}), got {tuple(x.shape)}",
            )
    discrete_x = not jnp.issubdtype(x.dtype, jnp.inexact)
    where = Where(f"layer ({layer.name})", layer.name, ())
    # The contract at the layer's own dtype: dparams mirrors params.
    native = jax.eval_shape(
        lambda p, x: layer.backward(p, *reversed(layer.forward(p, x, **forward_kw)))[0], params, x
    )
    rows = structure_rows(
        Where(f"layer ({layer.name}, native dtype)", layer.name, ()), params, native
    )
    with jax.enable_x64(True):
        params64, x64 = to64(params), to64(x)
        point = {"params": params64} if discrete_x else {"params": params64, "x": x64}
        seed = int(np.asarray(jax.random.key_data(k_fd)).ravel()[-1])
        probes = make_probes(point, int(directions), int(coordinates), seed)
        out_shape = jax.eval_shape(lambda p, x: layer.forward(p, x, **forward_kw)[0], params64, x64)
        dy = jax.device_put(_normal(k_dy, out_shape.shape, np.float64))
        run = _layer_program(layer, fwd_key is not None, train, discrete_x)
        fd_tol = tolerances or tolerances_for(out_shape.dtype)
        out: LayerCheckResult = jax.device_get(
            run(params64, x64, fwd_key, dy, probes.arrays(), step_offsets(fd_tol.steps))
        )
        exact = compare_trees(where, out.dparams, out.ref_dparams, "vjp", tolerances)
        if not discrete_x:
            exact.append(compare_exact(where, "dx", "vjp", out.dx, out.ref_dx, tolerances))
        elif not bool(out.dx):
            exact.append(
                structure_row(
                    where,
                    "dx",
                    f"integer inputs {x.dtype}{list(x.shape)} take a float0 cotangent of "
                    "their shape (np.zeros(x.shape, jax.dtypes.float0)); the backward "
                    "returned something else",
                )
            )
        if not discrete_x and not all(r.passed for r in exact) and not _has_structure_row(exact):
            again = _redraw_exact(layer, where, params64, x64, fwd_key, train, dy, tolerances)
            exact = again or exact
        rows += exact
        if not _has_structure_row(rows):

            def leaf_where(path):
                keys = tuple(path)
                inner = keys[1:] if keys[0].key == "params" else ()
                return where, path_name(inner) if inner or keys[0].key == "params" else "x"

            usable = mirrors(out.dparams, params64) and (
                discrete_x or np.shape(out.dx) == np.shape(x64)
            )
            hand = {"params": out.dparams} if discrete_x else {"params": out.dparams, "x": out.dx}
            rows += fd_rows(
                out.fd,
                hand if usable else None,
                point,
                probes,
                fd_tol,
                float(jnp.finfo(out_shape.dtype).eps),
                where,
                leaf_where,
            )
    return GradCheckReport(rows, title=f"check_layer({layer.name})")


class GradResult(NamedTuple):
    """What the gradient program returns: the claim, ``jax.grad``, and the probes."""

    hand: Params
    ref: Params
    fd: FdValues


@functools.lru_cache(maxsize=64)
def _grad_program(f: Callable, grad_f: Callable):
    def program(params, args, probes, ts) -> GradResult:
        hand = grad_f(params, *args)
        ref = jax.grad(f)(params, *args)
        fd = fd_values(lambda p: (f(p, *args), []), params, *probes, ts)
        return GradResult(hand, ref, fd)

    return jax.jit(program)


def check_grad(
    f: Callable[..., jax.Array],
    grad_f: Callable[..., Any],
    params: Params,
    *args: Any,
    directions: int = 4,
    coordinates: int = 8,
    seed: int = 0,
    tolerances: Tolerances | None = None,
) -> GradCheckReport:
    """Check a claimed gradient function of any scalar function.

    ``grad_f(params, *args)`` is compared with ``jax.grad(f)(params, *args)``
    (exactly, per leaf) and with central finite differences of ``f`` in
    float64 along random directions and at sampled coordinates of every leaf —
    for code that is not built from fbp layers. Both functions must be
    jit-able; ``args`` are held fixed.

    Args:
      f: ``f(params, *args) -> scalar``.
      grad_f: ``grad_f(params, *args) -> pytree like params``, the claim.
      params: the point (a pytree of floating arrays).
      *args: further arguments of both, held fixed.
      directions: random directional derivatives over all of ``params``.
      coordinates: sampled coordinates per leaf (seeded by the leaf's path).
      seed: seed of the random directions.
      tolerances: overrides the per-dtype defaults (:data:`DEFAULT_TOLERANCES`).

    Returns:
      A :class:`GradCheckReport` whose rows are labelled ``f (name)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from fbp import verify
      >>> f = lambda w, x: jnp.sum((x @ w) ** 2)
      >>> grad_f = lambda w, x: 2 * x.T @ (x @ w)
      >>> verify.check_grad(f, grad_f, jnp.ones((3, 2)), jnp.ones((4, 3))).ok
      True
    """
    name = getattr(f, "__name__", "f")
    where = Where(f"f ({name})", name)
    with jax.enable_x64(True):
        params64, args64 = to64(params), to64(args)
        probes = make_probes(params64, int(directions), int(coordinates), int(seed))
        out_dtype = jax.eval_shape(lambda p: f(p, *args64), params64).dtype
        fd_tol = tolerances or tolerances_for(out_dtype)
        run = _grad_program(f, grad_f)
        out: GradResult = jax.device_get(
            run(params64, args64, probes.arrays(), step_offsets(fd_tol.steps))
        )
        # Code outside fbp may return another float dtype than it was given:
        # structure and shapes must match; a narrower dtype sets the tolerance.
        rows = compare_trees(where, out.hand, out.ref, "grad", tolerances, dtypes=False)
        if not _has_structure_row(rows):
            rows += fd_rows(
                out.fd,
                out.hand if mirrors(out.hand, params64) else None,
                params64,
                probes,
                fd_tol,
                float(jnp.finfo(out_dtype).eps),
                where,
                lambda path: (where, path_name(path)),
            )
    return GradCheckReport(rows, title=f"check_grad({name})")
