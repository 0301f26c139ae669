"""Time fbp's jitted training step against a jax.grad-based step.

For each configuration both steps use the same model forward (``model.apply``),
the same loss and the same optax SGD update; the only difference is where the
gradient comes from: fbp's hand-derived backward, or ``jax.value_and_grad``.
They run interleaved in one process after warm-up; we report medians, the
fbp/jax ratio (< 1 means fbp is faster), examples per second, achieved GFLOP/s
and its fraction of the throughput ``jnp.dot`` reaches in the same run on the
same matmul shapes, compile times and XLA's peak-memory estimate. A second
table compares one dispatch per step with ``lax.scan`` over many steps.

Run:  python benchmarks/bench_step.py [--quick]
Writes benchmarks/results/step.json and prints markdown tables for README.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from common import block_on, compile_seconds, interleaved_medians, peak_bytes, table, write_json

from fbp import data, losses, nn, train
from fbp.models import mnist1d_cnn, mnist1d_gru


def mlp(widths, activation):
    layers = []
    for width in widths[1:-1]:
        layers += [nn.dense(width), activation()]
    layers.append(nn.dense(widths[-1]))
    return nn.serial(*layers)


class Config(NamedTuple):
    name: str
    model: Callable[[], nn.Layer]
    input_shape: tuple[int, ...]
    batch: int
    loss: Any
    classes: int
    widths: tuple[int, ...] | None = None  # dense nets: the matmul shapes for the dot reference


CE = losses.softmax_cross_entropy
CONFIGS = [
    Config(
        "784-30-10 sigmoid, batch 10, squared error",
        lambda: mlp((784, 30, 10), nn.sigmoid),
        (784,),
        10,
        losses.mse,
        10,
        (784, 30, 10),
    ),
    Config(
        "784-100-10 sigmoid, batch 32, cross-entropy",
        lambda: mlp((784, 100, 10), nn.sigmoid),
        (784,),
        32,
        CE,
        10,
        (784, 100, 10),
    ),
    Config(
        "784-1024-1024-10 ReLU, batch 256, cross-entropy",
        lambda: mlp((784, 1024, 1024, 10), nn.relu),
        (784,),
        256,
        CE,
        10,
        (784, 1024, 1024, 10),
    ),
    # The MNIST-1D paper's models (fbp.models.mnist1d_cnn / mnist1d_gru), batch 100 as there.
    Config("mnist1d CNN (3×conv1d 25 ch), batch 100", lambda: mnist1d_cnn(10), (40,), 100, CE, 10),
    Config("mnist1d BiGRU (hidden 6), batch 100", lambda: mnist1d_gru(10), (40,), 100, CE, 10),
]


def targets(loss, key, batch, classes):
    if loss is losses.mse:
        return jax.random.normal(key, (batch, classes))
    return jax.random.randint(key, (batch,), 0, classes)


def jax_step(model, loss, optimizer):
    """The autodiff baseline: jax.value_and_grad of the same forward, same update."""

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(lambda p: loss.value(model.apply(p, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def dense_flops(widths, batch):
    """Multiply-adds ×2 of a dense step: forward, dW, and dx for all but the first layer."""
    pairs = list(itertools.pairwise(widths))
    forward = sum(2 * batch * i * o for i, o in pairs)
    dw = forward
    dx = sum(2 * batch * i * o for i, o in pairs[1:])
    return forward + dw + dx


def dot_runner(widths, batch):
    """A jitted function doing exactly the step's matmuls, on the same shapes."""
    keys = iter(jax.random.split(jax.random.key(7), 3 * len(widths)))
    pairs = list(itertools.pairwise(widths))
    xs = [jax.random.normal(next(keys), (batch, i)) for i, _ in pairs]
    ws = [jax.random.normal(next(keys), (i, o)) for i, o in pairs]
    dys = [jax.random.normal(next(keys), (batch, o)) for _, o in pairs]

    @jax.jit
    def products(xs, ws, dys):
        out = []
        for k, (x, w, dy) in enumerate(zip(xs, ws, dys, strict=True)):
            out.append(x @ w)
            out.append(x.T @ dy)
            if k > 0:
                out.append(dy @ w.T)
        return out

    return lambda: products(xs, ws, dys)


