"""The whole conversion (:func:`mha2mla.conversion.pipeline.convert`): exactness where the math allows, errors that
shrink with rank, calibration over data-free, the format, and the options refused before any work."""

from __future__ import annotations

import os

import pytest
import torch

import mha2mla
from mha2mla.conversion.options import Method
from mha2mla.errors import Mha2mlaError
from tests.conftest import assert_user_error, convert_cli, held_out_error, load_json, logits, token_ids


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=8, kv_budget=24), "give either --rank (with --rope-dim) or --kv-budget, not both or neither"),
    (dict(), "give either --rank (with --rope-dim) or --kv-budget, not both or neither"),
    (dict(kv_budget=24, rope_dim=8, calibration="text"), "--kv-budget chooses --rope-dim itself; drop --rope-dim "
                                                         "(or use --rank)"),
    (dict(rank=8, max_shard_size="0"), "--max-shard-size must be a positive size such as 500MB, got '0'"),
])
def test_option_combinations_are_refused_before_the_source_is_read(tmp_path, kwargs, message):
    with pytest.raises(Mha2mlaError) as e:
        mha2mla.convert(source=str(tmp_path / "missing"), output=str(tmp_path / "out"), progress=False, **kwargs)
    assert str(e.value) == message and not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch,extra", [
    ("llama", dict(eps=1e-5, tied=True)),
    ("qwen2", dict(eps=1e-6, tied=False)),
    ("mistral", dict(eps=1e-5, tied=False)),
])
def test_mqa_full_rope_full_rank_is_exact(tiny_source, tmp_path, arch, extra):
    src = tiny_source(arch=arch, n_heads=4, n_kv=1, head_dim=16, **extra)
    out = tmp_path / "mla"
    res = mha2mla.convert(source=src, output=str(out), rank=16, rope_dim=16, dtype="float32", progress=False)
    cfg = load_json(out / "config.json")
    assert cfg["model_type"] == "deepseek_v3" and cfg["kv_lora_rank"] == 16 and cfg["qk_rope_head_dim"] == 16
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_interleave"] is True
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"]
    assert not any(f.endswith(".py") for f in os.listdir(out))
    ids = token_ids()
    diff = (logits(src, ids) - logits(str(out), ids)).abs().max().item()
    assert diff <= 1e-4, f"max |Δlogit| {diff}"
    assert res.record["kv_cache"]["mla_values_per_token_per_layer"] == 32
    if arch == "qwen2":
        assert cfg["attention_bias"] is True and cfg["q_lora_rank"] == cfg["hidden_size"]
        assert res.record["portability"]["vllm_sglang_portable"] is False


def test_loaded_class_is_stock_deepseek_v3(tiny_source, tmp_path):
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

    src = tiny_source(n_kv=2)
    mha2mla.convert(source=src, output=str(tmp_path / "mla"), rank=24, rope_dim=8, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mla"))
    assert type(model) is DeepseekV3ForCausalLM


def test_incremental_decode_equals_full_forward(tiny_source, tmp_path):
    from transformers import AutoModelForCausalLM, DynamicCache

    src = tiny_source(n_kv=2, head_dim=16)
    out = str(tmp_path / "mla")
    mha2mla.convert(source=src, output=out, rank=20, rope_dim=8, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = token_ids(batch=1, length=20)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :12], cache=cache, use_cache=True).logits]
        for t in range(12, 20):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    inc = torch.cat(steps, dim=1)
    assert (full - inc).abs().max().item() < 1e-4


@pytest.mark.parametrize("n_kv", [2, 4])
def test_output_error_falls_as_rank_grows(tiny_source, tmp_path, n_kv):
    src = tiny_source(n_heads=4, n_kv=n_kv, head_dim=16, seed=3)
    ids = token_ids()
    ref = logits(src, ids)
    max_rank = min(2 * n_kv * 16, 64)
    errors = []
    for rank in (8, max_rank // 2, max_rank):
        out = str(tmp_path / f"mla{rank}")
        mha2mla.convert(source=src, output=out, rank=rank, rope_dim=8, progress=False)
        errors.append(((logits(out, ids) - ref).norm() / ref.norm()).item())
    assert errors[0] > errors[1] > errors[2], errors


def test_bfloat16_output_is_close(tiny_source, tmp_path):
    src = tiny_source(n_kv=1, head_dim=16)
    out = str(tmp_path / "mla")
    mha2mla.convert(source=src, output=out, rank=16, rope_dim=16, dtype="bfloat16", progress=False)
    cfg = load_json(os.path.join(out, "config.json"))
    assert cfg["dtype"] == "bfloat16"
    ids = token_ids()
    ref = logits(src, ids)
    got = logits(out, ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.05


def test_conversion_is_deterministic(tiny_source, tmp_path):
    src = tiny_source(n_kv=2)
    blobs = []
    for name in ("a", "b"):
        out = tmp_path / name
        mha2mla.convert(source=src, output=str(out), rank=24, rope_dim=8, progress=False)
        blobs.append({n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.endswith(".safetensors")})
    assert blobs[0] == blobs[1]


def test_calibrated_conversion_beats_data_free(tiny_source, tmp_path, corpus):
    src = tiny_source(n_kv=2, head_dim=16, seed=7)
    mha2mla.convert(source=src, output=str(tmp_path / "free"), rank=12, rope_dim=8, progress=False)
    cal = mha2mla.convert(source=src, output=str(tmp_path / "cal"), rank=12, rope_dim=8, progress=False,
                          calibration=corpus, calibration_samples=8, calibration_length=32)
    assert cal.record["calibration"]["tokens"] == 8 * 32
    assert all(layer["attention_output_rel_error"] is not None for layer in cal.record["layers"])
    e_free = held_out_error(src, str(tmp_path / "free"))
    e_cal = held_out_error(src, str(tmp_path / "cal"))
    assert e_cal < e_free, (e_cal, e_free)


def test_calibrated_mqa_full_rank_stays_exact(tiny_source, tmp_path, corpus):
    src = tiny_source(n_kv=1, head_dim=16)
    # float32 streams: bfloat16 MLP rounding (the default on CPUs that multiply it natively) is ~1e-3 of an exact
    # conversion's output
    mha2mla.convert(source=src, output=str(tmp_path / "cal"), rank=16, rope_dim=16, progress=False, dtype="float32",
                    calibration=corpus, calibration_samples=4, calibration_length=32,
                    method=Method(mlp_dtype="float32"))
    assert held_out_error(src, str(tmp_path / "cal")) < 1e-5


@pytest.mark.parametrize("device,phrase", [
    ("mps", "only cpu and cuda are supported"),
    ("tpu", "is not a torch device"),
    pytest.param("cuda", "torch sees no CUDA device here", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="a CUDA device is present")),
])
def test_bad_calibration_device(sources, tmp_path, device, phrase):
    data = tmp_path / "calib.txt"
    data.write_text("the cat sat on the mat. " * 400)
    out = tmp_path / "out"
    assert_user_error(convert_cli(sources["src"], out, "--calibration", data, "--device", device), phrase, out)
