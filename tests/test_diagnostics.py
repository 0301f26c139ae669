"""fbp.diagnostics against independent references.

Per-example norms and DP-SGD clipping against ``jax.vmap(jax.grad(...))`` of
the plain forward on one example at a time; gradient-flow statistics against
the same quantities computed with jax.numpy and ``jax.grad``; the vanishing
gradients of a deep sigmoid network against their absence with ReLU and He
initialisation; plots drawn with matplotlib's Agg backend.

JAX compile time dominates on a small CI machine: params and inputs are drawn
with numpy (``init`` traced for the shapes only), and each check runs fbp and
its reference in one jitted program — the table of per-example cases in one
program for all of them.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from layer_helpers import device_array, init_shapes

import fbp
import fbp.cli
from fbp import diagnostics, losses, nn

matplotlib.use("Agg")

CE = losses.softmax_cross_entropy
BCE = losses.sigmoid_binary_cross_entropy


def _random_params(model, input_shape, seed=0, dtype="float32"):
    """Numpy draws for ``model``'s params (``init`` traced, not run) and its output shape.

    Weights get variance ``1/fan_in`` (all axes but the last), scales (``s``)
    and running variances ``1 + noise``, other vectors (biases, means) small noise.
    """
    shapes, out_shape = init_shapes(model, input_shape)
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        noise = rng.standard_normal(leaf.shape)
        name = getattr(path[-1], "key", None)
        if len(leaf.shape) >= 2:
            value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name in ("scale", "s", "var"):
            value = 1 + 0.1 * (np.abs(noise) if name == "var" else noise)
        else:
            value = 0.1 * noise
        return device_array(value, dtype)

    return jax.tree_util.tree_map_with_path(one, shapes), out_shape


def _targets(loss, rng, batch, shape):
    """Labels for cross-entropy, 0/1 targets for binary cross-entropy, else normal draws."""
    if loss is CE:
        return device_array(rng.integers(0, shape[-1], batch), np.int32)
    if loss is BCE:
        return device_array(rng.random((batch, *shape)) < 0.5, np.float32)
    return device_array(rng.standard_normal((batch, *shape)), np.float32)


def _reference_per_example(model, loss, params, x, y):
    """Per-example gradients by autodiff of the loss on one example at a time."""

    def one(p, xi, yi):
        return loss.value(model.apply(p, xi[None]), yi[None])

    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)


def _norms_of(per_example):
    leaves = jax.tree.leaves(per_example)
    batch = leaves[0].shape[0]
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(batch, -1)), axis=1) for g in leaves))


def _mlp():
    return nn.serial(
        nn.dense(16),
        nn.relu(),
        nn.residual(nn.serial(nn.dense(16), nn.tanh())),
        nn.dense(12, use_bias=False),
        nn.gelu(),
        nn.dense(3),
    )


def _scale_init(key, shape):
    return {"s": 1 + jax.random.normal(key, shape[-1:])}, shape


class Case(NamedTuple):
    """One model of the per-example table, and how its inputs are drawn.

    The inner loop runs the ``fast`` cases; the others are a slow sweep, their rules
    checked in the inner loop by tests/test_per_example.py's model of every layer kind
    (the explicit form of dense on sequences, the fallback of a user's layer, an
    embedding with repeated ids; ``per_example_grad_norms`` of the whole model).
    """

    model: Callable[[], nn.Layer]
    input_shape: tuple
    loss: object
    fast: bool  # one of the representative cases the inner loop runs
    vocab: int = 0  # > 0: the inputs are ids in [0, vocab)
    train: bool = True
    atol: float = 1e-7


CASES = {
    "mlp-ce": Case(_mlp, (5,), CE, False),  # the inner loop: the clipping tests' program
    "mlp-mse": Case(_mlp, (5,), losses.mse, False),
    "mlp-bce": Case(_mlp, (5,), BCE, False),
    "flatten-bce": Case(
        lambda: nn.serial(nn.flatten(), nn.dense(6), nn.elu(), nn.dense(3)), (2, 3), BCE, True
    ),
    # sequences: the outer-product shortcut does not hold; Gram form (T small)...
    "seq-gram": Case(
        lambda: nn.serial(nn.dense(32), nn.tanh(), nn.dense(24)), (3, 20), losses.mse, True
    ),
    # ...and explicit per-example dW (T large next to the widths)
    "seq-explicit": Case(
        lambda: nn.serial(nn.dense(3), nn.tanh(), nn.dense(2)), (9, 4), losses.mse, False
    ),
    "flatten": Case(
        lambda: nn.serial(nn.flatten(), nn.dense(6), nn.elu(), nn.dense(3)), (2, 3), CE, False
    ),
    # layer norm normalizes each example alone: its scale and bias have per-example rules
    "layer-norm": Case(
        lambda: nn.serial(nn.dense(6), nn.layer_norm(), nn.tanh(), nn.dense(3)), (5,), CE, False
    ),
    "layer-norm-seq": Case(
        lambda: nn.serial(nn.dense(4), nn.layer_norm(use_bias=False), nn.dense(2)),
        (3, 5),
        losses.mse,
        True,
    ),
    # convolutions: patches form (dense algebra over output positions) and XLA form
    "conv1d-cnn": Case(lambda: fbp.cli.build_cnn1d(4, channels=3), (12,), CE, False),
    "conv1d-xla": Case(
        lambda: nn.serial(
            nn.conv1d(3, 3, strides=2, dilation=1, implementation="xla"),
            nn.relu(),
            nn.conv1d(2, 2, use_bias=False, padding="VALID", implementation="xla"),
            nn.flatten(),
            nn.dense(3),
        ),
        (9, 2),
        CE,
        False,
    ),
    "conv2d": Case(
        lambda: nn.serial(
            nn.conv2d(4, (3, 2), strides=(2, 1)),
            nn.tanh(),
            nn.conv2d(2, 2, dilation=2, padding="VALID", use_bias=False),
            nn.flatten(),
            nn.dense(3),
        ),
        (7, 6, 2),
        losses.mse,
        True,
    ),
    # a layer without a rule: the walker's per-example fallback
    "fallback": Case(
        lambda: nn.serial(
            nn.dense(4),
            nn.from_jax(lambda p, x: x * p["s"][None, :], _scale_init, name="scale"),
            nn.tanh(),
            nn.dense(2),
        ),
        (3,),
        losses.mse,
        False,
        atol=0.0,
    ),
    # embeddings: repeated ids add their rows, the masked Gram form counts the cross terms
    "embedding-distinct-ids": Case(
        lambda: nn.serial(nn.embedding(50, 4), nn.flatten(), nn.dense(3)),
        (6,),
        CE,
        False,
        50,
        atol=0.0,
    ),
    "embedding-repeated-ids": Case(
        lambda: nn.serial(nn.embedding(7, 4), nn.flatten(), nn.dense(3)),
        (6,),
        CE,
        False,
        7,
        atol=0.0,
    ),
    # batch norm in inference: the running statistics make the examples independent
    # (the reference's forward, model.apply, runs with train=False)
    "batch-norm-inference": Case(
        lambda: nn.serial(nn.dense(4), nn.batch_norm(), nn.dense(2)),
        (3,),
        losses.mse,
        True,
        train=False,
        atol=0.0,
    ),
}


def _norms_and_references(cases, seed=0):
    """Per ``(case name, batch size)``: (got, want), every case in ONE jitted program.

    A batch of one whose case also runs on 7 examples takes the first of them: its
    reference is the first row of theirs (``∇ℓ_0`` does not depend on the rest of the
    batch), so the program holds one reference per case, not two.
    """
    problems, models = {}, {}
    for name, batch in sorted(cases, key=lambda c: -c[1]):  # batches of 7 first
        case = CASES[name]
        models.setdefault(name, case.model())
        rng = np.random.default_rng([seed, batch])
        params, out_shape = _random_params(models[name], case.input_shape, seed)
        if batch == 1 and (name, 7) in problems:
            first = lambda a: device_array(np.asarray(a)[:1], a.dtype)  # noqa: E731
            problems[name, 1] = tuple(first(a) for a in problems[name, 7][1:])
            continue
        if case.vocab:
            x = device_array(rng.integers(0, case.vocab, (batch, *case.input_shape)), np.int32)
        else:
            x = device_array(rng.standard_normal((batch, *case.input_shape)), np.float32)
        problems[name, batch] = (params, x, _targets(case.loss, rng, batch, out_shape))

    @jax.jit
    def run(problems):
        out = {}
        # (jit's dict keys come back sorted: the batches of 7 go first, by hand)
        for (name, batch), problem in sorted(problems.items(), key=lambda p: len(p[1]) == 2):
            model, case = models[name], CASES[name]
            f = diagnostics.per_example_grad_norms(model, case.loss)
            if len(problem) == 2:  # a batch of one: the first example of the batch of 7
                params, (x, y) = problems[name, 7][0], problem
                want = out[f"{name}-7"][1][:1]
            else:
                params, x, y = problem
                want = _norms_of(_reference_per_example(model, case.loss, params, x, y))
            out[f"{name}-{batch}"] = (f(params, x, y, train=case.train), want)
        return out

    return jax.tree.map(np.asarray, run(problems))


def _assert_norms_equal_vmap_of_grad(names, batches):
    results = _norms_and_references([(n, b) for n in names for b in batches])
    assert len(results) == len(names) * len(batches)
    _assert_all_close(results)


def _assert_all_close(results):
    failures = []
    for case, (got, want) in results.items():
        name, batch = case.rsplit("-", 1)
        if got.shape != (int(batch),):
            failures.append(f"{case}: shape {got.shape} != {(int(batch),)}")
            continue
        try:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=CASES[name].atol, err_msg=case)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


def test_per_example_norms_equal_vmap_of_grad():
    """The representative cases on one batch size, in one program: binary cross-entropy,
    mean squared error on sequences, dense on sequences in the Gram form, layer norm without
    bias on sequences, conv2d's patches form, batch norm in inference. (Cross-entropy through
    a residual block and a dense layer without bias: the clipping tests' program, below.)"""
    _assert_norms_equal_vmap_of_grad([n for n, c in CASES.items() if c.fast], (7,))


