"""Training: the jitted step, evaluation, fit (resume, guards, checks) and reference accuracies.

``fit`` compiles its epoch program once per model, loss and optimizer *objects*
(JAX's jit cache), so the fast tests train one shared model (``small_model``)
with one shared optimizer (:data:`ADAM`, in :func:`_fit_digits`) and batch size:
the 4-epoch reference run, its first epoch saved to a folder (with
``check=True``) that each checkpoint test copies, and every resumed or repeated
run reuse one compiled epoch. Params for the step tests are drawn with numpy
(``layer_helpers.numpy_params``): ``model.init`` would compile a random program
per shape.
"""

import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from layer_helpers import numpy_params

import fbp
from fbp import data, losses, nn, optim
from fbp.checkpoint import load_checkpoint
from fbp.errors import CheckpointError, ConfigError, TrainingDiverged
from fbp.losses import Loss
from fbp.train import CHECKPOINT_NAME, History, evaluate, fit, make_step

CE = losses.softmax_cross_entropy
ADAM = optim.adam(3e-3)
"""The optimizer of every :func:`_fit_digits` run: one object, so one compiled epoch."""


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def small_model():
    return nn.serial(nn.dense(32), nn.relu(), nn.dense(10))


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Generated datasets go to a temporary cache, not the user's. It starts as a copy of the
    user's cached files (only read), so a dataset made there before is not made again
    (MNIST-1D's generator and mnist5k's CSV parser take seconds each)."""
    cache = tmp_path_factory.mktemp("cache")
    for made in data.cache_dir().glob("*.npz"):
        shutil.copy(made, cache)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FBP_CACHE_DIR", str(cache))
        yield


@pytest.fixture(scope="module")
def small_params(small_model, digits):
    """``small_model``'s params, drawn with numpy (nothing compiles); copy before donating."""
    return numpy_params(small_model, digits.input_shape)


def _device(tree):
    """Fresh device arrays of ``tree`` (a step donates what it is given)."""
    return jax.tree.map(jax.device_put, tree)


def _bits(tree):
    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


def _numpy_logits(params, x):
    """``small_model``'s forward (dense → relu → dense) in numpy: a reference that compiles nothing."""
    (first, _, last) = jax.tree.map(np.asarray, params)
    hidden = np.maximum(x @ first["w"] + first["b"], 0)
    return hidden @ last["w"] + last["b"]


# --------------------------------------------------------------------------- make_step


@pytest.fixture(scope="module")
def adam_step(small_model):
    """``(rule, make_step(small_model, CE, rule))`` for fbp's Adam inside an ``optax.chain``
    (after a gradient clip that never clips): one compiled step, two tests."""
    rule = optax.chain(optax.clip_by_global_norm(1e9), optim.adam(1e-2))
    return rule, make_step(small_model, CE, rule)


def test_make_step_takes_fbp_and_optax_rules_alike_and_in_an_optax_chain(
    digits, small_model, small_params, adam_step
):
    """fbp's Adam, composed with an optax transform by ``optax.chain``, steps as optax's."""
    params = small_params
    x, y = jax.device_put(digits.x_train[:64]), jax.device_put(digits.y_train[:64])
    results = []
    theirs = optax.adam(1e-2)
    for rule, step in (adam_step, (theirs, make_step(small_model, CE, theirs))):
        p, s = _device(params), rule.init(params)
        for _ in range(5):
            p, s, value = step(p, s, x, y)
        results.append((p, float(value)))
    (ours, our_loss), (theirs, their_loss) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ours, theirs)
    assert our_loss == pytest.approx(their_loss, rel=1e-5)


def test_make_step_donates_params_and_state(digits, small_params, adam_step):
    params = _device(small_params)
    rule, step = adam_step
    state = rule.init(params)
    x, y = jax.device_put(digits.x_train[:64]), jax.device_put(digits.y_train[:64])
    new_params, _, _ = step(params, state, x, y)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(params))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_params))


# --------------------------------------------------------------------------- evaluate


