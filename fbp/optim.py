"""Update rules written out as ``optax.GradientTransformation``s.

Each rule is a factory returning ``GradientTransformation(init, update)`` with
a small NamedTuple state, so fbp's rules and optax's interchange freely and
combine with ``optax.chain`` (``optax.chain(optax.clip_by_global_norm(1.0),
fbp.optim.adam(1e-3))``). Hyperparameter names and defaults follow optax, so
``optax.adam(...)`` and ``fbp.optim.adam(...)`` are the same call and give the
same numbers (the tests hold every rule to its optax counterpart over 200
steps). Every learning rate is a float or an optax schedule ``step -> η``.

Every hyperparameter is checked when the rule is built: a NaN, an infinity or
a negative learning rate raises :class:`fbp.ConfigError` (a negative rate would
climb the loss). A schedule is checked at its value for step 0; one that
turns negative only later (``optax.linear_schedule(0.1, -0.1, 1000)``) is
traced inside the jitted step, where no Python check can see its values: there
a negative (or NaN) rate makes the update NaN rather than silently climbing
the loss, and ``fbp.train.fit``'s divergence guard stops the run.

``updates`` are to be *added* to the params (``optax.apply_updates``), so they
carry the minus sign of descent. In the formulas, ``g`` is the gradient, ``t``
the step number (1 for the first update), and all operations are elementwise.

=============  =================================================================
rule           update
=============  =================================================================
``sgd``        ``θ ← θ − η·g``
``momentum``   ``v ← β·v + g``;  ``θ ← θ − η·v``  (Nesterov: ``θ ← θ − η·(g + β·v)``)
``adagrad``    ``G ← G + g²``;  ``θ ← θ − η·g / √(G + ε)``
``rmsprop``    ``ν ← ρ·ν + (1 − ρ)·g²``;  ``θ ← θ − η·g / √(ν + ε)``
``adam``       ``m ← β₁·m + (1 − β₁)·g``, ``v ← β₂·v + (1 − β₂)·g²``;
               ``θ ← θ − η·m̂ / (√v̂ + ε)`` with ``m̂ = m/(1 − β₁ᵗ)``, ``v̂ = v/(1 − β₂ᵗ)``
``adamw``      adam's step plus decoupled weight decay: ``θ ← θ − η·(m̂/(√v̂ + ε) + λ·θ)``
=============  =================================================================
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fbp.errors import ConfigError

__all__ = [
    "AdagradState",
    "AdamState",
    "MomentumState",
    "RmsPropState",
    "ScalarOrSchedule",
    "SgdState",
    "adagrad",
    "adam",
    "adamw",
    "momentum",
    "rmsprop",
    "sgd",
]

ScalarOrSchedule = float | jax.Array | optax.Schedule
Updates = Any  # a pytree of arrays shaped like the params

# --------------------------------------------------------------------------- helpers
# The few lines every rule shares.


def _check(rule: str, name: str, value: Any, low: float, high: float | None = None) -> None:
    """Reject a hyperparameter that is NaN, infinite or outside ``[low, high)``.

    Numbers and concrete arrays are checked as given; a schedule is checked at
    step 0 (its later values are traced inside the step, where no Python
    check can see them); a traced array is left alone.
    """
    at = ""
    if callable(value):
        value, at = value(_count()), " at step 0"
    number = _concrete_number(value)
    if number is None:
        return
    if not math.isfinite(number) or number < low or (high is not None and number >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low} and finite"
        raise ConfigError(f"fbp.optim.{rule}", f"{name} must be {bound}, got {number}{at}")


def _concrete_number(value: Any) -> float | None:
    """``value`` as a float if it is a known real number (not a tracer), else ``None``."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    real = isinstance(value, jax.Array | np.ndarray) and (
        jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
    )
    return float(np.asarray(value).reshape(())) if real and value.size == 1 else None


