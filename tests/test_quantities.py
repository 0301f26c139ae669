"""fbp.quantities against references built from JAX autodiff, in float64.

First-order quantities are checked against ``jax.vmap(jax.grad)`` of the loss
on one example (``∇ℓ_n``; fbp's per-example share is ``∇ℓ_n / N``), or, where
the GGN diagonal is checked too, ``J_nᵀ∇_oℓ_n`` from the same Jacobians; the GGN
diagonal and the Kronecker factors against ``jax.jacrev`` of the network
output and ``jax.hessian`` of the loss (the GGN written out as a matrix);
Hessian-vector products against ``jax.hessian``; the Monte-Carlo estimates
against the exact ones with many samples. Each check is one jitted program
(JAX compile time dominates here); the zoo of every layer kind is checked by
tests/test_per_example.py's float64 test, in its program, with the helpers at
the end.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from layer_helpers import device_array, init_shapes
from user_layer import gated_linear

import fbp
from fbp import losses, nn
from fbp import quantities as q

CE = losses.softmax_cross_entropy
TOL = 1e-10  # relative, float64
ZOO_CLIP = 0.87  # the zoo's per-example norms are 0.84 to 0.89 (float64): clips 2 of 4


# --------------------------------------------------------------------------- references


def per_example_grads(model, loss, params, x, y):
    """``∇ℓ_n`` for each example: ``jax.vmap(jax.grad)`` of the loss on one example."""

    def one(p, x_n, y_n):
        return loss.value(model.apply(p, x_n[None]), y_n[None])

    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)


def ggn_matrices(model, loss, params, x, y):
    """Each example's ``J_nᵀ H_n J_n`` over the flattened params, from jacrev and hessian
    (their mean is the GGN; the first alone is the GGN of a batch of that one example)."""
    flat, unravel = ravel_pytree(params)

    def one(x_n, y_n):
        def out(f):
            return model.apply(unravel(f), x_n[None])[0].reshape(-1)

        o = out(flat)
        jac = jax.jacrev(out)(flat)  # (K, P)
        hess = jax.hessian(lambda o: loss.value(o.reshape(1, *o.shape), y_n[None]))(o)
        return jac.T @ hess @ jac

    return jax.vmap(one)(x, y), unravel


def per_example_grads_and_ggn_diagonal(model, loss, params, x, y):
    """``∇ℓ_n`` for each example and the diagonal of ``(1/N) Σ_n J_nᵀ H_n J_n``, from one
    Jacobian per example (no matrix over the params is formed).

    ``J_n``: ``jax.jacrev`` of the network output on example ``n`` (one row per output
    entry, each a params tree); ``H_n`` and ``∇_o ℓ_n``: ``jax.hessian`` and ``jax.grad``
    of the loss of that output. The chain rule gives ``∇ℓ_n = J_nᵀ ∇_o ℓ_n``, equal to
    ``jax.vmap(jax.grad)`` of the loss on one example (:func:`per_example_grads`), so a
    program that needs both references runs one backward pass of the model per output
    entry instead of that and one more.
    """

    def one(x_n, y_n):
        def out(p):
            o = model.apply(p, x_n[None])
            return o.reshape(-1), o

        jac, o = jax.jacrev(out, has_aux=True)(params)  # leaves (K, *leaf)

        def loss_of(flat):
            return loss.value(flat.reshape(o.shape), y_n[None])

        flat = o.reshape(-1)
        d_out, hess = jax.grad(loss_of)(flat), jax.hessian(loss_of)(flat)  # (K,), (K, K)
        grad = jax.tree.map(lambda j: jnp.tensordot(d_out, j, axes=1), jac)
        diagonal = jax.tree.map(lambda j: jnp.sum(j * jnp.tensordot(hess, j, axes=1), 0), jac)
        return grad, diagonal

    grads, diagonals = jax.vmap(one)(x, y)
    return grads, jax.tree.map(lambda d: d.mean(axis=0), diagonals)


def first_order_references(per_example, clip):
    """What each first-order quantity should be, from ``∇ℓ_n`` (vmap of grad, or
    ``J_nᵀ∇_oℓ_n``), in numpy after the program: traced into it, the few small ops per
    params leaf compiled for seconds on a model of many leaves."""
    ref = jax.tree.map(lambda r: np.asarray(r, np.float64), per_example)
    n = len(jax.tree.leaves(ref)[0])
    g = jax.tree.map(lambda r: r / n, ref)
    norms = np.sqrt(sum(jax.tree.leaves(jax.tree.map(flat_sq, ref))))
    c = np.minimum(1.0, clip / norms)
    return {
        "grads": jax.tree.map(lambda r: r.mean(0), ref),
        "batch_grad": g,
        "batch_l2": jax.tree.map(flat_sq, g),
        "sum_grad_squared": jax.tree.map(lambda a: (a * a).sum(0), g),
        "variance": jax.tree.map(lambda r: (r * r).mean(0) - r.mean(0) ** 2, ref),
        "clipped grads": jax.tree.map(lambda r: np.tensordot(c, r, axes=1) / n, ref),
        "clipped norms": norms,
        "clip factors": c,
    }


def first_order_results(model, loss, params, x, y, clip, *more):
    """The same from one call of ``value_grad_and``, and the results of ``more`` quantities."""
    quantities = (
        q.batch_grad(),
        q.batch_l2(),
        q.sum_grad_squared(),
        q.variance(),
        q.clipped_grad(clip),
    )
    _, grads, results = q.value_grad_and(model, loss, *quantities, *more)(params, x, y)
    g, sq, sgs, var, clipped = results[:5]
    got = {
        "grads": grads,
        "batch_grad": g,
        "batch_l2": sq,
        "sum_grad_squared": sgs,
        "variance": var,
        "clipped grads": clipped.grads,
        "clipped norms": clipped.norms,
    }
    return got, results[5:]


def compare(got: dict, want: dict) -> dict:
    """The worst relative error of each entry of ``got`` against ``want``."""
    return {k: worst(got[k], want[k]) for k in got}


def flat_sq(a):
    return np.sum(np.square(a.reshape(a.shape[0], -1)), axis=1)


def relative(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def worst(got_tree, want_tree) -> float:
    errors = jax.tree.leaves(jax.tree.map(relative, got_tree, want_tree))
    return max(errors) if errors else 0.0


def random_params(model, input_shape, seed=0):
    """Float64 numpy draws for ``model``'s params (``init`` traced for the shapes only:
    eager jax.random compiles per shape); weights of variance ``1/fan_in``, vectors
    ``N(0, 0.1²)``, scales and running variances ``1 + noise``. Call under x64."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        noise = rng.standard_normal(a.shape)
        if len(a.shape) >= 2:
            return device_array(noise / np.sqrt(np.prod(a.shape[:-1])), np.float64)
        if getattr(path[-1], "key", None) in ("scale", "var"):
            return device_array(1 + 0.1 * np.abs(noise), np.float64)
        return device_array(0.1 * noise, np.float64)

    return jax.tree_util.tree_map_with_path(draw, init_shapes(model, input_shape)[0])


