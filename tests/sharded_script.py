"""Run by tests/test_parallel.py in a subprocess with 4 forced CPU devices.

Prints one line per check: ``name max_relative_difference``: the sharded steps'
checks (``--steps``, the fast test) and the comparison of a sharded ``fit`` with
a single-device one (``--fit``, the slow test), as asked.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import jax
import numpy as np
import optax

from fbp import data, losses, nn, train


def rel(a_tree, b_tree):
    worst = 0.0
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
    return worst


assert len(jax.devices()) == 4, jax.devices()
mesh = jax.make_mesh((4,), ("data",))
model = nn.serial(nn.dense(32), nn.tanh(), nn.dense(16), nn.relu(), nn.dense(5))
loss = losses.softmax_cross_entropy
optimizer = optax.adam(1e-2)
# Params of model.init's layout and scale (LeCun-normal weights, zero biases), inputs and
# labels, all drawn by numpy: no eager JAX programs to compile.
rng = np.random.default_rng(1)
params = jax.tree.map(
    lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0]) if len(s.shape) == 2 else
               np.zeros(s.shape)).astype(s.dtype),
    jax.eval_shape(lambda: model.init(jax.random.key(0), (12,))[0]),
)  # fmt: skip
x = rng.standard_normal((3, 64, 12)).astype(np.float32)
y = rng.integers(0, 5, (3, 64)).astype(np.int32)

copy = lambda tree: jax.tree.map(np.array, tree)  # noqa: E731  (the steps donate their inputs)

if "--steps" in sys.argv[1:]:
    single = train.make_step(model, loss, optimizer)
    sharded = train.make_step(model, loss, optimizer, mesh=mesh)
    init = jax.jit(optimizer.init)
    p1, s1 = copy(params), init(params)
    p2, s2 = copy(params), init(params)
    for i in range(3):
        p1, s1, l1 = single(p1, s1, x[i], y[i])
        p2, s2, l2 = sharded(p2, s2, x[i], y[i])
    print("step_params", rel(p2, p1))
    print("step_loss", rel(l2, l1))
    print("step_sharding", int(len(p2[0]["w"].sharding.device_set) == 4))
    # Data-parallel from the first step to the last: the gradients are all-reduced, the
    # batch never gathered onto one device (jax.make_mesh's Explicit axes did that).
    compiled = sharded.lower(p2, s2, x[0], y[0], None).compile().as_text()
    print("step_all_gathers", compiled.count("all-gather"))
    print("step_all_reduces", int("all-reduce" in compiled))

    multi = train.make_multi_step(model, loss, optimizer, mesh=mesh)
    p3, s3, losses3 = multi(copy(params), init(params), x, y)
    print("multi_params", rel(p3, p1))

    try:
        sharded(p2, s2, x[0, :30], y[0, :30])
        print("indivisible_error 0")
    except ValueError as error:
        print("indivisible_error", int("cannot be split evenly over the 4 devices" in str(error)))

if "--fit" in sys.argv[1:]:
    # The step checks' inputs as a dataset and their numpy params: no dataset to load (and no
    # scikit-learn to import), no random init to compile; the two fits compile their epochs.
    flat_x, flat_y = x.reshape(-1, 12), y.reshape(-1)
    ds = data.Dataset(flat_x[:160], flat_y[:160], flat_x[160:], flat_y[160:], 5, "random")
    fit_kw = dict(epochs=2, batch_size=32, key=jax.random.key(3), progress=False)
    pa, ha = train.fit(model, loss, optax.sgd(0.1), ds, params=copy(params), **fit_kw)
    pb, hb = train.fit(model, loss, optax.sgd(0.1), ds, params=copy(params), mesh=mesh, **fit_kw)
    print("fit_params", rel(pb, pa))
