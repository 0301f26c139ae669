"""Checkpoints: exact round trips, atomic replacement under SIGKILL, no code execution."""

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import fbp
from fbp import optim
from fbp.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    lock_directory,
    save_checkpoint,
)


class Pair(NamedTuple):
    first: object
    second: object


def _bits(x):
    """The raw bytes of an array (so NaN payloads and signed zeros count)."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.dtype.str, x.shape, x.tobytes()


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if isinstance(x, bool | int | float | complex):
            assert type(x) is type(y) and x == y
        else:
            assert _bits(x) == _bits(y)


def _device(values, dtype=np.float32):
    """``values`` as a jax array of ``dtype``, put on the device (no program compiles)."""
    return jax.device_put(np.asarray(values, dtype))


def _awkward_tree():
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.0], np.float32)
    special[0] = np.frombuffer(np.uint32(0x7FC0_1234).tobytes(), np.float32)[0]  # NaN payload
    return {
        "dense": (
            {
                "w": _device(np.random.default_rng(0).standard_normal((3, 4))),
                "b": _device(np.zeros(4)),
            },
            {},
        ),
        "special": special,
        "bf16": _device([1.5, -2.25, 3.0], ml_dtypes.bfloat16),
        "f8": np.asarray([0.5, 1.0], ml_dtypes.float8_e4m3fn),
        "c64": np.asarray([1 + 2j, -3j], np.complex64),
        "ints": [np.int8(-3), np.arange(5, dtype=np.uint16), np.array(7, np.int64)],
        "flags": np.array([True, False]),
        "scalar": _device(2.5),
        "empty": np.zeros((0, 3), np.float32),
        "key": jax.random.key(42),
        "python": (1, 2.5, True),
        "nothing": None,
        "pair": Pair(_device(np.ones(2)), None),
    }


def test_round_trip_without_target_is_bit_exact(tmp_path):
    tree = _awkward_tree()
    path = save_checkpoint(tmp_path / "c.safetensors", tree, None, 123, metadata={"note": [1, "x"]})
    loaded = load_checkpoint(path)
    assert isinstance(loaded, Checkpoint)
    assert loaded.step == 123 and loaded.metadata == {"note": [1, "x"]} and loaded.opt_state is None
    params = loaded.params
    assert params["nothing"] is None and params["dense"][1] == {}
    assert type(params["pair"]).__name__ == "Pair" and params["pair"]._fields == ("first", "second")
    assert isinstance(params["ints"], list) and isinstance(params["dense"], tuple)
    assert jnp.issubdtype(params["key"].dtype, jax.dtypes.prng_key)
    assert params["python"] == (1, 2.5, True)
    # Same leaves, same bits (the NamedTuple comes back as a look-alike class).
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
        if isinstance(x, bool | int | float):
            assert type(x) is type(y) and x == y
        else:
            assert _bits(x) == _bits(y)


def test_float64_round_trip_is_bit_exact(tmp_path, x64):
    tree = {"w": _device(np.random.default_rng(0).standard_normal((5, 5)) * 1e300, np.float64)}
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.safetensors", tree), target=(tree, None))
    assert loaded.params["w"].dtype == np.float64
    _assert_same(loaded.params, tree)


def test_target_restores_optax_state_types_exactly(tmp_path):
    params = {
        "w": _device(np.random.default_rng(0).standard_normal((3, 2))),
        "b": _device(np.zeros(2)),
    }
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optim.adam(1e-2), optax.adamw(1e-3))
    init, update = jax.jit(optimizer.init), jax.jit(optimizer.update)  # one program each
    state = init(params)
    grads = jax.tree.map(np.ones_like, params)
    for _ in range(3):
        updates, state = update(grads, state, params)
        params = jax.jit(optax.apply_updates)(params, updates)
    path = save_checkpoint(tmp_path / "c.safetensors", params, state, 3)
    template = (jax.tree.map(np.zeros_like, params), init(params))
    loaded = load_checkpoint(path, target=template)
    _assert_same(loaded.params, params)
    _assert_same(loaded.opt_state, state)  # the same optax NamedTuple classes, not look-alikes
    # And training goes on from it exactly as from the original.
    expected, _ = update(grads, state, params)
    resumed, _ = update(grads, loaded.opt_state, loaded.params)
    _assert_same(resumed, expected)


def test_names_are_tree_paths(tmp_path):
    from safetensors import safe_open

    params = ({"w": jnp.ones((2, 2))},)
    path = save_checkpoint(tmp_path / "c.safetensors", params, optim.adam(0.1).init(params))
    with safe_open(str(path), framework="np") as file:
        names = set(file.keys())
    assert names == {
        "params[0]['w']",
        "opt_state.count",
        "opt_state.mu[0]['w']",
        "opt_state.nu[0]['w']",
    }


def test_each_checkpoint_name_has_one_documented_import_path():
    # fbp.checkpoint is the home of the checkpoint API; fbp.train no longer lists it.
    for name in ("save_checkpoint", "load_checkpoint", "Checkpoint", "CheckpointError"):
        assert name in fbp.checkpoint.__all__
        assert name not in fbp.train.__all__
    assert fbp.checkpoint.save_checkpoint is save_checkpoint


@pytest.mark.parametrize(
    ("template", "match"),
    [
        (
            {"w": jnp.ones((3, 3))},
            r"leaf params\['w'\] is float32\[2, 3\] but the target expects float32\[3, 3\]",
        ),
        (
            {"w": jnp.ones((2, 3), jnp.int32)},
            r"is float32\[2, 3\] but the target expects int32\[2, 3\]",
        ),
        (
            {"v": jnp.ones((2, 3))},
            r"has no leaf params\['v'\]; it holds params\['w'\]\. Was it saved",
        ),
        ({}, r"holds leaves the target lacks: params\['w'\]\. Was it saved"),
    ],
)
def test_target_mismatch_is_named(tmp_path, template, match):
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": jnp.ones((2, 3))})
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, target=(template, None))


def test_not_a_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(other))
    with pytest.raises(CheckpointError, match="is not an fbp checkpoint"):
        load_checkpoint(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(garbage)


def test_damaged_header(tmp_path):
    from safetensors.numpy import save_file

    damaged = tmp_path / "damaged.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(damaged), metadata={"format": "fbp.checkpoint/1"})
    with pytest.raises(CheckpointError, match="has a damaged header: 'structure'"):
        load_checkpoint(damaged)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_loading_a_pickle_never_runs_it(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"params": _Payload(str(marker))}))
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    assert not marker.exists()


def test_save_rejects_what_it_cannot_store(tmp_path):
    with pytest.raises(CheckpointError, match="metadata must be JSON-serialisable"):
        save_checkpoint(tmp_path / "c.safetensors", {}, metadata={"f": object()})
    with pytest.raises(CheckpointError, match="dict keys must be strings"):
        save_checkpoint(tmp_path / "c.safetensors", {1: jnp.ones(1)})
    with pytest.raises(CheckpointError, match="cannot save str at params\\['name'\\]"):
        save_checkpoint(tmp_path / "c.safetensors", {"name": "dense"})
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_save_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "deep" / "dir" / "c.safetensors"
    save_checkpoint(path, {"w": jnp.ones(2)}, step=1)
    save_checkpoint(path, {"w": jnp.zeros(2)}, step=2)
    assert load_checkpoint(path).step == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.safetensors"]


# --------------------------------------------------------------------------- killed mid-save

# The runs that get killed live in child processes. Starting Python and importing fbp (JAX,
# ml_dtypes) takes a second or more, so one server process (per test worker) imports fbp
# once and forks a fresh child for each run: a command line "<run> <path>" on its stdin
# starts one; the child prints "pid <its pid>" and then what the run reports ("stalled",
# "saved <step>", "locked"); the server prints "done" once the child has died (the test
# kills it with SIGKILL, by that pid). The server never starts a JAX backend, so forking
# it is safe.
_SERVER = r"""
import os, sys, time
import numpy as np
from fbp import checkpoint

