"""fbp.verify must catch every wrong rule, pin it to its layer, and never cry wolf."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import losses, nn, verify

WRONG_RULES = verify.wrong_rules()


def test_the_catalogue_has_the_classic_mistakes():
    names = {rule.name for rule in WRONG_RULES}
    assert len(WRONG_RULES) >= 12
    assert {
        "flipped_sign",
        "missing_transpose",
        "forgotten_bias",
        "sigmoid_wrong_cache",
        "factor_of_two",
        "missing_batch_mean",
        "softmax_wrong_axis",
        "inverted_relu_mask",
        "first_example_only",
        "zero_dx",
        "error_only_in_dx",
        "single_element",
    } <= names


@pytest.mark.parametrize("rule", WRONG_RULES, ids=lambda r: r.name)
def test_every_wrong_rule_is_caught_and_localised(rule):
    model, loss, params, x, y = rule.build()
    report = verify.check_model(model, loss, params, x, y)
    assert not report.ok
    culprit = report.culprit
    if rule.layer is None:
        expected_layer = f"loss ({loss.name})"
        assert culprit.layer == expected_layer
    else:
        index = ".".join(map(str, rule.layer))
        expected_layer = f"layer {index} ("
        assert culprit.layer.startswith(expected_layer), culprit
    assert culprit.leaf == rule.leaf, culprit
    # Every layer closer to the loss than the culprit passes its exact check.
    checked = [r for r in report.rows if r.method == "vjp"]
    first_failure = next(i for i, r in enumerate(checked) if not r.passed)
    assert all(r.passed for r in checked[:first_failure])
    with pytest.raises(
        verify.GradientCheckError, match=rf"^{re.escape(expected_layer)}.*leaf '{rule.leaf}'"
    ):
        report.raise_if_failed()


def test_the_wrong_rules_would_fool_a_float32_check_but_not_fbp():
    # The single-element error is a millionth of the leaf's scale: below float32's
    # resolution of a gradient, far above float64's agreement of two exact rules.
    rule = next(r for r in WRONG_RULES if r.name == "single_element")
    model, loss, params, x, y = rule.build()
    report = verify.check_model(model, loss, params, x, y)
    row = report.culprit
    assert row.index == (3, 5)
    assert 1e-7 < row.max_rel_err < 1e-5


ACTIVATIONS = [
    nn.identity,
    nn.sigmoid,
    nn.tanh,
    nn.relu,
    nn.leaky_relu,
    nn.elu,
    nn.gelu,
    lambda: nn.gelu(approximate=False),
    nn.softplus,
]
LOSSES = ["mse", "softmax_cross_entropy", "softmax_one_hot", "sigmoid_binary_cross_entropy"]


def _random_case(seed):
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(1, 4))
    layers = []
    for _ in range(depth - 1):
        layers += [
            nn.dense(int(rng.integers(1, 9))),
            ACTIVATIONS[int(rng.integers(len(ACTIVATIONS)))](),
        ]
    loss_name = LOSSES[seed % len(LOSSES)]
    out = int(rng.integers(2, 5))
    model = nn.serial(*layers, nn.dense(out))
    n_in, batch = int(rng.integers(1, 7)), int(rng.integers(1, 9))
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params, _ = model.init(k1, (n_in,))
    x = jax.random.normal(k2, (batch, n_in))
    if loss_name == "mse":
        loss, y = losses.mse, jax.random.normal(k3, (batch, out))
    elif loss_name == "softmax_cross_entropy":
        loss, y = losses.softmax_cross_entropy, jax.random.randint(k3, (batch,), 0, out)
    elif loss_name == "softmax_one_hot":
        loss = losses.softmax_cross_entropy
        y = jax.nn.one_hot(jax.random.randint(k3, (batch,), 0, out), out)
    else:
        loss = losses.sigmoid_binary_cross_entropy
        y = jax.random.bernoulli(k3, 0.5, (batch, out)).astype(jnp.float32)
    return model, loss, params, x, y


def test_no_false_alarm_on_100_random_correct_models():
    activations_seen, losses_seen = set(), set()
    for seed in range(100):
        model, loss, params, x, y = _random_case(seed)
        report = verify.check_model(model, loss, params, x, y, directions=2, coordinates=3)
        assert report.ok, f"seed {seed}:\n{report}"
        activations_seen |= {c.name for c in model.children[1::2]}
        losses_seen.add(loss.name)
    assert len(activations_seen) == len(ACTIVATIONS)
    assert len(losses_seen) == 3


def test_relu_network_with_inputs_on_the_kink_passes_and_reports_skipped_probes():
    # f(w) = Σ relu(w): at w = 0 a central difference straddles the kink.
    w = jnp.array([-1.0, 0.0, 0.0, 2.0, 0.0, 3.0])

    def f(w):
        return jnp.sum(jax.nn.relu(w) * jnp.arange(1.0, 7.0))

    def grad_f(w):
        return jnp.where(w > 0, jnp.arange(1.0, 7.0), 0.0)

    report = verify.check_grad(f, grad_f, w, coordinates=6, directions=0)
    assert report.ok, report
    coords = next(r for r in report.rows if r.method == "fd-coordinates")
    assert coords.skipped == 3 and coords.probes == 3


def test_check_grad_catches_a_wrong_gradient_function():
    def f(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    def grad_right(w, x):
        t = jnp.tanh(x @ w)
        return x.T @ (2 * t * (1 - t**2))

    def grad_wrong(w, x):
        return grad_right(w, x) * 1.001

    w = jax.random.normal(jax.random.key(0), (3, 2))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    assert verify.check_grad(f, grad_right, w, x).ok
    bad = verify.check_grad(f, grad_wrong, w, x)
    assert not bad.ok
    assert {r.method for r in bad.failures} >= {"vjp", "fd-directions"}


@pytest.mark.parametrize(
    "layer",
    [
        nn.dense(5),
        nn.dense(3, use_bias=False),
        nn.sigmoid(),
        nn.tanh(),
        nn.relu(),
        nn.leaky_relu(),
        nn.elu(),
        nn.gelu(),
        nn.softplus(),
        nn.identity(),
        nn.flatten(),
        nn.serial(nn.dense(4), nn.tanh(), nn.dense(2)),
        nn.residual(nn.serial(nn.dense(4), nn.sigmoid())),
    ],
    ids=lambda layer: layer.name,
)
def test_check_layer_passes_every_builtin_layer(layer):
    report = verify.check_layer(layer, jax.random.key(0), (4,), batch_size=3)
    assert report.ok, report
    methods = {r.method for r in report.rows}
    assert {"vjp", "fd-directions", "fd-coordinates"} <= methods


def test_check_layer_catches_an_error_only_in_dx():
    layer = nn.dense(3)
    bad = layer._replace(
        backward=lambda p, c, dy: (layer.backward(p, c, dy)[0], 0.5 * layer.backward(p, c, dy)[1])
    )
    report = verify.check_layer(bad, jax.random.key(0), (4,))
    failing = {(r.leaf, r.method) for r in report.failures}
    assert ("dx", "vjp") in failing
    assert ("w", "vjp") not in failing and ("b", "vjp") not in failing


def test_check_layer_reports_a_gradient_of_the_wrong_structure_or_dtype():
    layer = nn.dense(3)

    def missing_bias(p, c, dy):
        d, dx = layer.backward(p, c, dy)
        return {"w": d["w"]}, dx

    report = verify.check_layer(layer._replace(backward=missing_bias), jax.random.key(0), (2,))
    assert not report.ok and report.culprit.method == "structure"

    def wrong_dtype(p, c, dy):
        d, dx = layer.backward(p, c, dy)
        return {"w": d["w"].astype(jnp.float16), "b": d["b"]}, dx

    report = verify.check_layer(layer._replace(backward=wrong_dtype), jax.random.key(0), (2,))
    assert not report.ok
    assert "float16" in report.culprit.message


def test_report_renders_as_table_and_html():
    rule = WRONG_RULES[0]
    report = verify.check_model(*rule.build())
    text = str(report)
    assert "FAILED" in text and "layer 0 (dense(→8))" in text and "vjp" in text
    page = report._repr_html_()
    assert page.startswith("<p><b>") and "<table>" in page and "FAIL" in page


def test_coordinate_probes_depend_only_on_the_leaf_path():
    from fbp.verify import _coordinate_sample

    a = _coordinate_sample("0.w", 1000, 8)
    assert np.array_equal(a, _coordinate_sample("0.w", 1000, 8))  # reproducible
    assert not np.array_equal(a, _coordinate_sample("2.w", 1000, 8))  # per leaf
    assert len(set(a)) == 8 and a.max() < 1000
    # And a report's worst coordinate always lies among its leaf's probes.
    model = nn.serial(nn.dense(5), nn.tanh(), nn.dense(2))
    params, _ = model.init(jax.random.key(2), (6,))
    x = jax.random.normal(jax.random.key(0), (4, 6))
    y = jax.random.normal(jax.random.key(1), (4, 2))
    report = verify.check_model(model, losses.mse, params, x, y, coordinates=3)
    row = next(r for r in report.rows if r.method == "fd-coordinates" and r.leaf == "0.w")
    flat = np.ravel_multi_index(row.index, (6, 5))
    assert flat in _coordinate_sample("0.w", 30, 3)


def test_the_check_runs_in_float64_whatever_the_model_dtype():
    model = nn.serial(nn.dense(4, dtype=jnp.bfloat16), nn.tanh(), nn.dense(2, dtype=jnp.bfloat16))
    params, _ = model.init(jax.random.key(0), (3,))
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.bfloat16)
    y = jax.random.normal(jax.random.key(2), (5, 2), jnp.bfloat16)
    report = verify.check_model(model, losses.mse, params, x, y)
    assert report.ok, report
    assert not jax.config.jax_enable_x64  # scoped: x64 is off again afterwards
