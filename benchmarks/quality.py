"""Quality benchmark: SmolLM2-135M converted to MLA at several KV budgets, against the source model.

    python benchmarks/quality.py                                   # budgets 160+32,96+32,64+32,32+32, --limit 200
    python benchmarks/quality.py --budgets 96+32 --limit 20        # a quick check
    python benchmarks/quality.py --calibration $MHA2MLA_ASSETS/text/enwiki.train.txt

A budget ``R+D`` is ``kv_lora_rank`` R plus ``qk_rope_head_dim`` D cached values per token per layer (the source caches
2·3·64 = 384). For each budget the source is converted with ``mha2mla.convert(rank=R, rope_dim=D)`` and evaluated with
``mha2mla.eval.compare.evaluate``: perplexity on ``ASSETS/text/enwiki.test.txt`` (first 16384 tokens, non-overlapping
windows of 1024) and the five local lm-eval tasks (``ASSETS/tasks``: arc_easy, arc_challenge, hellaswag, piqa,
lambada_openai) on their first ``--limit`` documents, all with the same settings as the source, whose results are
cached after the first run. Prints a Markdown table (budget, KV saved %, perplexity, each task's acc, average acc) and
writes every number to ``benchmarks/results/quality.json``.
"""

from __future__ import annotations

import argparse
import math
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "lambada_openai")
DEFAULT_BUDGETS = "160+32,96+32,64+32,32+32"
T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_budgets(text: str) -> list[tuple[int, int]]:
    """``"160+32,96+32"`` -> ``[(160, 32), (96, 32)]``."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            rank, rope = (int(x) for x in item.split("+"))
        except ValueError:
            raise SystemExit(f"error: budget {item!r} is not RANK+ROPE_DIM, e.g. 96+32") from None
        if rank < 1 or rope < 2 or rope % 2:
            raise SystemExit(f"error: budget {item!r}: rank must be >= 1 and rope dim even and >= 2")
        out.append((rank, rope))
    if not out:
        raise SystemExit("error: --budgets is empty")
    return out


def summarize(result: dict) -> dict:
    """The numbers of one evaluate() result that the table shows (for its ``converted`` model)."""
    acc = {}
    for req in TASKS:
        rows = [r for r in result["rows"] if r["kind"] == "task" and r["task"] == req and r["metric"] == "acc"]
        row = rows[0] if rows else None
        acc[req] = None if row is None else row["converted"]
    known = [v for v in acc.values() if v is not None]
    ppl = result["perplexity"]["converted"]
    return {
        "kv_values_per_token_per_layer": result["models"]["converted"]["kv"]["values_per_token_per_layer"],
        "kv_bytes_4k": result["models"]["converted"]["kv"]["bytes"],
        "ppl": ppl["ppl"], "bits_per_byte": ppl["bits_per_byte"],
        "acc": acc, "average_acc": sum(known) / len(known) if known else None,
    }


def render(rows: list[dict]) -> str:
    def f(v, spec):
        return "—" if v is None else format(v, spec)

    head = ["budget (R+D)", "KV values/token/layer", "KV saved %", "ppl", "bits/byte", *TASKS, "average acc"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["label"], str(r["kv_values_per_token_per_layer"]), f(r["kv_saved_pct"], ".1f"), f(r["ppl"], ".3f"),
                 f(r["bits_per_byte"], ".4f"), *(f(r["acc"][t], ".4f") for t in TASKS), f(r["average_acc"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global TASKS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_assets = os.environ.get("MHA2MLA_ASSETS") or os.path.expanduser("~/.cache/mha2mla-assets")
    p.add_argument("--assets", default=default_assets,
                   help="directory with models/smollm2-135m, text/enwiki.test.txt and tasks/ "
                        "(default $MHA2MLA_ASSETS or ~/.cache/mha2mla-assets)")
    p.add_argument("--source", help="source checkpoint (default ASSETS/models/smollm2-135m)")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS,
                   help=f"comma-separated RANK+ROPE_DIM (default {DEFAULT_BUDGETS})")
    p.add_argument("--limit", type=int, default=200, help="documents per task (default 200)")
    p.add_argument("--calibration", help="calibration text passed to mha2mla.convert (default: data-free)")
    p.add_argument("--calibration-samples", type=int, default=48, help="calibration sequences (default 48)")
    p.add_argument("--calibration-length", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--method", default="", help="calibrated ingredients to switch, e.g. value_refit=0,balance_search=0 "
                                                "(see mha2mla.conversion.options.Method)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks; empty for perplexity only")
    p.add_argument("--label", default="", help="prefix for the budget labels in the table (e.g. the method name)")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="perplexity tokens (default 16384)")
    p.add_argument("--ppl-ctx", type=int, default=1024, help="perplexity window (default 1024)")
    p.add_argument("--batch-size", default="8", help="lm-eval and perplexity batch size (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--work-dir", help="where converted models go (default: a temporary directory, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the converted models (with --work-dir)")
    p.add_argument("--cache-dir", help="eval result cache (default $MHA2MLA_CACHE/eval or ~/.cache/mha2mla/eval)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    args = p.parse_args(argv)

    import mha2mla
    from mha2mla.eval.compare import evaluate

    from mha2mla import Method

    TASKS = tuple(t for t in args.tasks.split(",") if t)
    method, default_method = Method.from_spec(args.method), Method()
    budgets = parse_budgets(args.budgets)
    assets = Path(args.assets)
    source = args.source or str(assets / "models" / "smollm2-135m")
    text, tasks_dir = assets / "text" / "enwiki.test.txt", assets / "tasks"
    for what, path in (("source model", Path(source)), ("perplexity text", text), ("task directory", tasks_dir)):
        if not path.exists():
            raise SystemExit(f"error: {what} {path} does not exist; pass --assets DIR (or set MHA2MLA_ASSETS)")
    if args.calibration and not Path(args.calibration).exists():
        raise SystemExit(f"error: calibration data {args.calibration} does not exist")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    eval_kw = dict(
        tasks=TASKS, limit=args.limit, include_path=str(tasks_dir), ppl_data=str(text), ppl_tokens=args.ppl_tokens,
        ppl_ctx=args.ppl_ctx, batch_size=args.batch_size if args.batch_size == "auto" else int(args.batch_size),
        dtype=args.dtype, device=device, cache_dir=args.cache_dir,
    )
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mha2mla-quality-"))
    work.mkdir(parents=True, exist_ok=True)

    try:
        say(f"source {source}: evaluating (cached after the first run) ...")
        base = evaluate(model=source, **eval_kw)
        src = summarize(base)
        src_kv = src["kv_values_per_token_per_layer"]
        rows = [{"label": "source", "rank": None, "rope_dim": None, "kv_saved_pct": 0.0, **src}]
        records = []
        for i, (rank, rope) in enumerate(budgets, 1):
            label = f"{args.label}{rank}+{rope}"
            out = work / f"smollm2-mla-{rank}-{rope}"
            say(f"[{i}/{len(budgets)}] {label}: converting to {out} ...")
            conv = mha2mla.convert(source=source, output=str(out), rank=rank, rope_dim=rope, force=True,
                                   calibration=args.calibration, calibration_samples=args.calibration_samples,
                                   calibration_length=args.calibration_length, method=method)
            say(f"[{i}/{len(budgets)}] {label}: converted in {conv.seconds:.0f}s; evaluating ...")
            result = evaluate(model=str(out), baseline=source, **eval_kw)
            s = summarize(result)
            saved = 100.0 * (1 - s["kv_values_per_token_per_layer"] / src_kv)
            rows.append({"label": label, "rank": rank, "rope_dim": rope, "kv_saved_pct": saved, **s})
            records.append({"budget": label, "rank": rank, "rope_dim": rope, "convert_seconds": conv.seconds,
                            "summary": rows[-1], "eval": result})
            say(f"[{i}/{len(budgets)}] {label}: ppl {s['ppl']:.3f} (source {src['ppl']:.3f}), "
                f"ln(ppl/src) {math.log(s['ppl'] / src['ppl']):.3f}, average acc {s['average_acc']}")
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    except mha2mla.Mha2mlaError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print(render(rows))
    report = {
        "settings": {**{k: v for k, v in eval_kw.items() if k != "tasks"}, "tasks": list(TASKS), "source": source,
                     "budgets": [f"{r}+{d}" for r, d in budgets], "calibration": args.calibration,
                     "calibration_samples": args.calibration_samples, "calibration_length": args.calibration_length,
                     "method": {k: v for k, v in vars(method).items() if v != getattr(default_method, k)}},
        "table": rows, "source_eval": base, "budgets": records,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
