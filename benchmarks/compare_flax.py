"""Every fbp layer against its Flax counterpart, weights mapped by hand, in float64.

For each layer family this script builds the Flax (``flax.linen``) module,
draws *every* one of its parameters at random (biases and running statistics
included, so a mapping that drops or misplaces one shows), maps them to fbp's
layout with a small explicit function, sets the defaults that differ equal,
and compares on random inputs and three seeds:

- the forward output;
- ``dx`` and ``dparams``: the gradients of a random linear functional
  ``L = Σ u ⊙ y`` with respect to the input and every parameter — fbp's
  hand-written ``layer.backward(params, cache, u)`` against ``jax.vjp`` of the
  Flax module's ``apply``, whose parameter gradients are mapped by the same
  function (every mapping is a rearrangement, so gradients map like weights).

The ``to_fbp_*`` functions below ARE the documentation of the mapping (README,
"Coming from Flax", quotes them as a table). The mapped params are also
checked to have exactly the shapes ``layer.init`` gives, so the table cannot
describe a layout fbp does not use.

The error printed is, per array, ``max|fbp − flax| / max|flax|``, the worst
over the arrays of a column and over the seeds.

Flax is *not* a dependency of fbp. Run:

    pip install flax
    python benchmarks/compare_flax.py

Writes benchmarks/results/compare_flax.json and prints a markdown table; exits
with status 1 if any error exceeds 1e-10.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

try:
    import flax
    import flax.linen as fnn
except ModuleNotFoundError:
    sys.exit(
        "compare_flax.py compares fbp with Flax, which is not a dependency of fbp: "
        "`pip install flax` first."
    )

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from common import table, write_json

from fbp import models, nn

F64 = jnp.float64
SEEDS = (0, 1, 2)
TOLERANCE = 1e-10  # float64 round-off is ~1e-16; a wrong mapping or rule is O(1)


# --------------------------------------------------------------------------- the mappings
# Flax keeps parameters under variables["params"] (and batch-norm's running
# statistics under variables["batch_stats"]); fbp keeps one pytree per layer.


def to_fbp_dense(v):
    # Dense: kernel (n_in, n_out), bias (n_out,) -- the same layout, renamed.
    p = v["params"]
    return {"w": p["kernel"], "b": p["bias"]} if "bias" in p else {"w": p["kernel"]}


def to_fbp_conv(v):
    # Conv: kernel (k..., n_in, n_out), bias (n_out,) -- the same layout, renamed.
    return to_fbp_dense(v)


def to_fbp_norm(v):
    # LayerNorm: scale, bias -- the same names and shapes.
    return dict(v["params"])


def to_fbp_batch_norm(v):
    # BatchNorm: params {scale, bias} + batch_stats {mean, var}; fbp keeps the
    # running statistics inside the layer's params, under "stats".
    stats = v["batch_stats"]
    return {**v["params"], "stats": {"mean": stats["mean"], "var": stats["var"]}}


def to_fbp_embedding(v):
    # Embed: embedding (vocab, features) -- the same name and layout
    # (unembedding is Embed.attend on the same table: y = x·Eᵀ).
    return {"embedding": v["params"]["embedding"]}


def _cell(v):
    # nn.RNN(cell) keeps the cell's params under "cell".
    return v["params"]["cell"]


def to_fbp_rnn(v):
    # SimpleCell: i (input Dense, with bias), h (recurrent Dense, no bias).
    c = _cell(v)
    return {"w_x": c["i"]["kernel"], "w_h": c["h"]["kernel"], "b": c["i"]["bias"]}


def to_fbp_gru(v):
    # GRUCell: gates r, z, n; input Denses ir, iz, in carry the biases, the
    # recurrent hr, hz have none and hn has one, which sits inside r ⊙ (·).
    c = _cell(v)
    cat = lambda *xs: jnp.concatenate(xs, axis=-1)  # noqa: E731
    return {
        "w_x": cat(c["ir"]["kernel"], c["iz"]["kernel"], c["in"]["kernel"]),
        "w_h": cat(c["hr"]["kernel"], c["hz"]["kernel"], c["hn"]["kernel"]),
        "b": cat(c["ir"]["bias"], c["iz"]["bias"], c["in"]["bias"]),
        "b_hn": c["hn"]["bias"],
    }


def to_fbp_lstm(v):
    # LSTMCell and OptimizedLSTMCell (same names): gates i, f, g, o; the input
    # Denses ii, if, ig, io have no bias, the recurrent hi, hf, hg, ho carry it.
    c = _cell(v)
    gates = "ifgo"
    return {
        "w_x": jnp.concatenate([c[f"i{g}"]["kernel"] for g in gates], axis=-1),
        "w_h": jnp.concatenate([c[f"h{g}"]["kernel"] for g in gates], axis=-1),
        "b": jnp.concatenate([c[f"h{g}"]["bias"] for g in gates], axis=-1),
    }


def to_fbp_bidirectional(to_fbp_cell):
    # Bidirectional(forward_rnn, backward_rnn): fbp's params are the pair.
    def mapping(v):
        p = v["params"]
        forward = {"params": {"cell": p["forward_rnn"]["cell"]}}
        backward = {"params": {"cell": p["backward_rnn"]["cell"]}}
        return (to_fbp_cell(forward), to_fbp_cell(backward))

    return mapping


def to_fbp_attention(v):
    # MultiHeadDotProductAttention: query/key/value kernels (n_in, H, D) and
    # biases (H, D); out kernel (H, D, F), bias (F,). fbp fuses Q, K, V into
    # one (n_in, 3F) matmul, head h owning columns h·D … (h+1)·D − 1 of each.
    p = v["params"]
    qkv = [p[k] for k in ("query", "key", "value")]
    n_in, heads, width = qkv[0]["kernel"].shape
    out = {
        "w_qkv": jnp.concatenate([t["kernel"].reshape(n_in, heads * width) for t in qkv], 1),
        "w_o": p["out"]["kernel"].reshape(heads * width, -1),
    }
    if "bias" in p["out"]:
        out["b_qkv"] = jnp.concatenate([t["bias"].reshape(-1) for t in qkv])
        out["b_o"] = p["out"]["bias"]
    return out


# --------------------------------------------------------------------------- whole models
# A serial's params are the tuple of its children's (a parameter-free layer's
# are {}); a residual's are its inner layer's. So a Flax model maps by mapping
# each submodule in order.


class FlaxLeNet5(fnn.Module):
    """``fbp.models.lenet5()`` written in Flax."""

    @fnn.compact
    def __call__(self, x):
        p = {"param_dtype": F64}
        x = fnn.max_pool(fnn.relu(fnn.Conv(6, (5, 5), **p)(x)), (2, 2), strides=(2, 2))
        x = fnn.Conv(16, (5, 5), padding="VALID", **p)(x)
        x = fnn.max_pool(fnn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)  # fbp's flatten: row-major, as here
        x = fnn.relu(fnn.Dense(120, **p)(x))
        x = fnn.relu(fnn.Dense(84, **p)(x))
        return fnn.Dense(10, **p)(x)


def to_fbp_lenet5(v):
    # serial(conv, relu, max_pool, conv, relu, max_pool, flatten, dense, relu, dense, relu, dense)
    p = v["params"]
    d = lambda name: to_fbp_dense({"params": p[name]})  # noqa: E731
    return (
        d("Conv_0"),
        {},
        {},
        d("Conv_1"),
        {},
        {},
        {},
        d("Dense_0"),
        {},
        d("Dense_1"),
        {},
        d("Dense_2"),
    )


class FlaxBlock(fnn.Module):
    """A pre-LN causal transformer block, as ``fbp.models.gpt`` builds each one."""

    heads: int
    width: int

    @fnn.compact
    def __call__(self, x):
        p = {"param_dtype": F64}
        h = fnn.LayerNorm(epsilon=1e-5, **p)(x)
        attention = fnn.MultiHeadDotProductAttention(
            self.heads, qkv_features=self.width, out_features=self.width, **p
        )
        x = x + attention(h, mask=fnn.make_causal_mask(x[..., 0]))
        h = fnn.LayerNorm(epsilon=1e-5, **p)(x)
        h = fnn.gelu(fnn.Dense(4 * self.width, **p)(h))  # Dense_0
        return x + fnn.Dense(self.width, **p)(h)  # Dense_1


def fbp_block(heads, width):
    return nn.serial(
        nn.residual(nn.serial(nn.layer_norm(), nn.self_attention(heads, width, causal=True))),
        nn.residual(nn.serial(nn.layer_norm(), nn.dense(4 * width), nn.gelu(), nn.dense(width))),
    )


def to_fbp_block(v):
    p = v["params"]
    sub = lambda name: {"params": p[name]}  # noqa: E731
    attention = (
        to_fbp_norm(sub("LayerNorm_0")),
        to_fbp_attention(sub("MultiHeadDotProductAttention_0")),
    )
    mlp = (
        to_fbp_norm(sub("LayerNorm_1")),
        to_fbp_dense(sub("Dense_0")),
        {},
        to_fbp_dense(sub("Dense_1")),
    )
    return (attention, mlp)


def no_params(v):
    # A parameter-free function (pooling, activations).
    del v
    return {}


# --------------------------------------------------------------------------- the cases


class Case(NamedTuple):
    """One comparison: an fbp layer, its Flax counterpart and the map between them."""

    name: str
    flax: str  # the Flax counterpart, as the README table names it
    layer: nn.Layer
    flax_init: Callable  # (key, x) -> variables
    flax_apply: Callable  # (variables, x) -> y
    to_fbp: Callable  # variables -> fbp params
    make_input: Callable  # key -> x
    train: bool = False


def _normal(shape):
    return lambda key: jax.random.normal(key, shape, F64)


def _module_case(name, flax_name, layer, module, to_fbp, shape, train=False, **call):
    """A case for a Flax module called as ``module.apply(variables, x, **call)``."""
    return Case(
        name,
        flax_name,
        layer,
        lambda key, x: module.init(key, x, **call),
        lambda v, x: module.apply(v, x, **call),
        to_fbp,
        _normal(shape),
        train,
    )


def _function_case(name, flax_name, layer, fn, shape):
    """A case for a parameter-free Flax function ``fn(x)``."""
    return Case(
        name, flax_name, layer, lambda key, x: {}, lambda v, x: fn(x), no_params, _normal(shape)
    )


def _batch_norm_train(v, x):
    # Flax returns the new running statistics beside y; the gradient is of y.
    module = fnn.BatchNorm(momentum=0.9, epsilon=1e-5, param_dtype=F64)
    y, _ = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    return y


def cases() -> list[Case]:
    p = {"param_dtype": F64}
    rnn = lambda cell, **kw: fnn.RNN(cell, **kw)  # noqa: E731
    seq = (3, 7, 4)  # (batch, time, features)
    out = [
        _module_case("dense", "Dense", nn.dense(5), fnn.Dense(5, **p), to_fbp_dense, (6, 7)),
        _module_case(
            "dense, no bias, on a sequence",
            "Dense(use_bias=False)",
            nn.dense(5, use_bias=False),
            fnn.Dense(5, use_bias=False, **p),
            to_fbp_dense,
            (3, 4, 7),
        ),
        _module_case(
            "conv1d k3 s2 SAME",
            "Conv((3,), strides=2)",
            nn.conv1d(6, 3, strides=2),
            fnn.Conv(6, (3,), strides=2, **p),
            to_fbp_conv,
            (4, 11, 3),
        ),
        _module_case(
            "conv1d k3 dilation 2, padding (1, 2), no bias",
            "Conv((3,), kernel_dilation=2, padding=[(1, 2)], use_bias=False)",
            nn.conv1d(4, 3, dilation=2, padding=[(1, 2)], use_bias=False),
            fnn.Conv(4, (3,), kernel_dilation=2, padding=[(1, 2)], use_bias=False, **p),
            to_fbp_conv,
            (4, 10, 3),
        ),
        _module_case(
            "conv1d k3 xla implementation",
            "Conv((3,), padding='VALID')",
            nn.conv1d(6, 3, padding="VALID", implementation="xla"),
            fnn.Conv(6, (3,), padding="VALID", **p),
            to_fbp_conv,
            (4, 11, 3),
        ),
        _module_case(
            "conv2d 3×3 s(2,1) VALID",
            "Conv((3, 3), strides=(2, 1), padding='VALID')",
            nn.conv2d(5, (3, 3), strides=(2, 1), padding="VALID"),
            fnn.Conv(5, (3, 3), strides=(2, 1), padding="VALID", **p),
            to_fbp_conv,
            (3, 9, 8, 2),
        ),
        _module_case(
            "conv2d 2×3 s2 SAME",
            "Conv((2, 3), strides=2)",
            nn.conv2d(4, (2, 3), strides=2),
            fnn.Conv(4, (2, 3), strides=2, **p),
            to_fbp_conv,
            (3, 7, 8, 2),
        ),
        _function_case(
            "max_pool 3 (1-D)",
            "max_pool(x, (3,), strides=(3,))",
            nn.max_pool(3),
            lambda x: fnn.max_pool(x, (3,), strides=(3,)),
            (4, 10, 3),
        ),
        _function_case(
            "max_pool 2×2, strides 1, SAME",
            "max_pool(x, (2, 2), padding='SAME')",
            nn.max_pool((2, 2), strides=1, padding="SAME"),
            lambda x: fnn.max_pool(x, (2, 2), padding="SAME"),
            (3, 6, 5, 2),
        ),
        _function_case(
            "avg_pool 2 (1-D)",
            "avg_pool(x, (2,), strides=(2,))",
            nn.avg_pool(2),
            lambda x: fnn.avg_pool(x, (2,), strides=(2,)),
            (4, 10, 3),
        ),
        _function_case(
            "avg_pool 3×3, strides 2, SAME",
            "avg_pool(x, (3, 3), strides=(2, 2), padding='SAME')",
            nn.avg_pool((3, 3), strides=2, padding="SAME"),
            lambda x: fnn.avg_pool(x, (3, 3), strides=(2, 2), padding="SAME"),
            (3, 7, 6, 2),
        ),
        _module_case(
            "layer_norm",
            "LayerNorm(epsilon=1e-5)",
            nn.layer_norm(),
            fnn.LayerNorm(epsilon=1e-5, **p),
            to_fbp_norm,
            (4, 5, 8),
        ),
        Case(
            "batch_norm, train=True",
            "BatchNorm(use_running_average=False)",
            nn.batch_norm(),
            lambda key, x: fnn.BatchNorm(param_dtype=F64).init(key, x, use_running_average=False),
            _batch_norm_train,
            to_fbp_batch_norm,
            _normal((6, 4, 5)),
            True,
        ),
        _module_case(
            "batch_norm, train=False",
            "BatchNorm(use_running_average=True)",
            nn.batch_norm(),
            fnn.BatchNorm(**p),
            to_fbp_batch_norm,
            (6, 4, 5),
            use_running_average=True,
        ),
        Case(
            "embedding",
            "Embed",
            nn.embedding(11, 6),
            lambda key, ids: fnn.Embed(11, 6, **p).init(key, ids),
            lambda v, ids: fnn.Embed(11, 6, **p).apply(v, ids),
            to_fbp_embedding,
            lambda key: jax.random.randint(key, (4, 7), 0, 11),
        ),
        Case(
            "unembedding",
            "Embed.attend",
            nn.unembedding(11),
            lambda key, x: fnn.Embed(11, 6, **p).init(key, x, method="attend"),
            lambda v, x: fnn.Embed(11, 6, **p).apply(v, x, method="attend"),
            to_fbp_embedding,
            _normal((4, 7, 6)),
        ),
        _module_case(
            "rnn", "RNN(SimpleCell)", nn.rnn(5), rnn(fnn.SimpleCell(5, **p)), to_fbp_rnn, seq
        ),
        _module_case(
            "rnn, reverse=True",
            "RNN(SimpleCell, reverse=True, keep_order=True)",
            nn.rnn(5, reverse=True),
            rnn(fnn.SimpleCell(5, **p), reverse=True, keep_order=True),
            to_fbp_rnn,
            seq,
        ),
        _module_case("gru", "RNN(GRUCell)", nn.gru(5), rnn(fnn.GRUCell(5, **p)), to_fbp_gru, seq),
        _module_case(
            "gru, bidirectional=True",
            "Bidirectional(RNN(GRUCell), RNN(GRUCell))",
            nn.gru(5, bidirectional=True),
            fnn.Bidirectional(rnn(fnn.GRUCell(5, **p)), rnn(fnn.GRUCell(5, **p))),
            to_fbp_bidirectional(to_fbp_gru),
            seq,
        ),
        _module_case(
            "lstm", "RNN(LSTMCell)", nn.lstm(5), rnn(fnn.LSTMCell(5, **p)), to_fbp_lstm, seq
        ),
        _module_case(
            "lstm, reverse=True",
            "RNN(OptimizedLSTMCell, reverse=True, keep_order=True)",
            nn.lstm(5, reverse=True),
            rnn(fnn.OptimizedLSTMCell(5, **p), reverse=True, keep_order=True),
            to_fbp_lstm,
            seq,
        ),
        _module_case(
            "self_attention",
            "MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=8)",
            nn.self_attention(2, 8),
            fnn.MultiHeadDotProductAttention(2, qkv_features=8, out_features=8, **p),
            to_fbp_attention,
            (3, 6, 5),
        ),
        Case(
            "self_attention, causal, no bias",
            "… (use_bias=False)(x, mask=make_causal_mask(x[..., 0]))",
            nn.self_attention(4, 8, causal=True, use_bias=False),
            lambda key, x: _attention_no_bias().init(key, x, mask=_causal(x)),
            lambda v, x: _attention_no_bias().apply(v, x, mask=_causal(x)),
            to_fbp_attention,
            _normal((3, 6, 8)),
        ),
    ]
    out += [
        _module_case(
            "models.lenet5()",
            "LeNet-5 as a compact Module",
            models.lenet5(),
            FlaxLeNet5(),
            to_fbp_lenet5,
            (2, 28, 28, 1),
        ),
        _module_case(
            "a GPT block: residual(LN, causal attention), residual(LN, MLP)",
            "the same block as a compact Module",
            fbp_block(2, 8),
            FlaxBlock(2, 8),
            to_fbp_block,
            (3, 6, 8),
        ),
    ]
    activations = [
        ("relu", nn.relu(), fnn.relu),
        ("sigmoid", nn.sigmoid(), fnn.sigmoid),
        ("tanh", nn.tanh(), fnn.tanh),
        ("gelu", nn.gelu(), fnn.gelu),
        ("gelu(approximate=False)", nn.gelu(False), lambda x: fnn.gelu(x, approximate=False)),
        ("elu", nn.elu(), fnn.elu),
        ("leaky_relu", nn.leaky_relu(), fnn.leaky_relu),
        ("softplus", nn.softplus(), fnn.softplus),
    ]
    for name, layer, fn in activations:
        # jax.nn's functions, re-exported by flax.linen (same defaults).
        flax_name = f"{name.split('(')[0]}{'(x, approximate=False)' if '(' in name else ''}"
        out.append(_function_case(name, flax_name, layer, fn, (5, 9)))
    return out


def _attention_no_bias():
    return fnn.MultiHeadDotProductAttention(
        4, qkv_features=8, out_features=8, use_bias=False, param_dtype=F64
    )


def _causal(x):
    return fnn.make_causal_mask(x[..., 0])


# --------------------------------------------------------------------------- the comparison


def randomize(variables: Any, key: jax.Array) -> Any:
    """Every leaf drawn at random (variances positive), so no zero bias hides a bad mapping."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(key, max(len(leaves), 1))
    new = []
    for (path, leaf), k in zip(leaves, keys, strict=False):
        value = jax.random.normal(k, leaf.shape, F64)
        if getattr(path[-1], "key", None) == "var":
            value = jax.random.uniform(k, leaf.shape, F64, 0.5, 2.0)
        new.append(value)
    return jax.tree_util.tree_unflatten(treedef, new)


