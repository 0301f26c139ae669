"""How close is close enough: the per-dtype tolerances of every check."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

__all__ = ["DEFAULT_TOLERANCES", "Tolerances", "narrowest_dtype", "tolerances_for"]


class Tolerances(NamedTuple):
    """How close is close enough (see :data:`DEFAULT_TOLERANCES` for the values).

    Attributes:
      exact_rtol: hand gradient vs ``jax.vjp``/``jax.grad`` of the same function,
        as the worst absolute error over a leaf relative to the largest
        magnitude of the reference leaf.
      fd_rtol: floor of the finite-difference tolerance, relative to the probe's
        scale (the larger of Σ|vᵢgᵢ| and the finite difference itself).
      noise_factor: a probe passes when its error is at most this many times
        its own measured noise (the disagreement of the h and 2h differences
        plus a round-off bound), or below the ``fd_rtol`` floor.
      steps: the two candidate finite-difference steps, relative to each
        leaf's RMS; per leaf, the one with the lower measured noise is used.
    """

    exact_rtol: float
    fd_rtol: float
    noise_factor: float = 100.0
    steps: tuple[float, float] = (1e-6, 1e-3)


DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    # Hand and reference are float64 evaluations of the same products in another
    # summation order: they agree to ~1e-13 of the leaf's scale even for sums of
    # 1e4 cancelling terms. 1e-9 keeps four orders of margin and still flags one
    # element off by a millionth of its leaf's scale. Central differences in
    # float64 with a measured noise floor resolve ~1e-6 of the probe's scale.
    "float64": Tolerances(exact_rtol=1e-9, fd_rtol=1e-6, steps=(1e-6, 1e-3)),
    # A rule that computes in float32 even when handed float64: eps = 1.2e-7,
    # and reordered sums of ~1e4 terms with cancellation lose up to ~1e-5 of the
    # leaf's scale. Steps around eps^(1/3).
    "float32": Tolerances(exact_rtol=1e-4, fd_rtol=1e-2, steps=(3e-3, 3e-2)),
    # eps = 9.8e-4 (float16), 7.8e-3 (bfloat16).
    "float16": Tolerances(exact_rtol=3e-2, fd_rtol=1e-1, steps=(3e-2, 1e-1)),
    "bfloat16": Tolerances(exact_rtol=1e-1, fd_rtol=2e-1, steps=(3e-2, 1e-1)),
}
"""Default :class:`Tolerances` per dtype, keyed by dtype name.

Checks run in float64, so the float64 row is the one that normally applies. A
leaf whose hand or reference gradient comes out in a narrower dtype (a rule or
function that computes in float32 even when handed float64) is judged by that
dtype's row, since no rule can be more accurate than its arithmetic.
"""


def tolerances_for(dtype: Any) -> Tolerances:
    """The default :class:`Tolerances` for arithmetic in ``dtype``.

    Args:
      dtype: a floating dtype (anything ``jnp.dtype`` accepts).

    Returns:
      The row of :data:`DEFAULT_TOLERANCES` for it (the float64 row for
      float64 and wider, the bfloat16 row for 8-bit floats).

    Example:
      >>> from fbp import verify
      >>> verify.tolerances_for("float32").exact_rtol
      0.0001
    """
    dtype = jnp.dtype(dtype)
    if dtype.name in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[dtype.name]
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits >= 64:
        return DEFAULT_TOLERANCES["float64"]
    return DEFAULT_TOLERANCES["bfloat16"]


def narrowest_dtype(*arrays: Any) -> Any:
    """The floating dtype of least precision among ``arrays`` (float64 if none)."""
    dtypes = [jnp.result_type(a) for a in arrays if a is not None]
    floats = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    if not floats:
        return jnp.dtype(jnp.float64)
    return max(floats, key=lambda d: float(jnp.finfo(d).eps))
