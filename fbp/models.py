"""Reference networks from the literature, built from :mod:`fbp.nn` layers.

Each function returns a plain :class:`fbp.nn.Layer` (nothing is initialised
until ``model.init(key, input_shape)``), and its docstring cites the network's
source and says where fbp's version differs from it. Measured accuracies and
recipes are in ``docs/results.md``.

- :func:`mnist1d_cnn`, :func:`mnist1d_gru`: the small CNN and bidirectional
  GRU of the MNIST-1D paper (Greydanus, 2020), on ``(40,)`` signals;
- :func:`lenet5`: a LeNet-5-style convolutional network (LeCun et al., 1998)
  for ``(28, 28, 1)`` images.

Example:
  >>> import jax, fbp
  >>> model = fbp.models.mnist1d_cnn()
  >>> params, out_shape = model.init(jax.random.key(0), (40,))
  >>> out_shape
  (10,)
"""

from __future__ import annotations

from fbp import nn
from fbp.nn.core import Layer

__all__ = ["lenet5", "mnist1d_cnn", "mnist1d_gru"]


def mnist1d_cnn(classes: int = 10, channels: int = 25) -> Layer:
    """The MNIST-1D paper's small CNN: three conv1d layers and a dense head.

    Greydanus (2020), "Scaling down deep learning" (the ``ConvBase`` model of
    the authors' notebooks). ``reshape (L,) → (L, 1)``, then three
    ``conv1d(channels)`` + ReLU layers (kernels 5, 3, 3; stride 2; padding 1 on
    each side), ``flatten``, ``dense``. On mnist1d's 40-sample signals the
    lengths go 40 → 19 → 10 → 5, so the head is dense 125 → 10 and the network
    has 5,210 parameters. Weights are fbp's default LeCun normal (PyTorch's
    default is a uniform of a similar scale).

    Args:
      classes: outputs of the dense head.
      channels: channels of each convolution.

    Returns:
      The network, for ``(L,)`` inputs.

    Example:
      >>> import jax, math, fbp
      >>> model = fbp.models.mnist1d_cnn()
      >>> params, out_shape = model.init(jax.random.key(0), (40,))
      >>> out_shape, sum(math.prod(p.shape) for p in jax.tree.leaves(params))
      ((10,), 5210)
    """
    layers: list[Layer] = [nn.reshape((-1, 1))]
    for kernel in (5, 3, 3):
        layers += [nn.conv1d(channels, kernel, strides=2, padding=((1, 1),)), nn.relu()]
    return nn.serial(*layers, nn.flatten(), nn.dense(classes))


def mnist1d_gru(classes: int = 10, hidden: int = 6) -> Layer:
    """The MNIST-1D paper's bidirectional GRU: every time step's states feed a dense head.

    Greydanus (2020), "Scaling down deep learning" (the authors' ``GRUBase``).
    ``reshape (L,) → (L, 1)``, a bidirectional ``gru(hidden)`` giving
    ``(L, 2·hidden)``, ``flatten``, ``dense``. On mnist1d (L = 40, hidden 6)
    that is 300 recurrent parameters (150 a direction; PyTorch's GRU has 162,
    with a second input bias) and a dense 480 → 10 head: 5,110 in all.

    Args:
      classes: outputs of the dense head.
      hidden: hidden units of each direction.

    Returns:
      The network, for ``(L,)`` inputs.

    Example:
      >>> import jax, math, fbp
      >>> model = fbp.models.mnist1d_gru()
      >>> params, out_shape = model.init(jax.random.key(0), (40,))
      >>> out_shape, sum(math.prod(p.shape) for p in jax.tree.leaves(params))
      ((10,), 5110)
    """
    return nn.serial(
        nn.reshape((-1, 1)),
        nn.gru(hidden, bidirectional=True),
        nn.flatten(),
        nn.dense(classes),
    )


def lenet5(classes: int = 10) -> Layer:
    """A LeNet-5-style convolutional network for ``(28, 28, 1)`` MNIST images.

    After LeCun, Bottou, Bengio & Haffner (1998), "Gradient-based learning
    applied to document recognition", Proc. IEEE 86(11): C1 6 maps 5×5, S2
    pooling 2, C3 16 maps 5×5, S4 pooling 2, then 120, 84 and ``classes``
    units::

        conv2d 6 5×5 SAME → relu → max_pool 2        28×28×1 → 28×28×6 → 14×14×6
        conv2d 16 5×5 VALID → relu → max_pool 2      → 10×10×16 → 5×5×16
        flatten → dense 120 → relu → dense 84 → relu → dense classes

    61,706 parameters with 10 classes. What differs from the paper, as in the
    LeNet of BioTorch (Sanfiz & Akrout, 2021) and most modern versions: ReLU
    instead of scaled tanh; max pooling instead of trainable subsampling
    (a learned scale and bias per map); 'SAME' padding of the 28×28 image in
    place of the paper's 32×32 padded input; C3 connects to all six S2 maps
    (the paper's sparse connection table is dropped); a dense output layer
    with softmax cross-entropy instead of Euclidean RBF units. Weights are
    fbp's default LeCun normal.

    Args:
      classes: outputs of the last dense layer.

    Returns:
      The network, for ``(28, 28, 1)`` inputs (reshape flat 784-pixel images,
      e.g. ``fbp.data.load("mnist5k")``'s, first).

    Example:
      >>> import jax, jax.numpy as jnp, math, fbp
      >>> model = fbp.models.lenet5()
      >>> params, out_shape = model.init(jax.random.key(0), (28, 28, 1))
      >>> out_shape, sum(math.prod(p.shape) for p in jax.tree.leaves(params))
      ((10,), 61706)
      >>> model.apply(params, jnp.zeros((2, 28, 28, 1))).shape
      (2, 10)
    """
    return nn.serial(
        nn.conv2d(6, (5, 5), padding="SAME"),
        nn.relu(),
        nn.max_pool((2, 2)),
        nn.conv2d(16, (5, 5), padding="VALID"),
        nn.relu(),
        nn.max_pool((2, 2)),
        nn.flatten(),
        nn.dense(120),
        nn.relu(),
        nn.dense(84),
        nn.relu(),
        nn.dense(classes),
    )
