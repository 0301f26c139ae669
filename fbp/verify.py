"""Prove hand-derived gradients right — and say exactly where one is wrong.

Every check runs in float64 (x64 is switched on only inside the check, with the
scoped ``jax.enable_x64``), whatever the model's dtype, and combines two
independent references:

1. **Exact, layer by layer.** Walking the model from the loss backwards, each
   layer's hand ``backward`` is compared with ``jax.vjp`` of *that same layer's*
   ``forward``, at the same cached input and the same incoming gradient ``dy``.
   Both sides compute the same products in float64 and differ only by
   summation order (~1e-14 relative), so the default tolerance of 1e-9 catches
   even a single wrong element among millions, and the first failing layer
   walking back from the loss is the culprit: layers before it only inherit
   its wrong ``dx``.
2. **Finite differences, end to end.** Central differences of the scalar loss
   along a few random directions over all parameters at once, plus a seeded
   sample of coordinates of every leaf (the coordinates of a leaf are drawn
   from its path, so adding a parameter elsewhere changes no other leaf's
   probes). Cost grows with the number of probes, not of parameters. Each
   probe calibrates its own tolerance: it also evaluates the difference with
   a doubled step, and the disagreement of the two measures the truncation
   and round-off noise of that very probe. A probe whose one-sided slopes
   disagree straddles a kink (ReLU at 0, a max-pool tie); it is skipped and
   counted, never a false alarm.

The result is a :class:`GradCheckReport`: data first (one :class:`LeafCheck` per
leaf and method), printed as a table, shown as HTML in Jupyter, and turned into
a :class:`GradientCheckError` naming the layer and leaf by ``raise_if_failed``.
:func:`wrong_rules` publishes a catalogue of deliberately wrong backward rules
as exercises: each one is caught and pinned to its layer.
"""

from __future__ import annotations

import html
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fbp.errors import FbpError
from fbp.losses import Loss
from fbp.nn.core import Layer

__all__ = [
    "GradCheckReport",
    "GradientCheckError",
    "LeafCheck",
    "Tolerances",
    "WrongRule",
    "check_grad",
    "check_layer",
    "check_model",
    "wrong_rules",
]

Params = Any


class Tolerances(NamedTuple):
    """How close is close enough.

    Attributes:
      vjp_rtol: hand vs ``jax.vjp`` of the same layer, relative to the leaf's
        largest reference magnitude. Both are float64 evaluations of the same
        products, so they agree to ~1e-14; 1e-9 leaves five orders of margin
        and still flags one element off by a millionth of the leaf's scale.
      fd_rtol: floor of the finite-difference tolerance, relative to the
        probe's scale (the sum of the magnitudes of the terms of the
        directional derivative). A central difference in float64 with the
        steps used here is accurate to ~1e-8 of that scale on smooth
        functions.
      fd_noise_factor: a probe passes when its error is at most this many
        times its own measured noise (the disagreement of the steps h and 2h),
        or below the ``fd_rtol`` floor.
      kink_rtol: one-sided slopes disagreeing by more than this fraction of
        the probe's scale mark a probe that straddles a kink; it is skipped.
    """

    vjp_rtol: float = 1e-9
    fd_rtol: float = 1e-6
    fd_noise_factor: float = 100.0
    kink_rtol: float = 1e-3


DEFAULT_TOLERANCES = Tolerances()
"""The defaults documented in :class:`Tolerances`."""


class LeafCheck(NamedTuple):
    """One row of a report: one leaf, one method.

    Attributes:
      layer: where the leaf lives, e.g. ``"layer 2 (dense(→10))"``, ``"loss"``
        or ``"model"`` (end-to-end rows).
      leaf: the leaf's path inside the layer's params (``"w"``), or ``"dx"``
        for the gradient a layer passes on, ``"dpred"`` for the loss's.
      method: ``"vjp"`` (exact, same layer), ``"fd-directions"`` or
        ``"fd-coordinates"`` (finite differences) or ``"structure"``.
      max_abs_err, max_rel_err: worst absolute error and the same relative to
        the reference's scale.
      index: index of the worst element (``None`` for directions).
      hand, reference: the two values there.
      probes: how many elements (vjp) or finite-difference probes were compared.
      skipped: probes skipped because they straddle a kink.
      passed: whether the row is within tolerance.
      message: extra explanation (structure mismatches).
    """

    layer: str
    leaf: str
    method: str
    max_abs_err: float
    max_rel_err: float
    index: tuple[int, ...] | None
    hand: float
    reference: float
    probes: int
    skipped: int
    passed: bool
    message: str = ""


class GradientCheckError(FbpError, AssertionError):
    """A hand-derived gradient disagrees with its references."""


