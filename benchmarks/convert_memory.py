"""Streaming-conversion benchmark: peak RSS and time per layer on a synthetic checkpoint of real width.

Builds (once) a random bf16 LlamaForCausalLM checkpoint with Llama-2-7B widths (hidden 4096, 32 heads × 128,
intermediate 11008, vocab 32000) and a few layers, written tensor by tensor as safetensors, then converts it at
512+64 in a child process and reports the child's peak RSS and the time per layer.

    python benchmarks/convert_memory.py [--layers 4] [--rank 512] [--rope-dim 64] [--work-dir DIR]
    python benchmarks/convert_memory.py --tokenizer SMOLLM2_DIR --calibration TEXT --device cuda   # calibrated, on a GPU

Targets (issue: streaming): peak RSS ≤ 2.5 GB for 4 layers, ≤ 15 s per layer on 2 cores. With --calibration the
checkpoint gets the tokenizer of --tokenizer (and its vocabulary size) and the conversion is the calibrated default
method on --device; the peak GPU memory is reported too.
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
SHAPE = dict(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)


def build_checkpoint(path: Path, layers: int, seed: int = 0, vocab: int | None = None) -> None:
    """Write a random bf16 Llama checkpoint one layer per shard, never holding more than one layer."""
    import torch
    from safetensors.torch import save_file

    if (path / "model.safetensors.index.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h, hd, nh, nkv, inter = (SHAPE[k] for k in ("hidden", "head_dim", "heads", "kv_heads", "intermediate"))
    vocab = vocab or SHAPE["vocab"]

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    weight_map = {}
    shards = [{"model.embed_tokens.weight": rnd(vocab, h), "lm_head.weight": rnd(vocab, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(nkv * hd, h),
                       p + "self_attn.v_proj.weight": rnd(nkv * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
                       p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
                       p + "mlp.down_proj.weight": rnd(h, inter),
                       p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    for j in range(len(shards)):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shards[j], str(path / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in shards[j]})
        shards[j] = None
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
              "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": hd, "num_hidden_layers": layers,
              "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
              "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def child(job: dict) -> None:
    import torch

    import mha2mla

    t = time.time()
    kw = {}
    if job.get("calibration"):
        kw = dict(calibration=job["calibration"], calibration_samples=job["samples"], device=job["device"])
    res = mha2mla.convert(source=job["source"], output=job["output"], rank=job["rank"], rope_dim=job["rope_dim"],
                          force=True, progress=False, **kw)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    print(json.dumps({"seconds": time.time() - t, "peak_rss_bytes": peak, "peak_gpu_bytes": gpu,
                      "layer_seconds": [layer["seconds"] for layer in res.record["layers"]]}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mha2mla-membench"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert_memory.json"))
    p.add_argument("--tokenizer", help="a model directory whose tokenizer the checkpoint gets (needed by --calibration)")
    p.add_argument("--calibration", help="calibration text: the calibrated default method instead of data-free")
    p.add_argument("--samples", type=int, default=48, help="calibration sequences of 512 tokens (default 48)")
    p.add_argument("--device", default="cpu", help="where calibration runs (default cpu)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.calibration and not args.tokenizer:
        p.error("--calibration needs --tokenizer (a directory with tokenizer.json)")
    work = Path(args.work_dir)
    vocab = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    src = work / (f"llama2-7b-width-{args.layers}l" + ("" if vocab is None else f"-v{vocab}"))
    print(f"building synthetic checkpoint {src} ...", file=sys.stderr, flush=True)
    build_checkpoint(src, args.layers, vocab=vocab)
    if args.tokenizer:
        import shutil

        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(args.tokenizer) / name).exists():
                shutil.copy(Path(args.tokenizer) / name, src / name)
    out = work / "converted"
    job = dict(source=str(src), output=str(out), rank=args.rank, rope_dim=args.rope_dim, calibration=args.calibration,
               samples=args.samples, device=args.device)
    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    print("converting in a child process ...", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        return r.returncode
    res = json.loads(r.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    per = res["layer_seconds"]
    rows = [("layers", args.layers), ("source checkpoint size", f"{size / 1e9:.2f} GB"),
            ("rank + rope", f"{args.rank}+{args.rope_dim}"), ("wall time", f"{res['seconds']:.1f} s"),
            ("time per layer (mean / max)", f"{sum(per) / len(per):.2f} s / {max(per):.2f} s"),
            ("method", f"calibrated ({args.samples} sequences, {args.device})" if args.calibration else "data-free"),
            ("peak RSS", f"{res['peak_rss_bytes'] / 1e9:.2f} GB"),
            ("peak GPU memory", "–" if res.get("peak_gpu_bytes") is None else f"{res['peak_gpu_bytes'] / 1e9:.2f} GB"),
            ("target", "peak RSS ≤ 2.5 GB, ≤ 15 s per layer")]
    print("| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"shape": SHAPE, "layers": args.layers, "rank": args.rank, "rope_dim": args.rope_dim,
                   "calibration": args.calibration, "samples": args.samples, "device": args.device, "vocab": vocab,
                   "source_bytes": size, **res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