@pytest.mark.slow
def test_per_example_norms_equal_vmap_of_grad_on_every_case_and_a_batch_of_one():
    """Every case on batches of 1 and 7 but what the inner loop checks (fast cases, 7)."""
    problems = [(name, batch) for name in sorted(CASES) for batch in (1, 7)]
    problems = [(n, b) for n, b in problems if not (CASES[n].fast and b == 7)]
    results = _norms_and_references(problems)
    assert len(results) == len(problems)
    _assert_all_close(results)


def _assert_norms_equal_vmap_of_grad_in_float64(models):
    """``models``: name -> (model, input shape, batch); all in one compiled program."""
    problems = {}
    for name, (model, shape, batch) in models.items():
        params, out_shape = _random_params(model, shape, seed=3, dtype="float64")
        rng = np.random.default_rng(4)
        x = device_array(rng.standard_normal((batch, *shape)), np.float64)
        problems[name] = (params, x, device_array(np.arange(batch) % out_shape[-1], np.int32))

    @jax.jit
    def run(problems):
        out = {}
        for name, (params, x, y) in problems.items():
            model = models[name][0]
            got = diagnostics.per_example_grad_norms(model, CE)(params, x, y)
            out[name] = (got, _norms_of(_reference_per_example(model, CE, params, x, y)))
        return out

    for name, (got, want) in run(problems).items():
        assert got.dtype == jnp.float64, name
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=name)


