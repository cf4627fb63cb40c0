"""Long context: perplexity by position inside long windows and passkey retrieval, source vs converted models.

    python benchmarks/long_context.py --source /work/assets/models/smollm2-135m \
        --model 96+32=/tmp/lc-96 --data /work/assets/text/enwiki.test.txt \
        --window 4096 --window 8192 --windows 2 --passkey 1024,1536,2048,4096,8192 --trials 10 \
        --output benchmarks/results/long_context.json --plot benchmarks/results/long_context.png

Each model is loaded with ``attn_implementation="sdpa"`` in float32 and run forward only. Windows are capped at the
source's ``max_position_embeddings`` (and ``--max-len``). Results already in ``--output`` for the same label, model
directory and settings are reused (``--fresh`` recomputes), so a new budget can be added without re-running the source.
Prints the Markdown tables (:func:`mha2mla.eval.long_context.render_long_context`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


def _settings(args, max_len: int) -> dict:
    return {"data": os.path.abspath(args.data), "windows": args.windows, "trials": args.trials, "seed": args.seed,
            "window_sizes": [w for w in args.window if 0 < w <= max_len],
            "passkey_lengths": [n for n in args.passkey if n <= max_len]}


def _plot(results: dict, path: str, source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ref = {p["window"]: p for p in results[source]["positions"]}
    for label, r in results.items():
        if label == source:
            continue
        for p in r["positions"]:
            if p["window"] != max(ref):
                continue  # one line per budget: the longest window
            mids = [(b["start"] + b["end"]) / 2 for b in p["buckets"]]
            ratio = [b["ppl"] / rb["ppl"] for b, rb in zip(p["buckets"], ref[p["window"]]["buckets"])]
            ax.plot(mids, ratio, marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.6, color="red", lw=0.8, ls="--", label="target 1.6")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in window (bucket midpoint, tokens)")
    ax.set_ylabel("perplexity ratio converted / source")
    ax.set_title(f"Long context: windows of {max(ref)} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    from mha2mla.data import load_texts, pack_tokens
    from mha2mla.eval.long_context import long_context_report, render_long_context

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="source model directory (the reference)")
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=PATH", help="converted model (repeatable)")
    ap.add_argument("--data", required=True, help="held-out text for the perplexity windows")
    ap.add_argument("--window", type=int, action="append", help="window length (repeatable; default 4096 and 8192; 0: none)")
    ap.add_argument("--windows", type=int, default=2, help="windows per window length")
    ap.add_argument("--passkey", type=lambda s: [int(x) for x in s.split(",") if x], default=[1024, 1536, 2048, 4096, 8192],
                    help="comma-separated passkey prompt lengths ('' for none)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, help="cap windows and prompts (default: the source's max_position_embeddings)")
    ap.add_argument("--threads", type=int, help="torch threads")
    ap.add_argument("--output", default="benchmarks/results/long_context.json")
    ap.add_argument("--plot", help="PNG: perplexity ratio to the source vs position, one line per model")
    ap.add_argument("--fresh", action="store_true", help="recompute results already in --output")
    ap.add_argument("--skip-source", action="store_true", help="evaluate only the --model entries (the source may come "
                    "from --merge later)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="evaluate nothing: merge these result files (later ones "
                    "win) into --output, print the tables and draw --plot")
    args = ap.parse_args(argv)
    args.window = args.window or [4096, 8192]
    if args.threads:
        torch.set_num_threads(args.threads)

    with open(os.path.join(args.source, "config.json")) as f:
        max_len = int(json.load(f).get("max_position_embeddings", 8192))
    if args.max_len:
        max_len = min(max_len, args.max_len)
    settings = _settings(args, max_len)
    if args.merge:
        merged: dict = {}
        for path in args.merge:
            with open(path) as f:
                merged.update(json.load(f)["models"])
        merged = {"source": merged.pop("source"), **merged}
        with open(args.output, "w") as f:
            json.dump({"command": " ".join(sys.argv), "merged_from": args.merge, "models": merged}, f, indent=1)
        if args.plot:
            _plot(merged, args.plot, "source")
        print(render_long_context(merged))
        return 0
    old = {}
    if os.path.exists(args.output) and not args.fresh:
        with open(args.output) as f:
            old = json.load(f).get("models", {})
    texts = load_texts(args.data)
    models = {**({} if args.skip_source else {"source": args.source}), **dict(m.split("=", 1) for m in args.model)}
    results: dict[str, dict] = {}
    for label, path in models.items():
        prev = old.get(label)
        if prev and prev.get("path") == os.path.realpath(path) and prev.get("settings") == settings and \
                prev.get("complete", True):
            results[label] = prev
            print(f"{label}: reused from {args.output}", file=sys.stderr)
            continue
        t0 = time.time()
        model, tok = _load(path)
        tokens = pack_tokens(tok, texts, max_tokens=max(settings["window_sizes"], default=0) * args.windows or None)
        entry = {"path": os.path.realpath(path), "settings": settings, "positions": [], "passkey": [],
                 "complete": False}
        results[label] = entry

        def save():  # after each stage: a long run keeps what it has
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump({"command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
                           "models": {**old, **results}}, f, indent=1)

        for w in settings["window_sizes"]:
            r = long_context_report(model=model, tokenizer=tok, tokens=tokens, windows_of=[w], windows=args.windows,
                                    passkey_lengths=[])
            entry["positions"] += r["positions"]
            print(f"{label}: window {w}: " + " ".join(f"{b['start']}-{b['end']}:{b['ppl']:.2f}"
                                                     for b in r["positions"][0]["buckets"])
                  + f" ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            save()
        for n in settings["passkey_lengths"]:
            r = long_context_report(model=model, tokenizer=tok, tokens=None, windows_of=[], passkey_lengths=[n],
                                    trials=args.trials, seed=args.seed)
            entry["passkey"] += r["passkey"]
            print(f"{label}: passkey {n}: {r['passkey'][0]['correct']}/{args.trials} ({time.time() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
            save()
        entry["seconds"], entry["complete"] = round(time.time() - t0, 1), True
        save()
        del model
    shown = {k: results[k] for k in models}
    if args.plot and "source" in shown:
        _plot(shown, args.plot, "source")
    print(render_long_context(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
