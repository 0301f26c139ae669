"""Finite differences: probes, self-calibrated noise and kink skipping.

Central differences of a scalar function along a few random directions over
all parameters at once (⟨g, v⟩ against (f(θ+hv) − f(θ−hv))/2h, as JAX's
``check_vjp`` does), plus a seeded sample of coordinates of every leaf. Each
leaf's coordinates and its share of every direction are drawn from the leaf's
path, so adding a parameter elsewhere changes no other leaf's probes.

Every probe evaluates f at ±h and ±2h for two candidate steps; the
disagreement of the h and 2h differences is the probe's own measured noise.
A probe whose points straddle a kink — a boolean or integer residual of the
cache changes between them, or the curvature at h and 2h disagree as only a
kink makes them — is skipped and counted.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fbp.verify.exact import path_name
from fbp.verify.report import LeafCheck, Where
from fbp.verify.tolerances import Tolerances

__all__ = [
    "FdValues",
    "LeafProbes",
    "Probes",
    "discrete",
    "fd_rows",
    "fd_values",
    "make_probes",
    "probe_dots",
    "step_offsets",
]


class LeafProbes(NamedTuple):
    """The coordinates probed in one leaf: its key path and flat indices within it."""

    path: tuple
    chosen: np.ndarray


class Probes(NamedTuple):
    """The finite-difference probes of one check, drawn on the host.

    Attributes:
      directions: ``(D, n)`` over the raveled point, each leaf's share drawn
        from its own path and scaled by the leaf's RMS.
      coord_index: the sampled coordinates, as flat indices into the point.
      coord_scale: their step scale (their leaf's RMS).
      per_leaf: one :class:`LeafProbes` per leaf with coordinates.
    """

    directions: np.ndarray
    coord_index: np.ndarray
    coord_scale: np.ndarray
    per_leaf: tuple[LeafProbes, ...]

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """The arrays a jitted program takes, one row per probe laid out on the host
        (each a few kernels less to compile than in the program): the directions
        with a row of zeros appended, and per probe the row it moves along, the
        coordinate it moves and by how much (0 for a direction)."""
        n_directions, n = self.directions.shape
        n_coords = len(self.coord_index)
        rows = np.concatenate([self.directions, np.zeros((1, n), self.directions.dtype)])
        row = np.concatenate(
            [np.arange(n_directions, dtype=np.int32), np.full(n_coords, n_directions, np.int32)]
        )
        coord = np.concatenate([np.zeros(n_directions, np.int32), self.coord_index])
        size = np.concatenate([np.zeros(n_directions, self.coord_scale.dtype), self.coord_scale])
        # device_put compiles nothing; jnp.asarray would compile per shape.
        return tuple(jax.device_put(a) for a in (rows, row, coord, size))


def step_offsets(steps: tuple[float, ...]) -> jax.Array:
    """The offsets ``t`` every probe evaluates at, ``{−2h, −h, h, 2h}`` for each step ``h``."""
    ts = np.asarray(steps, np.float64)[:, None] * np.asarray([-2.0, -1.0, 1.0, 2.0])[None, :]
    return jax.device_put(ts.reshape(-1))


def _leaf_seed(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def make_probes(point: Any, directions: int, coordinates: int, seed: int) -> Probes:
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
        seed_leaf = _leaf_seed(path_name(path))
        rng = np.random.default_rng([seed, seed_leaf])
        dirs[:, offset : offset + size] = scale * rng.standard_normal((directions, size))
        if coordinates:
            rng = np.random.default_rng(seed_leaf)  # coordinates depend on the path alone
            chosen = np.sort(rng.choice(size, size=min(coordinates, size), replace=False))
            picks.append(offset + chosen)
            scales.append(np.full(len(chosen), scale))
            per_leaf.append(LeafProbes(path, chosen))
        offset += size
    return Probes(
        directions=dirs,
        coord_index=np.concatenate(picks).astype(np.int32) if picks else np.zeros(0, np.int32),
        coord_scale=np.concatenate(scales) if scales else np.zeros(0, np.float64),
        per_leaf=tuple(per_leaf),
    )


def discrete(tree: Any) -> list:
    """The boolean and integer leaves of a cache: a change in them means a kink was crossed."""
    return [
        a
        for a in jax.tree.leaves(tree)
        if hasattr(a, "dtype")
        and (jnp.issubdtype(a.dtype, jnp.bool_) or jnp.issubdtype(a.dtype, jnp.integer))
    ]


class FdValues(NamedTuple):
    """What the jitted program computes for the probes (see :func:`fd_values`).

    Attributes:
      f0: the function at the point.
      values: ``(probes, 8)``: f at ``t ∈ {−2h, −h, h, 2h}`` for both steps.
      changed: ``(probes, 8)``: whether a discrete cache leaf changed there.
    """

    f0: jax.Array
    values: jax.Array
    changed: jax.Array


def probe_dots(hand: Any, probes: Probes) -> tuple[np.ndarray, np.ndarray]:
    """On the host: ⟨g, v⟩ per probe from the hand gradient ``g`` (a tree like the
    point, or ``None`` for zeros), and Σ|vᵢgᵢ|, the scale its error is judged against.

    In numpy, on what the program returned: in the program they were a sixth of
    its compilation (a gather, two products and their concatenations).
    """
    n = probes.directions.shape[1]
    leaves = [] if hand is None else jax.tree.leaves(hand)
    g = (
        np.concatenate([np.asarray(leaf, np.float64).reshape(-1) for leaf in leaves])
        if leaves
        else np.zeros(n, np.float64)
    )
    at_coords = g[probes.coord_index] * probes.coord_scale
    dots = np.concatenate([probes.directions @ g, at_coords])
    terms = np.concatenate([np.abs(probes.directions) @ np.abs(g), np.abs(at_coords)])
    return dots, terms


def fd_values(
    phi: Callable[[Any], tuple[jax.Array, list]],
    point: Any,
    rows: jax.Array,
    row: jax.Array,
    coord: jax.Array,
    size: jax.Array,
    ts: jax.Array,
) -> FdValues:
    """Traceable: evaluate ``phi`` along every direction and coordinate probe.

    ``phi(point) -> (value, discrete cache leaves)``; the probes are
    :meth:`Probes.arrays`, the offsets :func:`step_offsets`. Every probe
    evaluates ``phi`` at ``t ∈ {−2h, −h, h, 2h}`` for both candidate steps
    ``h`` (one vmapped batch of 8), sequentially over probes (``lax.map``), so
    memory stays at a few copies of the parameters whatever the number of
    probes. The hand gradient's side, ⟨g, v⟩, is :func:`probe_dots`' (on the
    host).
    """
    flat, unravel = ravel_pytree(point)
    f0, disc0 = phi(unravel(flat))

    def probe(args):
        j, i, s = args
        v = rows[j].at[i].add(s)

        def at(t):
            value, disc = phi(unravel(flat + t * v))
            changed = jnp.zeros((), bool)
            for a, b in zip(disc, disc0, strict=True):
                changed = changed | jnp.any(a != b)
            return value, changed

        return jax.vmap(at)(ts)

    if row.shape[0]:
        values, changed = jax.lax.map(probe, (row, coord, size))
    else:
        values, changed = jnp.zeros((0, 8), flat.dtype), jnp.zeros((0, 8), bool)
    return FdValues(f0=f0, values=values, changed=changed)


class StepVerdict(NamedTuple):
    """Per probe, at one candidate step: the difference, its noise, and whether it is usable."""

    d: np.ndarray
    noise: np.ndarray
    scale: np.ndarray
    allowed: np.ndarray
    kink: np.ndarray


def _judge_steps(
    fd: FdValues, terms: np.ndarray, tol: Tolerances, eps: float
) -> tuple[StepVerdict, ...]:
    """Per candidate step: finite difference, measured noise, allowance, kink flag."""
    f0 = float(fd.f0)
    values = np.asarray(fd.values, np.float64)
    changed = np.asarray(fd.changed, bool)
    out = []
    for k, h in enumerate(tol.steps):
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
        out.append(StepVerdict(d=d1, noise=noise, scale=scale, allowed=allowed, kink=kink))
    return tuple(out)


def _fd_row(
    where: Where,
    leaf: str,
    method: str,
    dots: np.ndarray,
    steps: tuple[StepVerdict, ...],
    rows: np.ndarray,
    rel_steps: tuple[float, ...],
    indices: list | None,
) -> LeafCheck:
    """One row for the probes ``rows``, with the step chosen by measured noise."""
    # The step is chosen by the median measured noise of the leaf's probes —
    # independent of the hand gradient, so choosing cannot flatter it.
    medians = [np.median(np.where(s.kink[rows], np.inf, s.noise[rows])) for s in steps]
    k = int(np.argmin(medians))
    s = steps[k]
    dots = dots[rows]
    d, allowed, scale, kink = s.d[rows], s.allowed[rows], s.scale[rows], s.kink[rows]
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
    return where.row(
        leaf,
        method,
        max_abs_err=e,
        max_rel_err=rel,
        index=None if indices is None else tuple(int(i) for i in indices[worst]),
        hand=float(dots[worst]) if len(dots) else 0.0,
        reference=float(d[worst]) if len(d) else 0.0,
        probes=int(considered.sum()),
        skipped=int(kink.sum()),
        passed=ok,
        tolerance=tolerance,
        step=float(rel_steps[k]),
        message="every probe sat on a kink: nothing compared" if nothing else "",
        probed=None if indices is None else tuple(tuple(int(i) for i in ix) for ix in indices),
    )


def fd_rows(
    fd: FdValues,
    hand: Any,
    point: Any,
    probes: Probes,
    tol: Tolerances,
    eps: float,
    directions_where: Where,
    leaf_where: Callable[[Any], tuple[Where, str]],
) -> list[LeafCheck]:
    """Rows for the directions (one) and for each leaf's coordinates.

    ``hand`` is the hand gradient, a tree like ``point`` (``None`` when it
    cannot stand for one: zeros); ``leaf_where(path)`` says where a leaf of
    ``point`` belongs and its name there; ``eps`` is the machine epsilon of
    the function's arithmetic.
    """
    dots, terms = probe_dots(hand, probes)
    steps = _judge_steps(fd, terms, tol, eps)
    n_directions = probes.directions.shape[0]
    rows = []
    if n_directions:
        rows.append(
            _fd_row(
                directions_where,
                "all params",
                "fd-directions",
                dots,
                steps,
                np.arange(n_directions),
                tol.steps,
                None,
            )
        )
    start = n_directions
    shapes = {
        tuple(p): np.shape(leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(point)[0]
    }
    for path, chosen in probes.per_leaf:
        where, leaf = leaf_where(path)
        mine = np.arange(start, start + len(chosen))
        start += len(chosen)
        indices = [np.unravel_index(int(i), shapes[tuple(path)]) for i in chosen]
        rows.append(_fd_row(where, leaf, "fd-coordinates", dots, steps, mine, tol.steps, indices))
    return rows
