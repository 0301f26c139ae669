"""Jitted training steps, evaluation and the ``fit`` loop.

The step is fbp's backward pass plus an optax update, compiled once:
:func:`make_step` runs one minibatch per call; :func:`make_multi_step` runs a
whole stack of minibatches inside one ``lax.scan`` so small models are not
bound by Python dispatch; :func:`fit` uses the latter for each epoch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import numbers
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fbp.backprop import Rule, value_and_grad, value_grad_and_cache
from fbp.checkpoint import (
    CheckpointError,
    load_checkpoint,
    lock_directory,
    save_checkpoint,
)
from fbp.data import Dataset, text_batch
from fbp.errors import ConfigError, ShapeError, TrainingDiverged
from fbp.losses import Loss, check_labels_in_range, softmax_cross_entropy
from fbp.nn.core import Layer
from fbp.nn.norm import (
    check_momentum,
    contains_batch_norm,
    trainable_mask,
    update_batch_stats,
)

__all__ = [
    "CHECKPOINT_NAME",
    "GPT_CHECKPOINT_NAME",
    "History",
    "TextHistory",
    "evaluate",
    "fit",
    "fit_text",
    "gpt_optimizer",
    "make_multi_step",
    "make_step",
]

logger = logging.getLogger(__name__)

Params = Any
OptState = Any


def _train_step(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    rule: Rule | None = None,
    batch_stats_momentum: float = 0.9,
):
    """The un-jitted step ``(params, opt_state, x, y, key) -> (params, opt_state, loss)``.

    Models with :func:`fbp.nn.batch_norm` layers get their running statistics
    folded in after each update (:func:`fbp.nn.update_batch_stats`), and the
    optimizer's updates to those statistics (zero gradients, but weight decay
    would move them) are masked out.
    """
    value_grad_cache = value_grad_and_cache(model, loss, rule=rule)
    has_batch_norm = contains_batch_norm(model)
    check_momentum("batch_stats_momentum", batch_stats_momentum)

    def step(params, opt_state, x, y, key=None):
        value, grads, cache = value_grad_cache(params, x, y, key=key, train=True)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        if not has_batch_norm:
            return optax.apply_updates(params, updates), opt_state, value
        updates = jax.tree.map(
            lambda u, trainable: u if trainable else jnp.zeros_like(u),
            updates,
            trainable_mask(updates),
        )
        params = optax.apply_updates(params, updates)
        params = update_batch_stats(model, params, cache, momentum=batch_stats_momentum)
        return params, opt_state, value

    return step


def make_step(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    rule: Rule | None = None,
    batch_stats_momentum: float = 0.9,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> Callable[..., tuple[Params, OptState, jax.Array]]:
    """One jitted training step with fbp's hand-derived gradients.

    Returns ``step(params, opt_state, x, y, key=None) -> (params, opt_state, loss)``.
    ``params`` and ``opt_state`` are donated: their buffers are reused for the
    results, so do not use the arrays you passed in after the call. ``key``
    feeds layers that draw random numbers (dropout). ``optimizer`` may be any
    optax ``GradientTransformation``, fbp's or optax's.

    ``rule``: a credit-assignment rule from :mod:`fbp.rules` (feedback
    alignment, DFA, sign symmetry) to train with instead of backpropagation
    (``None``, the default). Batch normalisation: after each update, every
    :func:`fbp.nn.batch_norm`'s running statistics are folded in from the
    step's batch statistics (``stats ← m·stats + (1 − m)·batch``, with
    ``m = batch_stats_momentum``), and the optimizer never moves them.

    Data parallelism: with a ``jax.sharding.Mesh``, the batch (axis 0 of ``x``
    and ``y``) is split over the mesh axis ``data_axis`` and params and
    optimizer state are replicated. Every weight gradient contracts over the
    batch (``dW = xᵀ·dy``, ``db = Σ dy``), so each device computes a partial sum
    and XLA inserts the all-reduce; the result equals the single-device step.
    The batch size must be a multiple of the number of devices on that axis.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> from fbp import nn, losses, optim
      >>> model = nn.serial(nn.dense(16), nn.relu(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> opt = optim.sgd(0.1)
      >>> step = fbp.train.make_step(model, losses.softmax_cross_entropy, opt)
      >>> x, labels = jnp.ones((8, 4)), jnp.zeros(8, int)
      >>> params, opt_state, loss = step(params, opt.init(params), x, labels)
    """
    step = _train_step(model, loss, optimizer, rule, batch_stats_momentum)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    return _data_parallel(step, mesh, data_axis, batch_axis=0, name="make_step")


def _data_parallel(fn, mesh: Mesh, data_axis: str, *, batch_axis: int, name: str):
    """Jit ``fn(params, opt_state, x, y, key)`` with the batch sharded over ``data_axis``.

    Params, optimizer state, key and outputs are replicated; ``x`` and ``y``
    are split along ``batch_axis``. XLA's partitioner inserts the collectives.
    """
    if data_axis not in mesh.axis_names:
        raise ConfigError(
            name, f"mesh has axes {tuple(mesh.axis_names)}, not the data axis {data_axis!r}"
        )
    devices = mesh.shape[data_axis]
    # Auto axes, whatever the user's mesh says: with Explicit axes (jax.make_mesh's default)
    # the partitioner gathers the whole batch onto every device instead of reducing the
    # gradients (measured on 4 CPU devices: 13 all-gathers in the compiled step).
    mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    replicated = NamedSharding(mesh, PartitionSpec())
    batched = NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), data_axis))
    jitted = jax.jit(
        fn,
        in_shardings=(replicated, replicated, batched, batched, replicated),
        out_shardings=replicated,
        donate_argnums=(0, 1),
    )

    def sharded(params, opt_state, x, y, key=None):
        size = jnp.shape(x)[batch_axis]
        if size % devices:
            raise ShapeError(
                name,
                f"a batch of {size} examples cannot be split evenly over the {devices} "
                f"devices of mesh axis {data_axis!r}; use a multiple of {devices}",
            )
        return jitted(params, opt_state, x, y, key)

    sharded.lower = jitted.lower  # step.lower(...).compile().as_text(): the collectives
    return sharded


def make_multi_step(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    rule: Rule | None = None,
    batch_stats_momentum: float = 0.9,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> Callable[..., tuple[Params, OptState, jax.Array]]:
    """Many training steps in one jitted call, as a ``lax.scan`` over minibatches.

    Returns ``multi_step(params, opt_state, xs, ys, key=None) -> (params, opt_state, losses)``
    where ``xs`` and ``ys`` stack ``steps`` minibatches along a new leading
    axis and ``losses`` has shape ``(steps,)``. The result equals calling
    :func:`make_step`'s step on each minibatch in turn (with ``key`` folded
    with the step index), but pays Python's dispatch cost once. ``rule`` and
    ``batch_stats_momentum`` are as for :func:`make_step`.
    """
    step = _train_step(model, loss, optimizer, rule, batch_stats_momentum)

    def multi_step(params, opt_state, xs, ys, key=None):
        return _scan_steps(step, params, opt_state, (xs, ys), lambda batch: batch, key)

    if mesh is None:
        return jax.jit(multi_step, donate_argnums=(0, 1))
    return _data_parallel(multi_step, mesh, data_axis, batch_axis=1, name="make_multi_step")


def _accuracy(pred: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of correct classifications, or NaN when the targets are not classes."""
    if jnp.issubdtype(y.dtype, jnp.integer):
        return jnp.mean(jnp.argmax(pred, axis=-1) == y)
    if pred.shape == y.shape and pred.ndim == 2 and pred.shape[-1] > 1:
        return jnp.mean(jnp.argmax(pred, axis=-1) == jnp.argmax(y, axis=-1))
    if pred.shape == y.shape and pred.shape[-1] == 1:  # binary logits
        return jnp.mean((pred > 0) == (y > 0.5))
    return jnp.asarray(jnp.nan)


def evaluate(
    model: Layer,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    loss: Loss = softmax_cross_entropy,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``(x, y)``, in inference mode.

    Accuracy compares the arg-max of the outputs with integer labels (or with
    the arg-max of one-hot targets; the sign of a single logit for binary
    targets); it is NaN for targets that are not classes. Jitted and cached
    per ``(model, loss)``: repeated calls do not recompile.

    Returns:
      ``{"loss": float, "accuracy": float}``.
    """
    if isinstance(y, np.ndarray | jax.Array) and jnp.issubdtype(y.dtype, jnp.integer):
        out_shape = jax.eval_shape(lambda p, x: model.apply(p, x), params, x).shape
        check_labels_in_range(loss.name, y, out_shape[-1])
    value, accuracy, _ = _checked_evaluate(model, loss, params, x, y)  # fit's program
    return {"loss": float(value), "accuracy": float(accuracy)}


def fit(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    params: Params | None = None,
    progress: bool = True,
    check: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    rule: Rule | None = None,
    batch_stats_momentum: float = 0.9,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    config: dict[str, Any] | None = None,
) -> tuple[Params, History]:
    """Train ``model`` on ``data`` with fbp's gradients; return params and history.

    Each epoch is one jitted call: it shuffles the training set (from
    ``key``) and runs every full minibatch inside a ``lax.scan``, each step
    gathering its own rows (as :func:`make_multi_step` would on the shuffled
    minibatches, without materialising them); then it evaluates on the test
    set. Epoch ``e`` draws its randomness from ``fold_in(key, e)`` alone, so a
    run resumed from a checkpoint continues exactly as the uninterrupted run
    would have. The epoch program is compiled once per ``model``, ``loss``,
    ``optimizer`` and ``rule`` *objects* (with the batch size and step count):
    calling ``fit`` again with the same objects — to resume, with another key
    or more epochs — reuses it from JAX's jit cache.

    Guards: the data are checked for NaN/Inf first; after every epoch the
    training losses, the params and the test loss are checked, and training
    stops with :class:`TrainingDiverged` (naming the epoch and step, and the
    checkpoint that holds the last good epoch, if one was written) rather
    than go on with garbage. A diverged epoch is never checkpointed.

    Args:
      model, loss, optimizer: what to train, on what objective, with what rule
        (any optax ``GradientTransformation``, fbp's or optax's).
      data: a :class:`fbp.data.Dataset` (see :func:`fbp.data.load`).
      epochs: passes over the training set (in total, counting resumed ones).
      batch_size: examples per step (clamped to the training-set size).
      key: JAX key for initialisation, shuffling and dropout.
      params: initial params; drawn with ``model.init`` when omitted (a
        checkpoint in ``checkpoint_dir`` takes precedence over both).
      progress: show a tqdm progress bar.
      check: before the first step, verify the hand-derived gradients on one
        minibatch with :func:`fbp.verify.check_model` and raise if they are
        wrong; the report is logged at INFO level on the ``fbp.train`` logger.
      checkpoint_dir: save params, optimizer state and history there
        (``checkpoint.safetensors``, written atomically) every
        ``checkpoint_every`` epochs and after the last; if a checkpoint is
        already there, resume from it. The run's dataset, batch size and key
        must be those it was written with.
      checkpoint_every: epochs between checkpoints.
      rule: train with a credit-assignment rule from :mod:`fbp.rules` instead of
        backpropagation (``None``); see :func:`make_step`.
      batch_stats_momentum: how batch-norm running statistics follow the batch
        statistics (see :func:`make_step`); evaluation uses the running ones.
      mesh, data_axis: train data-parallel, splitting each minibatch over the
        mesh axis ``data_axis`` (see :func:`make_step`); ``batch_size`` must be
        a multiple of that axis's size.
      config: JSON-serialisable settings that make the run and that fit cannot
        read off its arguments (model, activation, optimizer, learning rate,
        schedule, ...), e.g. ``{"optimizer": "adam", "learning_rate": 1e-3}``.
        They are saved in the checkpoint, and resuming under different ones is
        refused, naming the setting that differs.

    Returns:
      ``(params, history)``; ``history`` is a :class:`History` of per-epoch
      tuples ``epoch``, ``train_loss`` (mean over the epoch's steps),
      ``test_loss`` and ``test_accuracy`` (a resumed run's history includes the
      epochs before it).

    Example:
      >>> import jax, fbp
      >>> from fbp import nn, losses, optim
      >>> data = fbp.data.load("digits")
      >>> model = nn.serial(nn.dense(64), nn.relu(), nn.dense(10))
      >>> params, history = fbp.train.fit(
      ...     model, losses.softmax_cross_entropy, optim.adam(1e-3), data,
      ...     epochs=5, batch_size=32, key=jax.random.key(0), progress=False)
      >>> len(history.test_accuracy), history.epoch[-1]
      (5, 5)
    """
    _check_counts(epochs=epochs, batch_size=batch_size, checkpoint_every=checkpoint_every)
    _check_key(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # raw key data: its typed key,
        key = jax.random.wrap_key_data(key)  # the same numbers, and the same compiled epoch
    init_key, key = jax.random.split(key)
    params = _initial_params(model, loss, data, params, init_key)
    n = len(data.x_train)
    batch_size = min(batch_size, n)
    steps = n // batch_size
    run = _run_settings(data, batch_size, key, config)
    opt_state = optimizer.init(params)
    history = History()
    with contextlib.ExitStack() as stack:
        if checkpoint_dir is not None:  # the folder is usable and this run's alone, or raise
            stack.enter_context(lock_directory(checkpoint_dir, "fit"))
        checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        saved_epoch = None  # the epoch of the checkpoint on disk, if there is one
        if checkpoint is not None and checkpoint.exists():
            params, opt_state, history, _ = _resume(checkpoint, params, opt_state, run)
            saved_epoch = len(history.epoch)
        if check:
            _check_gradients(model, loss, params, data, batch_size)
        run_epoch = _epoch_runner(
            model, loss, optimizer, rule, batch_stats_momentum, mesh, data_axis, steps, batch_size
        )
        x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
        bar = _progress(epochs, len(history.epoch), progress, data.name)
        for epoch in range(len(history.epoch) + 1, epochs + 1):
            shuffle_key, step_key = jax.random.split(jax.random.fold_in(key, epoch))
            params, opt_state, losses = run_epoch(
                params, opt_state, x_train, y_train, shuffle_key, step_key
            )
            kept = _kept(checkpoint, saved_epoch)
            metrics = _test_metrics(model, loss, params, losses, data, epoch, steps, kept)
            history = history.append(
                epoch=epoch,
                train_loss=float(jnp.mean(losses)),
                test_loss=metrics["loss"],
                test_accuracy=metrics["accuracy"],
            )
            if checkpoint is not None and (epoch % checkpoint_every == 0 or epoch == epochs):
                metadata = {"run": run, "history": history.as_dict()}
                save_checkpoint(checkpoint, params, opt_state, epoch * steps, metadata=metadata)
                saved_epoch = epoch
            bar.set_postfix(
                loss=f"{history.train_loss[-1]:.4f}", test_acc=f"{metrics['accuracy']:.4f}"
            )
            bar.update(1)
        bar.close()
    return params, history


class History(NamedTuple):
    """What :func:`fit` measured, one entry per epoch (a resumed run's includes the earlier ones).

    Attributes:
      epoch: the epoch numbers, from 1.
      train_loss: the mean training loss over each epoch's steps.
      test_loss: the loss on the test split after each epoch.
      test_accuracy: the accuracy on the test split after each epoch (``nan``
        where the outputs are not class scores).

    Example:
      >>> h = History().append(epoch=1, train_loss=0.5, test_loss=0.6, test_accuracy=0.8)
      >>> h.test_accuracy, h.as_dict()["epoch"]
      ((0.8,), [1])
    """

    epoch: tuple[int, ...] = ()
    train_loss: tuple[float, ...] = ()
    test_loss: tuple[float, ...] = ()
    test_accuracy: tuple[float, ...] = ()

    def append(self, **metrics: float) -> History:
        """This history with one more epoch; every field must be given."""
        if set(metrics) != set(self._fields):
            raise ConfigError(
                "History.append", f"needs exactly {self._fields}, got {tuple(sorted(metrics))}"
            )
        return History(*((*getattr(self, f), metrics[f]) for f in self._fields))

    def as_dict(self) -> dict[str, list[float]]:
        """Plain lists by field name: what a checkpoint stores (JSON)."""
        return {f: list(getattr(self, f)) for f in self._fields}

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, str):  # fbp 0.1's history was a dict
            warnings.warn(
                f"history[{index!r}] is deprecated: fit returns a History, use history.{index}",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(self, index)
        return tuple.__getitem__(self, index)


def _check_counts(**counts: Any) -> None:
    """``fit``'s counts must be ints: ``epochs >= 0``, the others ``>= 1``."""
    for name, value in counts.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ConfigError("fit", f"{name} must be an int, got {value!r}")
    if counts["epochs"] < 0 or counts["batch_size"] < 1 or counts["checkpoint_every"] < 1:
        raise ConfigError(
            "fit",
            "need epochs >= 0, batch_size >= 1 and checkpoint_every >= 1, got "
            f"{counts['epochs']}, {counts['batch_size']} and {counts['checkpoint_every']}",
        )


def _initial_params(model: Layer, loss: Loss, data: Dataset, params, init_key) -> Params:
    """Check ``data`` against ``model`` and ``loss``; the given params (checked) or fresh ones."""
    _check_example_counts(data)
    if params is None:
        params, _ = model.init(init_key, data.input_shape)
    else:
        expected, _ = jax.eval_shape(lambda k: model.init(k, data.input_shape), init_key)
        _check_params(params, expected)
    out_shape = jax.eval_shape(lambda p, x: model.apply(p, x), params, data.x_train[:1]).shape
    if jnp.issubdtype(data.y_train.dtype, jnp.integer):
        if out_shape[-1] != data.num_classes:
            raise ShapeError(
                "fit",
                f"the model outputs {out_shape[-1]} values per example but {data.name!r} has "
                f"{data.num_classes} classes",
            )
        check_labels_in_range(loss.name, data.y_train, data.num_classes)
        check_labels_in_range(loss.name, data.y_test, data.num_classes)
    _check_finite_data(data)
    return params


def _run_settings(data: Dataset, batch_size: int, key, config) -> dict[str, Any]:
    """What makes the run, as its checkpoint holds it: resuming under other settings is refused."""
    run = {"dataset": data.name, "n_train": len(data.x_train), "batch_size": batch_size}
    run["key"] = _key_data(key)
    for name, value in (config or {}).items():
        if name in run:
            raise ConfigError("fit", f"config may not redefine fit's own setting {name!r}")
        run[name] = value
    return json.loads(json.dumps(run))  # as the checkpoint will hold it (tuples become lists)


def _epoch_runner(
    model, loss, optimizer, rule, batch_stats_momentum, mesh, data_axis, steps, batch_size
):
    """``run_epoch(params, opt_state, x, y, shuffle_key, step_key)``.

    Returns ``(params, opt_state, losses)`` (one loss per step).
    """
    if mesh is None:
        return _make_epoch(
            model, loss, optimizer, rule, batch_stats_momentum, steps=steps, batch_size=batch_size
        )
    multi_step = make_multi_step(
        model,
        loss,
        optimizer,
        rule=rule,
        batch_stats_momentum=batch_stats_momentum,
        mesh=mesh,
        data_axis=data_axis,
    )

    def run_epoch(params, opt_state, x, y, shuffle_key, step_key):
        xs, ys = _shuffled_batches(x, y, shuffle_key, steps, batch_size)
        return multi_step(params, opt_state, xs, ys, step_key)

    return run_epoch


def _test_metrics(
    model, loss, params, losses, data: Dataset, epoch: int, steps: int, kept: str
) -> dict[str, float]:
    """Loss and accuracy on the test split, after an epoch with the training ``losses``.

    Training stops (:class:`TrainingDiverged`) if a training loss, a param or the test
    loss is not finite, named in that order. The test metrics are :func:`evaluate`'s
    numbers, from its program (:func:`_checked_evaluate`, with the params check), without
    its per-call checks: fit checked the test labels before the first epoch, and tracing
    the model for its output shape again after every epoch cost more than a small
    model's evaluation.
    """
    value, accuracy, finite = _checked_evaluate(model, loss, params, data.x_test, data.y_test)
    _check_diverged(losses, finite, epoch, steps, kept)
    metrics = {"loss": float(value), "accuracy": float(accuracy)}
    if len(data.x_test) and not np.isfinite(metrics["loss"]):
        raise TrainingDiverged(
            "fit",
            f"the test loss became {metrics['loss']} after epoch {epoch} although every "
            f"training loss was finite (the last step overshot?){kept}; try a smaller "
            "learning rate or gradient clipping (optax.clip_by_global_norm)",
        )
    return metrics


@functools.partial(jax.jit, static_argnames=("model", "loss"))
def _checked_evaluate(model, loss, params, x, y):
    """``(loss, accuracy, finite)`` on ``(x, y)`` in inference mode, and whether every
    floating-point param is finite: fit's look at the params after each epoch and
    :func:`evaluate`'s numbers, one compiled program per model for both."""
    pred = model.apply(params, x, train=False)
    floating = [a for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.inexact)]
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(a)) for a in floating] or [True]))
    return loss.value(pred, y), _accuracy(pred, y), finite


