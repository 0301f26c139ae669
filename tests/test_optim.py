"""fbp's update rules against optax's, step by step, over 200 random steps.

The configurations run inside one jitted program per dtype (a ``lax.scan`` of
200 steps each). The inner loop compares one configuration of each fbp rule
in float64 (whose 1e-10 tolerance is the sharper test of the algebra; the
same program runs a deliberately wrong ε to show that it can fail) and one
in float32; the slow sweep the others, in one program per dtype.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from layer_helpers import device_array

from fbp import optim
from fbp.errors import ConfigError

STEPS = 200
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.1, 20, STEPS, 1e-3)


def _decay_matrices(params):
    return jax.tree.map(lambda a: a.ndim > 1, params)


# name -> (fbp rule, optax rule); each pair must give the same updates.
CONFIGS = {
    "sgd": (optim.sgd(0.1), optax.sgd(0.1)),
    "sgd-schedule": (optim.sgd(SCHEDULE), optax.sgd(SCHEDULE)),
    "sgd-momentum-arg": (optim.sgd(0.05, momentum=0.7), optax.sgd(0.05, momentum=0.7)),
    "momentum": (optim.momentum(0.05), optax.sgd(0.05, momentum=0.9)),
    "momentum-nesterov-schedule": (
        optim.momentum(SCHEDULE, momentum=0.8, nesterov=True),
        optax.sgd(SCHEDULE, momentum=0.8, nesterov=True),
    ),
    "adagrad": (optim.adagrad(0.1), optax.adagrad(0.1)),
    "adagrad-zero-accumulator": (
        optim.adagrad(0.3, initial_accumulator_value=0.0, eps=1e-4),
        optax.adagrad(0.3, initial_accumulator_value=0.0, eps=1e-4),
    ),
    "adagrad-schedule": (optim.adagrad(SCHEDULE), optax.adagrad(SCHEDULE)),
    "rmsprop": (optim.rmsprop(1e-2), optax.rmsprop(1e-2)),
    "rmsprop-centered-nesterov-schedule": (
        optim.rmsprop(
            SCHEDULE, decay=0.95, centered=True, momentum=0.9, nesterov=True, eps_in_sqrt=False
        ),
        optax.rmsprop(
            SCHEDULE, decay=0.95, centered=True, momentum=0.9, nesterov=True, eps_in_sqrt=False
        ),
    ),
    "rmsprop-bias-corrected-momentum": (
        optim.rmsprop(1e-3, initial_scale=1.0, bias_correction=True, momentum=0.5),
        optax.rmsprop(1e-3, initial_scale=1.0, bias_correction=True, momentum=0.5),
    ),
    "adam": (optim.adam(1e-3), optax.adam(1e-3)),
    "adam-hyperparams": (
        optim.adam(3e-2, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-10),
        optax.adam(3e-2, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-10),
    ),
    "adam-nesterov-schedule": (
        optim.adam(SCHEDULE, nesterov=True),
        optax.adam(SCHEDULE, nesterov=True),
    ),
    "adamw": (optim.adamw(1e-2), optax.adamw(1e-2)),
    "adamw-decay-mask-schedule": (
        optim.adamw(SCHEDULE, weight_decay=0.1, mask=_decay_matrices),
        optax.adamw(SCHEDULE, weight_decay=0.1, mask=_decay_matrices),
    ),
    "adamw-decay-schedule": (
        optim.adamw(1e-2, weight_decay=optax.linear_schedule(0.0, 0.5, STEPS)),
        optax.adamw(1e-2, weight_decay=optax.linear_schedule(0.0, 0.5, STEPS)),
    ),
    "chain-clip-adam": (
        optax.chain(optax.clip_by_global_norm(1.0), optim.adam(1e-2)),
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    ),
}


def _problem(dtype):
    """Params (a nested pytree) and 200 steps of random gradients of mixed scales.

    Drawn with numpy: eager ``jax.random`` compiles a program for every shape.
    """
    rng = np.random.default_rng(0)
    params = {
        "w": device_array(rng.standard_normal((4, 3)), dtype),
        "b": device_array(np.zeros(3), dtype),
        "nested": (device_array(rng.standard_normal((2, 2, 2)), dtype),),
    }
    leaves, treedef = jax.tree.flatten(params)
    grads = [
        rng.standard_normal((STEPS, *leaf.shape)) * 10.0 ** (i - 1) for i, leaf in enumerate(leaves)
    ]
    grads[0][:, 0] = 0  # a coordinate whose gradient is always zero
    return params, jax.tree.unflatten(treedef, [device_array(g, dtype) for g in grads])


# The inner loop compares one configuration of each fbp rule, its richest, in
# float64, and one in float32 (the centered rmsprop: a difference of two running
# means, the most exposed to float32 rounding); the slow sweep the others (each
# configuration adds compile time to the program).
FAST = (
    "sgd-momentum-arg",
    "momentum-nesterov-schedule",
    "adagrad-zero-accumulator",
    "rmsprop-centered-nesterov-schedule",
    "adam-nesterov-schedule",
    "adamw-decay-mask-schedule",
)
FAST_FLOAT32 = ("rmsprop-centered-nesterov-schedule",)

# A pair that must NOT match: ε off by 10% (the float64 fast program runs it too).
WRONG = {"rmsprop-eps-off-by-10%": (optim.rmsprop(1e-3, eps=1.1e-8), optax.rmsprop(1e-3))}


def _is_fast(dtype, name):
    return name in (FAST if dtype == "float64" else FAST_FLOAT32)


@functools.partial(jax.jit, static_argnums=0)
def _all_trajectories(names, params, grads):
    """For every config named: final params and per-step updates of fbp's rule and optax's."""
    results = {}
    for name in names:
        ours, theirs = {**CONFIGS, **WRONG}[name]

        def body(carry, g, ours=ours, theirs=theirs):
            p_ours, s_ours, p_theirs, s_theirs = carry
            u_ours, s_ours = ours.update(g, s_ours, p_ours)
            u_theirs, s_theirs = theirs.update(g, s_theirs, p_theirs)
            carry = (
                optax.apply_updates(p_ours, u_ours),
                s_ours,
                optax.apply_updates(p_theirs, u_theirs),
                s_theirs,
            )
            return carry, (u_ours, u_theirs)

        init = (params, ours.init(params), params, theirs.init(params))
        (p_ours, _, p_theirs, _), (u_ours, u_theirs) = jax.lax.scan(body, init, grads)
        results[name] = (p_ours, p_theirs, u_ours, u_theirs)
    return results


def _relative_difference(ours, theirs, axis=None):
    """max |ours − theirs| / max |theirs|, per leaf (per step along ``axis`` 0 if given)."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if axis is not None:
            a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        scale = np.maximum(np.max(np.abs(b), axis=axis), 1e-30)
        worst = max(worst, float(np.max(np.max(np.abs(a - b), axis=axis) / scale)))
    return worst


