"""BackPACK's quantities from fbp.quantities, timed against a plain gradient and the JAX way.

For each quantity, ``fbp.quantities.value_grad_and(model, loss, quantity)``
(value, gradient and the quantity, one jitted program) is timed interleaved
with a plain ``fbp.grad`` — the baseline of every ratio — and, in the same
run, the same quantity computed the JAX way:

- ``batch_l2`` / ``sum_grad_squared`` / ``variance`` / ``batch_grad``:
  per-example gradients by ``jax.vmap(jax.grad)`` of the loss on one
  example, then reduced;
- ``diag_ggn`` (exact): per example, ``jax.vjp`` of the network output with
  each column of the loss Hessian's factor (``vmap`` over columns), squared
  and summed — run over the examples with ``jax.lax.map`` in chunks
  (vmapping everything would hold N·C copies of the gradient);
- ``diag_ggn_mc(1)``: ``vmap(jax.grad)`` at sampled labels, squared, summed;
- ``kfac`` / ``kflr``: no JAX way (kfac-jax is a separate library; here "—");
- the clipped mean gradient alone, one pass against two passes;
- DP-SGD step (clipped mean gradient + Gaussian noise + SGD update) against
  a non-private step (gradient + SGD update), both jitted whole, and against
  the two-backward method (``fbp.diagnostics``' before it used the one pass) and the
  JAX way (clip ``vmap(jax.grad)``'s per-example gradients);
- Hessian-vector product: ``jax.jvp`` of ``fbp.grad`` against ``jax.jvp`` of
  ``jax.grad``.

fbp's programs are timed interleaved with each other (many repeats) and the
JAX way's interleaved with a plain gradient (few repeats, they take up to
seconds); each group's ratios are to its own ``fbp.grad``.

Targets (issue 14): batch_l2, sum_grad_squared, variance ≤ 1.2× a gradient;
diag_ggn_mc, kfac ≤ 2×; exact diag_ggn ≤ (C + 1)×; DP-SGD step ≤ 1.15× a
non-private step.

Models (``--model``, inputs random, 10 classes, batch 256 unless ``--batch``):
``wide`` the 784-1024-1024-10 ReLU MLP (``batch_grad`` skipped: 1.9 GB),
``cnn`` the MNIST-1D CNN, ``gru`` the MNIST-1D bidirectional GRU.

Run:  python benchmarks/bench_quantities.py [--quick] [--model wide|cnn|gru] [--fbp-only]
Writes benchmarks/results/quantities_<model>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from common import compile_seconds, interleaved_medians, table, wide_mlp_problem, write_json

import fbp
from fbp import diagnostics, losses
from fbp import quantities as q
from fbp.models import mnist1d_cnn, mnist1d_gru
from fbp.nn import walk

MODELS = {
    "wide": "784-1024-1024-10 ReLU MLP",
    "cnn": "MNIST-1D CNN (3×conv1d 25 ch, dense 125→10)",
    "gru": "MNIST-1D bidirectional GRU (2×gru 6, dense 480→10), T=40",
}


def _two_pass_clipped(model, loss, clip):
    """The clipped mean gradient in two backward passes (fbp.diagnostics' method before 0.2).

    The first pass reads each example's gradient norm from the caches; the
    second is the ordinary backward seeded with the output error whose row
    ``n`` is scaled by ``c_n`` (exact: the backward is linear in that error).
    Kept here as the baseline the one-pass book-keeping is measured against.
    """

    def f(params, x, y):
        pred, tape = walk.forward(model, params, x, train=True)
        dpred = loss.grad(pred, y)
        batch = pred.shape[0]
        _, norms = diagnostics._norms_and_grads(model, params, tape, dpred, batch, True)
        c = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-30)).astype(dpred.dtype)
        scaled = dpred * c.reshape((batch,) + (1,) * (dpred.ndim - 1))
        grads, _ = walk.backward(model, params, tape, scaled, walk.checked_backward, train=True)
        return grads

    return f


def arithmetic(compiled) -> float | None:
    """XLA's count of floating-point operations in a compiled program (its cost analysis).

    None where the program loops (``lax.map``, ``lax.scan``: the GRU, the exact
    curvature's columns): the analysis counts a loop's body once. JAX's CPU
    random-number hash (a loop over five rounds of a few hundred integer
    operations, for keys and sampled labels) is not counted as a loop here.
    """
    for line in compiled.as_text().splitlines():
        if " while(" in line and not re.search(r"threefry|_uniform|_gumbel|random_bits", line):
            return None
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def problem(name: str, batch: int):
    if name == "wide":
        return wide_mlp_problem(batch)
    model = mnist1d_cnn(10) if name == "cnn" else mnist1d_gru(10)
    params, _ = model.init(jax.random.key(0), (40,))
    x = jax.random.normal(jax.random.key(1), (batch, 40))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return model, params, x, y


def jax_way(model, loss, batch: int, chunk: int):
    """The same quantities by autodiff: vmap(jax.grad), vjp per Hessian column."""

    def one_loss(p, x_n, y_n):
        return loss.value(model.apply(p, x_n[None]), y_n[None])

    def per_example(params, x, y):
        return jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0))(params, x, y)

    def sq(g):
        return jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)

    def batch_l2(params, x, y):
        return jax.tree.map(lambda g: sq(g / batch), per_example(params, x, y))

    def sum_grad_squared(params, x, y):
        return jax.tree.map(lambda g: jnp.sum(jnp.square(g / batch), 0), per_example(params, x, y))

    def variance(params, x, y):
        g = per_example(params, x, y)
        return jax.tree.map(lambda r: jnp.mean(r * r, 0) - jnp.mean(r, 0) ** 2, g)

    def batch_grad(params, x, y):
        return jax.tree.map(lambda g: g / batch, per_example(params, x, y))

    def diag_ggn(params, x, y):
        pred = model.apply(params, x)
        seeds = q.hessian_factor(loss, pred, y) / jnp.sqrt(batch)  # (C, N, out)

        def one(args):
            x_n, s_n = args  # s_n: (C, out)
            _, vjp = jax.vjp(lambda p: model.apply(p, x_n[None])[0], params)
            g = jax.vmap(lambda s: vjp(s)[0])(s_n)
            return jax.tree.map(lambda a: jnp.sum(jnp.square(a), 0), g)

        parts = jax.lax.map(one, (x, jnp.swapaxes(seeds, 0, 1)), batch_size=chunk)
        return jax.tree.map(lambda a: jnp.sum(a, 0), parts)

    def diag_ggn_mc(params, x, y, key):
        labels = jax.random.categorical(key, model.apply(params, x), axis=-1)
        g = per_example(params, x, labels)
        return jax.tree.map(lambda r: jnp.sum(jnp.square(r / batch), 0), g)

    return {
        "batch_l2": batch_l2,
        "sum_grad_squared": sum_grad_squared,
        "variance": variance,
        "batch_grad": batch_grad,
        "diag_ggn": diag_ggn,
        "diag_ggn_mc(1)": diag_ggn_mc,
    }, per_example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", choices=tuple(MODELS), default="wide")
    parser.add_argument(
        "--fbp-only",
        action="store_true",
        help="skip the JAX way (on the wide MLP it takes minutes); fbp's ratios only, "
        "written to quantities_<model>_fbp_only.json",
    )
    args = parser.parse_args()
    batch, loss = args.batch, losses.softmax_cross_entropy
    model, params, x, y = problem(args.model, batch)
    key = jax.random.key(3)
    classes = 10
    chunk = 8 if args.model == "wide" else 64

    quantities = {
        "batch_l2": q.batch_l2(),
        "sum_grad_squared": q.sum_grad_squared(),
        "variance": q.variance(),
        "batch_grad": q.batch_grad(),
        "diag_ggn": q.diag_ggn(),
        "diag_ggn_mc(1)": q.diag_ggn_mc(1),
        "kfac(1)": q.kfac(1),
        "kflr": q.kflr(),
    }
    if args.model == "wide":
        del quantities["batch_grad"]  # N copies of the gradient: 1.9 GB
    targets = {
        "batch_l2": 1.2,
        "sum_grad_squared": 1.2,
        "variance": 1.2,
        "diag_ggn_mc(1)": 2.0,
        "kfac(1)": 2.0,
        "diag_ggn": classes + 1.0,
    }
    jax_fns, per_example = jax_way(model, loss, batch, chunk)

    fns: dict[str, tuple] = {"fbp.grad": (fbp.grad(model, loss), (params, x, y))}
    for name, quantity in quantities.items():
        f = q.value_grad_and(model, loss, quantity)
        fns[f"fbp {name}"] = (lambda p, x, y, k, f=f: f(p, x, y, key=k), (params, x, y, key))
        if name in jax_fns:
            fn = jax_fns[name]
            extra = (key,) if name == "diag_ggn_mc(1)" else ()
            fns[f"jax {name}"] = (fn, (params, x, y, *extra))

    # DP-SGD: a whole step each (noise and an SGD update included).
    sgd = optax.sgd(0.1)
    opt_state = sgd.init(params)
    clip, sigma = 1.0, 1.0
    plain_grad = fbp.grad(model, loss)
    one_pass = q.value_grad_and(model, loss, q.clipped_grad(clip))
    two_pass = _two_pass_clipped(model, loss, clip)

    def noised(grads, k):
        return jax.tree.map(
            jnp.add, grads, diagnostics.gaussian_noise(k, grads, sigma * clip / batch)
        )

    def apply(grads, state, p):
        updates, state = sgd.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    def step_plain(p, state, x, y, k):
        return apply(plain_grad(p, x, y), state, p)

    def step_one_pass(p, state, x, y, k):
        (clipped,) = one_pass(p, x, y)[2]
        return apply(noised(clipped.grads, k), state, p)

    def step_two_pass(p, state, x, y, k):
        return apply(noised(two_pass(p, x, y), k), state, p)

    def step_jax(p, state, x, y, k):
        g = per_example(p, x, y)
        norms = jnp.sqrt(
            sum(jnp.sum(jnp.square(a.reshape(batch, -1)), 1) for a in jax.tree.leaves(g))
        )
        c = jnp.minimum(1.0, clip / norms)
        mean = jax.tree.map(lambda a: jnp.tensordot(c, a, axes=1) / batch, g)
        return apply(noised(mean, k), state, p)

    # The noise: diagnostics.gaussian_noise, jax.random.normal's values for JAX's
    # default threefry key, drawn by diagnostics.standard_normal (Threefry written
    # out round by round; JAX's CPU lowering loops over the rounds). Measured on the
    # 2-core CPU (wide MLP, 1.8 M normals): 4.5 ms, ~0.6× a gradient (JAX's own
    # draw 9 ms; its "rbg" generator about three times slower still).
    noise_key = jax.random.key(4)
    step_args = (params, opt_state, x, y, noise_key)
    fns["clipped gradient: one pass (fbp.quantities)"] = (
        lambda p, x, y: one_pass(p, x, y)[2][0].grads,
        (params, x, y),
    )
    fns["clipped gradient: two passes (diagnostics)"] = (two_pass, (params, x, y))
    fns["step: non-private"] = (step_plain, step_args)
    fns["step: DP-SGD one pass (fbp.quantities)"] = (step_one_pass, step_args)
    fns["step: DP-SGD two passes (diagnostics)"] = (step_two_pass, step_args)
    fns["step: DP-SGD vmap(jax.grad)"] = (step_jax, step_args)

    # Hessian-vector products.
    v = params
    fns["fbp hvp (jvp of fbp.grad)"] = (q.hessian_vector_product(model, loss), (params, x, y, v))

    def jax_hvp(p, x, y, v):
        return jax.jvp(jax.grad(lambda p: loss.value(model.apply(p, x), y)), (p,), (v,))[1]

    fns["jax hvp (jvp of jax.grad)"] = (jax_hvp, (params, x, y, v))

    if args.fbp_only:
        fns = {n: f for n, f in fns.items() if not n.startswith("jax ") and "vmap" not in n}
        jax_fns = {}
    compiled, compile_s, flops = {}, {}, {}
    for name, (fn, fargs) in fns.items():
        compile_s[name], compiled[name] = compile_seconds(jax.jit(fn), *fargs)
        flops[name] = arithmetic(compiled[name])
        print(f"compiled {name} in {compile_s[name]:.1f}s", file=sys.stderr, flush=True)

    # fbp's results against the JAX way's (max relative error over leaves).
    errors = {}
    for name in quantities:
        if name in jax_fns and name != "diag_ggn_mc(1)":
            got = compiled[f"fbp {name}"](params, x, y, key)[2][0]
            want = compiled[f"jax {name}"](params, x, y)
            rel = jax.tree.map(
                lambda a, b: float(
                    np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                    / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30)
                ),
                got,
                want,
            )
            errors[name] = max(jax.tree.leaves(rel))

    runners = {name: (lambda c=c, a=fns[name][1]: c(*a)) for name, c in compiled.items()}
    # Two interleaved groups, each with its own fbp.grad baseline: fbp's programs
    # (milliseconds, many repeats) and the JAX way's (up to seconds each, few
    # repeats), so the slow ones do not thin out the fast ones' samples.
    repeats = 10 if args.quick else 40
    fast = {n: r for n, r in runners.items() if not n.startswith("jax ") and "vmap" not in n}
    slow = {n: r for n, r in runners.items() if n not in fast or n == "fbp.grad"}
    medians = interleaved_medians(fast, repeats, warmup=2, block=5)
    if len(slow) > 1:
        slow_medians = interleaved_medians(slow, max(2, repeats // 5), warmup=1, block=2)
        scale = medians["fbp.grad"] / slow_medians["fbp.grad"]  # the same baseline in both
        for name, t in slow_medians.items():
            if name != "fbp.grad":
                medians[name] = t * scale
    base = medians["fbp.grad"]
    step_base = medians["step: non-private"]

    def arith(name: str, baseline: str) -> str:
        if flops.get(name) is None or not flops.get(baseline):
            return "—"
        return f"{flops[name] / flops[baseline]:.2f}×"

    rows = []
    for name in quantities:
        t = medians[f"fbp {name}"]
        jax_t = medians.get(f"jax {name}")
        rows.append(
            {
                "quantity": name,
                "fbp ms": f"{1e3 * t:.2f}",
                "× fbp.grad": f"{t / base:.2f}",
                "flops ÷ grad's": arith(f"fbp {name}", "fbp.grad"),
                "target": f"≤ {targets[name]:g}×" if name in targets else "",
                "JAX way ms": f"{1e3 * jax_t:.2f}" if jax_t else "—",
                "JAX way / fbp": f"{jax_t / t:.1f}" if jax_t else "—",
                "max rel. diff": f"{errors[name]:.0e}" if name in errors else "",
            }
        )
    for name in [n for n in medians if n.startswith("clipped gradient:")]:
        t = medians[name]
        rows.append(
            {
                "quantity": name,
                "fbp ms": f"{1e3 * t:.2f}",
                "× fbp.grad": f"{t / base:.2f}",
                "flops ÷ grad's": arith(name, "fbp.grad"),
            }
        )
    for name in [n for n in medians if n.startswith("step:")]:
        t = medians[name]
        rows.append(
            {
                "quantity": name,
                "fbp ms": f"{1e3 * t:.2f}",
                "× fbp.grad": f"{t / base:.2f}",
                "target": "≤ 1.15× non-private" if "one pass" in name else "",
                "JAX way ms": "",
                "JAX way / fbp": f"{t / step_base:.2f}× non-private",
            }
        )
    t, jax_t = medians["fbp hvp (jvp of fbp.grad)"], medians.get("jax hvp (jvp of jax.grad)")
    rows.append(
        {
            "quantity": "hessian_vector_product",
            "fbp ms": f"{1e3 * t:.2f}",
            "× fbp.grad": f"{t / base:.2f}",
            "JAX way ms": f"{1e3 * jax_t:.2f}" if jax_t else "—",
            "JAX way / fbp": f"{jax_t / t:.1f}" if jax_t else "—",
        }
    )
    columns = [
        "quantity",
        "fbp ms",
        "× fbp.grad",
        "flops ÷ grad's",
        "target",
        "JAX way ms",
        "JAX way / fbp",
        "max rel. diff",
    ]
    print(f"{MODELS[args.model]}, batch {batch}, softmax cross-entropy, {jax.default_backend()}")
    print(f"fbp.grad: {1e3 * base:.2f} ms; non-private step {1e3 * step_base:.2f} ms")
    print(table(rows, columns))
    path = write_json(
        f"quantities_{args.model}{'_fbp_only' if args.fbp_only else ''}.json",
        {
            "network": MODELS[args.model],
            "batch": batch,
            "loss": "softmax_cross_entropy",
            "repeats": repeats,
            "median_seconds": medians,
            "compile_seconds": compile_s,
            "xla_flops": flops,
            "ratios_to_grad": {n: t / base for n, t in medians.items()},
            "max_relative_difference_vs_jax": errors,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