@dataclass
class GradCheckReport:
    """The verdict of a gradient check: rows first, renderings second.

    ``str(report)`` is a terminal table, ``report._repr_html_()`` an HTML
    table for Jupyter, ``report.ok`` the overall verdict, and
    ``report.raise_if_failed()`` raises :class:`GradientCheckError` naming
    the culprit — the first failing layer walking back from the loss.
    """

    rows: list[LeafCheck] = field(default_factory=list)
    title: str = "gradient check"

    @property
    def ok(self) -> bool:
        """True when every row passed."""
        return all(row.passed for row in self.rows)

    @property
    def failures(self) -> list[LeafCheck]:
        """The failing rows, in the order they were checked (from the loss backwards)."""
        return [row for row in self.rows if not row.passed]

    @property
    def culprit(self) -> LeafCheck | None:
        """The first failing exact (or structure) row walking back from the loss, if any."""
        exact = [r for r in self.failures if r.method in ("vjp", "structure")]
        return (exact or self.failures or [None])[0]

    def raise_if_failed(self) -> None:
        """Raise :class:`GradientCheckError` naming the layer and leaf of the culprit."""
        row = self.culprit
        if row is None:
            return
        others = len(self.failures) - 1
        detail = row.message or (
            f"hand {row.hand:.6g} vs reference {row.reference:.6g} at index {row.index} "
            f"(relative error {row.max_rel_err:.2e})"
        )
        raise GradientCheckError(
            row.layer,
            f"leaf {row.leaf!r} fails the {row.method} check: {detail}"
            + (f"; {others} more rows fail (see the report)" if others > 0 else ""),
        )

    def __str__(self) -> str:
        header = (
            "layer",
            "leaf",
            "method",
            "max abs err",
            "max rel err",
            "worst at",
            "hand",
            "reference",
            "probes",
            "kinks",
            "ok",
        )
        lines = [
            [
                r.layer,
                r.leaf,
                r.method,
                f"{r.max_abs_err:.2e}",
                f"{r.max_rel_err:.2e}",
                "" if r.index is None else str(r.index),
                f"{r.hand:.6g}",
                f"{r.reference:.6g}",
                str(r.probes),
                str(r.skipped),
                "PASS" if r.passed else "FAIL",
            ]
            for r in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [
            f"{self.title}: {'PASSED' if self.ok else 'FAILED'}",
            fmt.format(*header),
            fmt.format(*("-" * w for w in widths)),
        ]
        out += [fmt.format(*line) for line in lines]
        out += [f"  note: {r.layer} {r.leaf}: {r.message}" for r in self.rows if r.message]
        return "\n".join(out)

    def _repr_html_(self) -> str:
        cells = "".join(
            "<tr style='background:{}'>{}</tr>".format(
                "#e8f5e9" if r.passed else "#ffebee",
                "".join(
                    f"<td>{html.escape(str(v))}</td>"
                    for v in (
                        r.layer,
                        r.leaf,
                        r.method,
                        f"{r.max_abs_err:.2e}",
                        f"{r.max_rel_err:.2e}",
                        "" if r.index is None else r.index,
                        f"{r.hand:.6g}",
                        f"{r.reference:.6g}",
                        r.probes,
                        r.skipped,
                        "PASS" if r.passed else "FAIL",
                    )
                ),
            )
            for r in self.rows
        )
        head = "".join(
            f"<th>{h}</th>"
            for h in (
                "layer",
                "leaf",
                "method",
                "max abs err",
                "max rel err",
                "worst at",
                "hand",
                "reference",
                "probes",
                "kinks",
                "ok",
            )
        )
        verdict = "PASSED" if self.ok else "FAILED"
        return (
            f"<p><b>{html.escape(self.title)}: {verdict}</b></p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"
        )


# --------------------------------------------------------------------------- helpers


def _to64(tree: Any) -> Any:
    """Cast floating leaves to float64 (call inside ``jax.enable_x64``)."""
    return jax.tree.map(
        lambda a: (
            jnp.asarray(a, jnp.float64)
            if jnp.issubdtype(jnp.result_type(a), jnp.floating)
            else jnp.asarray(a)
        ),
        tree,
    )


def _path_name(path) -> str:
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    return name if name else "(root)"


def _compare_exact(layer_name: str, leaf: str, hand, ref, rtol: float) -> LeafCheck:
    hand = np.asarray(hand, np.float64)
    ref = np.asarray(ref, np.float64)
    if hand.shape != ref.shape:
        return LeafCheck(
            layer_name,
            leaf,
            "structure",
            math.inf,
            math.inf,
            None,
            math.nan,
            math.nan,
            0,
            0,
            False,
            f"hand gradient has shape {hand.shape}, expected {ref.shape}",
        )
    if hand.size == 0:
        return LeafCheck(layer_name, leaf, "vjp", 0.0, 0.0, None, 0.0, 0.0, 0, 0, True)
    diff = np.abs(hand - ref)
    diff = np.where(np.isnan(diff), np.inf, diff)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    scale = float(np.max(np.abs(ref)))
    err = float(diff[worst])
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    passed = err <= rtol * scale + 1e-300
    return LeafCheck(
        layer_name,
        leaf,
        "vjp",
        err,
        rel,
        tuple(int(i) for i in worst),
        float(hand[worst]),
        float(ref[worst]),
        int(hand.size),
        0,
        bool(passed),
    )


def _compare_tree(layer_name: str, hand_tree, ref_tree, rtol: float, prefix: str = "") -> list:
    hand_leaves, hand_def = jax.tree_util.tree_flatten_with_path(hand_tree)
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(ref_tree)
    if hand_def != ref_def:
        return [
            LeafCheck(
                layer_name,
                prefix or "params",
                "structure",
                math.inf,
                math.inf,
                None,
                math.nan,
                math.nan,
                0,
                0,
                False,
                f"gradient structure {hand_def} differs from params' {ref_def}",
            )
        ]
    rows = []
    for (path, hand), (_, ref) in zip(hand_leaves, ref_leaves, strict=True):
        rows.append(_compare_exact(layer_name, prefix + _path_name(path), hand, ref, rtol))
    return rows


def _structure_rows(layer_name: str, params, dparams) -> list[LeafCheck]:
    """``dparams`` must mirror ``params``: structure, shapes and dtypes."""
    p_def, d_def = jax.tree.structure(params), jax.tree.structure(dparams)
    if p_def != d_def:
        return [
            LeafCheck(
                layer_name,
                "params",
                "structure",
                math.inf,
                math.inf,
                None,
                math.nan,
                math.nan,
                0,
                0,
                False,
                f"dparams has structure {d_def}, params {p_def}",
            )
        ]
    rows = []
    for (path, p), d in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(dparams), strict=True
    ):
        if jnp.shape(p) != jnp.shape(d) or jnp.result_type(p) != jnp.result_type(d):
            rows.append(
                LeafCheck(
                    layer_name,
                    _path_name(path),
                    "structure",
                    math.inf,
                    math.inf,
                    None,
                    math.nan,
                    math.nan,
                    0,
                    0,
                    False,
                    f"dparams leaf is {jnp.result_type(d)}{list(jnp.shape(d))}, params leaf is "
                    f"{jnp.result_type(p)}{list(jnp.shape(p))}",
                )
            )
    return rows


