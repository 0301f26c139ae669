"""Normalization layers, with the compact hand-derived backward of normalization.

Both layers standardize ``x`` over some set of ``N`` elements, then scale and
shift each feature::

    x̂ = (x − μ)·σ⁻¹,   σ = √(var + ε),   y = γ ⊙ x̂ + β

with μ and var the mean and (biased) variance over those ``N`` elements.
:func:`layer_norm` takes them over each example's features; :func:`batch_norm`
over the batch (and any spatial axes), per feature. Because μ and σ depend on
every element, the gradient of ``x`` is not ``dŷ·σ⁻¹`` alone: differentiating
through μ and σ and collecting terms gives the one-line rule::

    dx = (1/N)·σ⁻¹·(N·dŷ − Σ dŷ − x̂ ⊙ Σ(dŷ ⊙ x̂)),   dŷ = γ ⊙ dy

(the sums over the same ``N`` elements) — the projection of ``σ⁻¹·dŷ`` away
from the constant direction and from ``x̂``. The parameters' gradients are
``dγ = Σ dy ⊙ x̂`` and ``dβ = Σ dy``, summed over everything but the feature
axis. Both layers cache ``x̂`` and ``σ⁻¹``, the only residuals the rule reads.

Batch norm's running statistics are *explicit, functional state* kept in its
params; see :func:`batch_norm` and :func:`update_batch_stats`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError, ShapeError
from fbp.nn import walk
from fbp.nn.core import Extensions, Layer, Params, check_batched, check_float_input, row_sq_norms
from fbp.nn.walk import at_path_of

__all__ = ["BatchNormCache", "batch_norm", "layer_norm", "trainable_mask", "update_batch_stats"]


def _check_epsilon(name: str, epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not epsilon > 0:
        raise ConfigError(name, f"epsilon must be a positive number, got {epsilon!r}")
    return float(epsilon)


def _per_feature(v: jax.Array, ndim: int) -> jax.Array:
    """``v`` of shape ``(c,)`` as ``(1, ..., 1, c)`` with ``ndim`` axes: an explicit broadcast."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _normalized_dx(dx_hat: jax.Array, x_hat: jax.Array, inv_std: jax.Array, axes) -> jax.Array:
    """``dx = σ⁻¹·(dŷ − mean(dŷ) − x̂ ⊙ mean(dŷ ⊙ x̂))``, means over ``axes`` (kept).

    This is ``(1/N)·σ⁻¹·(N·dŷ − Σ dŷ − x̂ ⊙ Σ(dŷ ⊙ x̂))`` with the ``1/N`` taken
    inside the sums: the shared rule of layer and batch normalization.
    """
    mean_dx_hat = jnp.mean(dx_hat, axis=axes, keepdims=True)
    mean_dx_hat_x_hat = jnp.mean(dx_hat * x_hat, axis=axes, keepdims=True)
    return inv_std * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)


def _affine_params(features: int, use_scale: bool, use_bias: bool, dtype) -> dict:
    params = {}
    if use_scale:
        params["scale"] = jnp.ones((features,), dtype)
    if use_bias:
        params["bias"] = jnp.zeros((features,), dtype)
    return params


def _describe(tree) -> Any:
    if isinstance(tree, dict | tuple | list):
        return jax.tree.map(lambda a: tuple(jnp.shape(a)), tree)
    return type(tree).__name__


def _check_keys(name: str, params, keys: set, what: str = "params") -> None:
    if not isinstance(params, dict) or set(params) != keys:
        expected = "{" + ", ".join(f"'{k}'" for k in sorted(keys)) + "}"
        raise ShapeError(
            name,
            f"expected {what} with entries {expected}, got {_describe(params)}; "
            "are these params from another model?",
        )


def _features(name: str, params) -> int | None:
    """The common length of every param vector (``None`` without params)."""
    shapes = {jnp.shape(v) for v in jax.tree.leaves(params)}
    if len(shapes) > 1 or any(len(s) != 1 for s in shapes):
        raise ShapeError(
            name, f"expected every param of shape (features,), got {_describe(params)}"
        )
    return next(iter(shapes))[0] if shapes else None


