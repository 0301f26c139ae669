"""Reference networks from the literature, built from :mod:`fbp.nn` layers.

Each function returns a plain :class:`fbp.nn.Layer` (nothing is initialised
until ``model.init(key, input_shape)``), and its docstring cites the network's
source and says where fbp's version differs from it. Measured accuracies and
recipes are in ``docs/results.md``.

- :func:`mlp`: a plain dense network (what ``fbp train`` builds by default);
  :func:`mnist1d_mlp`: the MNIST-1D authors' residual MLP; :func:`nielsen`:
  the 784-30-10 sigmoid network of Nielsen's *Neural Networks and Deep
  Learning*, chapter 1;
- :func:`mnist1d_cnn`, :func:`mnist1d_gru`: the small CNN and bidirectional
  GRU of the MNIST-1D paper (Greydanus, 2020), on ``(40,)`` signals;
- :func:`lenet5`: a LeNet-5-style convolutional network (LeCun et al., 1998)
  for ``(28, 28, 1)`` images;
- :func:`gpt`: a GPT-2-style decoder-only transformer (Radford et al., 2019;
  nanoGPT's layout) with a tied output head, and :func:`generate`, which
  samples from it.

Example:
  >>> import jax, fbp
  >>> model = fbp.models.mnist1d_cnn()
  >>> params, out_shape = model.init(jax.random.key(0), (40,))
  >>> out_shape
  (10,)

The functions' own examples count parameters on ``jax.eval_shape(lambda:
model.init(key, input_shape)[0])``: the params' shapes and dtypes, traced
without drawing a number.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from fbp import nn
from fbp.errors import ConfigError, ShapeError
from fbp.nn.core import Initializer, Layer

__all__ = [
    "generate",
    "gpt",
    "lenet5",
    "mlp",
    "mnist1d_cnn",
    "mnist1d_gru",
    "mnist1d_mlp",
    "nielsen",
]

ACTIVATIONS = {
    "relu": nn.relu,
    "tanh": nn.tanh,
    "sigmoid": nn.sigmoid,
    "leaky_relu": nn.leaky_relu,
    "elu": nn.elu,
    "gelu": nn.gelu,
    "softplus": nn.softplus,
}
"""The activations :func:`mlp` takes by name (``fbp train --activation``)."""


def mlp(hidden=(256,), classes: int = 10, activation: str = "relu") -> Layer:
    """A dense network: ``flatten``, then ``dense → activation`` per hidden width, then ``dense``.

    ReLU-family networks (relu, leaky_relu, elu, gelu) draw their hidden
    weights He-normal (He et al., 2015), the others LeCun-normal (fbp's
    default). ``fbp train`` builds this network from ``--hidden`` and
    ``--activation``; its defaults, 64-256-10 ReLU on digits, reach 97.8–98.3 %
    (docs/results.md).

    Args:
      hidden: the hidden layers' widths, in order (empty: a linear model).
      classes: the output width.
      activation: a name in :data:`ACTIVATIONS`.

    Example:
      >>> import jax, fbp
      >>> model = fbp.models.mlp((32, 16), classes=3, activation="tanh")
      >>> params = jax.eval_shape(lambda: model.init(jax.random.key(0), (8, 8))[0])  # shapes
      >>> [layer["w"].shape for layer in params if layer]  # flatten and tanh have none
      [(64, 32), (32, 16), (16, 3)]
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(
            "mlp", f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
        )
    relu_like = activation in ("relu", "leaky_relu", "elu", "gelu")
    w_init = jax.nn.initializers.he_normal() if relu_like else None
    layers: list[Layer] = [nn.flatten()]
    for width in hidden:
        layers += [nn.dense(width, w_init=w_init), ACTIVATIONS[activation]()]
    layers.append(nn.dense(classes))
    return nn.serial(*layers)


