"""Prove hand-derived gradients right — and say exactly where one is wrong.

Every check runs in float64 (x64 is switched on only inside the check, with the
scoped ``with jax.enable_x64(True):``), whatever the model's dtype, and uses two
independent references:

1. **Exact, layer by layer** (method ``"vjp"``). Walking the model from the loss
   backwards, each layer's hand ``backward`` is compared with ``jax.vjp`` of
   *that same layer's* ``forward``, at the same cached input and the same
   incoming gradient ``dy``. Both sides compute the same products in float64
   and differ only by summation order, so the whole arrays are compared and
   even one wrong element among millions is caught. The first failing layer
   walking back from the loss is the culprit: the layers before it only
   inherit its wrong ``dx``, and are checked with that same ``dy`` on both
   sides, so they pass. The loss's own gradient (``"dpred"``) and the end-to-end
   gradient of :func:`fbp.value_and_grad` (method ``"grad"``, against
   ``jax.grad``) are compared the same way.
2. **Finite differences** (methods ``"fd-directions"`` and ``"fd-coordinates"``),
   which also validate the forward pass itself. Central differences of the
   scalar loss along a few random directions over all parameters at once
   (⟨g, v⟩ against (f(θ+hv) − f(θ−hv))/2h, as JAX's ``check_vjp`` does), plus a
   seeded sample of coordinates of every leaf. The cost grows with the number
   of probes, not of parameters. Each leaf's coordinates and its share of every
   direction are drawn from the leaf's path, so adding a parameter elsewhere
   changes no other leaf's probes.

**Self-calibrated tolerances.** Every probe evaluates f at ±h and ±2h for two
candidate steps (relative to the leaf's RMS). The disagreement of the h and 2h
differences measures the truncation noise of that very probe on that very
function, to which a float64 round-off bound is added; per leaf, the step
whose measured noise is lower is used, and the hand gradient must agree with
the finite difference within ``noise_factor`` times that measured noise (or a
small relative floor). The exact checks use fixed per-dtype tolerances, see
:data:`DEFAULT_TOLERANCES`.

**Kinks.** ReLU at 0, max-pool ties and any later layer's kink make a finite
difference meaningless when the probe straddles them. A probe is skipped (and
counted in the report's ``kinks`` column) when a boolean or integer residual
in the cache — ReLU's mask, a pool's argmax — changes between the probe's
points, or when its curvature at h and at 2h disagree as only a kink makes
them. An exact check that fails at a point where the layer's input sits on a
kink is redrawn once at a slightly moved input; only a failure that persists
counts.

The result is a :class:`GradCheckReport`: data first (one :class:`LeafCheck` per
leaf and method), printed as a table, shown as HTML in Jupyter, and turned into
a :class:`GradientCheckError` naming the layer and leaf by ``raise_if_failed``.
:func:`wrong_rules` publishes a catalogue of deliberately wrong backward rules
as exercises: each one is caught and pinned to its layer.
"""

from __future__ import annotations

import functools
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

from fbp.errors import ConfigError, FbpError
from fbp.losses import Loss
from fbp.nn import walk
from fbp.nn.core import Layer

__all__ = [
    "DEFAULT_TOLERANCES",
    "GradCheckReport",
    "GradientCheckError",
    "LeafCheck",
    "Tolerances",
    "WrongRule",
    "check_grad",
    "check_layer",
    "check_model",
    "tolerances_for",
    "wrong_rules",
]

Params = Any

# --------------------------------------------------------------------------- tolerances


class Tolerances(NamedTuple):
    """How close is close enough (see :data:`DEFAULT_TOLERANCES` for the values).

    Attributes:
      exact_rtol: hand gradient vs ``jax.vjp``/``jax.grad`` of the same function,
        as the worst absolute error over a leaf relative to the largest
        magnitude of the reference leaf.
      fd_rtol: floor of the finite-difference tolerance, relative to the probe's
        scale (the larger of Σ|vᵢgᵢ| and the finite difference itself).
      noise_factor: a probe passes when its error is at most this many times
        its own measured noise (the disagreement of the h and 2h differences
        plus a round-off bound), or below the ``fd_rtol`` floor.
      steps: the two candidate finite-difference steps, relative to each
        leaf's RMS; per leaf, the one with the lower measured noise is used.
    """

    exact_rtol: float
    fd_rtol: float
    noise_factor: float = 100.0
    steps: tuple[float, float] = (1e-6, 1e-3)


DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    # Hand and reference are float64 evaluations of the same products in another
    # summation order: they agree to ~1e-13 of the leaf's scale even for sums of
    # 1e4 cancelling terms. 1e-9 keeps four orders of margin and still flags one
    # element off by a millionth of its leaf's scale. Central differences in
    # float64 with a measured noise floor resolve ~1e-6 of the probe's scale.
    "float64": Tolerances(exact_rtol=1e-9, fd_rtol=1e-6, steps=(1e-6, 1e-3)),
    # A rule that computes in float32 even when handed float64: eps = 1.2e-7,
    # and reordered sums of ~1e4 terms with cancellation lose up to ~1e-5 of the
    # leaf's scale. Steps around eps^(1/3).
    "float32": Tolerances(exact_rtol=1e-4, fd_rtol=1e-2, steps=(3e-3, 3e-2)),
    # eps = 9.8e-4 (float16), 7.8e-3 (bfloat16).
    "float16": Tolerances(exact_rtol=3e-2, fd_rtol=1e-1, steps=(3e-2, 1e-1)),
    "bfloat16": Tolerances(exact_rtol=1e-1, fd_rtol=2e-1, steps=(3e-2, 1e-1)),
}
"""Default :class:`Tolerances` per dtype, keyed by dtype name.

Checks run in float64, so the float64 row is the one that normally applies. A
leaf whose hand or reference gradient comes out in a narrower dtype (a rule or
function that computes in float32 even when handed float64) is judged by that
dtype's row, since no rule can be more accurate than its arithmetic.
"""


def tolerances_for(dtype: Any) -> Tolerances:
    """The default :class:`Tolerances` for arithmetic in ``dtype``.

    Args:
      dtype: a floating dtype (anything ``jnp.dtype`` accepts).

    Returns:
      The row of :data:`DEFAULT_TOLERANCES` for it (the float64 row for
      float64 and wider, the bfloat16 row for 8-bit floats).

    Example:
      >>> from fbp import verify
      >>> verify.tolerances_for("float32").exact_rtol
      0.0001
    """
    dtype = jnp.dtype(dtype)
    if dtype.name in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[dtype.name]
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits >= 64:
        return DEFAULT_TOLERANCES["float64"]
    return DEFAULT_TOLERANCES["bfloat16"]


