"""Shared test configuration.

Every test runs with ``jax_numpy_rank_promotion="raise"``: an implicit
broadcast in a forward pass is a hidden sum in its backward, so fbp writes
every broadcast explicitly and the suite holds it to that.
"""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")

# JAX compile time dominates on small CI machines: hypothesis gets no deadline
# (first examples compile) and a modest number of examples per test.
settings.register_profile(
    "fbp",
    deadline=None,
    max_examples=int(os.environ.get("FBP_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("fbp")


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test (scoped, never global)."""
    with jax.enable_x64(True):
        yield


# ---------------------------------------------------------------------------
# Where the time goes: FBP_COMPILE_REPORT=DIR writes, per xdist worker, one
# JSON line per test with its wall time, its number of XLA compilations and the
# seconds spent tracing, lowering and compiling (jax.monitoring's events).
# `python tests/compile_report.py DIR` sums them per file. Off by default.
_REPORT_DIR = os.environ.get("FBP_COMPILE_REPORT")
if _REPORT_DIR:
    import json
    import time

    _current = {"compiles": 0, "compile_s": 0.0, "trace_s": 0.0, "lower_s": 0.0}
    _EVENTS = {
        "/jax/core/compile/backend_compile_duration": "compile_s",
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    }

    _programs = []  # (seconds, name) of each compilation in the current test

    def _listen(event, duration, fun_name=None, **_):
        field = _EVENTS.get(event)
        if field:
            _current[field] += duration
            if field == "compile_s":
                _current["compiles"] += 1
                _programs.append((round(duration, 3), fun_name))

    jax.monitoring.register_event_duration_secs_listener(_listen)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        for k in _current:
            _current[k] = 0 if k == "compiles" else 0.0
        _programs.clear()
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            row = {"test": item.nodeid, "wall_s": time.perf_counter() - start, **_current}
            row["slowest_programs"] = sorted(_programs, reverse=True)[:5]
            os.makedirs(_REPORT_DIR, exist_ok=True)
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            with open(os.path.join(_REPORT_DIR, f"{worker}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