def xla_flops(compiled) -> float | None:
    """XLA's own count of the floating-point operations of a compiled step."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def repeats_for(run: Callable[[], object], seconds: float, quick: bool) -> int:
    """How many calls of ``run`` fill about ``seconds`` per contender (5 when ``quick``)."""
    if quick:
        return 5
    block_on(run())
    start = time.perf_counter()
    for _ in range(10):
        block_on(run())
    per_call = (time.perf_counter() - start) / 10
    return int(min(5000, max(50, seconds / per_call)))


def entry_ops(compiled) -> list[tuple[str, str]]:
    """The ``(op, result shape)`` sequence of a compiled program's entry computation.

    Two steps with the same sequence run the same kernels on the same shapes,
    so any difference in their timings is measurement noise.
    """
    text = compiled.as_text()
    entry = text[text.index("ENTRY") :].split("\n}", 1)[0]
    found = re.findall(r"^\s*\S+ = (\S+) ([\w-]+)\(", entry, re.M)
    return [(shape, op) for shape, op in found if op != "parameter"]


def bench_config(config: Config, seconds: float, quick: bool = False) -> dict:
    model = config.model()
    loss, batch = config.loss, config.batch
    optimizer = optax.sgd(1e-3)
    key_p, key_x, key_y = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (batch, *config.input_shape))
    y = targets(loss, key_y, batch, config.classes)
    steps = {
        "fbp": train.make_step(model, loss, optimizer),
        "jax": jax_step(model, loss, optimizer),
    }
    state, compile_s, memory, counted, ops = {}, {}, {}, {}, {}
    for label, step in steps.items():
        params, _ = model.init(key_p, config.input_shape)
        opt_state = optimizer.init(params)
        compile_s[label], compiled = compile_seconds(step, params, opt_state, x, y)
        memory[label] = peak_bytes(compiled)
        counted[label] = xla_flops(compiled)
        ops[label] = entry_ops(compiled)
        state[label] = [params, opt_state]

    def runner(label):
        def run():
            params, opt_state, value = steps[label](*state[label], x, y)
            state[label][:] = [params, opt_state]
            return value

        return run

    runners = {label: runner(label) for label in steps}
    if config.widths is not None:
        runners["dot"] = dot_runner(config.widths, batch)
    repeats = repeats_for(runners["fbp"], seconds, quick)
    medians = interleaved_medians(runners, repeats)
    # Dense nets: the step's own matmul count, and jnp.dot's speed on exactly those
    # shapes. Other models: XLA's flop count of the compiled fbp step, no dot reference.
    flops = dense_flops(config.widths, batch) if config.widths else counted["fbp"]
    row = {
        "config": config.name,
        "repeats": repeats,
        "same_program": ops["fbp"] == ops["jax"],
        "ops": f"{len(ops['fbp'])} / {len(ops['jax'])}",
        "fbp_us": round(medians["fbp"] * 1e6, 1),
        "jax_us": round(medians["jax"] * 1e6, 1),
        "ratio": round(medians["fbp"] / medians["jax"], 3),
        "fbp_examples_per_s": round(batch / medians["fbp"]),
        "fbp_gflops": None,
        "jax_gflops": None,
        "dot_gflops": None,
        "fbp_of_dot": None,
        "jax_of_dot": None,
        "fbp_compile_s": round(compile_s["fbp"], 3),
        "jax_compile_s": round(compile_s["jax"], 3),
        "fbp_peak_mb": None if memory["fbp"] is None else round(memory["fbp"] / 2**20, 2),
        "jax_peak_mb": None if memory["jax"] is None else round(memory["jax"] / 2**20, 2),
    }
    if flops:
        row["fbp_gflops"] = round(flops / medians["fbp"] / 1e9, 2)
        row["jax_gflops"] = round(flops / medians["jax"] / 1e9, 2)
    if "dot" in medians:
        dot_gflops = flops / medians["dot"] / 1e9
        row["dot_gflops"] = round(dot_gflops, 1)
        row["fbp_of_dot"] = round(row["fbp_gflops"] / dot_gflops, 3)
        row["jax_of_dot"] = round(row["jax_gflops"] / dot_gflops, 3)
    return row


def bench_dispatch(repeats, steps=100, batch=32, widths=(784, 100, 10)):
    """An epoch of ``steps`` minibatches three ways, each in its own block of calls.

    ``python_loop``: what a user writes by hand -- ``fbp.data.batches`` (host
    shuffling and slicing) and one jitted ``make_step`` call per minibatch.
    ``dispatch_loop``: one jitted call per minibatch on batches already on the
    device (the dispatch cost alone). ``fit_epoch``: what ``fit`` does -- one
    jitted call per epoch that shuffles on the device and runs the steps in a
    ``lax.scan``, each step gathering its own rows.
    """
    model = mlp(widths, nn.sigmoid)
    loss = losses.softmax_cross_entropy
    optimizer = optax.sgd(1e-3)
    n = steps * batch
    x_host = np.asarray(jax.random.normal(jax.random.key(1), (n, widths[0])))
    y_host = np.asarray(jax.random.randint(jax.random.key(2), (n,), 0, widths[-1]))
    x_dev, y_dev = jnp.asarray(x_host), jnp.asarray(y_host)
    xs, ys = x_dev.reshape(steps, batch, -1), y_dev.reshape(steps, batch)
    device_batches = [(xs[i], ys[i]) for i in range(steps)]
    step = train.make_step(model, loss, optimizer)
    epoch = train._make_epoch(model, loss, optimizer, None, 0.9, steps=steps, batch_size=batch)
    params, _ = model.init(jax.random.key(0), (widths[0],))
    state = [params, optimizer.init(params)]

    def python_loop(key):
        params, opt_state = state
        for x, y in data.batches(x_host, y_host, batch, key=key):
            params, opt_state, value = step(params, opt_state, x, y)
        state[:] = [params, opt_state]
        return value

    def dispatch_loop(key):
        params, opt_state = state
        for x, y in device_batches:
            params, opt_state, value = step(params, opt_state, x, y)
        state[:] = [params, opt_state]
        return value

    def fit_epoch(key):
        params, opt_state, values = epoch(*state, x_dev, y_dev, key, key)
        state[:] = [params, opt_state]
        return values

    keys = iter(jax.random.split(jax.random.key(9), 4 * repeats + 100))
    runners = {
        "python_loop": lambda: python_loop(next(keys)),
        "dispatch_loop": lambda: dispatch_loop(next(keys)),
        "fit_epoch": lambda: fit_epoch(next(keys)),
    }
    medians = interleaved_medians(runners, repeats, block=3)
    return {
        "config": f"{'-'.join(map(str, widths))} sigmoid, batch {batch}, epoch of {steps} steps",
        "python_loop_ms": round(medians["python_loop"] * 1e3, 2),
        "dispatch_loop_ms": round(medians["dispatch_loop"] * 1e3, 2),
        "fit_epoch_ms": round(medians["fit_epoch"] * 1e3, 2),
        "speedup_vs_python_loop": round(medians["python_loop"] / medians["fit_epoch"], 2),
        "speedup_vs_dispatch_loop": round(medians["dispatch_loop"] / medians["fit_epoch"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="time per contender and config (default 3)"
    )
    parser.add_argument("--only", default="", help="run only the configs whose name has this")
    args = parser.parse_args()
    rows = []
    for config in CONFIGS:
        if args.only and args.only not in config.name:
            continue
        rows.append(bench_config(config, args.seconds, args.quick))
        print(rows[-1], flush=True)
    dispatch = bench_dispatch(repeats=3 if args.quick else 30)
    # Partial or smoke runs print their tables but leave the recorded results alone.
    path = (
        None
        if args.quick or args.only
        else write_json("step.json", {"steps": rows, "dispatch": dispatch})
    )
    print()
    print(
        table(
            rows,
            [
                "config",
                "fbp_us",
                "jax_us",
                "ratio",
                "same_program",
                "ops",
                "fbp_examples_per_s",
                "fbp_gflops",
                "dot_gflops",
                "fbp_of_dot",
                "jax_of_dot",
                "fbp_compile_s",
                "jax_compile_s",
                "fbp_peak_mb",
                "jax_peak_mb",
            ],
        )
    )
    print()
    print(table([dispatch], list(dispatch)))
    print(f"\nwrote {path}" if path else "\n(--quick/--only: results not recorded)")


if __name__ == "__main__":
    main()
