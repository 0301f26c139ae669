"""The one walker (fbp.nn.walk): declared structure, paths, instrumented runs, fallbacks."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import normal32, numpy_params

import fbp
from fbp import losses, nn, verify
from fbp.nn import walk


def _model():
    return nn.serial(
        nn.dense(6),
        nn.tanh(),
        nn.residual(nn.serial(nn.dense(6), nn.relu())),
        nn.reshape((3, 2)),
        nn.bidirectional(nn.gru(2), nn.rnn(3, reverse=True)),
        nn.mean_over_time(),
        nn.dense(2),
    )


def test_leaves_follow_declared_structure_with_params_and_cache_paths():
    model = _model()
    sites = walk.leaves(model)
    assert [s.label for s in sites] == ["0", "1", "2.0", "2.1", "3", "4.0", "4.1", "5", "6"]
    assert [s.index for s in sites] == list(range(9))
    assert sites[2].context == "in residual" and sites[5].context == "in bidirectional"
    assert sites[5].description == "layer 4.0 (gru(→2) in bidirectional)"
    params = numpy_params(model, (4,))
    _, cache = jax.eval_shape(model.forward, params, jax.ShapeDtypeStruct((2, 4), jnp.float32))
    by_label = {s.label: s for s in sites}
    assert walk.at_path(params, by_label["2.0"].path) is params[2][0]
    assert walk.at_path(params, by_label["4.1"].path) is params[4][1]
    assert walk.at_path(cache, by_label["4.1"].cache_path) is cache[4][1]
    assert walk.at_path(cache, by_label["2.1"].cache_path) is cache[2][1]
    with pytest.raises(fbp.ShapeError, match="are these params from another model"):
        walk.at_path(params, (9,))


def test_instrumented_runs_equal_the_model_and_hand_each_leaf_its_input():
    model = _model()
    params = numpy_params(model, (4,))
    x, dy = normal32(1, 3, 4), normal32(2, 3, 2)
    visits = []

    @jax.jit  # the model's own passes and the walker's, in one compiled program
    def run(params, x, dy):
        y, cache = model.forward(params, x)
        want = model.backward(params, cache, dy)
        seen, visited = {}, {}

        def on_leaf(site, p, x_in, y_out, c):
            seen[site.index] = (x_in, y_out)

        y2, tape = walk.forward(model, params, x, on_leaf=on_leaf)

        def hook(visit):
            visits.append(visit.site.index)
            visited[visit.site.index] = (visit.x, visit.dy)
            return visit.backward()

        got = walk.backward(model, params, tape, dy, hook)
        return y, y2, cache, walk.untape(model, tape), want, got, seen, visited

    y, y2, cache, untaped, want, got, seen, visited = run(params, x, dy)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(seen[0][0], x)  # the first layer sees the model's input
    chex.assert_trees_all_equal(untaped, cache)
    assert set(visited) == set(seen)
    for index, (x_in, dy_in) in visited.items():
        np.testing.assert_array_equal(x_in, seen[index][0])
        assert dy_in.shape == seen[index][1].shape
    chex.assert_trees_all_equal(got, want)
    # Every leaf once, the last first (the two directions of bidirectional in its own order).
    assert sorted(visits) == list(range(9)) and visits[0] == 8 and visits[-1] == 0


def _scaled_pair(a, b):
    """A user's combinator: y = a(x) + 2·b(x), declared so the walker goes inside."""

    def init(key, shape):
        ka, kb = jax.random.split(key)
        pa, out = a.init(ka, shape)
        pb, _ = b.init(kb, shape)
        return {"a": pa, "b": pb}, out

    def forward(params, x, *, key=None, train=False):
        ya, ca = a.forward(params["a"], x, key=key, train=train)
        yb, cb = b.forward(params["b"], x, key=key, train=train)
        return ya + 2 * yb, {"a": ca, "b": cb}

    def backward(params, cache, dy):
        dpa, dxa = a.backward(params["a"], cache["a"], dy)
        dpb, dxb = b.backward(params["b"], cache["b"], 2 * dy)
        return {"a": dpa, "b": dpb}, dxa + dxb

    structure = nn.Structure(
        rebuild=_scaled_pair, param_paths=(("a",), ("b",)), cache_paths=(("a",), ("b",))
    )
    return nn.Layer(init, forward, backward, "scaled_pair", (a, b), structure)