CHECKPOINT_NAME = "checkpoint.safetensors"
"""The file :func:`fit` keeps its latest checkpoint in, inside ``checkpoint_dir``."""


def _key_data(key: jax.Array) -> list[int]:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).ravel().tolist()


def _resume(checkpoint: Path, params, opt_state, run, history_type=None, where: str = "fit"):
    """Params, optimizer state, history and step from a checkpoint, after checking the run.

    Used by :func:`fit` (``History``) and :func:`fit_text` (``TextHistory``): the
    run's settings must match, the history must hold exactly ``history_type``'s
    fields as lists of one length (and, with a ``step`` field, end at the saved
    step), and the params must be finite.
    """
    history_type = history_type or History
    try:
        saved = load_checkpoint(checkpoint, target=(params, opt_state))
    except CheckpointError:  # another model? name the differing setting if the run says it
        _check_run(checkpoint, load_checkpoint(checkpoint).metadata.get("run"), run)
        raise
    _check_run(checkpoint, saved.metadata.get("run"), run)
    history = saved.metadata.get("history")
    if (
        not isinstance(history, dict)
        or set(history) != set(history_type._fields)
        or not all(isinstance(v, list) for v in history.values())
        or len({len(v) for v in history.values()}) != 1
        or (history.get("step") and history["step"][-1] != saved.step)
    ):
        raise CheckpointError(
            where, f"{checkpoint} holds no readable history (resume metadata damaged)"
        )
    history = history_type(**{k: tuple(v) for k, v in history.items()})
    bad = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(saved.params)[0]
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and not np.all(np.isfinite(leaf))
    ]
    if bad:
        raise CheckpointError(
            where,
            f"{checkpoint} holds params with NaN or Inf (at {', '.join(bad[:3])}); it cannot "
            "be resumed — start from a fresh checkpoint_dir",
        )
    return saved.params, saved.opt_state, history, int(saved.step)


