"""Credit-assignment rules: the cost of a feedback-alignment update against backprop's gradient.

All jitted and timed interleaved in one process after warm-up (medians), with
softmax cross-entropy, on one of two networks (``--model``):

- ``wide`` (default): a 784-1024-1024-10 ReLU network at batch 256;
- ``cnn``: the MNIST-1D CNN (:func:`fbp.models.mnist1d_cnn`: 3 × conv1d, 25
  channels, and a dense head) at batch 100, as it is trained — every
  convolution sends its error back through the transposed convolution of its
  feedback kernel.

Contenders:

- ``backprop``: ``fbp.grad(model, loss)`` — the baseline every ratio divides by;
- ``feedback_alignment`` / ``direct_feedback_alignment``: the rules as built,
  drawing their fixed random matrices inside the step from the key;
- ``... (precomputed)``: the same rules after ``rule.precomputed(model,
  input_shape)``, which draws the matrices once (identical updates);
- ``sign_symmetric`` (``--model cnn``): the error through ``sign(W)·mean|W|``.

Run:  python benchmarks/bench_rules.py [--quick] [--model cnn]
Writes benchmarks/results/rules.json (``--model cnn``: rules_cnn.json) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from common import WIDE, interleaved_medians, table, wide_mlp_problem, write_json

import fbp
from fbp import losses, models, rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument(
        "--model",
        choices=("wide", "cnn"),
        default="wide",
        help="wide: 784-1024-1024-10 ReLU at batch 256 (default); cnn: the MNIST-1D CNN at "
        "batch 100",
    )
    args = parser.parse_args()

    loss = losses.softmax_cross_entropy
    if args.model == "cnn":
        batch, input_shape, results = 100, (40,), "rules_cnn.json"
        network = "MNIST-1D CNN (3×conv1d 25 ch, dense 125→10)"
        model = models.mnist1d_cnn()
        params, _ = model.init(jax.random.key(0), input_shape)
        x = jax.random.normal(jax.random.key(1), (batch, *input_shape))
        y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    else:
        batch, input_shape, results = 256, (WIDE[0],), "rules.json"
        network = WIDE
        model, params, x, y = wide_mlp_problem(batch)
    fa = rules.feedback_alignment(jax.random.key(3))
    dfa = rules.direct_feedback_alignment(jax.random.key(4))
    contenders = {
        "backprop": None,
        "feedback_alignment": fa,
        "feedback_alignment (precomputed)": fa.precomputed(model, input_shape),
        "direct_feedback_alignment": dfa,
        "direct_feedback_alignment (precomputed)": dfa.precomputed(model, input_shape),
    }
    if args.model == "cnn":
        contenders["sign_symmetric"] = rules.sign_symmetric()
    fns = {name: jax.jit(fbp.grad(model, loss, rule=rule)) for name, rule in contenders.items()}
    runners = {name: (lambda f=f: f(params, x, y)) for name, f in fns.items()}
    repeats = 400 if args.model == "cnn" else 60  # a CNN gradient takes well under 1 ms
    medians = interleaved_medians(runners, 5 if args.quick else repeats, block=5)
    rows = [
        {
            "update": name,
            "ms": round(medians[name] * 1e3, 2 if medians[name] > 1e-3 else 3),
            "vs_backprop": round(medians[name] / medians["backprop"], 2),
        }
        for name in contenders
    ]
    print(table(rows, ["update", "ms", "vs_backprop"]))
    if not args.quick:
        path = write_json(results, {"network": network, "batch": batch, "rows": rows})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
