"""Exact zero-padding to vLLM's MLA shape (:mod:`mha2mla.serve.pad`); the ``mha2mla pad`` and ``convert --serve``
commands are in tests/cli/."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from mha2mla.errors import Mha2mlaError
from mha2mla.serve.pad import MlaDims, pad_checkpoint, pad_config
from tests.conftest import load_json, logits, token_ids


def _random_mla(path, seed: int = 0, **overrides) -> str:
    """A tiny random DeepseekV3 with a non-zero rope part and a latent norm far from its linear regime."""
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
              num_key_value_heads=3, q_lora_rank=None, kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=16,
              v_head_dim=8, first_k_dense_replace=2, n_routed_experts=1, rope_interleave=True, rms_norm_eps=1e-6,
              max_position_embeddings=256, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_((1 + 0.3 * torch.randn(p.shape, generator=g)) if name.endswith("norm.weight")
                    else 0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return str(path)


def _digest(path) -> dict:
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest() for n in sorted(os.listdir(path))}


@pytest.mark.parametrize("overrides", [
    {},
    {"q_lora_rank": 20, "tie_word_embeddings": True},  # (written untied: vLLM never ties DeepSeek's lm_head)
    {"qk_rope_head_dim": 32, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 32}},
])
def test_padded_logits_equal_the_unpadded(tmp_path, overrides):
    src = _random_mla(tmp_path / "src", **overrides)
    before = _digest(src)
    res = pad_checkpoint(source=src, output=str(tmp_path / "padded"))
    assert _digest(src) == before  # the input is only read
    cfg = load_json(tmp_path / "padded" / "config.json")
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]) == (512, 64, 128, 128)
    assert res.source_dims == MlaDims(12, overrides.get("qk_rope_head_dim", 8), 16, 8)
    ids = token_ids(vocab=64, length=40, low=0)
    diff = (logits(src, ids) - logits(str(tmp_path / "padded"), ids)).abs().max().item()
    assert diff <= 1e-4, f"max |Δlogit| {diff}"
    assert cfg["tie_word_embeddings"] is False
    record = load_json(tmp_path / "padded" / "mha2mla.json")
    assert record["padding"]["exact"] and record["padding"]["to"]["kv_lora_rank"] == 512
    # llama3 rope pads exactly but engines rewrite its rope type: portable only with the default schedule
    assert record["portability"]["vllm_sglang_portable"] is ("rope_parameters" not in overrides)


def test_pad_config_keeps_the_frequencies():
    cfg = {"kv_lora_rank": 96, "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64, "head_dim": 32,
           "rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    out = pad_config(cfg, dst=MlaDims(512, 64, 128, 128))
    theta = out["rope_parameters"]["rope_theta"]
    assert out["rope_theta"] == theta and out["head_dim"] == 64
    old = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    new = theta ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.allclose(new[:16], old, rtol=1e-12)
    assert cfg["kv_lora_rank"] == 96  # the input dict is not modified
    with pytest.raises(Mha2mlaError, match="yarn"):
        pad_config({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, dst=MlaDims(512, 64, 128, 128))
    with pytest.raises(Mha2mlaError, match="beyond float32"):
        pad_config({**cfg, "qk_rope_head_dim": 8, "rope_theta": 5e5, "rope_parameters": None},
                   dst=MlaDims(512, 64, 128, 128))
    with pytest.raises(Mha2mlaError, match="kv_lora_rank 600 down to 512"):
        pad_config({**cfg, "kv_lora_rank": 600}, dst=MlaDims(512, 64, 128, 128))


def test_pad_refuses_broken_and_unsafe(tmp_path):
    src = _random_mla(tmp_path / "src")
    with pytest.raises(Mha2mlaError, match="inside the source"):
        pad_checkpoint(source=src, output=os.path.join(src, "padded"))
    with pytest.raises(Mha2mlaError, match="contains the source|source"):
        pad_checkpoint(source=src, output=str(tmp_path))
    cfg = load_json(os.path.join(src, "config.json"))
    cfg["kv_lora_rank"] = -4
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(Mha2mlaError, match="kv_lora_rank: -4"):
        pad_checkpoint(source=src, output=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