@pytest.mark.slow
def test_per_example_norms_of_the_mlp_and_the_mnist1d_cnn_in_float64(x64):
    """The shortcuts are exact: equal to vmap(grad) to float64 precision, in one program (the
    inner loop checks the MLP in float32 with the clipping tests, and conv1d's patches form
    in float32, tests/test_per_example.py; its float64 sweep checks every layer kind)."""
    _assert_norms_equal_vmap_of_grad_in_float64(
        {"mlp": (_mlp(), (5,), 4), "mnist1d cnn": (fbp.cli.build_cnn1d(10), (40,), 5)}
    )


def test_per_example_norms_refuse_batch_norm_in_training():
    # batch norm mixes the examples of a batch: no per-example gradient to speak of
    # (in inference it does not: "batch-norm-inference" in CASES)
    model = nn.serial(nn.dense(4), nn.batch_norm(), nn.dense(2))
    params, _ = _random_params(model, (3,))
    f = diagnostics.per_example_grad_norms(model, losses.mse)
    x, y = np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)
    with pytest.raises(
        fbp.ConfigError,
        match=r"^serial layer 1 \(batch_norm\): a per-example gradient norm does not exist in "
        r"training: batch_norm normalises each example with statistics of the whole batch",
    ):
        jax.eval_shape(f, params, x, y)  # refused while tracing: nothing to compile


