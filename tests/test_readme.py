"""README's python code blocks run as written, in order, in one namespace."""

import re
from pathlib import Path

import matplotlib
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 5


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(monkeypatch, tmp_path, capsys):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as error:  # re-raised with the block number
            raise AssertionError(
                f"README python block {i + 1} failed: {error!r}\n{block}"
            ) from error