def _coordinate_sample(path_name: str, size: int, count: int) -> np.ndarray:
    """The flat indices probed in a leaf: drawn from a seed derived from the leaf's path alone."""
    rng = np.random.default_rng(zlib.crc32(path_name.encode()))
    return np.sort(rng.choice(size, size=min(count, size), replace=False))


# --------------------------------------------------------------------------- finite differences


def _fd_rows(
    phi: Callable[[Any], jax.Array],
    point: Any,
    hand: Any,
    key: jax.Array,
    *,
    directions: int,
    coordinates: int,
    tol: Tolerances,
    layer_name: str = "model",
    step: float = 1e-5,
) -> list[LeafCheck]:
    """Finite-difference rows for a scalar ``phi`` at ``point`` against its claimed gradient.

    ``point`` and ``hand`` are pytrees of the same structure (float64). All
    probes — the random directions and every leaf's sampled coordinates — are
    evaluated by one compiled program, sequentially (``lax.map``), so memory
    stays at a few copies of the parameters whatever the number of probes.
    """
    flat, unravel = ravel_pytree(point)
    g_flat, _ = ravel_pytree(hand)
    if flat.size == 0:
        return []
    leaves_with_path = jax.tree_util.tree_flatten_with_path(point)[0]
    sizes = [int(np.size(leaf)) for _, leaf in leaves_with_path]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    # Each leaf is probed on its own scale (its RMS, at least 1e-2).
    scales = [
        max(float(np.sqrt(np.mean(np.square(np.asarray(leaf))))), 1e-2) if np.size(leaf) else 1.0
        for _, leaf in leaves_with_path
    ]
    elem_scale = jnp.asarray(
        np.concatenate([np.full(n, sc) for n, sc in zip(sizes, scales, strict=True)])
    )
    # A seeded sample of coordinates of every leaf, drawn from the leaf's path.
    picks, owners = [], []
    for leaf_index, ((path, _), size) in enumerate(zip(leaves_with_path, sizes, strict=True)):
        if size and coordinates:
            chosen = _coordinate_sample(_path_name(path), size, coordinates)
            picks.append(offsets[leaf_index] + chosen)
            owners += [leaf_index] * len(chosen)
    coord_index = np.concatenate(picks).astype(np.int64) if picks else np.zeros(0, np.int64)
    directions_v = (
        jax.random.normal(key, (directions, flat.size), jnp.float64) * elem_scale[None, :]
    )
    coord_scale = elem_scale[coord_index]
    base, dir_values, coord_values = _probe(
        phi, unravel, flat, directions_v, jnp.asarray(coord_index), coord_scale, step
    )
    base = float(base)
    rows = []
    if directions:
        dots = np.asarray(directions_v @ g_flat)
        term_scale = np.asarray(jnp.abs(directions_v) @ jnp.abs(g_flat))
        rows.append(
            _judge(
                layer_name,
                "all leaves",
                "fd-directions",
                np.asarray(dir_values),
                base,
                dots,
                term_scale,
                None,
                step,
                tol,
            )
        )
    coord_values = np.asarray(coord_values)
    owners = np.asarray(owners)
    g_coord = np.asarray(g_flat)[coord_index] * np.asarray(coord_scale)
    for leaf_index, (path, leaf) in enumerate(leaves_with_path):
        mine = np.flatnonzero(owners == leaf_index)
        if not len(mine):
            continue
        where = [
            np.unravel_index(int(coord_index[i] - offsets[leaf_index]), np.shape(leaf))
            for i in mine
        ]
        rows.append(
            _judge(
                layer_name,
                _path_name(path),
                "fd-coordinates",
                coord_values[mine],
                base,
                g_coord[mine],
                np.abs(g_coord[mine]),
                where,
                step,
                tol,
            )
        )
    return rows