def normal(seed, *shape):
    return device_array(np.random.default_rng(seed).standard_normal(shape), np.float64)


# --------------------------------------------------------------------------- first order, fast


CONVNET = nn.serial(nn.conv1d(2, 3), nn.flatten(), nn.dense(3))


def test_quantities_of_a_small_convnet():
    """First-order quantities vs vmap(grad), and the conv's KFLR factors by their definition.

    The conv (patches form) declares pairs over 7 positions, the dense head
    pairs on vectors (its ``Σ_n g_n²`` is ``(x²)ᵀ·(δ²)``). KFLR of the conv,
    with ``ĝ`` the vjp of each column of ``S_n/√N`` to the conv's output:
    expand, ``A = (1/(N·T)) Σ patches patchesᵀ`` and ``G = Σ_c Σ_{n,t} ĝ ĝᵀ``;
    reduce, ``A = (1/N) Σ_n p̄_n p̄_nᵀ`` (``p̄_n`` the mean patch) and
    ``G = Σ_c Σ_n (Σ_t ĝ)(Σ_t ĝ)ᵀ``. The dense head's factors are the same
    in both (one position).
    """
    model = CONVNET
    with jax.enable_x64(True):
        params, x = random_params(model, (7, 2)), normal(1, 4, 7, 2)
        y = device_array([0, 1, 2, 1], np.int64)

        def program(params, x, y):
            grads_n = per_example_grads(model, CE, params, x, y)  # ∇ℓ_n, without the 1/N
            got, (factors, reduced) = first_order_results(
                model, CE, params, x, y, 3.0, q.kflr(), q.kflr(approximation="reduce")
            )
            conv_out = model.children[0].apply(params[0], x)
            head = nn.serial(*model.children[1:])
            pred, vjp = jax.vjp(lambda c: head.apply(params[1:], c), conv_out)
            seeds = q.hessian_factor(CE, pred, y) / jnp.sqrt(x.shape[0])
            g = jax.vmap(lambda s: vjp(s)[0])(seeds)  # (C, N, T, c_out)
            patches = jax.lax.conv_general_dilated_patches(
                x, (3,), (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
            )  # (N, T, c_in·3), channel-major
            c_in = x.shape[-1]
            patches = patches.reshape(*patches.shape[:2], c_in, 3).swapaxes(-1, -2)
            patches = patches.reshape(*patches.shape[:2], -1)  # tap-major, as w.reshape(-1, F)
            t = patches.shape[1]
            want_a = jnp.einsum("ntp,ntr->pr", patches, patches) / (x.shape[0] * t)
            want_g = jnp.einsum("cntq,cntr->qr", g, g)
            mean_patch, g_sum = patches.mean(axis=1), g.sum(axis=2)
            reduce_a = mean_patch.T @ mean_patch / x.shape[0]
            reduce_g = jnp.einsum("cnq,cnr->qr", g_sum, g_sum)
            wants = (want_a, want_g, reduce_a, reduce_g)
            return got, factors, reduced, wants, grads_n

        got, factors, reduced, wants, grads_n = jax.jit(program)(params, x, y)
        want_a, want_g, reduce_a, reduce_g = wants
        want = first_order_references(grads_n, 3.0)
        errors = compare(got, want)
        errors["kflr A of the conv"] = relative(factors["0"]["w"].a, want_a)
        errors["kflr G of the conv"] = relative(factors["0"]["w"].g, want_g)
        errors["reduce: A of the conv"] = relative(reduced["0"]["w"].a, reduce_a)
        errors["reduce: G of the conv"] = relative(reduced["0"]["w"].g, reduce_g)
        errors["reduce: the head's as expand's"] = worst(reduced["2"], factors["2"])
        failed = {k: v for k, v in errors.items() if not v < TOL}
        assert not failed, failed
        c = np.asarray(want["clip factors"])
        assert bool((c < 1).any()) and bool((c == 1).any()), "the bound should clip some, not all"
        assert jax.tree.structure(got["variance"]) == jax.tree.structure(params)
        # The tolerance can fail: g_n without the 1/N is off by far more than 1e-10.
        assert worst(got["batch_grad"], grads_n) > 1e6 * TOL
        assert relative(reduced["0"]["w"].g, want_g) > 1e6 * TOL  # reduce is not expand


VALID_CONVNET = nn.serial(nn.conv1d(3, 3, padding="VALID"), nn.tanh(), nn.flatten(), nn.dense(3))


@pytest.mark.slow  # a property beyond the definitions, which the convnet test checks fast
def test_kflr_reduce_is_exact_where_every_position_sees_the_same_input():
    """One example whose signal is constant along its length: every patch of the VALID conv
    is the same vector, so the conv weight's GGN block (``jax.jacrev``, ``jax.hessian``)
    is ``A ⊗ G`` of the reduce approximation exactly, and not of expand."""
    with jax.enable_x64(True):
        params = random_params(VALID_CONVNET, (6, 2), seed=4)
        x = jnp.broadcast_to(normal(5, 1, 1, 2), (1, 6, 2))
        y = device_array([2], np.int64)

        def program(params, x, y, key):
            _, _, (reduced, expanded, sampled) = q.value_grad_and(
                VALID_CONVNET,
                CE,
                q.kflr(approximation="reduce"),
                q.kflr(),
                q.kfac(4000, approximation="reduce"),
            )(params, x, y, key=key)
            ggn_n, _ = ggn_matrices(VALID_CONVNET, CE, params, x, y)
            return reduced["0"]["w"], expanded["0"]["w"], sampled["0"]["w"], ggn_n[0]

        reduced, expanded, sampled, ggn = jax.jit(program)(params, x, y, jax.random.key(0))
        block = _block(ggn, params, (0, "w"))
        assert relative(np.kron(reduced.a, reduced.g), block) < TOL
        assert relative(np.kron(expanded.a, expanded.g), block) > 1e-3
        # kfac's reduce: the same A, and G within 10% from 4000 sampled labels (1/√4000 ≈ 1.6%).
        assert relative(sampled.a, reduced.a) < TOL
        assert relative(sampled.g, reduced.g) < 0.1


STRIDED = nn.serial(nn.conv1d(8, 3, strides=3), nn.flatten(), nn.dense(3))


def test_norms_and_clipping_requested_alone():
    """``batch_l2`` and ``clipped_grad`` each alone in ``value_grad_and``, with its gradient.

    Alone, a conv's pairs over positions take the cheaper of two routes: the
    per-example gradients (CONVNET's conv: 7 positions, 6 → 3 wide, where the
    batch gradient becomes their sum and the rule's own ``dW`` is dropped) or
    the Gram form with no per-example gradient (STRIDED's conv: 3 positions,
    12 → 8 wide). Both, and the gradient returned beside them, against
    ``vmap(jax.grad)``. In bfloat16, the gradient beside ``variance`` (the
    sum of per-example gradients) is ``fbp.grad``'s to the bit.
    """
    with jax.enable_x64(True):
        models = {"per-example route": CONVNET, "Gram route": STRIDED}
        inputs = {
            "per-example route": (random_params(CONVNET, (7, 2)), normal(1, 4, 7, 2)),
            "Gram route": (random_params(STRIDED, (7, 4), seed=2), normal(3, 4, 7, 4)),
        }
        y = device_array([0, 1, 2, 1], np.int64)

        def program(inputs, y):
            out = {}
            for name, (params, x) in inputs.items():
                model = models[name]
                _, g_l2, (sq,) = q.value_grad_and(model, CE, q.batch_l2())(params, x, y)
                clip = q.value_grad_and(model, CE, q.clipped_grad(3.0))
                _, g_clip, (clipped,) = clip(params, x, y)
                got = {"grads": g_l2, "batch_l2": sq, "clipped grads": clipped.grads}
                got["clipped norms"] = clipped.norms
                out[name] = (got, g_clip, per_example_grads(model, CE, params, x, y))
            low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), inputs["per-example route"])
            _, g_low, _ = q.value_grad_and(CONVNET, CE, q.variance())(*low, y)
            return out, (g_low, fbp.grad(CONVNET, CE)(*low, y))

        results, (g_low, g_plain) = jax.jit(program)(inputs, y)
        chex.assert_trees_all_equal(g_low, g_plain)
        assert jax.tree.leaves(g_low)[0].dtype == jnp.bfloat16
        for name, (got, g_clip, grads_n) in results.items():
            want = first_order_references(grads_n, 3.0)
            errors = compare(got, want)
            errors["grads beside clipped_grad"] = worst(g_clip, want["grads"])
            failed = {k: v for k, v in errors.items() if not v < TOL}
            assert not failed, (name, failed)
            c = np.asarray(want["clip factors"])
            assert bool((c < 1).any()), (name, "the bound should clip some", c)


