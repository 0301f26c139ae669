"""Time fbp's two convolution implementations on a mnist1d-sized CNN.

The model is the usual mnist1d CNN: input (batch 100, length 40, 1 channel),
three ``conv1d(25, 5, strides=2)`` layers with ReLU, flatten, ``dense(10)``.
Both variants compute the same numbers; they differ only in how:

- ``patches``: im2col by strided slices, one matmul; backward ``dW = Pᵀ·dy``,
  ``dx = col2im(dy·Wᵀ)`` (the default);
- ``xla``: ``lax.conv_general_dilated`` forward, backward as a transposed
  convolution and a correlation.

Reported: median seconds of the forward alone and of a full gradient
(``fbp.value_and_grad``, forward + backward) for each, interleaved in one
process after warm-up, the xla/patches ratio (> 1 means patches is faster),
and ``jax.value_and_grad`` of the patches forward as a peer.

Run:  python benchmarks/bench_conv.py [--quick]
Writes benchmarks/results/conv.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, table, write_json

import fbp
from fbp import losses, nn


def cnn(implementation: str) -> nn.Layer:
    conv = [nn.conv1d(25, 5, strides=2, implementation=implementation) for _ in range(3)]
    return nn.serial(
        conv[0], nn.relu(), conv[1], nn.relu(), conv[2], nn.relu(), nn.flatten(), nn.dense(10)
    )


def measure(batch: int, repeats: int) -> dict:
    """Median times of every variant at one batch size, and the ratios."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 40, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch))
    loss = losses.softmax_cross_entropy
    models = {impl: cnn(impl) for impl in ("patches", "xla")}
    params, _ = models["patches"].init(jax.random.key(0), (40, 1))

    runners, grads = {}, {}
    for impl, model in models.items():
        forward = jax.jit(model.apply)
        grad = jax.jit(fbp.value_and_grad(model, loss))
        grads[impl] = grad(params, x, labels)[1]
        runners[f"{impl} forward"] = lambda f=forward: f(params, x)
        runners[f"{impl} forward+backward"] = lambda g=grad: g(params, x, labels)
    model = models["patches"]
    autodiff = jax.jit(jax.value_and_grad(lambda p: loss.value(model.apply(p, x), labels)))
    runners["jax.grad of patches forward"] = lambda: autodiff(params)

    # The two implementations agree.
    worst = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for a, b in zip(
            jax.tree.leaves(grads["patches"]), jax.tree.leaves(grads["xla"]), strict=True
        )
    )
    times = interleaved_medians(runners, repeats)
    return {
        "median_seconds": times,
        "ratio_xla_over_patches": {
            "forward": times["xla forward"] / times["patches forward"],
            "forward+backward": times["xla forward+backward"] / times["patches forward+backward"],
        },
        "max_relative_difference": worst,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args(argv)
    repeats = 50 if args.quick else 300

    results = {}
    for batch in args.batch:
        result = results[f"batch {batch}"] = measure(batch, repeats)
        rows = [
            {"variant": name, "median µs": f"{1e6 * t:.1f}"}
            for name, t in result["median_seconds"].items()
        ]
        ratio = result["ratio_xla_over_patches"]
        print(f"\n### batch {batch}\n")
        print(table(rows, ["variant", "median µs"]))
        print(f"\nxla / patches, forward:          {ratio['forward']:.2f}×")
        print(
            f"xla / patches, forward+backward: {ratio['forward+backward']:.2f}×"
            "  (> 1: patches is faster)"
        )
        print(
            f"max relative difference of the two gradients: {result['max_relative_difference']:.1e}"
        )
    path = write_json(
        "conv.json",
        {
            "model": "conv1d(25, 5, strides=2)×3 with relu, flatten, dense(10); "
            "length 40, 1 channel, float32",
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