def _narrowest(*arrays: Any) -> Any:
    """The floating dtype of least precision among ``arrays`` (float64 if none)."""
    dtypes = [jnp.result_type(a) for a in arrays if a is not None]
    floats = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    if not floats:
        return jnp.dtype(jnp.float64)
    return max(floats, key=lambda d: float(jnp.finfo(d).eps))


# --------------------------------------------------------------------------- report


class LeafCheck(NamedTuple):
    """One row of a report: one leaf, one method.

    Attributes:
      layer: where the leaf lives, e.g. ``"layer 2 (dense(→10))"``,
        ``"loss (mse)"``, ``"model (end to end)"`` or ``"model"`` (directions).
      leaf: the leaf's path inside the layer's params (``"w"``), ``"dx"`` for
        the gradient a layer passes on, ``"dpred"`` for the loss's, or
        ``"all params"`` for directional probes.
      method: ``"vjp"`` (exact, same layer), ``"grad"`` (exact, end to end),
        ``"fd-directions"``, ``"fd-coordinates"`` or ``"structure"``.
      max_abs_err: worst absolute error among the compared elements or probes.
      max_rel_err: the same error relative to the scale it is judged against.
      index: index of the worst element (``None`` for directions).
      hand: the hand value there.
      reference: the reference value there.
      probes: elements (exact) or finite-difference probes compared.
      skipped: probes skipped because they straddle a kink (or, for exact rows,
        1 when the layer's input was redrawn off a kink).
      passed: whether the row is within tolerance.
      tolerance: the relative error allowed at the worst element or probe.
      step: the finite-difference step used (relative to the leaf's RMS).
      path: index path of the layer inside the model (``None`` outside layers).
      kind: the layer's ``name`` (``"dense(→10)"``), the loss's, or ``"f"``.
      message: extra explanation (structure mismatches, redraws).
      probed: for ``"fd-coordinates"`` rows, the indices of every coordinate
        probed (drawn from the leaf's path alone).
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
    tolerance: float = math.nan
    step: float | None = None
    path: tuple[int, ...] | None = None
    kind: str = ""
    message: str = ""
    probed: tuple[tuple[int, ...], ...] | None = None


class GradientCheckError(FbpError, AssertionError):
    """A hand-derived gradient disagrees with its references.

    ``str(error)`` reads like every fbp error, e.g. ``serial layer 2
    (dense(→10)): leaf 'w' fails the vjp check: ...``.

    Attributes:
      layer, layer_path, message: as for every :class:`fbp.FbpError`.
      leaf: the failing leaf (``"w"``, ``"dx"``, ``"dpred"``, ...).
      row: the culprit :class:`LeafCheck`.
      report: the whole :class:`GradCheckReport`.
    """

    def __init__(self, layer: str, message: str, *, leaf: str = "", row=None, report=None) -> None:
        super().__init__(layer, message)
        self.leaf = leaf
        self.row = row
        self.report = report


_COLUMNS = (
    "layer",
    "leaf",
    "method",
    "probes",
    "kinks",
    "max abs err",
    "max rel err",
    "tolerance",
    "worst at",
    "hand",
    "reference",
    "ok",
)


def _cells(r: LeafCheck) -> list[str]:
    return [
        r.layer,
        r.leaf,
        r.method,
        str(r.probes),
        str(r.skipped),
        f"{r.max_abs_err:.2e}",
        f"{r.max_rel_err:.2e}",
        f"{r.tolerance:.1e}",
        "" if r.index is None else ",".join(map(str, r.index)),
        f"{r.hand:.6g}",
        f"{r.reference:.6g}",
        "PASS" if r.passed else "FAIL",
    ]


@dataclass
class GradCheckReport:
    """The verdict of a gradient check: rows first, renderings second.

    ``str(report)`` is a terminal table, ``report._repr_html_()`` an HTML table
    for Jupyter, ``report.ok`` the overall verdict, and
    ``report.raise_if_failed()`` raises :class:`GradientCheckError` naming the
    culprit — the first failing exact row walking back from the loss.

    Attributes:
      rows: one :class:`LeafCheck` per leaf and method, from the loss backwards.
      title: what was checked.
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
        """The first failing exact or structure row walking back from the loss, if any.

        Per-layer rows come before end-to-end and finite-difference rows, so a
        wrong rule is pinned to its layer rather than to the whole model.
        """
        order = {"structure": 0, "vjp": 0, "grad": 1}
        failures = self.failures
        if not failures:
            return None
        return min(failures, key=lambda r: order.get(r.method, 2))

    @property
    def coordinates(self) -> int:
        """Coordinate probes compared by finite differences (kinks excluded)."""
        return sum(r.probes for r in self.rows if r.method == "fd-coordinates")

    @property
    def directions(self) -> int:
        """Random directions compared by finite differences (kinks excluded)."""
        return sum(r.probes for r in self.rows if r.method == "fd-directions")

    @property
    def kinks(self) -> int:
        """Probes skipped, and exact checks redrawn, because they sat on a kink."""
        return sum(r.skipped for r in self.rows)

    def summary(self) -> str:
        """One line: the verdict and how much was probed."""
        exact = [r for r in self.rows if r.method in ("vjp", "grad")]
        fd_leaves = len({(r.layer, r.leaf) for r in self.rows if r.method == "fd-coordinates"})
        return (
            f"{self.title}: {'PASSED' if self.ok else 'FAILED'} — "
            f"{len(exact)} leaves compared exactly ({sum(r.probes for r in exact)} elements); "
            f"finite differences along {self.directions} directions and at "
            f"{self.coordinates} coordinates of {fd_leaves} leaves; "
            f"{self.kinks} skipped at kinks"
        )

    def raise_if_failed(self) -> None:
        """Raise :class:`GradientCheckError` naming the layer and leaf of the culprit.

        Raises:
          GradientCheckError: if any row failed; nothing otherwise.
        """
        row = self.culprit
        if row is None:
            return
        others = len(self.failures) - 1
        if row.message and row.method == "structure":
            detail = row.message
        else:
            at = "" if row.index is None else f" at index {row.index}"
            detail = (
                f"hand {row.hand:.6g} vs reference {row.reference:.6g}{at} "
                f"(relative error {row.max_rel_err:.2e} > {row.tolerance:.1e})"
            )
        error = GradientCheckError(
            row.kind or row.layer,
            f"leaf {row.leaf!r} fails the {row.method} check: {detail}"
            + (f"; {others} more rows fail (see the report)" if others > 0 else ""),
            leaf=row.leaf,
            row=row,
            report=self,
        )
        error.layer_path = row.path or ()
        raise error

    def __str__(self) -> str:
        lines = [_cells(r) for r in self.rows]
        widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(_COLUMNS)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [
            self.summary(),
            fmt.format(*_COLUMNS),
            fmt.format(*("-" * w for w in widths)),
        ]
        out += [fmt.format(*c).rstrip() for c in lines]
        out += [f"  note: {r.layer} {r.leaf}: {r.message}" for r in self.rows if r.message]
        return "\n".join(out)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in _COLUMNS)
        body = "".join(
            "<tr style='background:{}'>{}</tr>".format(
                "#e8f5e9" if r.passed else "#ffebee",
                "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)),
            )
            for r in self.rows
        )
        notes = "".join(
            f"<li>{html.escape(f'{r.layer} {r.leaf}: {r.message}')}</li>"
            for r in self.rows
            if r.message
        )
        return (
            f"<p><b>{html.escape(self.summary())}</b></p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            + (f"<ul>{notes}</ul>" if notes else "")
        )