def _probe(phi, unravel, flat, directions_v, coord_index, coord_scale, step):
    """``phi`` at ``flat ± h v, ± 2h v`` for every direction and coordinate probe."""
    coefs = jnp.asarray([-2.0, -1.0, 1.0, 2.0]) * step

    @jax.jit
    def run(flat, directions_v, coord_index, coord_scale):
        f = lambda theta: phi(unravel(theta))  # noqa: E731

        def along(v):
            return jax.vmap(lambda c: f(flat + c * v))(coefs)

        def along_coordinate(args):
            i, scale = args
            return jax.vmap(lambda c: f(flat.at[i].add(c * scale)))(coefs)

        dirs = jax.lax.map(along, directions_v) if directions_v.shape[0] else jnp.zeros((0, 4))
        coords = (
            jax.lax.map(along_coordinate, (coord_index, coord_scale))
            if coord_index.shape[0]
            else jnp.zeros((0, 4))
        )
        return f(flat), dirs, coords

    return run(flat, directions_v, coord_index, coord_scale)


def _judge(layer_name, leaf, method, values, base, dots, term_scale, where, step, tol):
    """Turn probe values ``phi(±h v), phi(±2h v)`` into one row."""
    m2, m1, p1, p2 = values[:, 0], values[:, 1], values[:, 2], values[:, 3]
    fd_h = (p1 - m1) / (2 * step)
    fd_2h = (p2 - m2) / (4 * step)
    forward = (p1 - base) / step
    backward = (base - m1) / step
    scale = np.maximum(term_scale, np.abs(fd_h))
    scale = np.maximum(scale, 1e-300)
    roundoff = 64 * np.finfo(np.float64).eps * (abs(base) + 1.0) / step
    noise = np.abs(fd_h - fd_2h) + roundoff
    kink = np.abs(forward - backward) > tol.kink_rtol * np.maximum(scale, roundoff)
    err = np.abs(dots - fd_h)
    allowed = np.maximum(tol.fd_noise_factor * noise, tol.fd_rtol * scale)
    ok = (err <= allowed) | kink
    considered = ~kink
    rel = np.where(considered, err / scale, 0.0)
    worst = int(np.argmax(rel)) if considered.any() else 0
    index = None if where is None else tuple(int(i) for i in where[worst])
    return LeafCheck(
        layer_name,
        leaf,
        method,
        float(err[worst]) if considered.any() else 0.0,
        float(rel[worst]),
        index,
        float(dots[worst]),
        float(fd_h[worst]),
        int(considered.sum()),
        int(kink.sum()),
        bool(ok.all()),
    )