BIG = (512, 1024)  # 2 MiB per checkpoint


def stall_mid_write():  # write half the bytes, then hang until killed
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, file):
            self.file = file
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.file.__exit__(*exc)
        def write(self, data):
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            print("stalled", flush=True)
            time.sleep(600)

    os.fdopen = lambda fd, mode: HalfWriter(real_fdopen(fd, mode))


def stall_before_rename():  # the new file is complete but not yet in place
    def stall(src, dst):
        print("stalled", flush=True)
        time.sleep(600)

    os.replace = stall


def run(what, path):
    if what == "lock":  # hold the folder as a run does, until killed
        with checkpoint.lock_directory(path):
            print("locked", flush=True)
            time.sleep(600)
    checkpoint.save_checkpoint(path, {"w": np.full(BIG, 1.0, np.float32)}, None, 1)
    if what == "mid-write":
        stall_mid_write()
    elif what == "before-rename":
        stall_before_rename()
    elif what == "loop":  # save over and over; the parent kills at a random moment
        for step in range(2, 10_000):
            checkpoint.save_checkpoint(path, {"w": np.full(BIG, float(step), np.float32)}, None, step)
            print("saved", step, flush=True)
    checkpoint.save_checkpoint(path, {"w": np.full(BIG, 2.0, np.float32)}, None, 2)


