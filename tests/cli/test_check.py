"""``mha2mla check`` (:mod:`mha2mla.cli.check`): broken checkpoints exit 2 with one line; loadable ones get the
per-engine serving verdicts (exit 0 portable, 1 not)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from transformers import DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

from mha2mla.cli import main
from tests.conftest import save_small_mla, small_mla_config

SERVE_SHAPE = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)


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


def test_truncated_shard(tmp_path):
    path = save_small_mla(tmp_path / "m")
    shard = os.path.join(path, "model.safetensors")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    line = _one_error_line(*_run(path))
    assert "truncated" in line and "model.safetensors" in line


def test_truncated_shard_of_an_index(tmp_path):
    path = save_small_mla(tmp_path / "m", max_shard_size="20KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, shard)) // 2)
    line = _one_error_line(*_run(path))
    assert shard in line and "truncated" in line


def test_missing_kv_a_proj_with_mqa(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_small_mla(tmp_path / "m")
    shard = os.path.join(path, "model.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    line = _one_error_line(*_run(path))
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in line and "missing" in line


def test_missing_shard_named_by_the_index(tmp_path):
    path = save_small_mla(tmp_path / "m", max_shard_size="20KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[0]
    os.remove(os.path.join(path, shard))
    line = _one_error_line(*_run(path))
    assert shard in line and "missing" in line


@pytest.mark.parametrize("key, value", [("kv_lora_rank", -4), ("qk_rope_head_dim", None), ("kv_lora_rank", "512"),
                                        ("qk_rope_head_dim", 7), ("q_lora_rank", 0)])
def test_bad_config_values(tmp_path, key, value):
    path = save_small_mla(tmp_path / "m")
    _edit_config(path, **{key: value})
    line = _one_error_line(*_run(path))
    assert key in line and json.dumps(value) in line


def test_shape_disagreeing_with_config(tmp_path):
    path = save_small_mla(tmp_path / "m")
    _edit_config(path, kv_lora_rank=24)  # the weights were written for 16
    line = _one_error_line(*_run(path))
    assert "kv_a_proj_with_mqa" in line and "[24, ...]" not in line and "[32, 32]" in line


def test_index_pointing_at_the_wrong_shard(tmp_path):
    path = save_small_mla(tmp_path / "m", max_shard_size="20KB")
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


def test_check_portable_only_at_the_serving_shape(tmp_path):
    code, out = _run(save_small_mla(tmp_path / "big", **SERVE_SHAPE))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "PORTABLE"
    engines = [line for line in lines if line.startswith("- ")]
    assert all(line.endswith("yes, compressed cache") for line in engines) and len(engines) == 6
    assert lines[7:] == ["note: SGLang on CPU is not listed: its CPU rope (get_rope_cpu in 0.5.23) builds DeepSeek YaRN "
                         "only and refuses a default rope"]

    code, out = _run(save_small_mla(tmp_path / "small"))
    assert code == 1, out
    assert out.splitlines()[0].startswith("NOT PORTABLE")
    assert "- vLLM (CPU): no: kv_lora_rank + qk_rope_head_dim is 16+8;" in out
    assert "- transformers: yes, compressed cache" in out
    assert "- SGLang (triton backend): yes, compressed cache" in out
    assert "note: kv_lora_rank + qk_rope_head_dim is 16+8, not 512+64" in out


def test_check_blocked_dir(tmp_path):
    result = CliRunner().invoke(main, ["check", save_small_mla(tmp_path / "m", attention_bias=True, rms_norm_eps=1e-5)])
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
    DeepseekV3ForCausalLM(small_mla_config(attention_bias=True)).save_pretrained(path, max_shard_size="20KB")
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

    (empty / "config.json").write_text(json.dumps(small_mla_config().to_dict()))
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