# --------------------------------------------------------------------------- comparing


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
    name = jax.tree_util.keystr(tuple(path), simple=True, separator=".")
    return name if name else "params"


@dataclass(frozen=True)
class _Where:
    """Where rows belong: display label, layer kind and index path."""

    label: str
    kind: str
    path: tuple[int, ...] | None = None


def _structure_row(where: _Where, leaf: str, message: str) -> LeafCheck:
    return LeafCheck(
        where.label,
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
        0.0,
        None,
        where.path,
        where.kind,
        message,
    )


def _structure_rows(
    where: _Where, params: Params, dparams: Params, dtypes: bool = True
) -> list[LeafCheck]:
    """``dparams`` must mirror ``params``: structure, shapes and (if ``dtypes``) dtypes."""
    p_def, d_def = jax.tree.structure(params), jax.tree.structure(dparams)
    if p_def != d_def:
        return [_structure_row(where, "params", f"dparams has structure {d_def}, params {p_def}")]
    rows = []
    for (path, p), d in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(dparams), strict=True
    ):
        if jnp.shape(p) != jnp.shape(d) or (dtypes and jnp.result_type(p) != jnp.result_type(d)):
            rows.append(
                _structure_row(
                    where,
                    _path_name(path),
                    f"dparams leaf is {jnp.result_type(d)}{list(jnp.shape(d))}, params leaf is "
                    f"{jnp.result_type(p)}{list(jnp.shape(p))}",
                )
            )
    return rows


def _compare_exact(
    where: _Where, leaf: str, method: str, hand, ref, tol: Tolerances | None
) -> LeafCheck:
    """Compare two whole arrays: worst absolute error against the reference's largest magnitude."""
    rtol = (tol or tolerances_for(_narrowest(hand, ref))).exact_rtol
    hand = np.asarray(hand, np.float64)
    ref = np.asarray(ref, np.float64)
    if hand.shape != ref.shape:
        return _structure_row(
            where, leaf, f"hand gradient has shape {hand.shape}, expected {ref.shape}"
        )
    if hand.size == 0:
        return LeafCheck(
            where.label, leaf, method, 0.0, 0.0, None, 0.0, 0.0, 0, 0, True, rtol, None,
            where.path, where.kind,
        )  # fmt: skip
    diff = np.abs(hand - ref)
    diff = np.where(np.isnan(diff), np.inf, diff)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    scale = float(np.max(np.abs(ref)))
    err = float(diff[worst])
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    return LeafCheck(
        where.label,
        leaf,
        method,
        err,
        rel,
        tuple(int(i) for i in worst),
        float(hand[worst]),
        float(ref[worst]),
        int(hand.size),
        0,
        bool(err <= rtol * scale),
        rtol,
        None,
        where.path,
        where.kind,
    )


def _compare_trees(
    where: _Where, hand_tree, ref_tree, method: str, tol: Tolerances | None, dtypes: bool = True
) -> list[LeafCheck]:
    """Structure first, then every leaf exactly."""
    rows = _structure_rows(where, ref_tree, hand_tree, dtypes)
    if rows:
        return rows
    hand_leaves = jax.tree.leaves(hand_tree)
    return [
        _compare_exact(where, _path_name(path), method, hand, ref, tol)
        for (path, ref), hand in zip(
            jax.tree_util.tree_flatten_with_path(ref_tree)[0], hand_leaves, strict=True
        )
    ]


# --------------------------------------------------------------------------- finite differences