print("ready", flush=True)
for line in sys.stdin:
    what, path = line.rstrip("\n").split(" ", 1)
    pid = os.fork()
    if pid == 0:
        try:
            sys.stdin.close()
            print("pid", os.getpid(), flush=True)
            run(what, path)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    print("done", flush=True)
"""


class _Runs:
    """The server of :data:`_SERVER`: ``start`` a run in a fresh child, ``kill`` it."""

    def __init__(self):
        self.server = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        if self.readline() != "ready\n":
            self.close()
            pytest.fail(f"the server did not start: {self.server.stderr.read()}")

    def readline(self):
        return self.server.stdout.readline()

    def start(self, what, path):
        """Start run ``what`` on ``path`` in a new child; its pid."""
        self.server.stdin.write(f"{what} {path}\n")
        self.server.stdin.flush()
        line = self.readline()
        assert line.startswith("pid "), (line, self.server.stderr.read())
        return int(line.split()[1])

    def kill(self, pid):
        """SIGKILL the child ``pid`` and wait until the server has seen it die."""
        os.kill(pid, signal.SIGKILL)
        while (line := self.readline()) != "done\n":
            assert line, "the server died"

    def close(self):
        self.server.stdin.close()
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        self.server.stdout.close()
        self.server.stderr.close()


@pytest.fixture(scope="module")
def runs():
    server = _Runs()
    yield server
    server.close()


@pytest.mark.parametrize("stall_at", ["mid-write", "before-rename"])
def test_save_killed_midway_leaves_the_old_checkpoint(tmp_path, stall_at, runs):
    path = tmp_path / "c.safetensors"
    pid = runs.start(stall_at, path)
    line = runs.readline()
    if line != "stalled\n":
        runs.kill(pid)
        pytest.fail(f"child did not reach the save: {line!r}")
    temporary = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temporary) == 1  # the new checkpoint was on its way
    runs.kill(pid)
    loaded = load_checkpoint(path)
    assert loaded.step == 1
    np.testing.assert_array_equal(loaded.params["w"], np.full((512, 1024), 1.0, np.float32))
    # The next save works and replaces it.
    save_checkpoint(path, {"w": jnp.zeros(1)}, step=3)
    assert load_checkpoint(path).step == 3


def test_save_killed_at_a_random_moment_leaves_a_whole_checkpoint(tmp_path, runs):
    path = tmp_path / "c.safetensors"
    pid = runs.start("loop", path)
    for _ in range(3):
        line = runs.readline()
        if not line.startswith("saved"):
            runs.kill(pid)
            pytest.fail(f"child failed: {line!r}")
    time.sleep(random.Random(0).uniform(0.0, 0.05))  # a kill at some moment of a save
    runs.kill(pid)
    loaded = load_checkpoint(path)
    assert loaded.step >= 3
    np.testing.assert_array_equal(loaded.params["w"], np.full((512, 1024), loaded.step, np.float32))


def test_a_checkpoint_without_leaves_says_it_holds_nothing(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {})
    with pytest.raises(CheckpointError, match=r"has no leaf params\['w'\]; it holds nothing\. Was"):
        load_checkpoint(path, target=({"w": jnp.ones(2)}, None))


def test_another_optimizer_is_named_briefly(tmp_path):
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "c": jnp.ones(1)}
    path = save_checkpoint(tmp_path / "c.safetensors", params, optim.adam(0.1).init(params))
    with pytest.raises(
        CheckpointError,
        match=r"holds leaves the target lacks: opt_state\.mu\['b'\], .*, \.\.\. \(6 in all\)",
    ):
        load_checkpoint(path, target=(params, optim.sgd(0.1).init(params)))


# --------------------------------------------------------------------------- the folder and its lock


def _take(directory):
    """Take the folder's lock and give it back."""
    with lock_directory(directory):
        pass