# --------------------------------------------------------------------------- clipping


CLIPS = (0.05, 0.5, 5.0, 1e6)


@functools.cache
def _clip_setup():
    model = _mlp()
    params, _ = _random_params(model, (5,))
    rng = np.random.default_rng(1)
    x = device_array(3 * rng.standard_normal((8, 5)), np.float32)
    y = device_array(rng.integers(0, 3, 8), np.int32)
    return model, params, x, y


@functools.cache
def _clip_results():
    """vmap(grad)'s per-example gradients, the loss, fbp's gradient, fbp's clipped gradient
    at every bound of ``CLIPS`` (each a function of its own), and ``value_grad_and_norms``,
    ``value_and_grad`` and ``per_example_grad_norms`` of the same model: one program."""
    model, params, x, y = _clip_setup()

    @jax.jit
    def run(params, x, y):
        per_example = _reference_per_example(model, CE, params, x, y)
        value = CE.value(model.apply(params, x), y)
        clipped = {
            clip: diagnostics.value_clipped_grad_and_norms(model, CE, l2_norm_clip=clip)(
                params, x, y
            )
            for clip in CLIPS
        }
        norms = (
            diagnostics.value_grad_and_norms(model, CE)(params, x, y),
            fbp.value_and_grad(model, CE)(params, x, y),
            diagnostics.per_example_grad_norms(model, CE)(params, x, y),
        )
        return per_example, value, fbp.grad(model, CE)(params, x, y), clipped, norms

    return jax.tree.map(np.asarray, run(params, x, y))


def test_value_grad_and_norms_returns_the_ordinary_gradient_and_the_norms():
    """Cross-entropy through a residual block and a dense layer without bias (the
    clipping tests' model and batch, and their program)."""
    per_example, _, _, _, norms = _clip_results()
    (value, grads, got_norms), (value0, grads0), per_example_norms = norms
    np.testing.assert_allclose(value, value0)
    chex.assert_trees_all_close(grads, grads0, rtol=1e-6, atol=1e-8)
    # The batch gradient is the mean of the per-example gradients.
    chex.assert_trees_all_close(
        jax.tree.map(lambda g: np.mean(g, 0), per_example), grads, rtol=1e-5, atol=1e-7
    )
    want = np.sqrt(
        sum(np.sum(np.square(g.reshape(len(g), -1)), 1) for g in jax.tree.leaves(per_example))
    )
    np.testing.assert_allclose(got_norms, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(per_example_norms, want, rtol=1e-5, atol=1e-7)


def test_clipped_gradient_equals_clipping_vmap_of_grad():
    per_example, value_ref, plain_grads, clipped, _ = _clip_results()
    leaves = jax.tree.leaves(per_example)
    norms = np.sqrt(sum(np.sum(np.square(g.reshape(len(g), -1)), axis=1) for g in leaves))
    for clip in (0.05, 0.5, 1e6):
        factor = np.minimum(1.0, clip / norms)
        want = jax.tree.map(
            lambda g: np.mean(g * factor.reshape((-1,) + (1,) * (g.ndim - 1)), axis=0),  # noqa: B023
            per_example,
        )
        value, grads, got_norms = clipped[clip]
        chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_norms, norms, rtol=1e-5, err_msg=str(clip))
        np.testing.assert_allclose(value, value_ref, rtol=1e-6, err_msg=str(clip))
        if clip == 1e6:  # nothing clipped: the ordinary gradient
            chex.assert_trees_all_close(grads, plain_grads, rtol=1e-5, atol=1e-6)


def test_one_jitted_clipped_gradient_sweeps_bounds_without_recompiling():
    model, params, x, y = _clip_setup()
    swept = jax.jit(diagnostics.value_clipped_grad_and_norms(model, CE, l2_norm_clip=1.0))
    clipped = _clip_results()[3]  # each bound's own function
    for clip in (0.05, 0.5, 5.0):
        _, grads, _ = swept(params, x, y, l2_norm_clip=jnp.asarray(clip))
        chex.assert_trees_all_close(grads, clipped[clip][1], rtol=1e-5, atol=1e-7)
    assert swept._cache_size() == 1