def _leaf_seed(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class _Probes(NamedTuple):
    """The finite-difference probes of one check, drawn on the host.

    ``directions`` is ``(D, n)`` over the raveled point, each leaf's share drawn
    from its own path and scaled by the leaf's RMS; ``coord_index`` and
    ``coord_scale`` give the sampled coordinates (flat indices) and their step
    scale. ``per_leaf`` lists ``(path, indices within the leaf)``.
    """

    directions: np.ndarray
    coord_index: np.ndarray
    coord_scale: np.ndarray
    per_leaf: list


def _make_probes(point: Any, directions: int, coordinates: int, seed: int) -> _Probes:
    """Draw the probes with numpy: per leaf, from a generator seeded by the leaf's path."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(point)[0]
    leaves = [np.asarray(leaf, np.float64).reshape(-1) for _, leaf in leaves_with_path]
    sizes = [leaf.size for leaf in leaves]
    total = sum(sizes)
    squares = sum(float(np.dot(leaf, leaf)) for leaf in leaves)
    overall = math.sqrt(squares / total) if total else 1.0
    fallback = overall if overall > 0 else 1.0
    dirs = np.empty((directions, total), np.float64)
    picks, scales, per_leaf, offset = [], [], [], 0
    for (path, _), leaf, size in zip(leaves_with_path, leaves, sizes, strict=True):
        if not size:
            continue
        rms = math.sqrt(float(np.dot(leaf, leaf)) / size)
        scale = rms if rms > 0 else fallback
        seed_leaf = _leaf_seed(_path_name(path))
        rng = np.random.default_rng([seed, seed_leaf])
        dirs[:, offset : offset + size] = scale * rng.standard_normal((directions, size))
        if coordinates:
            rng = np.random.default_rng(seed_leaf)  # coordinates depend on the path alone
            chosen = np.sort(rng.choice(size, size=min(coordinates, size), replace=False))
            picks.append(offset + chosen)
            scales.append(np.full(len(chosen), scale))
            per_leaf.append((path, chosen))
        offset += size
    return _Probes(
        dirs,
        np.concatenate(picks).astype(np.int32) if picks else np.zeros(0, np.int32),
        np.concatenate(scales) if scales else np.zeros(0, np.float64),
        per_leaf,
    )


def _discrete(tree: Any) -> list:
    """The boolean and integer leaves of a cache: a change in them means a kink was crossed."""
    return [
        a
        for a in jax.tree.leaves(tree)
        if hasattr(a, "dtype")
        and (jnp.issubdtype(a.dtype, jnp.bool_) or jnp.issubdtype(a.dtype, jnp.integer))
    ]


def _fd_probes(phi, point, hand, dirs, coord_index, coord_scale, rel_steps):
    """Traceable: evaluate ``phi`` along every direction and coordinate probe.

    ``phi(point) -> (value, discrete cache leaves)``. Every probe evaluates
    ``phi`` at ``t ∈ {−2h, −h, h, 2h}`` for both candidate steps ``h`` (one
    vmapped batch of 8), sequentially over probes (``lax.map``), so memory
    stays at a few copies of the parameters whatever the number of probes.
    """
    flat, unravel = ravel_pytree(point)
    g_leaves = [jnp.asarray(g, flat.dtype).reshape(-1) for g in jax.tree.leaves(hand)]
    g_flat = jnp.concatenate(g_leaves) if g_leaves else jnp.zeros_like(flat)
    dots = jnp.concatenate([dirs @ g_flat, g_flat[coord_index] * coord_scale])
    terms = jnp.concatenate(
        [jnp.abs(dirs) @ jnp.abs(g_flat), jnp.abs(g_flat[coord_index]) * coord_scale]
    )

    f0, disc0 = phi(unravel(flat))
    ts = (rel_steps[:, None] * jnp.asarray([-2.0, -1.0, 1.0, 2.0], flat.dtype)[None, :]).reshape(-1)
    n_directions, n_coords = dirs.shape[0], coord_index.shape[0]
    dirs_ext = jnp.concatenate([dirs, jnp.zeros((1, flat.size), flat.dtype)])
    probe_dir = jnp.concatenate(
        [jnp.arange(n_directions, dtype=jnp.int32), jnp.full((n_coords,), n_directions, jnp.int32)]
    )
    probe_coord = jnp.concatenate([jnp.zeros((n_directions,), jnp.int32), coord_index])
    probe_size = jnp.concatenate([jnp.zeros((n_directions,), flat.dtype), coord_scale])

    def probe(args):
        j, i, s = args
        v = dirs_ext[j].at[i].add(s)

        def at(t):
            value, disc = phi(unravel(flat + t * v))
            changed = jnp.zeros((), bool)
            for a, b in zip(disc, disc0, strict=True):
                changed = changed | jnp.any(a != b)
            return value, changed

        return jax.vmap(at)(ts)

    if n_directions + n_coords:
        values, changed = jax.lax.map(probe, (probe_dir, probe_coord, probe_size))
    else:
        values, changed = jnp.zeros((0, 8), flat.dtype), jnp.zeros((0, 8), bool)
    return {"f0": f0, "values": values, "changed": changed, "dots": dots, "terms": terms}


def _judge_probes(fd: dict, rel_steps, tol: Tolerances, eps: float) -> dict:
    """Per probe and candidate step: finite difference, measured noise, kink flag."""
    f0 = float(fd["f0"])
    values = np.asarray(fd["values"], np.float64)
    changed = np.asarray(fd["changed"], bool)
    dots = np.asarray(fd["dots"], np.float64)
    terms = np.asarray(fd["terms"], np.float64)
    out = []
    for k, h in enumerate(rel_steps):
        m2, m1, p1, p2 = (values[:, 4 * k + c] for c in range(4))
        d1 = (p1 - m1) / (2 * h)
        d2 = (p2 - m2) / (4 * h)
        magnitude = np.maximum.reduce([np.abs(m2), np.abs(m1), np.abs(p1), np.abs(p2)])
        magnitude = np.maximum(magnitude, abs(f0))
        roundoff = 8 * eps * magnitude / h
        noise = np.abs(d1 - d2) + roundoff
        scale = np.maximum(terms, np.abs(d1))
        allowed = np.maximum(tol.noise_factor * noise, tol.fd_rtol * scale)
        # Curvature at h and at 2h agree on a smooth function; a kink inside the
        # probe makes them disagree by about the error it causes.
        curvature_gap = np.abs((p1 - 2 * f0 + m1) - (p2 - 2 * f0 + m2) / 4) / h
        kink = changed[:, 4 * k : 4 * k + 4].any(axis=1) | (curvature_gap > allowed / 4)
        kink |= ~np.isfinite(d1)
        out.append({"d": d1, "noise": noise, "scale": scale, "allowed": allowed, "kink": kink})
    return {"dots": dots, "steps": out}


def _fd_row(
    where: _Where,
    leaf: str,
    method: str,
    judged: dict,
    rows: np.ndarray,
    rel_steps,
    indices: list | None,
) -> LeafCheck:
    """One row for the probes ``rows`` of ``judged``, with the step chosen by measured noise."""
    # The step is chosen by the median measured noise of the leaf's probes —
    # independent of the hand gradient, so choosing cannot flatter it.
    medians = [
        np.median(np.where(s["kink"][rows], np.inf, s["noise"][rows])) for s in judged["steps"]
    ]
    k = int(np.argmin(medians))
    s = judged["steps"][k]
    dots = judged["dots"][rows]
    d, allowed, scale, kink = s["d"][rows], s["allowed"][rows], s["scale"][rows], s["kink"][rows]
    err = np.abs(dots - d)
    err = np.where(np.isnan(err), np.inf, err)
    considered = ~kink
    ok = bool(np.all((err <= allowed) | kink))
    if considered.any():
        badness = np.where(considered, err / np.maximum(allowed, 1e-300), -1.0)
        worst = int(np.argmax(badness))
        e, rel = float(err[worst]), float(err[worst] / max(scale[worst], 1e-300))
        tolerance = float(allowed[worst] / max(scale[worst], 1e-300))
    else:
        worst, e, rel, tolerance = 0, 0.0, 0.0, math.nan
        dots, d = np.full(1, math.nan), np.full(1, math.nan)
    nothing = len(kink) and not considered.any()
    message = "every probe sat on a kink: nothing compared" if nothing else ""
    return LeafCheck(
        where.label,
        leaf,
        method,
        e,
        rel,
        None if indices is None else tuple(int(i) for i in indices[worst]),
        float(dots[worst]) if len(dots) else 0.0,
        float(d[worst]) if len(d) else 0.0,
        int(considered.sum()),
        int(kink.sum()),
        ok,
        tolerance,
        float(rel_steps[k]),
        where.path,
        where.kind,
        message,
        None if indices is None else tuple(tuple(int(i) for i in ix) for ix in indices),
    )


def _fd_rows(
    fd: dict,
    point: Any,
    per_leaf: list,
    tol: Tolerances,
    eps: float,
    n_directions: int,
    directions_where: _Where,
    leaf_where: Callable[[Any], tuple[_Where, str]],
) -> list[LeafCheck]:
    """Rows for the directions (one) and for each leaf's coordinates."""
    judged = _judge_probes(fd, tol.steps, tol, eps)
    rows = []
    if n_directions:
        rows.append(
            _fd_row(
                directions_where,
                "all params",
                "fd-directions",
                judged,
                np.arange(n_directions),
                tol.steps,
                None,
            )
        )
    start = n_directions
    shapes = {
        tuple(p): np.shape(leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(point)[0]
    }
    for path, chosen in per_leaf:
        where, leaf = leaf_where(path)
        mine = np.arange(start, start + len(chosen))
        start += len(chosen)
        indices = [np.unravel_index(int(i), shapes[tuple(path)]) for i in chosen]
        rows.append(_fd_row(where, leaf, "fd-coordinates", judged, mine, tol.steps, indices))
    return rows


# --------------------------------------------------------------------------- walking a model


def _where(site: walk.Site) -> _Where:
    kind = f"{site.layer.name} {site.context}".strip()
    return _Where(site.description, kind, site.path)


def _param_owner(sites: Sequence[walk.Site], param_path) -> tuple[walk.Site, tuple]:
    """Which leaf layer a params path belongs to, and the path inside that layer."""
    keys = walk.plain_path(param_path)
    best = max((s for s in sites if keys[: len(s.path)] == s.path), key=lambda s: len(s.path))
    return best, tuple(param_path)[len(best.path) :]


def _layer_vjp(layer: Layer, params, x, key, train, dy):
    """``jax.vjp`` of the layer's own forward: ``(dparams, dx)`` (``dx`` None for integer x)."""
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
        _, vjp = jax.vjp(lambda p, x: layer.forward(p, x, key=key, train=train)[0], params, x)
        return vjp(dy)
    _, vjp = jax.vjp(lambda p: layer.forward(p, x, key=key, train=train)[0], params)
    return vjp(dy)[0], None


class _LayerResult(NamedTuple):
    """One leaf layer in the model program: its hand rule and ``jax.vjp`` at the same point."""

    dparams: Params
    ref_dparams: Params
    dx: Any
    ref_dx: Any
    x: jax.Array
    key: jax.Array | None
    dy: jax.Array


def _compare_at_leaves(train: bool, out: dict):
    """A walker hook: each leaf layer's hand rule next to ``jax.vjp``, recorded in ``out``."""

    def leaf(visit: walk.Visit):
        dparams, dx = visit.backward()
        ref_p, ref_x = _layer_vjp(visit.layer, visit.params, visit.x, visit.key, train, visit.dy)
        out[visit.site.index] = _LayerResult(
            dparams, ref_p, dx, ref_x, visit.x, visit.key, visit.dy
        )
        if ref_x is None:
            return ref_p, dx
        # Pass the hand dx on, as the real backward does — unless it cannot even
        # stand in for the reference (wrong shape), which the row reports.
        same = jnp.shape(dx) == jnp.shape(ref_x)
        return ref_p, jnp.asarray(dx, ref_x.dtype) if same else ref_x

    return leaf


def _redraw_exact(layer, where, p, x, key, train, dy, tol) -> list[LeafCheck] | None:
    """Re-check one layer at a slightly moved input; rows if all pass there, else ``None``.

    A hand rule and ``jax.vjp`` may pick different (equally valid) subgradients
    exactly on a kink — a max-pool tie, say. Moving the input by ~1e-7 of its
    scale breaks such ties; a wrong rule stays wrong.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
        return None
    scale = jnp.sqrt(jnp.mean(jnp.square(x)))
    scale = jnp.where(scale > 0, scale, 1.0)
    x2 = x + 1e-7 * scale * jax.random.normal(jax.random.key(7), x.shape, x.dtype)
    _, cache = layer.forward(p, x2, key=key, train=train)
    dparams, dx = layer.backward(p, cache, dy)
    ref_p, ref_x = _layer_vjp(layer, p, x2, key, train, dy)
    rows = _compare_trees(where, dparams, ref_p, "vjp", tol)
    rows.append(_compare_exact(where, "dx", "vjp", dx, ref_x, tol))
    if not all(r.passed for r in rows):
        return None
    note = "the input sat on a kink; checked at an input moved by 1e-7 of its scale"
    return [r._replace(skipped=1, message=note) for r in rows]


@functools.lru_cache(maxsize=64)
def _model_program(model: Layer, loss: Loss, train: bool):
    """One jitted program per (model, loss): every exact comparison and every FD probe."""

    def program(params, x, y, key, probes, rel_steps):
        pred, tape = walk.forward(model, params, x, key=key, train=train)
        dpred = loss.grad(pred, y)
        ref_dpred = jax.grad(lambda pr: loss.value(pr, y))(pred)
        layers: dict = {}
        hook = _compare_at_leaves(train, layers)
        walk.backward(model, params, tape, dpred, hook, train=train)

        pred2, cache = model.forward(params, x, key=key, train=train)
        hand, _ = model.backward(params, cache, loss.grad(pred2, y))

        def value(p):
            return loss.value(model.apply(p, x, key=key, train=train), y)

        ref = jax.grad(value)(params)

        def phi(p):
            out, cache = model.forward(p, x, key=key, train=train)
            return loss.value(out, y), _discrete(cache)

        mirrors = jax.tree.structure(hand) == jax.tree.structure(params) and all(
            jnp.shape(a) == jnp.shape(b)
            for a, b in zip(jax.tree.leaves(hand), jax.tree.leaves(params), strict=True)
        )
        fd = _fd_probes(
            phi,
            params,
            hand if mirrors else jax.tree.map(jnp.zeros_like, params),
            *probes,
            rel_steps,
        )
        return {
            "dpred": dpred,
            "ref_dpred": ref_dpred,
            "layers": layers,
            "hand": hand,
            "ref": ref,
            "fd": fd,
        }

    return jax.jit(program)


def _check_side_inputs(where: str, forward_kw: dict) -> None:
    unknown = set(forward_kw) - {"key", "train"}
    if unknown:
        raise ConfigError(
            where,
            f"unknown side inputs {sorted(unknown)}; a layer's forward takes only key= and train=",
        )


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
    shapes (checking the same model again reuses it).

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
      >>> model = nn.serial(nn.dense(8), nn.relu(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> x = jax.random.normal(jax.random.key(1), (5, 4))
      >>> y = jax.numpy.array([0, 1, 2, 0, 1])
      >>> verify.check_model(model, losses.softmax_cross_entropy, params, x, y).ok
      True
    """
    if not isinstance(model, Layer):
        raise ConfigError("check_model", f"model must be a Layer, got {type(model).__name__}")
    if not isinstance(loss, Loss):
        raise ConfigError("check_model", f"loss must be a Loss, got {type(loss).__name__}")
    from fbp.losses import check_labels_in_range

    if y is not None and jnp.issubdtype(jnp.result_type(y), jnp.integer) and jnp.ndim(y) == 1:
        # Labels reach the loss as tracers inside the program; check them here.
        out_shape = jax.eval_shape(lambda p, x: model.apply(p, x, key=key, train=train), params, x)
        check_labels_in_range(loss.name, y, out_shape.shape[-1])

    rows: list[LeafCheck] = []
    loss_where = _Where(f"loss ({loss.name})", f"loss {loss.name}")
    end_where = _Where("model (end to end)", model.name)
    with jax.enable_x64(True):
        params64, x64, y64 = _to64(params), _to64(x), _to64(y)
        probes = _make_probes(params64, int(directions), int(coordinates), int(seed))
        run = _model_program(model, loss, bool(train))
        loss_dtype = jax.eval_shape(
            lambda p: loss.value(model.apply(p, x64, key=key, train=train), y64), params64
        ).dtype
        fd_tol = tolerances or tolerances_for(loss_dtype)
        out = run(
            params64,
            x64,
            y64,
            key,
            tuple(jnp.asarray(a) for a in probes[:3]),
            jnp.asarray(fd_tol.steps, jnp.float64),
        )
        out = jax.device_get(out)

        rows.append(
            _compare_exact(loss_where, "dpred", "vjp", out["dpred"], out["ref_dpred"], tolerances)
        )
        sites = walk.leaves(model)
        redrawn = False
        for site in reversed(sites):
            where = _where(site)
            got = out["layers"][site.index]
            layer_rows = _compare_trees(where, got.dparams, got.ref_dparams, "vjp", tolerances)
            if got.ref_dx is not None:
                layer_rows.append(
                    _compare_exact(where, "dx", "vjp", got.dx, got.ref_dx, tolerances)
                )
            if not all(r.passed for r in layer_rows) and not any(
                r.method == "structure" for r in layer_rows
            ):
                p = walk.at_path(params64, site.path)
                again = _redraw_exact(
                    site.layer, where, p, got.x, got.key, train, got.dy, tolerances
                )
                if again is not None:
                    layer_rows, redrawn = again, True
            rows.extend(layer_rows)

        end_rows = _compare_trees(end_where, out["hand"], out["ref"], "grad", tolerances)
        if redrawn:
            note = "differs only through a layer redrawn off a kink (see above)"
            end_rows = [
                r if r.passed or r.method == "structure" else r._replace(passed=True, message=note)
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
        rows.extend(_structure_rows(_Where("model (native dtype)", model.name), params, native))

        if not any(r.method == "structure" for r in end_rows):

            def leaf_where(param_path):
                site, inner = _param_owner(sites, param_path)
                return _where(site), _path_name(inner)

            rows.extend(
                _fd_rows(
                    out["fd"],
                    params64,
                    probes.per_leaf,
                    fd_tol,
                    float(jnp.finfo(loss_dtype).eps),
                    int(directions),
                    _Where("model", model.name),
                    leaf_where,
                )
            )
    return GradCheckReport(rows, title=f"check_model({model.name}, {loss.name})")


@functools.lru_cache(maxsize=64)
def _layer_program(layer: Layer, key_given: bool, train: bool, discrete_x: bool = False):
    """The jitted check of one layer; with ``discrete_x`` the input (integer ids) is
    held fixed: finite differences run over params only, and ``dx`` must be the
    ``float0`` cotangent JAX gives integer inputs."""

    def program(params, x, fwd_key, dy, probes, rel_steps):
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
            return jnp.vdot(out, dy), _discrete(cache)

        mirrors = (
            jax.tree.structure(dparams) == jax.tree.structure(params)
            and all(
                jnp.shape(a) == jnp.shape(b)
                for a, b in zip(jax.tree.leaves(dparams), jax.tree.leaves(params), strict=True)
            )
            and (discrete_x or jnp.shape(dx) == jnp.shape(x))
        )
        point = {"params": params} if discrete_x else {"params": params, "x": x}
        hand = {"params": dparams} if discrete_x else {"params": dparams, "x": dx}
        hand = hand if mirrors else jax.tree.map(jnp.zeros_like, point)
        fd = _fd_probes(phi, point, hand, *probes, rel_steps)
        return {
            "dparams": dparams,
            "ref_dparams": ref_p,
            "dx": dx,
            "ref_dx": ref_x,
            "dy": dy,
            "fd": fd,
        }

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
      >>> ids = jax.random.randint(jax.random.key(1), (2, 5), 0, 10)
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
        x = jax.random.normal(k_x, (batch_size, *input_shape))
    else:
        x = jnp.asarray(inputs)
        if x.ndim < 1 or tuple(x.shape[1:]) != tuple(input_shape):
            raise ConfigError(
                "check_layer",
                f"inputs must have shape (batch, *input_shape) = (batch, "
                f"{', '.join(map(str, input_shape))}), got {tuple(x.shape)}",
            )
    discrete_x = not jnp.issubdtype(x.dtype, jnp.inexact)
    where = _Where(f"layer ({layer.name})", layer.name, ())
    # The contract at the layer's own dtype: dparams mirrors params.
    native = jax.eval_shape(
        lambda p, x: layer.backward(p, *reversed(layer.forward(p, x, **forward_kw)))[0], params, x
    )
    rows = _structure_rows(
        _Where(f"layer ({layer.name}, native dtype)", layer.name, ()), params, native
    )
    with jax.enable_x64(True):
        params64, x64 = _to64(params), _to64(x)
        point = {"params": params64} if discrete_x else {"params": params64, "x": x64}
        seed = int(np.asarray(jax.random.key_data(k_fd)).ravel()[-1])
        probes = _make_probes(point, int(directions), int(coordinates), seed)
        out = jax.eval_shape(lambda p, x: layer.forward(p, x, **forward_kw)[0], params64, x64)
        out_dtype = out.dtype
        dy = jax.random.normal(k_dy, out.shape, jnp.float64)
        run = _layer_program(layer, fwd_key is not None, train, discrete_x)
        fd_tol = tolerances or tolerances_for(out_dtype)
        out = jax.device_get(
            run(
                params64,
                x64,
                fwd_key,
                dy,
                tuple(jnp.asarray(a) for a in probes[:3]),
                jnp.asarray(fd_tol.steps, jnp.float64),
            )
        )
        exact = _compare_trees(where, out["dparams"], out["ref_dparams"], "vjp", tolerances)
        if not discrete_x:
            exact.append(_compare_exact(where, "dx", "vjp", out["dx"], out["ref_dx"], tolerances))
        elif not bool(out["dx"]):
            exact.append(
                _structure_row(
                    where,
                    "dx",
                    f"integer inputs {x.dtype}{list(x.shape)} take a float0 cotangent of "
                    "their shape (np.zeros(x.shape, jax.dtypes.float0)); the backward "
                    "returned something else",
                )
            )
        if (
            not discrete_x
            and not all(r.passed for r in exact)
            and not any(r.method == "structure" for r in exact)
        ):
            again = _redraw_exact(
                layer, where, params64, x64, fwd_key, train, jnp.asarray(out["dy"]), tolerances
            )
            exact = again or exact
        rows += exact
        if not any(r.method == "structure" for r in rows):

            def leaf_where(path):
                keys = tuple(path)
                inner = keys[1:] if keys[0].key == "params" else ()
                return where, _path_name(inner) if inner or keys[0].key == "params" else "x"

            rows += _fd_rows(
                out["fd"],
                point,
                probes.per_leaf,
                fd_tol,
                float(jnp.finfo(out_dtype).eps),
                int(directions),
                where,
                leaf_where,
            )
    return GradCheckReport(rows, title=f"check_layer({layer.name})")


@functools.lru_cache(maxsize=64)
def _grad_program(f: Callable, grad_f: Callable):
    def program(params, args, probes, rel_steps):
        hand = grad_f(params, *args)
        ref = jax.grad(f)(params, *args)
        mirrors = jax.tree.structure(hand) == jax.tree.structure(params) and all(
            jnp.shape(a) == jnp.shape(b)
            for a, b in zip(jax.tree.leaves(hand), jax.tree.leaves(params), strict=True)
        )
        fd = _fd_probes(
            lambda p: (f(p, *args), []),
            params,
            hand if mirrors else jax.tree.map(jnp.zeros_like, params),
            *probes,
            rel_steps,
        )
        return {"hand": hand, "ref": ref, "fd": fd}

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
    where = _Where(f"f ({name})", name)
    with jax.enable_x64(True):
        params64, args64 = _to64(params), _to64(args)
        probes = _make_probes(params64, int(directions), int(coordinates), int(seed))
        out_dtype = jax.eval_shape(lambda p: f(p, *args64), params64).dtype
        fd_tol = tolerances or tolerances_for(out_dtype)
        run = _grad_program(f, grad_f)
        out = jax.device_get(
            run(
                params64,
                args64,
                tuple(jnp.asarray(a) for a in probes[:3]),
                jnp.asarray(fd_tol.steps, jnp.float64),
            )
        )
        # Code outside fbp may return another float dtype than it was given:
        # structure and shapes must match; a narrower dtype sets the tolerance.
        rows = _compare_trees(where, out["hand"], out["ref"], "grad", tolerances, dtypes=False)
        if not any(r.method == "structure" for r in rows):
            rows += _fd_rows(
                out["fd"],
                params64,
                probes.per_leaf,
                fd_tol,
                float(jnp.finfo(out_dtype).eps),
                int(directions),
                where,
                lambda path: (where, _path_name(path)),
            )
    return GradCheckReport(rows, title=f"check_grad({name})")


# --------------------------------------------------------------------------- exercises


class WrongRule(NamedTuple):
    """A deliberately wrong backward rule: an exercise, and a test of the checker.

    Attributes:
      name: short identifier, e.g. ``"flipped_sign"``.
      description: what is wrong, in words.
      build: ``() -> (model, loss, params, x, y)`` with the bug planted.
      layer: index path of the culprit layer in the model, ``None`` for the loss.
      kind: the culprit layer's (or loss's) name, e.g. ``"dense(→8)"``.
      leaf: the leaf the check must name (``"w"``, ``"b"``, ``"dx"``, ``"dpred"``).
    """

    name: str
    description: str
    build: Callable[[], tuple]
    layer: tuple[int, ...] | None
    kind: str
    leaf: str

    def check(self, **kwargs: Any) -> GradCheckReport:
        """Build the buggy model and run :func:`check_model` on it (``kwargs`` passed on)."""
        return check_model(*self.build(), **kwargs)

    def __str__(self) -> str:
        where = (
            "the loss"
            if self.layer is None
            else f"layer {'.'.join(map(str, self.layer))} ({self.kind})"
        )
        return f"{self.name}: {self.description} (culprit: {where}, leaf {self.leaf!r})"


def _with_backward(layer: Layer, backward: Callable) -> Layer:
    """The same layer with another backward rule (``Layer`` is a NamedTuple)."""
    return layer._replace(backward=backward)


def _dense_bug(features: int, bug: Callable) -> Layer:
    """An ``nn.dense`` whose correct backward is passed through ``bug``."""
    from fbp import nn

    layer = nn.dense(features)

    def backward(params, cache, dy):
        dparams, dx = layer.backward(params, cache, dy)
        return bug(params, cache, dy, dparams, dx)

    return _with_backward(layer, backward)


def _case(*layers: Layer, n_in: int = 6, batch: int = 7, classes: int = 4, loss=None):
    """A builder of ``(model, loss, params, x, y)``: nonzero biases, a random batch, labels."""
    from fbp import losses, nn

    def build():
        model = nn.serial(*layers)
        k_init, k_noise, k_x, k_y = jax.random.split(jax.random.key(0), 4)
        params, _ = model.init(k_init, (n_in,))
        leaves, treedef = jax.tree.flatten(params)
        noise_keys = jax.random.split(k_noise, max(len(leaves), 1))
        leaves = [
            p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
            for p, k in zip(leaves, noise_keys, strict=False)
        ]
        params = jax.tree.unflatten(treedef, leaves)
        x = jax.random.normal(k_x, (batch, n_in))
        y = jax.random.randint(k_y, (batch,), 0, classes)
        return model, loss or losses.softmax_cross_entropy, params, x, y

    return build


def wrong_rules() -> list[WrongRule]:
    """The catalogue of known-wrong backward rules, each with the layer and leaf it breaks.

    Every rule builds a small model (or loss) with one classic mistake planted;
    :func:`check_model` on it fails and names the culprit. Use them to practise
    reading a report, or to test another checker.

    Returns:
      A list of :class:`WrongRule`, fresh on every call.

    Example:
      >>> from fbp import verify
      >>> rule = verify.wrong_rules()[0]
      >>> report = rule.check()
      >>> report.ok, report.culprit.layer, report.culprit.leaf
      (False, 'layer 0 (dense(→8))', 'w')
    """
    from fbp import losses, nn

    def sigmoid_from_wrong_cache():
        def backward(params, y, dy):
            s = jax.nn.sigmoid(y)  # y is already σ(z): σ'(z) = y(1 − y), not σ(y)(1 − σ(y))
            return {}, dy * s * (1 - s)

        return _with_backward(nn.sigmoid(), backward)

    def tanh_times_two():
        return _with_backward(nn.tanh(), lambda p, y, dy: ({}, 2 * dy * (1 - y * y)))

    def inverted_relu_mask():
        return _with_backward(
            nn.relu(), lambda p, mask, dy: ({}, jnp.where(mask, 0, dy).astype(dy.dtype))
        )

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

    return [
        WrongRule(
            "flipped_sign",
            "dW = −xᵀ·dy: the weight gradient has the wrong sign",
            _case(
                _dense_bug(8, lambda p, c, dy, d, dx: ({**d, "w": -d["w"]}, dx)),
                nn.tanh(),
                nn.dense(4),
            ),
            (0,),
            "dense(→8)",
            "w",
        ),
        WrongRule(
            "missing_transpose",
            "dx = dy·W instead of dy·Wᵀ (a square weight hides the shape error)",
            _case(
                nn.dense(8),
                nn.tanh(),
                _dense_bug(8, lambda p, c, dy, d, dx: (d, dy @ p["w"])),
                nn.tanh(),
                nn.dense(4),
            ),
            (2,),
            "dense(→8)",
            "dx",
        ),
        WrongRule(
            "forgotten_bias",
            "db is left at zero",
            _case(
                nn.dense(8),
                nn.sigmoid(),
                _dense_bug(4, lambda p, c, dy, d, dx: ({**d, "b": 0 * d["b"]}, dx)),
            ),
            (2,),
            "dense(→4)",
            "b",
        ),
        WrongRule(
            "sigmoid_wrong_cache",
            "σ'(z) computed as σ(y)(1 − σ(y)) from the cached output y instead of y(1 − y)",
            _case(nn.dense(8), sigmoid_from_wrong_cache(), nn.dense(4)),
            (1,),
            "sigmoid",
            "dx",
        ),
        WrongRule(
            "factor_of_two",
            "tanh' taken as 2(1 − y²): a stray factor of 2",
            _case(nn.dense(8), tanh_times_two(), nn.dense(4)),
            (1,),
            "tanh",
            "dx",
        ),
        WrongRule(
            "missing_batch_mean",
            "the loss gradient is not divided by the batch size (missing 1/batch)",
            _case(nn.dense(8), nn.tanh(), nn.dense(4), loss=missing_batch_mean()),
            None,
            "softmax_cross_entropy",
            "dpred",
        ),
        WrongRule(
            "bias_sum_wrong_axis",
            "db = Σ over the features instead of the batch (batch = features hides the shape)",
            _case(
                nn.dense(8),
                nn.tanh(),
                _dense_bug(4, lambda p, c, dy, d, dx: ({**d, "b": dy.sum(axis=1)}, dx)),
                batch=4,
            ),
            (2,),
            "dense(→4)",
            "b",
        ),
        WrongRule(
            "softmax_wrong_axis",
            "the loss's softmax is normalised over the batch axis, not the classes",
            _case(nn.dense(8), nn.tanh(), nn.dense(4), loss=softmax_over_wrong_axis()),
            None,
            "softmax_cross_entropy",
            "dpred",
        ),
        WrongRule(
            "inverted_relu_mask",
            "ReLU passes the gradient where x ≤ 0 instead of where x > 0",
            _case(nn.dense(8), inverted_relu_mask(), nn.dense(4)),
            (1,),
            "relu",
            "dx",
        ),
        WrongRule(
            "first_example_only",
            "dW = x[0]ᵀ·dy[0]: the gradient of the first example only, not the batch sum",
            _case(
                _dense_bug(8, lambda p, c, dy, d, dx: ({**d, "w": jnp.outer(c[0], dy[0])}, dx)),
                nn.tanh(),
                nn.dense(4),
            ),
            (0,),
            "dense(→8)",
            "w",
        ),
        WrongRule(
            "zero_dx",
            "the layer passes no gradient on (dx = 0)",
            _case(nn.dense(8), nn.tanh(), _dense_bug(4, lambda p, c, dy, d, dx: (d, 0 * dx))),
            (2,),
            "dense(→4)",
            "dx",
        ),
        WrongRule(
            "error_only_in_dx",
            "dparams right, dx scaled by 1.01",
            _case(nn.dense(8), nn.tanh(), _dense_bug(4, lambda p, c, dy, d, dx: (d, 1.01 * dx))),
            (2,),
            "dense(→4)",
            "dx",
        ),
        WrongRule(
            "single_element",
            "one element of dW, [3, 5], off by a millionth of the leaf's largest value",
            _case(_dense_bug(16, single_element), nn.relu(), nn.dense(4)),
            (0,),
            "dense(→16)",
            "w",
        ),
    ]
