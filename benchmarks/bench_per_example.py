"""Per-example gradient norms: fbp's (from x and δ) against ``jax.vmap(jax.grad)``.

On a 784-1024-1024-10 ReLU network at batch 256 (softmax cross-entropy), all
jitted and timed interleaved in one process after warm-up (medians):

- ``batched gradient``: ``fbp.grad`` — the baseline every ratio divides by;
- ``fbp per-example norms``: ``fbp.diagnostics.per_example_grad_norms``
  (``‖x_i‖²·‖δ_i‖²`` per dense layer, no per-example gradient materialised);
- ``fbp gradient + norms``: ``value_grad_and_norms``, both from one backward;
- ``fbp DP-SGD clipped gradient``: ``value_clipped_grad_and_norms`` (two backwards);
- ``vmap(jax.grad) norms``: per-example gradients by autodiff, then norms.

The norms are also checked against ``vmap(jax.grad)``'s (max relative error).

``--model`` picks the network (inputs random, labels of 10 classes):

- ``wide`` (default): the MLP above, on (batch, 784) → per_example.json;
- ``cnn``: the MNIST-1D CNN (``fbp.models.mnist1d_cnn``), on (batch, 40) →
  per_example_cnn.json;
- ``gru``: the MNIST-1D bidirectional GRU (``fbp.models.mnist1d_gru``: reshape to
  (40, 1), ``gru(6, bidirectional=True)``, flatten, dense 480 → 10), on
  (batch, 40) → per_example_gru.json. The per-example rule sums each
  example's steps from the deltas of the one reverse scan;
- ``attention``: a one-block transformer encoder on (batch, 32, 16) sequences,
  ``dense(64)``, ``residual(self_attention(4 heads, 64))``, ``layer_norm``,
  ``mean_over_time``, ``dense(10)`` → per_example_attention.json. The
  attention rule sums each example's positions for both projections.

Run:  python benchmarks/bench_per_example.py [--quick] [--model cnn|gru|attention]
Writes benchmarks/results/per_example*.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import compile_seconds, interleaved_medians, table, wide_mlp_problem, write_json

import fbp
from fbp import diagnostics, losses, nn
from fbp.models import mnist1d_cnn, mnist1d_gru


def mnist1d_problem(model: nn.Layer, batch: int):
    """``(model, params, x, labels)`` on random (batch, 40) MNIST-1D-shaped signals."""
    params, _ = model.init(jax.random.key(0), (40,))
    x = jax.random.normal(jax.random.key(1), (batch, 40))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return model, params, x, y


def attention_problem(batch: int, time: int = 32, n_in: int = 16, width: int = 64):
    """``(model, params, x, labels)``: one attention block over (batch, 32, 16) sequences."""
    model = nn.serial(
        nn.dense(width),
        nn.residual(nn.self_attention(4, width)),
        nn.layer_norm(),
        nn.mean_over_time(),
        nn.dense(10),
    )
    params, _ = model.init(jax.random.key(0), (time, n_in))
    x = jax.random.normal(jax.random.key(1), (batch, time, n_in))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return model, params, x, y


MODELS = {
    "wide": ("784-1024-1024-10 ReLU", "per_example.json"),
    "cnn": ("MNIST-1D CNN (3×conv1d 25 ch, dense 125→10)", "per_example_cnn.json"),
    "gru": ("MNIST-1D bidirectional GRU (2×gru 6, dense 480→10), T=40", "per_example_gru.json"),
    "attention": (
        "attention block (dense 16→64, residual self_attention 4×16, layer_norm, "
        "mean over T=32, dense 64→10)",
        "per_example_attention.json",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--model",
        choices=tuple(MODELS),
        default="wide",
        help="wide: 784-1024-1024-10 ReLU (default); cnn: the MNIST-1D CNN (conv layers); "
        "gru: the MNIST-1D bidirectional GRU; attention: one self-attention block",
    )
    args = parser.parse_args()

    batch = args.batch
    loss = losses.softmax_cross_entropy
    network, results = MODELS[args.model]
    if args.model == "cnn":
        model, params, x, y = mnist1d_problem(mnist1d_cnn(10), batch)
    elif args.model == "gru":
        model, params, x, y = mnist1d_problem(mnist1d_gru(10), batch)
    elif args.model == "attention":
        model, params, x, y = attention_problem(batch)
    else:
        model, params, x, y = wide_mlp_problem(batch)

    def vmap_norms(params, x, y):
        def one(p, xi, yi):
            return loss.value(model.apply(p, xi[None]), yi[None])

        per_example = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
        leaves = jax.tree.leaves(per_example)
        return jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(batch, -1)), axis=1) for g in leaves))

    contenders = {
        "batched gradient (fbp.grad)": fbp.grad(model, loss),
        "fbp per-example norms": diagnostics.per_example_grad_norms(model, loss),
        "fbp gradient + per-example norms": diagnostics.value_grad_and_norms(model, loss),
        "fbp DP-SGD clipped gradient": diagnostics.value_clipped_grad_and_norms(
            model, loss, l2_norm_clip=1.0
        ),
        "vmap(jax.grad) per-example norms": vmap_norms,
    }
    compiled, compile_s = {}, {}
    for name, fn in contenders.items():
        compile_s[name], compiled[name] = compile_seconds(jax.jit(fn), params, x, y)

    ours = np.asarray(compiled["fbp per-example norms"](params, x, y), np.float64)
    reference = np.asarray(compiled["vmap(jax.grad) per-example norms"](params, x, y), np.float64)
    max_rel_err = float(np.max(np.abs(ours - reference) / np.abs(reference)))

    runners = {name: (lambda c=c: c(params, x, y)) for name, c in compiled.items()}
    repeats = 10 if args.quick else 40
    medians = interleaved_medians(runners, repeats, warmup=2, block=5)
    base = medians["batched gradient (fbp.grad)"]
    rows = [
        {
            "method": name,
            "median ms": f"{1e3 * t:.2f}",
            "× batched gradient": f"{t / base:.2f}",
            "compile s": f"{compile_s[name]:.2f}",
        }
        for name, t in medians.items()
    ]
    vmap_t = medians["vmap(jax.grad) per-example norms"]
    norms_t = medians["fbp per-example norms"]
    summary = {
        "norms_over_batched_gradient": norms_t / base,
        "gradient_and_norms_over_batched_gradient": medians["fbp gradient + per-example norms"]
        / base,
        "vmap_over_batched_gradient": vmap_t / base,
        "vmap_over_fbp_norms": vmap_t / norms_t,
        "max_relative_error_vs_vmap": max_rel_err,
    }
    print(f"{network}, batch {batch}, softmax cross-entropy, {jax.default_backend()}")
    print(table(rows, ["method", "median ms", "× batched gradient", "compile s"]))
    print()
    print(
        f"fbp norms cost {summary['norms_over_batched_gradient']:.2f}× a batched gradient "
        f"(with the gradient: {summary['gradient_and_norms_over_batched_gradient']:.2f}×); "
        f"vmap(jax.grad) costs {summary['vmap_over_batched_gradient']:.1f}×, "
        f"{summary['vmap_over_fbp_norms']:.1f}× fbp's norms; "
        f"max relative difference of the norms {max_rel_err:.1e}"
    )
    path = write_json(
        results,
        {
            "network": network,
            "batch": batch,
            "loss": "softmax_cross_entropy",
            "repeats": repeats,
            "median_seconds": medians,
            "compile_seconds": compile_s,
            "summary": summary,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