def _scale_and_shift(params, x_hat):
    y = x_hat
    if "scale" in params:
        y = y * _per_feature(params["scale"], x_hat.ndim)
    if "bias" in params:
        y = y + _per_feature(params["bias"], x_hat.ndim)
    return y


def _affine_grads(params, dy, x_hat, axes):
    dparams = {}
    if "scale" in params:
        dparams["scale"] = jnp.sum(dy * x_hat, axis=axes).astype(params["scale"].dtype)
    if "bias" in params:
        dparams["bias"] = jnp.sum(dy, axis=axes).astype(params["bias"].dtype)
    dx_hat = dy * _per_feature(params["scale"], dy.ndim) if "scale" in params else dy
    return dparams, dx_hat


# --------------------------------------------------------------------------- layer norm


def layer_norm(
    *,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
) -> Layer:
    """Layer normalization over the last (feature) axis of each example.

    ``x̂ = (x − μ)·σ⁻¹`` with μ, σ² the mean and variance of each example's
    ``N`` features (each position of a sequence is its own example);
    ``y = γ ⊙ x̂ + β``. Backward, sums over the feature axis for ``dx`` and
    over all other axes for the params::

        dx = (1/N)·σ⁻¹·(N·dŷ − Σ dŷ − x̂ ⊙ Σ(dŷ ⊙ x̂)),  dŷ = γ ⊙ dy
        dγ = Σ dy ⊙ x̂        dβ = Σ dy

    Params: ``{"scale": (features,), "bias": (features,)}`` (flax's names),
    initialized to ones and zeros. Same rule in training and inference.

    Cache: ``x̂`` and ``σ⁻¹`` (one per example), the rule's only residuals.

    Args:
      epsilon: ε added to the variance.
      use_scale: whether to learn γ.
      use_bias: whether to learn β.
      dtype: dtype of the parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.layer_norm()
      >>> params, shape = layer.init(jax.random.key(0), (4,))
      >>> y, cache = layer.forward(params, jnp.array([[1.0, 2.0, 3.0, 4.0]]))
      >>> round(float(y.mean()), 6), round(float(y.var()), 4)
      (0.0, 1.0)
      >>> dparams, dx = layer.backward(params, cache, jnp.ones_like(y))
      >>> jnp.abs(dx).max() < 1e-6  # a constant dy is projected away
      Array(True, dtype=bool)
    """
    epsilon = _check_epsilon("layer_norm", epsilon)
    keys = {k for k, on in (("scale", use_scale), ("bias", use_bias)) if on}

    def init(key, input_shape):
        if len(input_shape) < 1:
            raise ShapeError("layer_norm", "needs an input shape with at least one axis")
        del key
        params = _affine_params(input_shape[-1], use_scale, use_bias, dtype)
        return params, tuple(input_shape)

    def forward(params, x, *, key=None, train=False):
        del key, train
        _check_keys("layer_norm", params, keys)
        features = _features("layer_norm", params)
        name = f"layer_norm({features if features is not None else x.shape[-1]})"
        check_float_input(name, x)
        check_batched(name, x, f"(batch, ..., {features})")
        if features is not None and x.shape[-1] != features:
            raise ShapeError(
                name, f"expected input of shape (batch, ..., {features}), got {tuple(x.shape)}"
            )
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centered = x - mean
        inv_std = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + epsilon)
        x_hat = centered * inv_std
        return _scale_and_shift(params, x_hat), (x_hat, inv_std)

    def backward(params, cache, dy):
        x_hat, inv_std = cache
        dparams, dx_hat = _affine_grads(params, dy, x_hat, tuple(range(dy.ndim - 1)))
        dx = _normalized_dx(dx_hat, x_hat, inv_std, -1)
        return dparams, dx.astype(x_hat.dtype)

    def batch_l2(params, cache, dy):
        # Example n's share: dscale_n = Σ_positions δ_n ⊙ x̂_n, dbias_n = Σ_positions δ_n.
        dparams, dx = backward(params, cache, dy)
        x_hat, middle = cache[0], tuple(range(1, dy.ndim - 1))
        sq = {}
        if "scale" in params:
            sq["scale"] = row_sq_norms(jnp.sum(dy * x_hat, axis=middle))
        if "bias" in params:
            sq["bias"] = row_sq_norms(jnp.sum(dy, axis=middle))
        return dparams, dx, sq

    return Layer(
        init,
        forward,
        backward,
        name="layer_norm",
        extensions=Extensions(weights=(), batch_l2=batch_l2),
    )