def test_make_step_with_a_rule_applies_the_rules_update(digits, small_model, small_params):
    """rule= reaches the step: its update is the rule's, not the gradient. Sign symmetry
    stands for every rule here (its program compiles in a third of feedback alignment's
    time, which draws its matrices in the program); the slow tests train with feedback
    alignment."""
    params = small_params
    x, y = jax.device_put(digits.x_train[:32]), jax.device_put(digits.y_train[:32])
    rule = fbp.rules.sign_symmetric()
    opt = optax.sgd(0.5)
    step = make_step(small_model, CE, opt, rule=rule)
    got, _, value = step(_device(params), opt.init(params), x, y)

    @jax.jit  # the rule's update and backprop's gradient, in one program
    def reference(params, x, y):
        return fbp.value_and_grad(small_model, CE, rule=rule)(params, x, y), fbp.grad(
            small_model, CE
        )(params, x, y)

    (want_value, updates), gradient = reference(params, x, y)
    want = jax.tree.map(lambda p, u: np.asarray(p) - 0.5 * np.asarray(u), params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    assert float(value) == pytest.approx(float(want_value), rel=1e-6)
    # the first layer's update differs from backprop's (sign(W) is not W)
    backprop = params[0]["w"] - 0.5 * np.asarray(gradient[0]["w"])
    assert not np.allclose(backprop, got[0]["w"], atol=1e-6)


def test_make_step_folds_batch_norm_statistics_and_never_decays_them(digits):
    model = nn.serial(nn.dense(16), nn.batch_norm(), nn.relu(), nn.dense(10))
    params = numpy_params(model, digits.input_shape)
    params[1]["stats"] = {"mean": np.zeros(16, np.float32), "var": np.ones(16, np.float32)}
    x, y = jax.device_put(digits.x_train[:64]), jax.device_put(digits.y_train[:64])
    opt = optax.adamw(1e-2, weight_decay=0.5)  # weight decay would shrink the stats
    step = make_step(model, CE, opt, batch_stats_momentum=0.75)
    got, _, _ = step(_device(params), opt.init(params), x, y)

    @jax.jit
    def folded(params, x):
        _, cache = model.forward(params, x, train=True)
        return nn.update_batch_stats(model, params, cache, momentum=0.75)[1]["stats"]

    want = folded(params, x)
    for name in ("mean", "var"):
        np.testing.assert_allclose(got[1]["stats"][name], want[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[1]["stats"]["mean"], 0.0)
    # trainable params did move
    assert not np.allclose(got[1]["scale"], params[1]["scale"])
    with pytest.raises(ConfigError, match=r"batch_stats_momentum.*\[0, 1\]"):
        make_step(model, CE, opt, batch_stats_momentum=1.5)


@pytest.mark.slow  # trains to an accuracy; the fast loop folds the statistics in one make_step
def test_fit_trains_batch_norm_and_evaluates_with_running_statistics(digits):
    model = nn.serial(nn.dense(64), nn.batch_norm(), nn.relu(), nn.dense(10))
    initial = numpy_params(model, digits.input_shape)  # model.init would compile per shape
    initial[1].update(  # batch norm as init makes it
        scale=np.ones(64, np.float32),
        bias=np.zeros(64, np.float32),
        stats={"mean": np.zeros(64, np.float32), "var": np.ones(64, np.float32)},
    )
    params, history = fit(
        model, CE, optim.adam(1e-2), digits, epochs=6, batch_size=64,
        key=jax.random.key(1), params=initial, progress=False,
    )  # fmt: skip
    stats = params[1]["stats"]
    # the running statistics follow the batch-norm layer's input on the training data
    h = digits.x_train @ np.asarray(params[0]["w"]) + np.asarray(params[0]["b"])
    mean, std = h.mean(0), h.std(0)
    assert float(np.abs(mean).max()) > 0.3 and float(np.abs(std - 1).max()) > 0.3
    np.testing.assert_allclose(stats["mean"], mean, atol=float(0.2 * std.max()))
    np.testing.assert_allclose(np.sqrt(stats["var"]), std, rtol=0.2)
    # evaluation (train=False, running stats) agrees with the recorded accuracy, and is good
    metrics = evaluate(model, params, digits.x_test, digits.y_test, loss=CE)
    assert metrics["accuracy"] == pytest.approx(history.test_accuracy[-1])
    assert history.test_accuracy[-1] >= 0.93


@pytest.mark.slow
def test_fit_with_feedback_alignment_learns_digits(digits):
    model = nn.serial(nn.dense(64), nn.tanh(), nn.dense(10))
    fa = fbp.rules.feedback_alignment(jax.random.key(5))
    _, history = fit(
        model, CE, optim.adam(3e-3), digits, epochs=15, batch_size=32,
        key=jax.random.key(2), rule=fa, progress=False,
    )  # fmt: skip
    assert history.test_accuracy[-1] >= 0.9


def test_evaluate_matches_a_direct_computation(digits, small_model):
    params = numpy_params(small_model, digits.input_shape, seed=1)
    metrics = evaluate(small_model, params, digits.x_test, digits.y_test)
    logits = _numpy_logits(params, digits.x_test).astype(np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    expected_loss = -np.mean(log_softmax[np.arange(len(logits)), digits.y_test])
    expected_accuracy = np.mean(np.argmax(logits, axis=1) == digits.y_test)
    assert metrics["loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(expected_accuracy)


# --------------------------------------------------------------------------- fit


@pytest.mark.slow  # trains to an accuracy; fast tests fit with and without the progress bar
def test_fit_learns_and_reports_history(capsys):
    spirals = data.load("spirals")
    model = nn.serial(nn.dense(64), nn.tanh(), nn.dense(64), nn.tanh(), nn.dense(3))
    _, history = fit(
        model, CE, optim.adam(1e-2), spirals, epochs=30, batch_size=32, key=jax.random.key(0)
    )
    assert isinstance(history, History) and history.epoch == tuple(range(1, 31))
    assert {len(v) for v in history} == {30}
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.test_accuracy[-1] >= 0.9  # a linear model gets about a third
    assert "fit spirals" in capsys.readouterr().err  # the progress bar


def test_fit_epochs_equal_make_multi_step_on_the_shuffled_minibatches(
    digits, small_model, small_params
):
    """fit's one-call epoch (rows gathered inside the scan) is make_multi_step's result."""
    from fbp.train import _shuffled_batches, make_multi_step

    key = jax.random.key(4)
    got, _ = _fit_digits(small_model, digits, epochs=2, key=key, params=_device(small_params))
    multi = make_multi_step(small_model, CE, ADAM)
    x, y = jax.device_put(digits.x_train), jax.device_put(digits.y_train)
    _, run_key = jax.random.split(key)
    p, state = _device(small_params), ADAM.init(small_params)
    for epoch in (1, 2):
        shuffle_key, step_key = jax.random.split(jax.random.fold_in(run_key, epoch))
        xs, ys = _shuffled_batches(x, y, shuffle_key, len(x) // 64, 64)
        p, state, _ = multi(p, state, xs, ys, step_key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, p)


def test_fit_with_zero_epochs_returns_the_initial_params(digits, small_model, small_params):
    params = _device(small_params)
    expected = _bits(params)
    out, history = fit(
        small_model, CE, optim.sgd(0.1), digits, epochs=0, batch_size=32,
        key=jax.random.key(0), params=params, progress=False,
    )  # fmt: skip
    assert _bits(out) == expected and history == History()


def _fit_digits(model, ds, loss=CE, **kwargs):
    """:data:`ADAM`, 4 epochs of batches of 64, key 3, from numpy-drawn params (``model.init``
    would compile a random program per shape; test_cli's runs cover fit's own init)."""
    kwargs = {"epochs": 4, "batch_size": 64, "key": jax.random.key(3), "progress": False} | kwargs
    kwargs.setdefault("params", numpy_params(model, ds.input_shape))
    return fit(model, loss, ADAM, ds, **kwargs)


@pytest.fixture(scope="module")
def reference(digits, small_model):
    """``(params, history)`` of the uninterrupted 4-epoch :func:`_fit_digits` run."""
    return _fit_digits(small_model, digits)


@pytest.fixture(scope="module")
def one_epoch(digits, small_model, tmp_path_factory):
    """``(folder, history)``: epoch 1 of :func:`_fit_digits` saved in a folder, run with
    ``check=True`` (the gradient check before training passes)."""
    directory = tmp_path_factory.mktemp("one_epoch") / "run"
    _, history = _fit_digits(small_model, digits, epochs=1, checkpoint_dir=directory, check=True)
    return directory, history


def _copy(one_epoch, tmp_path):
    """A fresh copy of the one-epoch run's folder, for a test to resume or damage."""
    return shutil.copytree(one_epoch[0], tmp_path / "run")


def test_interrupted_and_resumed_run_equals_uninterrupted(
    digits, small_model, tmp_path, monkeypatch, reference
):
    reference_params, reference_history = reference

    # Interrupt the run during epoch 3 (after its steps, before its checkpoint).
    real_test_metrics, calls = fbp.train._test_metrics, []

    def interrupted_test_metrics(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_test_metrics(*args, **kwargs)

    monkeypatch.setattr(fbp.train, "_test_metrics", interrupted_test_metrics)
    with pytest.raises(KeyboardInterrupt):
        _fit_digits(small_model, digits, checkpoint_dir=tmp_path)
    monkeypatch.setattr(fbp.train, "_test_metrics", real_test_metrics)
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert saved.metadata["history"]["epoch"] == [1, 2]

    params, history = _fit_digits(small_model, digits, checkpoint_dir=tmp_path)
    assert _bits(params) == _bits(reference_params)
    assert history == reference_history
    assert (
        load_checkpoint(tmp_path / CHECKPOINT_NAME).metadata["history"]
        == reference_history.as_dict()
    )


def test_resume_extends_a_finished_run(digits, small_model, tmp_path, reference, one_epoch):
    reference_params, reference_history = reference
    run = _copy(one_epoch, tmp_path)  # a finished one-epoch run
    _fit_digits(small_model, digits, epochs=3, checkpoint_dir=run, checkpoint_every=2)
    assert load_checkpoint(run / CHECKPOINT_NAME).step == 3 * (1437 // 64)  # the last epoch
    params, history = _fit_digits(small_model, digits, checkpoint_dir=run)
    assert _bits(params) == _bits(reference_params)
    assert history == reference_history


def test_resume_refuses_a_different_run(digits, small_model, tmp_path, one_epoch):
    run = _copy(one_epoch, tmp_path)
    with pytest.raises(ConfigError, match="written by a run with another key"):
        _fit_digits(small_model, digits, key=jax.random.key(4), checkpoint_dir=run)
    with pytest.raises(ConfigError, match="another batch_size"):
        _fit_digits(small_model, digits, batch_size=32, checkpoint_dir=run)
    wider = nn.serial(nn.dense(48), nn.relu(), nn.dense(10))
    with pytest.raises(
        CheckpointError,
        match=r"leaf params\[0\]\['b'\] is float32\[32\] but the target expects float32\[48\]",
    ):
        _fit_digits(wider, digits, checkpoint_dir=run)


# --------------------------------------------------------------------------- NaN / Inf guards


def test_nan_in_the_data_is_refused(digits, small_model):
    x_train = digits.x_train.copy()
    x_train[5, 3] = np.nan
    x_train[9, 0] = np.inf
    with pytest.raises(
        ConfigError, match=r"x_train holds NaN or Inf in 2 examples \(the first is example 5\)"
    ):
        _fit_digits(small_model, digits._replace(x_train=x_train))


def test_divergence_stops_training_and_keeps_the_last_checkpoint(
    digits, small_model, small_params, tmp_path
):
    with pytest.raises(
        TrainingDiverged, match=r"the training loss became (nan|inf) at epoch 1, step \d+ of 22"
    ):
        fit(
            small_model, CE, optim.sgd(1e30), digits, epochs=3, batch_size=64,
            key=jax.random.key(0), progress=False, checkpoint_dir=tmp_path,
            params=small_params,
        )  # fmt: skip
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # no garbage checkpoint


def test_non_finite_params_with_finite_loss_are_caught(digits, small_model, tmp_path, one_epoch):
    """A loss whose value looks fine but whose gradient is infinite poisons the params."""
    poisoned = Loss(lambda pred, y: jnp.zeros(()), lambda pred, y: jnp.full_like(pred, jnp.inf))
    run = _copy(one_epoch, tmp_path)
    with pytest.raises(
        TrainingDiverged,
        match=rf"params became NaN or Inf during epoch 2.*the checkpoint in {run} holds "
        "epoch 1, from before it",
    ):
        _fit_digits(small_model, digits, loss=poisoned, epochs=2, checkpoint_dir=run)
    assert load_checkpoint(run / CHECKPOINT_NAME).metadata["history"]["epoch"] == [1]


def test_an_infinite_test_loss_stops_training_and_cites_no_unwritten_checkpoint(
    digits, small_model, small_params, tmp_path
):
    """One step per epoch at lr 1e20: every training loss is finite, the test loss is not."""
    with pytest.raises(
        TrainingDiverged,
        match=r"the test loss became inf after epoch 1 although every training loss was "
        rf"finite .*; no checkpoint was written to {tmp_path}",
    ):
        fit(
            small_model, CE, optim.sgd(1e20), digits, epochs=2, batch_size=2000,
            key=jax.random.key(0), progress=False, checkpoint_dir=tmp_path,
            params=small_params,
        )  # fmt: skip
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_bad_arguments(digits, small_model):
    with pytest.raises(ConfigError, match="checkpoint_every >= 1"):
        _fit_digits(small_model, digits, checkpoint_every=0)


def _params_as(convert):
    """``small_model``'s params (numpy: nothing runs at collection) passed through ``convert``."""
    return convert(numpy_params(nn.serial(nn.dense(32), nn.relu(), nn.dense(10)), (64,)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 32.0}, r"fit: batch_size must be an int, got 32\.0"),
        ({"epochs": 2.0}, r"fit: epochs must be an int, got 2\.0"),
        ({"checkpoint_every": True}, r"fit: checkpoint_every must be an int, got True"),
        ({"key": None}, r"fit: key must be a JAX PRNG key such as jax\.random\.key\(0\), got None"),
        ({"key": 0}, r"fit: key must be a JAX PRNG key .*, got 0"),
        (
            {"params": _params_as(list)},
            r"fit: params is a list where model\.init gives a tuple; pass tuple\(params\)",
        ),
        (
            {"params": _params_as(lambda p: jax.tree.map(lambda a: np.asarray(a).tolist(), p))},
            r"fit: params\[0\]\['b'\] is a list where model\.init gives an array float32\[32\]",
        ),
        (
            {"params": _params_as(lambda p: jax.tree.map(lambda a: a.astype(jnp.int32), p))},
            r"fit: params\[0\]\['b'\] is int32 where model\.init gives float32; integer params "
            r"cannot be trained",
        ),
        (
            {"params": _params_as(lambda p: (p[0], {"w": p[2]["w"]}, p[2]))},
            r"fit: params\[1\] has the keys \['w'\] where model\.init gives \[\]",
        ),
    ],
)
def test_unusable_arguments_are_named(digits, small_model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _fit_digits(small_model, digits, **kwargs)


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_training(digits, small_model, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(
        CheckpointError, match=rf"fit: checkpoint_dir {file} is a file, not a folder"
    ):
        _fit_digits(small_model, digits, checkpoint_dir=file)


def test_an_empty_training_set_is_refused(digits, small_model):
    empty = digits._replace(x_train=digits.x_train[:0], y_train=digits.y_train[:0])
    with pytest.raises(ConfigError, match=r"fit: 'digits' has no training examples"):
        _fit_digits(small_model, empty)


def test_a_raw_uint32_key_is_accepted_and_the_progress_bar_names_the_data(
    digits, small_model, capsys
):
    _, history = _fit_digits(
        small_model, digits, epochs=1, key=jax.random.PRNGKey(3), progress=True
    )
    assert history.epoch == (1,)
    assert "fit digits" in capsys.readouterr().err  # the progress bar


@pytest.mark.parametrize(
    ("split", "cut", "match"),
    [
        ("y_train", slice(1000), r"1437 examples in x_train but 1000 labels in y_train"),
        ("x_train", slice(1000), r"1000 examples in x_train but 1437 labels in y_train"),
        ("y_test", slice(359), r"360 examples in x_test but 359 labels in y_test"),
    ],
)
def test_examples_and_labels_must_pair_up(digits, small_model, split, cut, match):
    """A short y_train used to be clamped by the gather: every later row got y[999]."""
    short = digits._replace(**{split: getattr(digits, split)[cut]})
    with pytest.raises(fbp.ShapeError, match=rf"fit: 'digits' has {match}"):
        _fit_digits(small_model, short)


# --------------------------------------------------------------------------- check=True


def _broken_relu():
    """A ReLU whose backward forgets the mask: a wrong hand-derived rule."""
    return nn.elementwise("broken_relu", lambda x: (jax.nn.relu(x), None), lambda cache, dy: dy)


class _StubReport:
    def __init__(self, ok):
        self.ok = ok

    def __str__(self):
        return "stub gradient table"

    def raise_if_failed(self):
        if not self.ok:
            raise ValueError("stub: the gradient check failed")


def _stub_verify(ok, calls):
    """A stand-in for fbp.verify with its documented interface, recording its calls."""
    module = types.ModuleType("fbp.verify")

    def check_model(model, loss, params, x, y):
        calls.append((model, loss, jax.tree.map(np.shape, params), np.shape(x), np.shape(y)))
        return _StubReport(ok)

    module.check_model = check_model
    return module


def test_check_hands_the_first_batch_to_fbp_verify(digits, small_model, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "fbp.verify", _stub_verify(True, calls))
    monkeypatch.setattr(fbp, "verify", sys.modules["fbp.verify"])
    _fit_digits(small_model, digits, epochs=0, check=True)  # checked even with no epoch to run
    [(model, loss, param_shapes, x_shape, y_shape)] = calls
    assert model is small_model and loss is CE
    assert param_shapes[0]["w"] == (64, 32) and x_shape == (32, 64) and y_shape == (32,)
    monkeypatch.setitem(sys.modules, "fbp.verify", _stub_verify(False, calls))
    monkeypatch.setattr(fbp, "verify", sys.modules["fbp.verify"])
    with pytest.raises(ValueError, match="stub: the gradient check failed"):
        _fit_digits(small_model, digits, epochs=0, check=True)


def test_check_passes_a_correct_model(one_epoch):
    pytest.importorskip("fbp.verify")
    _, history = one_epoch  # a run with check=True
    assert len(history.epoch) == 1


def test_check_stops_a_wrong_backward_before_training(digits):
    pytest.importorskip("fbp.verify")
    model = nn.serial(nn.dense(32), _broken_relu(), nn.dense(10))
    with pytest.raises(Exception, match="broken_relu"):
        _fit_digits(model, digits, epochs=1, check=True)


# --------------------------------------------------------------------------- reference results
# Recipes and sources in docs/results.md; each run takes seconds on a laptop CPU.


@pytest.mark.slow
def test_mnist1d_dense_network_reaches_65_percent():
    """The MNIST-1D authors' MLP (40-256-256-10, residual hidden layer), Adam 1e-2, batch 100, 8000 steps."""
    mnist1d = data.load("mnist1d")
    hidden = nn.serial(nn.dense(256), nn.relu())
    model = nn.serial(nn.dense(256), nn.relu(), nn.residual(hidden), nn.dense(10))
    _, history = fit(
        model, CE, optim.adam(1e-2), mnist1d, epochs=200, batch_size=100,
        key=jax.random.key(0), progress=False,
    )  # fmt: skip
    assert history.test_accuracy[-1] >= 0.65


@pytest.mark.slow
def test_nielsen_784_30_10_on_mnist5k_reaches_92_percent():
    """Nielsen's 784-30-10 sigmoid network, SGD η = 0.5, mini-batches of 10, 30 epochs."""
    mnist5k = data.load("mnist5k")
    model = nn.serial(nn.dense(30), nn.sigmoid(), nn.dense(10))
    _, history = fit(
        model, CE, optim.sgd(0.5), mnist5k, epochs=30, batch_size=10,
        key=jax.random.key(0), progress=False,
    )  # fmt: skip
    assert history.test_accuracy[-1] >= 0.92


@pytest.mark.parametrize("damage", ["nan params", "history not a dict"])
def test_a_damaged_fit_checkpoint_is_not_resumed(digits, small_model, tmp_path, damage, one_epoch):
    run = _copy(one_epoch, tmp_path)
    path = run / CHECKPOINT_NAME
    saved = load_checkpoint(path)
    params, metadata = saved.params, dict(saved.metadata)
    if damage == "nan params":
        params = jax.tree.map(lambda a: np.full_like(a, np.nan), params)
        match = r"holds params with NaN or Inf .*cannot be resumed"
    else:
        metadata["history"] = "garbage"
        match = r"holds no readable history"
    fbp.checkpoint.save_checkpoint(path, params, saved.opt_state, saved.step, metadata=metadata)
    with pytest.raises(fbp.checkpoint.CheckpointError, match=match):
        _fit_digits(small_model, digits, epochs=2, checkpoint_dir=run)


def test_history_is_typed_and_dict_access_is_deprecated():
    history = History().append(epoch=1, train_loss=0.5, test_loss=0.25, test_accuracy=0.75)
    history = history.append(epoch=2, train_loss=0.4, test_loss=0.2, test_accuracy=0.8)
    assert history.epoch == (1, 2) and history.test_accuracy == (0.75, 0.8)
    assert history[0] == (1, 2)  # still a tuple of fields
    assert history.as_dict() == {
        "epoch": [1, 2],
        "train_loss": [0.5, 0.4],
        "test_loss": [0.25, 0.2],
        "test_accuracy": [0.75, 0.8],
    }
    with pytest.warns(DeprecationWarning, match=r"use history\.test_loss"):
        assert history["test_loss"] == (0.25, 0.2)
    with pytest.raises(ConfigError, match=r"History\.append: needs exactly"):
        history.append(epoch=3, train_loss=0.3)
