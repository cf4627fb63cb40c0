"""The benchmark scripts still run against the package: no name they use is undefined (a renamed or moved function
breaks a script only when it is run, hours later)."""

from __future__ import annotations

import pathlib

import pytest
from pyflakes.api import check
from pyflakes.reporter import Reporter

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


class _Collect(Reporter):
    def __init__(self):
        self.messages: list[str] = []

    def flake(self, message):
        self.messages.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text):  # noqa: N802 (pyflakes' API)
        self.messages.append(f"{filename}:{lineno}: syntax error: {msg}")

    def unexpectedError(self, filename, msg):  # noqa: N802
        self.messages.append(f"{filename}: {msg}")


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_script_has_no_undefined_names(script):
    rep = _Collect()
    check(script.read_text(), str(script), rep)
    bad = [m for m in rep.messages if "undefined name" in m or "syntax error" in m or "import *" in m]
    assert not bad, "\n".join(bad)


def test_the_check_catches_an_undefined_name():
    rep = _Collect()
    check("import os\n\ndef f():\n    return conversion.convert()\n", "planted.py", rep)
    assert any("undefined name 'conversion'" in m for m in rep.messages)