def mnist1d_mlp(classes: int = 10, hidden: int = 256) -> Layer:
    """The MNIST-1D authors' MLP: ``h = relu(W1 x); h = h + relu(W2 h); out = W3 h``.

    From the ``notebooks/models.py`` of Greydanus & Kobak's MNIST-1D
    repository (its README reports 68 % for an MLP); fbp's LeCun-normal
    initialisation stands in for PyTorch's default. With Adam 1e-2, batch 100
    and 200 epochs it reaches 67.9–70.9 % over seeds 0–4 (docs/results.md).

    Example:
      >>> import jax, jax.numpy as jnp, math, fbp
      >>> model = fbp.models.mnist1d_mlp()
      >>> params = jax.eval_shape(lambda: model.init(jax.random.key(0), (40,))[0])  # shapes
      >>> sum(math.prod(p.shape) for p in jax.tree.leaves(params))
      78858
      >>> signals = jax.ShapeDtypeStruct((2, 40), jnp.float32)  # a batch of two
      >>> jax.eval_shape(model.apply, params, signals).shape
      (2, 10)
    """
    return nn.serial(
        nn.dense(hidden),
        nn.relu(),
        nn.residual(nn.serial(nn.dense(hidden), nn.relu())),
        nn.dense(classes),
    )


def nielsen(hidden: int = 30, classes: int = 10, sigmoid_outputs: bool = False) -> Layer:
    """The 784-30-10 sigmoid network of Nielsen's *Neural Networks and Deep Learning*, ch. 1.

    ``dense(30) → sigmoid → dense(10)``; with ``sigmoid_outputs=True`` a final
    sigmoid as in chapter 1 (trained there with the quadratic cost,
    ``fbp.losses.mse``); without, logits for softmax cross-entropy (chapter
    3). On the bundled mnist5k (4,000 training images) SGD with mini-batches
    of 10 for 30 epochs gives 92.0–93.6 % (docs/results.md).

    Example:
      >>> import jax, fbp
      >>> model = fbp.models.nielsen()
      >>> params = jax.eval_shape(lambda: model.init(jax.random.key(0), (784,))[0])  # shapes
      >>> [layer["w"].shape for layer in params if layer]  # sigmoid has none
      [(784, 30), (30, 10)]
    """
    layers = [nn.dense(hidden), nn.sigmoid(), nn.dense(classes)]
    if sigmoid_outputs:
        layers.append(nn.sigmoid())
    return nn.serial(*layers)


def mnist1d_cnn(
    classes: int = 10,
    channels: int = 25,
    *,
    w_init: Initializer | None = None,
    b_init: Initializer | None = None,
) -> Layer:
    """The MNIST-1D paper's small CNN: three conv1d layers and a dense head.

    Greydanus (2020), "Scaling down deep learning" (the ``ConvBase`` model of
    the authors' notebooks). ``reshape (L,) → (L, 1)``, then three
    ``conv1d(channels)`` + ReLU layers (kernels 5, 3, 3; stride 2; padding 1 on
    each side), ``flatten``, ``dense``. On mnist1d's 40-sample signals the
    lengths go 40 → 19 → 10 → 5, so the head is dense 125 → 10 and the network
    has 5,210 parameters. Every weight and bias is drawn as the authors'
    PyTorch layers draw them, ``U(±1/√fan_in)`` (:func:`fbp.nn.init.torch_default`;
    fan-in 5, 75, 75 and 125). Trained with Adam at 2e-2, batch 100, for 150
    epochs with the rate decayed to zero over the last tenth (``fbp train
    --model cnn --schedule tail``, ``docs/results.md``) it reaches 94.9 %
    mean test accuracy over seeds 0–4 (the paper: 94 %).

    Args:
      classes: outputs of the dense head.
      channels: channels of each convolution.
      w_init, b_init: initializers of every layer's ``W`` and ``b``; both
        :func:`fbp.nn.init.torch_default` when omitted (pass
        ``jax.nn.initializers.lecun_normal()`` and ``jax.nn.initializers.zeros``
        for fbp's layer defaults).

    Returns:
      The network, for ``(L,)`` inputs.

    Example:
      >>> import jax, jax.numpy as jnp, math, fbp
      >>> model = fbp.models.mnist1d_cnn()
      >>> params = jax.eval_shape(lambda: model.init(jax.random.key(0), (40,))[0])  # shapes
      >>> sum(math.prod(p.shape) for p in jax.tree.leaves(params))
      5210
      >>> signals = jax.ShapeDtypeStruct((2, 40), jnp.float32)  # a batch of two
      >>> jax.eval_shape(model.apply, params, signals).shape
      (2, 10)
    """
    inits = {
        "w_init": w_init or nn.init.torch_default(),
        "b_init": b_init or nn.init.torch_default(),
    }
    layers: list[Layer] = [nn.reshape((-1, 1))]
    for kernel in (5, 3, 3):
        conv = nn.conv1d(channels, kernel, strides=2, padding=((1, 1),), **inits)
        layers += [conv, nn.relu()]
    return nn.serial(*layers, nn.flatten(), nn.dense(classes, **inits))


