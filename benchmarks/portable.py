"""What a serving-portable conversion costs (issue 28): sources whose conversion engines could not serve as written —
a ``llama3``-rope Llama and a Qwen2 with attention biases — converted calibrated at one budget twice: with the defaults
(a ``default`` rope of the frequencies the scaling leaves unchanged; biases absorbed into bias-free projections) and
with ``--rope-scaling keep --biases keep`` (exact carry-over, transformers only). Perplexity on the usual probe
(non-overlapping 1024-token windows of ``enwiki.test``) for the source and both.

No such checkpoint is reachable offline, so both sources are proxies built from SmolLM2-135M: its weights with a
``llama3`` rope scaling declared (factor 4 over an "original" 2048 tokens: frequencies with wavelengths below 1024
tokens unchanged, like Llama-3.1's below 2048 of 8192), written by this script; and ``make_biased_qwen2.py``'s::

    python benchmarks/make_biased_qwen2.py --assets A --out /tmp/qwen2-biased --steps 40 --lr 5e-2
    python benchmarks/portable.py --assets A --qwen2 /tmp/qwen2-biased --calibration A/text/enwiki.train.txt \\
        --work-dir /tmp/portable --out benchmarks/results/portable.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3 = {"rope_type": "llama3", "rope_theta": 100000.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 2.0, "original_max_position_embeddings": 2048}
MODES = {"portable (defaults)": {}, "kept (--rope-scaling keep --biases keep)": {"rope_scaling": "keep", "biases": "keep"}}


def llama3_proxy(smollm2: Path, out: Path) -> Path:
    """SmolLM2's files (linked) with a llama3 rope scaling in its config."""
    out.mkdir(parents=True, exist_ok=True)
    for f in smollm2.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            os.symlink(f.resolve(), out / f.name)
    cfg = json.loads((smollm2 / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = dict(LLAMA3)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def probe(path: str, text: str, tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mha2mla.data import load_texts
    from mha2mla.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return perplexity(model=model, tokenizer=AutoTokenizer.from_pretrained(path), text=load_texts(text), ctx=1024,
                      max_tokens=tokens).ppl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default=os.environ.get("MHA2MLA_ASSETS", os.path.expanduser("~/.cache/mha2mla-assets")))
    p.add_argument("--qwen2", help="a biased Qwen2 source (make_biased_qwen2.py's output); omitted: llama3 only")
    p.add_argument("--calibration", required=True)
    p.add_argument("--budget", default="96+32", help="RANK+ROPE_DIM (default 96+32)")
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--work-dir", required=True, help="where the proxy and the conversions go (kept: --reuse)")
    p.add_argument("--reuse", action="store_true", help="evaluate conversions already in --work-dir")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "portable.json"))
    args = p.parse_args(argv)

    import mha2mla

    assets, work = Path(args.assets), Path(args.work_dir)
    text = str(assets / "text" / "enwiki.test.txt")
    rank, rope = (int(x) for x in args.budget.split("+"))
    sources = {"llama3-rope proxy": str(llama3_proxy(assets / "models" / "smollm2-135m", work / "llama3-proxy"))}
    if args.qwen2:
        sources["biased Qwen2 proxy"] = args.qwen2
    rows = []
    for name, src in sources.items():
        src_ppl = probe(src, text, args.ppl_tokens)
        rows.append({"source": name, "mode": "source", "ppl": src_ppl})
        print(f"{name}: source ppl {src_ppl:.3f}", file=sys.stderr, flush=True)
        for mode, kw in MODES.items():
            out = work / f"{name.split()[0]}-{'kept' if kw else 'portable'}-{rank}-{rope}"
            t0, record = time.time(), None
            if args.reuse and (out / "mha2mla.json").exists():
                record = json.loads((out / "mha2mla.json").read_text())
            else:
                record = mha2mla.convert(source=src, output=str(out), rank=rank, rope_dim=rope, force=True,
                                         calibration=args.calibration, progress=False, **kw).record
            ppl = probe(str(out), text, args.ppl_tokens)
            cfg = json.loads((out / "config.json").read_text())
            rows.append({"source": name, "mode": mode, "ppl": ppl, "ln_ratio": math.log(ppl / src_ppl),
                         "rope": cfg["rope_parameters"]["rope_type"], "rope_stride": record["plan"]["rope_stride"],
                         "rope_zero_planes": record["plan"].get("rope_zero", []),
                         "attention_bias": cfg["attention_bias"],
                         "portable": record["portability"]["vllm_sglang_portable"],
                         "blockers": record["portability"]["blockers"],
                         "convert_seconds": (record.get("calibration") or {}).get("seconds", round(time.time() - t0, 1)),
                         "path": str(out)})
            print(f"{name}, {mode}: ppl {ppl:.3f}", file=sys.stderr, flush=True)
    lines = ["| source | conversion | target rope (stride, zero planes) | attention biases | vLLM/SGLang "
             "blockers (the shape aside: `mha2mla pad`) | probe ppl (ln ppl/src) |", "|---|---|---|---|---|---:|"]
    for r in rows:
        if r["mode"] == "source":
            lines.append(f"| {r['source']} | source | | | | {r['ppl']:.3f} |")
        else:
            lines.append(f"| {r['source']} | {r['mode']} | {r['rope']} ({r['rope_stride']}, {len(r['rope_zero_planes'])}) "
                         f"| {'kept' if r['attention_bias'] else 'none'} | {'none' if not r['blockers'] else len(r['blockers'])} "
                         f"| {r['ppl']:.3f} ({r['ln_ratio']:.3f}) |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"budget": args.budget, "calibration": args.calibration,
                                          "ppl_tokens": args.ppl_tokens, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
