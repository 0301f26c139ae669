"""The verdict of a check as data: one row per leaf and method, rendered as a table or HTML."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fbp.errors import GradientCheckError

__all__ = ["GradCheckReport", "GradientCheckError", "LeafCheck", "Where"]


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


class Where(NamedTuple):
    """Where rows belong: the display label, the layer's kind and its index path."""

    label: str
    kind: str
    path: tuple[int, ...] | None = None

    def row(self, leaf: str, method: str, **fields: Any) -> LeafCheck:
        """A :class:`LeafCheck` for ``leaf`` here; ``fields`` are its other columns, by name."""
        return LeafCheck(
            layer=self.label, leaf=leaf, method=method, path=self.path, kind=self.kind, **fields
        )


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
