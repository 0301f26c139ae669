"""fbp — functional backpropagation in JAX.

Networks are pure functions over parameter pytrees; every layer's backward
pass is derived by hand and jitted; :mod:`fbp.verify` proves each rule against
``jax.grad`` and finite differences; :mod:`fbp.optim` applies the gradients as
optax transformations.

>>> import jax, fbp
>>> from fbp import nn, losses
>>> model = nn.serial(nn.dense(64), nn.relu(), nn.dense(10))
>>> params, out_shape = model.init(jax.random.key(0), (64,))
"""

from fbp import (
    backprop,
    checkpoint,
    data,
    diagnostics,
    errors,
    losses,
    models,
    nn,
    optim,
    quantities,
    rules,
    train,
    verify,
)
from fbp.backprop import grad, value_and_grad
from fbp.errors import ConfigError, DTypeError, FbpError, RangeError, ShapeError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DTypeError",
    "FbpError",
    "RangeError",
    "ShapeError",
    "backprop",
    "checkpoint",
    "data",
    "diagnostics",
    "errors",
    "grad",
    "losses",
    "models",
    "nn",
    "optim",
    "quantities",
    "rules",
    "train",
    "value_and_grad",
    "verify",
]
