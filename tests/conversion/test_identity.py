"""The redesign changed no conversion: the tiny cases of ``benchmarks/identity.py`` give the tensors that the code
before it (commit in ``tests/golden/machine.json``) wrote.

Bit for bit on a machine like the one the golden files were written on (same torch, CPU capability and threads);
elsewhere BLAS kernels round differently, so the check there is closeness.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE.parent / "golden"


def _identity():
    spec = importlib.util.spec_from_file_location("identity", HERE.parents[1] / "benchmarks" / "identity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same_machine() -> bool:
    want = json.loads((GOLDEN / "machine.json").read_text())
    have = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}
    return all(want[k] == v for k, v in have.items())


@pytest.mark.parametrize("case", sorted(_identity().CASES))
def test_conversion_matches_the_golden_checkpoint(case, tmp_path):
    out = _identity().convert_case(case, str(tmp_path))
    got = load_file(str(pathlib.Path(out) / "model-00001-of-00001.safetensors"))
    want = load_file(str(GOLDEN / f"{case}.safetensors"))
    assert sorted(got) == sorted(want)
    exact = _same_machine()
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if exact:
            assert torch.equal(g, w), f"{name}: max |Δ| {(g.float() - w.float()).abs().max():.3g}"
        else:
            tol = 2e-2 if w.dtype == torch.bfloat16 else 1e-4
            assert torch.allclose(g.float(), w.float(), rtol=tol, atol=tol * float(w.float().abs().max())), name
