"""Convolutions over sequences and images, with the backward written as convolutions.

Inputs are channels-last, as in JAX and flax: ``(batch, length, channels)`` for
:func:`conv1d` and ``(batch, height, width, channels)`` for :func:`conv2d`.
Params are ``{"w": (k..., n_in, n_out), "b": (n_out,)}``, the flax layout.

A convolution (deep learning's cross-correlation) with stride ``s``, dilation
``d`` and padded input ``x̃`` is, for one spatial axis::

    y[o, :] = Σ_t x̃[o·s + t·d, :]·W[t, :, :] + b

Gather the ``K`` taps each output position reads into a *patch* (im2col) and
the convolution is one matmul, ``y = P·W`` with ``P`` of shape
``(batch·positions, K·n_in)`` and ``W`` reshaped to ``(K·n_in, n_out)``. The
backward is then the dense rule plus a scatter back to the pixels::

    dW = Pᵀ·dy          db = Σ dy          dP = dy·Wᵀ,  dx = col2im(dP)

``col2im`` adds each tap's slice of ``dP`` back where the patch was read from
— the transposed convolution of ``dy`` with the flipped kernel — and ``Pᵀ·dy``
is the correlation of the input with the output gradient. This *patches* form
is the default: on a mnist1d-sized CNN (length 40, three conv1d layers of 25
channels, k=5, stride 2; 2 shared CPU cores) a gradient step ran 1.02–1.15×
faster than with XLA's convolution at batch 100, where dispatch dominates,
and 1.3–1.4× faster at batch 1000 (``benchmarks/bench_conv.py`` prints the
ratios). ``implementation="xla"`` selects the other form, in which
the forward is ``lax.conv_general_dilated`` and the backward is two more
convolutions written out: ``dx`` as the transposed convolution (``dy``
dilated by the stride, convolved with the flipped, in/out-swapped kernel) and
``dW`` as the correlation of ``x`` with ``dy`` (batch as the contracted axis).

The window helpers here (:func:`window_patches` and its transpose
:func:`patches_to_input`) also serve the pooling layers in :mod:`fbp.nn.pool`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fbp.errors import ConfigError, ShapeError
from fbp.nn.core import Extensions, Initializer, Layer, Shape, check_float_input, check_param_keys
from fbp.nn.dense import (
    ones_rows,
    outer_rows,
    per_example_outer_grads,
    per_example_outer_sq_norms,
)
from fbp.nn.init import draw

__all__ = ["conv1d", "conv2d"]

Padding = str | int | Sequence[int] | Sequence[Sequence[int]]
_AXES = {1: ("length",), 2: ("height", "width")}


# --------------------------------------------------------------------------- window geometry
# Shared with fbp.nn.pool: every check runs on static shapes, at init or trace time.


def positive_ints(name: str, what: str, value: Any, n: int) -> tuple[int, ...]:
    """``value`` (an int or ``n`` ints) as a tuple of ``n`` positive ints, else ``ConfigError``."""
    values = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        values = None
    if (
        values is None
        or len(values) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    ):
        raise ConfigError(
            name, f"{what} must be a positive int or {n} positive ints, got {value!r}"
        )
    return values


def normalize_padding(name: str, padding: Padding, n: int) -> str | tuple[tuple[int, int], ...]:
    """``"SAME"``, ``"VALID"`` or ``n`` explicit ``(low, high)`` pairs of non-negative ints.

    An int ``p`` pads every spatial axis by ``p`` on both sides; for one
    spatial axis a bare pair ``(low, high)`` is accepted too.
    """
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ConfigError(name, f"padding must be 'SAME', 'VALID' or explicit, got {padding!r}")
        return padding.upper()
    if isinstance(padding, int) and not isinstance(padding, bool):
        pairs = ((padding, padding),) * n
    else:
        try:
            pairs = tuple(tuple(p) for p in padding)
        except TypeError:
            pairs = None
        if pairs is None and n == 1:  # a bare (low, high) pair for one spatial axis
            pairs = (tuple(padding),)
    ok = (
        pairs is not None
        and len(pairs) == n
        and all(
            len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
            for p in pairs
        )
    )
    if not ok:
        example = "(low, high)" if n == 1 else ", ".join(["(low, high)"] * n)
        raise ConfigError(
            name,
            f"padding must be 'SAME', 'VALID', an int or [{example}] pairs, got {padding!r}",
        )
    if any(v < 0 for p in pairs for v in p):
        raise ConfigError(name, f"padding must be non-negative, got {padding!r}")
    return pairs


class Window(NamedTuple):
    """A sliding window over ``n`` spatial axes, resolved for one input size (all static).

    Attributes:
      size: taps per axis (the kernel or pool size).
      strides: step between output positions, per axis.
      dilation: step between taps, per axis.
      padding: ``(low, high)`` per axis.
      spatial: the input's spatial shape.
      out: the output's spatial shape.
    """

    size: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    spatial: tuple[int, ...]
    out: tuple[int, ...]

    @property
    def taps(self) -> int:
        """Number of taps in the window, ``K = Π size``."""
        return math.prod(self.size)


def resolve_window(
    name: str,
    size: tuple[int, ...],
    strides: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: str | tuple[tuple[int, int], ...],
    spatial: Sequence[int],
) -> Window:
    """The :class:`Window` for an input of spatial shape ``spatial``, or a ``ShapeError``.

    ``"SAME"`` gives ``⌈n/s⌉`` outputs per axis, padding ``(s·(out−1) + span − n)``
    split with the extra element at the end (as ``lax`` and TensorFlow do);
    ``"VALID"`` pads nothing. ``span = d·(k−1) + 1`` is the dilated window's extent.
    """
    spatial = tuple(int(v) for v in spatial)
    spans = tuple(d * (k - 1) + 1 for k, d in zip(size, dilation, strict=True))
    if padding == "SAME":
        pairs = []
        for n, s, span in zip(spatial, strides, spans, strict=True):
            total = max((-(-n // s) - 1) * s + span - n, 0)
            pairs.append((total // 2, total - total // 2))
        padding = tuple(pairs)
    elif padding == "VALID":
        padding = ((0, 0),) * len(size)
    out = []
    for axis, (n, s, span, (lo, hi)) in enumerate(
        zip(spatial, strides, spans, padding, strict=True)
    ):
        if n + lo + hi < span:
            what = f"kernel {size}" if len(size) > 1 else f"kernel of size {size[0]}"
            where = f" along {_AXES[len(size)][axis]}" if len(size) > 1 else ""
            raise ShapeError(
                name,
                f"the {what} spans {span} positions{where} (dilation {dilation[axis]}), "
                f"larger than the padded input's {n + lo + hi} (size {n}, padding {(lo, hi)})",
            )
        out.append((n + lo + hi - span) // s + 1)
    return Window(size, strides, dilation, padding, spatial, tuple(out))


def _tap_offsets(window: Window) -> list[tuple[int, ...]]:
    """The taps' positions inside the window, row-major (the order of ``W``'s leading axes)."""
    return list(itertools.product(*(range(k) for k in window.size)))


def window_patches(x: jax.Array, window: Window, pad_value: float = 0.0) -> jax.Array:
    """im2col: ``(batch, *spatial, c) -> (batch, *out, K, c)``, tap ``t`` of each window.

    One static strided slice per tap of the padded input (``K`` is the kernel's
    size, a handful), stacked on a new axis: no loop over positions.
    """
    config = [(0, 0, 0), *((lo, hi, 0) for lo, hi in window.padding), (0, 0, 0)]
    padded = lax.pad(x, jnp.asarray(pad_value, x.dtype), config)
    taps = []
    for offset in _tap_offsets(window):
        start = (0, *(t * d for t, d in zip(offset, window.dilation, strict=True)), 0)
        limit = (
            x.shape[0],
            *(
                b + (o - 1) * s + 1
                for b, o, s in zip(start[1:-1], window.out, window.strides, strict=True)
            ),
            x.shape[-1],
        )
        taps.append(lax.slice(padded, start, limit, (1, *window.strides, 1)))
    return jnp.stack(taps, axis=-2)


def patches_to_input(dpatches: jax.Array, window: Window) -> jax.Array:
    """col2im, the transpose of :func:`window_patches`: ``(batch, *out, K, c)`` to ``x``'s shape.

    Each tap's slice of ``dpatches`` is put back where :func:`window_patches`
    read it — spread by the stride (``lax.pad``'s interior padding), shifted by
    the tap's offset minus the low padding (negative padding crops) — and the
    ``K`` placements are summed: overlapping windows add up. Padding positions
    are cropped, as their gradient belongs to no input.
    """
    total = None
    for t, offset in enumerate(_tap_offsets(window)):
        config = [(0, 0, 0)]
        for k, o, s, d, (lo, _), n in zip(
            offset,
            window.out,
            window.strides,
            window.dilation,
            window.padding,
            window.spatial,
            strict=True,
        ):
            low = k * d - lo
            config.append((low, n - low - (o - 1) * s - 1, s - 1))
        config.append((0, 0, 0))
        piece = lax.pad(dpatches[..., t, :], jnp.zeros((), dpatches.dtype), config)
        total = piece if total is None else total + piece
    return total


def check_spatial_input(name: str, x: jax.Array, n: int, channels: int | None) -> None:
    """``ShapeError`` unless ``x`` is ``(batch, *n spatial axes, channels)``."""
    expected = f"(batch, {', '.join(_AXES[n])}, {channels if channels is not None else 'channels'})"
    if x.ndim != n + 2 or (channels is not None and x.shape[-1] != channels):
        hint = "; is the batch axis missing?" if x.ndim == n + 1 else ""
        raise ShapeError(name, f"expected input of shape {expected}, got {tuple(x.shape)}{hint}")


def check_spatial_shape(name: str, input_shape: Shape, n: int) -> tuple[int, ...]:
    """``init``'s check: one example is ``(*n spatial axes, channels)``."""
    input_shape = tuple(input_shape)
    if len(input_shape) != n + 1:
        raise ShapeError(
            name,
            f"expected input_shape ({', '.join(_AXES[n])}, channels), got {input_shape}; "
            f"a {n}-D layer needs {n + 2}-D input (batch, {', '.join(_AXES[n])}, channels)",
        )
    return input_shape


# --------------------------------------------------------------------------- convolution


def _conv(
    n: int,
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int],
    padding: Padding,
    dilation: int | Sequence[int],
    use_bias: bool,
    w_init: Initializer | None,
    b_init: Initializer | None,
    dtype: Any,
    implementation: str,
) -> Layer:
    kind = f"conv{n}d"
    if not isinstance(features, int) or isinstance(features, bool) or features < 1:
        raise ConfigError(kind, f"features must be a positive int, got {features!r}")
    size = positive_ints(kind, "kernel_size", kernel_size, n)
    strides = positive_ints(kind, "strides", strides, n)
    dilation = positive_ints(kind, "dilation", dilation, n)
    padding = normalize_padding(kind, padding, n)
    if implementation not in ("patches", "xla"):
        raise ConfigError(
            kind, f"implementation must be 'patches' or 'xla', got {implementation!r}"
        )
    w_init = w_init or jax.nn.initializers.lecun_normal()
    b_init = b_init or jax.nn.initializers.zeros
    k_text = "×".join(str(k) for k in size)
    name = f"{kind}(→{features}, k={k_text})"
    dims = ("NWC", "WIO", "NWC") if n == 1 else ("NHWC", "HWIO", "NHWC")

    def described(w) -> str:
        return f"{kind} {w.shape[-2]}→{w.shape[-1]} (k={k_text})"

    def init(key, input_shape):
        input_shape = check_spatial_shape(name, input_shape, n)
        window = resolve_window(name, size, strides, dilation, padding, input_shape[:-1])
        w_key, b_key = jax.random.split(key)
        fan_in = math.prod(size) * input_shape[-1]
        params = {
            "w": draw(w_init, w_key, (*size, input_shape[-1], features), dtype, fan_in=fan_in)
        }
        if use_bias:
            params["b"] = draw(b_init, b_key, (features,), dtype, fan_in=fan_in)
        return params, (*window.out, features)

    def checked(params, x):
        w = _checked_kernel(params, use_bias, size, features, kind, name)
        label = described(w)
        check_float_input(label, x)
        check_spatial_input(label, x, n, w.shape[-2])
        window = resolve_window(label, size, strides, dilation, padding, x.shape[1:-1])
        return w, window

    def add_bias(params, y):
        if use_bias:
            y = y + params["b"].reshape((1,) * (y.ndim - 1) + (features,))
        return y

    def bias_grad(params, dy):
        return dy.sum(axis=tuple(range(dy.ndim - 1))).astype(params["b"].dtype)

    # ----- patches (im2col) form: cache P, the patches; the backward is the dense rule + col2im.

    def forward_patches(params, x, *, key=None, train=False):
        del key, train
        w, window = checked(params, x)
        patches = window_patches(x, window)  # (batch, *out, K, n_in)
        patches = patches.reshape(*patches.shape[:-2], -1)  # (batch, *out, K·n_in)
        y = jnp.einsum("...k,kf->...f", patches, w.reshape(-1, features))  # y = P·W
        carrier = jnp.zeros((0, *x.shape[1:]), x.dtype)  # input shape, no data
        return add_bias(params, y), (patches, carrier)

    def backward_patches(params, cache, dy):
        patches, carrier = cache
        w = params["w"]
        window = resolve_window(name, size, strides, dilation, padding, carrier.shape[1:-1])
        p2 = patches.reshape(-1, patches.shape[-1])
        dy2 = dy.reshape(-1, features)
        dw = jnp.einsum("pk,pf->kf", p2, dy2)  # dW = Pᵀ·dy
        dparams = {"w": dw.reshape(w.shape).astype(w.dtype)}
        if use_bias:
            dparams["b"] = bias_grad(params, dy)
        dp = jnp.einsum("...f,kf->...k", dy, w.reshape(-1, features))  # dP = dy·Wᵀ
        dp = dp.reshape(*dp.shape[:-1], window.taps, w.shape[-2])
        return dparams, patches_to_input(dp, window).astype(carrier.dtype)

    # ----- XLA form: cache x; the backward is two convolutions.

    def forward_xla(params, x, *, key=None, train=False):
        del key, train
        w, window = checked(params, x)
        dtype = jnp.result_type(x.dtype, w.dtype)  # promote as x @ w would
        y = lax.conv_general_dilated(
            x.astype(dtype),
            w.astype(dtype),
            window_strides=strides,
            padding=window.padding,
            rhs_dilation=dilation,
            dimension_numbers=dims,
        )
        return add_bias(params, y), x

    def backward_xla(params, cache, dy):
        x, w = cache, params["w"]
        window = resolve_window(name, size, strides, dilation, padding, x.shape[1:-1])
        spans = [d * (k - 1) + 1 for k, d in zip(size, dilation, strict=True)]
        # dx: the transposed convolution — dy dilated by the stride, convolved
        # with the spatially flipped kernel whose in/out axes are swapped.
        dx_padding = []
        for span, (lo, _), n_in, o, s in zip(
            spans, window.padding, window.spatial, window.out, window.strides, strict=True
        ):
            low = span - 1 - lo
            dx_padding.append((low, n_in - 1 + span - ((o - 1) * s + 1) - low))
        w_flipped = jnp.swapaxes(lax.rev(w, tuple(range(n))), -1, -2)
        dtype = jnp.result_type(dy.dtype, w.dtype)
        dx = lax.conv_general_dilated(
            dy.astype(dtype),
            w_flipped.astype(dtype),
            window_strides=(1,) * n,
            padding=dx_padding,
            lhs_dilation=strides,
            rhs_dilation=dilation,
            dimension_numbers=dims,
        )
        # dW: the correlation of x with dy over the batch — x's channels play the
        # batch, the batch plays the contracted feature axis, dy is the kernel.
        dw_padding = [
            (lo, span + (o - 1) * s - n_in - lo)
            for span, (lo, _), n_in, o, s in zip(
                spans, window.padding, window.spatial, window.out, window.strides, strict=True
            )
        ]
        lhs, rhs, out = ("CWN", "IWO", "NWC") if n == 1 else ("CHWN", "IHWO", "NHWC")
        dtype = jnp.result_type(x.dtype, dy.dtype)
        dw = lax.conv_general_dilated(
            x.astype(dtype),
            dy.astype(dtype),
            window_strides=dilation,
            padding=dw_padding,
            rhs_dilation=strides,
            dimension_numbers=(lhs, rhs, out),
        )  # (n_in, *size, n_out)
        dw = jnp.moveaxis(dw, 0, n)
        dparams = {"w": dw.astype(w.dtype)}
        if use_bias:
            dparams["b"] = bias_grad(params, dy)
        return dparams, dx.astype(x.dtype)

    # ----- per-example gradients of the patches form: the dense rule over output positions.

    def batch_l2_patches(params, cache, dy):
        dparams, dx = backward_patches(params, cache, dy)
        sq_w, sq_b = per_example_outer_sq_norms(cache[0], dy)
        return dparams, dx, {"w": sq_w, "b": sq_b} if use_bias else {"w": sq_w}

    def batch_grad_patches(params, cache, dy):
        dparams, dx = backward_patches(params, cache, dy)
        g_w, g_b = per_example_outer_grads(cache[0], dy)
        g = {"w": g_w.reshape(-1, *params["w"].shape).astype(params["w"].dtype)}
        if use_bias:
            g["b"] = g_b.astype(params["b"].dtype)
        return dparams, dx, g

    def outer_factors_patches(params, cache, dy):
        # The dense pairs over output positions: dW_n = Σ_t P_ntᵀ·δ_nt, with the
        # patch rows P (K·n_in wide) in the order of W.reshape(-1, features).
        dparams, dx = backward_patches(params, cache, dy)
        p3, dy3 = outer_rows(cache[0], dy)
        factors = {"w": (p3, dy3)}
        if use_bias:
            factors["b"] = (ones_rows(dy3), dy3)
        return dparams, dx, factors

    if implementation == "patches":
        extensions = Extensions(
            weights=("w",),
            batch_l2=batch_l2_patches,
            batch_grad=batch_grad_patches,
            outer_factors=outer_factors_patches,
        )
        return Layer(init, forward_patches, backward_patches, name=name, extensions=extensions)
    # The XLA form caches only x: per-example gradients use the generic fallback,
    # the layer's own backward on each example (its small kernel gradient is cheap).
    return Layer(init, forward_xla, backward_xla, name=name, extensions=Extensions(weights=("w",)))


