"""Prove hand-derived gradients right — and say exactly where one is wrong.

Every check runs in float64 (x64 is switched on only inside the check, with the
scoped ``with jax.enable_x64(True):``), whatever the model's dtype, and uses two
independent references:

1. **Exact, layer by layer** (method ``"vjp"``). Walking the model from the loss
   backwards, each layer's hand ``backward`` is compared with ``jax.vjp`` of
   *that same layer's* ``forward``, at the same cached input and the same
   incoming gradient ``dy``. Both sides compute the same products in float64
   and differ only by summation order, so the whole arrays are compared and
   even one wrong element among millions is caught. The first failing layer
   walking back from the loss is the culprit: the layers before it only
   inherit its wrong ``dx``, and are checked with that same ``dy`` on both
   sides, so they pass. The loss's own gradient (``"dpred"``) and the end-to-end
   gradient of :func:`fbp.value_and_grad` (method ``"grad"``, against
   ``jax.grad``) are compared the same way.
2. **Finite differences** (methods ``"fd-directions"`` and ``"fd-coordinates"``),
   which also validate the forward pass itself. Central differences of the
   scalar loss along a few random directions over all parameters at once
   (⟨g, v⟩ against (f(θ+hv) − f(θ−hv))/2h, as JAX's ``check_vjp`` does), plus a
   seeded sample of coordinates of every leaf. The cost grows with the number
   of probes, not of parameters. Each leaf's coordinates and its share of every
   direction are drawn from the leaf's path, so adding a parameter elsewhere
   changes no other leaf's probes.

**Self-calibrated tolerances.** Every probe evaluates f at ±h and ±2h for two
candidate steps (relative to the leaf's RMS). The disagreement of the h and 2h
differences measures the truncation noise of that very probe on that very
function, to which a float64 round-off bound is added; per leaf, the step
whose measured noise is lower is used, and the hand gradient must agree with
the finite difference within ``noise_factor`` times that measured noise (or a
small relative floor). The exact checks use fixed per-dtype tolerances, see
:data:`DEFAULT_TOLERANCES`.

**Kinks.** ReLU at 0, max-pool ties and any later layer's kink make a finite
difference meaningless when the probe straddles them. A probe is skipped (and
counted in the report's ``kinks`` column) when a boolean or integer residual
in the cache — ReLU's mask, a pool's argmax — changes between the probe's
points, or when its curvature at h and at 2h disagree as only a kink makes
them. An exact check that fails at a point where the layer's input sits on a
kink is redrawn once at a slightly moved input; only a failure that persists
counts.

**Structure.** Before any value, a hand gradient must have the right form:
``dparams`` the tree, shapes and dtypes of ``params``, ``dx`` the shape of the
layer's input. A backward that breaks this — a transposed weight gradient, a
missing leaf, a ``dx`` one column short — gives a failing ``"structure"`` row
naming its layer and leaf, never a broadcasting error from the layers it would
have fed.

The result is a :class:`GradCheckReport`: data first (one :class:`LeafCheck` per
leaf and method), printed as a table, shown as HTML in Jupyter, and turned into
a :class:`GradientCheckError` naming the layer and leaf by ``raise_if_failed``.
:func:`wrong_rules` publishes a catalogue of deliberately wrong backward rules
as exercises: each one is caught and pinned to its layer.

The package, one concept per module:

- :mod:`~fbp.verify.tolerances` — :class:`Tolerances`, :data:`DEFAULT_TOLERANCES`,
  :func:`tolerances_for`;
- :mod:`~fbp.verify.report` — :class:`LeafCheck`, :class:`GradCheckReport`,
  :class:`GradientCheckError`, the table and HTML renderings;
- :mod:`~fbp.verify.exact` — exact comparison of trees, ``"structure"`` rows;
- :mod:`~fbp.verify.finite_differences` — probes, measured noise, kink skipping;
- :mod:`~fbp.verify.checks` — :func:`check_model`, :func:`check_layer`,
  :func:`check_grad` and their jitted programs;
- :mod:`~fbp.verify.exercises` — :class:`WrongRule` and the catalogue
  :func:`wrong_rules`.

The public names are those in ``__all__``; the rest of the modules serves them.
"""

from fbp.verify.checks import check_grad, check_layer, check_model
from fbp.verify.exercises import WrongRule, wrong_rules
from fbp.verify.report import GradCheckReport, GradientCheckError, LeafCheck
from fbp.verify.tolerances import DEFAULT_TOLERANCES, Tolerances, tolerances_for

__all__ = [
    "DEFAULT_TOLERANCES",
    "GradCheckReport",
    "GradientCheckError",
    "LeafCheck",
    "Tolerances",
    "WrongRule",
    "check_grad",
    "check_layer",
    "check_model",
    "tolerances_for",
    "wrong_rules",
]

# ``doctest.testmod(fbp.verify)`` runs the examples of the names defined in the
# modules above, as it did when this package was one module.
__test__ = {name: globals()[name] for name in __all__ if callable(globals()[name])}