def test_norms_and_clipping_hold_no_gradient_per_example_where_gram_is_cheaper():
    """A 256 → 256 weight over 4 positions (a transformer's shape, small): the norms come
    from Gram matrices and the clipped sum from one reweighted product, so the compiled
    program's temporaries stay far below one gradient per example (16 × 256 × 256 floats,
    4 MB) — which ``sum_grad_squared`` needs, and has (the check can fail). XLA's memory
    analysis of the compiled programs; nothing runs."""
    model = nn.serial(nn.dense(256))
    params = init_shapes(model, (4, 256))[0]
    x = jax.ShapeDtypeStruct((16, 4, 256), jnp.float32)
    y = jax.ShapeDtypeStruct((16, 4), jnp.int32)
    per_example_bytes = 16 * 256 * 256 * 4

    def temporaries(quantity):
        f = q.value_grad_and(model, CE, quantity)
        compiled = jax.jit(lambda p, x, y: f(p, x, y)[2]).lower(params, x, y).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(q.batch_l2()) < per_example_bytes / 8
    assert temporaries(q.clipped_grad(1.0)) < per_example_bytes / 8
    assert temporaries(q.sum_grad_squared()) >= per_example_bytes


# --------------------------------------------------------------------------- curvature


MLP = nn.serial(nn.dense(4), nn.tanh(), gated_linear(3), nn.dense(3))


