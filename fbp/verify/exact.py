"""Exact comparison: a hand gradient against ``jax.vjp``/``jax.grad`` of the same function.

Both sides compute the same products in float64 and differ only by summation
order, so whole arrays are compared — the worst absolute error against the
reference leaf's largest magnitude — and even one wrong element is caught.
Before any value, the structure: ``dparams`` must mirror ``params`` (tree,
shapes and dtypes), and a mismatch is a ``"structure"`` row naming the leaf.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.verify.report import LeafCheck, Where
from fbp.verify.tolerances import Tolerances, narrowest_dtype, tolerances_for

__all__ = [
    "compare_exact",
    "compare_trees",
    "mirrors",
    "path_name",
    "structure_row",
    "structure_rows",
    "to64",
]


def to64(tree: Any) -> Any:
    """Cast floating leaves to float64 (call inside ``jax.enable_x64``).

    Arrays are cast in numpy and put on the device: ``jnp.asarray`` would
    compile a small conversion program for every new shape and dtype. Python
    scalars keep ``jnp.asarray``'s weak types.
    """

    def cast(a):
        floating = jnp.issubdtype(jnp.result_type(a), jnp.floating)
        if isinstance(a, jax.Array | np.ndarray | np.generic):
            return jax.device_put(np.asarray(a, np.float64) if floating else np.asarray(a))
        return jnp.asarray(a, jnp.float64) if floating else jnp.asarray(a)

    return jax.tree.map(cast, tree)


def path_name(path: Any) -> str:
    """A key path as a leaf name, ``"w"`` or ``"2.b"``; ``"params"`` for the root."""
    name = jax.tree_util.keystr(tuple(path), simple=True, separator=".")
    return name if name else "params"


def mirrors(tree: Any, like: Any) -> bool:
    """Whether ``tree`` has the structure and shapes of ``like`` (static: usable while tracing)."""
    return jax.tree.structure(tree) == jax.tree.structure(like) and all(
        jnp.shape(a) == jnp.shape(b)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(like), strict=True)
    )


def structure_row(where: Where, leaf: str, message: str) -> LeafCheck:
    """A failing ``"structure"`` row: the hand gradient does not even have the right form."""
    return where.row(
        leaf,
        "structure",
        max_abs_err=math.inf,
        max_rel_err=math.inf,
        index=None,
        hand=math.nan,
        reference=math.nan,
        probes=0,
        skipped=0,
        passed=False,
        tolerance=0.0,
        message=message,
    )


def _leaf_names(tree: Any) -> list[str]:
    return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def structure_rows(where: Where, params: Any, dparams: Any, dtypes: bool = True) -> list[LeafCheck]:
    """``dparams`` must mirror ``params``: structure, shapes and (if ``dtypes``) dtypes.

    A tree of another structure gives one row named after the leaves it lacks
    (or has in excess); a leaf of another shape or dtype, one row per leaf.
    """
    p_def, d_def = jax.tree.structure(params), jax.tree.structure(dparams)
    if p_def != d_def:
        have, want = _leaf_names(dparams), _leaf_names(params)
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        detail = "; ".join(
            f"{what} {', '.join(map(repr, names))}"
            for what, names in (("no leaf", missing), ("unexpected leaf", extra))
            if names
        )
        return [
            structure_row(
                where,
                ", ".join(missing or extra) or "params",
                f"dparams has structure {d_def}, params {p_def}"
                + (f" ({detail})" if detail else ""),
            )
        ]
    rows = []
    for (path, p), d in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(dparams), strict=True
    ):
        if jnp.shape(p) != jnp.shape(d) or (dtypes and jnp.result_type(p) != jnp.result_type(d)):
            rows.append(
                structure_row(
                    where,
                    path_name(path),
                    f"dparams leaf is {jnp.result_type(d)}{list(jnp.shape(d))}, params leaf is "
                    f"{jnp.result_type(p)}{list(jnp.shape(p))}",
                )
            )
    return rows


def compare_exact(
    where: Where, leaf: str, method: str, hand: Any, ref: Any, tol: Tolerances | None
) -> LeafCheck:
    """Compare two whole arrays: worst absolute error against the reference's largest magnitude."""
    rtol = (tol or tolerances_for(narrowest_dtype(hand, ref))).exact_rtol
    hand = np.asarray(hand, np.float64)
    ref = np.asarray(ref, np.float64)
    if hand.shape != ref.shape:
        return structure_row(
            where, leaf, f"hand gradient has shape {hand.shape}, expected {ref.shape}"
        )
    if hand.size == 0:
        return where.row(
            leaf,
            method,
            max_abs_err=0.0,
            max_rel_err=0.0,
            index=None,
            hand=0.0,
            reference=0.0,
            probes=0,
            skipped=0,
            passed=True,
            tolerance=rtol,
        )
    diff = np.abs(hand - ref)
    diff = np.where(np.isnan(diff), np.inf, diff)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    scale = float(np.max(np.abs(ref)))
    err = float(diff[worst])
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    return where.row(
        leaf,
        method,
        max_abs_err=err,
        max_rel_err=rel,
        index=tuple(int(i) for i in worst),
        hand=float(hand[worst]),
        reference=float(ref[worst]),
        probes=int(hand.size),
        skipped=0,
        passed=bool(err <= rtol * scale),
        tolerance=rtol,
    )


def compare_trees(
    where: Where,
    hand_tree: Any,
    ref_tree: Any,
    method: str,
    tol: Tolerances | None,
    dtypes: bool = True,
) -> list[LeafCheck]:
    """Structure first, then every leaf exactly."""
    rows = structure_rows(where, ref_tree, hand_tree, dtypes)
    if rows:
        return rows
    return [
        compare_exact(where, path_name(path), method, hand, ref, tol)
        for (path, ref), hand in zip(
            jax.tree_util.tree_flatten_with_path(ref_tree)[0],
            jax.tree.leaves(hand_tree),
            strict=True,
        )
    ]
