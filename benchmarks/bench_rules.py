"""Credit-assignment rules: the cost of a feedback-alignment update against backprop's gradient.

On a 784-1024-1024-10 ReLU network at batch 256 (softmax cross-entropy), all
jitted and timed interleaved in one process after warm-up (medians):

- ``backprop``: ``fbp.grad(model, loss)`` — the baseline every ratio divides by;
- ``feedback_alignment`` / ``direct_feedback_alignment``: the rules as built,
  drawing their fixed random matrices inside the step from the key;
- ``... (precomputed)``: the same rules after ``rule.precomputed(model,
  input_shape)``, which draws the matrices once (identical updates).

Run:  python benchmarks/bench_rules.py [--quick]
Writes benchmarks/results/rules.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from common import WIDE, interleaved_medians, table, wide_mlp_problem, write_json

import fbp
from fbp import losses, rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args()

    widths, batch = WIDE, 256
    loss = losses.softmax_cross_entropy
    model, params, x, y = wide_mlp_problem(batch)
    fa = rules.feedback_alignment(jax.random.key(3))
    dfa = rules.direct_feedback_alignment(jax.random.key(4))
    contenders = {
        "backprop": None,
        "feedback_alignment": fa,
        "feedback_alignment (precomputed)": fa.precomputed(model, (widths[0],)),
        "direct_feedback_alignment": dfa,
        "direct_feedback_alignment (precomputed)": dfa.precomputed(model, (widths[0],)),
    }
    fns = {name: jax.jit(fbp.grad(model, loss, rule=rule)) for name, rule in contenders.items()}
    runners = {name: (lambda f=f: f(params, x, y)) for name, f in fns.items()}
    medians = interleaved_medians(runners, 5 if args.quick else 60, block=5)
    rows = [
        {
            "update": name,
            "ms": round(medians[name] * 1e3, 2),
            "vs_backprop": round(medians[name] / medians["backprop"], 2),
        }
        for name in contenders
    ]
    print(table(rows, ["update", "ms", "vs_backprop"]))
    if not args.quick:
        path = write_json("rules.json", {"network": widths, "batch": batch, "rows": rows})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
