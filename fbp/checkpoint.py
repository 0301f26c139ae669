"""Checkpoints: params, optimizer state and step, saved exactly, atomically, without pickle.

Format. A checkpoint is one `safetensors <https://github.com/huggingface/safetensors>`_
file. We chose safetensors because it is maintained (Hugging Face, Rust
core), widely read (PyTorch, JAX, NumPy, many tools), and, by design, only
data: a JSON header of names, dtypes and shapes followed by raw little-endian
bytes. Loading one parses that header and copies bytes; nothing in the file
is ever executed, unlike pickle (``np.load(allow_pickle=True)``,
``torch.load``), so a checkpoint someone sent you cannot run code. Raw bytes
also make the round trip bit for bit: every NaN payload and signed zero
comes back as saved.

Each array leaf is one tensor named by its path in the tree, e.g.
``params[0]['w']`` or ``opt_state.mu[0]['w']``, so the file reads well in any
safetensors viewer. The tree's shape (dicts, lists, tuples, NamedTuples and
``None``) is stored as JSON in the header metadata, together with the step and
any JSON-serialisable ``metadata`` of yours. Dtypes safetensors lacks
(bfloat16, float8, complex) are stored as their raw bytes with the dtype
written beside them; typed PRNG keys as their key data and implementation.

Atomicity. :func:`save_checkpoint` writes to a temporary file in the target's
directory, flushes and ``fsync``s it, then ``os.replace``s it over the target
(atomic on POSIX and Windows) and ``fsync``s the directory. A crash or kill at
any moment leaves either the previous checkpoint or the new one, never a torn
file (at worst a stray ``.<name>.*.tmp`` file beside it).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.errors import CheckpointError

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "lock_directory",
    "prepare_directory",
    "save_checkpoint",
    "write_atomically",
]

FORMAT = "fbp.checkpoint/1"

# Dtypes safetensors stores natively; anything else is saved as raw bytes.
_NATIVE = {
    np.dtype(name)
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}

Params = Any
OptState = Any
PathLike = str | os.PathLike


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns.

    Attributes:
      params: the saved params.
      opt_state: the saved optimizer state (``None`` if none was saved).
      step: the step number saved with them.
      metadata: the JSON-serialisable dict saved with them (``{}`` if none).
    """

    params: Params
    opt_state: OptState
    step: int
    metadata: dict[str, Any]


# --------------------------------------------------------------------------- save


