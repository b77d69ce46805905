"""Every ```python block of the README runs, in order, in one namespace."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_two_commands_first():
    text = README.read_text()
    demo = text.index("<!-- demo-command -->")
    test = text.index("<!-- test-command -->")
    assert demo < test < text.index("```python")
    assert "python -m chainrule demo" in text[demo:test]
    assert "pytest" in text[test:text.index("```", text.index("```bash", test) + 3)]


def test_readme_examples_run(capsys):
    pytest.importorskip("sklearn")
    namespace = {}
    for i, code in enumerate(_blocks()):
        try:
            exec(compile(code, f"README.md block {i}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"README python block {i} failed:\n{code}") from err
