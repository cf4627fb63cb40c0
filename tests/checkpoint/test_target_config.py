"""The target's ``config.json`` (:mod:`mha2mla.checkpoint.target_config`): a stock DeepseekV3 with every layer dense,
readable through the current and the legacy rope keys."""

from __future__ import annotations

import pytest
from transformers import DeepseekV3Config

from mha2mla.checkpoint.source import load_source
from mha2mla.checkpoint.target_config import deepseek_v3_config
from mha2mla.conversion.plan import make_plan


@pytest.mark.parametrize("rope,stride", [({"rope_type": "default", "rope_theta": 1e4}, 1),
                                         ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, 2)])
def test_target_config_is_a_dense_deepseek_v3_of_the_plan(tiny_source, rope, stride):
    src = load_source(tiny_source(n_kv=2, layers=3, rope_parameters=rope))
    plan = make_plan(source=src, rank=12, rope_dim=8, rope_stride=stride)
    cfg = deepseek_v3_config(source=src, plan=plan)
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] == 3  # no MoE layer
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == 4
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]) == (12, 8, 16, 16)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_interleave"] is True and cfg["q_lora_rank"] is None
    theta = plan.rope_theta
    assert theta == (1e4 if stride == 2 else pytest.approx(1e4 ** 0.5))
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == theta
    if rope["rope_type"] == "default":
        assert cfg["rope_scaling"] is None
    else:  # transformers 4.x, vLLM and SGLang read the legacy key
        assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
        assert cfg["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    loaded = DeepseekV3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    assert (loaded.kv_lora_rank, loaded.qk_rope_head_dim, loaded.first_k_dense_replace) == (12, 8, 3)
    assert loaded.rope_parameters["rope_theta"] == theta
