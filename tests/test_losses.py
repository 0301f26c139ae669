"""fbp.losses against optax's values and jax.grad of optax's losses."""

import jax
import numpy as np
import optax
import pytest

from fbp import losses


def _cases(seed, batch, classes, dtype):
    """Logits, labels, probabilities and binary targets, drawn with numpy.

    (Eager ``jax.random`` would compile a program for every shape.)
    """
    rng = np.random.default_rng(seed)
    logits = 5 * rng.standard_normal((batch, classes))
    labels = rng.integers(0, classes, batch)
    z = rng.standard_normal((batch, classes))
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    binary = rng.random((batch, classes)) < 0.4
    return (  # device_put of numpy casts: no conversion program per shape (jnp.asarray's)
        jax.device_put(np.asarray(logits, dtype)),
        jax.device_put(np.asarray(labels, np.int32)),
        jax.device_put(np.asarray(probs, dtype)),
        jax.device_put(np.asarray(binary, dtype)),
    )


# (fbp loss, optax reference averaged the same way, which target to use)
REFERENCES = [
    ("mse", losses.mse, lambda p, t: optax.losses.squared_error(p, t).mean(), "probs"),
    (
        "sce_labels",
        losses.softmax_cross_entropy,
        lambda p, t: optax.losses.softmax_cross_entropy_with_integer_labels(p, t).mean(),
        "labels",
    ),
    (
        "sce_onehot",
        losses.softmax_cross_entropy,
        lambda p, t: optax.losses.softmax_cross_entropy(p, t).mean(),
        "onehot",
    ),
    (
        "sce_probs",
        losses.softmax_cross_entropy,
        lambda p, t: optax.losses.softmax_cross_entropy(p, t).mean(),
        "probs",
    ),
    (
        "bce",
        losses.sigmoid_binary_cross_entropy,
        lambda p, t: optax.losses.sigmoid_binary_cross_entropy(p, t).mean(),
        "binary",
    ),
]


SHAPES = [(1, 2), (7, 3), (33, 10)]
# The inner loop runs every loss at one shape (each case costs compile time);
# the slow sweep the two others, batch 1 and ten classes among them.
FAST_SHAPES = [(7, 3)]


def _all_cases(dtype, shapes):
    """Every (loss, shape): fbp's value and grad in one jitted program, optax's in another."""

    # The inputs are made eagerly and passed in: XLA may not fuse their making into the losses.
    inputs = {}
    for seed, (batch, classes) in enumerate(SHAPES):
        if (batch, classes) not in shapes:
            continue
        logits, labels, probs, binary = _cases(seed, batch, classes, dtype)
        targets = {
            "labels": labels,
            "onehot": jax.device_put(np.asarray(np.eye(classes)[np.asarray(labels)], dtype)),
            "probs": probs,
            "binary": binary,
        }
        for name, _, _, target in REFERENCES:
            inputs[f"{name}-{batch}x{classes}"] = (logits, targets[target])
    fbp_losses = {name: loss for name, loss, _, _ in REFERENCES}

    @jax.jit
    def run(inputs):
        return {
            case: (
                logits,
                t,
                fbp_losses[case.rsplit("-", 1)[0]].value(logits, t),
                fbp_losses[case.rsplit("-", 1)[0]].grad(logits, t),
            )
            for case, (logits, t) in inputs.items()
        }

    # The reference is a program of its own (eagerly, op by op, it compiled 140
    # small programs per dtype): nothing of fbp's losses is traced into it.
    by_name = {name: reference for name, _, reference, _ in REFERENCES}

    @jax.jit
    def run_references(inputs):
        return {
            case: jax.value_and_grad(by_name[case.rsplit("-", 1)[0]])(logits, t)
            for case, (logits, t) in inputs.items()
        }

    references = run_references(inputs)
    results = {}
    for case, (logits, _, value, grad) in run(inputs).items():
        value_ref, grad_ref = references[case]
        results[case] = (logits, value, grad, value_ref, grad_ref)
    return results


@pytest.mark.parametrize(
    "shapes",
    [
        pytest.param(FAST_SHAPES, id="fast"),
        pytest.param(
            [s for s in SHAPES if s not in FAST_SHAPES], id="others", marks=pytest.mark.slow
        ),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_value_and_grad_match_optax(dtype, shapes):
    with jax.enable_x64(dtype == "float64"):
        results = _all_cases(dtype, shapes)
    assert len(results) == len(REFERENCES) * len(shapes)
    failures = []
    for case, (logits, value, grad, value_ref, grad_ref) in results.items():
        rtol = 1e-12 if dtype == "float64" else 2e-6
        # Cross-entropy near 0 is lse(z) − z_label: a cancellation whose
        # rounding error scales with |z|, whichever way it is computed.
        eps = float(np.finfo(logits.dtype).eps)
        atol = 4 * eps * float(np.max(np.abs(np.asarray(logits))))
        try:
            assert logits.dtype == dtype, f"{case}: logits are {logits.dtype}"
            np.testing.assert_allclose(value, value_ref, rtol=rtol, atol=atol, err_msg=case)
            np.testing.assert_allclose(
                grad,
                grad_ref,
                rtol=rtol,
                atol=rtol * float(np.max(np.abs(np.asarray(grad_ref)))),
                err_msg=case,
            )
            assert grad.dtype == logits.dtype, f"{case}: grad is {grad.dtype}"
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, -1000.0, 0.0], [-1e4, 1e4, 3.0]], np.float32)
    labels = np.array([1, 1], np.int32)
    loss = losses.softmax_cross_entropy
    value, grad = jax.jit(lambda z, t: (loss.value(z, t), loss.grad(z, t)))(logits, labels)
    np.testing.assert_allclose(value, 1000.0, rtol=1e-6)  # (2000 + 0) / 2
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, [[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], atol=1e-7)


def test_sigmoid_bce_is_stable_for_huge_logits():
    logits = np.array([[500.0, -500.0]], np.float32)
    target = np.array([[0.0, 1.0]], np.float32)
    loss = losses.sigmoid_binary_cross_entropy
    value, grad = jax.jit(lambda z, t: (loss.value(z, t), loss.grad(z, t)))(logits, target)
    np.testing.assert_allclose(value, 500.0)
    np.testing.assert_allclose(grad, [[0.5, -0.5]], atol=1e-7)


def test_out_of_range_label_under_jit_gives_nan_not_a_silent_number():
    logits = np.zeros((2, 3), np.float32)
    value = jax.jit(losses.softmax_cross_entropy.value)(logits, np.array([0, 3], np.int32))
    assert np.isnan(value)
