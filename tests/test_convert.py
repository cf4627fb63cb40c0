"""The core converter: exactness where the math allows, errors that shrink with rank, the record, the format."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import load_json
from safetensors import safe_open

import mha2mla
from mha2mla.errors import Mha2mlaError


def _logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        return model(ids).logits


def _ids(vocab: int = 97, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


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
    ids = _ids()
    diff = (_logits(src, ids) - _logits(str(out), ids)).abs().max().item()
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
    ids = _ids(batch=1, length=20)
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
    ids = _ids()
    ref = _logits(src, ids)
    max_rank = min(2 * n_kv * 16, 64)
    errors = []
    for rank in (8, max_rank // 2, max_rank):
        out = str(tmp_path / f"mla{rank}")
        mha2mla.convert(source=src, output=out, rank=rank, rope_dim=8, progress=False)
        errors.append(((_logits(out, ids) - ref).norm() / ref.norm()).item())
    assert errors[0] > errors[1] > errors[2], errors


def test_full_rope_mqa_record_errors_vanish_and_grow_for_low_rank(tiny_source, tmp_path):
    src = tiny_source(n_kv=1, head_dim=16)
    full = mha2mla.convert(source=src, output=str(tmp_path / "a"), rank=16, rope_dim=16, progress=False)
    low = mha2mla.convert(source=src, output=str(tmp_path / "b"), rank=4, rope_dim=16, progress=False)
    assert max(layer["v_rel_error"] for layer in full.record["layers"]) < 1e-6
    assert min(layer["v_rel_error"] for layer in low.record["layers"]) > 0.05


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


def test_sharded_source_and_sharded_output(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, max_shard_size="20KB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    out = tmp_path / "mla"
    mha2mla.convert(source=src, output=str(out), rank=24, rope_dim=8, max_shard_size="30KB", progress=False)
    shards = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    assert len(shards) > 1
    ids = _ids()
    assert torch.isfinite(_logits(str(out), ids)).all()


def test_bfloat16_output_is_close(tiny_source, tmp_path):
    src = tiny_source(n_kv=1, head_dim=16)
    out = str(tmp_path / "mla")
    mha2mla.convert(source=src, output=out, rank=16, rope_dim=16, dtype="bfloat16", progress=False)
    cfg = load_json(os.path.join(out, "config.json"))
    assert cfg["dtype"] == "bfloat16"
    ids = _ids()
    ref = _logits(src, ids)
    got = _logits(out, ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.05


def test_conversion_is_deterministic(tiny_source, tmp_path):
    src = tiny_source(n_kv=2)
    blobs = []
    for name in ("a", "b"):
        out = tmp_path / name
        mha2mla.convert(source=src, output=str(out), rank=24, rope_dim=8, progress=False)
        blobs.append({n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.endswith(".safetensors")})
    assert blobs[0] == blobs[1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "--rank must be in 1..64"),
    (dict(rank=65), "--rank must be in 1..64"),
    (dict(rank=8, rope_dim=3), "--rope-dim must be a positive even"),
    (dict(rank=8, rope_dim=6), "--rope-dim must be a positive even"),
    (dict(rank=8, rope_dim=32), "--rope-dim must be a positive even"),
    (dict(rank=8, dtype="float16"), "float16"),
])
def test_bad_options_are_refused_before_writing(tiny_source, tmp_path, kwargs, match):
    src = tiny_source(n_kv=2)
    out = tmp_path / "mla"
    with pytest.raises(Mha2mlaError, match=match):
        mha2mla.convert(source=src, output=str(out), progress=False, **kwargs)
    assert not out.exists()
    assert [n for n in os.listdir(tmp_path) if "tmp" in n] == []


def test_existing_output_needs_force(tiny_source, tmp_path):
    src = tiny_source(n_kv=2)
    out = tmp_path / "mla"
    mha2mla.convert(source=src, output=str(out), rank=8, progress=False)
    (out / "extra.txt").write_text("from the first run")
    with pytest.raises(Mha2mlaError, match="already exists; pass --force"):
        mha2mla.convert(source=src, output=str(out), rank=8, progress=False)
    assert (out / "extra.txt").read_text() == "from the first run"
    mha2mla.convert(source=src, output=str(out), rank=4, progress=False, force=True)
    assert not (out / "extra.txt").exists() and json.load(open(out / "config.json"))["kv_lora_rank"] == 4


def test_failure_midway_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    import mha2mla.conversion as conversion

    src = tiny_source(n_kv=2, layers=3)
    calls = {"n": 0}
    real = conversion.convert_attention

    def flaky(**kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(**kw)

    monkeypatch.setattr(conversion, "convert_attention", flaky)
    out = tmp_path / "mla"
    with pytest.raises(KeyboardInterrupt):
        mha2mla.convert(source=src, output=str(out), rank=8, progress=False)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_nan_weights_refused(tiny_source, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_source(n_kv=2)
    f = os.path.join(src, "model.safetensors")
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(Mha2mlaError, match="layers.1.mlp.up_proj.*NaN or Inf"):
        mha2mla.convert(source=src, output=str(tmp_path / "mla"), rank=8, progress=False)
    assert not (tmp_path / "mla").exists()


def test_unsupported_and_broken_sources(tiny_source, tmp_path):
    src = tiny_source(n_kv=2)
    cfg = load_json(os.path.join(src, "config.json"))
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(Mha2mlaError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        mha2mla.convert(source=str(bad), output=str(tmp_path / "o1"), rank=8)
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(Mha2mlaError, match="Qwen3ForCausalLM is not supported.*q_norm"):
        mha2mla.convert(source=str(bad), output=str(tmp_path / "o1"), rank=8)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(Mha2mlaError, match="not valid JSON"):
        mha2mla.convert(source=str(bad), output=str(tmp_path / "o1"), rank=8)
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "sliding_window": 4096}))
    with pytest.raises(Mha2mlaError, match="sliding-window"):
        mha2mla.convert(source=str(bad), output=str(tmp_path / "o1"), rank=8)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(Mha2mlaError, match="pickle files.*never unpickles"):
        mha2mla.convert(source=str(bad), output=str(tmp_path / "o1"), rank=8)
    with pytest.raises(Mha2mlaError, match="does not exist"):
        mha2mla.convert(source=str(tmp_path / "nope"), output=str(tmp_path / "o1"), rank=8)
    with pytest.raises(Mha2mlaError, match="inside the source directory"):
        mha2mla.convert(source=src, output=os.path.join(src, "mla"), rank=8)
    assert not (tmp_path / "o1").exists()


def test_cli_convert_and_one_line_errors(tiny_source, tmp_path):
    from click.testing import CliRunner

    from mha2mla.cli import main

    src = tiny_source(n_kv=2)
    runner = CliRunner()
    assert runner.invoke(main, ["convert", "--help"]).exit_code == 0
    res = runner.invoke(main, ["convert", src, "--output", str(tmp_path / "mla"), "--rank", "24", "--rope-dim", "8", "-q"])
    assert res.exit_code == 0, res.output
    assert "(50.0 % saved)" in res.output
    bad = runner.invoke(main, ["convert", src, "--output", str(tmp_path / "x"), "--rank", "999"])
    assert bad.exit_code == 2
    assert bad.output.strip().startswith("error: --rank must be in 1..64")
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
