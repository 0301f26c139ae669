"""One table of every public layer: what ``fbp check`` verifies and the contract tests run.

Each :class:`Case` names a public factory of :mod:`fbp.nn` (exactly as in
``fbp.nn.__all__``), builds a representative instance, and says what the
layer needs to run: its input shape (without the batch axis), whether the
input is floating point or integer ids, whether it draws from a ``key``,
and the ``train`` mode it runs in. ``fbp check`` checks every case with
:func:`fbp.verify.check_layer`; ``tests/test_layer_contract.py`` holds every
case to the layer contract (hand backward = ``jax.vjp`` in float32 and
float64, jit = eager, ``dparams`` mirrors ``params``, a bad input's message
names the layer, the docstring example runs) and fails if a public layer
has no case. A new layer joins all of that with one line here.

Example:
  >>> from fbp.nn import catalogue
  >>> case = catalogue.LAYERS[0]
  >>> case.name, case.input_shape
  ('dense', (4,))
  >>> case.build().name
  'dense(→5)'
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from fbp import nn
from fbp.nn.core import Layer, Shape

if TYPE_CHECKING:
    from fbp import verify

__all__ = ["LAYERS", "Case", "check"]


class Case(NamedTuple):
    """One layer to check: a public factory with its arguments, and how to feed it.

    Attributes:
      name: the public factory's name, exactly as in ``fbp.nn.__all__``.
      build: ``build() -> Layer``, a ``functools.partial`` of the factory.
      input_shape: one example's shape (no batch axis).
      label: what distinguishes this case from others of the same factory.
      vocab: ``0`` for floating-point inputs; else the input is integer ids
        in ``[0, vocab)``.
      needs_key: the forward draws from its ``key`` (dropout while training).
      train: the mode the case runs in.
      bad_input: ``"dtype"`` (integer input where floats are expected, or
        floats where ids are) or ``"features"`` (one feature too many on the
        last axis): a mistake whose error message names the layer; ``""``
        where no input is wrong for the layer.
      message: a regular expression the bad input's message must match.
    """

    name: str
    build: Callable[[], Layer]
    input_shape: Shape
    label: str = ""
    vocab: int = 0
    needs_key: bool = False
    train: bool = False
    bad_input: str = "dtype"
    message: str = ""

    @property
    def title(self) -> str:
        """``name`` and ``label``, e.g. ``"conv1d (XLA, dilated)"``."""
        return f"{self.name} ({self.label})" if self.label else self.name

    def side_inputs(self, key: jax.Array) -> dict:
        """The keyword side inputs of ``forward``: ``train``, and ``key`` where it draws."""
        return {"key": key if self.needs_key else None, "train": self.train}

    def ids(self, key: jax.Array, batch: int) -> jax.Array | None:
        """A batch of integer ids in ``[0, vocab)``, or ``None`` for a float-input layer."""
        if not self.vocab:
            return None
        return jax.random.randint(key, (batch, *self.input_shape), 0, self.vocab)


def check(case: Case, key: jax.Array, *, batch_size: int = 3) -> verify.GradCheckReport:
    """:func:`fbp.verify.check_layer` of ``case``'s layer, fed as the case says."""
    from fbp import verify

    key_ids, key_check, key_side = jax.random.split(key, 3)
    return verify.check_layer(
        case.build(),
        key_check,
        case.input_shape,
        batch_size=batch_size,
        inputs=case.ids(key_ids, batch_size),
        **case.side_inputs(key_side),
    )


def _scale_init(key: jax.Array, shape: Shape) -> tuple[dict, Shape]:
    """Params of :func:`_scale_and_shift`: a random scale and a zero shift per feature."""
    return {"s": jax.random.normal(key, shape[-1:]), "t": jnp.zeros(shape[-1:])}, shape


def _scale_and_shift(params: dict, x: jax.Array) -> jax.Array:
    """``tanh(x·s + t)`` per feature: a small function to wrap with :func:`fbp.nn.from_jax`."""
    return jnp.tanh(x * params["s"][None, :] + params["t"][None, :])