class _Collector:
    """Comparisons planned while tracing, judged after one compiled run.

    Tracing the whole layer-by-layer walk inside one ``jax.jit`` compiles one
    program per check instead of dispatching every layer's ``jax.vjp`` op by
    op; the static parts (structure and dtype mismatches) become rows at once.
    """

    def __init__(self):
        self.plan: list = []  # ("row", LeafCheck) | ("cmp", name, leaf, only_failures)
        self.arrays: list = []

    def static(self, rows):
        self.plan += [("row", row) for row in rows]

    def exact(self, name, leaf, hand, ref, only_failures=False):
        if jnp.shape(hand) != jnp.shape(ref):
            self.static(
                [
                    LeafCheck(
                        name,
                        leaf,
                        "structure",
                        math.inf,
                        math.inf,
                        None,
                        math.nan,
                        math.nan,
                        0,
                        0,
                        False,
                        f"hand gradient has shape {jnp.shape(hand)}, expected {jnp.shape(ref)}",
                    )
                ]
            )
            return
        self.plan.append(("cmp", name, leaf, only_failures))
        self.arrays.append((hand, ref))

    def tree(self, name, hand_tree, ref_tree, only_failures=False):
        hand_leaves, hand_def = jax.tree_util.tree_flatten_with_path(hand_tree)
        ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(ref_tree)
        if hand_def != ref_def:
            self.static(
                [
                    LeafCheck(
                        name,
                        "params",
                        "structure",
                        math.inf,
                        math.inf,
                        None,
                        math.nan,
                        math.nan,
                        0,
                        0,
                        False,
                        f"gradient structure {hand_def} differs from params' {ref_def}",
                    )
                ]
            )
            return
        for (path, hand), (_, ref) in zip(hand_leaves, ref_leaves, strict=True):
            self.exact(name, _path_name(path), hand, ref, only_failures)

    def rows(self, arrays, rtol):
        out, it = [], iter(arrays)
        for entry in self.plan:
            if entry[0] == "row":
                out.append(entry[1])
                continue
            _, name, leaf, only_failures = entry
            hand, ref = next(it)
            row = _compare_exact(name, leaf, hand, ref, rtol)
            if not (only_failures and row.passed):
                out.append(row)
        return out


# --------------------------------------------------------------------------- walking a model


def _label(path: tuple[int, ...], layer: Layer) -> str:
    if not path:
        return f"model ({layer.name})"
    return f"layer {'.'.join(map(str, path))} ({layer.name})"


def _walk_forward(layer: Layer, params, x, key, train, path, records):
    """Forward like ``layer.forward`` does, recording every leaf layer's input and cache."""
    if layer.name == "serial" and layer.children:
        n = len(layer.children)
        keys = jax.random.split(key, n) if key is not None else (None,) * n
        caches = []
        for i, (child, p, k) in enumerate(zip(layer.children, params, keys, strict=True)):
            x, c = _walk_forward(child, p, x, k, train, (*path, i), records)
            caches.append(c)
        return x, tuple(caches)
    if layer.name == "residual" and layer.children:
        fx, c = _walk_forward(layer.children[0], params, x, key, train, path, records)
        return x + fx, c
    y, cache = layer.forward(params, x, key=key, train=train)
    records[path] = (layer, params, x, key, cache)
    return y, cache


def _walk_backward(layer: Layer, params, dy, path, records, collect: _Collector):
    """Backward like ``layer.backward``, planning each leaf layer's check against ``jax.vjp``."""
    if layer.name == "serial" and layer.children:
        dparams = [None] * len(layer.children)
        for i in reversed(range(len(layer.children))):
            dparams[i], dy = _walk_backward(
                layer.children[i], params[i], dy, (*path, i), records, collect
            )
        return tuple(dparams), dy
    if layer.name == "residual" and layer.children:
        dparams, dx = _walk_backward(layer.children[0], params, dy, path, records, collect)
        return dparams, dy + dx
    leaf_layer, p, x, key, cache = records[path]
    name = _label(path, leaf_layer)
    dparams, dx = leaf_layer.backward(p, cache, dy)
    structure = _structure_rows(name, p, dparams)
    ref_p, ref_x = _layer_vjp(leaf_layer, p, x, key, dy, records["train"])
    if structure:
        collect.static(structure)
    else:
        collect.tree(name, dparams, ref_p)
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
        collect.exact(name, "dx", dx, ref_x)
    return dparams, dx


def _layer_vjp(layer, params, x, key, dy, train):
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
        _, vjp = jax.vjp(lambda p, x: layer.forward(p, x, key=key, train=train)[0], params, x)
        return vjp(dy)
    _, vjp = jax.vjp(lambda p: layer.forward(p, x, key=key, train=train)[0], params)
    return vjp(dy)[0], None


