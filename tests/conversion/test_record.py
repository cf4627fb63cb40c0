"""The conversion record ``mha2mla.json`` and the model card (:mod:`mha2mla.conversion.record`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
from safetensors import safe_open

import mha2mla
from mha2mla.conversion.options import Method
from tests.conftest import load_json


def _strict_json(path) -> dict:
    """The file parsed as strict JSON: NaN and Infinity (which Python's json writes by default) are refused."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_record_fields_of_a_calibrated_conversion(tiny_source, corpus, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, layers=2)
    method = Method(drift_below_share=math.inf, query_fit=2, alternating=1)
    res = mha2mla.convert(source=src, output=str(tmp_path / "mla"), rank=12, rope_dim=8, calibration=corpus,
                          calibration_samples=4, calibration_length=32, max_shard_size="30KB", progress=False,
                          method=method)
    record = _strict_json(tmp_path / "mla" / "mha2mla.json")
    assert record == json.loads(json.dumps(res.record))  # what convert returns is what it wrote
    assert record["format"] == "mha2mla conversion record v1"
    assert record["source"] == {"name": src, "architecture": "LlamaForCausalLM", "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64, "num_hidden_layers": 2,
                                "rms_norm_eps": 1e-5, "rope": record["source"]["rope"], "attention_biases": []}
    assert record["source"]["rope"]["rope_type"] == "default"
    assert record["options"] == {"rank": 12, "kv_budget": None, "rope_dim": 8, "rope_stride": res.plan.rope_stride,
                                 "rope_scaling": "auto", "biases": "auto", "calibration": corpus, "dtype": "float32", "max_shard_size": "30KB"}
    assert record["plan"] == res.plan.to_dict()
    kv = record["kv_cache"]
    assert (kv["source_values_per_token_per_layer"], kv["mla_values_per_token_per_layer"]) == (64, 20)
    assert kv["saving"] == pytest.approx(1 - 20 / 64) and kv["mla_bytes_per_token_bf16"] == 2 * 20 * 2
    layers = record["layers"]
    assert len(layers) == 2 and all(set(x) == set(res.layers[0].to_dict()) for x in layers)
    assert record["mean_k_rel_error"] == pytest.approx(sum(x["k_rel_error"] for x in layers) / 2)
    assert record["mean_output_fit_rel_error"] == pytest.approx(sum(x["output_fit_rel_error"] for x in layers) / 2)
    assert record["mean_attention_kl_after_query_fit"] < record["mean_attention_kl_before_query_fit"]
    assert sorted(record["shards"]) == sorted(n for n in os.listdir(tmp_path / "mla") if n.endswith(".safetensors"))
    assert len(record["shards"]) > 1
    calib = record["calibration"]
    assert (calib["tokens"], calib["samples"], calib["length"]) == (4 * 32, 4, 32) and "length_requested" not in calib
    assert calib["method"] == {**dataclasses.asdict(method), "drift_below_share": "inf"}  # (strict JSON: no Infinity)
    assert calib["propagation"]["tracks_source"] is True and "drift" not in calib["propagation"]
    assert calib["output_fit_stride"] == 1 and calib["seconds"] >= 0 and calib["rope_stride_shares"]


def test_data_free_record_has_no_calibration_and_no_fit_means(tiny_source, tmp_path):
    res = mha2mla.convert(source=tiny_source(n_kv=2), output=str(tmp_path / "mla"), rank=8, progress=False)
    record = _strict_json(tmp_path / "mla" / "mha2mla.json")
    assert "calibration" not in record and record["options"]["calibration"] is None
    assert record["mean_output_fit_rel_error"] is None and record["mean_attention_kl_after_query_fit"] is None
    assert all(x["attention_output_rel_error"] is None for x in record["layers"]) and res.record == record


def test_output_files_and_record(tiny_source, tmp_path):
    src = tiny_source(n_kv=2)
    out = tmp_path / "mla"
    mha2mla.convert(source=src, output=str(out), rank=24, rope_dim=8, progress=False)
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors.index.json", "mha2mla.json", "README.md"} <= names
    assert any(n.startswith("model-00001-of-") for n in names)
    record = load_json(out / "mha2mla.json")
    assert record["kv_cache"]["source_values_per_token_per_layer"] == 2 * 2 * 16
    assert record["kv_cache"]["mla_values_per_token_per_layer"] == 32
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    # 24+8 is not a shape vLLM's MLA backends take: not portable (SGLang's triton backend and transformers serve it)
    assert record["portability"]["vllm_sglang_portable"] is False
    serves = {v["engine"]: v["compressed"] for v in record["portability"]["serving"]}
    assert serves["transformers"] and serves["SGLang (triton backend)"] and not serves["vLLM (CPU)"]
    assert "KV cache" in (out / "README.md").read_text()
    cfg = load_json(out / "config.json")
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"]


def test_record_errors_match_the_written_weights(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, seed=5)
    out = tmp_path / "mla"
    res = mha2mla.convert(source=src, output=str(out), rank=12, rope_dim=8, dtype="float32", progress=False)
    record = load_json(out / "mha2mla.json")
    assert record["layers"] == res.record["layers"]
    index = load_json(out / "model.safetensors.index.json")["weight_map"]
    src_index = os.path.join(src, "model.safetensors")
    n_h, n_kv, hd, r = 4, 2, 16, 12
    for i, layer in enumerate(record["layers"]):
        def get(name, folder=out, shard=None):
            with safe_open(os.path.join(folder, shard or index[name]), framework="pt") as f:
                return f.get_tensor(name).double()
        p = f"model.layers.{i}.self_attn."
        down = get(p + "kv_a_proj_with_mqa.weight")[:r] / layer["latent_scale"]
        kv_b = get(p + "kv_b_proj.weight").view(n_h, 2 * hd, r)
        up_v = kv_b[:: n_h // n_kv, hd:].reshape(n_kv * hd, r)  # one head per group
        w_v = get(p + "v_proj.weight", folder=src, shard=src_index)
        measured = ((w_v - up_v @ down).norm() / w_v.norm()).item()
        assert measured == pytest.approx(layer["v_rel_error"], rel=1e-3, abs=1e-6)
        assert 0 < layer["rope_energy_kept"] <= 1 + 1e-9


def test_full_rope_mqa_record_errors_vanish_and_grow_for_low_rank(tiny_source, tmp_path):
    src = tiny_source(n_kv=1, head_dim=16)
    full = mha2mla.convert(source=src, output=str(tmp_path / "a"), rank=16, rope_dim=16, progress=False)
    low = mha2mla.convert(source=src, output=str(tmp_path / "b"), rank=4, rope_dim=16, progress=False)
    assert max(layer["v_rel_error"] for layer in full.record["layers"]) < 1e-6
    assert min(layer["v_rel_error"] for layer in low.record["layers"]) > 0.05


def test_model_card_names_no_local_path(mla):
    card = open(os.path.join(mla, "README.md"), encoding="utf-8").read()
    assert "base_model: src\n" in card and str(os.path.dirname(mla)) not in card and "pypi.org" not in card
