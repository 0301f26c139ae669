"""Data-parallel steps on 4 forced CPU devices equal the single-device step.

JAX fixes its device count when it starts, so the checks run in a fresh Python
process with ``--xla_force_host_platform_device_count=4``. The fast test's
process also compares a sharded ``fit`` (two more training programs) when the
slow test that reads it is selected; a worker of pytest-xdist that runs the
slow test alone starts a process for the fit only. The fast checks are one
test, so no two workers each start a process for them.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

_RESULTS: dict[str, float] = {}
"""What this process's runs of the script printed, by check name."""


def _run(*parts: str) -> dict[str, float]:
    """``tests/sharded_script.py`` for ``parts`` (``--steps``, ``--fit``): its checks."""
    script = Path(__file__).with_name("sharded_script.py")
    done = subprocess.run(
        [sys.executable, str(script), *parts],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _RESULTS.update(
        (name, float(value)) for name, value in map(str.split, done.stdout.splitlines())
    )
    return _RESULTS


def test_sharded_steps_equal_single_device_live_on_every_device_and_refuse_odd_batches(request):
    """make_step and make_multi_step on the mesh: the params after three steps, the losses and
    the multi-step's params equal the single-device step's; the params are replicated on all
    4 devices; the step all-reduces gradients and gathers no batch; a batch that does not split over them is a clear error."""
    fit_wanted = any(
        item.module is request.module and item.get_closest_marker("slow")
        for item in request.session.items
    )
    results = _run("--steps", *(["--fit"] if fit_wanted else []))
    for check in ("step_params", "step_loss", "multi_params"):
        assert results[check] < 1e-6, (check, results)
    assert results["step_sharding"] == 1, results
    assert results["step_all_gathers"] == 0 and results["step_all_reduces"] == 1, results
    assert results["indivisible_error"] == 1, results


@pytest.mark.slow  # two more training programs; the fast loop compares the sharded steps
def test_sharded_fit_equals_single_device_fit():
    results = _RESULTS if "fit_params" in _RESULTS else _run("--fit")
    assert results["fit_params"] < 1e-6