def _curvature_program(params, x, y):
    """diag_ggn for three losses, and kflr on the first example, with their references."""
    out = {}
    for name, loss, target in (
        ("ce", CE, y),
        ("mse", losses.mse, jax.nn.one_hot(y, 3, dtype=x.dtype)),
        ("bce", losses.sigmoid_binary_cross_entropy, jax.nn.one_hot(y, 3, dtype=x.dtype)),
    ):
        _, _, (diag,) = q.value_grad_and(MLP, loss, q.diag_ggn())(params, x, target)
        ggn_n, unravel = ggn_matrices(MLP, loss, params, x, target)
        out[name] = (diag, unravel(jnp.diag(ggn_n.mean(axis=0))))
        if loss is CE:  # the GGN of a batch of the first example alone
            ggn_one = ggn_n[0]
    _, _, (factors,) = q.value_grad_and(MLP, CE, q.kflr())(params, x[:1], y[:1])
    out["kflr"] = (factors, ggn_one)
    return out


def _block(ggn, params, path):
    """The GGN block of the params leaf at ``path`` (an index tree picks its rows).

    ``ravel_pytree`` concatenates the leaves in ``jax.tree.leaves`` order; the
    index tree is built with numpy (eagerly, ``unravel`` would compile)."""
    leaves, treedef = jax.tree.flatten(params)
    offsets = np.cumsum([0] + [leaf.size for leaf in leaves])
    index = jax.tree.unflatten(
        treedef,
        [
            np.arange(o, o + leaf.size).reshape(leaf.shape)
            for o, leaf in zip(offsets[:-1], leaves, strict=True)
        ],
    )
    rows = np.asarray(nn.walk.at_path(index, path), np.int64).reshape(-1)
    return np.asarray(ggn)[np.ix_(rows, rows)]