# --------------------------------------------------------------------------- public checks


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
    tolerances: Tolerances = DEFAULT_TOLERANCES,
) -> GradCheckReport:
    """Check a whole model and loss: layer by layer exactly, end to end by finite differences.

    In float64 (whatever the model's dtype): the loss gradient is compared
    with ``jax.grad`` of the loss value; then, walking from the loss
    backwards, every leaf layer's ``dparams`` and ``dx`` with ``jax.vjp`` of
    that layer at the same cached input and incoming ``dy``; the gradient
    ``fbp.value_and_grad`` computes end to end with ``jax.vjp`` of the whole
    forward; and finally the loss is probed with central differences along
    ``directions`` random directions and ``coordinates`` sampled coordinates
    per leaf.

    Args:
      model, loss, params, x, y: what to check, at which point.
      key, train: side inputs passed to every layer's forward (``train=True``
        by default, as for training).
      directions: random directional derivatives over all parameters at once.
      coordinates: sampled coordinates per leaf (seeded by the leaf's path).
      seed: seed of the random directions.
      tolerances: see :class:`Tolerances`.

    Returns:
      A :class:`GradCheckReport`; ``report.raise_if_failed()`` names the
      first failing layer walking back from the loss, and its leaf.

    Example:
      >>> import jax, fbp
      >>> from fbp import nn, losses, verify
      >>> model = nn.serial(nn.dense(8), nn.relu(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> x = jax.random.normal(jax.random.key(1), (5, 4))
      >>> y = jax.numpy.array([0, 1, 2, 0, 1])
      >>> verify.check_model(model, losses.softmax_cross_entropy, params, x, y).ok
      True
    """
    collect = _Collector()

    def exact_part(params64, x64, y64):
        records: dict = {"train": train}
        pred, cache = _walk_forward(model, params64, x64, key, train, (), records)
        # The loss first: its gradient seeds everything else.
        dpred = loss.grad(pred, y64)
        ref_dpred = jax.grad(lambda p: loss.value(p, y64))(pred)
        collect.exact(f"loss ({loss.name})", "dpred", dpred, ref_dpred)
        # Then every layer, walking back from the loss.
        _walk_backward(model, params64, dpred, (), records, collect)
        # End to end: what value_and_grad computes, against jax.grad of the whole.
        hand_params, _ = model.backward(params64, cache, dpred)
        structure = _structure_rows("model (end to end)", params64, hand_params)
        collect.static(structure)
        if not structure:
            ref_params = jax.grad(value)(params64)
            collect.tree("model (end to end)", hand_params, ref_params, only_failures=True)
        return collect.arrays, hand_params

    def value(p):
        return loss.value(model.apply(p, x64, key=key, train=train), y64)

    with jax.enable_x64(True):
        params64, x64, y64 = _to64(params), _to64(x), _to64(y)
        arrays, hand_params = jax.jit(exact_part)(params64, x64, y64)
        rows = collect.rows(arrays, tolerances.vjp_rtol)
        if not _structure_rows("model", params64, hand_params):
            rows.extend(
                _fd_rows(
                    value,
                    params64,
                    hand_params,
                    jax.random.key(seed),
                    directions=directions,
                    coordinates=coordinates,
                    tol=tolerances,
                    layer_name="model (end to end)",
                )
            )
    return GradCheckReport(rows, title=f"check_model({model.name}, {loss.name})")


def check_layer(
    layer: Layer,
    key: jax.Array,
    input_shape: Sequence[int],
    *,
    batch_size: int = 3,
    directions: int = 4,
    coordinates: int = 8,
    tolerances: Tolerances = DEFAULT_TOLERANCES,
    **forward_kw: Any,
) -> GradCheckReport:
    """Draw params and inputs and check ``layer.backward`` for ``dparams`` and ``dx``.

    References: ``jax.vjp`` of ``layer.forward`` with a random cotangent, and
    central finite differences of ``⟨forward(params, x), dy⟩`` — whose
    gradient is exactly what ``backward(params, cache, dy)`` claims — over
    params and input together. Also checks that ``dparams`` mirrors
    ``params`` (structure, shapes, dtypes) at the layer's own dtype.

    Args:
      layer: the layer to check.
      key: JAX key for params, inputs and cotangent.
      input_shape: one example's shape (no batch axis), as for ``layer.init``.
      batch_size: examples in the drawn batch.
      directions, coordinates, tolerances: as in :func:`check_model`.
      **forward_kw: side inputs for the forward (``key=``, ``train=``).

    Returns:
      A :class:`GradCheckReport`.

    Example:
      >>> import jax
      >>> from fbp import nn, verify
      >>> verify.check_layer(nn.dense(4), jax.random.key(0), (3,)).ok
      True
    """
    k_init, k_x, k_dy, k_fd = jax.random.split(key, 4)
    params, _ = layer.init(k_init, tuple(input_shape))
    x = jax.random.normal(k_x, (batch_size, *input_shape))
    name = _label((), layer).replace("model", "layer")
    y, cache = layer.forward(params, x, **forward_kw)
    dparams_native, _ = layer.backward(params, cache, jnp.ones_like(y))
    rows = _structure_rows(name, params, dparams_native)
    with jax.enable_x64(True):
        params64, x64 = _to64(params), _to64(x)
        y64, cache = layer.forward(params64, x64, **forward_kw)
        dy = jax.random.normal(k_dy, y64.shape, jnp.float64)
        dparams, dx = layer.backward(params64, cache, dy)
        _, vjp = jax.vjp(lambda p, x: layer.forward(p, x, **forward_kw)[0], params64, x64)
        ref_p, ref_x = vjp(dy)
        rows += _structure_rows(name, params64, dparams)
        if not rows:
            rows += _compare_tree(name, dparams, ref_p, tolerances.vjp_rtol)
            rows.append(_compare_exact(name, "dx", dx, ref_x, tolerances.vjp_rtol))

            def phi(point):
                return jnp.vdot(layer.forward(point["params"], point["x"], **forward_kw)[0], dy)

            rows += _fd_rows(
                phi,
                {"params": params64, "x": x64},
                {"params": dparams, "x": dx},
                k_fd,
                directions=directions,
                coordinates=coordinates,
                tol=tolerances,
                layer_name=name,
            )
    return GradCheckReport(rows, title=f"check_layer({layer.name})")