def _check_run(checkpoint: Path, saved_run: Any, run: dict[str, Any]) -> None:
    """Refuse to resume a run whose settings differ from the checkpoint's, naming them."""
    if not isinstance(saved_run, dict):
        saved_run = {}
    if saved_run != run:
        names = sorted(set(run) | set(saved_run))
        different = [k for k in names if saved_run.get(k, _UNSET) != run.get(k, _UNSET)]
        shown = ", ".join(
            f"{k} ({_short(saved_run.get(k, _UNSET))}, now {_short(run.get(k, _UNSET))})"
            for k in different
            if k != "key"
        )
        if "key" in different:
            shown = ", ".join(filter(None, ["key", shown]))
        raise ConfigError(
            "fit",
            f"{checkpoint} was written by a run with another {shown}; resume with the same "
            "settings, or use a fresh checkpoint_dir",
        )


_UNSET = object()


def _short(value: Any) -> str:
    """A setting's value for a message, escaped and cut short."""
    return "unset" if value is _UNSET else ascii(value)[:40]


def _check_gradients(model: Layer, loss: Loss, params, data: Dataset, batch_size: int) -> None:
    """Verify the hand-derived gradients on the first minibatch (``fit(check=True)``)."""
    try:
        from fbp import verify
    except ImportError as error:  # pragma: no cover - fbp.verify ships with fbp
        raise ConfigError("fit", f"check=True needs fbp.verify: {error}") from None
    size = min(batch_size, 32)
    report = verify.check_model(model, loss, params, data.x_train[:size], data.y_train[:size])
    logger.info("gradient check before training:\n%s", report)
    report.raise_if_failed()


