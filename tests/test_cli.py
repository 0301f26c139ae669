"""The ``fbp`` command, run in-process through ``fbp.cli.main``."""

import re

import pytest

from fbp import cli


def test_default_train_reaches_97_percent_on_digits(capsys):
    assert cli.main(["train", "--no-progress"]) == 0
    out = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy: ([\d.]+)%", out).group(1))
    assert accuracy >= 97.0, out


def test_train_rejects_bad_widths(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--hidden", "128,x"])
    assert "expected comma-separated ints" in capsys.readouterr().err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "examples:" in capsys.readouterr().out