def _cube(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``y = x³``, caching ``x`` (``elementwise``'s forward)."""
    return x * x * x, x


def _cube_backward(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``dx = dy ⊙ 3x²`` (``elementwise``'s backward)."""
    return 3 * x * x * dy


_ = functools.partial
_FLOAT = "expected a floating-point input, got int32"
_SEQUENCE = r"expected input of shape \(batch, time, "

LAYERS: tuple[Case, ...] = (
    Case("dense", _(nn.dense, 5), (4,), message=r"dense 4→5: " + _FLOAT),
    Case("dense", _(nn.dense, 3, use_bias=False), (4,), "no bias", bad_input="features",
         message=r"dense 4→3: expected input of shape \(batch, 4\)"),
    Case("dense", _(nn.dense, 3), (3, 4), "on a sequence", bad_input="features",
         message=r"dense 4→3: expected input of shape \(batch, 4\)"),
    Case("flatten", nn.flatten, (2, 3), bad_input=""),  # any array with a batch axis flattens
    Case("reshape", _(nn.reshape, (-1, 2)), (3, 4), bad_input="features",
         message=r"reshape\(\(-1, 2\)\): cannot reshape per-example input of shape \(3, 5\)"),
    Case("serial", _(nn.serial, nn.dense(6), nn.tanh(), nn.dense(2)), (4,), bad_input="features",
         message=r"serial layer 0 \(dense 4→6\): expected input of shape"),
    Case("residual", _(nn.residual, nn.serial(nn.dense(4), nn.gelu())), (4,),
         bad_input="features", message=r"serial layer 0 \(dense 4→4\): expected input of shape"),
    Case("identity", nn.identity, (2, 3), message=r"identity: " + _FLOAT),
    Case("sigmoid", nn.sigmoid, (2, 3), message=r"sigmoid: " + _FLOAT),
    Case("tanh", nn.tanh, (2, 3), message=r"tanh: " + _FLOAT),
    Case("relu", nn.relu, (2, 3), message=r"relu: " + _FLOAT),
    Case("leaky_relu", nn.leaky_relu, (2, 3), message=r"leaky_relu\(0.01\): " + _FLOAT),
    Case("leaky_relu", _(nn.leaky_relu, 0.2), (5,), "slope 0.2",
         message=r"leaky_relu\(0.2\): " + _FLOAT),
    Case("elu", nn.elu, (2, 3), message=r"elu\(1\): " + _FLOAT),
    Case("elu", _(nn.elu, 0.5), (5,), "α = 0.5", message=r"elu\(0.5\): " + _FLOAT),
    Case("gelu", nn.gelu, (2, 3), message=r"gelu: " + _FLOAT),
    Case("gelu", _(nn.gelu, approximate=False), (5,), "exact", message=r"gelu\(exact\): " + _FLOAT),
    Case("softplus", nn.softplus, (2, 3), message=r"softplus: " + _FLOAT),
    Case("elementwise", _(nn.elementwise, "cube", _cube, _cube_backward), (3,),
         message=r"cube: " + _FLOAT),
    Case("rnn", _(nn.rnn, 4), (5, 3), bad_input="features", message=r"rnn\(→4\): " + _SEQUENCE),
    Case("gru", _(nn.gru, 4), (5, 3), bad_input="features", message=r"gru\(→4\): " + _SEQUENCE),
    Case("lstm", _(nn.lstm, 4), (5, 3), bad_input="features",
         message=r"lstm\(→4\): " + _SEQUENCE),
    # Scans compile slowly when run eagerly: one bidirectional case covers reverse too.
    Case("bidirectional", _(nn.bidirectional, nn.lstm(3), nn.gru(2, reverse=True)), (6, 2),
         message=r"serial layer 0 \(lstm\(→3\)\): " + _FLOAT),
    Case("last_step", nn.last_step, (4, 3), message=r"last_step: " + _FLOAT),
    Case("mean_over_time", nn.mean_over_time, (4, 3), message=r"mean_over_time: " + _FLOAT),
    Case("max_over_time", nn.max_over_time, (4, 3), message=r"max_over_time: " + _FLOAT),
    Case("self_attention", _(nn.self_attention, 2, 4), (5, 4), bad_input="features",
         message=r"self_attention\(heads=2, features=4\): " + _SEQUENCE),
    Case("self_attention", _(nn.self_attention, 2, 4, causal=True), (5, 3), "causal",
         message=r"self_attention\(heads=2, features=4, causal\): " + _FLOAT),
    Case("self_attention", _(nn.self_attention, 2, 4, causal=True, use_bias=False), (5, 4),
         "causal, no bias", bad_input="features",
         message=r"self_attention\(heads=2, features=4, causal\): " + _SEQUENCE),
    Case("conv1d", _(nn.conv1d, 4, 3, strides=2), (9, 2), bad_input="features",
         message=r"conv1d 2→4 \(k=3\): expected input of shape \(batch, length, 2\)"),
    Case("conv1d", _(nn.conv1d, 3, 3, padding="VALID", dilation=2, implementation="xla"),
         (9, 2), "XLA, dilated", message=r"conv1d 2→3 \(k=3\): " + _FLOAT),
    Case("conv2d", _(nn.conv2d, 3, (3, 2)), (5, 4, 2), bad_input="features",
         message=r"conv2d 2→3 \(k=3×2\): expected input of shape"),
    Case("conv2d", _(nn.conv2d, 2, 2, strides=(2, 1), padding=1, implementation="xla"),
         (5, 4, 1), "XLA, strided", message=r"conv2d 1→2 \(k=2×2\): " + _FLOAT),
    Case("max_pool", _(nn.max_pool, 2), (6, 3), "1-D", message=r"max_pool\(2\): " + _FLOAT),
    Case("max_pool", _(nn.max_pool, (2, 3), strides=1, padding="SAME"), (5, 6, 2), "2-D",
         message=r"max_pool\(2×3\): " + _FLOAT),
    Case("avg_pool", _(nn.avg_pool, 3, strides=2, padding="SAME"), (7, 2), "1-D",
         message=r"avg_pool\(3\): " + _FLOAT),
    Case("avg_pool", _(nn.avg_pool, (2, 2), strides=1), (4, 4, 2), "2-D",
         message=r"avg_pool\(2×2\): " + _FLOAT),
    Case("layer_norm", nn.layer_norm, (3, 4), bad_input="features",
         message=r"layer_norm\(4\): expected input of shape \(batch, ..., 4\)"),
    Case("batch_norm", nn.batch_norm, (3, 4), "training", train=True, bad_input="features",
         message=r"batch_norm\(4\): expected input of shape \(batch, ..., 4\)"),
    Case("batch_norm", nn.batch_norm, (5,), "inference", message=r"batch_norm\(5\): " + _FLOAT),
    Case("dropout", _(nn.dropout, 0.5), (5,), "training", needs_key=True, train=True,
         message=r"dropout\(0.5\): " + _FLOAT),
    Case("dropout", _(nn.dropout, 0.5), (5,), "inference: identity",
         message=r"dropout\(0.5\): " + _FLOAT),
    Case("embedding", _(nn.embedding, 11, 4), (5,), vocab=11,
         message=r"embedding\(11→4\): expected integer ids, got float"),
    Case("positional_embedding", _(nn.positional_embedding, 6), (5, 4), bad_input="features",
         message=r"positional_embedding\(context=6\): expected input of shape \(batch, time, 4\)"),
    Case("unembedding", _(nn.unembedding, 7), (3, 4), bad_input="features",
         message=r"unembedding\(→7\): expected input of shape \(batch, \.\.\., 4\)"),
    Case("tie", _(nn.tie, nn.serial(nn.embedding(11, 4), nn.tanh(), nn.unembedding(11)), {2: 0}),
         (5,), "embedding read out by the tied head", vocab=11,
         message=r"serial layer 0 \(embedding\(11→4\)\): expected integer ids, got float"),
    Case("recompute", _(nn.recompute, nn.serial(nn.gelu(), nn.dense(3))), (4,),
         "GELU and dense", message=r"serial layer 0 \(gelu\): " + _FLOAT),
    # from_jax checks nothing of its own: a bad input fails inside the wrapped function.
    Case("from_jax", _(nn.from_jax, _scale_and_shift, _scale_init), (3,), "jax.vjp bridge",
         bad_input=""),
)  # fmt: skip
"""Every public layer of :mod:`fbp.nn`, each at least once."""
