"""Conversion at real sizes: seconds per layer, peak host RSS and peak GPU memory on random checkpoints of real shapes.

Builds (once per shape and layer count) a random bf16 checkpoint with the widths of a real model — Llama-3-8B,
Qwen2.5-7B (with its q/k/v biases), Llama-3-70B, or Llama-2-7B — written layer by layer as safetensors (never more than
one layer in memory), then converts it in a child process and reports the child's time per layer (mean, max), its peak
RSS and, on a GPU, its peak allocated GPU memory. Random weights: the numbers are speed and memory, not quality.

    python benchmarks/convert_scale.py --shape llama3-8b --layers 1 --tokenizer SMOLLM2_DIR --calibration TEXT --json OUT
    python benchmarks/convert_scale.py --shape llama3-70b --layers 1 --tokenizer ... --calibration ... --device cuda
    python benchmarks/convert_scale.py --shape llama2-7b --layers 4             # data-free streaming (no tokenizer)

With --calibration the checkpoint gets the tokenizer of --tokenizer (any tokenizer with at most the shape's vocabulary
works: its ids only index the embedding), and the conversion is the calibrated default method (the default calibration
sequences unless --samples) on --device. Targets (issue: real sizes): CPU, one llama3-8b layer calibrated ≤ 3 min at
≤ 6 GB peak RSS; one H100/H200: llama3-8b ≤ 6 s per layer at ≤ 24 GB GPU and ≤ 8 GB RSS, one llama3-70b layer ≤ 30 s
at ≤ 60 GB GPU and ≤ 16 GB RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
SHAPES = {
    "llama2-7b": dict(arch="llama", hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000,
                      theta=10000.0, max_pos=4096, rope_scaling=None, bias=False, eps=1e-5),
    "llama3-8b": dict(arch="llama", hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
                      theta=500000.0, max_pos=131072, rope_scaling=_LLAMA3_ROPE, bias=False, eps=1e-5),
    "qwen2.5-7b": dict(arch="qwen2", hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064,
                       theta=1000000.0, max_pos=32768, rope_scaling=None, bias=True, eps=1e-6),
    "llama3-70b": dict(arch="llama", hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672, vocab=128256,
                       theta=500000.0, max_pos=131072, rope_scaling=_LLAMA3_ROPE, bias=False, eps=1e-5),
}


def build_checkpoint(path: Path, shape: str, layers: int, seed: int = 0) -> None:
    """Write a random bf16 checkpoint of ``shape``, one layer per shard, never holding more than one layer."""
    import torch
    from safetensors.torch import save_file

    if (path / "model.safetensors.index.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    h, hd, nh, nkv, inter, vocab = (s[k] for k in ("hidden", "head_dim", "heads", "kv_heads", "intermediate", "vocab"))

    def rnd(*size, std=0.02):
        return (torch.randn(*size, generator=g) * std).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map = {}
    n_shards = layers + 1
    for j in range(n_shards):
        if j == 0:
            shard = {"model.embed_tokens.weight": rnd(vocab, h), "lm_head.weight": rnd(vocab, h), "model.norm.weight": ones(h)}
        else:
            p = f"model.layers.{j - 1}."
            shard = {p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(nkv * hd, h),
                     p + "self_attn.v_proj.weight": rnd(nkv * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
                     p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
                     p + "mlp.down_proj.weight": rnd(h, inter),
                     p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h)}
            if s["bias"]:
                shard.update({p + "self_attn.q_proj.bias": rnd(nh * hd, std=0.5), p + "self_attn.k_proj.bias": rnd(nkv * hd, std=0.5),
                              p + "self_attn.v_proj.bias": rnd(nkv * hd, std=0.05)})
        name = f"model-{j + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in shard})
        del shard
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[s["arch"]]
    config = {"architectures": [arch], "model_type": s["arch"], "hidden_size": h, "intermediate_size": inter,
              "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": hd, "num_hidden_layers": layers,
              "vocab_size": vocab, "rms_norm_eps": s["eps"], "rope_theta": s["theta"], "rope_scaling": s["rope_scaling"],
              "max_position_embeddings": s["max_pos"], "tie_word_embeddings": False, "hidden_act": "silu",
              "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def child(job: dict) -> None:
    import torch

    import mha2mla

    t = time.time()
    kw = {}
    if job.get("calibration"):
        kw = dict(calibration=job["calibration"], device=job["device"])
        if job.get("samples"):
            kw["calibration_samples"] = job["samples"]
    res = mha2mla.convert(source=job["source"], output=job["output"], rank=job["rank"], rope_dim=job["rope_dim"],
                          force=True, progress=job["progress"], **kw)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    print(json.dumps({"seconds": time.time() - t, "peak_rss_bytes": peak, "peak_gpu_bytes": gpu,
                      "layer_seconds": [layer["seconds"] for layer in res.record["layers"]],
                      "calibration": (res.record.get("calibration") or {}).get("samples")}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mha2mla-scalebench"))
    p.add_argument("--json", dest="out", help="write the results here (default benchmarks/results/convert-scale-SHAPE.json)")
    p.add_argument("--tokenizer", help="a model directory whose tokenizer the checkpoint gets (needed by --calibration)")
    p.add_argument("--calibration", help="calibration text: the calibrated default method instead of data-free")
    p.add_argument("--samples", type=int, default=None, help="calibration sequences (default: convert's default)")
    p.add_argument("--device", default="cpu", help="where calibration runs (default cpu)")
    p.add_argument("--progress", action="store_true", help="show the conversion's progress bar")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.calibration and not args.tokenizer:
        p.error("--calibration needs --tokenizer (a directory with tokenizer.json)")
    out_json = args.out or str(ROOT / "benchmarks" / "results" / f"convert-scale-{args.shape}.json")
    work = Path(args.work_dir)
    src = work / f"{args.shape}-{args.layers}l"
    print(f"building synthetic checkpoint {src} ...", file=sys.stderr, flush=True)
    build_checkpoint(src, args.shape, args.layers)
    if args.tokenizer:
        import shutil

        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(args.tokenizer) / name).exists():
                shutil.copy(Path(args.tokenizer) / name, src / name)
    out = work / "converted"
    job = dict(source=str(src), output=str(out), rank=args.rank, rope_dim=args.rope_dim, calibration=args.calibration,
               samples=args.samples, device=args.device, progress=args.progress)
    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    print("converting in a child process ...", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode:
        return r.returncode
    res = json.loads(r.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    per = res["layer_seconds"]
    rows = [("shape", f"{args.shape} ({args.layers} layer{'s' if args.layers > 1 else ''})"),
            ("source checkpoint size", f"{size / 1e9:.2f} GB"),
            ("rank + rope", f"{args.rank}+{args.rope_dim}"), ("wall time", f"{res['seconds']:.1f} s"),
            ("time per layer (mean / max)", f"{sum(per) / len(per):.2f} s / {max(per):.2f} s"),
            ("method", f"calibrated ({res['calibration']} sequences, {args.device})" if args.calibration else "data-free"),
            ("peak RSS", f"{res['peak_rss_bytes'] / 1e9:.2f} GB"),
            ("peak GPU memory", "–" if res.get("peak_gpu_bytes") is None else f"{res['peak_gpu_bytes'] / 1e9:.2f} GB")]
    print("| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w") as f:
        json.dump({"shape": args.shape, "dims": SHAPES[args.shape], "layers": args.layers, "rank": args.rank,
                   "rope_dim": args.rope_dim, "calibration": args.calibration, "device": args.device,
                   "source_bytes": size, "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, **res},
                  f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