def relative_error(got: Any, want: Any) -> jax.Array:
    """``max|got − want| / max|want|``, the worst over the leaves of two equal-structure trees."""
    if jax.tree.structure(got) != jax.tree.structure(want):
        raise AssertionError(
            f"structures differ: {jax.tree.structure(got)} vs {jax.tree.structure(want)}"
        )
    errors = [
        jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), jnp.finfo(F64).tiny)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    ]
    return jnp.max(jnp.stack(errors)) if errors else jnp.zeros((), F64)


def compare(case: Case) -> dict[str, float | None]:
    """Forward, dx and dparams errors of ``case``, the worst over the seeds (one compile)."""

    @jax.jit
    def errors(variables, x, key):
        params = case.to_fbp(variables)
        y, cache = case.layer.forward(params, x, train=case.train)
        u = jax.random.normal(key, y.shape, F64)
        dparams, dx = case.layer.backward(params, cache, u)
        if jnp.issubdtype(x.dtype, jnp.floating):
            y_ref, vjp = jax.vjp(case.flax_apply, variables, x)
            dvariables, dx_ref = vjp(u)
            dx_error = relative_error(dx, dx_ref)
        else:  # ids: no gradient with respect to them
            y_ref, vjp = jax.vjp(lambda v: case.flax_apply(v, x), variables)
            (dvariables,), dx_error = vjp(u), None
        return {
            "forward": relative_error(y, y_ref),
            "dx": dx_error,
            "dparams": relative_error(dparams, case.to_fbp(dvariables)) if params else None,
        }

    worst: dict[str, float | None] = {}
    for seed in SEEDS:
        k_x, k_init, k_params, k_u = jax.random.split(jax.random.key(seed), 4)
        x = case.make_input(k_x)
        variables = randomize(case.flax_init(k_init, x), k_params)
        # The mapped params have exactly the layout fbp's own init gives.
        own, _ = case.layer.init(jax.random.key(0), x.shape[1:])
        mapped = case.to_fbp(variables)
        shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
        if shapes(own) != shapes(mapped):
            raise AssertionError(f"{case.name}: mapped {shapes(mapped)}, fbp's init {shapes(own)}")
        for k, v in errors(variables, x, k_u).items():
            worst[k] = None if v is None else max(float(v), worst.get(k) or 0.0)
    return worst


