"""Are two trees' conversions the same, bit for bit?

Converts a fixed set of cases with whichever ``mha2mla`` is importable (set ``PYTHONPATH`` to an older checkout to
run it) and writes the SHA-256 of every file of every output, the record's timings removed. Run it once per tree and
compare the two JSON files::

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python benchmarks/identity.py --out /tmp/id-before --json before.json
    python benchmarks/identity.py --out /tmp/id-after --json after.json
    python benchmarks/identity.py --compare before.json after.json

``--smollm2 MODEL --calibration TEXT`` adds the calibrated SmolLM2 96+32 conversion with the defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_TIMING_KEYS = {"seconds", "time", "wall_seconds", "date", "created", "mha2mla_version", "version"}


def _conftest():
    spec = importlib.util.spec_from_file_location("_conftest", os.path.join(HERE, "..", "tests", "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _strip(obj):
    """The record without what changes from run to run (timings, dates, the last digits of diagnostics)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    if isinstance(obj, float):  # diagnostics at rounding-noise level (e.g. a 1e-15 residual) vary from run to run
        return float(f"{round(obj, 12):.9g}")
    return obj


def digest_dir(path: str, root: str) -> dict[str, str]:
    """SHA-256 of every file under ``path``; ``mha2mla.json`` without its timings and with ``root`` (where the
    sources were written) cut from its paths; the model card is skipped (it quotes the record's timings)."""
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "README.md" or not os.path.isfile(full):
            continue
        if name == "mha2mla.json":
            with open(full) as f:
                data = json.dumps(_strip(json.load(f)), sort_keys=True).replace(root, "ROOT").encode()
        else:
            with open(full, "rb") as f:
                data = f.read()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


# The tiny cases: (source family, query heads, KV heads, conversion options). "calibrated" cases calibrate on
# conftest.CORPUS in float32 streams (so that the result does not depend on the CPU's bfloat16 support).
CASES = {
    "tiny-llama-datafree": ("llama", 4, 2, dict(rank=16, rope_dim=8)),
    "tiny-llama-calibrated": ("llama", 4, 2, dict(rank=16, rope_dim=8, calibrated=True)),
    "tiny-llama-kv-budget": ("llama", 4, 2, dict(kv_budget=24, calibrated=True)),
    "tiny-llama-drift": ("llama", 4, 2, dict(rank=8, rope_dim=8, calibrated=True)),  # source tracked, MLP refit
    "tiny-qwen2-bf16-biases": ("qwen2", 4, 2, dict(rank=20, rope_dim=4, dtype="bfloat16")),
}


def _pinned_method():
    """The defaults as of the redesign, on trees that have the long-context query fit (which came after it): that fit
    off. None on older trees (their defaults are that method)."""
    try:
        from mha2mla import Method
    except ImportError:  # (trees before the redesign)
        return None
    return Method(query_fit_context=0) if "query_fit_context" in Method.__dataclass_fields__ else None


def convert_case(name: str, out: str) -> str:
    """Build case ``name``'s tiny source under ``out`` and convert it; returns the output directory."""
    import mha2mla

    try:
        from mha2mla import Method
    except ImportError:  # (trees before the redesign)
        from mha2mla.attention import Method

    ct = _conftest()
    os.makedirs(out, exist_ok=True)
    arch, n_heads, n_kv, options = CASES[name]
    kw = dict(options)
    if kw.pop("calibrated", False):
        text = os.path.join(out, "corpus.txt")
        with open(text, "w") as f:
            f.write((ct.CORPUS + "\n") * 40)
        pinned = {"query_fit_context": 0} if _pinned_method() is not None else {}
        kw.update(method=Method(mlp_dtype="float32", **pinned), calibration=text, calibration_samples=8,
                  calibration_length=48)
    src = ct.build_source(os.path.join(out, "src-" + name), arch=arch, n_heads=n_heads, n_kv=n_kv, layers=3, seed=7)
    dst = os.path.join(out, name)
    mha2mla.convert(source=src, output=dst, force=True, progress=False, **kw)
    return dst


def run_cases(out: str, smollm2: str | None, calibration: str | None) -> dict:
    import mha2mla

    os.makedirs(out, exist_ok=True)
    result = {name: digest_dir(convert_case(name, out), out) for name in CASES}
    if smollm2:
        t0 = time.time()
        dst = os.path.join(out, "smollm2-96+32")
        kw = {"method": _pinned_method()} if _pinned_method() is not None else {}
        mha2mla.convert(source=smollm2, output=dst, rank=96, rope_dim=32, calibration=calibration, force=True,
                        progress=False, **kw)
        result["smollm2-96+32"] = digest_dir(dst, out)
        print(f"smollm2 96+32: {time.time() - t0:.0f} s", file=sys.stderr)
    return result


def compare(a: dict, b: dict) -> list[str]:
    rows = []
    for case in sorted(set(a["cases"]) | set(b["cases"])):
        da, db = a["cases"].get(case), b["cases"].get(case)
        if da is None or db is None:
            rows.append(f"{case}: only in {'after' if da is None else 'before'}")
            continue
        diff = [n for n in sorted(set(da) | set(db)) if da.get(n) != db.get(n)]
        rows.append(f"{case}: {'identical' if not diff else 'DIFFERENT: ' + ', '.join(diff)} ({len(da)} files)")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="working directory for sources and outputs")
    ap.add_argument("--json", help="write the digests here")
    ap.add_argument("--smollm2", help="SmolLM2-135M directory: also convert it calibrated at 96+32")
    ap.add_argument("--calibration", help="calibration text for --smollm2")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two digest files")
    args = ap.parse_args()
    if args.compare:
        with open(args.compare[0]) as f:
            a = json.load(f)
        with open(args.compare[1]) as f:
            b = json.load(f)
        rows = compare(a, b)
        print(f"before: {a['commit']}  after: {b['commit']}")
        print("\n".join(rows))
        return 0 if all("identical" in r for r in rows) else 1
    import subprocess

    import mha2mla

    root = os.path.dirname(os.path.dirname(os.path.abspath(mha2mla.__file__)))
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "mha2mla"], capture_output=True, text=True).stdout
    res = {"commit": commit + ("+dirty" if dirty.strip() else ""), "tree": root,
           "cases": run_cases(args.out, args.smollm2, args.calibration)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    for case, files in res["cases"].items():
        print(case, files.get("model.safetensors", "")[:16] or next(iter(files.values()))[:16])
    return 0


if __name__ == "__main__":
    sys.exit(main())