def _check_key(key: Any) -> None:
    """``key`` must be a JAX PRNG key: a typed key, or the raw uint32 data of one."""
    if isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.dtype == jnp.uint32
    ):
        return
    raise ConfigError(
        "fit", f"key must be a JAX PRNG key such as jax.random.key(0), got {key!r:.60}"
    )


def _check_params(params: Params, expected: Params, path: str = "params") -> None:
    """``params`` must have the structure ``model.init`` gives, with arrays where it has floats.

    Catches a list where the model has a tuple (or Python lists as weights),
    which JAX would take apart leaf by leaf, and integer weights, whose
    gradients would be truncated to zero by the update.
    """
    if isinstance(expected, jax.ShapeDtypeStruct):
        if not isinstance(params, jax.Array | np.ndarray | np.generic):
            raise ConfigError(
                "fit",
                f"{path} is a {type(params).__name__} where model.init gives an array "
                f"{expected.dtype}{list(expected.shape)}; pass arrays (jnp.asarray)",
            )
        if jnp.issubdtype(expected.dtype, jnp.inexact) and not jnp.issubdtype(
            params.dtype, jnp.inexact
        ):
            raise ConfigError(
                "fit",
                f"{path} is {params.dtype} where model.init gives {expected.dtype}; integer "
                "params cannot be trained (their updates round to zero): cast them to float",
            )
        return
    if type(params) is not type(expected) and not (
        isinstance(params, dict) and isinstance(expected, dict)
    ):
        remedy = (
            f"pass {type(expected).__name__}({path})"
            if isinstance(params, tuple | list) and isinstance(expected, tuple | list)
            else "are these params from another model?"
        )
        raise ConfigError(
            "fit",
            f"{path} is a {type(params).__name__} where model.init gives a "
            f"{type(expected).__name__}; {remedy}",
        )
    if isinstance(expected, dict):
        if set(params) != set(expected):
            raise ConfigError(
                "fit",
                f"{path} has the keys {sorted(params)} where model.init gives "
                f"{sorted(expected)}; are these params from another model?",
            )
        children = [(f"{path}[{k!r}]", params[k], expected[k]) for k in expected]
    elif isinstance(expected, tuple | list):
        if len(params) != len(expected):
            raise ConfigError(
                "fit",
                f"{path} has {len(params)} entries where model.init gives {len(expected)}; "
                "are these params from another model?",
            )
        children = [
            (f"{path}[{i}]", p, e) for i, (p, e) in enumerate(zip(params, expected, strict=True))
        ]
    else:  # None, or a pytree node of the user's: left to the model's own checks
        children = []
    for child_path, child, child_expected in children:
        _check_params(child, child_expected, child_path)


