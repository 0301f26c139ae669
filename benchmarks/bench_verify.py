"""Time ``fbp.verify.check_model`` against JAX's ``check_grads`` and full finite differences.

Three ReLU networks (about 1e3, 1e5 and 1.9e6 parameters; batch 32,
softmax cross-entropy) are checked three ways, each in float64:

- ``fbp.verify.check_model``: every layer exactly against ``jax.vjp`` of itself,
  the end-to-end gradient against ``jax.grad``, and finite differences along 4
  random directions plus 8 sampled coordinates per leaf. Timed cold (first call
  on a fresh model object in this process: tracing and XLA compilation
  included) and warm (the same check again, compiled program reused).
- ``jax.test_util.check_grads(f, (params,), order=1, modes=["rev"])`` on the
  loss with fbp's hand gradient bridged in through ``jax.custom_vjp`` — what a
  JAX user would reach for. It compares the VJP with a finite-difference JVP
  along random directions.
- Full per-coordinate central differences (2 loss evaluations per parameter,
  jitted, ``lax.map`` over coordinates). For models above 20,000 parameters
  the time is extrapolated linearly from a timed subset of coordinates — the
  table and JSON say so.

Each model is also checked with one planted bug: one element of the first
layer's weight gradient off by 1e-6 of that leaf's largest value. The table
says whether each method catches it (full finite differences are not run on
the buggy models).

Run:  python benchmarks/bench_verify.py [--quick]
Writes benchmarks/results/verify.json and prints a markdown table. The numbers
are wall-clock times on a shared machine: expect noise when others run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

sys.path.insert(0, str(Path(__file__).parent))
from common import table, write_json

import fbp
from fbp import losses, nn, verify

MODELS = [
    # name, widths
    ("20-32-16-10", (20, 32, 16, 10)),
    ("256-256-128-10", (256, 256, 128, 10)),
    ("784-1024-1024-10", (784, 1024, 1024, 10)),
]
BATCH = 32
FULL_FD_LIMIT = 20_000  # above this many parameters, full FD is extrapolated
FD_SUBSET = 2_000  # coordinates timed for the extrapolation


def mlp(widths: tuple[int, ...], single_element_bug: bool = False) -> nn.Layer:
    """A ReLU network; optionally its first layer's dW has one element off by 1e-6 of its scale."""
    he = jax.nn.initializers.he_normal()
    layers = []
    for i, width in enumerate(widths[1:-1]):
        layer = nn.dense(width, w_init=he)
        if i == 0 and single_element_bug:
            layer = plant_single_element_bug(layer)
        layers += [layer, nn.relu()]
    layers.append(nn.dense(widths[-1]))
    return nn.serial(*layers)


def plant_single_element_bug(layer: nn.Layer) -> nn.Layer:
    correct = layer.backward

    def backward(params, cache, dy):
        dparams, dx = correct(params, cache, dy)
        w = dparams["w"]
        return {**dparams, "w": w.at[3, 5].add(1e-6 * jnp.max(jnp.abs(w)))}, dx

    return layer._replace(backward=backward)


def data(widths, seed=0):
    model = mlp(widths)
    params, _ = model.init(jax.random.key(seed), (widths[0],))
    x = jax.random.normal(jax.random.key(seed + 1), (BATCH, widths[0]))
    y = jax.random.randint(jax.random.key(seed + 2), (BATCH,), 0, widths[-1])
    return params, x, y


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if not isinstance(out, verify.GradCheckReport):  # a report is host data already
        jax.block_until_ready(out)
    return time.perf_counter() - start, out


def fbp_check(widths, params, x, y):
    loss = losses.softmax_cross_entropy
    model = mlp(widths)
    cold, report = timed(lambda: verify.check_model(model, loss, params, x, y))
    warm, _ = timed(lambda: verify.check_model(model, loss, params, x, y))
    buggy = mlp(widths, single_element_bug=True)
    bug_cold, bug_report = timed(lambda: verify.check_model(buggy, loss, params, x, y))
    culprit = bug_report.culprit
    return {
        "fbp_cold_s": cold,
        "fbp_warm_s": warm,
        "fbp_ok_on_correct": report.ok,
        "fbp_directions": report.directions,
        "fbp_coordinates": report.coordinates,
        "fbp_kinks": report.kinks,
        "fbp_exact_elements": sum(r.probes for r in report.rows if r.method in ("vjp", "grad")),
        "fbp_bug_cold_s": bug_cold,
        "fbp_catches_bug": (not bug_report.ok)
        and culprit.path == (0,)
        and culprit.leaf == "w"
        and culprit.index == (3, 5),
        "fbp_bug_culprit": None
        if culprit is None
        else f"{culprit.layer} {culprit.leaf} {culprit.index}",
    }