def save_checkpoint(
    path: PathLike,
    params: Params,
    opt_state: OptState = None,
    step: int = 0,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``params``, ``opt_state`` and ``step`` to ``path``, atomically.

    The file is replaced only once the new one is completely on disk, so an
    interrupted save leaves the previous checkpoint intact.

    Args:
      path: the file to write (conventionally ``*.safetensors``); its parent
        directories are created.
      params: a pytree of arrays (dicts, lists, tuples, NamedTuples, ``None``;
        other registered pytree nodes can be loaded back only with ``target``).
      opt_state: the optimizer state, e.g. ``optimizer.init(params)``'s result.
      step: the training step (or any int) to store with them.
      metadata: extra JSON-serialisable data (history, configuration, ...).

    Returns:
      The path written.

    Example:
      >>> import jax.numpy as jnp, optax, fbp
      >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
      >>> opt_state = optax.adam(1e-3).init(params)
      >>> path = fbp.checkpoint.save_checkpoint(
      ...     "/tmp/fbp-example.safetensors", params, opt_state, 10)
      >>> fbp.checkpoint.load_checkpoint(path, target=(params, opt_state)).step
      10
    """
    from safetensors.numpy import save

    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    structure = {
        "params": _encode(params, "params", tensors),
        "opt_state": _encode(opt_state, "opt_state", tensors),
    }
    header = {
        "format": FORMAT,
        "step": str(int(step)),
        "structure": json.dumps(structure),
        "metadata": _to_json("metadata", metadata or {}),
    }
    write_atomically(path, save(tensors, metadata=header))
    return path


def write_atomically(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never a mix.

    Writes a temporary file in the same directory, ``fsync``s it, renames it
    over ``path`` with ``os.replace`` (atomic) and ``fsync``s the directory so
    the rename itself survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename durable
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _to_json(what: str, value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError as error:
        raise CheckpointError(
            "save_checkpoint", f"{what} must be JSON-serialisable: {error}"
        ) from None


def _encode(tree: Any, name: str, tensors: dict[str, np.ndarray]) -> Any:
    """Describe ``tree`` as JSON, moving its array leaves into ``tensors`` under their paths.

    Paths are spelled as ``jax.tree_util.keystr`` spells them, so loading into
    a ``target`` can look each leaf up by the target's own paths.
    """
    if tree is None:
        return None
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a NamedTuple
        return {
            "namedtuple": type(tree).__name__,
            "fields": {f: _encode(v, f"{name}.{f}", tensors) for f, v in tree._asdict().items()},
        }
    if isinstance(tree, tuple | list):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return {kind: [_encode(v, f"{name}[{i}]", tensors) for i, v in enumerate(tree)]}
    if isinstance(tree, dict):
        if not all(isinstance(key, str) for key in tree):
            raise CheckpointError(
                "save_checkpoint", f"dict keys must be strings, got {list(tree)} at {name}"
            )
        return {"dict": {k: _encode(v, f"{name}[{k!r}]", tensors) for k, v in tree.items()}}
    if _is_leaf(tree):
        return _encode_leaf(tree, name, tensors)
    # Another registered pytree node: keep its children, remember its type's name.
    children, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
    if not children or children[0][1] is tree:
        raise CheckpointError(
            "save_checkpoint",
            f"cannot save {type(tree).__name__} at {name}: leaves must be arrays or numbers",
        )
    return {
        "node": type(tree).__name__,
        "children": [
            _encode(child, name + jax.tree_util.keystr(key), tensors) for key, child in children
        ],
    }


def _is_leaf(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic | bool | int | float | complex)


def _encode_leaf(leaf: Any, name: str, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": name}
    if isinstance(leaf, bool | int | float | complex):
        node["python"] = type(leaf).__name__
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        node["key_impl"] = str(jax.random.key_impl(leaf))
        leaf = jax.random.key_data(leaf)
    array = np.asarray(leaf, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
    if array.dtype not in _NATIVE:  # e.g. bfloat16: keep the raw bytes, name the dtype
        node["dtype"], node["shape"] = array.dtype.name, list(array.shape)
        array = array.reshape(-1).view(np.uint8)
    if name in tensors:
        raise CheckpointError("save_checkpoint", f"two leaves share the path {name}")
    tensors[name] = array
    return node


# --------------------------------------------------------------------------- lock

LOCK_NAME = "checkpoint.lock"


@contextlib.contextmanager
def lock_directory(directory: PathLike, where: str = "fit") -> Iterator[Path]:
    """Make sure ``directory`` can hold checkpoints, and hold it for this run alone.

    Creates the directory if needed, then takes an exclusive ``flock`` on
    ``directory/checkpoint.lock`` (holding this process's id) for the
    duration of the ``with`` block. Problems are found here, before any
    training: a path that is a file or lies below one, a folder that cannot
    be created or written, and a lock another live run holds. A lock left by
    a killed run does not block: the kernel releases an ``flock`` when its
    process dies, whatever the file still says. (Where ``fcntl`` is missing,
    as on Windows, the folder is checked but not locked.)

    Raises:
      CheckpointError: naming the folder and what is wrong with it.
    """
    directory = Path(directory)
    prepare_directory(directory, where)
    path = directory / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: check that the folder is writable
        fcntl = None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise CheckpointError(
                where, f"cannot write to checkpoint_dir {directory}: {error.strerror}"
            ) from None
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                where,
                f"checkpoint_dir {directory} is in use by another run (process {holder:.20}); "
                "wait for it to finish or use another folder",
            ) from None
        try:  # the file may have been removed by a run finishing in between: lock anew
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def prepare_directory(
    directory: PathLike, where: str = "fit", noun: str = "checkpoint_dir"
) -> Path:
    """Create ``directory`` for checkpoints, or say in one line why it cannot be.

    Args:
      directory: the folder.
      where: who asks, for the message.
      noun: how the caller calls the folder (``"--checkpoint-dir"`` in the CLI).

    Raises:
      CheckpointError: the path is a file, lies below a file, or cannot be created.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(where, f"{noun} {directory} is a file, not a folder")
    blocking = next((p for p in directory.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CheckpointError(where, f"cannot create {noun} {directory}: {blocking} is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(
            where, f"cannot create {noun} {directory}: {error.strerror}"
        ) from None
    return directory


# --------------------------------------------------------------------------- load


def load_checkpoint(
    path: PathLike, *, target: tuple[Params, OptState] | Checkpoint | None = None
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`, exactly as saved.

    Nothing in the file is executed: it is data only (see the module docs).

    Args:
      path: the checkpoint file.
      target: optional templates ``(params, opt_state)`` (e.g. ``model.init``'s
        params and ``optimizer.init(params)``); the arrays are put back into
        *their* pytree types — optax's NamedTuple states, for instance — after
        checking that every leaf's path, shape and dtype agree. Either may be
        ``None`` to restore that part as saved. Without a target, dicts, lists,
        tuples and ``None`` come back as such and each NamedTuple as a
        ``collections.namedtuple`` with the same name and fields.

    Returns:
      A :class:`Checkpoint` ``(params, opt_state, step, metadata)``. Array
      leaves are NumPy arrays holding exactly the saved bits (typed PRNG keys
      come back as JAX keys, Python numbers as Python numbers).

    Raises:
      CheckpointError: the file is not an fbp checkpoint, or does not fit
        ``target`` (the message names the leaf).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as file:
            header = file.metadata() or {}
            if header.get("format") != FORMAT:
                raise CheckpointError(
                    "load_checkpoint", f"{path} is not an fbp checkpoint (no {FORMAT!r} header)"
                )
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise CheckpointError(
            "load_checkpoint", f"{path} is not a readable safetensors file: {error}"
        ) from None
    try:
        structure = json.loads(header["structure"])
        step, metadata = int(header["step"]), json.loads(header["metadata"])
    except (KeyError, ValueError, RecursionError) as error:
        raise CheckpointError(
            "load_checkpoint", f"{path} has a damaged header: {_printable(str(error))[:120]}"
        ) from None
    templates = (None, None) if target is None else (target[0], target[1])
    parts = []
    try:
        for part, template in zip(("params", "opt_state"), templates, strict=True):
            nodes = _leaf_nodes(structure[part])
            if template is None:
                parts.append(_decode(structure[part], tensors, path))
            else:
                parts.append(_into_template(template, part, nodes, tensors, path))
    except CheckpointError as error:  # names read from the file reach the terminal escaped
        raise CheckpointError(error.layer, _printable(error.message)) from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError) as error:
        # A file no save_checkpoint wrote: a tensor missing, a bogus dtype, nesting
        # too deep, a node of the wrong kind. One line naming the file, never a traceback.
        raise CheckpointError(
            "load_checkpoint",
            f"{path} has a malformed structure ({type(error).__name__}: "
            f"{_printable(str(error))[:120]}); it was not written by fbp's save_checkpoint",
        ) from None
    return Checkpoint(parts[0], parts[1], step, metadata)


def _printable(text: str) -> str:
    """``text`` with control characters (terminal escapes) shown as ``\\x1b`` etc."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)


def _leaf_nodes(node: Any) -> dict[str, dict[str, Any]]:
    """All leaf descriptions under ``node``, by path."""
    if node is None:
        return {}
    if "leaf" in node:
        return {node["leaf"]: node}
    return {k: v for child in _children(node) for k, v in _leaf_nodes(child).items()}


def _children(node: dict[str, Any]) -> list[Any]:
    for kind in ("fields", "dict"):
        if kind in node:
            return list(node[kind].values())
    for kind in ("tuple", "list", "children"):
        if kind in node:
            return node[kind]
    raise CheckpointError("load_checkpoint", f"unknown node in the structure: {sorted(node)}")


def _decode_leaf(node: dict[str, Any], tensors: dict[str, np.ndarray]) -> Any:
    array = tensors[node["leaf"]]
    if "dtype" in node:
        array = array.view(np.dtype(node["dtype"])).reshape(node["shape"])
    if "key_impl" in node:
        return jax.random.wrap_key_data(jnp.asarray(array), impl=node["key_impl"])
    if "python" in node:
        return {"bool": bool, "int": int, "float": float, "complex": complex}[node["python"]](
            array.item()
        )
    return array


_NAMEDTUPLES: dict[tuple[str, tuple[str, ...]], type] = {}


def _decode(node: Any, tensors: dict[str, np.ndarray], path: Path) -> Any:
    """Rebuild a tree from its JSON description (no target)."""
    if node is None:
        return None
    if "leaf" in node:
        return _decode_leaf(node, tensors)
    if "namedtuple" in node:
        fields = tuple(node["fields"])
        kind = _NAMEDTUPLES.setdefault(
            (node["namedtuple"], fields), collections.namedtuple(node["namedtuple"], fields)
        )
        return kind(*(_decode(v, tensors, path) for v in node["fields"].values()))
    if "dict" in node:
        return {k: _decode(v, tensors, path) for k, v in node["dict"].items()}
    if "tuple" in node:
        return tuple(_decode(v, tensors, path) for v in node["tuple"])
    if "list" in node:
        return [_decode(v, tensors, path) for v in node["list"]]
    raise CheckpointError(
        "load_checkpoint",
        f"{path} holds a {node['node']}, which can only be restored into a template: "
        "pass target=(params, opt_state)",
    )


def _into_template(
    template: Any, part: str, nodes: dict[str, Any], tensors: dict[str, np.ndarray], path: Path
) -> Any:
    """Put the saved leaves into ``template``'s pytree, checking paths, shapes and dtypes."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for key, expected in flat:
        name = part + jax.tree_util.keystr(key)
        if name not in nodes:
            raise CheckpointError(
                "load_checkpoint",
                f"{path} has no leaf {name}; it holds {_some(nodes)}. "
                "Was it saved from another model or optimizer?",
            )
        leaf = _decode_leaf(nodes.pop(name), tensors)
        got, want = _shape_dtype(leaf), _shape_dtype(expected)
        if got != want:
            raise CheckpointError(
                "load_checkpoint",
                f"{path}: leaf {name} is {_describe(got)} but the target expects {_describe(want)}",
            )
        leaves.append(leaf)
    if nodes:
        raise CheckpointError(
            "load_checkpoint",
            f"{path} holds leaves the target lacks: {_some(nodes)}. "
            "Was it saved from another model or optimizer?",
        )
    return jax.tree.unflatten(treedef, leaves)


def _some(names, shown: int = 4) -> str:
    """A few of ``names``, sorted, for an error message (``"nothing"`` if there are none)."""
    names = sorted(names)
    if not names:
        return "nothing"
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(x, bool | int | float | complex):
        return (), type(x).__name__
    return tuple(np.shape(x)), str(x.dtype)


def _describe(shape_dtype: tuple[tuple[int, ...], str]) -> str:
    shape, dtype = shape_dtype
    return f"{dtype}{list(shape)}"