def test_clipped_gradient_noise():
    # The noise does not depend on the model: a small one with more than 500 params
    # (one float32 draw for all leaves, cut into the leaves' shapes).
    model = nn.serial(nn.dense(64), nn.tanh(), nn.dense(3))
    params, _ = _random_params(model, (5,))
    _, _, x, y = _clip_setup()
    clip, sigma = 0.5, 2.0
    clean = diagnostics.value_clipped_grad_and_norms(model, CE, l2_norm_clip=clip)
    noisy = diagnostics.value_clipped_grad_and_norms(
        model, CE, l2_norm_clip=clip, noise_multiplier=sigma
    )

    @jax.jit  # the same bound with and without noise, in one compiled program
    def run(params, x, y, noise_key):
        drawn = diagnostics.gaussian_noise(noise_key, params, sigma * clip / x.shape[0])
        big = jnp.zeros((diagnostics.OWN_DRAW_SIZE,), jnp.bfloat16)  # a leaf with its own draw
        mixed = diagnostics.gaussian_noise(noise_key, {"big": big, "small": params}, 2.0)
        drawn = (drawn, mixed)
        same = jnp.array_equal(  # standard_normal is jax.random.normal's draw, bit for bit
            diagnostics.standard_normal(noise_key, (3, 5)), jax.random.normal(noise_key, (3, 5))
        )
        return clean(params, x, y)[1], noisy(params, x, y, noise_key=noise_key)[1], (drawn, same)

    (g0, g1, ((drawn, mixed), same)), (_, g2, _), (_, g3, _) = (
        jax.tree.map(np.asarray, run(params, x, y, jax.random.key(seed))) for seed in (5, 5, 6)
    )
    assert bool(same)
    # A large leaf draws on its own, in float32 cast to its dtype; the small ones share one.
    big = np.asarray(mixed["big"], np.float64)
    assert mixed["big"].dtype == jnp.bfloat16 and big.shape == (diagnostics.OWN_DRAW_SIZE,)
    np.testing.assert_allclose(big.std(), 2.0, rtol=0.02)
    assert abs(big.mean()) < 4 * 2.0 / np.sqrt(big.size)
    small = np.concatenate([np.ravel(a) for a in jax.tree.leaves(mixed["small"])])
    np.testing.assert_allclose(small.std(), 2.0, rtol=0.1)
    chex.assert_trees_all_equal(g1, g2)  # deterministic in the key
    # The noise is gaussian_noise's draw for the key (shaped and typed like the params).
    chex.assert_trees_all_equal_shapes_and_dtypes(drawn, params)
    chex.assert_trees_all_close(jax.tree.map(np.subtract, g1, g0), drawn, atol=1e-6)
    firsts = [leaf.ravel()[:3] for leaf in jax.tree.leaves(drawn)]
    assert len({tuple(f) for f in firsts}) == len(firsts)  # each leaf its own piece
    assert not np.allclose(g1[0]["w"], g3[0]["w"])
    noise = np.concatenate(
        [np.ravel(a - b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True)]
    )
    expected_std = sigma * clip / x.shape[0]
    assert noise.size > 500
    np.testing.assert_allclose(noise.std(), expected_std, rtol=0.1)
    assert abs(noise.mean()) < 4 * expected_std / np.sqrt(noise.size)


@pytest.mark.slow  # a sweep of keys and shapes; test_clipped_gradient_noise keeps one
def test_standard_normal_is_jax_random_normal_bit_for_bit():
    """The unrolled Threefry draw equals ``jax.random.normal`` exactly, for every key kind.

    Keys: fresh, split, a raw ``PRNGKey`` (all threefry, the fast path)
    and an ``rbg`` key (drawn by ``jax.random.normal`` itself); shapes from one
    entry to a (257, 300) matrix. One compiled program.
    """
    keys = {
        "fresh": jax.random.key(11),
        "split": jax.random.split(jax.random.key(11), 3)[2],
        "raw PRNGKey": jax.random.PRNGKey(2**31 + 5),
        "rbg": jax.random.key(3, impl="rbg"),
    }
    shapes = [(1,), (3, 5), (257, 300)]

    @jax.jit
    def run(keys):
        return {
            name: [
                (diagnostics.standard_normal(k, shape), jax.random.normal(k, shape, jnp.float32))
                for shape in shapes
            ]
            for name, k in keys.items()
        }

    for name, pairs in run(keys).items():
        for (got, want), shape in zip(pairs, shapes, strict=True):
            assert got.dtype == jnp.float32 and got.shape == shape, (name, shape)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    # The draws are not all alike: different keys, different numbers.
    firsts = {name: float(pairs[-1][0][0, 0]) for name, pairs in run(keys).items()}
    assert len(set(firsts.values())) == len(firsts), firsts