# --------------------------------------------------------------------------- batch norm


class BatchNormCache(NamedTuple):
    """What :func:`batch_norm`'s forward keeps.

    Attributes:
      x_hat: the normalized input, ``(batch, ..., features)``.
      inv_std: σ⁻¹ per feature, ``(features,)``.
      mean: in training, the batch mean per feature (read by
        :func:`update_batch_stats`, not by the backward); ``None`` at inference.
      var: in training, the batch's biased variance per feature; ``None`` at
        inference.
    """

    x_hat: jax.Array
    inv_std: jax.Array
    mean: jax.Array | None
    var: jax.Array | None


def batch_norm(
    *,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
) -> Layer:
    """Batch normalization of each feature (last axis) over the batch and any spatial axes.

    Training (``train=True``): μ and σ² are the mean and biased variance of
    each feature over the ``N`` elements of the batch (``N = batch·length``
    for sequences, ``batch·height·width`` for images), and::

        y = γ ⊙ x̂ + β,   x̂ = (x − μ)·σ⁻¹
        dx = (1/N)·γ·σ⁻¹·(N·dy − Σ dy − x̂ ⊙ Σ(dy ⊙ x̂))
        dγ = Σ dy ⊙ x̂        dβ = Σ dy        d(stats) = 0

    Inference (``train=False``): μ and σ² are the running statistics in
    ``params["stats"]``, so the layer is affine per feature and::

        dx = γ·σ⁻¹·dy    d(stats.mean) = −γ·σ⁻¹·Σ dy    d(stats.var) = −½·γ·σ⁻²·Σ dy ⊙ x̂

    **State.** Params are ``{"scale": (f,), "bias": (f,), "stats": {"mean":
    (f,), "var": (f,)}}`` (stats initialized to 0 and 1). The running
    statistics live in params because the forward's only inputs are params,
    ``x``, ``key`` and ``train``: at inference they are an ordinary input of
    the function, and the backward is exactly its vector-Jacobian product, so
    ``jax.vjp``, finite differences and :mod:`fbp.verify` agree with it in both
    modes. In training the forward does not read them, so their gradient is
    exactly zero: SGD, momentum, Adam and RMSProp leave them unchanged; only
    a transformation that moves parameters without a gradient (weight decay)
    would, so mask it with :func:`trainable_mask`::

        optax.chain(optax.masked(optax.add_decayed_weights(1e-4), nn.trainable_mask(params)),
                    optax.adam(1e-3))

    The statistics are updated functionally, never inside the forward: a
    training forward's cache (:class:`BatchNormCache`) carries the batch's mean
    and variance, and :func:`update_batch_stats` returns new params with them
    folded in — as an exponential moving average each step, or (with
    ``momentum=0``) set from one large batch after training ("precise BN").

    Cache: ``x̂`` and ``σ⁻¹`` (the rule's residuals) and, in training, the
    batch's μ and σ² per feature (two vectors, for :func:`update_batch_stats`).

    Args:
      epsilon: ε added to the variance.
      use_scale: whether to learn γ.
      use_bias: whether to learn β.
      dtype: dtype of the parameters and statistics.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> model = nn.serial(nn.dense(3), nn.batch_norm())
      >>> params, _ = model.init(jax.random.key(0), (2,))
      >>> x = jax.random.normal(jax.random.key(1), (8, 2))
      >>> y, cache = model.forward(params, x, train=True)
      >>> params = nn.update_batch_stats(model, params, cache)   # running stats, functionally
      >>> params[1]["stats"]["mean"].shape
      (3,)
      >>> model.apply(params, x).shape                           # inference uses them
      (8, 3)
    """
    epsilon = _check_epsilon("batch_norm", epsilon)
    keys = {k for k, on in (("scale", use_scale), ("bias", use_bias)) if on} | {"stats"}

    def init(key, input_shape):
        if len(input_shape) < 1:
            raise ShapeError("batch_norm", "needs an input shape with at least one axis")
        del key
        features = input_shape[-1]
        params = _affine_params(features, use_scale, use_bias, dtype)
        params["stats"] = {
            "mean": jnp.zeros((features,), dtype),
            "var": jnp.ones((features,), dtype),
        }
        return params, tuple(input_shape)

    def forward(params, x, *, key=None, train=False):
        del key
        _check_keys("batch_norm", params, keys)
        stats = params["stats"]
        _check_keys("batch_norm", stats, {"mean", "var"}, "params['stats']")
        features = _features("batch_norm", params)
        name = f"batch_norm({features})"
        check_float_input(name, x)
        check_batched(name, x, f"(batch, ..., {features})")
        if x.shape[-1] != features:
            raise ShapeError(
                name, f"expected input of shape (batch, ..., {features}), got {tuple(x.shape)}"
            )
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = jnp.mean(x, axis=axes)
            centered = x - _per_feature(mean, x.ndim)
            var = jnp.mean(centered * centered, axis=axes)
        else:
            mean = stats["mean"].astype(x.dtype)
            var = stats["var"].astype(x.dtype)
            centered = x - _per_feature(mean, x.ndim)
        inv_std = jax.lax.rsqrt(var + epsilon)
        x_hat = centered * _per_feature(inv_std, x.ndim)
        cache = (
            BatchNormCache(x_hat, inv_std, mean, var)
            if train
            else BatchNormCache(x_hat, inv_std, None, None)
        )
        return _scale_and_shift(params, x_hat), cache

    def backward(params, cache, dy):
        x_hat, inv_std = cache.x_hat, cache.inv_std
        axes = tuple(range(dy.ndim - 1))
        dparams, dx_hat = _affine_grads(params, dy, x_hat, axes)
        stats = params["stats"]
        if cache.mean is not None:  # training: batch statistics
            dx = _normalized_dx(dx_hat, x_hat, _per_feature(inv_std, dy.ndim), axes)
            dparams["stats"] = jax.tree.map(jnp.zeros_like, stats)
        else:  # inference: an affine map of x and of the statistics
            dx = dx_hat * _per_feature(inv_std, dy.ndim)
            d_mean = -jnp.sum(dx, axis=axes)
            d_var = -0.5 * inv_std * inv_std * jnp.sum(dx_hat * x_hat, axis=axes)
            dparams["stats"] = {
                "mean": d_mean.astype(stats["mean"].dtype),
                "var": d_var.astype(stats["var"].dtype),
            }
        return dparams, dx.astype(x_hat.dtype)

    def update_stats(params, cache, momentum):
        if not isinstance(cache, BatchNormCache) or cache.mean is None:
            raise ConfigError(
                "batch_norm",
                "update_batch_stats: the cache holds no batch statistics; "
                "pass the cache of model.forward(params, x, train=True)",
            )
        stats = params["stats"]
        new = {
            name: (momentum * stats[name] + (1 - momentum) * batch).astype(stats[name].dtype)
            for name, batch in (("mean", cache.mean), ("var", cache.var))
        }
        return {**params, "stats": new}

    extensions = Extensions(
        weights=(),
        mixes_examples="batch_norm normalises each example with statistics of the whole batch",
        update_stats=update_stats,
    )
    return Layer(init, forward, backward, name="batch_norm", extensions=extensions)