def compare_batch_stats_update(seed: int, fbp_momentum: float = 0.99) -> float:
    """fbp's ``update_batch_stats`` against Flax's mutable ``batch_stats`` (Flax momentum 0.99)."""
    k_x, k_v = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k_x, (6, 4, 5), F64) * 3 + 1
    module = fnn.BatchNorm(momentum=0.99, param_dtype=F64)
    variables = randomize(module.init(k_v, x, use_running_average=False), k_v)
    _, updated = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    layer = nn.batch_norm()
    params = to_fbp_batch_norm(variables)
    _, cache = layer.forward(params, x, train=True)
    new = nn.update_batch_stats(layer, params, cache, momentum=fbp_momentum)
    return float(relative_error(new["stats"], dict(updated["batch_stats"])))


def _gru_gates_swapped(v):
    # A deliberately wrong mapping: r and z exchanged.
    p = to_fbp_gru(v)
    n = p["b_hn"].shape[0]
    swap = lambda a: jnp.concatenate([a[..., n : 2 * n], a[..., :n], a[..., 2 * n :]], -1)  # noqa: E731
    return {k: swap(a) if k != "b_hn" else a for k, a in p.items()}


def controls() -> list[dict]:
    """Comparisons that must fail: a wrong mapping, and the defaults that differ left unequal.

    They show the comparison can fail, and by how much each default matters.
    """
    gru = next(case for case in cases() if case.name == "gru")
    wrong_gru = gru._replace(name="gru, r and z swapped in the mapping", to_fbp=_gru_gates_swapped)
    flax_ln = _module_case(
        "layer_norm() vs LayerNorm() (ε 1e-5 vs 1e-6)",
        "LayerNorm()",
        nn.layer_norm(),
        fnn.LayerNorm(param_dtype=F64),
        to_fbp_norm,
        (4, 5, 8),
    )
    rows = []
    for case in (wrong_gru, flax_ln):
        rows.append({"fbp": case.name, "flax": case.flax, **compare(case)})
    update = max(compare_batch_stats_update(seed, fbp_momentum=0.9) for seed in SEEDS)
    rows.append(
        {
            "fbp": "update_batch_stats() (momentum 0.9)",
            "flax": "BatchNorm() (momentum 0.99)",
            "forward": update,
            "dx": None,
            "dparams": None,
        }
    )
    return rows


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1e}"