def _check_example_counts(data: Dataset) -> None:
    """Features and labels must pair up one to one (JAX would clamp a short gather silently).

    Also refuses an empty training set, which has no minibatch to take.
    """
    if len(data.x_train) == 0:
        raise ConfigError("fit", f"{data.name!r} has no training examples (x_train is empty)")
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if len(x) != len(y):
            raise ShapeError(
                "fit",
                f"{data.name!r} has {len(x)} examples in x_{split} but {len(y)} labels in "
                f"y_{split}; each example needs exactly one label",
            )


def _check_finite_data(data: Dataset) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test"):
        array = np.asarray(getattr(data, name))
        if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
            bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
            raise ConfigError(
                "fit",
                f"{data.name!r} {name} holds NaN or Inf in {int(bad.sum())} examples "
                f"(the first is example {int(np.argmax(bad))}); clean the data before training",
            )


def _kept(checkpoint: Path | None, saved_epoch: int | None) -> str:
    """What a divergence message says about the checkpoint: only what is on disk."""
    if checkpoint is None:
        return ""
    if saved_epoch is None:
        return f"; no checkpoint was written to {checkpoint.parent}"
    return f"; the checkpoint in {checkpoint.parent} holds epoch {saved_epoch}, from before it"


def _check_diverged(losses, params_finite, epoch: int, steps: int, kept: str) -> None:
    """Raise :class:`TrainingDiverged` if a loss of this epoch is not finite, or the params
    are not (``params_finite``: :func:`_checked_evaluate`'s flag).

    ``kept`` ends the message with where the last good checkpoint is (:func:`_kept`).
    """
    losses = np.asarray(losses)
    if not np.all(np.isfinite(losses)):
        bad = int(np.argmax(~np.isfinite(losses)))
        raise TrainingDiverged(
            "fit",
            f"the training loss became {losses[bad]} at epoch {epoch}, step {bad + 1} of "
            f"{steps}{kept}; try a smaller learning rate, gradient clipping "
            "(optax.clip_by_global_norm), or check the model's outputs",
        )
    if not bool(params_finite):
        raise TrainingDiverged(
            "fit",
            f"the params became NaN or Inf during epoch {epoch} although every loss was "
            f"finite (a gradient overflowed, or a learning-rate schedule turned negative?)"
            f"{kept}; try a smaller learning rate or gradient clipping "
            "(optax.clip_by_global_norm)",
        )


