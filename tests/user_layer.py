"""A layer written by a user: a gated linear unit, with the three functions alone.

This is the example README's "Write your own layer" shows. It uses nothing but
the public contract — ``nn.Layer(init, forward, backward, name=...)``, no
``nn.Extensions`` — so every tool in fbp reaches it through its generic
fallbacks: ``verify`` checks it, every credit-assignment rule swaps its two
weight matrices (every floating-point param with two or more axes counts as a
weight), and per-example gradient norms run its own forward and backward on
one example at a time. ``tests/test_user_layer.py`` holds it to all of that.

The layer (Dauphin et al., 2017, "Language Modeling with Gated Convolutional
Networks", with a dense projection) on inputs ``x`` of shape ``(batch, n_in)``::

    a = x·W + b            g = x·W_gate + b_gate            s = σ(g)
    y = a ⊙ s

Backward, from ``dy = ∂L/∂y``::

    da = dy ⊙ s            dg = dy ⊙ a ⊙ s(1 − s)
    dW = xᵀ·da             dW_gate = xᵀ·dg
    db = Σ_batch da        db_gate = Σ_batch dg
    dx = da·Wᵀ + dg·W_gateᵀ

Cache: ``x`` (for both weight gradients), ``a`` and ``s`` (the gate's
derivative is ``s(1 − s)``, read from ``s`` as for a sigmoid).
"""

import jax
import jax.numpy as jnp

from fbp import nn


def gated_linear(features: int) -> nn.Layer:
    """``y = (x·W + b) ⊙ σ(x·W_gate + b_gate)`` on ``(batch, n_in)`` inputs."""

    def init(key, input_shape):
        (n_in,) = input_shape
        k_w, k_gate = jax.random.split(key)
        normal = jax.nn.initializers.lecun_normal()
        params = {
            "w": normal(k_w, (n_in, features)),
            "b": jnp.zeros((features,)),
            "w_gate": normal(k_gate, (n_in, features)),
            "b_gate": jnp.zeros((features,)),
        }
        return params, (features,)

    def forward(params, x, *, key=None, train=False):
        a = x @ params["w"] + params["b"][None, :]
        s = jax.nn.sigmoid(x @ params["w_gate"] + params["b_gate"][None, :])
        return a * s, (x, a, s)

    def backward(params, cache, dy):
        x, a, s = cache
        da = dy * s
        dg = dy * a * s * (1 - s)
        dparams = {"w": x.T @ da, "b": da.sum(0), "w_gate": x.T @ dg, "b_gate": dg.sum(0)}
        dx = da @ params["w"].T + dg @ params["w_gate"].T
        return dparams, dx

    return nn.Layer(init, forward, backward, name=f"gated_linear(→{features})")