def test_clipping_errors():
    model, params, x, y = _clip_setup()
    with pytest.raises(fbp.ConfigError, match="l2_norm_clip must be positive"):
        diagnostics.value_clipped_grad_and_norms(model, CE, l2_norm_clip=0.0)
    with pytest.raises(fbp.ConfigError, match="noise_multiplier must be ≥ 0"):
        diagnostics.value_clipped_grad_and_norms(model, CE, l2_norm_clip=1.0, noise_multiplier=-1)
    f = diagnostics.value_clipped_grad_and_norms(model, CE, l2_norm_clip=1.0, noise_multiplier=1.0)
    with pytest.raises(fbp.ConfigError, match="needs a noise_key"):
        f(params, x, y)


# --------------------------------------------------------------------------- gradient flow


def _flow_references(model, params, x, y):
    """Gradient-flow quantities by plain jax.numpy and jax.grad (jit it: one program)."""
    # Activations, by plain jax.numpy.
    a0 = x @ params[0]["w"] + params[0]["b"][None, :]
    h1 = jax.nn.sigmoid(a0)
    a2 = h1 @ params[2]["w"] + params[2]["b"][None, :]
    h3 = jax.nn.relu(a2)
    out = h3 @ params[4]["w"] + params[4]["b"][None, :]
    rms = jnp.stack([jnp.sqrt(jnp.mean(a**2)) for a in (a0, h1, a2, h3, out)])
    # Deltas at each layer's output, by jax.grad with respect to that output.
    layers = model.children

    def rest(i, a):  # the network above layer i, applied to its output a
        for j in range(i + 1, len(layers)):
            a = layers[j].apply(params[j], a)
        return CE.value(a, y)

    deltas = [jax.grad(lambda a, i=i: rest(i, a))(h) for i, h in enumerate((a0, h1, a2, h3, out))]
    delta_norms = jnp.stack([jnp.linalg.norm(d) for d in deltas])
    reference = jax.grad(lambda p: CE.value(model.apply(p, x), y))(params)
    grad_norms = {
        i: jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(reference[i]))) for i in (0, 2, 4)
    }
    sig_slope = h1 * (1 - h1)
    saturation = {1: jnp.mean(sig_slope < 0.05), 3: jnp.mean(a2 <= 0)}
    return rms, delta_norms, grad_norms, saturation