def _at(value: ScalarOrSchedule, count: jax.Array) -> jax.Array | float:
    """A hyperparameter at step ``count``: a constant, or a schedule evaluated at it."""
    return value(count) if callable(value) else value


def _descend(learning_rate: ScalarOrSchedule, count: jax.Array, updates: Updates) -> Updates:
    """``−η·u`` with ``η`` at step ``count``, computed in each leaf's dtype.

    A schedule is only seen traced here, so a value that turns negative later
    cannot be refused by a Python check: it makes the update NaN instead of
    silently climbing the loss, and ``fit``'s divergence guard stops there.
    """
    eta = _at(learning_rate, count)
    if callable(learning_rate):
        eta = jnp.where(eta >= 0, eta, jnp.nan)
    return jax.tree.map(lambda u: jnp.asarray(-eta, u.dtype) * u, updates)


def _bias_corrected(moment: Updates, decay: float, count: jax.Array) -> Updates:
    """``moment / (1 − decayᵗ)``: undoes the pull towards the zero the average started at."""
    correction = 1 - decay**count
    return jax.tree.map(lambda m: m / correction.astype(m.dtype), moment)


def _zeros(params: Any) -> Updates:
    return jax.tree.map(jnp.zeros_like, params)


def _count() -> jax.Array:
    return jnp.zeros([], jnp.int32)


_increment = optax.safe_increment  # count + 1, saturating instead of overflowing


# --------------------------------------------------------------------------- sgd


class SgdState(NamedTuple):
    """State of :func:`sgd`: the number of updates so far (for schedules)."""

    count: jax.Array


def sgd(
    learning_rate: ScalarOrSchedule, momentum: float | None = None, nesterov: bool = False
) -> optax.GradientTransformation:
    """Stochastic gradient descent: ``θ ← θ − η·g``.

    Args:
      learning_rate: ``η``, a float or an optax schedule ``step -> η``.
      momentum: when given, heavy-ball momentum ``β`` (see :func:`momentum`),
        as in ``optax.sgd(learning_rate, momentum=β)``.
      nesterov: with ``momentum``, use Nesterov's look-ahead form.

    Returns:
      An ``optax.GradientTransformation`` equal to ``optax.sgd`` with the same
      arguments.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from fbp import optim
      >>> opt = optim.sgd(0.1)
      >>> params = {"w": jnp.ones(2)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones(2)}, state)
      >>> optax.apply_updates(params, updates)["w"]
      Array([0.9, 0.9], dtype=float32)
    """
    if momentum is not None:
        return _momentum(learning_rate, momentum, nesterov=nesterov)
    _check("sgd", "learning_rate", learning_rate, 0.0)

    def init(params):
        del params
        return SgdState(count=_count())

    def update(grads, state, params=None):
        del params
        updates = _descend(learning_rate, state.count, grads)
        return updates, SgdState(count=_increment(state.count))

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- momentum


class MomentumState(NamedTuple):
    """State of :func:`momentum`: the update count and the velocity ``v`` (like the params)."""

    count: jax.Array
    velocity: Updates


