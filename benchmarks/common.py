"""Shared timing helpers for fbp's benchmarks (scripts, not tests).

Machines are noisy, so every benchmark interleaves the contenders in one
process, warms up first, and reports medians and ratios measured in the same
run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """A short description of where the numbers came from."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def block_on(tree):
    """Wait for every array in ``tree``."""
    return jax.block_until_ready(tree)


def interleaved_medians(
    runners: dict[str, Callable[[], object]], repeats: int, warmup: int = 3, block: int = 10
) -> dict[str, float]:
    """Median seconds per call of each runner over ``repeats`` calls each.

    The runners take turns, ``block`` consecutive calls per turn: alternating
    cancels slow drifts of a noisy machine, and a block of calls of one
    program at a time keeps another program's thread pool and caches from
    inflating single-call timings (measured here: up to 2× on 2 cores).
    """
    for run in runners.values():
        for _ in range(warmup):
            block_on(run())
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(max(1, -(-repeats // block))):
        for name, run in runners.items():
            for _ in range(block):
                start = time.perf_counter()
                block_on(run())
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def compile_seconds(fn, *args) -> tuple[float, object]:
    """Time ``jax.jit`` lowering + compilation of ``fn`` on ``args``; return the compiled."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return time.perf_counter() - start, compiled


def peak_bytes(compiled) -> int | None:
    """XLA's estimate of the compiled program's memory: arguments, outputs and temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def write_json(name: str, payload: dict) -> Path:
    """Write ``payload`` and the machine description to ``results/name``, atomically."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    os.replace(tmp, path)
    return path


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


WIDE = (784, 1024, 1024, 10)
"""The wide ReLU MLP the issues measure per-example norms and rules on."""


def wide_mlp_problem(batch: int = 256):
    """``(model, params, x, labels)``: the 784-1024-1024-10 ReLU net and one random batch."""
    from fbp import nn

    model = nn.serial(nn.dense(WIDE[1]), nn.relu(), nn.dense(WIDE[2]), nn.relu(), nn.dense(WIDE[3]))
    params, _ = model.init(jax.random.key(0), (WIDE[0],))
    x = jax.random.normal(jax.random.key(1), (batch, WIDE[0]))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, WIDE[-1])
    return model, params, x, y