@functools.cache
def _trajectories(dtype, fast):
    """Every fast (or every other) config's trajectories at ``dtype``, one program (the
    fast float64 one with the wrong pair)."""
    names = tuple(name for name in CONFIGS if _is_fast(dtype, name) == fast)
    names += tuple(WRONG) if fast and dtype == "float64" else ()
    with jax.enable_x64(dtype == "float64"):
        params, grads = _problem(jnp.dtype(dtype))
        results = jax.device_get(_all_trajectories(names, params, grads))
    return params, results


def _config_failures(dtype, name, params, results):
    """Where config ``name``'s fbp rule departs from optax's (empty: it matches)."""
    p_ours, p_theirs, u_ours, u_theirs = results[name]
    failures = []
    if not all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(p_ours)):
        failures.append(f"{name}: params left {dtype}")
    if not _relative_difference(p_ours, p_theirs) < TOLERANCE[dtype]:
        failures.append(f"{name}: final params differ by {_relative_difference(p_ours, p_theirs)}")
    if not _relative_difference(u_ours, u_theirs, axis=1) < TOLERANCE[dtype]:
        failures.append(f"{name}: updates differ by {_relative_difference(u_ours, u_theirs, 1)}")
    # The comparison means something only if the params actually moved.
    moved = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(p_theirs), jax.tree.leaves(params), strict=True)
    )
    if not moved > 1e-3:
        failures.append(f"{name}: params moved only {moved}")
    return failures