def momentum(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    *,
    beta: float | None = None,
) -> optax.GradientTransformation:
    """SGD with heavy-ball momentum (Polyak 1964; Sutskever et al. 2013).

    ``v ← β·v + g``, ``θ ← θ − η·v``: the velocity is a running sum of past
    gradients, each step's weight shrinking by ``β``, so steady directions
    accelerate (up to ``1/(1 − β)`` times) and oscillating ones cancel.
    Nesterov's variant steps along ``g + β·v`` (the gradient plus where the
    velocity is about to carry the params).

    Args:
      learning_rate: ``η``, a float or an optax schedule ``step -> η``.
      momentum: the momentum ``β`` in ``[0, 1)`` (optax's and :func:`sgd`'s
        name for it).
      nesterov: use Nesterov's look-ahead form.
      beta: deprecated spelling of ``momentum`` (fbp 0.1); warns, and will be
        removed in the next release.

    Returns:
      An ``optax.GradientTransformation`` equal to
      ``optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)``.
    """
    if beta is not None:
        warnings.warn(
            "fbp.optim.momentum(beta=...) is deprecated; use momentum=... "
            "(the name optax and fbp.optim.sgd use)",
            DeprecationWarning,
            stacklevel=2,
        )
        momentum = beta
    beta = momentum
    _check("momentum", "learning_rate", learning_rate, 0.0)
    _check("momentum", "momentum", beta, 0.0, 1.0)

    def init(params):
        return MomentumState(count=_count(), velocity=_zeros(params))

    def update(grads, state, params=None):
        del params
        velocity = jax.tree.map(lambda g, v: g + beta * v, grads, state.velocity)
        # Nesterov: step along where the velocity is about to carry the params.
        step = jax.tree.map(lambda g, v: g + beta * v, grads, velocity) if nesterov else velocity
        updates = _descend(learning_rate, state.count, step)
        return updates, MomentumState(count=_increment(state.count), velocity=velocity)

    return optax.GradientTransformation(init, update)


_momentum = momentum  # ``sgd``'s argument named ``momentum`` shadows the function


# --------------------------------------------------------------------------- adagrad


class AdagradState(NamedTuple):
    """State of :func:`adagrad`: the update count and the sum of squared gradients ``G``."""

    count: jax.Array
    sum_of_squares: Updates


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
) -> optax.GradientTransformation:
    """Adagrad (Duchi, Hazan and Singer 2011): a step size per parameter.

    ``G ← G + g²``, ``θ ← θ − η·g / √(G + ε)``: parameters that have seen large
    gradients take small steps, rarely-updated ones keep large steps. ``G``
    only grows, so the steps shrink over time. (Where ``G`` is 0 the update
    is 0, as in optax.)

    Args:
      learning_rate: ``η``, a float or an optax schedule.
      initial_accumulator_value: the starting value of ``G``.
      eps: ``ε``, added under the square root.

    Returns:
      An ``optax.GradientTransformation`` equal to ``optax.adagrad`` with the
      same arguments.
    """
    _check("adagrad", "learning_rate", learning_rate, 0.0)
    _check("adagrad", "initial_accumulator_value", initial_accumulator_value, 0.0)
    _check("adagrad", "eps", eps, 0.0)

    def init(params):
        sum_of_squares = jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params)
        return AdagradState(count=_count(), sum_of_squares=sum_of_squares)

    def update(grads, state, params=None):
        del params
        sum_of_squares = jax.tree.map(lambda g, s: g * g + s, grads, state.sum_of_squares)
        step = jax.tree.map(
            lambda g, s: jnp.where(s > 0, jax.lax.rsqrt(s + eps), 0.0) * g, grads, sum_of_squares
        )
        updates = _descend(learning_rate, state.count, step)
        return updates, AdagradState(count=_increment(state.count), sum_of_squares=sum_of_squares)

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- rmsprop


