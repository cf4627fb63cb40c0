"""The side-by-side report (:mod:`mha2mla.eval.report`); the whole table is checked through ``mha2mla eval`` in
tests/cli/test_eval.py."""

from __future__ import annotations

import pytest

from mha2mla.eval.report import recovery


def test_recovery_direction():
    assert recovery(0.5, 0.4, higher_is_better=True) == pytest.approx(80.0)
    assert recovery(10.0, 12.5, higher_is_better=False) == pytest.approx(80.0)
    assert recovery(0.0, 0.4, higher_is_better=True) is None