def test_a_users_combinator_that_declares_its_structure_is_walked_into():
    model = nn.serial(_scaled_pair(nn.dense(3), nn.dense(3)), nn.tanh(), nn.dense(2))
    assert [s.label for s in walk.leaves(model)] == ["0.a", "0.b", "1", "2"]
    params = numpy_params(model, (4,))
    x, y = normal32(1, 5, 4), np.arange(5, dtype=np.int32) % 2
    report = verify.check_model(model, losses.softmax_cross_entropy, params, x, y)
    assert report.ok
    assert {r.path for r in report.rows if r.method == "vjp"} >= {(0, "a"), (0, "b")}
    norms = fbp.diagnostics.per_example_grad_norms(model, losses.softmax_cross_entropy)

    @jax.jit  # the norms and their reference in one compiled program
    def run(params, x, y):
        ref = jax.vmap(
            jax.grad(
                lambda p, xi, yi: losses.softmax_cross_entropy.value(
                    model.apply(p, xi[None]), yi[None]
                )
            ),
            in_axes=(None, 0, 0),
        )(params, x, y)
        want = jnp.sqrt(sum(jnp.sum(g.reshape(5, -1) ** 2, axis=1) for g in jax.tree.leaves(ref)))
        return norms(params, x, y), want

    got, want = run(params, x, y)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_replacing_a_function_drops_the_declarations():
    dense = nn.dense(3)
    assert dense.extensions is not None and dense.extensions.weights == ("w",)
    renamed = dense._replace(name="mine")
    assert renamed.extensions is dense.extensions  # a new name keeps them
    mine = dense._replace(backward=lambda p, c, dy: dense.backward(p, c, dy))
    assert mine.extensions is None and mine.structure is None
    kept = dense._replace(backward=dense.backward, extensions=dense.extensions)
    assert kept.extensions is dense.extensions  # unless given again
    inner = nn.serial(nn.dense(2), nn.relu())
    assert inner.structure is not None
    wrapped = inner._replace(backward=lambda p, c, dy: inner.backward(p, c, dy))
    assert wrapped.structure is None and wrapped.children == inner.children
    assert [s.label for s in walk.leaves(nn.serial(wrapped, nn.dense(1)))] == ["0", "1"]


def test_feedback_weights_are_declared_or_every_matrix():
    sites = {s.label: s for s in walk.leaves(nn.serial(nn.dense(3), nn.layer_norm()))}
    ones = functools.partial(np.ones, dtype=np.float32)  # numpy: nothing to compile
    assert walk.feedback_weights(sites["0"], {"w": ones((2, 3)), "b": ones(3)}) == (("w",),)
    assert walk.feedback_weights(sites["1"], {"scale": ones(3)}) == ()
    mine = nn.Layer(*nn.dense(3)[:3], name="mine")
    site = walk.leaves(mine)[0]
    params = {"k": [ones((2, 3)), ones(3)], "ids": np.ones((2, 2), np.int32)}
    assert walk.feedback_weights(site, params) == (("k", 0),)
    bad = mine._replace(extensions=nn.Extensions(weights=("v",)))
    with pytest.raises(fbp.ConfigError, match=r"declares weights \['v'\] but its params have no"):
        walk.feedback_weights(walk.leaves(bad)[0], {"w": ones((2, 3))})


def test_the_per_example_fallback_refuses_a_layer_that_draws_from_its_key():
    def init(key, shape):
        return {"s": jnp.ones(shape[-1:])}, shape

    def forward(params, x, *, key=None, train=False):
        noise = jax.random.normal(key, x.shape) if (train and key is not None) else 0.0
        return x * params["s"][None, :] + noise, x

    def backward(params, x, dy):
        return {"s": jnp.sum(dy * x, axis=0)}, dy * params["s"][None, :]

    noisy = nn.Layer(init, forward, backward, name="noisy")
    model = nn.serial(nn.dense(3), noisy, nn.dense(2))
    params = numpy_params(model, (4,))
    x, y = np.ones((2, 4), np.float32), np.ones((2, 2), np.float32)
    f = jax.jit(fbp.diagnostics.per_example_grad_norms(model, losses.mse))  # one program, not eager
    with pytest.raises(fbp.ConfigError, match=r"serial layer 1 \(noisy\): .*draws random numbers"):
        f(params, x, y, key=jax.random.key(1))
    assert f(params, x, y).shape == (2,)  # without a key it draws nothing: the fallback holds