def check_grad(
    f: Callable[..., jax.Array],
    grad_f: Callable[..., Any],
    params: Params,
    *args: Any,
    directions: int = 4,
    coordinates: int = 8,
    seed: int = 0,
    tolerances: Tolerances = DEFAULT_TOLERANCES,
) -> GradCheckReport:
    """Check a claimed gradient function of any scalar function.

    ``grad_f(params, *args)`` is compared with ``jax.grad(f)(params, *args)``
    (exactly, per leaf) and with central finite differences of ``f`` in
    float64 — for code not built from fbp layers.

    Example:
      >>> import jax.numpy as jnp
      >>> from fbp import verify
      >>> f = lambda w, x: jnp.sum((x @ w) ** 2)
      >>> grad_f = lambda w, x: 2 * x.T @ (x @ w)
      >>> verify.check_grad(f, grad_f, jnp.ones((3, 2)), jnp.ones((4, 3))).ok
      True
    """
    with jax.enable_x64(True):
        params64 = _to64(params)
        args64 = _to64(args)
        hand = grad_f(params64, *args64)
        rows = _structure_rows("f", params64, hand)
        if not rows:
            ref = jax.grad(f)(params64, *args64)
            rows += _compare_tree("f", hand, ref, tolerances.vjp_rtol)
            rows += _fd_rows(
                lambda p: f(p, *args64),
                params64,
                hand,
                jax.random.key(seed),
                directions=directions,
                coordinates=coordinates,
                tol=tolerances,
                layer_name="f",
            )
    return GradCheckReport(rows, title="check_grad")


# --------------------------------------------------------------------------- exercises


class WrongRule(NamedTuple):
    """A deliberately wrong backward rule, for exercises and for testing the checker.

    Attributes:
      name: short identifier.
      description: what is wrong, in words.
      build: ``() -> (model, loss, params, x, y)`` with the bug planted.
      layer: the path of the culprit layer (``()`` for the loss).
      leaf: the leaf that the check must name (``"dx"``, ``"w"``, ``"dpred"``...).
    """

    name: str
    description: str
    build: Callable[[], tuple]
    layer: tuple[int, ...] | None
    leaf: str

    def __str__(self) -> str:
        where = "the loss" if self.layer is None else f"layer {'.'.join(map(str, self.layer))}"
        return f"{self.name}: {self.description} (culprit: {where}, leaf {self.leaf!r})"


def _data(n_in=6, batch=7, classes=4, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kx, (batch, n_in)), jax.random.randint(ky, (batch,), 0, classes))


def _with_backward(layer: Layer, backward) -> Layer:
    return layer._replace(backward=backward)


def _dense_bug(features, bug):
    """An ``nn.dense`` whose backward is the correct one passed through ``bug``."""
    from fbp import nn

    layer = nn.dense(features)

    def backward(params, cache, dy):
        dparams, dx = layer.backward(params, cache, dy)
        return bug(params, cache, dy, dparams, dx)

    return _with_backward(layer, backward)


def _model(*layers, n_in=6, classes=4, seed=0, loss=None):
    from fbp import losses, nn

    def build():
        model = nn.serial(*layers)
        params, _ = model.init(jax.random.key(seed), (n_in,))
        params = jax.tree.map(
            lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 1), p.shape), params
        )
        x, y = _data(n_in=n_in, classes=classes, seed=seed)
        return model, loss or losses.softmax_cross_entropy, params, x, y

    return build


