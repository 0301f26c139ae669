"""Errors fbp raises for bad input, each naming where it happened.

Every check in fbp runs on static shapes and dtypes, so it fires once, at
``init`` or trace time, before XLA sees the program. An error raised inside a
child of :func:`fbp.nn.serial` is re-raised with the child's position
prepended, so the message reads like::

    serial layer 2 (dense 64→10): expected input of shape (batch, 64), got (32, 32)

and ``error.layer_path == (2,)``, ``error.layer == "dense 64→10"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DTypeError",
    "FbpError",
    "GradientCheckError",
    "RangeError",
    "ShapeError",
    "TrainingDiverged",
    "at_layer",
]


class FbpError(Exception):
    """Base class of fbp's input errors.

    Attributes:
      layer: what raised it, e.g. ``"dense 64→10"`` or ``"softmax_cross_entropy"``.
      message: what was expected and what was found.
      layer_path: indices of the enclosing ``serial`` children, outermost first
        (empty when the layer was called directly).
    """

    def __init__(self, layer: str, message: str):
        super().__init__(layer, message)
        self.layer = layer
        self.message = message
        self.layer_path: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.layer_path:
            index = ".".join(str(i) for i in self.layer_path)
            return f"serial layer {index} ({self.layer}): {self.message}"
        return f"{self.layer}: {self.message}"


class ShapeError(FbpError, ValueError):
    """An input, target or parameter has the wrong shape or structure."""


class RangeError(FbpError, ValueError):
    """A value lies outside its allowed range: a label ``>= classes``, an id ``>= vocab``.

    Raised where the values are concrete (eager calls, ``fit``'s up-front data
    check); under ``jit`` values are unknown at trace time, so the layers and
    losses concerned turn such entries into NaN instead (see their docstrings).
    """


class DTypeError(FbpError, TypeError):
    """An input, target or parameter has the wrong dtype."""


class ConfigError(FbpError, ValueError):
    """A layer or loss was built with arguments that cannot work."""


class CheckpointError(FbpError, ValueError):
    """A checkpoint file cannot be read, or does not fit the target it is loaded into."""


class TrainingDiverged(FbpError, FloatingPointError):
    """The training loss or the params became NaN or infinite; training stopped."""


class GradientCheckError(FbpError, AssertionError):
    """A hand-derived gradient disagrees with its references (raised by :mod:`fbp.verify`).

    ``str(error)`` reads like every fbp error, e.g. ``serial layer 2
    (dense(→10)): leaf 'w' fails the vjp check: ...``.

    Attributes:
      layer, layer_path, message: as for every :class:`FbpError`.
      leaf: the failing leaf (``"w"``, ``"dx"``, ``"dpred"``, ...).
      row: the culprit ``fbp.verify.LeafCheck``.
      report: the whole ``fbp.verify.GradCheckReport``.
    """

    def __init__(self, layer: str, message: str, *, leaf: str = "", row=None, report=None) -> None:
        super().__init__(layer, message)
        self.leaf = leaf
        self.row = row
        self.report = report


@contextmanager
def at_layer(index: int) -> Iterator[None]:
    """Prepend ``index`` to the ``layer_path`` of any :class:`FbpError` raised inside."""
    try:
        yield
    except FbpError as error:
        error.layer_path = (index, *error.layer_path)
        raise