@pytest.mark.slow
def test_diag_ggn_and_kflr_against_jacrev_and_hessian():
    with jax.enable_x64(True):
        params, x = random_params(MLP, (5,)), normal(1, 4, 5)
        y = device_array([0, 1, 2, 1], np.int64)
        out = jax.jit(_curvature_program)(params, x, y)
        out = jax.tree.map(np.asarray, out)
        errors = {name: worst(*out[name]) for name in ("ce", "mse", "bce")}
        factors, ggn_one = out["kflr"]
        # One example on a dense layer: A ⊗ G is its GGN block exactly (w[i, j] at i·q + j).
        for label, key in (("0", "w"), ("0", "b"), ("3", "w"), ("3", "b")):
            f = factors[label][key]
            want = _block(ggn_one, params, (int(label), key))
            errors[f"kflr {label}.{key}"] = relative(np.kron(f.a, f.g), want)
        # The user layer declares no pairs: A = [[1]] and G its whole GGN block.
        for key in ("w", "w_gate"):
            f = factors["2"][key]
            errors[f"fallback 2.{key}"] = relative(f.g, _block(ggn_one, params, (2, key)))
            assert f.a.shape == (1, 1)
        failed = {k: v for k, v in errors.items() if not v < TOL}
        assert not failed, failed


