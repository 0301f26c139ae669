"""Layers as pure ``(init, forward, backward)`` triples, and their composition.

Everything a learner needs to read sits here: :mod:`fbp.nn.core` (the contract,
``serial``, ``residual``, ``flatten``, ``reshape``), :mod:`fbp.nn.dense`,
:mod:`fbp.nn.activations`, :mod:`fbp.nn.conv` (conv1d, conv2d),
:mod:`fbp.nn.pool` (max_pool, avg_pool), :mod:`fbp.nn.norm` (layer_norm,
batch_norm and its functional running statistics), :mod:`fbp.nn.dropout`,
:mod:`fbp.nn.embedding` (embedding, positional_embedding, unembedding),
:mod:`fbp.nn.tie` (tied weights), :mod:`fbp.nn.recompute`,
:mod:`fbp.nn.recurrent` (rnn, gru, lstm and
backpropagation through time), :mod:`fbp.nn.attention` and
:mod:`fbp.nn.bridge` (``from_jax``, the labelled autodiff escape hatch) — each
backward right next to its forward. :mod:`fbp.nn.init` holds the initializers
``jax.nn.initializers`` lacks (``torch_default``, ``uniform``).
"""

from fbp.nn import init, walk
from fbp.nn.activations import (
    elementwise,
    elu,
    gelu,
    identity,
    leaky_relu,
    relu,
    sigmoid,
    softplus,
    tanh,
)
from fbp.nn.attention import self_attention
from fbp.nn.bridge import from_jax
from fbp.nn.conv import conv1d, conv2d
from fbp.nn.core import Extensions, Layer, Structure, flatten, reshape, residual, serial
from fbp.nn.dense import dense
from fbp.nn.dropout import dropout
from fbp.nn.embedding import embedding, positional_embedding, unembedding
from fbp.nn.norm import (
    BatchNormCache,
    batch_norm,
    layer_norm,
    trainable_mask,
    update_batch_stats,
)
from fbp.nn.pool import avg_pool, max_pool
from fbp.nn.recompute import recompute
from fbp.nn.recurrent import (
    bidirectional,
    gru,
    last_step,
    lstm,
    max_over_time,
    mean_over_time,
    rnn,
)
from fbp.nn.tie import tie

__all__ = [
    "BatchNormCache",
    "Extensions",
    "Layer",
    "Structure",
    "avg_pool",
    "batch_norm",
    "bidirectional",
    "conv1d",
    "conv2d",
    "dense",
    "dropout",
    "elementwise",
    "elu",
    "embedding",
    "flatten",
    "from_jax",
    "gelu",
    "gru",
    "identity",
    "init",
    "last_step",
    "layer_norm",
    "leaky_relu",
    "lstm",
    "max_over_time",
    "max_pool",
    "mean_over_time",
    "positional_embedding",
    "recompute",
    "relu",
    "reshape",
    "residual",
    "rnn",
    "self_attention",
    "serial",
    "sigmoid",
    "softplus",
    "tanh",
    "tie",
    "trainable_mask",
    "unembedding",
    "update_batch_stats",
    "walk",
]
