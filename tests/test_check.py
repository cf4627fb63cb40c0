"""``mha2mla check``: broken checkpoints exit 2 with one line; the per-engine serving verdicts."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from mha2mla.cli import main
from mha2mla.portability import serving_verdicts

SERVE_SHAPE = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)


def _config(**overrides) -> DeepseekV3Config:
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
              v_head_dim=16, first_k_dense_replace=2, n_routed_experts=4, rope_interleave=True, rms_norm_eps=1e-6,
              max_position_embeddings=128)
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def _save(path, max_shard_size=None, **overrides) -> str:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(_config(**overrides))
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return str(path)


def _run(path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["check", str(path)])
    return result.exit_code, result.output


def _edit_config(path, **changes) -> None:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def _one_error_line(code: int, output: str) -> str:
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


# --- issue 29 item 4: broken checkpoints are refused, exit 2, one line -------------------------------------------------


def test_truncated_shard(tmp_path):
    path = _save(tmp_path / "m")
    shard = os.path.join(path, "model.safetensors")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    line = _one_error_line(*_run(path))
    assert "truncated" in line and "model.safetensors" in line


def test_truncated_shard_of_an_index(tmp_path):
    path = _save(tmp_path / "m", max_shard_size="20KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, shard)) // 2)
    line = _one_error_line(*_run(path))
    assert shard in line and "truncated" in line


def test_missing_kv_a_proj_with_mqa(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _save(tmp_path / "m")
    shard = os.path.join(path, "model.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    line = _one_error_line(*_run(path))
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in line and "missing" in line


def test_missing_shard_named_by_the_index(tmp_path):
    path = _save(tmp_path / "m", max_shard_size="20KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[0]
    os.remove(os.path.join(path, shard))
    line = _one_error_line(*_run(path))
    assert shard in line and "missing" in line


@pytest.mark.parametrize("key, value", [("kv_lora_rank", -4), ("qk_rope_head_dim", None), ("kv_lora_rank", "512"),
                                        ("qk_rope_head_dim", 7), ("q_lora_rank", 0)])
def test_bad_config_values(tmp_path, key, value):
    path = _save(tmp_path / "m")
    _edit_config(path, **{key: value})
    line = _one_error_line(*_run(path))
    assert key in line and json.dumps(value) in line


def test_shape_disagreeing_with_config(tmp_path):
    path = _save(tmp_path / "m")
    _edit_config(path, kv_lora_rank=24)  # the weights were written for 16
    line = _one_error_line(*_run(path))
    assert "kv_a_proj_with_mqa" in line and "[24, ...]" not in line and "[32, 32]" in line


def test_index_pointing_at_the_wrong_shard(tmp_path):
    path = _save(tmp_path / "m", max_shard_size="20KB")
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    with open(index_path, "w") as f:
        json.dump(index, f)
    line = _one_error_line(*_run(path))
    assert name in line


# --- the per-engine verdicts ------------------------------------------------------------------------------------------


def _engines(config: dict, names=("lm_head.weight",)) -> dict[str, bool]:
    return {v.engine: v.compressed for v in serving_verdicts(config, list(names))}


def _shape(rank, rope, nope, v, **extra) -> dict:
    cfg = {"model_type": "deepseek_v3", "kv_lora_rank": rank, "qk_rope_head_dim": rope, "qk_nope_head_dim": nope,
           "v_head_dim": v, "rms_norm_eps": 1e-6, "num_attention_heads": 4, "num_key_value_heads": 4,
           "num_hidden_layers": 2, "first_k_dense_replace": 2, "n_routed_experts": 1}
    cfg.update(extra)
    return cfg


VG, VC, ST, SF, SM = ("vLLM (GPU)", "vLLM (CPU)", "SGLang (triton backend)", "SGLang (FA3 backend, Hopper default)",
                      "SGLang (FlashMLA backend)")

# (config, engines that serve it compressed): the vLLM rows follow vLLM 0.32.0's MLACommonBackend / CPUMLABackend
# head sizes and FlashAttnPrefillBackend's dims (benchmarks/serve_vllm.py --check-table asks vLLM's own classes).
TABLE = [
    (_shape(512, 64, 128, 128), {VG, VC, ST, SF, SM}),     # DeepSeek's shape: every engine
    (_shape(256, 64, 128, 128), {VG, ST}),                 # 320: vLLM GPU only
    (_shape(448, 64, 128, 128), {VG, ST}),                 # 512: vLLM GPU (MLACommonBackend lists 512), not CPU
    (_shape(96, 32, 64, 64), {ST}),                        # SmolLM2 96+32: only SGLang's triton backend
    (_shape(160, 32, 64, 64), {ST}),                       # SmolLM2 at the larger budget
    (_shape(512, 64, 64, 64), {VC, ST, SM}),               # 576 but nope/v 64: no GPU prefill kernel in vLLM
    (_shape(512, 64, 64, 128), {VG, VC, ST, SM}),          # (64, 64, 128) is one of FlashAttn prefill's shapes
    (_shape(544, 32, 128, 128), {ST}),                     # 576 but 544+32: CPU decode kernel is 512+64; GPU prefill rope 64
    (_shape(512, 64, 128, 128, rms_norm_eps=1e-5), set()),  # eps mismatch: every engine but transformers differs
    (_shape(512, 64, 128, 128, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), set()),
    (_shape(512, 64, 128, 128, rope_interleave=False), set()),
    (_shape(512, 64, 128, 128, num_key_value_heads=1), set()),
    (_shape(512, 64, 128, 128, tie_word_embeddings=True), set()),  # vLLM's DeepseekV2ForCausalLM never ties lm_head
]


@pytest.mark.parametrize("config, serves", TABLE)
def test_verdict_table(config, serves):
    got = _engines(config, () if config.get("tie_word_embeddings") else ("lm_head.weight",))
    assert got.pop("transformers") is True
    assert {e for e, ok in got.items() if ok} == serves


def test_verdicts_on_biases_and_their_fixes():
    names = ["model.layers.0.self_attn.o_proj.bias"]
    verdicts = {v.engine: v for v in serving_verdicts(_shape(512, 64, 128, 128), names)}
    assert verdicts["transformers"].compressed
    for engine in (VG, VC, ST):
        assert not verdicts[engine].compressed and "bias" in verdicts[engine].why
        assert "convert again" in verdicts[engine].fix
    small = {v.engine: v for v in serving_verdicts(_shape(96, 32, 64, 64), [])}
    assert "mha2mla pad" in small[VC].fix and "VLLM_MLA_DISABLE=1" in small[VC].fix
    assert "96+32" in small[VC].why
    assert "--attention-backend triton" in small[SF].fix


# --- the CLI on loadable checkpoints ------------------------------------------------------------------------------


def test_check_portable_only_at_the_serving_shape(tmp_path):
    code, out = _run(_save(tmp_path / "big", **SERVE_SHAPE))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "PORTABLE"
    assert all(line.endswith("yes, compressed cache") for line in lines[1:]) and len(lines) == 7

    code, out = _run(_save(tmp_path / "small"))
    assert code == 1, out
    assert out.splitlines()[0].startswith("NOT PORTABLE")
    assert "- vLLM (CPU): no: kv_lora_rank + qk_rope_head_dim is 16+8;" in out
    assert "- transformers: yes, compressed cache" in out
    assert "- SGLang (triton backend): yes, compressed cache" in out
