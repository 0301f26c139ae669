"""Recurrent layers over sequences, with backpropagation through time written out.

Sequences are channels-last, ``(batch, time, features)``. A recurrent layer
maps one to the full sequence of its hidden states, ``(batch, time, hidden)``,
starting from a zero state. Each layer keeps its gates concatenated so one
step is one matmul::

    params = {"w_x": (n_in, G·hidden), "w_h": (hidden, G·hidden), "b": (G·hidden,)}

with ``G`` gates (1 for :func:`rnn`, 3 for :func:`gru`, 4 for :func:`lstm`).

Forward and backward share one plan:

1. The input projections of all time steps, ``a_x = x·W_x + b``, are one
   matmul before the scan: they do not depend on the recurrence.
2. ``jax.lax.scan`` runs the recurrence, ``h_t = cell(a_x[t], h_{t−1}·W_h)``,
   and stacks the hidden states and the gate activations the backward reads.
3. The backward is backpropagation through time: a reverse scan carries
   ``∂L/∂h_t`` from step ``t+1`` back to step ``t``, adds the output's own
   ``dy_t``, and emits the gradients of the pre-activations — one matmul per
   step (``dh_{t−1} = da_h·W_hᵀ``) is all that must stay inside the scan.
4. After it, the weight gradients are one matmul each over all steps and the
   batch: ``dW_x = Σ_t x_tᵀ·da_x[t]``, ``dW_h = Σ_t h_{t−1}ᵀ·da_h[t]``,
   ``db = Σ_t Σ_batch da_x[t]``, ``dx[t] = da_x[t]·W_xᵀ``.
5. Per-example gradients (:mod:`fbp.diagnostics`, DP-SGD) come from the same
   deltas: the weights are shared over time, so example ``n``'s gradient is
   the sum over its own steps, ``dW_x,n = Σ_t x_nt·da_x,ntᵀ`` and so on — the
   dense layer's rule over a sequence, with no second reverse scan.

``reverse=True`` runs the recurrence right to left (``h_t`` depends on
``h_{t+1}``); the output stays in the input's time order. :func:`bidirectional`
runs two layers over the same input and concatenates their features, as a
bidirectional RNN does.

The time-pooling layers :func:`last_step`, :func:`mean_over_time` and
:func:`max_over_time` turn a sequence into one vector per example.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fbp.errors import ConfigError, ShapeError, at_layer
from fbp.nn.core import (
    Extensions,
    Initializer,
    Layer,
    Params,
    Shape,
    Structure,
    check_no_params,
    check_positive_int,
    check_sequence,
    check_sequence_shape,
    row_sq_norms,
)
from fbp.nn.dense import ones_rows, per_example_outer_grads, per_example_outer_sq_norms
from fbp.nn.init import draw

__all__ = [
    "bidirectional",
    "gru",
    "last_step",
    "lstm",
    "max_over_time",
    "mean_over_time",
    "rnn",
]


# --------------------------------------------------------------------------- shared checks


def _check_params(name: str, params: Params, expected: dict[str, tuple]) -> None:
    """Check a recurrent layer's params against ``expected`` (``None`` = any size)."""

    def fits(shape, want):
        return len(shape) == len(want) and all(
            w is None or s == w for s, w in zip(shape, want, strict=True)
        )

    def show(want):
        inner = ", ".join("n_in" if w is None else str(w) for w in want)
        return f"({inner},)" if len(want) == 1 else f"({inner})"

    ok = isinstance(params, dict) and set(params) == set(expected)
    if ok:
        ok = all(fits(tuple(jnp.shape(params[k])), want) for k, want in expected.items())
    if not ok:
        want = "{" + ", ".join(f"'{k}': {show(w)}" for k, w in expected.items()) + "}"
        got = (
            jax.tree.map(lambda a: tuple(jnp.shape(a)), params)
            if isinstance(params, dict | tuple | list)
            else type(params).__name__
        )
        raise ShapeError(
            name, f"expected params {want}, got {got}; are these params from another model?"
        )


# --------------------------------------------------------------------------- shared plan


def _previous(hs: jax.Array, reverse: bool) -> jax.Array:
    """The state each step started from: ``h_{t−1}`` (``h_{t+1}`` if reversed), zero first."""
    zeros = jnp.zeros_like(hs[:1])
    if reverse:
        return jnp.concatenate([hs[1:], zeros], axis=0)
    return jnp.concatenate([zeros, hs[:-1]], axis=0)


def _project_inputs(x: jax.Array, w_x: jax.Array, b: jax.Array) -> jax.Array:
    """``a_x = x·W_x + b`` for every step at once, time-major: ``(time, batch, G·hidden)``."""
    return jnp.einsum("btf,fg->tbg", x, w_x) + b[None, None, :]  # a_x[t] = x_t·W_x + b


