"""fbp.verify must catch every wrong rule, pin it to its layer, and never cry wolf.

The references here are independent of fbp.verify: jax.grad of the same
forward (to confirm each catalogued rule really is wrong), bugs planted by
construction, and functions whose derivative is known in closed form.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import init_shapes, normal32, numpy_params

import fbp
from fbp import losses, nn, verify
from fbp.nn import catalogue
from fbp.nn.core import Layer

WRONG_RULES = verify.wrong_rules()

# The list of mistakes, by catalogue name.
REQUIRED = {
    "flipped_sign",
    "missing_transpose",
    "forgotten_bias",
    "sigmoid_wrong_cache",  # σ'(z) from the wrong cached value
    "factor_of_two",
    "missing_batch_mean",  # a missing 1/batch
    "bias_sum_wrong_axis",  # a sum over the wrong axis
    "inverted_relu_mask",
    "first_example_only",
    "zero_dx",
    "error_only_in_dx",
    "single_element",  # an error in a single element of one leaf
}


# For a check whose test asks only where the exact rows pin a bug: no finite
# differences, which are half of a check's program to compile.
EXACT_ONLY = {"directions": 0, "coordinates": 0}

# Each wrong rule compiles a model's check of its own: the inner loop keeps these
# representatives (the first rule, with finite differences; a culprit deep in a longer
# model, by its dx; the loss as the culprit; one wrong element), the slow sweep the rest
# (and test_every_catalogued_rule_as_built_is_really_wrong_caught_and_pinned all of them).
FAST_RULES = ("flipped_sign", "missing_transpose", "missing_batch_mean", "single_element")
RULE_HALVES = {
    "representative": FAST_RULES,
    "other": tuple(r.name for r in WRONG_RULES if r.name not in FAST_RULES),
}


def _expected_prefix(rule):
    if rule.layer is None:
        return f"loss {rule.kind}: "
    return f"serial layer {'.'.join(map(str, rule.layer))} ({rule.kind}): "


def test_the_catalogue_has_the_classic_mistakes():
    names = [rule.name for rule in WRONG_RULES]
    assert len(names) == len(set(names)) >= 12
    assert set(names) >= REQUIRED
    for rule in WRONG_RULES:
        assert rule.description and rule.leaf
        assert rule.name in str(rule) and repr(rule.leaf) in str(rule)


def _traced(rule):
    """The rule's model and loss, and its params, x and y as shapes: ``rule.build`` traced, not run.

    The catalogue's builder draws with ``jax.random`` (threefry for every leaf),
    which costs more to compile than checking the model.
    """
    built = {}

    def build():
        model, loss, params, x, y = rule.build()
        built.update(model=model, loss=loss)
        return params, x, y

    shapes = jax.eval_shape(build)
    return built["model"], built["loss"], shapes


@functools.cache
def _planted(name):
    """``(model, loss, params, x, y)`` of the named rule: its model and loss, drawn with numpy.

    The builder's recipe (weights at about 1/√fan-in, every leaf shifted by
    random noise so that biases are nonzero, a standard normal batch, random
    labels) with a numpy generator: nothing to compile.
    """
    rule = next(r for r in WRONG_RULES if r.name == name)
    model, loss, (p_shapes, x_shape, y_shape) = _traced(rule)
    rng = np.random.default_rng(len(name))

    def draw(leaf):
        scale = 1 / np.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.0
        values = scale * rng.standard_normal(leaf.shape) + 0.1 * rng.standard_normal(leaf.shape)
        return np.asarray(values, leaf.dtype)

    params = jax.tree.map(draw, p_shapes)
    x = np.asarray(rng.standard_normal(x_shape.shape), x_shape.dtype)
    classes = jax.eval_shape(model.apply, params, x).shape[-1]
    y = np.asarray(rng.integers(0, classes, y_shape.shape), y_shape.dtype)
    return model, loss, params, x, y


@functools.cache
def _report(name):
    """``rule.check()`` of the named rule at its numpy draw (one compiled program per rule).

    The exact rows pin a bug to its layer and leaf; the finite differences, half
    of each check's program to compile, run for the first rule only (as in
    ``wrong_rules``' docstring example): on a wrong rule they assert nothing more.
    """
    rule = next(r for r in WRONG_RULES if r.name == name)
    exact_only = {} if name == WRONG_RULES[0].name else EXACT_ONLY
    return rule._replace(build=lambda: _planted(name)).check(**exact_only)


@functools.cache
def _hand_and_reference(names):
    """One jitted float64 program: the named rules' hand gradient and jax.grad of the same
    forward.

    Independent of fbp.verify: fbp's gradient (or the loss's) against jax.grad
    of the very same forward, for each named rule's model (``_planted``'s) at
    once (one program each, or eager, would cost far more to compile). It takes
    ``{name: (params, x, y)}``: the numpy draws, or the catalogue's own.
    """

    def run(data):
        out = {}
        for rule in (r for r in WRONG_RULES if r.name in names):
            model, loss = _planted(rule.name)[:2]
            params, x, y = data[rule.name]
            if rule.layer is None:
                pred = model.apply(params, x)
                out[rule.name] = (
                    loss.grad(pred, y),
                    jax.grad(lambda p, loss=loss, y=y: loss.value(p, y))(pred),
                )
            else:
                out[rule.name] = (
                    fbp.grad(model, loss)(params, x, y),
                    jax.grad(
                        lambda p, model=model, loss=loss, x=x, y=y: loss.value(model.apply(p, x), y)
                    )(params),
                )
        return out

    return jax.jit(run)


def _really_wrong(data):
    """Rules whose planted bug does NOT make the hand gradient differ from jax.grad, at
    ``data``: ``{name: (params, x, y)}`` for every rule of one or both ``RULE_HALVES``
    (one program per half)."""
    results = {}
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
        for names in RULE_HALVES.values():
            if names[0] in data:
                results |= _hand_and_reference(names)(
                    {
                        name: (to64(params), to64(x), np.asarray(y))
                        for name, (params, x, y) in data.items()
                        if name in names
                    }
                )
    not_wrong = []
    for name, (hand, ref) in results.items():
        gaps = [
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(hand), jax.tree.leaves(ref), strict=True)
        ]
        if not max(gaps) > 1e-9:
            not_wrong.append(f"{name}: largest gap {max(gaps)}")
    assert set(results) == set(data)
    return not_wrong


def test_the_fast_and_slow_wrong_rules_cover_the_catalogue():
    halves = list(RULE_HALVES.values())
    assert sorted(n for half in halves for n in half) == sorted(r.name for r in WRONG_RULES)
    assert {r.name for r in WRONG_RULES[:1]} <= set(FAST_RULES)  # the one with finite differences
    # ... whose report the inner loop renders, as it locates the single wrong element
    # (test_every_wrong_rule_is_caught_and_pinned_to_its_layer_and_leaf).
    assert "single_element" in FAST_RULES
    fast = [p.id for p in _rules_fast_and_slow() if not p.marks]
    assert fast == [r.name for r in WRONG_RULES if r.name in FAST_RULES]
    assert any(r.layer is None for r in WRONG_RULES if r.name in FAST_RULES)


@pytest.mark.parametrize("half", ["representative", pytest.param("other", marks=pytest.mark.slow)])
def test_every_catalogued_rule_is_really_wrong(half):
    # At the numpy draws the checks below use: the planted bug makes fbp's
    # gradient differ from jax.grad of the same forward.
    not_wrong = _really_wrong({name: _planted(name)[2:] for name in RULE_HALVES[half]})
    assert not not_wrong, "\n".join(not_wrong)


def _assert_caught_and_pinned(rule, report):
    assert not report.ok
    culprit = report.culprit
    assert culprit.path == rule.layer or (rule.layer is None and culprit.path is None)
    assert culprit.leaf == rule.leaf, culprit
    assert culprit.kind.endswith(rule.kind)
    assert culprit.method == "vjp"
    # Every exact row closer to the loss than the culprit passes.
    exact = [r for r in report.rows if r.method == "vjp"]
    first = exact.index(culprit)
    assert all(r.passed for r in exact[:first])
    with pytest.raises(
        verify.GradientCheckError, match=rf"^{re.escape(_expected_prefix(rule))}leaf '{rule.leaf}'"
    ) as info:
        report.raise_if_failed()
    assert info.value.leaf == rule.leaf and info.value.report is report
    assert isinstance(info.value, fbp.FbpError) and isinstance(info.value, AssertionError)


def _rules_fast_and_slow():
    """Every wrong rule; all but ``FAST_RULES`` marked slow."""
    for rule in WRONG_RULES:
        marks = () if rule.name in FAST_RULES else (pytest.mark.slow,)
        yield pytest.param(rule, marks=marks, id=rule.name)


@pytest.mark.parametrize("rule", list(_rules_fast_and_slow()))
def test_every_wrong_rule_is_caught_and_pinned_to_its_layer_and_leaf(rule):
    # The report's own tests read it here, in the test that computed it: under xdist a
    # test of its own may run in another process, and compile the check again.
    report = _report(rule.name)
    _assert_caught_and_pinned(rule, report)
    if rule.name == "single_element":  # a single wrong element is located exactly
        _assert_single_element_located(report.culprit)
    if rule is WRONG_RULES[0]:  # the one checked with finite differences
        _assert_renders_as_a_table_and_as_html(report)


def _assert_single_element_located(row):
    assert row.index == (3, 5)
    assert row.probes == 6 * 16  # the whole leaf, not a sample
    # A millionth of the leaf's scale: invisible to float32, plain in float64.
    assert 1e-7 < row.max_rel_err < 1e-5
    assert row.hand != row.reference


@pytest.mark.slow
def test_every_catalogued_rule_as_built_is_really_wrong_caught_and_pinned():
    # The tests above at the catalogue's own draws, for every rule: rule.build()
    # as a user runs it (one random program per architecture of the catalogue). Its
    # model is _planted's but for the serial object, and check_model(*rule.build())
    # is rule.check(): with _planted's models and _report's settings, every check
    # reuses a program compiled above (in the same process).
    built = {rule.name: rule.build() for rule in WRONG_RULES}
    for name, (model, loss, *_) in built.items():
        planted_model, planted_loss = _planted(name)[:2]
        assert model.children == planted_model.children and loss is planted_loss
    not_wrong = _really_wrong({name: b[2:] for name, b in built.items()})
    assert not not_wrong, "\n".join(not_wrong)
    for rule in WRONG_RULES:
        data = built[rule.name][2:]
        exact_only = {} if rule is WRONG_RULES[0] else EXACT_ONLY
        report = rule._replace(
            build=lambda rule=rule, data=data: (*_planted(rule.name)[:2], *data)
        ).check(**exact_only)
        _assert_caught_and_pinned(rule, report)
        if rule.name == "single_element":
            _assert_single_element_located(report.culprit)
        if rule is WRONG_RULES[0]:
            _assert_renders_as_a_table_and_as_html(report)


# --------------------------------------------------------------------------- no false alarms

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
LOSS_KINDS = ["mse", "softmax_cross_entropy", "softmax_one_hot", "sigmoid_binary_cross_entropy"]
# Ten architectures, ten random draws each: 100 models, 10 compilations.
ARCHITECTURES = [
    # (hidden widths, activation indices, loss kind, n_in, batch, outputs)
    ((8, 8), (3, 3), "softmax_cross_entropy", 5, 6, 4),  # ReLU network
    ((16,), (3,), "mse", 3, 8, 2),  # ReLU network
    ((6, 5), (4, 4), "sigmoid_binary_cross_entropy", 4, 5, 3),  # leaky ReLU network
    ((7,), (1,), "softmax_one_hot", 6, 4, 3),
    ((5, 4), (2, 5), "mse", 2, 7, 2),
    ((9,), (6,), "softmax_cross_entropy", 4, 3, 5),
    ((4, 6), (7, 8), "sigmoid_binary_cross_entropy", 3, 6, 2),
    ((5,), (0,), "softmax_one_hot", 5, 5, 4),
    ((6, 6, 4), (3, 1, 4), "mse", 4, 4, 3),
    ((3,), (5,), "softmax_cross_entropy", 1, 9, 2),
]


def _architecture(spec):
    widths, acts, loss_kind, _, _, out = spec
    layers = []
    for width, act in zip(widths, acts, strict=True):
        layers += [nn.dense(width), ACTIVATIONS[act]()]
    model = nn.serial(*layers, nn.dense(out))
    loss = losses.mse if loss_kind == "mse" else (
        losses.sigmoid_binary_cross_entropy if loss_kind.startswith("sigmoid") else losses.softmax_cross_entropy
    )  # fmt: skip
    return model, loss


def _draw(spec, param_shapes, seed):
    """Params, inputs and targets from a seeded numpy generator (eager jax.random would
    compile a program per shape): weights at 1/√fan-in, as ``init`` draws them."""
    _, _, loss_kind, n_in, batch, out = spec
    rng = np.random.default_rng(seed)
    # Nonzero biases and varied scales, so kinks and saturation both occur.
    scale = [0.1, 1.0, 2.0][seed % 3]

    def draw(leaf):
        init = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0]) if leaf.ndim == 2 else 0.0
        return np.float32(scale * init + 0.3 * rng.standard_normal(leaf.shape))

    params = jax.tree.map(draw, param_shapes)
    x = np.float32(rng.standard_normal((batch, n_in)) * [0.5, 1.0, 3.0][seed % 3])
    if loss_kind == "mse":
        y = np.float32(rng.standard_normal((batch, out)))
    elif loss_kind == "softmax_cross_entropy":
        y = rng.integers(0, out, batch, dtype=np.int32)
    elif loss_kind == "softmax_one_hot":
        y = np.eye(out, dtype=np.float32)[rng.integers(0, out, batch)]
    else:
        y = np.float32(rng.random((batch, out)) < 0.5)
    return params, x, y


@pytest.mark.slow
def test_no_false_alarm_on_100_random_correct_models():
    activations_seen, losses_seen, loss_kinds, kinks, checked = set(), set(), set(), 0, 0
    for a, spec in enumerate(ARCHITECTURES):
        model, loss = _architecture(spec)
        param_shapes, _ = init_shapes(model, spec[3:4])
        for draw in range(10):
            params, x, y = _draw(spec, param_shapes, seed=100 * a + draw)
            report = verify.check_model(
                model, loss, params, x, y, directions=3, coordinates=4, seed=draw
            )
            assert report.ok, f"architecture {a}, draw {draw}:\n{report}"
            assert (
                report.directions
                + sum(r.skipped for r in report.rows if r.method == "fd-directions")
                == 3
            )
            kinks += report.kinks
            checked += 1
        activations_seen |= {c.name for c in model.children[1::2][: len(spec[0])]}
        losses_seen.add(loss.name)
        loss_kinds.add(spec[2])
    assert checked >= 100
    assert len(activations_seen) == len(ACTIVATIONS)
    assert losses_seen == {"mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy"}
    assert loss_kinds == set(LOSS_KINDS)


def test_relu_network_sitting_on_its_kinks_passes_and_counts_the_skipped_probes():
    # Hidden unit 0 gets pre-activation exactly 0 for every example (zero weights,
    # zero bias) and unit 1 gets 1e-9, well inside any step: every finite
    # difference that moves their weights straddles ReLU's kink.
    model = nn.serial(nn.dense(4), nn.relu(), nn.dense(3))
    rng = np.random.default_rng(0)
    w = np.float32(rng.standard_normal((5, 4)) / np.sqrt(5))
    w[:, :2] = 0.0
    b = np.float32([0.0, 1e-9, 0.5, 0.5])
    w2 = np.float32(rng.standard_normal((4, 3)) / 2)
    params = ({"w": w, "b": b}, {}, {"w": w2, "b": np.zeros(3, np.float32)})
    x = np.float32(rng.standard_normal((6, 5)))
    y = rng.integers(0, 3, 6, dtype=np.int32)
    report = verify.check_model(model, losses.softmax_cross_entropy, params, x, y, coordinates=20)
    assert report.ok, report
    assert report.kinks > 0
    bias = next(
        r for r in report.rows if r.method == "fd-coordinates" and r.leaf == "b" and r.path == (0,)
    )
    assert bias.skipped >= 2 and bias.probes + bias.skipped == 4
    assert f"{report.kinks} skipped at kinks" in str(report)


def test_check_grad_skips_coordinates_on_a_kink():
    weights = np.arange(1.0, 7.0, dtype=np.float32)
    w = np.float32([-1.0, 0.0, 0.0, 2.0, 0.0, 3.0])

    def f(w):
        return jnp.sum(jax.nn.relu(w) * weights)

    def grad_f(w):
        return jnp.where(w > 0, weights, 0.0)

    report = verify.check_grad(f, grad_f, w, coordinates=6, directions=2)
    assert report.ok, report
    coords = next(r for r in report.rows if r.method == "fd-coordinates")
    assert (coords.probes, coords.skipped) == (3, 3)
    assert set(coords.probed) == {(i,) for i in range(6)}


def _pair_max_layer():
    """Max over pairs of features; the hand rule routes dy to the first maximum."""

    def init(key, input_shape):
        return {}, (input_shape[0] // 2,)

    def forward(params, x, *, key=None, train=False):
        pairs = x.reshape(x.shape[0], -1, 2)
        return jnp.max(pairs, axis=-1), jnp.argmax(pairs, axis=-1)

    def backward(params, argmax, dy):
        routed = jax.nn.one_hot(argmax, 2, dtype=dy.dtype) * dy[..., None]
        return {}, routed.reshape(dy.shape[0], -1)

    return Layer(init, forward, backward, name="pair_max")


def test_a_tie_at_a_max_is_redrawn_rather_than_reported():
    # jax.vjp of jnp.max splits a tie's gradient evenly; the hand rule gives it
    # all to the first. Both are valid subgradients: no false alarm, one redraw.
    model = nn.serial(_pair_max_layer(), nn.dense(3))
    params = (
        {},
        {
            "w": np.float32(np.random.default_rng(0).standard_normal((2, 3))),
            "b": np.zeros(3, np.float32),
        },
    )
    x = np.float32([[1.0, 1.0, 0.5, -2.0], [0.3, 0.7, 2.0, 2.0]])
    y = np.int32([0, 2])
    report = verify.check_model(model, losses.softmax_cross_entropy, params, x, y)
    assert report.ok, report
    redrawn = [r for r in report.rows if r.path == (0,) and r.method == "vjp"]
    assert redrawn and all(r.skipped == 1 and "kink" in r.message for r in redrawn)
    # A wrong rule stays wrong after the redraw (the exact rows pin it: no finite
    # differences, half of a check's program to compile).
    bad = model.children[0]._replace(backward=lambda p, c, dy: ({}, jnp.repeat(dy, 2, axis=1)))
    report = verify.check_model(
        nn.serial(bad, model.children[1]), losses.softmax_cross_entropy, params, x, y, **EXACT_ONLY
    )
    assert not report.ok and report.culprit.path == (0,) and report.culprit.leaf == "dx"


# --------------------------------------------------------------------------- check_grad


def test_check_grad_catches_a_wrong_gradient_function_by_both_references():
    def f(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    def grad_right(w, x):
        t = jnp.tanh(x @ w)
        return x.T @ (2 * t * (1 - t**2))

    def grad_wrong(w, x):
        return grad_right(w, x) * 1.001

    rng = np.random.default_rng(0)
    w, x = np.float32(rng.standard_normal((3, 2))), np.float32(rng.standard_normal((5, 3)))
    assert verify.check_grad(f, grad_right, w, x).ok
    bad = verify.check_grad(f, grad_wrong, w, x)
    assert {r.method for r in bad.failures} >= {"grad", "fd-directions", "fd-coordinates"}
    with pytest.raises(verify.GradientCheckError, match=r"^f: leaf 'params' fails the grad check"):
        bad.raise_if_failed()


def test_finite_differences_catch_what_autodiff_of_a_wrong_forward_cannot():
    # A custom_jvp with a wrong derivative fools jax.grad, and so the exact row;
    # finite differences of the function itself are not fooled.
    @jax.custom_jvp
    def cube(x):
        return x**3

    @cube.defjvp
    def cube_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return x**3, 2 * x**2 * t  # should be 3x²

    def f(w):
        return jnp.sum(cube(w))

    def grad_f(w):
        return jax.grad(f)(w)

    report = verify.check_grad(f, grad_f, np.float32([0.5, -1.0, 2.0]))
    exact = next(r for r in report.rows if r.method == "grad")
    assert exact.passed
    assert not report.ok
    assert {r.method for r in report.failures} == {"fd-directions", "fd-coordinates"}
    coords = next(r for r in report.rows if r.method == "fd-coordinates")
    assert coords.reference == pytest.approx(1.5 * coords.hand, rel=1e-6)


def test_check_grad_on_a_pytree_names_each_leaf():
    def f(p, x):
        return jnp.sum(jnp.sin(x @ p["w"] + p["b"][None, :]))

    def grad_f(p, x):
        c = jnp.cos(x @ p["w"] + p["b"][None, :])
        return {"w": x.T @ c, "b": 0.5 * c.sum(0)}  # db off by a factor 2

    p = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    report = verify.check_grad(f, grad_f, p, np.arange(12.0, dtype=np.float32).reshape(4, 3) / 10)
    assert not report.ok
    assert report.culprit.leaf == "b"
    assert all(r.passed for r in report.rows if r.leaf == "w")


# --------------------------------------------------------------------------- check_layer


# check_layer compiles one program per layer (1-5 s each); the inner loop checks a
# layer fed floats with an extra axis (also the representative of the dense-of-any-shape
# sweep) and one fed integer ids. Other tests here check_layer a narrow dtype, side
# inputs (key, train) and wrong rules; tests/test_user_layer.py a user's layer; and
# tests/test_layer_contract.py holds every layer to jax.vjp. The sweep over every
# builtin layer is slow.
FAST_LAYERS = {"dense (on a sequence)", "embedding"}


def _representatives_fast(cases):
    """Every case; all but those in ``FAST_LAYERS`` marked slow."""
    for case in cases:
        marks = () if case.title in FAST_LAYERS else (pytest.mark.slow,)
        yield pytest.param(case, marks=marks, id=case.title)


def test_the_fast_layers_are_catalogued():
    assert {case.title for case in catalogue.LAYERS} >= FAST_LAYERS


@pytest.mark.parametrize("case", list(_representatives_fast(catalogue.LAYERS)))
def test_check_layer_passes_every_builtin_layer(case):
    report = catalogue.check(case, jax.random.key(0))
    assert report.ok, report
    methods = {r.method for r in report.rows}
    assert {"vjp", "fd-directions", "fd-coordinates"} <= methods
    if not case.vocab:  # integer ids: dx is float0, and there are no finite differences in x
        assert any(r.leaf == "dx" and r.method == "vjp" for r in report.rows)
        assert any(r.leaf == "x" and r.method == "fd-coordinates" for r in report.rows)
    if case.name == "dense":  # as in test_check_layer_passes_dense_of_any_shape
        w = next(r for r in report.rows if r.leaf == "w" and r.method == "vjp")
        w_shape = init_shapes(case.build(), case.input_shape)[0]["w"].shape
        assert w.probes == np.prod(w_shape) and w_shape[0] == case.input_shape[-1]


# check_layer draws params and inputs in one program per layer init and shape: the two
# tests below check this one layer (with its backward replaced) on the same shape.
DENSE3 = nn.dense(3)


def test_check_layer_catches_an_error_only_in_dx():
    layer = DENSE3

    def backward(p, c, dy):
        dparams, dx = layer.backward(p, c, dy)
        return dparams, 0.5 * dx

    report = verify.check_layer(layer._replace(backward=backward), jax.random.key(0), (4,))
    failing = {(r.leaf, r.method) for r in report.failures}
    assert ("dx", "vjp") in failing and ("x", "fd-coordinates") in failing
    assert not any(leaf in ("w", "b") for leaf, _ in failing)
    with pytest.raises(
        verify.GradientCheckError, match=r"^dense\(→3\): leaf 'dx' fails the vjp check"
    ):
        report.raise_if_failed()


def test_check_layer_reports_a_gradient_of_the_wrong_dtype():
    # (Of the wrong structure, a missing leaf: test_check_layer_reports_a_backward_of_the_wrong_shape.)
    layer = DENSE3

    def wrong_dtype(p, c, dy):
        d, dx = layer.backward(p, c, dy)
        return {"w": d["w"].astype(jnp.float16), "b": d["b"]}, dx

    report = verify.check_layer(
        layer._replace(backward=wrong_dtype), jax.random.key(0), (4,), **EXACT_ONLY
    )
    assert not report.ok
    assert report.culprit.method == "structure" and report.culprit.leaf == "w"
    assert "float16" in report.culprit.message


def test_check_layer_passes_side_inputs_and_rejects_unknown_ones():
    seen = []
    base = nn.tanh()

    def forward(params, x, *, key=None, train=False):
        seen.append((key is not None, train))
        return base.forward(params, x)

    layer = base._replace(forward=forward)
    assert verify.check_layer(layer, jax.random.key(0), (3,), key=jax.random.key(1), train=True).ok
    assert seen and all(s == (True, True) for s in seen)
    with pytest.raises(fbp.ConfigError, match=r"check_layer: unknown side inputs \['tarin'\]"):
        verify.check_layer(nn.tanh(), jax.random.key(0), (3,), tarin=True)


# --------------------------------------------------------------------------- a backward of the wrong shape


DENSE8 = nn.dense(8)  # one init: check_layer's draws of the four cases share a program


def _dense_returning(change):
    """``nn.dense(8)`` whose right backward is passed through ``change(dparams, dx)``."""
    layer = DENSE8

    def backward(params, cache, dy):
        return change(*layer.backward(params, cache, dy))

    return layer._replace(backward=backward)


# The bug the checker exists to find must give a report, never a raw error:
# name -> (how the backward's result is broken, the leaf the report names).
MISSHAPEN = {
    "dx_one_column_short": (lambda d, dx: (d, dx[:, :-1]), "dx"),
    "dw_of_shape_1_by_n_out": (lambda d, dx: ({**d, "w": d["w"][:1]}, dx), "w"),
    "dw_transposed": (lambda d, dx: ({**d, "w": d["w"].T}, dx), "w"),
    "db_missing": (lambda d, dx: ({"w": d["w"]}, dx), "b"),
}


# Each case compiles a model's check: the inner loop keeps the two with assertions of
# their own (a dx that cannot even feed the layers before it; a missing leaf), and
# test_check_layer_reports_a_backward_of_the_wrong_shape catches all four there.
_MISSHAPEN_MODEL_CASES = [
    bug
    if bug in ("dx_one_column_short", "db_missing")
    else pytest.param(bug, marks=pytest.mark.slow)
    for bug in MISSHAPEN
]


@pytest.mark.parametrize("bug", _MISSHAPEN_MODEL_CASES)
def test_check_model_reports_a_backward_of_the_wrong_shape_and_names_its_layer(bug):
    change, leaf = MISSHAPEN[bug]
    # Layers before the culprit consume its dx: a dx one column short would
    # break their backward (and model.backward) with a broadcasting error.
    model = nn.serial(nn.dense(6), nn.tanh(), _dense_returning(change), nn.tanh(), nn.dense(3))
    params = numpy_params(model, (5,), 0)
    x, y = normal32(1, 7, 5), np.arange(7, dtype=np.int32) % 3
    report = verify.check_model(model, losses.softmax_cross_entropy, params, x, y)
    assert not report.ok
    culprit = report.culprit
    assert (culprit.path, culprit.leaf, culprit.method) == ((2,), leaf, "structure"), report
    # The layers before it are checked with the reference dy, and pass.
    assert all(r.passed for r in report.rows if r.path in ((0,), (1,)) and r.method == "vjp")
    with pytest.raises(
        verify.GradientCheckError,
        match=rf"^serial layer 2 \(dense\(→8\)\): leaf '{leaf}' fails the structure check",
    ):
        report.raise_if_failed()
    if leaf == "dx":
        end = next(r for r in report.rows if r.layer == "model (end to end)")
        assert end.method == "structure" and not end.passed
        assert "model.backward not run: layer 2 (dense(→8)) passes on dx of shape (7, 5)" in (
            end.message
        )
    if bug == "db_missing":
        assert "no leaf 'b'" in culprit.message


@pytest.mark.parametrize("bug", MISSHAPEN)  # a layer's check is cheap: all four
def test_check_layer_reports_a_backward_of_the_wrong_shape(bug):
    change, leaf = MISSHAPEN[bug]
    report = verify.check_layer(_dense_returning(change), jax.random.key(0), (6,))
    assert not report.ok
    assert (report.culprit.leaf, report.culprit.method) == (leaf, "structure"), report
    with pytest.raises(
        verify.GradientCheckError, match=rf"^dense\(→8\): leaf '{leaf}' fails the structure check"
    ):
        report.raise_if_failed()
    if bug == "db_missing":
        with pytest.raises(verify.GradientCheckError, match="dparams has structure"):
            report.raise_if_failed()


# --------------------------------------------------------------------------- report


def _assert_renders_as_a_table_and_as_html(report):
    # A failing check_model report with finite differences (the first rule's).
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith("check_model(serial, softmax_cross_entropy): FAILED")
    assert lines[1].split()[:3] == ["layer", "leaf", "method"]
    assert "directions" in lines[0] and "coordinates" in lines[0]
    row = next(
        line
        for line in lines
        if line.startswith("layer 0 (dense(→8))") and " w " in line and "vjp" in line
    )
    assert row.rstrip().endswith("FAIL")
    page = report._repr_html_()
    assert (
        page.startswith("<p><b>check_model")
        and "<table>" in page
        and page.count("<tr") == len(report.rows) + 1
    )
    assert "#ffebee" in page  # failing rows are highlighted


# One model for the two tests below: checking it again at the same shapes reuses its program.
PROBED = nn.serial(nn.dense(6), nn.tanh(), nn.dense(2))


def test_the_report_says_how_much_was_probed():
    model = PROBED
    params = numpy_params(model, (50,), 0)
    x, y = normal32(1, 4, 50), normal32(2, 4, 2)
    report = verify.check_model(model, losses.mse, params, x, y, directions=5, coordinates=7)
    assert report.ok, report
    # Large leaves are sampled; a leaf smaller than the sample is probed whole.
    sizes = {
        (r.path, r.leaf): r.probes + r.skipped for r in report.rows if r.method == "fd-coordinates"
    }
    assert sizes == {((0,), "w"): 7, ((0,), "b"): 6, ((2,), "w"): 7, ((2,), "b"): 2}
    assert (
        report.coordinates + sum(r.skipped for r in report.rows if r.method == "fd-coordinates")
        == 22
    )
    assert report.directions == 5
    assert all(
        r.step in verify.tolerances_for("float64").steps
        for r in report.rows
        if r.method.startswith("fd")
    )


def test_coordinate_probes_depend_only_on_the_leaf_path():
    def probes(model, params):
        x, y = normal32(3, 4, 50), normal32(4, 4, 2)
        report = verify.check_model(model, losses.mse, params, x, y, directions=5, coordinates=7)
        return {(r.path, r.leaf): r.probed for r in report.rows if r.method == "fd-coordinates"}

    small = nn.serial(nn.dense(6), nn.tanh(), nn.dense(2, use_bias=False))
    bigger = PROBED
    a = probes(small, numpy_params(small, (50,), 2))
    b = probes(bigger, numpy_params(bigger, (50,), 3))
    assert set(b) - set(a) == {((2,), "b")}
    assert all(a[k] == b[k] for k in a)
    assert len(a[((0,), "w")]) == 7 and len(set(a[((0,), "w")])) == 7


# --------------------------------------------------------------------------- dtypes and tolerances


def test_the_check_runs_in_float64_whatever_the_model_dtype():
    model = nn.serial(nn.dense(4, dtype=jnp.bfloat16), nn.tanh(), nn.dense(2, dtype=jnp.bfloat16))
    params = numpy_params(model, (3,), 0)
    x, y = (np.asarray(normal32(seed, 5, n), jnp.bfloat16) for seed, n in ((1, 3), (2, 2)))
    assert not jax.config.jax_enable_x64
    report = verify.check_model(model, losses.mse, params, x, y)
    assert report.ok, report
    # float64 comparisons: the float64 tolerance applied to every exact row.
    assert {r.tolerance for r in report.rows if r.method == "vjp"} == {1e-9}
    assert not jax.config.jax_enable_x64  # scoped: x64 is off again afterwards


def test_tolerances_have_per_dtype_defaults_and_can_be_overridden():
    t64, t32, t16 = (verify.tolerances_for(d) for d in ("float64", "float32", "bfloat16"))
    assert t64.exact_rtol < t32.exact_rtol < t16.exact_rtol
    assert t64.fd_rtol < t32.fd_rtol
    assert verify.DEFAULT_TOLERANCES["float32"] is t32

    # A function that computes in float32 even when handed float64 is judged
    # at float32's tolerances, and passes.
    def f(w):
        w32 = w.astype(jnp.float32)
        return jnp.sum(jnp.sin(w32) * w32)

    def grad_f(w):
        w32 = w.astype(jnp.float32)
        return jnp.cos(w32) * w32 + jnp.sin(w32)

    w = jnp.linspace(-2.0, 2.0, 7)
    report = verify.check_grad(f, grad_f, w)
    assert report.ok, report
    assert next(r for r in report.rows if r.method == "grad").tolerance == t32.exact_rtol
    # Overrides apply to every row.
    strict = verify.Tolerances(exact_rtol=0.0, fd_rtol=1e-12, noise_factor=0.0, steps=(1e-6, 1e-3))
    report = verify.check_grad(
        lambda w: jnp.sum(jnp.sin(w)), lambda w: jnp.cos(w) * (1 + 1e-7), w, tolerances=strict
    )
    assert not report.ok and report.culprit.tolerance == 0.0


def test_check_model_rejects_labels_out_of_range_and_non_layers():
    model = nn.serial(nn.dense(3))
    params = numpy_params(model, (2,), 0)
    with pytest.raises(fbp.RangeError, match=r"labels must lie in \[0, 3\)"):
        verify.check_model(
            model,
            losses.softmax_cross_entropy,
            params,
            np.ones((2, 2), np.float32),
            np.int32([0, 3]),
        )
    with pytest.raises(fbp.ConfigError, match="check_model: model must be a Layer"):
        verify.check_model(
            lambda p, x: x, losses.mse, params, np.ones((2, 2), np.float32), np.ones((2, 3))
        )


def test_public_api_is_exported():
    assert fbp.verify is verify
    for name in verify.__all__:
        assert getattr(verify, name).__doc__, name
    assert np.isclose(verify.tolerances_for(jnp.float64).exact_rtol, 1e-9)


def _assert_dense_passes(n_in, features, batch, extra, seed):
    report = verify.check_layer(
        nn.dense(features), jax.random.key(seed), (*extra, n_in), batch_size=batch
    )
    assert report.ok, report
    w = next(r for r in report.rows if r.leaf == "w" and r.method == "vjp")
    assert w.probes == n_in * features


# Each shape compiles its own check: the inner loop's case is the catalogue's
# "dense (on a sequence)" in test_check_layer_passes_every_builtin_layer.
@pytest.mark.slow
@settings(max_examples=6)
@given(
    n_in=st.integers(1, 6),
    features=st.integers(1, 6),
    batch=st.integers(1, 5),
    extra=st.sampled_from([(), (2,)]),
    seed=st.integers(0, 2**16),
)
def test_check_layer_passes_dense_of_any_shape(n_in, features, batch, extra, seed):
    _assert_dense_passes(n_in, features, batch, extra, seed)


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(jnp.float32, marks=pytest.mark.slow),
        jnp.bfloat16,  # the inner loop's representative: a narrow dtype
        pytest.param(jnp.float16, marks=pytest.mark.slow),
    ],
    ids=lambda d: jnp.dtype(d).name,
)
def test_check_layer_checks_params_of_any_float_dtype_in_float64(dtype):
    layer = nn.dense(3, dtype=dtype)
    report = verify.check_layer(layer, jax.random.key(0), (4,))
    assert report.ok, report
    assert {r.tolerance for r in report.rows if r.method == "vjp"} == {1e-9}

    def float32_grads(p, c, dy):  # ignores the params' dtype: breaks the contract
        d, dx = layer.backward(p, c, dy)
        return jax.tree.map(lambda a: a.astype(jnp.float32), d), dx

    # The same layer's init: its params are drawn by the program compiled above.
    report = verify.check_layer(
        layer._replace(backward=float32_grads), jax.random.key(0), (4,), **EXACT_ONLY
    )
    assert not report.ok and report.culprit.method == "structure"


def test_a_combinator_with_a_replaced_backward_is_checked_as_one_layer():
    # Not built by serial's own backward any more: the checker must not walk
    # into the children (whose rules are right) and miss the wrapper's bug.
    inner = nn.serial(nn.dense(4), nn.tanh())

    def halved(params, cache, dy):
        dparams, dx = inner.backward(params, cache, dy)
        return jax.tree.map(lambda g: 0.5 * g, dparams), dx

    model = nn.serial(inner._replace(backward=halved), nn.dense(2))
    params = numpy_params(model, (3,), 0)
    x, y = normal32(1, 5, 3), normal32(2, 5, 2)
    report = verify.check_model(model, losses.mse, params, x, y, **EXACT_ONLY)
    assert not report.ok
    assert report.culprit.path == (0,) and report.culprit.leaf == "0.b"
    with pytest.raises(verify.GradientCheckError, match=r"^serial layer 0 \(serial\): leaf '0.b'"):
        report.raise_if_failed()