# One test per program (dtype, the inner loop's configurations or the others): the
# configurations of a program checked in the test that compiles it, so xdist never
# compiles it again in another process. Failures name their configuration.
@pytest.mark.parametrize(
    ("dtype", "fast"),
    [
        pytest.param(dtype, fast, id=f"{dtype}-{'fast' if fast else 'others'}", marks=marks)
        for dtype in ("float32", "float64")
        for fast, marks in ((True, ()), (False, pytest.mark.slow))
    ],
)
def test_rule_matches_optax_over_200_steps(dtype, fast):
    params, results = _trajectories(dtype, fast)
    names = [name for name in sorted(CONFIGS) if _is_fast(dtype, name) == fast]
    assert names and set(names) <= set(results)
    failures = [f for name in names for f in _config_failures(dtype, name, params, results)]
    if dtype == "float64" and fast:
        failures += _wrong_hyperparameter_failures(results)
    assert not failures, "\n".join(failures)


def _wrong_hyperparameter_failures(results):
    """The float64 tolerance sees an ε off by 10% (float32's alone would not)."""
    _, _, u_ours, u_theirs = results["rmsprop-eps-off-by-10%"]
    difference = _relative_difference(u_ours, u_theirs, axis=1)
    if 100 * TOLERANCE["float64"] < difference < TOLERANCE["float32"]:
        return []
    return [f"rmsprop-eps-off-by-10%: the wrong ε's updates differ by {difference}"]


def test_every_fbp_rule_has_a_fast_configuration():
    assert set(FAST) | set(FAST_FLOAT32) <= set(CONFIGS)
    assert set(FAST_FLOAT32) <= set(FAST)
    assert {name.split("-")[0] for name in FAST} == {
        "sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (optim.sgd, optax.sgd),
        (optim.adagrad, optax.adagrad),
        (optim.rmsprop, optax.rmsprop),
        (optim.adam, optax.adam),
        (optim.adamw, optax.adamw),
    ],
)
def test_hyperparameter_names_and_defaults_follow_optax(ours, theirs):
    theirs_params = inspect.signature(theirs).parameters
    for name, parameter in inspect.signature(ours).parameters.items():
        assert name in theirs_params, name
        assert parameter.default == theirs_params[name].default, name


def test_momentum_defaults():
    parameters = inspect.signature(optim.momentum).parameters
    assert parameters["momentum"].default == 0.9
    assert parameters["nesterov"].default is False
    # The same names and defaults as optax.sgd's momentum arguments.
    assert inspect.signature(optax.sgd).parameters["nesterov"].default is False
    assert "momentum" in inspect.signature(optax.sgd).parameters


def test_momentum_beta_is_a_deprecated_alias_for_one_release():
    grads = {"w": jnp.array([1.0, -2.0])}
    new = optim.momentum(0.1, momentum=0.5)
    with pytest.warns(
        DeprecationWarning, match=r"momentum\(beta=...\) is deprecated; use momentum="
    ):
        old = optim.momentum(0.1, beta=0.5)
    state_new, state_old = new.init(grads), old.init(grads)
    for _ in range(3):  # the velocity carries β: a wrong alias would diverge by step 2
        u_new, state_new = new.update(grads, state_new)
        u_old, state_old = old.update(grads, state_old)
        np.testing.assert_array_equal(u_new["w"], u_old["w"])
    assert not np.allclose(u_new["w"], optim.momentum(0.1).update(grads, state_new)[0]["w"])


RULES = {
    "sgd": optim.sgd(0.1),
    "momentum": optim.momentum(0.1),
    "adagrad": optim.adagrad(0.1),
    "rmsprop": optim.rmsprop(0.1, centered=True, momentum=0.9),
    "adam": optim.adam(0.1),
    "adamw": optim.adamw(0.1),
}


