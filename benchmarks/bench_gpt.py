"""Time a GPT training step: fbp's hand-derived backward against ``jax.value_and_grad``.

nanoGPT's CPU "baby GPT" (4 layers, 4 heads, width 128, context 64, batch 12,
tied head, no biases, AdamW with warm-up and cosine decay) on the vocabulary
of fbp's default corpus (Python's standard library source, 96 characters).
Three steps share the model's forward (``model.apply`` for autodiff), the
loss and the optimizer; only the gradient differs:

- ``fbp``: :func:`fbp.value_and_grad` (hand-derived backward, tied head's
  gradient summed by :func:`fbp.nn.tie`);
- ``fbp recompute``: the same with ``models.gpt(recompute=True)``, which keeps
  only the MLP's pre-activation and recomputes GELU in backward (llm.c's
  ``recompute``);
- ``jax``: ``jax.value_and_grad`` of the loss of ``model.apply``.

They run interleaved in one process after warm-up (benchmarks/common.py);
we report median step time, the ratio to jax (< 1: fbp is faster), tokens
per second, compile time and XLA's peak-memory estimate of the compiled step
(arguments + outputs + temporaries).

Run:  python benchmarks/bench_gpt.py [--quick]
Writes benchmarks/results/gpt.json and prints a markdown table for README.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).parent))
from common import compile_seconds, interleaved_medians, peak_bytes, table, write_json

import fbp
from fbp import losses, models, train

VOCAB, CONTEXT, BATCH, LAYERS, HEADS, WIDTH = 96, 64, 12, 4, 4, 128


def fbp_step(model, loss, optimizer):
    grad = fbp.value_and_grad(model, loss)

    def step(params, opt_state, x, y):
        value, grads = grad(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step)


def jax_step(model, loss, optimizer):
    def objective(params, x, y):
        return loss.value(model.apply(params, x, train=True), y)

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(objective)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step)


def main(quick: bool = False) -> dict:
    loss = losses.softmax_cross_entropy
    optimizer = train.gpt_optimizer(2000)
    plain = models.gpt(VOCAB, CONTEXT, LAYERS, HEADS, WIDTH)
    lean = models.gpt(VOCAB, CONTEXT, LAYERS, HEADS, WIDTH, recompute=True)
    ids = jax.random.randint(jax.random.key(1), (BATCH, CONTEXT + 1), 0, VOCAB)
    x, y = ids[:, :-1], ids[:, 1:]
    contenders = {
        "fbp": (plain, fbp_step(plain, loss, optimizer)),
        "fbp recompute": (lean, fbp_step(lean, loss, optimizer)),
        "jax.value_and_grad": (plain, jax_step(plain, loss, optimizer)),
    }
    rows, runners = {}, {}
    for name, (model, step) in contenders.items():
        params, _ = model.init(jax.random.key(0), (CONTEXT,))
        opt_state = optimizer.init(params)
        seconds, compiled = compile_seconds(step, params, opt_state, x, y)
        rows[name] = {
            "step": name,
            "compile_s": round(seconds, 2),
            "peak_MiB": round(peak_bytes(compiled) / 2**20, 2),
            "loss": float(compiled(params, opt_state, x, y)[2]),
        }
        runners[name] = lambda c=compiled, p=params, s=opt_state: c(p, s, x, y)
    medians = interleaved_medians(runners, repeats=10 if quick else 200, block=10)
    for name, row in rows.items():
        row["median_ms"] = round(1e3 * medians[name], 2)
        row["ratio_to_jax"] = round(medians[name] / medians["jax.value_and_grad"], 3)
        row["tokens_per_s"] = round(BATCH * CONTEXT / medians[name])
        row["iters_per_s"] = round(1 / medians[name], 1)
    # The three compute the same loss at the same initial params (recompute: other params).
    assert abs(rows["fbp"]["loss"] - rows["jax.value_and_grad"]["loss"]) < 1e-4, rows
    columns = ["step", "median_ms", "ratio_to_jax", "tokens_per_s", "compile_s", "peak_MiB"]
    print(table(list(rows.values()), columns))
    payload = {
        "config": {
            "vocab": VOCAB,
            "context": CONTEXT,
            "batch": BATCH,
            "layers": LAYERS,
            "heads": HEADS,
            "width": WIDTH,
            "tied": True,
            "optimizer": "AdamW, warm-up 100, cosine, clip 1.0",
        },
        "quick": quick,
        "rows": list(rows.values()),
    }
    path = write_json("gpt.json", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few repeats only")
    main(parser.parse_args().quick)