def mnist1d_gru(
    classes: int = 10,
    hidden: int = 6,
    *,
    w_init: Initializer | None = None,
    b_init: Initializer | None = None,
) -> Layer:
    """The MNIST-1D paper's bidirectional GRU: every time step's states feed a dense head.

    Greydanus (2020), "Scaling down deep learning" (the authors' ``GRUBase``).
    ``reshape (L,) → (L, 1)``, a bidirectional ``gru(hidden)`` giving
    ``(L, 2·hidden)``, ``flatten``, ``dense``. On mnist1d (L = 40, hidden 6)
    that is 300 recurrent parameters (150 a direction; PyTorch's GRU has 162,
    with a second input bias) and a dense 480 → 10 head: 5,110 in all.
    Params are drawn as the authors' PyTorch layers draw them
    (:func:`fbp.nn.init.torch_default`): every GRU weight and bias from
    ``U(±1/√hidden)``, the head's from ``U(±1/√480)``. Trained with the
    authors' settings (Adam 1e-2, batch 100, 150 epochs; ``docs/results.md``)
    it reaches 91.3 % mean test accuracy over seeds 0–4 (the paper: 91 %).

    Args:
      classes: outputs of the dense head.
      hidden: hidden units of each direction.
      w_init, b_init: initializers of every weight (each gate's block of the
        GRU's ``W_x`` and ``W_h``, the head's ``W``) and every bias; both
        :func:`fbp.nn.init.torch_default` when omitted. (fbp's layer defaults
        are LeCun normal for ``W_x`` and the head, orthogonal for ``W_h``,
        zero biases.)

    Returns:
      The network, for ``(L,)`` inputs.

    Example:
      >>> import jax, jax.numpy as jnp, math, fbp
      >>> model = fbp.models.mnist1d_gru()
      >>> params = jax.eval_shape(lambda: model.init(jax.random.key(0), (40,))[0])  # shapes
      >>> sum(math.prod(p.shape) for p in jax.tree.leaves(params))
      5110
      >>> signals = jax.ShapeDtypeStruct((2, 40), jnp.float32)  # a batch of two
      >>> jax.eval_shape(model.apply, params, signals).shape
      (2, 10)
    """
    w_init = w_init or nn.init.torch_default()
    b_init = b_init or nn.init.torch_default()
    return nn.serial(
        nn.reshape((-1, 1)),
        nn.gru(hidden, bidirectional=True, w_x_init=w_init, w_h_init=w_init, b_init=b_init),
        nn.flatten(),
        nn.dense(classes, w_init=w_init, b_init=b_init),
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
      >>> params = jax.eval_shape(lambda: model.init(jax.random.key(0), (28, 28, 1))[0])
      >>> sum(math.prod(p.shape) for p in jax.tree.leaves(params))  # shapes suffice to count
      61706
      >>> images = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)  # a batch of two
      >>> jax.eval_shape(model.apply, params, images).shape
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


# --------------------------------------------------------------------------- GPT


