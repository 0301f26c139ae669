"""Layers as pure ``(init, forward, backward)`` triples, and their composition.

Everything a learner needs to read sits here: :mod:`fbp.nn.core` (the contract,
``serial``, ``residual``, ``flatten``), :mod:`fbp.nn.dense` and
:mod:`fbp.nn.activations`, each backward right next to its forward.
"""

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
from fbp.nn.core import Layer, flatten, residual, serial
from fbp.nn.dense import dense

__all__ = [
    "Layer",
    "dense",
    "elementwise",
    "elu",
    "flatten",
    "gelu",
    "identity",
    "leaky_relu",
    "relu",
    "residual",
    "serial",
    "sigmoid",
    "softplus",
    "tanh",
]