def _weight_grads(
    x: jax.Array, h_prev: jax.Array, da_x: jax.Array, da_h: jax.Array, w_x: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """After the reverse scan: ``dW_x``, ``dW_h``, ``db`` and ``dx``, one product each."""
    dw_x = jnp.einsum("btf,tbg->fg", x, da_x)  # dW_x = Σ_t x_tᵀ·da_x[t]
    dw_h = jnp.einsum("tbh,tbg->hg", h_prev, da_h)  # dW_h = Σ_t h_{t−1}ᵀ·da_h[t]
    db = da_x.sum(axis=(0, 1))  # db = Σ_t Σ_batch da_x[t]
    dx = jnp.einsum("tbg,fg->btf", da_x, w_x)  # dx[t] = da_x[t]·W_xᵀ
    return dw_x, dw_h, db, dx


class _Deltas(NamedTuple):
    """What the reverse scan leaves for the weight gradients; time-major but ``x``.

    Attributes:
      x: the input, ``(batch, time, n_in)``.
      h_prev: the state each step started from, ``(time, batch, hidden)``.
      da_x: the gradients of the input pre-activations, ``(time, batch, G·hidden)``.
      da_h: those of the recurrent pre-activations, ``(time, batch, G·hidden)``.
      extra: for each extra param, the deltas whose sum over time and batch is
        its gradient, ``(time, batch, ...)``.
    """

    x: jax.Array
    h_prev: jax.Array
    da_x: jax.Array
    da_h: jax.Array
    extra: dict[str, jax.Array]


def _batch_major(a: jax.Array) -> jax.Array:
    """``(time, batch, ...) -> (batch, time, ...)``."""
    return jnp.swapaxes(a, 0, 1)


def _name(kind: str, hidden: int, reverse: bool) -> str:
    return f"{kind}(→{hidden}, reverse)" if reverse else f"{kind}(→{hidden})"


def _init_weights(
    key: jax.Array,
    n_in: int,
    hidden: int,
    gates: int,
    w_x_init: Initializer,
    w_h_init: Initializer,
    b_init: Initializer | None,
    dtype: jnp.dtype,
    extra_params: dict[str, tuple[int, ...]],
) -> dict[str, jax.Array]:
    """``w_x``, ``w_h`` (each gate's block drawn on its own), ``b`` and the extra biases.

    The biases are zeros unless ``b_init`` is given. A fan-in-reading
    initializer (``nn.init.torch_default()``) gets ``hidden`` for every
    param, as ``torch.nn.RNN``/``GRU``/``LSTM`` draw all from ``U(±1/√hidden)``.
    """
    keys = jax.random.split(key, 2 * gates)

    def block(init, k, shape):
        return draw(init, k, shape, dtype, fan_in=hidden)

    w_x = jnp.concatenate([block(w_x_init, k, (n_in, hidden)) for k in keys[:gates]], axis=1)
    w_h = jnp.concatenate([block(w_h_init, k, (hidden, hidden)) for k in keys[gates:]], axis=1)
    biases = {"b": (gates * hidden,)} | extra_params
    if b_init is None:
        return {"w_x": w_x, "w_h": w_h} | {k: jnp.zeros(s, dtype) for k, s in biases.items()}
    b_keys = jax.random.split(jax.random.fold_in(key, 1), len(biases))
    drawn = {
        k: block(b_init, b_key, s) for b_key, (k, s) in zip(b_keys, biases.items(), strict=True)
    }
    return {"w_x": w_x, "w_h": w_h} | drawn


def _orthogonal(key: jax.Array, shape: Shape, dtype: jnp.dtype) -> jax.Array:
    """Orthogonal init, drawn in at least float32 (the QR has no bfloat16 kernel on CPU)."""
    draw_dtype = jnp.promote_types(dtype, jnp.float32)
    return jax.nn.initializers.orthogonal()(key, shape, draw_dtype).astype(dtype)


def _recurrent_layer(
    kind: str,
    hidden: int,
    gates: int,
    reverse: bool,
    w_x_init: Initializer | None,
    w_h_init: Initializer | None,
    b_init: Initializer | None,
    dtype: jnp.dtype,
    extra_params: dict[str, tuple[int, ...]],
    scan_forward: Callable[..., tuple[jax.Array, dict]],
    scan_backward: Callable[..., tuple[jax.Array, jax.Array, dict]],
) -> Layer:
    """The shared plan (module docstring) around one cell's forward and backward scans.

    ``scan_forward(params, a_x) -> (hs, residuals)`` runs the recurrence over
    the time-major input projections; ``scan_backward(params, cache, dys,
    h_prev) -> (da_x, da_h, extra)`` is its reverse scan, returning the
    gradients of the input and recurrent pre-activations and, for each extra
    param, the time-major deltas whose sum over steps and batch is its
    gradient (kept unsummed so each example's share can be read off).

    The backward and the per-example rules (``batch_l2``, ``batch_grad``) run
    the reverse scan once, in ``deltas``, and read everything from its result.
    """
    name = _name(kind, hidden, reverse)
    w_x_init = w_x_init or jax.nn.initializers.lecun_normal()
    w_h_init = w_h_init or _orthogonal
    width = gates * hidden

    def expected(n_in):
        shapes = {"w_x": (n_in, width), "w_h": (hidden, width), "b": (width,)}
        return shapes | extra_params

    def init(key, input_shape):
        time, n_in = check_sequence_shape(name, input_shape)
        params = _init_weights(
            key, n_in, hidden, gates, w_x_init, w_h_init, b_init, dtype, extra_params
        )
        return params, (time, hidden)

    def forward(params, x, *, key=None, train=False):
        del key, train
        _check_params(name, params, expected(None))
        check_sequence(name, x, params["w_x"].shape[0])
        a_x = _project_inputs(x, params["w_x"], params["b"])
        hs, residuals = scan_forward(params, a_x)
        return hs.transpose(1, 0, 2), {"x": x, "h": hs} | residuals

    def deltas(params, cache, dy):
        """The reverse scan, once: every delta the gradients and per-example rules read."""
        h_prev = _previous(cache["h"], reverse)
        da_x, da_h, extra = scan_backward(params, cache, dy.transpose(1, 0, 2), h_prev)
        return _Deltas(cache["x"], h_prev, da_x, da_h, extra)

    def gradients(params, d):
        dw_x, dw_h, db, dx = _weight_grads(d.x, d.h_prev, d.da_x, d.da_h, params["w_x"])
        extra = {k: e.sum(axis=(0, 1)) for k, e in d.extra.items()}
        dparams = {"w_x": dw_x, "w_h": dw_h, "b": db} | extra
        dparams = {k: dparams[k].astype(params[k].dtype) for k in params}
        return dparams, dx.astype(d.x.dtype)

    def backward(params, cache, dy):
        return gradients(params, deltas(params, cache, dy))

    # Per-example gradients. The weights are shared over time steps, so example
    # n's gradient sums its own steps, from the same deltas as the backward:
    #   dW_x,n = Σ_t x_nt·da_x,ntᵀ     dW_h,n = Σ_t h_prev,nt·da_h,ntᵀ     db_n = Σ_t da_x,nt
    # (gru's b_hn likewise: Σ_t r ⊙ dn̂ of example n) — the dense rule over steps.

    def batch_l2(params, cache, dy):
        d = deltas(params, cache, dy)
        dparams, dx = gradients(params, d)
        sq_w_x, sq_b = per_example_outer_sq_norms(d.x, _batch_major(d.da_x))
        sq_w_h, _ = per_example_outer_sq_norms(_batch_major(d.h_prev), _batch_major(d.da_h))
        extra = {k: row_sq_norms(e.sum(axis=0)) for k, e in d.extra.items()}
        return dparams, dx, {"w_x": sq_w_x, "w_h": sq_w_h, "b": sq_b} | extra

    def batch_grad(params, cache, dy):
        d = deltas(params, cache, dy)
        dparams, dx = gradients(params, d)
        g_w_x, g_b = per_example_outer_grads(d.x, _batch_major(d.da_x))
        g_w_h, _ = per_example_outer_grads(_batch_major(d.h_prev), _batch_major(d.da_h))
        extra = {k: e.sum(axis=0) for k, e in d.extra.items()}
        g = {"w_x": g_w_x, "w_h": g_w_h, "b": g_b} | extra
        return dparams, dx, {k: g[k].astype(params[k].dtype) for k in params}

    def outer_factors(params, cache, dy):
        # The same sums as pairs (a, g) over steps: (x, da_x) for W_x, (h_prev, da_h)
        # for W_h, (1, da_x) for b, (1, extra delta) for gru's b_hn.
        d = deltas(params, cache, dy)
        dparams, dx = gradients(params, d)
        da_x, da_h = _batch_major(d.da_x), _batch_major(d.da_h)
        factors = {
            "w_x": (d.x, da_x),
            "w_h": (_batch_major(d.h_prev), da_h),
            "b": (ones_rows(da_x), da_x),
        }
        for k, e in d.extra.items():
            e = _batch_major(e)
            factors[k] = (ones_rows(e), e)
        return dparams, dx, {k: factors[k] for k in params}

    extensions = Extensions(
        weights=("w_x", "w_h"),
        batch_l2=batch_l2,
        batch_grad=batch_grad,
        outer_factors=outer_factors,
    )
    return Layer(init, forward, backward, name=name, extensions=extensions)


def _dtype(*arrays: Any) -> jnp.dtype:
    return jnp.result_type(*jax.tree.leaves(arrays))


# --------------------------------------------------------------------------- rnn


def rnn(
    hidden: int,
    *,
    reverse: bool = False,
    bidirectional: bool = False,
    w_x_init: Initializer | None = None,
    w_h_init: Initializer | None = None,
    b_init: Initializer | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Layer:
    """The Elman RNN with tanh: ``h_t = tanh(x_t·W_x + h_{t−1}·W_h + b)``, ``h_{−1} = 0``.

    Input ``(batch, time, n_in)``, output every state ``(batch, time, hidden)``.
    Params ``{"w_x": (n_in, hidden), "w_h": (hidden, hidden), "b": (hidden,)}``.

    Backward (through time, ``t`` from last to first, ``dh_T = 0``)::

        da_t     = (dy_t + dh_t) ⊙ (1 − h_t²)          the tanh', read from h_t
        dh_{t−1} = da_t·W_hᵀ
        dW_x = Σ_t x_tᵀ·da_t    dW_h = Σ_t h_{t−1}ᵀ·da_t    db = Σ_t Σ_batch da_t
        dx_t = da_t·W_xᵀ

    Cache: ``x`` (for ``dW_x``) and the states ``h`` (time-major), from which
    both ``tanh' = 1 − h²`` and ``h_{t−1}`` are read — nothing else.

    Args:
      hidden: size of the state.
      reverse: run right to left (``h_t`` from ``h_{t+1}``); the output keeps
        the input's time order.
      bidirectional: concatenate a left-to-right and a right-to-left layer on
        the feature axis: ``bidirectional(rnn(hidden), rnn(hidden, reverse=True))``,
        output ``(batch, time, 2·hidden)``.
      w_x_init: initializer ``(key, shape, dtype)`` for ``W_x``; LeCun normal
        by default.
      w_h_init: initializer for ``W_h``; orthogonal by default.
      b_init: initializer for ``b``; zeros by default. ``nn.init.torch_default()``
        for all three draws every param from ``U(±1/√hidden)``, as
        ``torch.nn.RNN`` does.
      dtype: dtype of the parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.rnn(4)
      >>> params, shape = layer.init(jax.random.key(0), (7, 2))
      >>> shape
      (7, 4)
      >>> y, cache = layer.forward(params, jnp.ones((2, 7, 2)))
      >>> dparams, dx = layer.backward(params, cache, jnp.ones_like(y))
      >>> dx.shape
      (2, 7, 2)
    """
    kind = "rnn"
    _check_recurrent_config(kind, hidden, reverse, bidirectional)
    if bidirectional:
        options = {"w_x_init": w_x_init, "w_h_init": w_h_init, "b_init": b_init, "dtype": dtype}
        return _bidirectional(rnn(hidden, **options), rnn(hidden, reverse=True, **options))

    def scan_forward(params, a_x):
        w_h = params["w_h"]

        def step(h_prev, a_x_t):
            h = jnp.tanh(a_x_t + h_prev @ w_h)
            return h, h

        h0 = jnp.zeros((a_x.shape[1], hidden), _dtype(a_x, w_h))
        _, hs = lax.scan(step, h0, a_x, reverse=reverse)
        return hs, {}

    def scan_backward(params, cache, dys, h_prev):
        w_h = params["w_h"]

        def step(dh, inputs):
            dy_t, h_t = inputs
            da = (dy_t + dh) * (1 - h_t * h_t)
            return (da @ w_h.T).astype(dh.dtype), da

        dh0 = jnp.zeros(dys.shape[1:], _dtype(dys, cache["h"], w_h))
        _, da = lax.scan(step, dh0, (dys, cache["h"]), reverse=not reverse)
        return da, da, {}

    return _recurrent_layer(
        kind,
        hidden,
        1,
        reverse,
        w_x_init,
        w_h_init,
        b_init,
        dtype,
        {},
        scan_forward,
        scan_backward,
    )


def _check_recurrent_config(kind: str, hidden: int, reverse: bool, bidirectional: bool) -> None:
    check_positive_int(kind, "hidden", hidden)
    if bidirectional and reverse:
        raise ConfigError(
            kind,
            "reverse=True and bidirectional=True together are ambiguous: a bidirectional "
            "layer already runs both ways",
        )


# --------------------------------------------------------------------------- gru


def gru(
    hidden: int,
    *,
    reverse: bool = False,
    bidirectional: bool = False,
    w_x_init: Initializer | None = None,
    w_h_init: Initializer | None = None,
    b_init: Initializer | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Layer:
    """Gated recurrent unit, the variant of PyTorch and cuDNN (``r`` after ``W_h``).

    Gates in the order ``r`` (reset), ``z`` (update), ``n`` (candidate), each
    a block of ``hidden`` columns of ``W_x``, ``W_h`` and ``b``::

        a_x = x_t·W_x + b                   a_h = h_{t−1}·W_h       (both (batch, 3·hidden))
        r = σ(a_x^r + a_h^r)                z = σ(a_x^z + a_h^z)
        n = tanh(a_x^n + r ⊙ (a_h^n + b_hn))
        h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}

    This is ``torch.nn.GRU`` (and Keras's ``reset_after=True``): the reset
    gate multiplies the recurrent product, so one matmul serves all three
    gates. (Cho et al. 2014 instead apply ``r`` before it,
    ``n = tanh(x·W_n + (r ⊙ h_{t−1})·U_n)``.) ``b`` holds PyTorch's
    ``b_ih + b_hh`` for ``r`` and ``z`` and ``b_in`` for ``n``; the
    candidate's recurrent bias ``b_hn`` sits inside ``r ⊙ (·)`` and so is a
    parameter of its own. Params ``{"w_x": (n_in, 3·hidden), "w_h": (hidden,
    3·hidden), "b": (3·hidden,), "b_hn": (hidden,)}``.

    Backward (``t`` from last to first, ``dh_T = 0``; ``g_n = a_h^n + b_hn``)::

        dh    = dy_t + dh_t
        dn̂    = dh ⊙ (1 − z) ⊙ (1 − n²)          (n̂, ẑ, r̂: pre-activations)
        dẑ    = dh ⊙ (h_{t−1} − n) ⊙ z(1 − z)
        dr̂    = dn̂ ⊙ g_n ⊙ r(1 − r)
        da_x  = [dr̂, dẑ, dn̂]        da_h = [dr̂, dẑ, r ⊙ dn̂]
        dh_{t−1} = dh ⊙ z + da_h·W_hᵀ
        db_hn = Σ_t Σ_batch r ⊙ dn̂

    and ``dW_x``, ``dW_h``, ``db``, ``dx`` from ``da_x``, ``da_h`` as in the
    module docstring.

    Cache: ``x``, the states ``h``, the gates ``r``, ``z``, ``n`` (their
    derivatives are read from them) and ``g_n`` (the factor of ``dr̂``; it
    cannot be recovered stably from the others).

    Args:
      hidden: size of the state.
      reverse: run right to left; the output keeps the input's time order.
      bidirectional: concatenate a left-to-right and a right-to-left GRU on the
        feature axis (output ``(batch, time, 2·hidden)``), as the bidirectional
        GRU of the MNIST-1D paper.
      w_x_init: initializer for each gate's block of ``W_x``; LeCun normal by
        default.
      w_h_init: initializer for each gate's ``(hidden, hidden)`` block of
        ``W_h``; orthogonal by default.
      b_init: initializer for ``b`` and ``b_hn``; zeros by default.
        ``nn.init.torch_default()`` for all three draws every param from
        ``U(±1/√hidden)``, as ``torch.nn.GRU`` does (``b`` once, where PyTorch
        adds ``b_ih + b_hh`` for ``r`` and ``z``).
      dtype: dtype of the parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.gru(3, bidirectional=True)
      >>> params, shape = layer.init(jax.random.key(0), (7, 2))
      >>> shape
      (7, 6)
      >>> params[0]["w_x"].shape, params[0]["w_h"].shape
      ((2, 9), (3, 9))
    """
    kind = "gru"
    _check_recurrent_config(kind, hidden, reverse, bidirectional)
    if bidirectional:
        options = {"w_x_init": w_x_init, "w_h_init": w_h_init, "b_init": b_init, "dtype": dtype}
        return _bidirectional(gru(hidden, **options), gru(hidden, reverse=True, **options))
    n = hidden

    def scan_forward(params, a_x):
        w_h, b_hn = params["w_h"], params["b_hn"]

        def step(h_prev, a_x_t):
            a_h = h_prev @ w_h
            r = jax.nn.sigmoid(a_x_t[:, :n] + a_h[:, :n])
            z = jax.nn.sigmoid(a_x_t[:, n : 2 * n] + a_h[:, n : 2 * n])
            g_n = a_h[:, 2 * n :] + b_hn[None, :]
            cand = jnp.tanh(a_x_t[:, 2 * n :] + r * g_n)
            h = cand + z * (h_prev - cand)
            return h, (h, {"r": r, "z": z, "n": cand, "g_n": g_n})

        h0 = jnp.zeros((a_x.shape[1], hidden), _dtype(a_x, w_h, b_hn))
        _, (hs, residuals) = lax.scan(step, h0, a_x, reverse=reverse)
        return hs, residuals

    def scan_backward(params, cache, dys, h_prev):
        w_h = params["w_h"]

        def step(dh_next, inputs):
            dy_t, h_prev_t, r, z, cand, g_n = inputs
            dh = dy_t + dh_next
            dn = dh * (1 - z) * (1 - cand * cand)
            dz = dh * (h_prev_t - cand) * z * (1 - z)
            dr = dn * g_n * r * (1 - r)
            dn_h = r * dn
            da_h = jnp.concatenate([dr, dz, dn_h], axis=1)
            dh_prev = dh * z + da_h @ w_h.T
            return dh_prev.astype(dh_next.dtype), (jnp.concatenate([dr, dz, dn], axis=1), dn_h)

        inputs = (dys, h_prev, cache["r"], cache["z"], cache["n"], cache["g_n"])
        dh0 = jnp.zeros(dys.shape[1:], _dtype(dys, inputs, w_h))
        _, (da_x, dn_h) = lax.scan(step, dh0, inputs, reverse=not reverse)
        da_h = jnp.concatenate([da_x[..., : 2 * n], dn_h], axis=-1)
        return da_x, da_h, {"b_hn": dn_h}

    return _recurrent_layer(
        kind,
        hidden,
        3,
        reverse,
        w_x_init,
        w_h_init,
        b_init,
        dtype,
        {"b_hn": (hidden,)},
        scan_forward,
        scan_backward,
    )


# --------------------------------------------------------------------------- lstm


def lstm(
    hidden: int,
    *,
    reverse: bool = False,
    bidirectional: bool = False,
    w_x_init: Initializer | None = None,
    w_h_init: Initializer | None = None,
    b_init: Initializer | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Layer:
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with a forget gate).

    Gates in PyTorch's order ``i`` (input), ``f`` (forget), ``g`` (cell
    candidate), ``o`` (output), each a block of ``hidden`` columns::

        [î, f̂, ĝ, ô] = x_t·W_x + h_{t−1}·W_h + b
        i = σ(î)   f = σ(f̂)   g = tanh(ĝ)   o = σ(ô)
        c_t = f ⊙ c_{t−1} + i ⊙ g          h_t = o ⊙ tanh(c_t)

    with ``h_{−1} = c_{−1} = 0``; the output is every ``h_t``. Params
    ``{"w_x": (n_in, 4·hidden), "w_h": (hidden, 4·hidden), "b": (4·hidden,)}``
    (``b`` is PyTorch's ``b_ih + b_hh``; zero by default, forget gate included).

    Backward (``t`` from last to first, ``dh_T = dc_T = 0``)::

        dh  = dy_t + dh_t
        dô  = dh ⊙ tanh(c_t) ⊙ o(1 − o)
        dc  = dc_t + dh ⊙ o ⊙ (1 − tanh²(c_t))
        dî  = dc ⊙ g ⊙ i(1 − i)     df̂ = dc ⊙ c_{t−1} ⊙ f(1 − f)     dĝ = dc ⊙ i ⊙ (1 − g²)
        da  = [dî, df̂, dĝ, dô]
        dc_{t−1} = dc ⊙ f            dh_{t−1} = da·W_hᵀ

    and the weight gradients and ``dx`` from ``da`` as in the module docstring.

    Cache: ``x``, ``h``, the cell states ``c`` (``c_{t−1}`` for ``df̂``),
    ``tanh(c)`` (kept, not recomputed) and the gates ``i, f, g, o``.

    Args:
      hidden: size of the state (and of the cell).
      reverse: run right to left; the output keeps the input's time order.
      bidirectional: concatenate both directions on the feature axis (output
        ``(batch, time, 2·hidden)``).
      w_x_init: initializer for each gate's block of ``W_x``; LeCun normal by
        default.
      w_h_init: initializer for each gate's ``(hidden, hidden)`` block of
        ``W_h``; orthogonal by default.
      b_init: initializer for ``b``; zeros by default (so is the forget
        gate's). ``nn.init.torch_default()`` for all three draws every param
        from ``U(±1/√hidden)``, as ``torch.nn.LSTM`` does (``b`` once, where
        PyTorch adds ``b_ih + b_hh``).
      dtype: dtype of the parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> model = nn.serial(nn.lstm(4), nn.last_step(), nn.dense(3))
      >>> params, shape = model.init(jax.random.key(0), (7, 2))
      >>> model.apply(params, jnp.ones((2, 7, 2))).shape
      (2, 3)
    """
    kind = "lstm"
    _check_recurrent_config(kind, hidden, reverse, bidirectional)
    if bidirectional:
        options = {"w_x_init": w_x_init, "w_h_init": w_h_init, "b_init": b_init, "dtype": dtype}
        return _bidirectional(lstm(hidden, **options), lstm(hidden, reverse=True, **options))
    n = hidden

    def scan_forward(params, a_x):
        w_h = params["w_h"]

        def step(carry, a_x_t):
            h_prev, c_prev = carry
            a = a_x_t + h_prev @ w_h
            i = jax.nn.sigmoid(a[:, :n])
            f = jax.nn.sigmoid(a[:, n : 2 * n])
            g = jnp.tanh(a[:, 2 * n : 3 * n])
            o = jax.nn.sigmoid(a[:, 3 * n :])
            c = f * c_prev + i * g
            tanh_c = jnp.tanh(c)
            h = o * tanh_c
            return (h, c), (h, {"c": c, "tanh_c": tanh_c, "i": i, "f": f, "g": g, "o": o})

        zeros = jnp.zeros((a_x.shape[1], hidden), _dtype(a_x, w_h))
        _, (hs, residuals) = lax.scan(step, (zeros, zeros), a_x, reverse=reverse)
        return hs, residuals

    def scan_backward(params, cache, dys, h_prev):
        w_h = params["w_h"]
        c_prev = _previous(cache["c"], reverse)

        def step(carry, inputs):
            dh_next, dc_next = carry
            dy_t, c_prev_t, tanh_c, i, f, g, o = inputs
            dh = dy_t + dh_next
            do = dh * tanh_c * o * (1 - o)
            dc = dc_next + dh * o * (1 - tanh_c * tanh_c)
            di = dc * g * i * (1 - i)
            df = dc * c_prev_t * f * (1 - f)
            dg = dc * i * (1 - g * g)
            da = jnp.concatenate([di, df, dg, do], axis=1)
            dh_prev = (da @ w_h.T).astype(dh_next.dtype)
            return (dh_prev, (dc * f).astype(dc_next.dtype)), da

        names = ("tanh_c", "i", "f", "g", "o")
        inputs = (dys, c_prev, *(cache[k] for k in names))
        zeros = jnp.zeros(dys.shape[1:], _dtype(dys, inputs, w_h))
        _, da = lax.scan(step, (zeros, zeros), inputs, reverse=not reverse)
        return da, da, {}

    return _recurrent_layer(
        kind,
        hidden,
        4,
        reverse,
        w_x_init,
        w_h_init,
        b_init,
        dtype,
        {},
        scan_forward,
        scan_backward,
    )


# --------------------------------------------------------------------------- bidirectional


def bidirectional(forward_layer: Layer, backward_layer: Layer) -> Layer:
    """Run two sequence layers on the same input and concatenate their features.

    ``y = [f(x), g(x)]`` on the last axis, where ``f`` usually reads left to
    right and ``g`` right to left::

        nn.bidirectional(nn.gru(6), nn.gru(6, reverse=True))   # = nn.gru(6, bidirectional=True)

    Backward splits ``dy`` at the first layer's width and sums the two paths:
    ``dx = f.backward(dy_f) + g.backward(dy_g)``. Params (and caches) are the
    tuple of the two layers'; a ``key`` is split in two.

    Args:
      forward_layer: the layer whose features come first.
      backward_layer: the layer whose features come second.

    Returns:
      A ``Layer`` mapping ``(batch, time, n_in)`` to ``(batch, time, h_f + h_g)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.bidirectional(nn.lstm(4), nn.gru(3, reverse=True))
      >>> params, shape = layer.init(jax.random.key(0), (7, 2))
      >>> shape
      (7, 7)
    """
    for what, layer in (("forward_layer", forward_layer), ("backward_layer", backward_layer)):
        if not isinstance(layer, Layer):
            raise ConfigError(
                "bidirectional",
                f"{what} is a {type(layer).__name__}, not a Layer; "
                "did you forget to call it, e.g. nn.gru(6) rather than nn.gru?",
            )
    return _bidirectional(forward_layer, backward_layer)


def _bidirectional(first: Layer, second: Layer) -> Layer:
    name = f"bidirectional({first.name}, {second.name})"

    def init(key, input_shape):
        k_first, k_second = jax.random.split(key)
        with at_layer(0):
            p_first, shape_first = first.init(k_first, input_shape)
        with at_layer(1):
            p_second, shape_second = second.init(k_second, input_shape)
        if len(shape_first) < 1 or tuple(shape_first[:-1]) != tuple(shape_second[:-1]):
            raise ShapeError(
                name,
                f"the two directions must agree on all but the last axis, got "
                f"{tuple(shape_first)} and {tuple(shape_second)}",
            )
        return (p_first, p_second), (*shape_first[:-1], shape_first[-1] + shape_second[-1])

    def forward(params, x, *, key=None, train=False):
        if not isinstance(params, tuple | list) or len(params) != 2:
            raise ShapeError(
                name,
                "expected params as a tuple of 2 entries (one per direction), got "
                f"{type(params).__name__}; are these params from another model?",
            )
        keys = jax.random.split(key) if key is not None else (None, None)
        with at_layer(0):
            y_first, c_first = first.forward(params[0], x, key=keys[0], train=train)
        with at_layer(1):
            y_second, c_second = second.forward(params[1], x, key=keys[1], train=train)
        if y_first.shape[:-1] != y_second.shape[:-1]:
            raise ShapeError(
                name,
                "the two directions must agree on all but the last axis, got "
                f"{y_first.shape} and {y_second.shape}",
            )
        # A zero-size array carries the first layer's width (a static shape) to backward.
        split = jnp.zeros((0, y_first.shape[-1]), y_first.dtype)
        y = jnp.concatenate([y_first, y_second.astype(y_first.dtype)], axis=-1)
        return y, (c_first, c_second, split)

    def backward(params, cache, dy):
        c_first, c_second, split = cache
        width = split.shape[-1]
        dp_first, dx_first = first.backward(params[0], c_first, dy[..., :width])
        dp_second, dx_second = second.backward(params[1], c_second, dy[..., width:])
        return (dp_first, dp_second), dx_first + dx_second

    return Layer(
        init,
        forward,
        backward,
        name=name,
        children=(first, second),
        structure=Structure(
            rebuild=_bidirectional,
            param_paths=((0,), (1,)),
            cache_paths=((0,), (1,)),
            label="in bidirectional",
        ),
    )


# --------------------------------------------------------------------------- time pooling


def _pooling_layer(name: str, forward_rule: Callable, backward_rule: Callable) -> Layer:
    """A parameter-free ``(batch, time, features) -> (batch, features)`` layer."""

    def init(key, input_shape):
        del key
        time, features = check_sequence_shape(name, input_shape)
        if time < 1:
            raise ShapeError(name, f"needs at least one time step, got input_shape {input_shape}")
        return {}, (features,)

    def forward(params, x, *, key=None, train=False):
        del key, train
        check_no_params(name, params)
        check_sequence(name, x)
        if x.shape[1] < 1:
            raise ShapeError(name, f"needs at least one time step, got input of shape {x.shape}")
        return forward_rule(x)

    def backward(params, cache, dy):
        return {}, backward_rule(cache, dy)

    return Layer(init, forward, backward, name=name)


def last_step() -> Layer:
    """The last time step: ``y = x[:, −1, :]``, ``(batch, time, f) -> (batch, f)``.

    Backward puts ``dy`` at the last step and zeros elsewhere:
    ``dx[:, t] = dy`` if ``t = T − 1``, else ``0``.

    After a recurrent layer this is the state that has read the whole
    sequence — except for ``reverse=True``, whose final state sits at
    ``t = 0`` (and a bidirectional layer's second half likewise); there,
    :func:`mean_over_time`, :func:`max_over_time` or ``flatten`` read both ends.

    Cache: a zero-size array of shape ``(0, time, features)`` carrying the
    input's shape and dtype through jit while holding no data.

    Example:
      >>> import jax.numpy as jnp
      >>> from fbp import nn
      >>> nn.last_step().apply({}, jnp.arange(6.0).reshape(1, 3, 2))
      Array([[4., 5.]], dtype=float32)
    """

    def forward(x):
        return x[:, -1, :], jnp.zeros((0, *x.shape[1:]), x.dtype)

    def backward(shape_carrier, dy):
        time, features = shape_carrier.shape[1:]
        dx = jnp.zeros((dy.shape[0], time, features), shape_carrier.dtype)
        return dx.at[:, -1, :].set(dy.astype(dx.dtype))

    return _pooling_layer("last_step", forward, backward)


def mean_over_time() -> Layer:
    """The average over time: ``y = (1/T) Σ_t x[:, t, :]``.

    Backward spreads ``dy`` evenly: ``dx[:, t] = dy / T`` for every ``t``.

    Cache: a zero-size array of shape ``(0, time, features)`` carrying the
    input's shape and dtype (``T`` is all the backward needs).

    Example:
      >>> import jax.numpy as jnp
      >>> from fbp import nn
      >>> nn.mean_over_time().apply({}, jnp.arange(6.0).reshape(1, 3, 2))
      Array([[2., 3.]], dtype=float32)
    """

    def forward(x):
        return x.mean(axis=1), jnp.zeros((0, *x.shape[1:]), x.dtype)

    def backward(shape_carrier, dy):
        time, features = shape_carrier.shape[1:]
        dx = (dy / time).astype(shape_carrier.dtype)[:, None, :]
        return jnp.broadcast_to(dx, (dy.shape[0], time, features))

    return _pooling_layer("mean_over_time", forward, backward)


def max_over_time() -> Layer:
    """The maximum over time: ``y = max_t x[:, t, :]``, per example and feature.

    Backward routes ``dy`` to where the maximum was taken:
    ``dx[:, t] = dy ⊙ m_t / Σ_s m_s`` with ``m_t = [x[:, t] = y]``. Ties share
    ``dy`` equally, as ``jax.grad`` of ``jnp.max`` does (any split is a valid
    subgradient; this one matches the reference exactly).

    Cache: the boolean mask ``m`` (one byte per element); the count is a sum
    over it.

    Example:
      >>> import jax.numpy as jnp
      >>> from fbp import nn
      >>> nn.max_over_time().apply({}, jnp.array([[[1.0, 5.0], [3.0, 2.0]]]))
      Array([[3., 5.]], dtype=float32)
    """

    def forward(x):
        y = x.max(axis=1)
        return y, x == y[:, None, :]

    def backward(mask, dy):
        count = mask.sum(axis=1).astype(dy.dtype)
        share = (dy / count)[:, None, :]
        return jnp.where(mask, jnp.broadcast_to(share, mask.shape), 0).astype(dy.dtype)

    return _pooling_layer("max_over_time", forward, backward)
