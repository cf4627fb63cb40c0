"""The package never runs code it was handed: no remote code, no unpickling, anywhere in mha2mla/ (every
subpackage)."""

from __future__ import annotations

import glob
import os
import re

from tests.conftest import ROOT


def _call_text(source: str, start: int) -> str:
    """The text of the call whose ``(`` is at or after ``start``, up to its matching ``)``."""
    i, depth = source.index("(", start), 0
    for j in range(i, len(source)):
        depth += {"(": 1, ")": -1}.get(source[j], 0)
        if depth == 0:
            return source[start : j + 1]
    return source[start:]


def _untrusted_code(root: str) -> list[str]:
    """Every place under ``root/mha2mla`` (recursively) that trusts remote code, unpickles, or loads a torch file
    without ``weights_only=True``."""
    bad = []
    for path in sorted(glob.glob(os.path.join(root, "mha2mla", "**", "*.py"), recursive=True)):
        text = open(path, encoding="utf-8").read()
        name = os.path.relpath(path, root)
        bad += [f"{name}: trust_remote_code=True" for _ in re.finditer(r"trust_remote_code\s*=\s*True", text)]
        bad += [f"{name}: {m.group(0)}" for m in re.finditer(
            r"^\s*(import\s+(c?pickle|dill|joblib|_pickle)\b|from\s+(c?pickle|dill|joblib|_pickle)\s+import)", text, re.M)]
        bad += [f"{name}: {m.group(0)}" for m in re.finditer(r"\b(c?pickle|dill|joblib)\.(load|loads|Unpickler)\b", text)]
        for m in re.finditer(r"\btorch\.load\s*\(", text):
            if not re.search(r"weights_only\s*=\s*True", _call_text(text, m.start())):
                bad.append(f"{name}: torch.load without weights_only=True")
    return bad


def test_package_never_trusts_remote_code_nor_unpickles():
    # every module of every subpackage (the package's top level alone was all this scanned before the subpackages)
    scanned = glob.glob(os.path.join(ROOT, "mha2mla", "**", "*.py"), recursive=True)
    assert os.path.join(ROOT, "mha2mla", "checkpoint", "source.py") in scanned and len(scanned) > 50
    assert _untrusted_code(ROOT) == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan fails on a module that unpickles, trusts remote code or loads torch pickles (it cannot pass
    vacuously)."""
    sub = tmp_path / "mha2mla" / "sub"
    sub.mkdir(parents=True)
    (sub / "leaky.py").write_text("import pickle\nx = torch.load(f)\ny = from_pretrained(p, trust_remote_code=True)\n"
                                  "z = torch.load(g, weights_only=True)\nw = pickle.loads(b)\n")
    assert _untrusted_code(str(tmp_path)) == [
        "mha2mla/sub/leaky.py: trust_remote_code=True", "mha2mla/sub/leaky.py: import pickle",
        "mha2mla/sub/leaky.py: pickle.loads", "mha2mla/sub/leaky.py: torch.load without weights_only=True"]