class RmsPropState(NamedTuple):
    """State of :func:`rmsprop`.

    Attributes:
      count: updates so far.
      nu: running mean of ``g²``.
      mu: running mean of ``g`` (``centered=True``), else ``None``.
      velocity: momentum buffer (``momentum`` given), else ``None``.
    """

    count: jax.Array
    nu: Updates
    mu: Updates | None
    velocity: Updates | None


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> optax.GradientTransformation:
    """RMSProp (Hinton, Coursera lecture 6e, 2012; centered form: Graves 2013).

    ``ν ← ρ·ν + (1 − ρ)·g²``, ``θ ← θ − η·g / √(ν + ε)``: Adagrad with a
    forgetting running mean instead of a growing sum, so steps stop shrinking.
    ``centered`` also tracks ``μ ← ρ·μ + (1 − ρ)·g`` and divides by the
    standard deviation ``√(ν − μ² + ε)``. With ``momentum`` the scaled step
    ``s = −η·g/√(…)`` feeds a velocity ``v ← s + β·v`` (after the learning
    rate, as in optax and TensorFlow).

    Args:
      learning_rate: ``η``, a float or an optax schedule.
      decay: ``ρ``, the decay of the running means.
      eps: ``ε``.
      initial_scale: the starting value of ``ν`` (PyTorch: 0, TF1: 1).
      eps_in_sqrt: add ``ε`` under the root (``√(ν + ε)``); else ``√ν + ε``.
      centered: divide by the running standard deviation instead of the RMS.
      momentum: ``β`` of an optional momentum on the scaled steps.
      nesterov: with ``momentum``, use Nesterov's form.
      bias_correction: divide ``ν`` (and ``μ``) by ``1 − ρᵗ`` as Adam does.

    Returns:
      An ``optax.GradientTransformation`` equal to ``optax.rmsprop`` with the
      same arguments.
    """
    _check("rmsprop", "learning_rate", learning_rate, 0.0)
    _check("rmsprop", "decay", decay, 0.0, 1.0)
    _check("rmsprop", "eps", eps, 0.0)
    if momentum is not None:
        _check("rmsprop", "momentum", momentum, 0.0, 1.0)

    def init(params):
        return RmsPropState(
            count=_count(),
            nu=jax.tree.map(lambda p: jnp.full_like(p, initial_scale), params),
            mu=_zeros(params) if centered else None,
            velocity=_zeros(params) if momentum is not None else None,
        )

    def update(grads, state, params=None):
        del params
        count = _increment(state.count)
        nu = jax.tree.map(lambda g, n: (1 - decay) * g**2 + decay * n, grads, state.nu)
        nu_hat = _bias_corrected(nu, decay, count) if bias_correction else nu
        if centered:
            mu = jax.tree.map(lambda g, m: (1 - decay) * g + decay * m, grads, state.mu)
            mu_hat = _bias_corrected(mu, decay, count) if bias_correction else mu
            variance = jax.tree.map(lambda n, m: n - m * m, nu_hat, mu_hat)
        else:
            mu, variance = None, nu_hat
        if eps_in_sqrt:
            scale = jax.tree.map(lambda v: jax.lax.rsqrt(v + eps), variance)
        else:
            scale = jax.tree.map(lambda v: 1 / (jnp.sqrt(v) + eps), variance)
        step = jax.tree.map(lambda s, g: s * g, scale, grads)
        updates = _descend(learning_rate, state.count, step)
        velocity = None
        if momentum is not None:
            velocity = jax.tree.map(lambda u, v: u + momentum * v, updates, state.velocity)
            if nesterov:
                updates = jax.tree.map(lambda u, v: u + momentum * v, updates, velocity)
            else:
                updates = velocity
        return updates, RmsPropState(count=count, nu=nu, mu=mu, velocity=velocity)

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- adam


class AdamState(NamedTuple):
    """State of :func:`adam` and :func:`adamw`: the count and the moments ``m`` and ``v``."""

    count: jax.Array
    mu: Updates
    nu: Updates


def _adam_direction(grads, state, b1, b2, eps, eps_root, nesterov):
    """Adam's scaled step ``m̂ / (√(v̂ + ε_root) + ε)`` and its new state (shared with adamw)."""
    count = _increment(state.count)
    mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, grads, state.mu)
    nu = jax.tree.map(lambda g, v: (1 - b2) * g**2 + b2 * v, grads, state.nu)
    if nesterov:  # Dozat 2016: look one step ahead along the momentum
        mu_hat = jax.tree.map(
            lambda m, g: b1 * m + (1 - b1) * g,
            _bias_corrected(mu, b1, _increment(count)),
            _bias_corrected(grads, b1, count),
        )
    else:
        mu_hat = _bias_corrected(mu, b1, count)
    nu_hat = _bias_corrected(nu, b2, count)
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
    return direction, AdamState(count=count, mu=mu, nu=nu)


