"""The GPT of issue 15: sequence losses, positions, tied weights, the model, generation, data, CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fbp import losses

# --------------------------------------------------------------------------- sequence losses

SEQUENCE_SHAPES = [(3, 5, 7), (2, 1, 4), (4, 6, 3, 11)]


def test_sequence_softmax_cross_entropy_matches_optax_in_one_program():
    """(..., classes) logits, labels of the leading shape, with and without a mask, in float64."""
    with jax.enable_x64(True):
        cases = []
        for seed, shape in enumerate(SEQUENCE_SHAPES):
            k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
            logits = 4 * jax.random.normal(k1, shape, jnp.float64)
            labels = jax.random.randint(k2, shape[:-1], 0, shape[-1])
            mask = jax.random.bernoulli(k3, 0.6, shape[:-1]).at[(0,) * (len(shape) - 1)].set(True)
            cases.append((logits, labels, mask))

        def optax_loss(z, labels, mask):
            per = optax.losses.softmax_cross_entropy_with_integer_labels(z, labels)
            return jnp.sum(per * mask) / jnp.sum(mask)

        @jax.jit
        def run(cases):
            out = []
            for z, labels, mask in cases:
                padded = jnp.where(mask, labels, -1)  # masked labels may be padding
                ones = jnp.ones_like(mask)
                out.append(
                    (
                        losses.softmax_cross_entropy.value(z, labels),
                        losses.softmax_cross_entropy.grad(z, labels),
                        jax.value_and_grad(optax_loss)(z, labels, ones),
                        losses.softmax_cross_entropy.value(z, (padded, mask)),
                        losses.softmax_cross_entropy.grad(z, (padded, mask)),
                        jax.value_and_grad(optax_loss)(z, labels, mask),
                        losses.softmax_cross_entropy.grad(z, jax.nn.one_hot(labels, z.shape[-1])),
                    )
                )
            return out

        for v, g, (rv, rg), mv, mg, (rmv, rmg), g_onehot in run(cases):
            np.testing.assert_allclose(v, rv, rtol=1e-12)
            np.testing.assert_allclose(g, rg, rtol=1e-10, atol=1e-15)
            np.testing.assert_allclose(mv, rmv, rtol=1e-12)
            np.testing.assert_allclose(mg, rmg, rtol=1e-10, atol=1e-15)
            np.testing.assert_allclose(g_onehot, rg, rtol=1e-10, atol=1e-15)
            assert np.isfinite(mv)


def test_sequence_loss_errors_name_the_shapes():
    z = jnp.zeros((2, 3, 5))
    with pytest.raises(
        ValueError, match=r"softmax_cross_entropy: expected integer labels of shape \(2, 3\)"
    ):
        losses.softmax_cross_entropy.value(z, jnp.zeros((6,), int))
    with pytest.raises(ValueError, match=r"expected a mask of shape \(2, 3\)"):
        losses.softmax_cross_entropy.value(z, (jnp.zeros((2, 3), int), jnp.ones((2,))))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        losses.softmax_cross_entropy.value(z, jnp.full((2, 3), 5))
