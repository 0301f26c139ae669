"""Exercises: a catalogue of deliberately wrong backward rules, each caught and pinned.

The catalogue is a table: each row names the mistake, the small model it is
planted in, the layer (or the loss) that gets the wrong rule, the leaf the
check must name, and a short function building the wrong rule from the right
one. :func:`wrong_rules` turns the rows into :class:`WrongRule` values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp import losses, nn
from fbp.losses import Loss
from fbp.nn.core import Layer
from fbp.verify.checks import check_model
from fbp.verify.report import GradCheckReport

__all__ = ["WrongRule", "wrong_rules"]


class WrongRule(NamedTuple):
    """A deliberately wrong backward rule: an exercise, and a test of the checker.

    Attributes:
      name: short identifier, e.g. ``"flipped_sign"``.
      description: what is wrong, in words.
      build: ``() -> (model, loss, params, x, y)`` with the bug planted.
      layer: index path of the culprit layer in the model, ``None`` for the loss.
      kind: the culprit layer's (or loss's) name, e.g. ``"dense(→8)"``.
      leaf: the leaf the check must name (``"w"``, ``"b"``, ``"dx"``, ``"dpred"``).
    """

    name: str
    description: str
    build: Callable[[], tuple]
    layer: tuple[int, ...] | None
    kind: str
    leaf: str

    def check(self, **kwargs: Any) -> GradCheckReport:
        """Build the buggy model and run :func:`check_model` on it (``kwargs`` passed on)."""
        return check_model(*self.build(), **kwargs)

    def __str__(self) -> str:
        where = (
            "the loss"
            if self.layer is None
            else f"layer {'.'.join(map(str, self.layer))} ({self.kind})"
        )
        return f"{self.name}: {self.description} (culprit: {where}, leaf {self.leaf!r})"


# --------------------------------------------------------------------------- the wrong rules


def _after(fix: Callable) -> Callable[[Layer], Callable]:
    """The layer's right backward, then ``fix(params, cache, dy, dparams, dx) -> (dparams, dx)``."""

    def wrong(layer: Layer) -> Callable:
        return lambda params, cache, dy: fix(params, cache, dy, *layer.backward(params, cache, dy))

    return wrong


def _instead(backward: Callable) -> Callable[[Layer], Callable]:
    """A wrong ``backward(params, cache, dy)`` written from scratch."""
    return lambda layer: backward


def _sigmoid_of_output(params, y, dy):
    s = jax.nn.sigmoid(y)  # y is already σ(z): σ'(z) = y(1 − y), not σ(y)(1 − σ(y))
    return {}, dy * s * (1 - s)


def _one_element_off(params, cache, dy, dparams, dx):
    w = dparams["w"]
    return {**dparams, "w": w.at[3, 5].add(1e-6 * jnp.max(jnp.abs(w)))}, dx


def _missing_batch_mean(loss: Loss) -> Callable:
    return lambda logits, target: loss.grad(logits, target) * logits.shape[0]


def _softmax_over_batch(loss: Loss) -> Callable:
    def grad(logits, target):
        onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
        return (jax.nn.softmax(logits, axis=0) - onehot) / logits.shape[0]

    return grad


# --------------------------------------------------------------------------- the catalogue


class _Row(NamedTuple):
    """One exercise: the mistake, where it is planted, and how it is built.

    ``layers`` are factories of the model's layers in order; ``culprit`` is the
    index of the one whose backward ``wrong(layer)`` replaces, or ``None`` for
    the loss, whose ``grad`` ``wrong(loss)`` replaces.
    """

    name: str
    description: str
    layers: tuple[Callable[[], Layer], ...]
    culprit: int | None
    leaf: str
    wrong: Callable[[Any], Callable]
    batch: int = 7


def _dense(features: int) -> Callable[[], Layer]:
    return functools.partial(nn.dense, features)


