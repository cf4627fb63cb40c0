"""Healing benchmark: SmolLM2-135M converted at −67 % KV cache, then healed on a CPU budget.

    python benchmarks/heal.py --threads 1           # 300k tokens per healing run: hours on 2 cores
    python benchmarks/heal.py --tokens 2048 --seq-len 256 --micro-batch 2 --eval-tokens 2048 --eval-ctx 256 \
        --ablation-steps 2 --threads 1 --out /tmp/heal-smoke.json          # smoke run, ~5 minutes

Cost on a 2-core CPU shared with other jobs (torch at 1 thread): a training step of 512 tokens takes ~20 s
(~25 s with the teacher), so the default 300k tokens is roughly 3–4 h per healing run, ~8 h in all.

1. Convert SmolLM2-135M with ``mha2mla.convert(rank=96, rope_dim=32)`` (KV values per token and layer 384 → 128).
2. Perplexity of the source and of the converted model on enwiki.test (fixed windows, ``mha2mla.eval.perplexity``).
3. Heal twice on enwiki.train with the same data, steps and learning rate: cross-entropy alone, and mixed with
   distillation from the source (``--teacher``). Perplexity after each, and the share of the gap recovered,
   measured on the mean NLL: ``(nll_converted − nll_healed) / (nll_converted − nll_source)``.
4. Continuity: the loss of step 0 against the converted model's loss on the same batch, and the early losses.
   Ablation (``--ablation-steps``): the first steps of the cross-entropy run again with ``latent_rescale: false``,
   i.e. Adam on the tiny latent rows as they are stored, to show what the rescaling prevents.

Prints Markdown tables and writes benchmarks/results/heal.json (and heal.png, the loss curves).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = Path(os.environ.get("MHA2MLA_ASSETS", "/work/assets"))


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(ASSETS / "models" / "smollm2-135m"))
    p.add_argument("--train", default=str(ASSETS / "text" / "enwiki.train.txt"))
    p.add_argument("--test", default=str(ASSETS / "text" / "enwiki.test.txt"))
    p.add_argument("--work", default="/tmp/mha2mla-bench-heal", help="Scratch directory for the checkpoints.")
    p.add_argument("--tokens", type=int, default=300_000, help="Training tokens per healing run.")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-tokens", type=int, default=16384, help="Test tokens for perplexity.")
    p.add_argument("--eval-ctx", type=int, default=512)
    p.add_argument("--ablation-steps", type=int, default=10, help="0 skips the no-rescale ablation.")
    p.add_argument("--calibration", default=None, help="calibration text for the conversion (default: data-free)")
    p.add_argument("--rank", type=int, default=96)
    p.add_argument("--rope-dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    p.add_argument("--reuse", action="store_true", help="Reuse WORK/mla if it was converted already.")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "heal.json"))
    return p.parse_args(argv)


def _ppl(path: str, text: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mha2mla.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    t = time.time()
    r = perplexity(model=model, tokenizer=tok, text=text, ctx=args.eval_ctx, max_tokens=args.eval_tokens)
    return {**r.to_dict(), "seconds": round(time.time() - t, 1)}


def _early(rec: dict, n: int = 10) -> dict:
    losses, gn = rec["losses"][:n], [g for g in rec["grad_norm"][:n] if g is not None]
    return {
        "step0_loss": rec["losses"][0],
        "converted_loss_same_batch": rec["step0"]["converted_loss"],
        "step0_abs_diff": abs(rec["losses"][0] - rec["step0"]["converted_loss"]),
        "max_early_loss_over_step0": max(losses) / rec["losses"][0],
        "max_early_grad_norm": max(gn) if gn else None,
        "early_losses": losses,
    }


def _plot(path: str, curves: dict[str, list[float]]) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, ys in curves.items():
        ax.plot(range(len(ys)), ys, lw=1.2, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy part)")
    ax.set_title("Healing SmolLM2-135M after conversion to MLA (−67 % KV)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    import torch

    import mha2mla
    from mha2mla.heal.loop import heal

    if args.threads:
        torch.set_num_threads(args.threads)
    for f in (args.source, args.train, args.test):
        if not os.path.exists(f):
            sys.exit(f"error: {f} does not exist (set MHA2MLA_ASSETS or pass --source/--train/--test)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mla, times = work / "mla", {}
    test_text = Path(args.test).read_text(encoding="utf-8")

    t = time.time()
    if not (args.reuse and (mla / "config.json").exists()):
        mha2mla.convert(source=args.source, output=str(mla), rank=args.rank, rope_dim=args.rope_dim, force=True,
                        progress=False, calibration=args.calibration)
    times["convert"] = round(time.time() - t, 1)
    conv_record = json.loads((mla / "mha2mla.json").read_text())

    tokens_per_step = args.seq_len * args.micro_batch
    steps = max(1, args.tokens // tokens_per_step)
    recipe = dict(seq_len=args.seq_len, micro_batch_size=args.micro_batch, max_steps=steps, lr=args.lr,
                  warmup_steps=max(1, min(steps // 2, max(3, steps // 10))), schedule="cosine", min_lr_ratio=0.1, max_grad_norm=1.0,
                  distill_alpha=args.distill_alpha, distill_temperature=args.temperature, log_every=10,
                  max_data_tokens=max(steps * tokens_per_step * 2, 65536))
    runs = {"ce": {}, "distill": {"teacher": args.source}}
    records = {}
    for name, extra in runs.items():
        t = time.time()
        records[name] = heal(model=str(mla), output=str(work / f"healed-{name}"), data=args.train, recipe=recipe,
                             force=True, **extra)
        times[f"heal_{name}"] = round(time.time() - t, 1)
    ablation = None
    if args.ablation_steps:
        n = min(args.ablation_steps, steps)
        t = time.time()
        ab = _run_prefix(heal, mla, work, args, recipe, n, records["ce"]["step0"]["converted_loss"])
        times["ablation"] = round(time.time() - t, 1)
        ablation = {"steps": n, "no_rescale": _early(ab, n), "with_rescale": _early(records["ce"], n)}

    ppl = {}
    for name, path in [("source", args.source), ("converted", str(mla)), ("healed-ce", str(work / "healed-ce")),
                       ("healed-distill", str(work / "healed-distill"))]:
        ppl[name] = _ppl(path, test_text, args)
    gap = ppl["converted"]["nll"] - ppl["source"]["nll"]
    for name in ("healed-ce", "healed-distill"):
        ppl[name]["gap_recovered"] = (ppl["converted"]["nll"] - ppl[name]["nll"]) / gap if gap > 0 else None

    kv = conv_record.get("kv_cache", {})
    result = {
        "args": vars(args),
        "recipe": recipe,
        "kv_cache": kv,
        "perplexity": ppl,
        "continuity": {name: _early(rec) for name, rec in records.items()},
        "ablation": ablation,
        "heal": {name: {k: rec[k] for k in ("steps", "tokens", "losses", "ce", "kd", "grad_norm", "lr", "seconds",
                                            "latent_scales")} for name, rec in records.items()},
        "seconds": times,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _plot(str(out.with_suffix(".png")), {"cross-entropy": records["ce"]["ce"], "distillation (CE part)": records["distill"]["ce"]})
    _print(result, records, ablation, args)
    return result


def _run_prefix(heal, mla, work, args, recipe, n, converted_loss):
    """The first n steps of the cross-entropy run (same data and schedule) with latent_rescale off."""

    class Stop(Exception):
        pass

    hist = {"losses": [], "grad_norm": []}

    def record(step, info):
        hist["losses"].append(info["loss"])
        hist["grad_norm"].append(info["grad_norm"])
        if step >= n:
            raise Stop

    try:
        heal(model=str(mla), output=str(work / "ablation-no-rescale"), data=args.train, recipe=recipe,
             latent_rescale=False, force=True, on_step=record)
    except Stop:
        pass  # heal removes the unfinished output
    return {**hist, "step0": {"converted_loss": converted_loss}}


def _print(result, records, ablation, args):
    ppl, kv = result["perplexity"], result["kv_cache"]
    src_kv, mla_kv = kv.get("source_values_per_token_per_layer", "?"), kv.get("mla_values_per_token_per_layer", "?")
    print(f"\n### Healing SmolLM2-135M at −{kv.get('saving', 0) * 100:.0f} % KV cache "
          f"({records['ce']['tokens']:,} training tokens per run, enwiki.test {args.eval_tokens:,} tokens, ctx {args.eval_ctx})\n")
    print("| model | KV values/token/layer | test ppl | bits/byte | NLL gap recovered | heal time |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [("source", "source", src_kv, None), ("converted", "converted (no healing)", mla_kv, None),
            ("healed-ce", "healed, cross-entropy", mla_kv, "heal_ce"),
            ("healed-distill", f"healed, CE + distillation (α {args.distill_alpha})", mla_kv, "heal_distill")]
    for key, label, kvv, tkey in rows:
        r = ppl[key]
        rec = "" if r.get("gap_recovered") is None else f"{r['gap_recovered'] * 100:.1f} %"
        tt = f"{result['seconds'][tkey]:.0f} s" if tkey else ""
        print(f"| {label} | {kvv} | {r['ppl']:.2f} | {r['bits_per_byte']:.3f} | {rec} | {tt} |")
    print("\n| run | step-0 loss | converted model, same batch | abs diff | max loss steps 1–10 / step 0 | max grad norm steps 1–10 |")
    print("|---|---:|---:|---:|---:|---:|")
    lines = [(f"{n}", c) for n, c in result["continuity"].items()]
    if ablation:
        lines.append((f"ce, latent_rescale off ({ablation['steps']} steps)", ablation["no_rescale"]))
    for name, c in lines:
        gn = "-" if c["max_early_grad_norm"] is None else f"{c['max_early_grad_norm']:.3g}"
        print(f"| {name} | {c['step0_loss']:.6f} | {c['converted_loss_same_batch']:.6f} | {c['step0_abs_diff']:.1e} | "
              f"{c['max_early_loss_over_step0']:.3f} | {gn} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
