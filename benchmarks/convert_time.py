"""Time a calibrated conversion of SmolLM2-135M, phase by phase (issue 7's 3-minute budget on 2 CPU cores).

    python benchmarks/convert_time.py --assets /work/assets [--budget 160+32] [--method mlp_drift=0]

Each phase is timed by wrapping the function of ``mha2mla.conversion.pipeline`` / ``mha2mla.conversion.stream`` that runs it; prints
a table and writes JSON (default ``benchmarks/results/convert-time.json``). Run it alone on the machine: concurrent jobs
inflate wall times 2-3x.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import mha2mla.conversion.layer as layer  # noqa: E402
import mha2mla.conversion.schedule as schedule  # noqa: E402
import mha2mla.conversion.stream as calibration  # noqa: E402
from mha2mla import Method, convert  # noqa: E402

PHASES = [  # (module, attribute, label): the functions each phase runs in, patched with a timer
    (calibration, "calibration_tokens", "tokenising"),
    (schedule, "calibrate", "schedule pre-pass"),
    (schedule, "_stride_plan", "schedule choice"),
    (calibration.Propagation, "layer_calibration", "statistics"),
    (layer, "convert_attention", "factorisation"),
    (layer, "_fit_queries", "query fit"),
    (layer, "_fit_output", "output fit"),
    (calibration.Propagation, "advance", "moving the streams (+ MLP refit)"),
]


def _timed(totals: collections.Counter, label: str, f, active: list):
    """``f`` timed into ``totals[label]``, unless it runs inside another timed phase (the pre-pass's statistics and
    layer moves count as the pre-pass)."""
    @functools.wraps(f)
    def g(*args, **kwargs):
        if active:
            return f(*args, **kwargs)
        active.append(label)
        t = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t
            active.pop()
    return g


def matmul_gflops() -> float:
    """This machine's float32 matmul rate right now (best of 6 calls, 4096 × 576 × 1536, the MLP's shape): the VM's speed
    varies by ±15 % over a day, so each timing carries it."""
    a, w = torch.randn(4096, 576), torch.randn(1536, 576)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 * 576 * 1536 / best / 1e9


def cpu_vector_flags() -> list[str]:
    """The CPU's vector-extension flags that decide the streams' precision and speed (empty without
    ``/proc/cpuinfo``): without ``avx512_bf16``/``amx_bf16`` the streams run in float32 (``Method.mlp_dtype="auto"``)."""
    return sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} & calibration.cpu_flags())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default=os.environ.get("MHA2MLA_ASSETS", os.path.expanduser("~/.cache/mha2mla-assets")))
    p.add_argument("--budget", default="160+32", help="rank+rope_dim (default 160+32)")
    p.add_argument("--method", default="", help="Method switches, e.g. mlp_drift=0")
    p.add_argument("--calibration-samples", type=int, default=48)
    p.add_argument("--calibration-length", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert-time.json"))
    args = p.parse_args()
    gflops = matmul_gflops()
    rank, rope = (int(x) for x in args.budget.split("+"))
    totals: collections.Counter = collections.Counter()
    active: list = []
    for owner, name, label in PHASES:
        setattr(owner, name, _timed(totals, label, getattr(owner, name), active))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = convert(
            source=os.path.join(args.assets, "models", "smollm2-135m"), output=os.path.join(tmp, "mla"), rank=rank,
            rope_dim=rope, calibration=os.path.join(args.assets, "text", "enwiki.train.txt"),
            calibration_samples=args.calibration_samples, calibration_length=args.calibration_length,
            method=Method.from_spec(args.method), progress=False)
        total = time.perf_counter() - t0
    mlp_dtype = res.record["calibration"]["propagation"]["mlp_dtype"]
    flags = cpu_vector_flags()
    rows = [(label, totals[label]) for _, _, label in PHASES]
    rows.append(("other (loading, writing)", total - sum(totals.values())))
    print(f"SmolLM2-135M {args.budget}, {args.calibration_samples} x {args.calibration_length} calibration tokens, method {args.method or 'default'}, "
          f"{torch.get_num_threads()} threads, streams' MLPs in {mlp_dtype}, float32 matmul {gflops:.0f} GFLOP/s, "
          f"CPU {' '.join(flags) or '?'}")
    print("| phase | seconds |\n|---|---:|")
    for label, sec in rows:
        print(f"| {label} | {sec:.1f} |")
    print(f"| **total** | **{total:.1f}** |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"budget": args.budget, "method": args.method, "calibration_samples": args.calibration_samples,
                   "calibration_length": args.calibration_length,
                   "mlp_dtype": mlp_dtype, "matmul_gflops": round(gflops, 1),
                   "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                   "cpu_vector_flags": flags,
                   "total_seconds": round(total, 1), "phases": {k: round(v, 1) for k, v in rows}}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
