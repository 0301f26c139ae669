"""Per-example gradients of every layer kind against ``jax.vmap(jax.grad(...))``.

One table, ``KINDS``, lists every layer kind with the per-example rules it
declares. The kinds sit in ONE model (an embedding first, so ids flow in,
a dense head last), so a check is one compiled program per dtype —
JAX compile time, not arithmetic, dominates on a small CI machine. In that
program one walker pass runs, at every leaf with parameters, the layer's
``walk.batch_l2`` (handing ITS ``dparams`` and ``dx`` on, so the model
gradient is built from the rules' results) and ``walk.batch_grad`` — the
declared fast rule, or the walker's vmap fallback for a layer declaring none
— and, in float32, the fallback on the same layer with its declarations
dropped (``layer._replace(forward=layer.forward)``). Beside it,
``diagnostics.per_example_grad_norms`` of the whole model.

The inner loop runs the representative kinds (``Kind.fast``: one of each
family with its own rule — embedding, dense, conv, norm, recurrent,
attention — and a user's layer on the fallback) in float32; the slow sweep
runs every kind in float64 and the other kinds in float32. The float64
program also computes every ``fbp.quantities`` result on the same model,
checked by tests/test_quantities.py's helpers (they share the forward, the
walker's rules and the reference: one program, not two). The float32 sweep
checks the declared rules against the fallback only: what it adds to the
float64 check is float32 arithmetic.

The reference is independent of fbp's rules: ``jax.vmap(jax.grad)`` of the
loss on one example, whose gradient ``∇ℓ_n`` is ``N·g_n`` (fbp's losses are
means over the batch); in float64, the same by the chain rule,
``J_nᵀ∇_oℓ_n``, from the Jacobians of the network output that the GGN
diagonal's reference needs anyway. Every comparison is a relative error per example;
float32 must agree to 1e-5, float64 to 1e-10, and a failure lists each kind,
leaf and comparison that missed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import device_array

from fbp import diagnostics, losses, nn
from fbp.nn import walk

CE = losses.softmax_cross_entropy
BATCH, TIME, FEATURES, VOCAB, CLASSES = 4, 6, 8, 5, 3
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
BOTH = frozenset({"batch_l2", "batch_grad"})
L2 = frozenset({"batch_l2"})
NONE = frozenset()


# --------------------------------------------------------------------------- two layers that declare nothing


def user_layer() -> nn.Layer:
    """``y = s ⊙ tanh(x·W)``, written as a user would: the three functions and a name."""

    def init(key, input_shape):
        n = input_shape[-1]
        w = jax.random.normal(key, (n, n)) / jnp.sqrt(n)
        return {"w": w, "s": jnp.linspace(0.5, 1.5, n)}, tuple(input_shape)

    def forward(params, x, *, key=None, train=False):
        del key, train
        t = jnp.tanh(x @ params["w"])
        s = params["s"].reshape((1,) * (x.ndim - 1) + (-1,))
        return s * t, (x, t)

    def backward(params, cache, dy):
        x, t = cache
        s = params["s"].reshape((1,) * (x.ndim - 1) + (-1,))
        da = dy * s * (1 - t * t)
        x2, da2 = x.reshape(-1, x.shape[-1]), da.reshape(-1, da.shape[-1])
        dparams = {"w": x2.T @ da2, "s": (dy * t).reshape(da2.shape).sum(axis=0)}
        return dparams, da @ params["w"].T

    return nn.Layer(init, forward, backward, name="user tanh layer")


def _sin_init(key, input_shape):
    n = input_shape[-1]
    return {"w": jax.random.normal(key, (n, n)) / jnp.sqrt(n)}, tuple(input_shape)


def _sin_layer(params, x):
    return jnp.sin(x @ params["w"])


# --------------------------------------------------------------------------- the table


class Kind(NamedTuple):
    """One layer kind: a block of the zoo model and the rules its layers declare."""

    id: str
    block: nn.Layer
    declares: frozenset  # what every layer with params in the block declares
    fast: bool = False  # one of the representative kinds the inner loop checks


KINDS = (
    Kind("embedding (repeated ids)", nn.embedding(VOCAB, FEATURES), L2, fast=True),
    Kind("dense on sequences", nn.dense(FEATURES), BOTH, fast=True),
    Kind("conv1d patches", nn.conv1d(FEATURES, 3), BOTH, fast=True),
    Kind("conv1d xla", nn.conv1d(FEATURES, 3, implementation="xla"), NONE),
    Kind("layer_norm", nn.layer_norm(), L2, fast=True),
    Kind(
        "conv2d",
        nn.serial(
            nn.reshape((TIME, FEATURES, 1)), nn.conv2d(2, (3, 3)), nn.reshape((TIME, 2 * FEATURES))
        ),
        BOTH,
    ),
    Kind("rnn", nn.rnn(FEATURES), BOTH, fast=True),
    Kind("gru", nn.gru(FEATURES), BOTH),
    Kind("lstm", nn.lstm(FEATURES), BOTH),
    Kind("bidirectional gru", nn.gru(FEATURES // 2, bidirectional=True), BOTH),
    Kind("self_attention", nn.self_attention(2, FEATURES), BOTH, fast=True),
    Kind("self_attention causal", nn.self_attention(2, FEATURES, causal=True), BOTH),
    Kind(
        "residual block",
        nn.residual(nn.serial(nn.dense(FEATURES), nn.tanh(), nn.dense(FEATURES))),
        BOTH,
    ),
    Kind("from_jax", nn.from_jax(_sin_layer, _sin_init), NONE),
    Kind("user layer", user_layer(), NONE, fast=True),
    Kind(
        "dense on vectors",
        nn.serial(nn.mean_over_time(), nn.dense(FEATURES), nn.relu(), nn.dense(CLASSES)),
        BOTH,
        fast=True,
    ),
)
IDS = [kind.id for kind in KINDS]


class Zoo(NamedTuple):
    """The model of some kinds in table order, its params' shapes, and each kind's sites."""

    kinds: tuple
    model: nn.Layer
    param_shapes: object
    sites: dict  # kind id -> the leaves with params of its block (at params path (k, ...))


@functools.cache
def zoo(fast_only: bool, rest: bool = False) -> Zoo:
    """Every kind's block in one model: the representative kinds only if ``fast_only``;
    if ``rest``, the others alone: sequences of ``FEATURES`` in and out (no ids, no head;
    the loss is the mean squared error, :func:`_problem`)."""
    kinds = tuple(kind for kind in KINDS if (kind.fast if fast_only else not (rest and kind.fast)))
    model = nn.serial(*(kind.block for kind in kinds))
    input_shape = (TIME, FEATURES) if rest else (TIME,)
    param_shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), input_shape)[0])
    sites = {
        kind.id: [
            s
            for s in walk.leaves(model)
            if s.path[0] == k and jax.tree.leaves(walk.at_path(param_shapes, s.path))
        ]
        for k, kind in enumerate(kinds)
    }
    return Zoo(kinds, model, param_shapes, sites)


@functools.cache
def _random_params(fast_only, rest=False):
    """Random values for the zoo's params (shapes from ``init`` traced, not run).

    Running the zoo's ``init`` (threefry draws, orthogonal QRs) costs seconds of
    compiling on its own; numpy draws cost nothing. Weights get variance
    ``1/fan_in``, layer-norm scales ``1 + noise``, and every other vector
    (biases) small noise, so each path carries a gradient.
    """
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape)
        if len(leaf.shape) >= 2:
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        return 0.1 * noise + (getattr(path[-1], "key", None) == "scale")

    return jax.tree_util.tree_map_with_path(draw, zoo(fast_only, rest).param_shapes)


def _problem(dtype, fast_only=False, rest=False):
    """Params (the same values in both dtypes), ids with repeats, labels; for the ``rest``
    zoo, normal sequences in and targets out (its blocks keep the shape)."""
    params = jax.tree.map(lambda a: device_array(a, dtype), _random_params(fast_only, rest))
    rng = np.random.default_rng(1)
    if rest:
        x, y = rng.standard_normal((2, BATCH, TIME, FEATURES))
        return params, device_array(x, dtype), device_array(y, dtype)
    ids = rng.integers(0, VOCAB, (BATCH, TIME))
    ids[:, 1] = ids[:, 0]  # every example looks up one id (at least) twice
    labels = np.arange(BATCH) % CLASSES
    return params, device_array(ids, np.int32), device_array(labels, np.int32)


# --------------------------------------------------------------------------- one program per dtype


def _without_declarations(visit: walk.Visit) -> walk.Visit:
    plain = visit.layer._replace(forward=visit.layer.forward)  # drops the extensions
    return visit._replace(site=visit.site._replace(layer=plain))


def _float_or_none(a):
    return a if jnp.issubdtype(a.dtype, jnp.inexact) else None  # an embedding's dx is float0


def walk_everything(model, loss, params, x, y, with_fallback, reference="vmap"):
    """Everything the checks compare, from one walk backward and the reference.

    At each leaf with params the walk runs the layer's ``batch_l2`` rule and
    hands ITS ``(dparams, dx)`` on, so the model gradient the walk returns is
    built from the rules' results; it also records ``batch_grad`` and, where
    the layer declares a rule and ``with_fallback``, the fallback's ``g_n``.
    ``reference``: ``"vmap"`` for ``jax.vmap(jax.grad)``'s ``∇ℓ_n``, the same computed
    by the caller's program, or None for none (the fallback is the float32 reference).
    """
    records = {}

    def leaf(visit: walk.Visit):
        if not jax.tree.leaves(visit.params):
            return visit.backward()
        dparams, dx, sq = walk.batch_l2(visit)
        dparams_g, dx_g, g = walk.batch_grad(visit)
        record = {
            "sq": sq,
            "g": g,
            "l2 rule": (dparams, _float_or_none(dx)),
            "grad rule": (dparams_g, _float_or_none(dx_g)),
        }
        ext = visit.layer.extensions
        if with_fallback and ext is not None and (ext.batch_l2 or ext.batch_grad):
            record["fallback g"] = walk.batch_grad(_without_declarations(visit))[2]
        records[visit.site.index] = record
        return dparams, dx

    pred, tape = walk.forward(model, params, x)
    grads, _ = walk.backward(model, params, tape, loss.grad(pred, y), leaf)
    norms = diagnostics.per_example_grad_norms(model, loss)(params, x, y)

    def one(p, x_n, y_n):
        return loss.value(model.apply(p, x_n[None]), y_n[None])

    if isinstance(reference, str):
        reference = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
    return {"records": records, "grads": grads, "norms": norms, "reference": reference}


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6, 7))
def _walk_everything(
    model, loss, params, x, y, with_fallback, with_reference=True, with_quantities=False
):
    """:func:`walk_everything` (with vmap(grad)'s reference if ``with_reference``); if
    ``with_quantities``, also every ``fbp.quantities`` result and its reference
    (tests/test_quantities.py's ``every_quantity_program``) in the same compiled program,
    the reference ``∇ℓ_n = J_nᵀ∇_oℓ_n`` from the Jacobians that give the GGN diagonal's
    (one backward pass of the model per output entry, not those and one more)."""
    if not with_quantities:
        reference = "vmap" if with_reference else None
        return walk_everything(model, loss, params, x, y, with_fallback, reference)
    import test_quantities

    grads_n, diagonal = test_quantities.per_example_grads_and_ggn_diagonal(
        model, loss, params, x, y
    )
    out = walk_everything(model, loss, params, x, y, with_fallback, grads_n)
    out["quantities"] = test_quantities.every_quantity_program(model, params, x, y, diagonal)
    return out


# --------------------------------------------------------------------------- comparisons


def relative_error(got, want) -> float:
    """Largest ``‖got_n − want_n‖ / ‖want_n‖`` over the leading axis (examples, or one row)."""
    got = np.asarray(got, np.float64).reshape(len(want), -1)
    want = np.asarray(want, np.float64).reshape(len(want), -1)
    error = np.linalg.norm(got - want, axis=1)
    return float(np.max(error / np.maximum(np.linalg.norm(want, axis=1), 1e-300)))


def _sq_norms(per_example):
    return jax.tree.map(lambda g: np.sum(np.square(g.reshape(len(g), -1)), axis=1), per_example)


class Check(NamedTuple):
    """One comparison: which kind and leaf, what against what, and the relative error."""

    kind: str
    where: str
    what: str
    error: float


def _leaf_comparisons(record, want, grads, key, with_fallback):
    """``(what, got, expected)`` for one params leaf; ``want`` is autodiff's ``∇ℓ_n = N·g_n``
    (vmap(grad)'s, or in float64 ``J_nᵀ∇_oℓ_n``: see :func:`_walk_everything`)."""
    sq, g, dparams = record["sq"][key], record["g"][key], record["l2 rule"][0][key]
    pairs = [
        ("batch_l2 vs vmap(grad)", BATCH * np.sqrt(sq), np.sqrt(_sq_norms(want[key]))),
        ("batch_grad vs vmap(grad)", BATCH * g, want[key]),
        ("Σ_n g_n vs dparams", g.sum(0)[None], dparams[None]),
        ("batch_grad's dparams vs batch_l2's", record["grad rule"][0][key][None], dparams[None]),
        ("the rules' gradient vs mean of vmap(grad)", grads[key][None], want[key].mean(0)[None]),
        ("dtype of g", np.ones(1) * (g.dtype == want[key].dtype), np.ones(1)),
    ]
    if with_fallback:
        fallback = record["fallback g"][key]
        pairs.append(("batch_grad vs fallback", g, fallback))
        pairs.append(("batch_l2 vs fallback", np.sqrt(sq), np.sqrt(_sq_norms(fallback))))
    return pairs


def _leaf_comparisons_without_reference(record, grads, key, dtype):
    """``(what, got, expected)`` for one params leaf of a program without vmap(grad).

    The layer's rules against the fallback where it declares any (the fallback is
    autodiff of the layer alone on each example), and every rule against the others;
    vmap(grad) checks the same rules in float64 (and the fallback of every kind
    declaring none), so these check the float32 arithmetic of the declared rules.
    """
    sq, g, dparams = record["sq"][key], record["g"][key], record["l2 rule"][0][key]
    fallback = record["fallback g"][key] if "fallback g" in record else g
    pairs = [
        ("batch_l2 vs batch_grad", np.sqrt(sq), np.sqrt(_sq_norms(g))),
        ("Σ_n g_n vs dparams", g.sum(0)[None], dparams[None]),
        ("batch_grad's dparams vs batch_l2's", record["grad rule"][0][key][None], dparams[None]),
        ("the rules' gradient vs Σ_n fallback", grads[key][None], fallback.sum(0)[None]),
        ("dtype of g", np.ones(1) * (g.dtype == dtype), np.ones(1)),
    ]
    if "fallback g" in record:
        pairs.append(("batch_grad vs fallback", g, fallback))
        pairs.append(("batch_l2 vs fallback", np.sqrt(sq), np.sqrt(_sq_norms(fallback))))
    return pairs


def compare_everything(
    dtype: str,
    fast_only: bool,
    rest: bool = False,
    with_quantities: bool = False,
    with_reference: bool = True,
) -> tuple[list[Check], dict]:
    """Every comparison of the zoo model in ``dtype`` (float64 scoped to this call), and the
    program's outputs (with ``"quantities"`` if ``with_quantities``). Without
    ``with_reference`` (float32 only), no vmap(grad): :func:`_leaf_comparisons_without_reference`,
    and the model's norms against the fallback's per-example gradients."""
    with_fallback = dtype == "float32"  # the fallback is the costliest part to compile
    assert with_reference or with_fallback
    kinds, model, _, sites = zoo(fast_only, rest)
    with jax.enable_x64(dtype == "float64"):
        params, ids, labels = _problem(jnp.dtype(dtype), fast_only, rest)
        loss = losses.mse if rest else CE
        out = _walk_everything(
            model, loss, params, ids, labels, with_fallback, with_reference, with_quantities
        )
        out = jax.tree.map(np.asarray, out)
    reference = out["reference"]
    if with_reference:
        want_norms = np.sqrt(sum(jax.tree.leaves(_sq_norms(reference))))
        norms_what = "per_example_grad_norms vs vmap(grad)"
    else:  # ‖N·g_n‖ with g_n the fallback's where a rule is declared, else the layer's own
        per_leaf = [
            _sq_norms(record.get("fallback g", record["g"])) for record in out["records"].values()
        ]
        want_norms = BATCH * np.sqrt(sum(jax.tree.leaves(per_leaf)))
        norms_what = "per_example_grad_norms vs the fallback"
    norms = out["norms"]
    checks = [
        Check("all", "model", norms_what, relative_error(norms, want_norms)),
        Check("all", "model", "dtype of the norms", float(norms.dtype != dtype)),
    ]
    for kind in kinds:
        for site in sites[kind.id]:
            record = out["records"][site.index]
            grads = walk.at_path(out["grads"], site.path)
            if with_reference:
                want = walk.at_path(reference, site.path)
                assert set(record["sq"]) == set(record["g"]) == set(want), site.description
                declared = with_fallback and "fallback g" in record
                pairs = {key: _leaf_comparisons(record, want, grads, key, declared) for key in want}
            else:
                assert set(record["sq"]) == set(record["g"]) == set(grads), site.description
                pairs = {
                    key: _leaf_comparisons_without_reference(record, grads, key, dtype)
                    for key in grads
                }
            for key, comparisons in pairs.items():
                for what, got, expected in comparisons:
                    where = f"{site.description} {key}"
                    checks.append(Check(kind.id, where, what, relative_error(got, expected)))
            dx, dx_g = record["l2 rule"][1], record["grad rule"][1]
            if dx is not None:
                error = relative_error(dx_g[None], dx[None])
                checks.append(
                    Check(kind.id, site.description, "batch_grad's dx vs batch_l2's", error)
                )
    return checks, out


def _report(checks: list[Check]) -> str:
    return "\n".join(f"{c.kind:24} {c.where:60} {c.what:40} {c.error:.1e}" for c in checks)


# --------------------------------------------------------------------------- tests


def _check_every_layer_kind(
    dtype, fast_only, rest=False, with_quantities=False, with_reference=True
):
    checks, out = compare_everything(dtype, fast_only, rest, with_quantities, with_reference)
    failed = [c for c in checks if not c.error < TOLERANCE[dtype]]
    assert not failed, f"tolerance {TOLERANCE[dtype]}:\n{_report(failed)}"
    # Nothing was skipped: every kind, and (in float32) every declared rule against the fallback.
    kinds = zoo(fast_only, rest).kinds
    assert {c.kind for c in checks} == {"all", *(k.id for k in kinds)}
    compared = {c.kind for c in checks if c.what == "batch_grad vs fallback"}
    assert compared == ({k.id for k in kinds if k.declares} if dtype == "float32" else set())
    against_vmap = {c.kind for c in checks if c.what == "batch_grad vs vmap(grad)"}
    assert against_vmap == ({k.id for k in kinds} if with_reference else set())
    return out


def test_representative_layer_kinds_against_vmap_of_grad_in_float32():
    """One of each family with its own rule, and a user's layer on the fallback."""
    families = {"embedding", "dense", "conv1d", "layer_norm", "rnn", "self_attention", "user"}
    assert {k.id.split()[0] for k in zoo(fast_only=True).kinds} >= families
    _check_every_layer_kind("float32", fast_only=True)


# The two heavy tests (one compiled program each, ~10 s of CPU) are apart in the file:
# pytest-xdist hands out consecutive tests two by two, so each goes to its own worker.


@pytest.mark.slow
def test_the_other_layer_kinds_against_the_fallback_in_float32():
    """The kinds the inner loop leaves out, on sequences (no ids in, no head: the mean
    squared error): their declared rules against the fallback, and each other, in float32.

    No vmap(grad) here: the float64 test checks every kind's rules (and the fallback of
    the kinds declaring none) against it to 1e-10, the inner loop the representative kinds
    in float32; what float32 adds is its arithmetic, checked against the fallback.
    """
    assert {k.id for k in zoo(False, rest=True).kinds} | {k.id for k in zoo(True).kinds} == {
        k.id for k in KINDS
    }
    _check_every_layer_kind("float32", fast_only=False, rest=True, with_reference=False)


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_the_table_says_what_each_layer_declares(kind):
    """The table's ``declares`` is true, so 'fast rule vs fallback' tests a fast rule."""
    sites = zoo(fast_only=False).sites
    assert sites[kind.id], f"{kind.id}: no layer with params in its block"
    for site in sites[kind.id]:
        ext = site.layer.extensions
        declared = {f for f in ("batch_l2", "batch_grad") if ext and getattr(ext, f) is not None}
        assert declared == kind.declares, site.description


# --------------------------------------------------------------------------- the check can fail


def _goodfellow_on_sequences() -> nn.Layer:
    """A dense layer with the classic wrong sequence rule ``Σ_t ‖x_t‖²·‖δ_t‖²`` (no cross terms)."""
    layer = nn.dense(FEATURES)

    def batch_l2(params, cache, dy):
        dparams, dx = layer.backward(params, cache, dy)
        sq_w = jnp.sum(jnp.sum(cache * cache, -1) * jnp.sum(dy * dy, -1), axis=1)
        return dparams, dx, {"w": sq_w, "b": jnp.sum(jnp.sum(dy, axis=1) ** 2, -1)}

    return layer._replace(extensions=layer.extensions._replace(batch_l2=batch_l2))


def test_a_wrong_rule_fails_the_comparison():
    model = nn.serial(_goodfellow_on_sequences(), nn.mean_over_time(), nn.dense(CLASSES))
    rng = np.random.default_rng(0)  # numpy draws: init traced for the shapes only
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), (TIME, FEATURES))[0])
    params = jax.tree.map(
        lambda a: device_array(rng.standard_normal(a.shape) / np.sqrt(a.shape[0]), a.dtype), shapes
    )
    x = device_array(rng.standard_normal((BATCH, TIME, FEATURES)), np.float32)
    labels = device_array(np.arange(BATCH) % CLASSES, np.int32)

    def both(params, x, y):
        def one(p, x_n, y_n):
            return CE.value(model.apply(p, x_n[None]), y_n[None])

        reference = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
        return diagnostics.per_example_grad_norms(model, CE)(params, x, y), reference

    norms, reference = jax.tree.map(np.asarray, jax.jit(both)(params, x, labels))
    want = np.sqrt(np.sum(jax.tree.leaves(_sq_norms(reference)), axis=0))
    assert relative_error(norms, want) > 100 * TOLERANCE["float32"]


@pytest.mark.slow
def test_every_layer_kind_against_vmap_of_grad_in_float64():
    """Every kind in float64; and, in the same compiled program, every ``fbp.quantities``
    result on the same model (first order against this vmap(grad), the GGN diagonal against
    jacrev and hessian, KFLR's factors): tests/test_quantities.py's check of every layer kind.
    """
    import test_quantities

    out = _check_every_layer_kind("float64", fast_only=False, with_quantities=True)
    test_quantities.check_every_quantity_on_every_layer_kind(
        zoo(fast_only=False), *out["quantities"], out["reference"]
    )