def gpt(
    vocab: int,
    context: int,
    layers: int = 4,
    heads: int = 4,
    width: int = 128,
    *,
    tied: bool = True,
    bias: bool = False,
    dropout: float = 0.0,
    recompute: bool = False,
    dtype: Any = jnp.float32,
) -> Layer:
    """A GPT-2-style language model: ids ``(batch, T)`` to next-id logits ``(batch, T, vocab)``.

    The layout of GPT-2 (Radford et al., 2019) as nanoGPT writes it
    (Karpathy, ``model.py``), every piece an fbp layer with its hand-derived
    backward::

        embedding(vocab → width) → positional_embedding(context) [→ dropout]
        layers × [ residual(layer_norm → causal self_attention(heads) [→ dropout])
                   residual(layer_norm → dense 4·width → gelu → dense width [→ dropout]) ]
        layer_norm → unembedding(→ vocab)          (tied: reads the embedding's table)

    Pre-LN blocks; GELU in its tanh form (GPT-2's). With ``tied=True`` the
    head shares the token embedding's table through :func:`fbp.nn.tie`, so
    the table's gradient is the sum of the lookup's scatter-add and the head's
    ``dyᵀ·x``. GPT-2's initialisation: every weight normal with standard
    deviation 0.02, the two projections that write into the residual stream
    (attention's ``W_o`` and the MLP's second dense) with ``0.02/√(2·layers)``,
    biases zero, layer norms ``γ = 1, β = 0``.

    Args:
      vocab: number of token ids.
      context: the longest sequence (the positional table's rows).
      layers: transformer blocks.
      heads: attention heads (must divide ``width``).
      width: the residual stream's width.
      tied: share the token embedding's table with the output head.
      bias: biases in the attention and MLP projections and the layer norms
        (nanoGPT's ``bias``; its training default is ``False``).
      dropout: dropout rate after the embeddings, attention and MLP (``0``:
        none, nanoGPT's CPU configuration).
      recompute: cache only the MLP's pre-activation and recompute the GELU
        in backward (:func:`fbp.nn.recompute` around ``gelu → dense``; llm.c's
        ``recompute``): two ``(batch, T, 4·width)`` arrays less in the cache
        per block, for one GELU more. Whether the compiled step's peak memory
        falls is XLA's call (``benchmarks/bench_gpt.py`` measures it).
      dtype: dtype of the parameters.

    Returns:
      The model, for integer inputs ``(batch, T)`` with ``T ≤ context``;
      initialise it with ``model.init(key, (context,))``.

    Example:
      >>> import jax, jax.numpy as jnp, math, fbp
      >>> model = fbp.models.gpt(vocab=11, context=8, layers=1, heads=2, width=16)
      >>> params = jax.eval_shape(lambda: model.init(jax.random.key(0), (8,))[0])  # shapes
      >>> sum(math.prod(p.shape) for p in jax.tree.leaves(params))
      3424
      >>> ids = jax.ShapeDtypeStruct((3, 5), jnp.int32)  # 3 sequences of 5 ids
      >>> jax.eval_shape(model.apply, params, ids).shape
      (3, 5, 11)
    """
    for what, value in (
        ("vocab", vocab),
        ("context", context),
        ("layers", layers),
        ("heads", heads),
        ("width", width),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError("gpt", f"{what} must be a positive int, got {value!r}")
    normal = jax.nn.initializers.normal(0.02)
    scaled = jax.nn.initializers.normal(0.02 / math.sqrt(2 * layers))

    def dropped(*body: Layer) -> tuple[Layer, ...]:
        return (*body, nn.dropout(dropout)) if dropout else body

    def norm() -> Layer:
        return nn.layer_norm(use_bias=bias, dtype=dtype)

    blocks = []
    for _ in range(layers):
        attention = nn.self_attention(
            heads, width, causal=True, use_bias=bias, w_init=normal, o_init=scaled, dtype=dtype
        )
        up = nn.dense(4 * width, use_bias=bias, w_init=normal, dtype=dtype)
        down = (nn.gelu(), nn.dense(width, use_bias=bias, w_init=scaled, dtype=dtype))
        mlp = (up, nn.recompute(nn.serial(*down))) if recompute else (up, *down)
        blocks.append(nn.residual(nn.serial(norm(), *dropped(attention))))
        blocks.append(nn.residual(nn.serial(norm(), *dropped(*mlp))))
    layers_ = [
        nn.embedding(vocab, width, w_init=normal, dtype=dtype),
        nn.positional_embedding(context, w_init=normal, dtype=dtype),
        *dropped(),
        *blocks,
        norm(),
        nn.unembedding(vocab, w_init=normal, dtype=dtype),
    ]
    model = nn.serial(*layers_)
    if tied:
        model = nn.tie(model, {(len(layers_) - 1,): (0,)})
    return model


def generate(
    model: Layer,
    params: Any,
    prompt: jax.Array,
    steps: int,
    *,
    key: jax.Array,
    context: int,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> jax.Array:
    """Sample ``steps`` new ids from a language model, one at a time, in one compiled loop.

    The model sees a fixed window of ``context`` ids (the prompt's last
    ``context`` and the ids generated so far), padded at the end while it is
    shorter: causal attention never lets a position see the padding after
    it, so the logits at the last real position are exact. Each new id is
    drawn from ``softmax(logits / temperature)`` restricted to the ``top_k``
    largest logits (all of them with ``None``), appended, and the window
    slides once full. The loop is a ``lax.scan`` inside one jitted program:
    the model's forward is traced once per call shape — not once per token —
    and a second call with the same model, ``steps`` and ``top_k`` reuses the
    compiled program (``temperature``, the prompt's ids and ``key`` are
    traced values).

    Args:
      model: a model mapping ids ``(batch, T)`` to logits ``(batch, T, vocab)``
        for ``T ≤ context`` (e.g. :func:`gpt`).
      params: its params.
      prompt: integer ids ``(T,)``, at least one.
      steps: how many ids to generate.
      key: the random key for sampling.
      context: the model's context length (the window).
      temperature: divides the logits (``> 0``; lower is greedier).
      top_k: sample among the ``top_k`` most likely ids only.

    Returns:
      The ``steps`` new ids, ``(steps,)`` int32.

    Example:
      >>> import jax, jax.numpy as jnp, fbp
      >>> model = fbp.models.gpt(vocab=11, context=8, layers=1, heads=2, width=16)
      >>> params, _ = model.init(jax.random.key(0), (8,))
      >>> ids = fbp.models.generate(
      ...     model, params, jnp.array([1, 2, 3]), 20, key=jax.random.key(1), context=8, top_k=5
      ... )
      >>> ids.shape, set(ids.tolist()) <= set(range(11))
      ((20,), True)
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError("generate", f"steps must be a positive int, got {steps!r}")
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise ConfigError("generate", f"context must be a positive int, got {context!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError("generate", f"top_k must be a positive int or None, got {top_k!r}")
    if not isinstance(temperature, jax.core.Tracer) and not float(temperature) > 0:
        raise ConfigError("generate", f"temperature must be positive, got {temperature!r}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 1 or prompt.shape[0] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ShapeError(
            "generate",
            f"expected a prompt of integer ids, shape (T,) with T ≥ 1, got {prompt.dtype} "
            f"{tuple(prompt.shape)}",
        )
    prompt = prompt[-context:].astype(jnp.int32)
    window = jnp.zeros((context,), jnp.int32).at[: prompt.shape[0]].set(prompt)
    return _sample(
        model, params, window, jnp.int32(prompt.shape[0]), key, temperature, steps, top_k
    )


@functools.partial(jax.jit, static_argnames=("model", "steps", "top_k"))
def _sample(model, params, window, length, key, temperature, steps, top_k):
    context = window.shape[0]

    def step(carry, step_key):
        window, length = carry
        logits = model.apply(params, window[None])[0]  # (context, vocab)
        last = jax.lax.dynamic_index_in_dim(logits, length - 1, keepdims=False)
        last = last.astype(jnp.float32) / temperature
        if top_k is not None and top_k < last.shape[-1]:
            kth = jax.lax.top_k(last, top_k)[0][-1]
            last = jnp.where(last < kth, -jnp.inf, last)
        token = jax.random.categorical(step_key, last).astype(jnp.int32)
        full = length >= context
        # Full: slide left and write at the end; else write at `length`.
        window = jnp.where(full, jnp.roll(window, -1), window)
        window = window.at[jnp.where(full, context - 1, length)].set(token)
        return (window, jnp.minimum(length + 1, context)), token

    _, tokens = jax.lax.scan(step, (window, length), jax.random.split(key, steps))
    return tokens
