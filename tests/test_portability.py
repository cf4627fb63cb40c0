"""vLLM/SGLang portability checks (mha2mla.portability) and the ``mha2mla check`` command."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

from mha2mla.cli import main
from mha2mla.portability import fast_kernel_notes, portability_blockers, rope_type


def _config(**overrides) -> DeepseekV3Config:
    kw = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, first_k_dense_replace=2, n_routed_experts=4, rope_interleave=True, rms_norm_eps=1e-6,
        max_position_embeddings=128,
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def _meta(**overrides) -> tuple[dict, list[str]]:
    config = _config(**overrides)
    torch.manual_seed(0)
    names = list(DeepseekV3ForCausalLM(config).state_dict())
    return config.to_dict(), names


def test_converted_shape_is_portable():
    config, names = _meta()
    assert portability_blockers(config, names) == []
    config, names = _meta(q_lora_rank=24)
    assert portability_blockers(config, names) == []


def test_attention_bias_tensors_block():
    config, names = _meta(attention_bias=True)
    assert any(n.endswith("self_attn.o_proj.bias") for n in names)
    (blocker,) = portability_blockers(config, names)
    assert "bias" in blocker and "self_attn" in blocker
    # the flag alone (no tensors) also blocks: transformers would add parameters the engines never build
    config, names = _meta()
    config["attention_bias"] = True
    (blocker,) = portability_blockers(config, names)
    assert "attention_bias" in blocker


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "llama3"),
        ("rope_interleave", False, "interleaved"),
        ("rms_norm_eps", 1e-5, "rms_norm_eps is 1e-05"),
        ("first_k_dense_replace", 1, "layers 1"),
        ("num_key_value_heads", 1, "num_key_value_heads is 1"),
        ("model_type", "llama", "not an MLA checkpoint"),
    ],
)
def test_each_blocker_is_one_sentence(key, value, words):
    config, names = _meta()
    config[key] = value
    blockers = portability_blockers(config, names)
    assert len(blockers) == 1, blockers
    assert words in blockers[0]
    assert "\n" not in blockers[0] and not blockers[0].endswith(".")


def test_rope_type_reads_v5_and_legacy_keys():
    assert rope_type({}) == "default"
    assert rope_type({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}) == "default"
    assert rope_type({"rope_scaling": {"type": "yarn", "factor": 4.0}}) == "yarn"
    assert rope_type({"rope_parameters": None, "rope_scaling": {"rope_type": "llama3"}}) == "llama3"
    config, names = _meta()
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    assert "yarn" in portability_blockers(config, names)[0]


def test_real_moe_layers_are_fine_when_experts_exist():
    config, names = _meta()
    config["first_k_dense_replace"] = 1
    names = names + [f"model.layers.1.mlp.experts.{i}.gate_proj.weight" for i in range(4)]
    assert portability_blockers(config, names) == []


def test_several_blockers_are_all_reported():
    config, names = _meta(attention_bias=True, rms_norm_eps=1e-5, rope_interleave=False)
    assert len(portability_blockers(config, names)) == 3


def test_fast_kernel_notes():
    assert fast_kernel_notes({"kv_lora_rank": 512, "qk_rope_head_dim": 64}) == []
    notes = fast_kernel_notes({"kv_lora_rank": 96, "qk_rope_head_dim": 32})
    assert len(notes) == 2 and "kv_lora_rank is 96" in notes[0] and "qk_rope_head_dim is 32" in notes[1]
    assert len(fast_kernel_notes({"kv_lora_rank": 512, "qk_rope_head_dim": 32})) == 1


# --- the CLI -----------------------------------------------------------------------------------------------------


def _save(path, **overrides) -> str:
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(_config(**overrides)).save_pretrained(path)
    return str(path)


def test_check_portable_dir(tmp_path):
    shape = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    result = CliRunner().invoke(main, ["check", _save(tmp_path / "m", **shape)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "PORTABLE"
    # the same model at 16+8 is served compressed by transformers and SGLang's triton backend only
    result = CliRunner().invoke(main, ["check", _save(tmp_path / "small")])
    assert result.exit_code == 1, result.output
    assert "vLLM (CPU): no: kv_lora_rank + qk_rope_head_dim is 16+8" in result.output


def test_check_blocked_dir(tmp_path):
    result = CliRunner().invoke(main, ["check", _save(tmp_path / "m", attention_bias=True, rms_norm_eps=1e-5)])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("NOT PORTABLE")
    engines = [line for line in lines if line.startswith("- ")]
    assert engines[0] == "- transformers: yes, compressed cache" and len(engines) == 6
    for line in engines[1:]:  # every serving engine names both blockers
        assert "bias" in line and "rms_norm_eps is 1e-05" in line


def test_check_sharded_dir_uses_index(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m"
    DeepseekV3ForCausalLM(_config(attention_bias=True)).save_pretrained(path, max_shard_size="20KB")
    assert os.path.exists(path / "model.safetensors.index.json")
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 1 and "bias" in result.output


def test_check_bad_dirs_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["check", str(tmp_path / "missing")])
    assert result.exit_code == 2

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, ["check", str(empty)])
    assert result.exit_code == 2 and "config.json" in result.output

    (empty / "config.json").write_text(json.dumps(_config().to_dict()))
    result = runner.invoke(main, ["check", str(empty)])
    assert result.exit_code == 2 and "safetensors" in result.output

    (empty / "model.safetensors").write_bytes(b"\xff" * 16)
    result = runner.invoke(main, ["check", str(empty)])
    assert result.exit_code == 2 and "header" in result.output

    (empty / "config.json").write_text("{not json")
    result = runner.invoke(main, ["check", str(empty)])
    assert result.exit_code == 2

    llama = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(llama)
    result = runner.invoke(main, ["check", str(llama)])
    assert result.exit_code == 2 and "'llama'" in result.output