def test_monte_carlo_estimates_converge_to_the_exact_ones():
    """With 20000 sampled labels per example the estimates are within 5% (relative, Frobenius).

    The estimate is a mean of 20000 i.i.d. terms, so its relative error is of
    order 1/√20000 ≈ 0.7% times the terms' spread; 5% leaves a wide margin
    and the fixed key makes the test deterministic. One sample is far off.
    """
    model = nn.serial(nn.dense(4), nn.tanh(), nn.dense(3))
    with jax.enable_x64(True):
        params, x = random_params(model, (5,)), normal(1, 3, 5)
        y = device_array([0, 1, 2], np.int64)

        def program(params, x, y, key):
            many = (q.diag_ggn_mc(20000), q.kfac(20000), q.diag_ggn_mc(1))
            f = q.value_grad_and(model, CE, q.diag_ggn(), q.kflr(), *many)
            return f(params, x, y, key=key)[2]

        exact, kflr_f, mc, kfac_f, one = jax.jit(program)(params, x, y, jax.random.key(2))
        assert worst(mc, exact) < 0.05
        is_kf = lambda v: isinstance(v, q.KroneckerFactors)  # noqa: E731
        g_of = lambda t: jax.tree.map(lambda f: f.g, t, is_leaf=is_kf)  # noqa: E731
        a_of = lambda t: jax.tree.map(lambda f: f.a, t, is_leaf=is_kf)  # noqa: E731
        assert worst(g_of(kfac_f), g_of(kflr_f)) < 0.05
        assert worst(a_of(kfac_f), a_of(kflr_f)) < TOL
        assert worst(one, exact) > 0.05


def test_masked_targets_against_the_batch_ggn():
    """Sequence targets with a mask (softmax cross-entropy over 4 positions, masks of 2, 4
    and 1 positions): ``diag_ggn`` equals the diagonal of ``Jᵀ H J`` — ``jax.jacrev`` of
    the whole batch's output, ``jax.hessian`` of the batch loss in it — both through the
    cross-entropy's own factor and through the eigendecomposition fallback (the same loss
    under another name). The mask's count normalises over the batch, so example ``n``'s
    share ``ℓ_n`` is ``N·L`` with its output from the params and the others held, not its
    loss alone (sliced out, the fallback was 15–27% off); ``batch_grad`` is ``∇ℓ_n / N``,
    and the sampled estimate converges to the exact one (4000 labels, 10%).
    """
    model = nn.serial(nn.dense(4), nn.tanh(), nn.dense(3))
    renamed = losses.Loss(CE.value, CE.grad, "my_cross_entropy")  # not CE: the fallback
    with jax.enable_x64(True):
        params, x = random_params(model, (5,)), normal(1, 3, 4, 5)
        labels = device_array([[0, 1, 2, 1], [2, 2, 0, 1], [1, 0, 0, 2]], np.int64)
        mask = device_array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], np.int64)

        def program(params, x, labels, mask, key):
            y = (labels, mask)
            diag, per_example = q.value_grad_and(model, CE, q.diag_ggn(), q.batch_grad())(
                params, x, y
            )[2]
            fallback = q.value_grad_and(model, renamed, q.diag_ggn())(params, x, y)[2][0]
            mc = q.value_grad_and(model, CE, q.diag_ggn_mc(4000))(params, x, y, key=key)[2][0]
            flat, unravel = ravel_pytree(params)

            def out(f):
                return model.apply(unravel(f), x).reshape(-1)

            o, jac = out(flat), jax.jacrev(out)(flat)
            hess = jax.hessian(lambda o: CE.value(o.reshape(3, 4, 3), y))(o)
            reference = unravel(jnp.diag(jac.T @ hess @ jac))
            pred = model.apply(params, x)

            def share(p, n):  # ℓ_n: N·L with example n's output from p
                return 3 * CE.value(pred.at[n].set(model.apply(p, x[n : n + 1])[0]), y)

            shares = [jax.grad(share)(params, n) for n in range(3)]
            return diag, fallback, mc, reference, per_example, shares

        diag, fallback, mc, reference, per_example, shares = jax.jit(program)(
            params, x, labels, mask, jax.random.key(0)
        )
        assert worst(diag, reference) < TOL
        assert worst(fallback, reference) < TOL
        assert worst(mc, reference) < 0.1
        want = jax.tree.map(lambda *g: np.stack(g) / 3, *shares)
        assert worst(per_example, want) < TOL