def _checked_kernel(params, use_bias, size, features, kind, name) -> jax.Array:
    n = len(size)
    layout = f"({', '.join(['k'] * n)}, n_in, n_out)"
    expected = f"{{'w': {layout}, 'b': (n_out,)}}" if use_bias else f"{{'w': {layout}}}"
    check_param_keys(name, params, {"w", "b"} if use_bias else {"w"}, expected)
    w = params["w"]
    if jnp.ndim(w) != n + 2 or tuple(w.shape[:n]) != size or w.shape[-1] != features:
        raise ShapeError(
            name,
            f"expected kernel 'w' of shape ({', '.join(map(str, size))}, n_in, {features}), "
            f"got {tuple(jnp.shape(w))}; are these params from another model?",
        )
    if use_bias and jnp.shape(params["b"]) != (features,):
        raise ShapeError(
            name, f"expected bias 'b' of shape ({features},), got {jnp.shape(params['b'])}"
        )
    return w


def conv1d(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    dilation: int | Sequence[int] = 1,
    use_bias: bool = True,
    w_init: Initializer | None = None,
    b_init: Initializer | None = None,
    dtype: Any = jnp.float32,
    implementation: Literal["patches", "xla"] = "patches",
) -> Layer:
    """A 1-D convolution over ``(batch, length, n_in)``: ``y[o] = Σ_t x̃[o·s + t·d]·W[t] + b``.

    Params are ``{"w": (k, n_in, features), "b": (features,)}``. With ``P``
    the patches (each output position's ``k`` input taps, ``(·, k·n_in)``)::

        dW = Pᵀ·dy      db = Σ dy      dx = col2im(dy·Wᵀ)   (a transposed convolution)

    Cache (default ``implementation="patches"``): ``P``, which the forward
    built anyway and ``dW`` reads, and a zero-size array carrying the input's
    shape for ``col2im``; ``W`` is in params. With ``implementation="xla"``
    the cache is ``x`` and the backward is two convolutions (see the module
    docstring); both give the same numbers, the patches form ran faster here.

    Args:
      features: output channels.
      kernel_size: taps ``k`` (an int or a 1-tuple).
      strides: step ``s`` between output positions.
      padding: ``"SAME"`` (``⌈length/s⌉`` outputs), ``"VALID"`` (no padding),
        an int (both ends) or a ``(low, high)`` pair; zeros are padded.
      dilation: step ``d`` between taps (the kernel spans ``d·(k−1)+1``).
      use_bias: whether to add ``b``.
      w_init: initializer ``(key, shape, dtype)`` for ``W``; LeCun normal by
        default (fan-in ``k·n_in``), as in flax.
      b_init: initializer for ``b``; zeros by default. ``nn.init.torch_default()``
        (for both) draws ``W`` and ``b`` from ``U(±1/√(k·n_in))``, as
        ``torch.nn.Conv1d`` does.
      dtype: dtype of the parameters.
      implementation: ``"patches"`` (im2col + matmul) or ``"xla"``
        (``lax.conv_general_dilated``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.conv1d(25, 5, strides=2)
      >>> params, shape = layer.init(jax.random.key(0), (40, 1))
      >>> params["w"].shape, shape
      ((5, 1, 25), (20, 25))
      >>> y, cache = layer.forward(params, jnp.ones((8, 40, 1)))
      >>> dparams, dx = layer.backward(params, cache, jnp.ones_like(y))
      >>> dx.shape
      (8, 40, 1)
    """
    return _conv(
        1,
        features,
        kernel_size,
        strides=strides,
        padding=padding,
        dilation=dilation,
        use_bias=use_bias,
        w_init=w_init,
        b_init=b_init,
        dtype=dtype,
        implementation=implementation,
    )