def _bind(fn, cached, *, static=(), donate=(), **settings):
    """``cached`` (``fn`` jitted with ``settings`` static) with ``settings`` bound.

    JAX's jit cache then reuses the program compiled for equal settings (the same
    model, loss and optimizer objects). Where a setting cannot be hashed (a rule
    holding arrays), ``fn`` is jitted for this call alone, with ``settings`` closed
    over; ``static`` and ``donate`` name its remaining static and donated arguments.
    """
    try:
        hash(tuple(settings.values()))
    except TypeError:
        return jax.jit(
            functools.partial(fn, **settings), static_argnames=static, donate_argnums=donate
        )
    return functools.partial(cached, **settings)


def _epoch(
    params, opt_state, x, y, shuffle_key, step_key, *,
    model, loss, optimizer, rule, batch_stats_momentum, steps, batch_size,
):  # fmt: skip
    """Shuffle, then ``steps`` training steps in a ``lax.scan`` (see :func:`_make_epoch`)."""
    step = _train_step(model, loss, optimizer, rule, batch_stats_momentum)
    order = jax.random.permutation(shuffle_key, x.shape[0])[: steps * batch_size]
    rows = order.reshape(steps, batch_size)
    return _scan_steps(step, params, opt_state, rows, lambda r: (x[r], y[r]), step_key)


_EPOCH_SETTINGS = (
    "model",
    "loss",
    "optimizer",
    "rule",
    "batch_stats_momentum",
    "steps",
    "batch_size",
)

_cached_epoch = jax.jit(_epoch, static_argnames=_EPOCH_SETTINGS, donate_argnums=(0, 1))
""":func:`_epoch` jitted with its settings static: JAX's own cache keeps one compiled
program per (model, loss, optimizer, rule, momentum, steps, batch size) it has seen."""


def _make_epoch(model, loss, optimizer, rule, batch_stats_momentum, *, steps, batch_size):
    """One jitted call per epoch: shuffle, then ``steps`` training steps in a ``lax.scan``.

    ``epoch(params, opt_state, x, y, shuffle_key, step_key) -> (params, opt_state,
    losses)`` equals :func:`make_multi_step` on :func:`_shuffled_batches`'s
    minibatches (the same permutation, the same per-step keys), but each step
    gathers its own rows inside the scan: no shuffled copy of the training set
    is materialised, and the epoch is a single dispatch.

    The program is compiled once per model, loss, optimizer and rule *objects*
    (and momentum, steps and batch size): a second :func:`fit` with the same
    objects (a resumed run, another key, more epochs) reuses it from JAX's jit
    cache. A rule or optimizer that cannot be hashed (one holding arrays, such as
    feedback alignment's key) gets a program of its own for this call.
    """
    _train_step(model, loss, optimizer, rule, batch_stats_momentum)  # settings checked now
    return _bind(
        _epoch,
        _cached_epoch,
        donate=(0, 1),
        model=model,
        loss=loss,
        optimizer=optimizer,
        rule=rule,
        batch_stats_momentum=batch_stats_momentum,
        steps=steps,
        batch_size=batch_size,
    )


def _scan_steps(step, params, opt_state, batches, fetch, key):
    """``step`` over the leading axis of ``batches`` in a ``lax.scan``; ``fetch(batch) -> (x, y)``.

    Step ``i`` gets the key ``fold_in(key, i)`` (``None`` without a key).
    Returns ``(params, opt_state, losses)`` with ``losses`` of shape ``(steps,)``.
    """

    def body(carry, item):
        params, opt_state = carry
        index, batch = item
        x, y = fetch(batch)
        step_key = None if key is None else jax.random.fold_in(key, index)
        params, opt_state, value = step(params, opt_state, x, y, step_key)
        return (params, opt_state), value

    steps = jnp.arange(jax.tree.leaves(batches)[0].shape[0])
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (steps, batches))
    return params, opt_state, losses