def bridged_loss(model, loss, x, y):
    """The loss as a JAX function whose gradient is fbp's hand-derived one (custom_vjp)."""
    value_and_grad = fbp.value_and_grad(model, loss)

    @jax.custom_vjp
    def f(params):
        return loss.value(model.apply(params, x), y)

    def f_fwd(params):
        value, grads = value_and_grad(params, x, y)
        return value, grads

    def f_bwd(grads, g):
        return (jax.tree.map(lambda a: g * a, grads),)

    f.defvjp(f_fwd, f_bwd)
    return f


def jax_check(widths, params, x, y):
    out = {}
    for label, bug in (("", False), ("_bug", True)):
        model = mlp(widths, single_element_bug=bug)
        with jax.enable_x64(True):
            p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
            x64 = jnp.asarray(x, jnp.float64)
            f = bridged_loss(model, losses.softmax_cross_entropy, x64, y)
            start = time.perf_counter()
            try:
                check_grads(f, (p64,), order=1, modes=["rev"])
                caught = False
            except AssertionError:
                caught = True
            out[f"jax_check_grads{label}_s"] = time.perf_counter() - start
            out["jax_false_alarm" if not bug else "jax_catches_bug"] = caught
    return out


def full_fd(widths, params, x, y):
    """Central differences at every coordinate (or a timed subset, extrapolated)."""
    model = mlp(widths)
    loss = losses.softmax_cross_entropy
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        flat, unravel = ravel_pytree(p64)
        x64 = jnp.asarray(x, jnp.float64)
        n = flat.size
        h = 1e-6

        def f(theta):
            return loss.value(model.apply(unravel(theta), x64), y)

        batch = 16 if n <= FULL_FD_LIMIT * 10 else 1

        @jax.jit
        def grads_at(indices):
            def one(i):
                e = jnp.zeros_like(flat).at[i].set(h)
                return (f(flat + e) - f(flat - e)) / (2 * h)

            return jax.lax.map(one, indices, batch_size=batch)

        count = n if n <= FULL_FD_LIMIT else FD_SUBSET
        indices = jnp.arange(count, dtype=jnp.int32)
        compile_start = time.perf_counter()
        compiled = grads_at.lower(indices).compile()
        compile_s = time.perf_counter() - compile_start
        run_s, _ = timed(lambda: compiled(indices))
    return {
        "full_fd_s": compile_s + run_s * n / count,
        "full_fd_extrapolated": count < n,
        "full_fd_timed_coordinates": int(count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the two small models only")
    args = parser.parse_args()
    rows = []
    for name, widths in MODELS[:2] if args.quick else MODELS:
        params, x, y = data(widths)
        n = sum(a.size for a in jax.tree.leaves(params))
        row = {"model": name, "params": n, "batch": BATCH}
        row.update(fbp_check(widths, params, x, y))
        row.update(jax_check(widths, params, x, y))
        row.update(full_fd(widths, params, x, y))
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr)

    def fmt(row):
        fd = f"{row['full_fd_s']:.3g}" + (
            f" (extrapolated from {row['full_fd_timed_coordinates']} coordinates)"
            if row["full_fd_extrapolated"]
            else ""
        )
        return {
            "model": f"{row['model']} ({row['params']:,} params)",
            "fbp check_model cold / warm (s)": f"{row['fbp_cold_s']:.2f} / {row['fbp_warm_s']:.2f}",
            "fbp probes": f"{row['fbp_exact_elements']:,} exact, "
            f"{row['fbp_directions']} dirs + {row['fbp_coordinates']} coords",
            "fbp on single-element bug (s, caught)": f"{row['fbp_bug_cold_s']:.2f}, "
            f"{'yes' if row['fbp_catches_bug'] else 'NO'}",
            "jax check_grads (s): correct model / bug": f"{row['jax_check_grads_s']:.2f}: "
            + ("FAILS (false alarm)" if row["jax_false_alarm"] else "passes")
            + " / "
            + ("fails" if row["jax_catches_bug"] else "passes (bug missed)"),
            "full per-coordinate FD (s)": fd,
        }

    columns = list(fmt(rows[0]))
    print(table([fmt(r) for r in rows], columns))
    path = write_json(
        "verify.json",
        {
            "description": "fbp.verify.check_model vs jax.test_util.check_grads vs full "
            "per-coordinate central differences, float64, ReLU MLPs, batch 32, softmax "
            "cross-entropy; cold = first call on a fresh model (compile included). "
            "Shared 2-core machine: wall-clock numbers are noisy.",
            "rows": rows,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