def wrong_rules() -> list[WrongRule]:
    """The catalogue of known-wrong backward rules, each with the layer and leaf it breaks.

    Every rule builds a small model with one bug planted; ``check_model`` on it
    must fail and name the culprit. Use them to practise reading a report.

    Example:
      >>> from fbp import verify
      >>> rule = verify.wrong_rules()[0]
      >>> model, loss, params, x, y = rule.build()
      >>> verify.check_model(model, loss, params, x, y).ok
      False
    """
    from fbp import losses, nn

    def sigmoid_from_wrong_cache():
        layer = nn.sigmoid()

        def backward(params, y, dy):
            s = jax.nn.sigmoid(y)  # y is already σ(x): σ'(x) = y(1 − y), not σ(y)(1 − σ(y))
            return {}, dy * s * (1 - s)

        return _with_backward(layer, backward)

    def tanh_times_two():
        layer = nn.tanh()
        return _with_backward(layer, lambda p, y, dy: ({}, 2 * dy * (1 - y * y)))

    def inverted_relu_mask():
        layer = nn.relu()
        return _with_backward(layer, lambda p, mask, dy: ({}, jnp.where(mask, 0.0, dy)))

    def missing_batch_mean():
        def grad(logits, target):
            return losses.softmax_cross_entropy.grad(logits, target) * logits.shape[0]

        return losses.softmax_cross_entropy._replace(grad=grad)

    def softmax_over_wrong_axis():
        def grad(logits, target):
            onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
            return (jax.nn.softmax(logits, axis=0) - onehot) / logits.shape[0]

        return losses.softmax_cross_entropy._replace(grad=grad)

    def single_element(params, cache, dy, dparams, dx):
        w = dparams["w"]
        return {**dparams, "w": w.at[3, 5].add(1e-6 * jnp.max(jnp.abs(w)))}, dx

    rules = [
        WrongRule(
            "flipped_sign",
            "dW = −xᵀ·dy: the weight gradient has the wrong sign",
            _model(
                _dense_bug(8, lambda p, c, dy, d, dx: ({**d, "w": -d["w"]}, dx)),
                nn.tanh(),
                nn.dense(4),
            ),
            (0,),
            "w",
        ),
        WrongRule(
            "missing_transpose",
            "dx = dy·W instead of dy·Wᵀ (a square layer hides it)",
            _model(
                nn.dense(8),
                nn.tanh(),
                _dense_bug(8, lambda p, c, dy, d, dx: (d, dy @ p["w"])),
                nn.tanh(),
                nn.dense(4),
            ),
            (2,),
            "dx",
        ),
        WrongRule(
            "forgotten_bias",
            "db is left at zero",
            _model(
                nn.dense(8),
                nn.sigmoid(),
                _dense_bug(4, lambda p, c, dy, d, dx: ({**d, "b": 0 * d["b"]}, dx)),
            ),
            (2,),
            "b",
        ),
        WrongRule(
            "sigmoid_wrong_cache",
            "σ'(z) computed as σ(y)(1 − σ(y)) from the cached output",
            _model(nn.dense(8), sigmoid_from_wrong_cache(), nn.dense(4)),
            (1,),
            "dx",
        ),
        WrongRule(
            "factor_of_two",
            "tanh' taken as 2(1 − y²)",
            _model(nn.dense(8), tanh_times_two(), nn.dense(4)),
            (1,),
            "dx",
        ),
        WrongRule(
            "missing_batch_mean",
            "the loss gradient is not divided by the batch size",
            _model(nn.dense(8), nn.tanh(), nn.dense(4), loss=missing_batch_mean()),
            None,
            "dpred",
        ),
        WrongRule(
            "softmax_wrong_axis",
            "softmax normalised over the batch axis, not the classes",
            _model(nn.dense(8), nn.tanh(), nn.dense(4), loss=softmax_over_wrong_axis()),
            None,
            "dpred",
        ),
        WrongRule(
            "inverted_relu_mask",
            "ReLU passes the gradient where x ≤ 0 instead of x > 0",
            _model(nn.dense(8), inverted_relu_mask(), nn.dense(4)),
            (1,),
            "dx",
        ),
        WrongRule(
            "first_example_only",
            "dW = x[0]ᵀ·dy[0]: the batch sum is lost",
            _model(
                _dense_bug(8, lambda p, c, dy, d, dx: ({**d, "w": jnp.outer(c[0], dy[0])}, dx)),
                nn.tanh(),
                nn.dense(4),
            ),
            (0,),
            "w",
        ),
        WrongRule(
            "zero_dx",
            "the layer passes no gradient on (dx = 0)",
            _model(nn.dense(8), nn.tanh(), _dense_bug(4, lambda p, c, dy, d, dx: (d, 0 * dx))),
            (2,),
            "dx",
        ),
        WrongRule(
            "error_only_in_dx",
            "dparams right, dx scaled by 1.01",
            _model(nn.dense(8), nn.tanh(), _dense_bug(4, lambda p, c, dy, d, dx: (d, 1.01 * dx))),
            (2,),
            "dx",
        ),
        WrongRule(
            "single_element",
            "one element of dW off by a millionth of the leaf's scale",
            _model(_dense_bug(16, single_element), nn.relu(), nn.dense(4)),
            (0,),
            "w",
        ),
    ]
    return rules