@functools.partial(jax.jit, static_argnames=("steps", "batch_size"))
def _shuffled_batches(x, y, key, steps, batch_size):
    """A random permutation of the data, cut into ``steps`` minibatches of ``batch_size``."""
    index = jax.random.permutation(key, x.shape[0])[: steps * batch_size]
    xs = x[index].reshape(steps, batch_size, *x.shape[1:])
    ys = y[index].reshape(steps, batch_size, *y.shape[1:])
    return xs, ys


def _progress(total: int, done: int, enabled: bool, name: str):
    with warnings.catch_warnings():
        # In Jupyter without ipywidgets, tqdm.auto falls back to the text bar
        # (which is what we want) but warns about it on every import.
        warnings.filterwarnings("ignore", message="IProgress not found")
        from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, disable=not enabled, desc=f"fit {name}", unit="epoch")


# --------------------------------------------------------------------------- language models

GPT_CHECKPOINT_NAME = "gpt.safetensors"
"""The file :func:`fit_text` writes in its ``checkpoint_dir``."""


def gpt_optimizer(
    steps: int,
    *,
    learning_rate: float = 1e-3,
    min_learning_rate: float = 1e-4,
    warmup_steps: int = 100,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.99,
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    """nanoGPT's optimizer: AdamW with linear warm-up and cosine decay, clipped gradients.

    The learning rate rises linearly from 0 to ``learning_rate`` over
    ``warmup_steps``, then follows a cosine down to ``min_learning_rate`` at
    ``steps`` (nanoGPT's ``get_lr``); updates come from gradients clipped to
    global norm ``clip_norm``; weight decay applies to matrices only (params
    with two or more axes — embeddings and weights, not gains or biases), as
    nanoGPT's ``configure_optimizers`` groups them. The defaults are its
    ``shakespeare_char`` values.

    Example:
      >>> import jax.numpy as jnp, fbp
      >>> opt = fbp.train.gpt_optimizer(2000)
      >>> state = opt.init({"w": jnp.ones((2, 2)), "g": jnp.ones(2)})
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError("gpt_optimizer", f"steps must be a positive int, got {steps!r}")
    warmup = max(0, min(int(warmup_steps), steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(steps, warmup + 1), end_value=min_learning_rate
    )
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(
            schedule,
            b1=b1,
            b2=b2,
            weight_decay=weight_decay,
            mask=lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params),
        ),
    )


class TextHistory(NamedTuple):
    """What :func:`fit_text` measured at each evaluation.

    Attributes:
      step: the iterations done at each evaluation.
      train_loss: the mean training loss of the iterations since the last one.
      val_loss: the mean loss on random windows of the validation text.
      seconds: wall-clock seconds since training started (compiles included).
    """

    step: tuple[int, ...] = ()
    train_loss: tuple[float, ...] = ()
    val_loss: tuple[float, ...] = ()
    seconds: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, list[float]]:
        """Plain lists by field name (JSON, for a checkpoint's metadata)."""
        return {f: list(getattr(self, f)) for f in self._fields}


def fit_text(
    model: Layer,
    data: Any,
    optimizer: optax.GradientTransformation,
    *,
    steps: int,
    batch_size: int,
    context: int,
    key: jax.Array,
    params: Params | None = None,
    loss: Loss = softmax_cross_entropy,
    eval_every: int = 250,
    eval_batches: int = 20,
    checkpoint_dir: str | os.PathLike | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    on_eval: Callable[[int, float, float], None] | None = None,
) -> tuple[Params, TextHistory]:
    """Train a language model on random windows of a :class:`fbp.data.TextDataset`.

    Each iteration draws ``batch_size`` windows of ``context`` ids from the
    training text (:func:`fbp.data.text_batch`, a pure function of the key)
    and takes one step of fbp's hand-derived gradients. The iterations
    between two evaluations run as one jitted ``lax.scan``; every
    ``eval_every`` iterations (and at the end) the validation loss is the mean
    over ``eval_batches`` random validation windows, shown in the progress
    bar, passed to ``on_eval(step, train_loss, val_loss)`` and, with a
    ``checkpoint_dir``, saved with the params, optimizer state, history,
    ``metadata`` and the vocabulary (atomically, :func:`fbp.checkpoint.save_checkpoint`,
    file :data:`GPT_CHECKPOINT_NAME`). A ``checkpoint_dir`` that already holds
    one resumes from it — the same iterations and batches as an uninterrupted
    run (each batch is drawn from the key and its iteration number) — after
    checking that the run's settings (``steps``, ``batch_size``, ``context``,
    ``key``, the vocabulary and ``metadata``) are the ones that wrote it. The
    training and validation programs are compiled once per ``model``, ``loss``
    and ``optimizer`` *objects* (with the window sizes and the texts' lengths):
    a second call with the same ones — to resume, or with another key — reuses
    them from JAX's jit cache.

    Args:
      model: ids ``(batch, T)`` to logits ``(batch, T, vocab)``, e.g. :func:`fbp.models.gpt`.
      data: a :class:`fbp.data.TextDataset`.
      optimizer: e.g. :func:`gpt_optimizer`.
      steps: training iterations.
      batch_size: windows per iteration.
      context: ids per window (at most the model's context).
      key: randomness for initialisation (when ``params`` is ``None``) and batches.
      params: initial params; ``None``: ``model.init``.
      loss: the loss on ``(logits, next ids)``.
      eval_every: iterations between evaluations.
      eval_batches: validation windows (times ``batch_size``) per evaluation.
      checkpoint_dir: where to keep the latest checkpoint, or ``None``.
      metadata: extra JSON data saved in the checkpoint (the model's settings).
      progress: show a tqdm bar with the train and validation losses.
      on_eval: called after each evaluation.

    Returns:
      ``(params, history)``.

    Example:
      >>> import jax, fbp
      >>> ds = fbp.data.load_text(max_bytes=20_000)
      >>> model = fbp.models.gpt(ds.vocab_size, 16, layers=1, heads=2, width=16)
      >>> params, history = fbp.train.fit_text(
      ...     model, ds, fbp.train.gpt_optimizer(20), steps=20, batch_size=4, context=16,
      ...     key=jax.random.key(0), eval_every=10, progress=False)
      >>> history.step
      (10, 20)
    """
    import time

    from fbp.checkpoint import prepare_directory

    for what, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("context", context),
        ("eval_every", eval_every),
        ("eval_batches", eval_batches),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError("fit_text", f"{what} must be a positive int, got {value!r}")
    _check_key(key)
    init_key, data_key, val_key = jax.random.split(key, 3)
    if params is None:
        params, _ = model.init(init_key, (context,))
    opt_state = optimizer.init(params)
    train_ids = jnp.asarray(data.train, jnp.int32)
    val_ids = jnp.asarray(data.validation, jnp.int32)
    directory = None
    if checkpoint_dir is not None:
        directory = prepare_directory(checkpoint_dir, "fit_text")

    # Programs compiled once per model, loss and optimizer object (see _bind); the texts are
    # arguments, not constants baked into them.
    windows = {"model": model, "loss": loss, "batch_size": batch_size, "context": context}
    run = _bind(
        _text_steps, _cached_text_steps, static="n", donate=(0, 1), optimizer=optimizer, **windows
    )
    validate = _bind(
        _text_validation, _cached_text_validation, eval_batches=eval_batches, **windows
    )

    # What a resumed run must share with the one that wrote the checkpoint (as JSON reads it).
    run_settings = json.loads(
        json.dumps(
            {
                "steps": steps,
                "batch_size": batch_size,
                "context": context,
                "key": _key_data(key),
                "vocab": data.vocab,
                **(metadata or {}),
            }
        )
    )
    history, done = TextHistory(), 0
    if directory is not None and (directory / GPT_CHECKPOINT_NAME).exists():
        params, opt_state, history, done = _resume(
            directory / GPT_CHECKPOINT_NAME,
            params,
            opt_state,
            run_settings,
            TextHistory,
            "fit_text",
        )
    started = time.perf_counter() - (history.seconds[-1] if history.seconds else 0.0)
    bar = _progress(steps, done, progress, data.name)
    bar.unit = "it"
    with bar:
        while done < steps:
            n = min(eval_every, steps - done)
            params, opt_state, train_loss = run(
                params, opt_state, train_ids, jnp.int32(done), data_key, n=n
            )
            done += n
            val_loss = float(validate(params, val_ids, jax.random.fold_in(val_key, done)))
            train_loss = float(train_loss)
            if not math.isfinite(train_loss):
                raise TrainingDiverged(
                    "fit_text",
                    f"the training loss became {train_loss} by iteration {done}; "
                    "try a lower learning rate",
                )
            history = TextHistory(
                (*history.step, done),
                (*history.train_loss, train_loss),
                (*history.val_loss, val_loss),
                (*history.seconds, time.perf_counter() - started),
            )
            bar.update(n)
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if on_eval is not None:
                on_eval(done, train_loss, val_loss)
            if directory is not None:
                save_checkpoint(
                    directory / GPT_CHECKPOINT_NAME,
                    params,
                    opt_state,
                    done,
                    metadata={
                        **(metadata or {}),
                        "vocab": data.vocab,
                        "context": context,
                        "history": history.as_dict(),
                        "run": run_settings,
                    },
                )
    return params, history


def _text_steps(
    params, opt_state, train_ids, start, data_key, *,
    model, loss, optimizer, batch_size, context, n,
):  # fmt: skip
    """:func:`fit_text`'s iterations ``start .. start + n``: one ``lax.scan`` of steps.

    Iteration ``i`` draws its windows from ``fold_in(data_key, i)``. Returns
    ``(params, opt_state, mean training loss)``.
    """
    grad_fn = value_and_grad(model, loss)

    def one_step(carry, step_key):
        params, opt_state = carry
        x, y = text_batch(step_key, train_ids, batch_size, context)
        value, grads = grad_fn(params, x, y, key=jax.random.fold_in(step_key, 1), train=True)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    keys = jax.vmap(lambda i: jax.random.fold_in(data_key, i))(start + jnp.arange(n))
    (params, opt_state), values = jax.lax.scan(one_step, (params, opt_state), keys)
    return params, opt_state, values.mean()


def _text_validation(params, val_ids, key, *, model, loss, batch_size, context, eval_batches):
    """:func:`fit_text`'s validation loss: the mean over ``eval_batches`` random windows."""

    def one(_, k):
        x, y = text_batch(k, val_ids, batch_size, context)
        return None, loss.value(model.apply(params, x), y)

    return jax.lax.scan(one, None, jax.random.split(key, eval_batches))[1].mean()


_cached_text_steps = jax.jit(
    _text_steps,
    static_argnames=("model", "loss", "optimizer", "batch_size", "context", "n"),
    donate_argnums=(0, 1),
)
_cached_text_validation = jax.jit(
    _text_validation,
    static_argnames=("model", "loss", "batch_size", "context", "eval_batches"),
)
