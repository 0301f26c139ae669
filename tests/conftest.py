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


def pytest_configure(config):
    """The fast loop (``-m "not slow"``) compiles with XLA's backend optimisation off.

    Compiling, not running, dominates the fast loop: at level 0 LLVM skips its
    passes, and compile-bound tests used ~30% less CPU (test_per_example's
    float32 program 19.6 -> 13.9 CPU-s; eager ``jax.random`` draws at new
    shapes 4.7 -> 2.6). Long training runs (the slow tests) run slower
    unoptimised (the mnist1d GRU run 22 -> 53 CPU-s), so the whole suite keeps
    XLA's defaults. JAX reads ``XLA_FLAGS`` when its backend starts, after this
    hook; a flag already in ``XLA_FLAGS`` wins.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    markexpr = " ".join((config.getoption("markexpr", "") or "").split())
    if markexpr == "not slow" and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test (scoped, never global)."""
    with jax.enable_x64(True):
        yield