def test_gradient_flow_statistics_equal_direct_computation():
    model = nn.serial(nn.dense(8), nn.sigmoid(), nn.dense(6), nn.relu(), nn.dense(3))
    params, _ = _random_params(model, (4,))
    rng = np.random.default_rng(1)
    x = device_array(2 * rng.standard_normal((10, 4)), np.float32)
    y = device_array(rng.integers(0, 3, 10), np.int32)

    @jax.jit  # the flow, fbp's gradient and the references in one compiled program
    def run(params, x, y):
        flow = diagnostics.value_grad_and_flow(model, CE, saturation_threshold=0.05)
        references = _flow_references(model, params, x, y)
        return flow(params, x, y), fbp.grad(model, CE)(params, x, y), references

    (_value, grads, flow), plain_grads, references = jax.tree.map(np.asarray, run(params, x, y))
    rms, delta_norms, grad_norms, saturation = references
    assert diagnostics.layer_names(model) == [
        "0 dense(→8)",
        "1 sigmoid",
        "2 dense(→6)",
        "3 relu",
        "4 dense(→3)",
    ]
    chex.assert_trees_all_close(grads, plain_grads, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(flow.activation_rms, rms, rtol=1e-5)
    np.testing.assert_allclose(flow.delta_norm, delta_norms, rtol=1e-5)
    for i in (0, 2, 4):
        np.testing.assert_allclose(flow.grad_norm[i], grad_norms[i], rtol=1e-5)
    assert np.isnan(flow.grad_norm[1]) and np.isnan(flow.saturation[0])
    np.testing.assert_allclose(flow.saturation[1], saturation[1], rtol=1e-6)
    np.testing.assert_allclose(flow.saturation[3], saturation[3], rtol=1e-6)


def _deep(activation, depth=10, width=32):
    layers = []
    for _ in range(depth):
        layers += [nn.dense(width), activation()]
    return nn.serial(*layers, nn.dense(10))


def test_gradient_flow_shows_vanishing_gradients_in_deep_sigmoid_nets():
    # 256 random 8×8 "images" with intensities in [0, 1) and ten classes, as digits
    # (the data does not matter here; loading digits imports scikit-learn: seconds)
    rng = np.random.default_rng(0)
    x = device_array(rng.random((256, 64)), np.float32)
    y = device_array(rng.integers(0, 10, 256), np.int32)
    # LeCun's initialisation for the sigmoid net (fbp's default), He's for the ReLU net:
    # W ~ N(0, gain/fan_in), b = 0, drawn with numpy (initializers compiled cost 6x the rest)
    models = {"sigmoid": (_deep(nn.sigmoid), 1.0), "relu": (_deep(nn.relu), 2.0)}
    params = {
        name: jax.tree.map(
            lambda a, gain=gain: device_array(
                rng.standard_normal(a.shape) * np.sqrt(gain / a.shape[0])
                if len(a.shape) == 2
                else np.zeros(a.shape),
                jnp.float32,
            ),
            init_shapes(model, (64,))[0],
        )
        for name, (model, gain) in models.items()
    }

    @jax.jit  # both networks in one compiled program
    def run(params, x, y):
        return {
            name: diagnostics.value_grad_and_flow(model, CE)(params[name], x, y)[2].grad_norm
            for name, (model, _) in models.items()
        }

    ratios = {}
    for name, g in run(params, x, y).items():
        g = np.asarray(g)
        g = g[~np.isnan(g)]
        ratios[name] = g[0] / g[-2]  # first layer against the last hidden layer
    assert ratios["sigmoid"] < 1e-3, ratios  # each sigmoid multiplies δ by σ′ ≤ 1/4
    assert 0.2 < ratios["relu"] < 5, ratios


def test_gradient_flow_inside_scan_and_plot(tmp_path):
    import matplotlib.pyplot as plt

    model = nn.serial(nn.dense(8), nn.tanh(), nn.dense(8), nn.sigmoid(), nn.dense(3))
    params, _ = _random_params(model, (4,))
    x = device_array(np.random.default_rng(1).standard_normal((16, 4)), np.float32)
    y = device_array(np.arange(16) % 3, np.int32)
    f = diagnostics.value_grad_and_flow(model, CE)

    @jax.jit
    def train(params):
        def step(p, _):
            _, g, flow = f(p, x, y)
            return jax.tree.map(lambda a, b: a - 0.5 * b, p, g), flow

        return jax.lax.scan(step, params, None, length=5)

    _, history = train(params)
    history = jax.tree.map(np.asarray, history)
    assert history.grad_norm.shape == (5, 5)
    fig = diagnostics.plot_gradient_flow(history, model, label="tanh/sigmoid")
    assert len(fig.axes) == 4
    assert fig.axes[0].get_yscale() == "log"
    assert all(ax.get_xlabel() and ax.get_ylabel() and ax.get_title() for ax in fig.axes)
    one = jax.tree.map(lambda a: a[-1], history)
    fig2 = diagnostics.plot_gradient_flow(
        one, diagnostics.layer_names(model), label="again", axes=fig.axes, parameterised_only=True
    )
    assert fig2 is fig
    fig.savefig(tmp_path / "flow.png")
    assert (tmp_path / "flow.png").stat().st_size > 0
    with pytest.raises(fbp.ConfigError, match="the flow has 5 layers but 2 names"):
        diagnostics.plot_gradient_flow(one, ["a", "b"])
    plt.close("all")


# --------------------------------------------------------------------------- angles


def test_angle_degrees():
    a = {"w": np.array([[1.0, 0.0]], np.float32), "b": np.array([0.0], np.float32)}
    b = {"w": np.array([[1.0, 1.0]], np.float32), "b": np.array([0.0], np.float32)}
    # nearly parallel: arccos of a float32 cosine (1 - 5e-9 rounds to 1) would say 0
    near = (np.array([1.0, 0.0], np.float32), np.array([1.0, 1e-4], np.float32))

    @jax.jit  # every angle in one compiled program (eagerly, each op would compile alone)
    def angles(a, b, near):
        zero = jax.tree.map(jnp.zeros_like, a)
        return (
            diagnostics.angle_degrees(a, b),
            diagnostics.angle_degrees(a, a),
            diagnostics.angle_degrees(a["w"], -a["w"]),
            diagnostics.angle_degrees(*near),
            diagnostics.angle_degrees(a, zero),
        )

    ab, aa, opposite, tiny, with_zero = angles(a, b, near)
    np.testing.assert_allclose(ab, 45.0, rtol=1e-5)
    np.testing.assert_allclose(aa, 0.0, atol=1e-2)
    np.testing.assert_allclose(opposite, 180.0, rtol=1e-5)
    np.testing.assert_allclose(tiny, np.degrees(np.arctan(1e-4)), rtol=1e-4)
    assert np.isnan(with_zero)


def test_value_grad_and_angles_against_true_gradient():
    model = nn.serial(nn.dense(8), nn.tanh(), nn.dense(8), nn.tanh(), nn.dense(3))
    params, _ = _random_params(model, (4,))
    x = device_array(np.random.default_rng(1).standard_normal((16, 4)), np.float32)
    y = device_array(np.arange(16) % 3, np.int32)
    rule = fbp.rules.feedback_alignment(jax.random.key(2))

    @jax.jit  # the angles and their references in one compiled program
    def run(params, x, y):
        _value, updates, angles = diagnostics.value_grad_and_angles(model, CE, rule)(params, x, y)
        want_updates = fbp.grad(model, CE, rule=rule)(params, x, y)
        true = jax.grad(lambda p: CE.value(model.apply(p, x), y))(params)
        zero = diagnostics.value_grad_and_angles(model, CE, fbp.rules.backprop())(params, x, y)
        return updates, angles, want_updates, true, zero[2]

    updates, angles, want_updates, true, zero = jax.tree.map(np.asarray, run(params, x, y))
    chex.assert_trees_all_close(updates, want_updates, rtol=1e-5, atol=1e-7)
    for i, layer in enumerate((0, 2, 4)):
        w_rule = np.ravel(updates[layer]["w"]).astype(np.float64)
        w_true = np.ravel(true[layer]["w"]).astype(np.float64)
        cos = w_rule @ w_true / (np.linalg.norm(w_rule) * np.linalg.norm(w_true))
        # (the top layer's update is the true gradient: a rounded cosine may exceed 1)
        np.testing.assert_allclose(angles[i], np.degrees(np.arccos(min(cos, 1.0))), atol=1e-2)
    np.testing.assert_allclose(zero, 0.0, atol=1e-2)
    with pytest.raises(fbp.ConfigError, match="has no layers with weights"):
        diagnostics.value_grad_and_angles(nn.serial(nn.tanh()), CE, rule)(({},), x, y)


def test_deprecated_names_warn_and_give_the_same_results():
    model = nn.serial(nn.dense(4), nn.tanh(), nn.dense(3))
    params, _ = _random_params(model, (2,))
    x, y = np.ones((5, 2), np.float32), device_array([0, 1, 2, 0, 1], np.int32)
    pairs = [
        ("clipped_value_and_grad", "value_clipped_grad_and_norms", {"l2_norm_clip": 0.1}),
        ("gradient_flow", "value_grad_and_flow", {}),
    ]
    functions = []
    for old, new, kwargs in pairs:
        with pytest.warns(DeprecationWarning, match=rf"diagnostics\.{old} is deprecated.*{new}"):
            f_old = getattr(diagnostics, old)(model, CE, **kwargs)
        functions.append((f_old, getattr(diagnostics, new)(model, CE, **kwargs)))

    @jax.jit  # old and new names side by side in one compiled program
    def run(params, x, y):
        return [(f_old(params, x, y), f_new(params, x, y)) for f_old, f_new in functions]

    for old_result, new_result in run(params, x, y):
        for a, b in zip(jax.tree.leaves(old_result), jax.tree.leaves(new_result), strict=True):
            np.testing.assert_array_equal(a, b)