def _has_running_stats(layer: Layer) -> bool:
    return layer.extensions is not None and layer.extensions.update_stats is not None


def contains_batch_norm(layer: Layer) -> bool:
    """Whether ``layer`` is, or holds anywhere among its children, a layer with running
    statistics (:func:`batch_norm`, or one declaring ``Extensions(update_stats=...)``)."""
    return walk.contains(layer, _has_running_stats)


def check_momentum(where: str, momentum: Any) -> None:
    """Raise ``ConfigError`` unless ``momentum`` is a number in ``[0, 1]``."""
    if isinstance(momentum, bool) or not isinstance(momentum, int | float):
        raise ConfigError(where, f"momentum must be a number, got {momentum!r}")
    if not 0 <= momentum <= 1:
        raise ConfigError(where, f"momentum must be in [0, 1], got {momentum}")


def update_batch_stats(
    model: Layer, params: Params, cache: Any, *, momentum: float = 0.9
) -> Params:
    """New params with every :func:`batch_norm`'s batch statistics folded into its running stats.

    For each batch-norm layer of ``model`` (found through ``serial`` and
    ``residual``), with ``μ_B``, ``σ²_B`` the batch statistics in its training
    cache::

        stats.mean ← momentum·stats.mean + (1 − momentum)·μ_B
        stats.var  ← momentum·stats.var  + (1 − momentum)·σ²_B

    (flax's convention; PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here).
    ``momentum=0`` sets the statistics to the batch's, e.g. from one large
    batch after training. All other params are returned unchanged. Pure and
    jit-able; the variance is the biased one the forward normalizes with.

    Args:
      model: the model the params and cache belong to.
      params: its params.
      cache: the cache of ``model.forward(params, x, train=True)``.
      momentum: weight of the old statistics, in ``[0, 1]``.

    Returns:
      Params of the same structure, with the batch-norm statistics updated.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fbp
      >>> from fbp import nn, losses
      >>> model = nn.serial(nn.dense(4), nn.batch_norm(), nn.relu(), nn.dense(2))
      >>> params, _ = model.init(jax.random.key(0), (3,))
      >>> opt = optax.adam(1e-2)
      >>> state = opt.init(params)
      >>> x, labels = jnp.ones((6, 3)), jnp.array([0, 1, 0, 1, 0, 1])
      >>> loss = losses.softmax_cross_entropy
      >>> @jax.jit
      ... def step(params, state):
      ...     pred, cache = model.forward(params, x, train=True)
      ...     grads, _ = model.backward(params, cache, loss.grad(pred, labels))
      ...     updates, state = opt.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     return nn.update_batch_stats(model, params, cache), state
      >>> params, state = step(params, state)
    """
    check_momentum("update_batch_stats", momentum)
    if not isinstance(model, Layer):
        raise ConfigError(
            "update_batch_stats", f"model must be a Layer, got {type(model).__name__}"
        )
    for site in walk.leaves(model):
        layer = site.layer
        where = f" at serial layer {site.label}" if site.path else ""
        if _has_running_stats(layer):
            with at_path_of(site):
                new = layer.extensions.update_stats(
                    walk.at_path(params, site.path), walk.at_path(cache, site.cache_path), momentum
                )
            params = walk.replace_at(params, site.path, new)
        elif contains_batch_norm(layer):
            raise ConfigError(
                "update_batch_stats",
                f"{layer.name}{where} holds a batch_norm inside a layer that declares no "
                "structure (nn.Structure), so its params and cache cannot be found",
            )
    return params


def trainable_mask(params: Params) -> Any:
    """A pytree of bools like ``params``: ``False`` for batch-norm statistics, ``True`` elsewhere.

    For ``optax.masked``, so transformations that move parameters without a
    gradient (weight decay) skip the running statistics, which have a zero
    gradient in training and are updated by :func:`update_batch_stats`. A
    leaf is a statistic when it sits under a ``"stats"`` key.

    Example:
      >>> import jax
      >>> from fbp import nn
      >>> params, _ = nn.serial(nn.dense(2), nn.batch_norm()).init(jax.random.key(0), (3,))
      >>> nn.trainable_mask(params)[1]
      {'bias': True, 'scale': True, 'stats': {'mean': False, 'var': False}}
    """

    def trainable(path, leaf) -> bool:
        del leaf
        return not any(getattr(k, "key", None) == "stats" for k in path)

    return jax.tree_util.tree_map_with_path(trainable, params)