def test_hessian_vector_product_against_jax_hessian():
    model = nn.serial(nn.dense(4), nn.tanh(), nn.dense(3))
    with jax.enable_x64(True):
        params, x = random_params(model, (5,)), normal(1, 4, 5)
        y = device_array([0, 1, 2, 1], np.int64)
        v = jax.tree.map(
            lambda a: device_array(np.cos(np.arange(a.size)).reshape(a.shape), np.float64), params
        )

        def program(params, v):
            hv = q.hessian_vector_product(model, CE)(params, x, y, v)
            flat, unravel = ravel_pytree(params)
            hess = jax.hessian(lambda f: CE.value(model.apply(unravel(f), x), y))(flat)
            return hv, unravel(hess @ ravel_pytree(v)[0])

        hv, want = jax.jit(program)(params, v)
        assert worst(hv, want) < TOL


# --------------------------------------------------------------------------- refusals


BN_MODEL = nn.serial(nn.dense(4), nn.batch_norm(), nn.relu(), nn.dense(3))


def test_batch_norm_in_training_is_refused_naming_it():
    params, _ = init_shapes(BN_MODEL, (5,))  # refused while tracing: shapes suffice
    x, y = np.ones((4, 5), np.float32), np.array([0, 1, 2, 1], np.int32)
    for quantity in (q.batch_l2(), q.diag_ggn(), q.kfac()):
        f = q.value_grad_and(BN_MODEL, CE, quantity)
        with pytest.raises(fbp.ConfigError, match=r"layer 1 \(batch_norm.*train=False"):
            jax.eval_shape(lambda p: f(p, x, y, key=jax.random.key(0)), params)  # noqa: B023
    # In inference the examples are independent: nothing is refused.
    f = q.value_grad_and(BN_MODEL, CE, q.batch_l2(), q.diag_ggn())
    jax.eval_shape(lambda p: f(p, x, y, train=False), params)


@pytest.mark.slow
def test_batch_norm_in_inference_against_vmap_of_grad():
    with jax.enable_x64(True):
        params, x = random_params(BN_MODEL, (5,)), normal(1, 4, 5)
        y = device_array([0, 1, 2, 1], np.int64)
        f = q.value_grad_and(BN_MODEL, CE, q.batch_grad())

        def one(p, x_n, y_n):
            return CE.value(BN_MODEL.apply(p, x_n[None], train=False), y_n[None])

        @jax.jit  # fbp's and the reference in one compiled program
        def program(params):
            ref = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
            return f(params, x, y, train=False)[2][0], ref

        g, ref = program(params)
        g, ref = jax.tree.map(np.asarray, (g, ref))  # (eager division compiles per shape)
        assert worst(g, jax.tree.map(lambda r: r / 4, ref)) < TOL


def test_bad_requests_are_refused_with_a_message():
    model = nn.serial(nn.dense(3))
    params, _ = init_shapes(model, (4,))  # refused while tracing: shapes suffice
    x, y = np.ones((2, 4), np.float32), np.array([0, 1], np.int32)
    with pytest.raises(fbp.ConfigError, match=r"not a quantity.*forget the call"):
        q.value_grad_and(model, CE, q.batch_l2)
    f = q.value_grad_and(model, CE, q.diag_ggn_mc(2))
    with pytest.raises(fbp.ConfigError, match=r"DiagGGNMC\) samples labels and needs a key"):
        jax.eval_shape(lambda p: f(p, x, y), params)
    with pytest.raises(fbp.ConfigError, match="samples must be a positive int"):
        q.kfac(0)
    with pytest.raises(fbp.ConfigError, match=r"kflr.*approximation must be one of.*'reduced'"):
        q.kflr(approximation="reduced")
    with pytest.raises(fbp.ConfigError, match="max_norm must be positive"):
        q.clipped_grad(0.0)
    wide = nn.serial(gated_linear(80))
    wide_params, _ = init_shapes(wide, (60,))
    g = q.value_grad_and(wide, losses.mse, q.kflr())
    with pytest.raises(fbp.ConfigError, match=r"gated_linear.*no Extensions.outer_factors.*4800"):
        jax.eval_shape(lambda p: g(p, np.ones((2, 60)), np.ones((2, 80))), wide_params)


