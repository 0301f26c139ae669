"""Bundled datasets and minibatching. Nothing is ever downloaded.

:func:`load` returns a :class:`Dataset` of NumPy arrays with a fixed train/test
split, so every run and every reader sees the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import numpy as np

from fbp.errors import ConfigError, ShapeError

__all__ = ["DATASETS", "Dataset", "batches", "load"]


class Dataset(NamedTuple):
    """A classification dataset with a fixed split.

    Attributes:
      x_train, y_train, x_test, y_test: features (float32, leading batch axis)
        and integer labels (int32).
      num_classes: number of classes.
      name: the name it was loaded by.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (no batch axis), as ``Layer.init`` wants it."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}: {len(self.x_train)} train / {len(self.x_test)} test, "
            f"input {self.input_shape}, {self.num_classes} classes)"
        )


def _digits() -> Dataset:
    """scikit-learn's 1,797 8×8 handwritten digits (shipped inside the package).

    Pixels (0–16) are scaled to [0, 1]; a stratified 80/20 split with a fixed
    seed gives 1,437 training and 360 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    return Dataset(x_train, y_train, x_test, y_test, 10, "digits")


DATASETS: dict[str, Callable[[], Dataset]] = {"digits": _digits}
"""The loaders :func:`load` knows, by name."""


def load(name: str) -> Dataset:
    """Load a bundled dataset by name.

    Args:
      name: one of ``fbp.data.DATASETS`` (``"digits"``).

    Returns:
      A :class:`Dataset` with a fixed train/test split.

    Example:
      >>> from fbp import data
      >>> ds = data.load("digits")
      >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
      ((1437, 64), (360, 64), 10)
    """
    if name not in DATASETS:
        raise ConfigError("fbp.data.load", f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]()


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    key: jax.Array,
    drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield shuffled minibatches ``(x_batch, y_batch)`` for one pass over the data.

    The order is drawn from the JAX ``key``, so a run is reproducible. With
    ``drop_remainder`` (the default) every batch has exactly ``batch_size``
    examples, so a jitted step compiles once; the few left over are dropped
    for this pass and, being reshuffled, seen in others.
    """
    n = len(x)
    if len(y) != n:
        raise ShapeError("fbp.data.batches", f"x has {n} examples but y has {len(y)}")
    if batch_size < 1:
        raise ConfigError("fbp.data.batches", f"batch_size must be positive, got {batch_size}")
    order = np.asarray(jax.random.permutation(key, n))
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]