def conv2d(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    dilation: int | Sequence[int] = 1,
    use_bias: bool = True,
    w_init: Initializer | None = None,
    b_init: Initializer | None = None,
    dtype: Any = jnp.float32,
    implementation: Literal["patches", "xla"] = "patches",
) -> Layer:
    """A 2-D convolution over ``(batch, height, width, n_in)``, the rule of :func:`conv1d` per axis.

    ``y[i, j] = Σ_{u,v} x̃[i·s₀ + u·d₀, j·s₁ + v·d₁]·W[u, v] + b``; params
    ``{"w": (kh, kw, n_in, features), "b": (features,)}``; with ``P`` the
    ``kh·kw`` taps of each output pixel::

        dW = Pᵀ·dy      db = Σ dy      dx = col2im(dy·Wᵀ)   (a transposed convolution)

    Cache: as :func:`conv1d` (``P`` and the input's shape; ``x`` with
    ``implementation="xla"``).

    Args:
      features: output channels.
      kernel_size: ``(kh, kw)`` or one int for both.
      strides: an int or ``(s₀, s₁)``.
      padding: ``"SAME"``, ``"VALID"``, an int (all sides) or
        ``((top, bottom), (left, right))``.
      dilation: an int or ``(d₀, d₁)``.
      use_bias: whether to add ``b``.
      w_init: initializer for ``W``; LeCun normal (fan-in ``kh·kw·n_in``).
      b_init: initializer for ``b``; zeros. ``nn.init.torch_default()`` (for
        both) draws ``W`` and ``b`` from ``U(±1/√(kh·kw·n_in))``, as
        ``torch.nn.Conv2d`` does.
      dtype: dtype of the parameters.
      implementation: ``"patches"`` or ``"xla"``, as for :func:`conv1d`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.conv2d(8, 3, strides=2)
      >>> params, shape = layer.init(jax.random.key(0), (28, 28, 1))
      >>> params["w"].shape, shape
      ((3, 3, 1, 8), (14, 14, 8))
      >>> y, cache = layer.forward(params, jnp.ones((2, 28, 28, 1)))
      >>> layer.backward(params, cache, jnp.ones_like(y))[1].shape
      (2, 28, 28, 1)
    """
    return _conv(
        2,
        features,
        kernel_size,
        strides=strides,
        padding=padding,
        dilation=dilation,
        use_bias=use_bias,
        w_init=w_init,
        b_init=b_init,
        dtype=dtype,
        implementation=implementation,
    )
