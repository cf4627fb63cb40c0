"""Inference benchmark: source Llama vs converted DeepseekV3 (stock attention) vs converted with weight absorption.

    python benchmarks/inference.py                                   # tiny + SmolLM2-135M shapes, 1k/4k, 32 tokens
    python benchmarks/inference.py --contexts 1024,4096,8192 --configs smollm2
    python benchmarks/inference.py --source SRC_DIR --converted MLA_DIR --dtype bfloat16
    python benchmarks/inference.py --device cuda --dtype bfloat16 --configs smollm2,llama2-7b --contexts 4096,16384

Each (model, context) runs in its own subprocess so that peak RSS is per model. Measured on CPU: cache bytes actually
held after prefill + decode (sum of the cache tensors), peak RSS, prefill time, greedy decode tokens/s (from the
median decode step, so that other processes competing for the cores distort it less). Prints a
Markdown table with ratios against the source and writes benchmarks/results/inference.json. With --device cuda
the models are built on the GPU, the timings synchronise the device, and the memory columns are the GPU's (peak
allocated, and allocated after load) instead of the process RSS. Without --source and
--converted the models are random-initialised with the right shapes (speed and memory do not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("source", "stock", "absorbed")
LABELS = {"source": "source (Llama)", "stock": "converted, stock MLA", "absorbed": "converted, absorbed MLA"}

# Shapes: the source Llama and the converted DeepseekV3 (kv_lora_rank 96, qk_rope_head_dim 32, qk_nope = v = 64).
SHAPES = {
    "tiny": dict(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=4,
        intermediate_size=512, vocab_size=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    ),
    "smollm2": dict(  # SmolLM2-135M's config
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_hidden_layers=30,
        intermediate_size=1536, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "llama2-7b": dict(  # Llama-2-7B's config (MHA, 32 heads × 128)
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128, num_hidden_layers=32,
        intermediate_size=11008, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    ),
}
# The converted shapes' latent: kv_lora_rank + qk_rope_head_dim (SmolLM2 at −67 % KV, Llama-2-7B at DeepSeek's 512+64).
LATENT = {"tiny": (96, 32), "smollm2": (96, 32), "llama2-7b": (512, 64)}

# Analytic shapes for the printed cache-per-token table (bf16, 512 + 64 latent as in DeepSeek-V2/V3).
ANALYTIC = {
    "Llama-2-7B": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128),
    "Llama-3-8B": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


# --------------------------------------------------------------------------------------------------------------
# worker: one model, one context, in its own process


def _source_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, max_position_embeddings=16384)


def _converted_config(name: str):
    from transformers import DeepseekV3Config

    rank, rope = LATENT[name]
    s = dict(SHAPES[name])
    head_dim = s.pop("head_dim")
    layers = s["num_hidden_layers"]
    s.update(
        num_key_value_heads=s["num_attention_heads"], q_lora_rank=None, kv_lora_rank=rank,
        qk_rope_head_dim=rope, qk_nope_head_dim=head_dim, v_head_dim=head_dim, first_k_dense_replace=layers,
        rope_interleave=True, rms_norm_eps=1e-6, max_position_embeddings=16384,
        tie_word_embeddings=False,  # the conversion unties lm_head when it rescales a source eps of 1e-5 to 1e-6
    )
    return DeepseekV3Config(**s)


def _build(job: dict):
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM, LlamaForCausalLM

    dtype, device = getattr(torch, job["dtype"]), torch.device(job.get("device", "cpu"))
    if job.get("path"):
        model = AutoModelForCausalLM.from_pretrained(job["path"], dtype=dtype, device_map=device)
    else:
        torch.manual_seed(0)  # stock and absorbed get the same weights
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype on the target device: a 7B fp32 copy is 27 GB
        try:
            with device:
                if job["variant"] == "source":
                    model = LlamaForCausalLM(_source_config(SHAPES[job["config"]]))
                else:
                    model = DeepseekV3ForCausalLM(_converted_config(job["config"]))
        finally:
            torch.set_default_dtype(previous)
        model = model.to(dtype)
    model.eval()
    if job["variant"] == "absorbed":
        from mha2mla.serve.absorbed import absorb

        absorb(model)
    return model


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if hasattr(value, "element_size") and hasattr(value, "numel"):
                total += value.numel() * value.element_size()
    return total


def _rss_now() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover
        return 0


def worker(job: dict) -> dict:
    import torch
    from transformers import DynamicCache

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    cuda = job.get("device", "cpu").startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = _build(job)
    sync()
    rss_loaded = torch.cuda.memory_allocated() if cuda else _rss_now()
    vocab = job["vocab"]
    gen = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, vocab, (1, job["context"]), generator=gen).to(model.device)

    def run(ids, steps):
        cache = DynamicCache(config=model.config)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens, step_s = [int(tok)], []  # int() waits for the device
        t1 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(tok))
            step_s.append(time.perf_counter() - t)
        return cache, tokens, t1 - t0, step_s

    with torch.inference_mode():
        run(prompt[:, :32], 2)  # warm-up: first-call allocations and kernel selection
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cache, tokens, prefill_s, step_s = run(prompt, job["new_tokens"])
        cache_bytes = _cache_bytes(cache)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    from mha2mla.serve.kvcache import kv_cache_bytes

    cached_tokens = job["context"] + job["new_tokens"]
    elem = torch.empty((), dtype=getattr(torch, job["dtype"])).element_size()
    return dict(
        config=job["config"], variant=job["variant"], context=job["context"], new_tokens=job["new_tokens"],
        dtype=job["dtype"], params=sum(p.numel() for p in model.parameters()), prefill_s=prefill_s,
        # the median step, robust to other processes competing for the cores; the mean as well
        decode_tok_s=1.0 / statistics.median(step_s), decode_tok_s_mean=len(step_s) / sum(step_s),
        cache_bytes=cache_bytes,
        cache_bytes_analytic=kv_cache_bytes(model.config, context=cached_tokens, bytes_per_value=elem),
        rss_after_load_bytes=rss_loaded, peak_rss_bytes=peak, tokens=tokens, torch_threads=torch.get_num_threads(),
        device=job.get("device", "cpu"), memory="gpu allocated" if cuda else "process rss",
    )


# --------------------------------------------------------------------------------------------------------------
# driver


def _run_job(job: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {job}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _table(runs: list[dict]) -> str:
    mem = "GPU" if runs and runs[0].get("memory") == "gpu allocated" else "RSS"
    lines = [
        "| config | ctx | model | prefill s | decode tok/s | ×source | ×stock | cache MiB | cache ×source "
        f"| analytic ×source | peak {mem} MiB | {mem} after load MiB | greedy = stock |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in runs:
        key = (r["config"], r["context"])
        src = next(x for x in runs if (x["config"], x["context"]) == key and x["variant"] == "source")
        stock = next((x for x in runs if (x["config"], x["context"]) == key and x["variant"] == "stock"), None)
        vs_stock = f"{r['decode_tok_s'] / stock['decode_tok_s']:.2f}" if stock else "–"
        same = "–" if r["variant"] != "absorbed" or not stock else "yes" if r["tokens"] == stock["tokens"] else "no"
        cells = [
            r["config"], r["context"], LABELS[r["variant"]], f"{r['prefill_s']:.2f}", f"{r['decode_tok_s']:.1f}",
            f"{r['decode_tok_s'] / src['decode_tok_s']:.2f}", vs_stock, _mib(r["cache_bytes"]),
            f"{r['cache_bytes'] / src['cache_bytes']:.3f}",
            f"{r['cache_bytes_analytic'] / src['cache_bytes_analytic']:.3f}",
            _mib(r["peak_rss_bytes"]), _mib(r["rss_after_load_bytes"]), same,
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _targets(runs: list[dict]) -> list[dict]:
    """Decode ≥ 2× stock and ≥ 1× source at 4k (else the largest context run); cache ≤ analytic ratio + 5 %."""
    out = []
    for config in dict.fromkeys(r["config"] for r in runs):
        mine = [r for r in runs if r["config"] == config]
        contexts = sorted({r["context"] for r in mine})
        ctx = 4096 if 4096 in contexts else contexts[-1]
        get = {r["variant"]: r for r in mine if r["context"] == ctx}
        if not {"source", "stock", "absorbed"} <= set(get):
            continue
        a, s, src = get["absorbed"], get["stock"], get["source"]
        ratio = a["cache_bytes"] / src["cache_bytes"]
        bound = (a["cache_bytes_analytic"] / src["cache_bytes_analytic"]) * 1.05
        out += [
            dict(config=config, context=ctx, target="absorbed decode ≥ 2× stock MLA",
                 value=a["decode_tok_s"] / s["decode_tok_s"], bound=2.0, ok=a["decode_tok_s"] >= 2 * s["decode_tok_s"]),
            dict(config=config, context=ctx, target="absorbed decode ≥ 1.0× source",
                 value=a["decode_tok_s"] / src["decode_tok_s"], bound=1.0, ok=a["decode_tok_s"] >= src["decode_tok_s"]),
            dict(config=config, context=ctx, target="cache bytes ≤ (rank+rope)/(2·n_kv·head_dim) of source + 5 %",
                 value=ratio, bound=bound, ok=ratio <= bound),
        ]
    return out


def _analytic_table() -> tuple[str, list[dict]]:
    from mha2mla.serve.kvcache import kv_values_per_token_per_layer

    rows, lines = [], [
        "| shape | source values/token/layer | MLA 512+64 | source KiB/token (bf16) | MLA KiB/token | ratio | "
        "source GiB @ 8k | MLA GiB @ 8k |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, cfg in ANALYTIC.items():
        mla = dict(cfg, kv_lora_rank=512, qk_rope_head_dim=64)
        src_v, mla_v = kv_values_per_token_per_layer(cfg), kv_values_per_token_per_layer(mla)
        layers = cfg["num_hidden_layers"]
        src_b, mla_b = src_v * layers * 2, mla_v * layers * 2
        rows.append(dict(shape=name, source_values=src_v, mla_values=mla_v, source_bytes_per_token=src_b,
                         mla_bytes_per_token=mla_b, ratio=mla_b / src_b))
        lines.append(f"| {name} | {src_v} | {mla_v} | {src_b / 1024:.0f} | {mla_b / 1024:.0f} | {mla_b / src_b:.3f} "
                     f"| {src_b * 8192 / 2**30:.2f} | {mla_b * 8192 / 2**30:.2f} |")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,4096", help="comma-separated prompt lengths (default 1024,4096)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps after the prompt (default 32)")
    p.add_argument("--configs", default="tiny,smollm2", help="random-initialised shapes: tiny, smollm2, llama2-7b")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--source", help="a real source checkpoint directory (with --converted)")
    p.add_argument("--converted", help="its mha2mla-converted DeepseekV3 directory (with --source)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (default 1: on a shared CPU, OpenMP threads that lose their core "
                        "stall each other and make small kernels 10-100x slower; 0 = torch's choice)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inference.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if bool(args.source) != bool(args.converted):
        p.error("--source and --converted go together")

    contexts = [int(c) for c in args.contexts.split(",") if c]
    common = dict(new_tokens=args.new_tokens, dtype=args.dtype, threads=args.threads, device=args.device)
    if args.source:
        from transformers import AutoConfig

        vocab = min(AutoConfig.from_pretrained(d).vocab_size for d in (args.source, args.converted))
        plans = [("checkpoint", {"source": args.source, "stock": args.converted, "absorbed": args.converted}, vocab)]
    else:
        names = [c for c in args.configs.split(",") if c]
        unknown = set(names) - set(SHAPES)
        if unknown:
            p.error(f"unknown --configs {sorted(unknown)}; choose from {sorted(SHAPES)}")
        plans = [(c, {v: None for v in VARIANTS}, SHAPES[c]["vocab_size"]) for c in names]

    runs = []
    for config, paths, vocab in plans:
        for ctx in contexts:
            for variant in VARIANTS:
                job = dict(common, config=config, variant=variant, context=ctx, vocab=vocab, path=paths[variant])
                t0 = time.perf_counter()
                runs.append(_run_job(job))
                print(f"  {config} ctx={ctx} {variant}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    table, targets = _table(runs), _targets(runs)
    analytic_md, analytic = _analytic_table()
    print(table)
    print()
    for t in targets:
        print(f"- {t['config']} @ {t['context']}: {t['target']}: {t['value']:.3f} (bound {t['bound']:.3f}) "
              f"{'PASS' if t['ok'] else 'FAIL'}")
    print()
    print("Analytic KV cache per token (bf16), source vs MLA kv_lora_rank 512 + qk_rope_head_dim 64:")
    print(analytic_md)

    import torch
    import transformers

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                machine=platform.machine(), cpu_count=os.cpu_count(), time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                device=args.device, latent={c: LATENT[c] for c in SHAPES})
    out.write_text(json.dumps(dict(meta=meta, runs=runs, targets=targets, analytic=analytic), indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