def _check_adam(rule, learning_rate, b1, b2, eps, eps_root):
    _check(rule, "learning_rate", learning_rate, 0.0)
    _check(rule, "b1", b1, 0.0, 1.0)
    _check(rule, "b2", b2, 0.0, 1.0)
    _check(rule, "eps", eps, 0.0)
    _check(rule, "eps_root", eps_root, 0.0)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """Adam (Kingma and Ba 2015): momentum and RMSProp, both bias-corrected.

    ``m ← β₁·m + (1 − β₁)·g``, ``v ← β₂·v + (1 − β₂)·g²``,
    ``m̂ = m/(1 − β₁ᵗ)``, ``v̂ = v/(1 − β₂ᵗ)``, ``θ ← θ − η·m̂ / (√(v̂ + ε_root) + ε)``.
    The running means start at zero; dividing by ``1 − βᵗ`` removes that pull
    so the first steps have the right size. ``nesterov=True`` is NAdam.

    Args:
      learning_rate: ``η``, a float or an optax schedule.
      b1: ``β₁``, decay of the gradient mean.
      b2: ``β₂``, decay of the squared-gradient mean.
      eps: ``ε``, added to the root.
      eps_root: ``ε_root``, added under the root.
      nesterov: use Nesterov momentum (NAdam, Dozat 2016).

    Returns:
      An ``optax.GradientTransformation`` equal to ``optax.adam`` with the same
      arguments.

    Example:
      >>> import optax
      >>> from fbp import optim
      >>> opt = optax.chain(optax.clip_by_global_norm(1.0), optim.adam(1e-3))
    """
    _check_adam("adam", learning_rate, b1, b2, eps, eps_root)

    def init(params):
        return AdamState(count=_count(), mu=_zeros(params), nu=_zeros(params))

    def update(grads, state, params=None):
        del params
        direction, new_state = _adam_direction(grads, state, b1, b2, eps, eps_root, nesterov)
        return _descend(learning_rate, state.count, direction), new_state

    return optax.GradientTransformation(init, update)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[Any], Any] | None = None,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """AdamW (Loshchilov and Hutter 2019): Adam with decoupled weight decay.

    ``θ ← θ − η·(m̂ / (√(v̂ + ε_root) + ε) + λ·θ)``: the decay ``λ·θ`` is added
    to Adam's scaled step rather than to the gradient, so it is not divided
    by ``√v̂`` and shrinks every weight at the same relative rate.

    Args:
      learning_rate, b1, b2, eps, eps_root, nesterov: as in :func:`adam`.
      weight_decay: ``λ``, a float or a schedule.
      mask: a pytree of bools shaped like the params (or a function of the
        params returning one) that is ``True`` where weight decay applies,
        e.g. ``lambda p: jax.tree.map(lambda a: a.ndim > 1, p)`` to spare biases.

    Returns:
      An ``optax.GradientTransformation`` equal to ``optax.adamw`` with the same
      arguments. ``update`` needs ``params``.
    """
    _check_adam("adamw", learning_rate, b1, b2, eps, eps_root)
    _check("adamw", "weight_decay", weight_decay, 0.0)

    def init(params):
        return AdamState(count=_count(), mu=_zeros(params), nu=_zeros(params))

    def update(grads, state, params=None):
        if params is None:
            raise ConfigError("fbp.optim.adamw", "update needs params for the weight decay")
        direction, new_state = _adam_direction(grads, state, b1, b2, eps, eps_root, nesterov)
        decay = _at(weight_decay, state.count)
        where = jax.tree.map(lambda _: True, params) if mask is None else mask
        where = where(params) if callable(where) else where
        direction = jax.tree.map(
            lambda d, p, m: d + decay * p if m else d, direction, params, where
        )
        return _descend(learning_rate, state.count, direction), new_state

    return optax.GradientTransformation(init, update)