_CATALOGUE = (
    _Row(
        "flipped_sign",
        "dW = −xᵀ·dy: the weight gradient has the wrong sign",
        (_dense(8), nn.tanh, _dense(4)),
        0,
        "w",
        _after(lambda p, c, dy, d, dx: ({**d, "w": -d["w"]}, dx)),
    ),
    _Row(
        "missing_transpose",
        "dx = dy·W instead of dy·Wᵀ (a square weight hides the shape error)",
        (_dense(8), nn.tanh, _dense(8), nn.tanh, _dense(4)),
        2,
        "dx",
        _after(lambda p, c, dy, d, dx: (d, dy @ p["w"])),
    ),
    _Row(
        "forgotten_bias",
        "db is left at zero",
        (_dense(8), nn.sigmoid, _dense(4)),
        2,
        "b",
        _after(lambda p, c, dy, d, dx: ({**d, "b": 0 * d["b"]}, dx)),
    ),
    _Row(
        "sigmoid_wrong_cache",
        "σ'(z) computed as σ(y)(1 − σ(y)) from the cached output y instead of y(1 − y)",
        (_dense(8), nn.sigmoid, _dense(4)),
        1,
        "dx",
        _instead(_sigmoid_of_output),
    ),
    _Row(
        "factor_of_two",
        "tanh' taken as 2(1 − y²): a stray factor of 2",
        (_dense(8), nn.tanh, _dense(4)),
        1,
        "dx",
        _instead(lambda p, y, dy: ({}, 2 * dy * (1 - y * y))),
    ),
    _Row(
        "missing_batch_mean",
        "the loss gradient is not divided by the batch size (missing 1/batch)",
        (_dense(8), nn.tanh, _dense(4)),
        None,
        "dpred",
        _missing_batch_mean,
    ),
    _Row(
        "bias_sum_wrong_axis",
        "db = Σ over the features instead of the batch (batch = features hides the shape)",
        (_dense(8), nn.tanh, _dense(4)),
        2,
        "b",
        _after(lambda p, c, dy, d, dx: ({**d, "b": dy.sum(axis=1)}, dx)),
        batch=4,
    ),
    _Row(
        "softmax_wrong_axis",
        "the loss's softmax is normalised over the batch axis, not the classes",
        (_dense(8), nn.tanh, _dense(4)),
        None,
        "dpred",
        _softmax_over_batch,
    ),
    _Row(
        "inverted_relu_mask",
        "ReLU passes the gradient where x ≤ 0 instead of where x > 0",
        (_dense(8), nn.relu, _dense(4)),
        1,
        "dx",
        _instead(lambda p, mask, dy: ({}, jnp.where(mask, 0, dy).astype(dy.dtype))),
    ),
    _Row(
        "first_example_only",
        "dW = x[0]ᵀ·dy[0]: the gradient of the first example only, not the batch sum",
        (_dense(8), nn.tanh, _dense(4)),
        0,
        "w",
        _after(lambda p, c, dy, d, dx: ({**d, "w": jnp.outer(c[0], dy[0])}, dx)),
    ),
    _Row(
        "zero_dx",
        "the layer passes no gradient on (dx = 0)",
        (_dense(8), nn.tanh, _dense(4)),
        2,
        "dx",
        _after(lambda p, c, dy, d, dx: (d, 0 * dx)),
    ),
    _Row(
        "error_only_in_dx",
        "dparams right, dx scaled by 1.01",
        (_dense(8), nn.tanh, _dense(4)),
        2,
        "dx",
        _after(lambda p, c, dy, d, dx: (d, 1.01 * dx)),
    ),
    _Row(
        "single_element",
        "one element of dW, [3, 5], off by a millionth of the leaf's largest value",
        (_dense(16), nn.relu, _dense(4)),
        0,
        "w",
        _after(_one_element_off),
    ),
)


def _builder(layers: tuple[Layer, ...], loss: Loss, batch: int, n_in: int = 6, classes: int = 4):
    """A builder of ``(model, loss, params, x, y)``: nonzero biases, a random batch, labels.

    The params are ``init``'s at ``key(0)``; the noise on them, the batch and the labels
    come from a numpy generator seeded with 0 (eager ``jax.random`` would compile a
    program for every shape).
    """

    def build():
        model = nn.serial(*layers)
        params, _ = model.init(jax.random.key(0), (n_in,))
        rng = np.random.default_rng(0)
        params = jax.tree.map(
            lambda p: p + np.asarray(0.1 * rng.standard_normal(p.shape), p.dtype), params
        )
        x = jax.device_put(rng.standard_normal((batch, n_in)).astype(np.float32))
        y = jax.device_put(rng.integers(0, classes, batch).astype(np.int32))
        return model, loss, params, x, y

    return build


def _planted(row: _Row) -> WrongRule:
    layers = [make() for make in row.layers]
    loss = losses.softmax_cross_entropy
    if row.culprit is None:
        loss = loss._replace(grad=row.wrong(loss))
        kind = loss.name
    else:
        culprit = layers[row.culprit]
        layers[row.culprit] = culprit._replace(backward=row.wrong(culprit))
        kind = culprit.name
    return WrongRule(
        name=row.name,
        description=row.description,
        build=_builder(tuple(layers), loss, row.batch),
        layer=None if row.culprit is None else (row.culprit,),
        kind=kind,
        leaf=row.leaf,
    )


def wrong_rules() -> list[WrongRule]:
    """The catalogue of known-wrong backward rules, each with the layer and leaf it breaks.

    Every rule builds a small model (or loss) with one classic mistake planted;
    :func:`check_model` on it fails and names the culprit. Use them to practise
    reading a report, or to test another checker.

    Returns:
      A list of :class:`WrongRule`, fresh on every call.

    Example:
      >>> from fbp import verify
      >>> rule = verify.wrong_rules()[0]
      >>> report = rule.check()
      >>> report.ok, report.culprit.layer, report.culprit.leaf
      (False, 'layer 0 (dense(→8))', 'w')
    """
    return [_planted(row) for row in _CATALOGUE]
