"""A source with attention biases (Qwen2): calibrated, its biases are absorbed into bias-free projections by default
(vLLM and SGLang build DeepSeek attention without biases); ``--biases keep`` carries them (exact, transformers only)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import mha2mla
from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.plan import make_plan
from mha2mla.errors import Mha2mlaError
from tests.conftest import assert_user_error, convert_cli, held_out_error, load_json


def _biased(tiny_source, scale: float = 8.0) -> str:
    """A tiny Qwen2 whose q/k/v biases are ``scale`` times the random ones (comparable to the projections)."""
    path = tiny_source("qwen", arch="qwen2", n_heads=4, n_kv=2, head_dim=16, layers=2, eps=1e-6, tied=False)
    file = os.path.join(path, "model.safetensors")
    tensors = {n: t * scale if n.endswith("_proj.bias") else t for n, t in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def _without_biases(src_dir: str, out_dir: str) -> str:
    """``src_dir``'s kept-bias conversion with its attention biases deleted: what an engine that skips them runs."""
    os.makedirs(out_dir)
    for name in os.listdir(src_dir):
        full = os.path.join(src_dir, name)
        if name.endswith(".safetensors"):
            save_file({n: t for n, t in load_file(full).items() if not n.endswith(".bias")},
                      os.path.join(out_dir, name), metadata={"format": "pt"})
        elif name == "config.json":
            cfg = load_json(full)
            cfg["attention_bias"] = False
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(cfg, f)
        elif os.path.isfile(full) and name != "model.safetensors.index.json":
            with open(full, "rb") as a, open(os.path.join(out_dir, name), "wb") as b:
                b.write(a.read())
    index = load_json(os.path.join(src_dir, "model.safetensors.index.json"))
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if not n.endswith(".bias")}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return out_dir


def test_absorbed_biases_beat_dropping_them_and_serve_bias_free(tiny_source, tmp_path, corpus):
    src = _biased(tiny_source)
    kw = dict(rank=24, rope_dim=8, calibration=corpus, calibration_samples=8, calibration_length=64, dtype="float32",
              progress=False, method=mha2mla.Method(mlp_dtype="float32", query_fit_context=0))
    absorbed = mha2mla.convert(source=src, output=str(tmp_path / "absorbed"), **kw)
    kept = mha2mla.convert(source=src, output=str(tmp_path / "kept"), biases="keep", **kw)
    cfg = load_json(tmp_path / "absorbed" / "config.json")
    assert cfg["attention_bias"] is False and cfg["q_lora_rank"] is None
    names = load_json(tmp_path / "absorbed" / "model.safetensors.index.json")["weight_map"]
    assert not [n for n in names if n.endswith(".bias")] and "model.layers.0.self_attn.q_proj.weight" in names
    assert not absorbed.record["portability"]["blockers"]
    assert absorbed.record["options"]["biases"] == "auto" and kept.record["plan"]["attention_bias"] is True
    assert any("bias" in b for b in kept.record["portability"]["blockers"])
    dropped = _without_biases(str(tmp_path / "kept"), str(tmp_path / "dropped"))
    e_kept, e_absorbed, e_dropped = (held_out_error(src, str(tmp_path / d)) for d in ("kept", "absorbed", "dropped"))
    assert e_absorbed < 0.7 * e_dropped, (e_kept, e_absorbed, e_dropped)
    assert "attention biases (q, k, v) are absorbed into bias-free projections" in (
        tmp_path / "absorbed" / "README.md").read_text()
    assert "attention biases (q, k, v) are carried over" in (tmp_path / "kept" / "README.md").read_text()


def test_biases_are_kept_without_calibration_and_absorb_needs_it(tiny_source, tmp_path):
    src = _biased(tiny_source)
    plan = make_plan(source=load_source(src), rank=12, rope_dim=8)  # data-free: nothing to fit them on
    assert plan.attention_bias is True and plan.q_lora_rank == 64
    with pytest.raises(Mha2mlaError, match="--biases absorb fits bias-free projections on calibration data"):
        make_plan(source=load_source(src), rank=12, rope_dim=8, biases="absorb")
    r = convert_cli(src, tmp_path / "out", "--biases", "absorb")
    assert_user_error(r, "--biases absorb fits bias-free projections on calibration data: add --calibration",
                      out=tmp_path / "out")