def test_an_unusable_folder_is_named(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(
        CheckpointError, match=rf"fit: checkpoint_dir {file} is a file, not a folder"
    ):
        _take(file)
    with pytest.raises(
        CheckpointError, match=rf"cannot create checkpoint_dir {file}/run/a: {file} is a file"
    ):
        _take(file / "run" / "a")
    with pytest.raises(
        CheckpointError, match=r"cannot create checkpoint_dir /proc/fbp-none/a: No such file"
    ):
        _take("/proc/fbp-none/a")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_folder_is_named(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=rf"cannot write to checkpoint_dir {tmp_path}"):
            _take(tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_the_lock_is_released_and_removed(tmp_path):
    with lock_directory(tmp_path / "run") as lock:
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(
            CheckpointError, match=rf"in use by another run \(process {os.getpid()}\)"
        ):
            _take(tmp_path / "run")
    assert not lock.exists()
    with lock_directory(tmp_path / "run"):  # free again
        pass


def test_a_live_run_holds_the_folder_and_a_killed_one_does_not(tmp_path, runs):
    pid = runs.start("lock", tmp_path)
    line = runs.readline()
    if line != "locked\n":
        runs.kill(pid)
        pytest.fail(f"child did not take the lock: {line!r}")
    try:
        with pytest.raises(
            CheckpointError,
            match=rf"checkpoint_dir {tmp_path} is in use by another run \(process {pid}\)",
        ):
            _take(tmp_path)
    finally:
        runs.kill(pid)
    assert (tmp_path / "checkpoint.lock").read_text() == f"{pid}\n"  # stale, left behind
    with lock_directory(tmp_path):  # a dead process's lock does not block
        pass


# --------------------------------------------------------------------------- malformed files


def _tampered(tmp_path, change, tensors_change=None):
    """A valid checkpoint whose header structure (and tensors) ``change`` rewrites."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = save_checkpoint(tmp_path / "c.safetensors", {"w": np.ones((2, 3), np.float32)}, None, 1)
    with safe_open(str(path), framework="np") as file:
        header = dict(file.metadata())
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    structure = json.loads(header["structure"])
    changed = change(structure)
    header["structure"] = changed if isinstance(changed, str) else json.dumps(changed)
    if tensors_change is not None:
        tensors = tensors_change(tensors)
    save_file(tensors, str(path), metadata=header)
    return path


def _leaf(structure):
    return structure["params"]["dict"]["w"]


def _set(node, **fields):
    node.update(fields)
    return node


def _deeply_nested(structure, depth):
    import json

    leaf = json.dumps(_leaf(structure))
    params = '{"tuple": [' * depth + leaf + "]}" * depth
    return json.dumps({**structure, "params": None}).replace(
        '"params": null', f'"params": {params}'
    )


MALFORMED = {
    "a tensor missing": (lambda s: s, lambda t: {"other": np.zeros(1, np.float32)}),
    "a bogus dtype": (lambda s: (_set(_leaf(s), dtype="float99", shape=[2, 3]), s)[1], None),
    "a shape that does not fit": (
        lambda s: (_set(_leaf(s), dtype="bfloat16", shape=[7]), s)[1],
        None,
    ),
    "a node of the wrong kind": (lambda s: {**s, "params": {"dict": [1, 2]}}, None),
    "deep nesting": (lambda s: _deeply_nested(s, 5000), None),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_file_is_a_checkpoint_error_naming_it(tmp_path, case):
    change, tensors_change = MALFORMED[case]
    path = _tampered(tmp_path, change, tensors_change)
    with pytest.raises(CheckpointError, match=r"^load_checkpoint: .*c\.safetensors"):
        load_checkpoint(path)


def test_names_from_a_file_reach_the_terminal_escaped(tmp_path):
    path = _tampered(
        tmp_path,
        lambda s: (_set(_leaf(s), leaf="\x1b[31mred"), s)[1],
        lambda t: {"other": np.zeros(1, np.float32)},
    )
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert "\x1b" not in str(caught.value) and "\\x1b" in str(caught.value)
