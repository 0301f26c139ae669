"""fbp.diagnostics against independent references.

Per-example norms and DP-SGD clipping against ``jax.vmap(jax.grad(...))`` of
the plain forward on one example at a time; gradient-flow statistics against
the same quantities computed with jax.numpy and ``jax.grad``; the vanishing
gradients of a deep sigmoid network against their absence with ReLU and He
initialisation; plots drawn with matplotlib's Agg backend.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

import fbp
import fbp.cli
from fbp import data, diagnostics, losses, nn

matplotlib.use("Agg")

CE = losses.softmax_cross_entropy


def _reference_per_example(model, loss, params, x, y):
    """Per-example gradients by autodiff of the loss on one example at a time."""

    def one(p, xi, yi):
        return loss.value(model.apply(p, xi[None]), yi[None])

    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)


def _norms_of(per_example):
    leaves = jax.tree.leaves(per_example)
    batch = leaves[0].shape[0]
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(batch, -1)), axis=1) for g in leaves))


def _norms_and_reference(model, loss, params, x, y):
    """fbp's per-example norms and vmap(grad)'s (jit it: one program for both)."""
    got = diagnostics.per_example_grad_norms(model, loss)(params, x, y)
    return got, _norms_of(_reference_per_example(model, loss, params, x, y))


def _mlp():
    return nn.serial(
        nn.dense(16),
        nn.relu(),
        nn.residual(nn.serial(nn.dense(16), nn.tanh())),
        nn.dense(12, use_bias=False),
        nn.gelu(),
        nn.dense(3),
    )


def _targets(loss, key, batch, shape):
    if loss is CE:
        return jax.random.randint(key, (batch,), 0, shape[-1])
    if loss is losses.sigmoid_binary_cross_entropy:
        return jax.random.bernoulli(key, 0.5, (batch, *shape)).astype(jnp.float32)
    return jax.random.normal(key, (batch, *shape))


CASES = {
    # name: (model, input shape, loss)
    "mlp-ce": (_mlp, (5,), CE),
    "mlp-mse": (_mlp, (5,), losses.mse),
    "mlp-bce": (_mlp, (5,), losses.sigmoid_binary_cross_entropy),
    # sequences: the outer-product shortcut does not hold; Gram form (T small)...
    "seq-gram": (lambda: nn.serial(nn.dense(32), nn.tanh(), nn.dense(24)), (3, 20), losses.mse),
    # ...and explicit per-example dW (T large next to the widths)
    "seq-explicit": (lambda: nn.serial(nn.dense(3), nn.tanh(), nn.dense(2)), (9, 4), losses.mse),
    "flatten": (lambda: nn.serial(nn.flatten(), nn.dense(6), nn.elu(), nn.dense(3)), (2, 3), CE),
    # layer norm normalizes each example alone: its scale and bias have per-example rules
    "layer-norm": (
        lambda: nn.serial(nn.dense(6), nn.layer_norm(), nn.tanh(), nn.dense(3)),
        (5,),
        CE,
    ),
    "layer-norm-seq": (
        lambda: nn.serial(nn.dense(4), nn.layer_norm(use_bias=False), nn.dense(2)),
        (3, 5),
        losses.mse,
    ),
    # convolutions: patches form (dense algebra over output positions) and XLA form
    "conv1d-cnn": (lambda: fbp.cli.build_cnn1d(4, channels=3), (12,), CE),
    "conv1d-xla": (
        lambda: nn.serial(
            nn.conv1d(3, 3, strides=2, dilation=1, implementation="xla"),
            nn.relu(),
            nn.conv1d(2, 2, use_bias=False, padding="VALID", implementation="xla"),
            nn.flatten(),
            nn.dense(3),
        ),
        (9, 2),
        CE,
    ),
    "conv2d": (
        lambda: nn.serial(
            nn.conv2d(4, (3, 2), strides=(2, 1)),
            nn.tanh(),
            nn.conv2d(2, 2, dilation=2, padding="VALID", use_bias=False),
            nn.flatten(),
            nn.dense(3),
        ),
        (7, 6, 2),
        losses.mse,
    ),
}


def _groups():
    """The cases grouped by loss: one compiled program per loss runs them all."""
    groups = {}
    for name in sorted(CASES):
        groups.setdefault(CASES[name][2], []).append(name)
    return groups


def _norms_and_references(loss, names, batches):
    """Per case and batch size: (got, want), the whole group in one jitted call."""
    models = {name: CASES[name][0]() for name in names}

    @jax.jit
    def run():
        out = {}
        for name in names:
            model, shape = models[name], CASES[name][1]
            for batch in batches:
                k_init, k_x, k_y = jax.random.split(jax.random.key(batch), 3)
                params, out_shape = model.init(k_init, shape)
                x = jax.random.normal(k_x, (batch, *shape))
                y = _targets(loss, k_y, batch, out_shape)
                want = _norms_of(_reference_per_example(model, loss, params, x, y))
                got = diagnostics.per_example_grad_norms(model, loss)(params, x, y)
                out[f"{name}-{batch}"] = (got, want)
        return out

    return run()


@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_per_example_norms_equal_vmap_of_grad(loss_name):
    loss = {
        "ce": CE,
        "mse": losses.mse,
        "bce": losses.sigmoid_binary_cross_entropy,
    }[loss_name]
    names = _groups()[loss]
    batches = (1, 7)
    results = _norms_and_references(loss, names, batches)
    assert len(results) == len(names) * len(batches)
    failures = []
    for case, (got, want) in results.items():
        batch = int(case.rsplit("-", 1)[1])
        if got.shape != (batch,):
            failures.append(f"{case}: shape {got.shape} != {(batch,)}")
            continue
        try:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=case)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


def test_value_grad_and_norms_returns_the_ordinary_gradient():
    model = _mlp()
    params, _ = model.init(jax.random.key(0), (5,))
    x, y = jax.random.normal(jax.random.key(1), (6, 5)), jnp.arange(6) % 3

    @jax.jit  # fbp's results and the reference in one compiled program
    def run(params, x, y):
        return (
            diagnostics.value_grad_and_norms(model, CE)(params, x, y),
            fbp.value_and_grad(model, CE)(params, x, y),
            _reference_per_example(model, CE, params, x, y),
        )

    (value, grads, _norms), (value0, grads0), per_example = run(params, x, y)
    np.testing.assert_allclose(value, value0)
    chex.assert_trees_all_close(grads, grads0, rtol=1e-6, atol=1e-8)
    # The batch gradient is the mean of the per-example gradients.
    chex.assert_trees_all_close(
        jax.tree.map(lambda g: g.mean(0), per_example), grads, rtol=1e-5, atol=1e-7
    )


def test_per_example_norms_float64(x64):
    model = _mlp()
    params, _ = model.init(jax.random.key(0), (5,))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (4, 5), jnp.float64)
    y = jnp.arange(4) % 3
    got, want = jax.jit(_norms_and_reference, static_argnums=(0, 1))(model, CE, params, x, y)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_per_example_norms_of_a_layer_without_a_rule_use_the_fallback():
    def init(key, shape):
        return {"s": 1 + jax.random.normal(key, shape[-1:])}, shape

    scale = nn.from_jax(lambda p, x: x * p["s"][None, :], init, name="scale")
    model = nn.serial(nn.dense(4), scale, nn.tanh(), nn.dense(2))
    params, _ = model.init(jax.random.key(0), (3,))
    x, y = (
        jax.random.normal(jax.random.key(1), (5, 3)),
        jax.random.normal(jax.random.key(2), (5, 2)),
    )
    got, want = jax.jit(_norms_and_reference, static_argnums=(0, 1))(
        model, losses.mse, params, x, y
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_per_example_norms_refuse_batch_norm_in_training():
    # batch norm mixes the examples of a batch: no per-example gradient to speak of
    model = nn.serial(nn.dense(4), nn.batch_norm(), nn.dense(2))
    params, _ = model.init(jax.random.key(0), (3,))
    f = diagnostics.per_example_grad_norms(model, losses.mse)
    x, y = jax.random.normal(jax.random.key(1), (4, 3)), jnp.ones((4, 2))
    with pytest.raises(
        fbp.ConfigError,
        match=r"^serial layer 1 \(batch_norm\): a per-example gradient norm does not exist in "
        r"training: batch_norm normalises each example with statistics of the whole batch",
    ):
        f(params, x, y)
    # In inference the running statistics make the examples independent.
    got, want = jax.jit(  # the reference's forward runs with train=False
        lambda p, x, y: (
            f(p, x, y, train=False),
            _norms_of(_reference_per_example(model, losses.mse, p, x, y)),
        )
    )(params, x, y)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("repeats", [False, True], ids=["distinct-ids", "repeated-ids"])
def test_per_example_norms_of_an_embedding_equal_vmap_of_grad(repeats):
    """Repeated ids add their rows: the masked Gram form counts the cross terms."""
    model = nn.serial(nn.embedding(7 if repeats else 50, 4), nn.flatten(), nn.dense(3))
    params, _ = model.init(jax.random.key(0), (6,))
    ids = jax.random.randint(jax.random.key(1), (5, 6), 0, 7 if repeats else 50)
    y = jnp.arange(5) % 3

    def one(p, ids_i, y_i):
        return CE.value(model.apply(p, ids_i[None]), y_i[None])

    got, want = jax.jit(  # fbp's norms and the reference in one compiled program
        lambda p, ids, y: (
            diagnostics.per_example_grad_norms(model, CE)(p, ids, y),
            _norms_of(jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(p, ids, y)),
        )
    )(params, ids, y)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_per_example_norms_of_the_mnist1d_cnn_in_float64(x64):
    """The patches-form shortcut is exact: equal to vmap(grad) to float64 precision."""
    model = fbp.cli.build_cnn1d(10)
    params, _ = model.init(jax.random.key(3), (40,))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(4), (5, 40), jnp.float64)
    y = jnp.arange(5) % 10
    got, want = jax.jit(_norms_and_reference, static_argnums=(0, 1))(model, CE, params, x, y)
    np.testing.assert_allclose(got, want, rtol=1e-12)


# --------------------------------------------------------------------------- clipping


@pytest.fixture(scope="module")
def clip_setup():
    model = _mlp()
    params, _ = model.init(jax.random.key(0), (5,))
    x = 3 * jax.random.normal(jax.random.key(1), (8, 5))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 3)
    return model, params, x, y


@functools.cache
def _clip_references(model, loss):
    """vmap(grad)'s per-example gradients, the loss and fbp's gradient: one program."""

    @jax.jit
    def run(params, x, y):
        per_example = _reference_per_example(model, loss, params, x, y)
        value = loss.value(model.apply(params, x), y)
        return per_example, value, fbp.grad(model, loss)(params, x, y)

    return run


@pytest.mark.parametrize("clip", [0.05, 0.5, 1e6])
def test_clipped_gradient_equals_clipping_vmap_of_grad(clip_setup, clip):
    model, params, x, y = clip_setup
    per_example, value_ref, plain_grads = _clip_references(model, CE)(params, x, y)
    norms = _norms_of(per_example)
    factor = jnp.minimum(1.0, clip / norms)
    want = jax.tree.map(
        lambda g: jnp.mean(g * factor.reshape((-1,) + (1,) * (g.ndim - 1)), axis=0), per_example
    )
    f = diagnostics.value_clipped_grad_and_norms(model, CE, l2_norm_clip=clip)
    value, grads, got_norms = jax.jit(f)(params, x, y)
    chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_norms, norms, rtol=1e-5)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    if clip == 1e6:  # nothing clipped: the ordinary gradient
        chex.assert_trees_all_close(grads, plain_grads, rtol=1e-5, atol=1e-6)


def test_one_jitted_clipped_gradient_sweeps_bounds_without_recompiling(clip_setup):
    model, params, x, y = clip_setup
    swept = jax.jit(diagnostics.value_clipped_grad_and_norms(model, CE, l2_norm_clip=1.0))
    for clip in (0.05, 0.5, 5.0):
        _, grads, _ = swept(params, x, y, l2_norm_clip=jnp.asarray(clip))
        f = diagnostics.value_clipped_grad_and_norms(model, CE, l2_norm_clip=clip)
        chex.assert_trees_all_close(grads, f(params, x, y)[1], rtol=1e-5, atol=1e-7)
    assert swept._cache_size() == 1


def test_clipped_gradient_noise(clip_setup):
    model, params, x, y = clip_setup
    clip, sigma = 0.5, 2.0
    clean = diagnostics.value_clipped_grad_and_norms(model, CE, l2_norm_clip=clip)
    noisy = jax.jit(
        diagnostics.value_clipped_grad_and_norms(
            model, CE, l2_norm_clip=clip, noise_multiplier=sigma
        )
    )
    _, g0, _ = clean(params, x, y)
    _, g1, _ = noisy(params, x, y, noise_key=jax.random.key(5))
    _, g2, _ = noisy(params, x, y, noise_key=jax.random.key(5))
    _, g3, _ = noisy(params, x, y, noise_key=jax.random.key(6))
    chex.assert_trees_all_equal(g1, g2)  # deterministic in the key
    assert not np.allclose(g1[0]["w"], g3[0]["w"])
    noise = np.concatenate(
        [np.ravel(a - b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True)]
    )
    expected_std = sigma * clip / x.shape[0]
    assert noise.size > 500
    np.testing.assert_allclose(noise.std(), expected_std, rtol=0.1)
    assert abs(noise.mean()) < 4 * expected_std / np.sqrt(noise.size)


def test_clipping_errors(clip_setup):
    model, params, x, y = clip_setup
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
    params, _ = model.init(jax.random.key(0), (4,))
    x = 2 * jax.random.normal(jax.random.key(1), (10, 4))
    y = jax.random.randint(jax.random.key(2), (10,), 0, 3)

    @jax.jit  # the flow, fbp's gradient and the references in one compiled program
    def run(params, x, y):
        flow = diagnostics.value_grad_and_flow(model, CE, saturation_threshold=0.05)
        return flow(params, x, y), fbp.grad(model, CE)(params, x, y)

    (_value, grads, flow), plain_grads = run(params, x, y)
    rms, delta_norms, grad_norms, saturation = jax.jit(_flow_references, static_argnums=0)(
        model, params, x, y
    )
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


def _deep(activation, w_init, depth=10, width=32):
    layers = []
    for _ in range(depth):
        layers += [nn.dense(width, w_init=w_init), activation()]
    return nn.serial(*layers, nn.dense(10))


def test_gradient_flow_shows_vanishing_gradients_in_deep_sigmoid_nets():
    digits = data.load("digits")
    x, y = jnp.asarray(digits.x_train[:256]), jnp.asarray(digits.y_train[:256])
    ratios = {}
    for name, model in {
        "sigmoid": _deep(nn.sigmoid, None),
        "relu": _deep(nn.relu, jax.nn.initializers.he_normal()),
    }.items():
        params, _ = model.init(jax.random.key(0), digits.input_shape)
        _, _, flow = jax.jit(diagnostics.value_grad_and_flow(model, CE))(params, x, y)
        g = np.asarray(flow.grad_norm)
        g = g[~np.isnan(g)]
        ratios[name] = g[0] / g[-2]  # first layer against the last hidden layer
    assert ratios["sigmoid"] < 1e-3, ratios  # each sigmoid multiplies δ by σ′ ≤ 1/4
    assert 0.2 < ratios["relu"] < 5, ratios


def test_gradient_flow_inside_scan_and_plot(tmp_path):
    import matplotlib.pyplot as plt

    model = nn.serial(nn.dense(8), nn.tanh(), nn.dense(8), nn.sigmoid(), nn.dense(3))
    params, _ = model.init(jax.random.key(0), (4,))
    x, y = jax.random.normal(jax.random.key(1), (16, 4)), jnp.arange(16) % 3
    f = diagnostics.value_grad_and_flow(model, CE)

    @jax.jit
    def train(params):
        def step(p, _):
            _, g, flow = f(p, x, y)
            return jax.tree.map(lambda a, b: a - 0.5 * b, p, g), flow

        return jax.lax.scan(step, params, None, length=5)

    _, history = train(params)
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
    a = {"w": jnp.array([[1.0, 0.0]]), "b": jnp.array([0.0])}
    b = {"w": jnp.array([[1.0, 1.0]]), "b": jnp.array([0.0])}
    np.testing.assert_allclose(diagnostics.angle_degrees(a, b), 45.0, rtol=1e-5)
    np.testing.assert_allclose(diagnostics.angle_degrees(a, a), 0.0, atol=1e-2)
    np.testing.assert_allclose(diagnostics.angle_degrees(a["w"], -a["w"]), 180.0, rtol=1e-5)
    # nearly parallel: arccos of a float32 cosine (1 - 5e-9 rounds to 1) would say 0
    tiny = diagnostics.angle_degrees(jnp.array([1.0, 0.0]), jnp.array([1.0, 1e-4]))
    np.testing.assert_allclose(tiny, np.degrees(np.arctan(1e-4)), rtol=1e-4)
    assert np.isnan(diagnostics.angle_degrees(a, jax.tree.map(jnp.zeros_like, a)))


def test_value_grad_and_angles_against_true_gradient():
    model = nn.serial(nn.dense(8), nn.tanh(), nn.dense(8), nn.tanh(), nn.dense(3))
    params, _ = model.init(jax.random.key(0), (4,))
    x, y = jax.random.normal(jax.random.key(1), (16, 4)), jnp.arange(16) % 3
    rule = fbp.rules.feedback_alignment(jax.random.key(2))

    @jax.jit  # the angles and their references in one compiled program
    def run(params, x, y):
        _value, updates, angles = diagnostics.value_grad_and_angles(model, CE, rule)(params, x, y)
        want_updates = fbp.grad(model, CE, rule=rule)(params, x, y)
        true = jax.grad(lambda p: CE.value(model.apply(p, x), y))(params)
        zero = diagnostics.value_grad_and_angles(model, CE, fbp.rules.backprop())(params, x, y)
        return updates, angles, want_updates, true, zero[2]

    updates, angles, want_updates, true, zero = run(params, x, y)
    chex.assert_trees_all_close(updates, want_updates, rtol=1e-5, atol=1e-7)
    for i, layer in enumerate((0, 2, 4)):
        w_rule, w_true = np.ravel(updates[layer]["w"]), np.ravel(true[layer]["w"])
        cos = w_rule @ w_true / (np.linalg.norm(w_rule) * np.linalg.norm(w_true))
        np.testing.assert_allclose(angles[i], np.degrees(np.arccos(cos)), atol=1e-2)
    np.testing.assert_allclose(zero, 0.0, atol=1e-2)
    with pytest.raises(fbp.ConfigError, match="has no layers with weights"):
        diagnostics.value_grad_and_angles(nn.serial(nn.tanh()), CE, rule)(({},), x, y)


def test_deprecated_names_warn_and_give_the_same_results():
    model = nn.serial(nn.dense(4), nn.tanh(), nn.dense(3))
    params, _ = model.init(jax.random.key(0), (2,))
    x, y = jnp.ones((5, 2)), jnp.array([0, 1, 2, 0, 1])
    pairs = [
        ("clipped_value_and_grad", "value_clipped_grad_and_norms", {"l2_norm_clip": 0.1}),
        ("gradient_flow", "value_grad_and_flow", {}),
    ]
    for old, new, kwargs in pairs:
        with pytest.warns(DeprecationWarning, match=rf"diagnostics\.{old} is deprecated.*{new}"):
            f_old = getattr(diagnostics, old)(model, CE, **kwargs)
        f_new = getattr(diagnostics, new)(model, CE, **kwargs)
        for a, b in zip(
            jax.tree.leaves(f_old(params, x, y)), jax.tree.leaves(f_new(params, x, y)), strict=True
        ):
            np.testing.assert_array_equal(a, b)
