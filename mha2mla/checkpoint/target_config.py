"""The target ``config.json``: a stock ``DeepseekV3ForCausalLM`` with every layer dense (pure, no I/O)."""

from __future__ import annotations

from mha2mla.ops.shapes import TARGET_EPS, ConversionPlan
from mha2mla.checkpoint.source import SourceModel

__all__ = ["deepseek_v3_config"]


def deepseek_v3_config(*, source: SourceModel, plan: ConversionPlan) -> dict:
    """The DeepseekV3 config dict for ``plan``: readable by transformers 5.x and, through the legacy rope keys, 4.x."""
    cfg = source.config
    if plan.rope_type == "default":  # a scaled source made portable keeps only planes its scaling leaves unchanged
        rope = {"rope_type": "default", "rope_theta": plan.rope_theta}
    else:
        rope = {k: v for k, v in source.rope.items() if k not in ("rope_theta",)}
        rope["rope_theta"] = plan.rope_theta
    legacy_scaling = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": plan.hidden,
        "intermediate_size": cfg["intermediate_size"],
        "moe_intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": plan.n_layers,
        "num_attention_heads": plan.n_heads,
        "num_key_value_heads": plan.n_heads,  # MLA: every query head has its own (up-projected) key and value
        # No MoE: every layer is dense. vLLM/SGLang build MoE only for layer_idx >= first_k_dense_replace.
        "first_k_dense_replace": plan.n_layers,
        "n_shared_experts": 1,
        "n_routed_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
        "kv_lora_rank": plan.rank,
        "q_lora_rank": plan.q_lora_rank,
        "qk_rope_head_dim": plan.rope_dim,
        "qk_nope_head_dim": plan.head_dim,
        "v_head_dim": plan.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
        "initializer_range": cfg.get("initializer_range", 0.02),
        "rms_norm_eps": TARGET_EPS,
        "use_cache": True,
        "pad_token_id": cfg.get("pad_token_id"),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "tie_word_embeddings": plan.tie_embeddings,
        "rope_interleave": True,
        "rope_parameters": rope,  # transformers 5.x
        "rope_theta": plan.rope_theta,  # transformers 4.x, vLLM, SGLang
        "rope_scaling": legacy_scaling,
        "attention_bias": plan.attention_bias,
        "attention_dropout": 0.0,
        "dtype": plan.dtype,
        "torch_dtype": plan.dtype,
    }