@functools.cache
def _first_updates():
    """Every rule of ``RULES``: its initial state, and its state after one jitted update
    (all rules' updates in one compiled program)."""
    params = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    states = {name: rule.init(params) for name, rule in RULES.items()}

    @jax.jit
    def update(states):
        return {name: rule.update(params, states[name], params)[1] for name, rule in RULES.items()}

    return states, update(states)


def test_states_are_namedtuples_of_arrays():
    """Every rule of ``RULES``, in one test: their one compiled program is not
    compiled again by xdist in another process."""
    states, new_states = _first_updates()
    for name in RULES:
        state, new_state = states[name], new_states[name]
        assert isinstance(state, tuple) and hasattr(state, "_fields"), name
        assert state.count.dtype == jnp.int32 and state.count.shape == (), name
        assert jax.tree.structure(new_state) == jax.tree.structure(state), name
        assert int(new_state.count) == 1, name


def test_learning_rate_may_be_a_traced_array():
    params = {"w": jnp.ones(3)}

    @jax.jit
    def step(learning_rate):
        rule = optim.adam(learning_rate)
        updates, _ = rule.update(params, rule.init(params), params)
        return updates["w"]

    # Adam's first step has size η in every coordinate (up to ε and float32 rounding).
    np.testing.assert_allclose(step(0.5), -0.5 * np.ones(3), rtol=1e-4)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: optim.sgd(-0.1), r"fbp\.optim\.sgd: learning_rate must be >= 0"),
        (lambda: optim.momentum(0.1, momentum=1.0), r"momentum must be in \[0.0, 1.0\), got 1.0"),
        (lambda: optim.adagrad(0.1, eps=-1.0), r"fbp\.optim\.adagrad: eps must be >= 0"),
        (lambda: optim.rmsprop(0.1, decay=1.5), r"decay must be in \[0.0, 1.0\)"),
        (lambda: optim.adam(0.1, b2=1.0), r"fbp\.optim\.adam: b2 must be in"),
        (lambda: optim.adamw(0.1, weight_decay=-1e-4), r"weight_decay must be >= 0"),
        (lambda: optim.sgd(float("nan")), r"sgd: learning_rate must be >= 0.0 and finite, got nan"),
        (lambda: optim.adam(float("inf")), r"adam: learning_rate must be .* got inf"),
        (lambda: optim.rmsprop(np.float32(-1e-3)), r"rmsprop: learning_rate must be >= 0"),
        (lambda: optim.momentum(jnp.asarray(-0.1)), r"momentum: learning_rate must be >= 0"),
        (lambda: optim.momentum(0.1, momentum=float("nan")), r"momentum must be in .*, got nan"),
        (
            lambda: optim.adam(optax.cosine_decay_schedule(-1.0, 100)),
            r"adam: learning_rate must be >= 0.0 and finite, got -1.0 at step 0",
        ),
        (
            lambda: optim.adamw(1e-3, weight_decay=lambda step: jnp.nan),
            r"adamw: weight_decay must be >= 0.0 and finite, got nan at step 0",
        ),
    ],
)
def test_bad_hyperparameters_are_rejected(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_adamw_needs_params():
    rule = optim.adamw(0.1)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ConfigError, match="update needs params"):
        rule.update(params, rule.init(params))


def test_a_schedule_that_turns_negative_later_never_climbs_the_loss():
    """Step 0 is checked when the rule is built; later values only exist traced."""
    schedule = optax.linear_schedule(0.1, -0.1, 10)  # >= 0 for 5 steps, then negative
    opt = optim.sgd(schedule)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    rows = []
    for _ in range(8):
        updates, state = opt.update({"w": jnp.ones(3)}, state, params)
        rows.append(np.asarray(updates["w"]))
    assert all(np.all(r <= 0) for r in rows[:5])  # descent while the rate is >= 0
    assert all(np.all(np.isnan(r)) for r in rows[6:])  # NaN, never ascent, once it is negative