def main() -> int:
    rows = []
    with jax.enable_x64(True):
        for case in cases():
            rows.append({"fbp": case.name, "flax": case.flax, **compare(case)})
        update = max(compare_batch_stats_update(seed) for seed in SEEDS)
        rows.append(
            {
                "fbp": "update_batch_stats(momentum=0.99)",
                "flax": "BatchNorm(momentum=0.99) mutable batch_stats",
                "forward": update,
                "dx": None,
                "dparams": None,
            }
        )
        failing = controls()
    columns = ["fbp", "flax", "forward", "dx", "dparams"]
    show = lambda rows: [{**r, **{k: _fmt(r[k]) for k in columns[2:]}} for r in rows]  # noqa: E731
    print(
        f"fbp vs flax {flax.__version__} (jax {jax.__version__}), float64, seeds {SEEDS}: "
        "max |fbp − flax| / max |flax| per array, worst over arrays and seeds\n"
    )
    print(table(show(rows), columns))
    worst = max(r[k] for r in rows for k in columns[2:] if r[k] is not None)
    print(f"\nworst relative error over everything: {worst:.1e}")
    print(
        "\ncontrols, which must fail (a wrong mapping; the differing defaults left as they are):\n"
    )
    print(table(show(failing), columns))
    path = write_json(
        "compare_flax.json",
        {
            "flax": flax.__version__,
            "seeds": list(SEEDS),
            "tolerance": TOLERANCE,
            "worst": worst,
            "rows": rows,
            "controls": failing,
        },
    )
    print(f"wrote {path}")
    status = 0
    if worst > TOLERANCE:
        print(f"FAIL: an error exceeds {TOLERANCE:g}", file=sys.stderr)
        status = 1
    for row in failing:
        if max(row[k] for k in columns[2:] if row[k] is not None) <= TOLERANCE:
            print(
                f"FAIL: the control {row['fbp']!r} passed; the comparison is blind", file=sys.stderr
            )
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