# --------------------------------------------------------------------------- every layer kind
#
# The zoo of tests/test_per_example.py (16 layer kinds, a user layer): every quantity is
# checked there, by its float64 test, in the program of its per-example rules, with
# which it shares the forward, the walker's rules and the reference ``∇ℓ_n`` (one
# test of ~27 s CPU instead of two of ~25 s and ~11 s). It is also where the
# first-order quantities meet a user's layer (the fallback) and layer norm (a batch_l2
# rule and no pairs) beside conv1d's and dense's pairs, with a bound that clips some
# examples and not all (a test of a small model of those layers did so on its own).


def every_quantity_program(model, params, x, y, ggn_diagonal):
    """fbp's quantities on ``model`` (trace it inside a jitted program), and the GGN
    diagonal's reference: ``(got, factors)``, first-order quantities and the GGN diagonal
    (under ``"diag_ggn"``, its reference under ``"diag_ggn reference"``), and KFLR's factors.

    ``ggn_diagonal``: :func:`per_example_grads_and_ggn_diagonal`'s, whose ``∇ℓ_n`` the
    caller's program checks its per-example rules against, and returns for
    :func:`check_every_quantity_on_every_layer_kind`.
    """
    got, (diag, factors) = first_order_results(
        model, CE, params, x, y, ZOO_CLIP, q.diag_ggn(), q.kflr()
    )
    got["diag_ggn"] = diag
    got["diag_ggn reference"] = ggn_diagonal
    return got, factors


def check_every_quantity_on_every_layer_kind(every, got, factors, per_example):
    """First-order quantities against ``per_example`` (``∇ℓ_n``), the GGN diagonal against
    jacrev and hessian, KFLR's factors of every pair-declaring weight symmetric (``G`` PSD)
    with the right shapes, and every leaf with params present in every result."""
    want = first_order_references(per_example, ZOO_CLIP)
    want["diag_ggn"] = got.pop("diag_ggn reference")
    failed = {k: v for k, v in compare(got, want).items() if not v < TOL}
    assert not failed, failed
    c = np.asarray(want["clip factors"])
    assert bool((c < 1).any()) and bool((c == 1).any()), "the bound should clip some, not all"
    # What a model of conv1d, dense, a user's layer and layer norm checked here before (it
    # compiled a program of its own): the zoo holds each of them, with every quantity.
    declares = {kind.id: kind.declares for kind in every.kinds}
    assert {"conv1d patches", "dense on vectors", "layer_norm"} <= set(declares)
    assert declares["layer_norm"] == {"batch_l2"} and not declares["user layer"]
    for kind in every.kinds:
        for site in every.sites[kind.id]:
            assert site.label in factors, site.description
            leaf_params = nn.walk.at_path(every.param_shapes, site.path)
            for key, f in factors[site.label].items():
                a, g = np.asarray(f.a), np.asarray(f.g)
                assert np.allclose(a, a.T) and np.allclose(g, g.T), (site.description, key)
                assert np.linalg.eigvalsh(g).min() > -1e-12, (site.description, key)
                assert a.shape[0] * g.shape[0] == leaf_params[key].size or a.shape == (1, 1)


def test_tied_params_add_their_uses_before_squaring():
    """nn.tie: an embedding and its transposed use share one table; every quantity sees the sum.

    Sequences of ids through the tied pair give (batch, T, vocab) logits, so
    this also checks the loss Hessian's factor over positions (T·C columns).
    """
    model = nn.tie(nn.serial(nn.embedding(5, 3), nn.tanh(), nn.unembedding(5)), {2: 0})
    with jax.enable_x64(True):
        params = random_params(model, (4,))
        ids = device_array([[0, 1, 2, 1], [3, 4, 0, 0], [2, 2, 1, 4]], np.int64)
        labels = device_array([[1, 2, 3, 4], [0, 1, 2, 3], [4, 3, 2, 1]], np.int64)

        def program(params, x, y):
            got, (diag,) = first_order_results(model, CE, params, x, y, 0.3, q.diag_ggn())
            got["diag_ggn"] = diag
            return got, per_example_grads_and_ggn_diagonal(model, CE, params, x, y)

        got, (grads_n, ggn_diagonal) = jax.jit(program)(params, ids, labels)
        want = first_order_references(grads_n, 0.3)
        want["diag_ggn"] = ggn_diagonal
        failed = {k: v for k, v in compare(got, want).items() if not v < TOL}
        assert not failed, failed
