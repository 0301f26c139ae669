"""Multi-head scaled dot-product self-attention, with its backward derived by hand.

Over a sequence ``x`` of shape ``(batch, time, n_in)`` (channels-last, like
:mod:`fbp.nn.recurrent`), every position attends to every position (or, with
``causal=True``, to itself and the positions before it). The backward is four
matmul rules and one softmax rule, applied without ever forming the softmax's
``(time × time)``-per-row Jacobian.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fbp.errors import ConfigError
from fbp.nn.core import (
    Extensions,
    Initializer,
    Layer,
    check_positive_int,
    check_sequence,
    check_sequence_shape,
)
from fbp.nn.dense import ones_rows, per_example_outer_grads, per_example_outer_sq_norms
from fbp.nn.recurrent import _check_params

__all__ = ["self_attention"]


def self_attention(
    heads: int,
    features: int,
    *,
    causal: bool = False,
    use_bias: bool = True,
    w_init: Initializer | None = None,
    o_init: Initializer | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Layer:
    """Multi-head self-attention (Vaswani et al. 2017): ``(batch, T, n_in) -> (batch, T, F)``.

    With ``F = features`` and ``H = heads`` heads of width ``D = F / H``::

        [Q | K | V] = x·W_qkv + b_qkv     each (batch, T, features), split into H heads
        S_h = Q_h·K_hᵀ / √D               (batch, H, T, T); causal: S_ij = −∞ for j > i
        P_h = softmax(S_h)                over the last axis (the keys)
        O_h = P_h·V_h                     heads concatenated back to (batch, T, features)
        y   = O·W_o + b_o

    Params ``{"w_qkv": (n_in, 3·features), "b_qkv": (3·features,),
    "w_o": (features, features), "b_o": (features,)}`` (no ``b_…`` with
    ``use_bias=False``): the query, key and
    value projections side by side (in that order) so they are one matmul;
    within each, head ``h`` owns columns ``h·D … (h+1)·D − 1``. For a
    residual block, ``features`` equals ``n_in``.

    Backward, from ``dy``::

        dW_o = Oᵀ·dy      db_o = Σ dy      dO = dy·W_oᵀ
        dV_h = P_hᵀ·dO_h                     dP_h = dO_h·V_hᵀ
        dS_h = P_h ⊙ (dP_h − Σ_j dP_h ⊙ P_h)     the softmax's Jacobian, applied row by row
        dQ_h = dS_h·K_h / √D                 dK_h = dS_hᵀ·Q_h / √D
        dW_qkv = xᵀ·dA     db_qkv = Σ dA     dx = dA·W_qkvᵀ        with dA = [dQ | dK | dV]

    The softmax rule never forms the Jacobian ``diag(p) − p·pᵀ`` of each row;
    and its row sums come cheaper still: ``Σ_j dP_ij P_ij = Σ_j (dO_i·v_j) P_ij
    = dO_i·O_i``, a dot product of two cached ``D``-vectors per row rather
    than a sum over ``T`` keys (the identity FlashAttention uses). Masked
    entries have ``P = 0``, so their ``dS`` is zero with no mask in backward.

    Per-example gradients (for :mod:`fbp.diagnostics` and DP-SGD) come from the
    same ``dA`` and ``dy``: both projections are dense layers shared over the
    positions, so example ``n``'s ``dW_qkv,n = Σ_t x_nt·dA_ntᵀ`` and
    ``dW_o,n = Σ_t O_nt·dy_ntᵀ`` — the dense rule over a sequence.

    Cache: ``x`` (for ``dW_qkv``), ``Q, K, V`` (for ``dP``, ``dQ``, ``dK``),
    ``P`` (for ``dV`` and the softmax rule) and ``O`` (for ``dW_o`` and the
    row sums). ``P`` is ``(batch, H, T, T)``: for long sequences it dominates,
    and a memory-lean variant would recompute it from ``Q, K`` instead.

    Args:
      heads: number of heads ``H``; must divide ``features``.
      features: width of the queries, keys, values and the output.
      causal: mask future positions (position ``i`` attends to ``j ≤ i``).
      use_bias: whether the projections add biases; without them params are
        ``{"w_qkv", "w_o"}`` only (nanoGPT's ``bias=False``).
      w_init: initializer ``(key, shape, dtype)`` for each projection's
        weight block; LeCun normal by default. Biases start at zero.
      o_init: initializer for the output projection ``W_o``; ``w_init`` by
        default. GPT-2 scales the projections that write into the residual
        stream: ``jax.nn.initializers.normal(0.02 / √(2·layers))``.
      dtype: dtype of the parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> block = nn.residual(nn.self_attention(4, 16, causal=True))
      >>> params, shape = block.init(jax.random.key(0), (10, 16))
      >>> shape
      (10, 16)
      >>> y, cache = block.forward(params, jnp.ones((2, 10, 16)))
      >>> dparams, dx = block.backward(params, cache, jnp.ones_like(y))
      >>> dparams["w_qkv"].shape, dx.shape
      ((16, 48), (2, 10, 16))
    """
    check_positive_int("self_attention", "heads", heads)
    check_positive_int("self_attention", "features", features)
    name = f"self_attention(heads={heads}, features={features}{', causal' if causal else ''})"
    if features % heads:
        raise ConfigError(
            name,
            f"heads must divide features, but {features} is not a multiple of {heads}; "
            f"try heads={_nearest_divisor(features, heads)}",
        )
    head_width = features // heads
    scale = 1.0 / math.sqrt(head_width)
    w_init = w_init or jax.nn.initializers.lecun_normal()
    o_init = o_init or w_init
    shapes = {"w_qkv": (None, 3 * features), "w_o": (features, features)}
    if use_bias:
        shapes |= {"b_qkv": (3 * features,), "b_o": (features,)}

    def init(key, input_shape):
        time, n_in = check_sequence_shape(name, input_shape)
        k_q, k_k, k_v, k_o = jax.random.split(key, 4)
        w_qkv = [w_init(k, (n_in, features), dtype) for k in (k_q, k_k, k_v)]
        params = {
            "w_qkv": jnp.concatenate(w_qkv, axis=1),
            "b_qkv": jnp.zeros((3 * features,), dtype),
            "w_o": o_init(k_o, (features, features), dtype),
            "b_o": jnp.zeros((features,), dtype),
        }
        return {k: v for k, v in params.items() if k in shapes}, (time, features)

    def forward(params, x, *, key=None, train=False):
        del key, train
        _check_params(name, params, shapes)
        check_sequence(name, x, params["w_qkv"].shape[0])
        batch, time, _ = x.shape
        qkv = jnp.einsum("btf,fg->btg", x, params["w_qkv"])  # A = x·W_qkv = [Q | K | V]
        if use_bias:
            qkv = qkv + params["b_qkv"][None, None, :]
        qkv = qkv.reshape(batch, time, 3, heads, head_width)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale  # S = Q·Kᵀ/√D, per head
        if causal:
            allowed = jnp.tril(jnp.ones((time, time), bool))[None, None, :, :]
            s = jnp.where(allowed, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(batch, time, features)  # O = P·V
        y = jnp.einsum("btf,fg->btg", o, params["w_o"])  # y = O·W_o
        if use_bias:
            y = y + params["b_o"][None, None, :]
        return y, {"x": x, "qkv": qkv, "p": p, "o": o}

    def qkv_deltas(params, cache, dy):
        """``dA = [dQ | dK | dV]``, the error at the fused projection's output (batch, T, 3F)."""
        qkv, p, o = cache["qkv"], cache["p"], cache["o"]
        batch, time, _ = o.shape
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # Through the output projection: dO = dy·W_oᵀ.
        do = jnp.einsum("btg,fg->btf", dy, params["w_o"])  # dO = dy·W_oᵀ
        # O = P·V.
        do_heads = do.reshape(batch, time, heads, head_width)
        dv = jnp.einsum("bhqk,bqhd->bkhd", p, do_heads)  # dV = Pᵀ·dO
        dp = jnp.einsum("bqhd,bkhd->bhqk", do_heads, v)  # dP = dO·Vᵀ
        # Softmax: dS = P ⊙ (dP − Σ_j dP ⊙ P), with Σ_j dP_ij P_ij = dO_i·O_i.
        row_sums = (do_heads * o.reshape(do_heads.shape)).sum(axis=-1)  # (batch, T, H)
        ds = p * (dp - row_sums.transpose(0, 2, 1)[:, :, :, None])
        # S = Q·Kᵀ/√D.
        dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k) * scale  # dQ = dS·K/√D
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q) * scale  # dK = dSᵀ·Q/√D
        return jnp.stack([dq, dk, dv], axis=2).reshape(batch, time, 3 * features)

    def gradients(params, cache, dy, dqkv):
        """The two dense rules: the output projection on ``O``, the fused one on ``x``."""
        x, o = cache["x"], cache["o"]
        grads = {
            "w_o": jnp.einsum("btf,btg->fg", o, dy),  # dW_o = Oᵀ·dy
            "b_o": dy.sum(axis=(0, 1)),
            "w_qkv": jnp.einsum("btf,btg->fg", x, dqkv),  # dW_qkv = xᵀ·dA
            "b_qkv": dqkv.sum(axis=(0, 1)),
        }
        dx = jnp.einsum("btg,fg->btf", dqkv, params["w_qkv"])  # dx = dA·W_qkvᵀ
        dparams = {key: grads[key].astype(params[key].dtype) for key in params}
        return dparams, dx.astype(x.dtype)

    def backward(params, cache, dy):
        return gradients(params, cache, dy, qkv_deltas(params, cache, dy))

    # Per-example gradients. Both projections are dense layers shared over the
    # positions, so example n's gradient sums its own positions, from the same
    # deltas as the backward:
    #   dW_o,n = Σ_t o_nt·dy_ntᵀ     db_o,n = Σ_t dy_nt
    #   dW_qkv,n = Σ_t x_nt·dA_ntᵀ   db_qkv,n = Σ_t dA_nt
    # (the attention core has no params, and examples never attend to each other).

    def batch_l2(params, cache, dy):
        dqkv = qkv_deltas(params, cache, dy)
        dparams, dx = gradients(params, cache, dy, dqkv)
        sq_w_o, sq_b_o = per_example_outer_sq_norms(cache["o"], dy)
        sq_w_qkv, sq_b_qkv = per_example_outer_sq_norms(cache["x"], dqkv)
        sq = {"w_qkv": sq_w_qkv, "b_qkv": sq_b_qkv, "w_o": sq_w_o, "b_o": sq_b_o}
        return dparams, dx, {key: sq[key] for key in params}

    def batch_grad(params, cache, dy):
        dqkv = qkv_deltas(params, cache, dy)
        dparams, dx = gradients(params, cache, dy, dqkv)
        g_w_o, g_b_o = per_example_outer_grads(cache["o"], dy)
        g_w_qkv, g_b_qkv = per_example_outer_grads(cache["x"], dqkv)
        g = {"w_qkv": g_w_qkv, "b_qkv": g_b_qkv, "w_o": g_w_o, "b_o": g_b_o}
        return dparams, dx, {key: g[key].astype(params[key].dtype) for key in params}

    def outer_factors(params, cache, dy):
        # The two dense rules as pairs over positions: (O, dy) for W_o, (x, dA) for W_qkv.
        dqkv = qkv_deltas(params, cache, dy)
        dparams, dx = gradients(params, cache, dy, dqkv)
        factors = {
            "w_qkv": (cache["x"], dqkv),
            "b_qkv": (ones_rows(dqkv), dqkv),
            "w_o": (cache["o"], dy),
            "b_o": (ones_rows(dy), dy),
        }
        return dparams, dx, {key: factors[key] for key in params}

    extensions = Extensions(
        weights=("w_qkv", "w_o"),
        batch_l2=batch_l2,
        batch_grad=batch_grad,
        outer_factors=outer_factors,
    )
    return Layer(init, forward, backward, name=name, extensions=extensions)


def _nearest_divisor(features: int, heads: int) -> int:
    """The divisor of ``features`` closest to ``heads`` (the smaller on a tie)."""
    divisors = [d for d in range(1, features + 1) if features % d == 0]
    return min(divisors, key=lambda d: (abs(d - heads), d))
