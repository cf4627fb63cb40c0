"""KV-cache sizes from a model config (:mod:`mha2mla.serve.kvcache`)."""

from __future__ import annotations

from transformers import LlamaConfig

from mha2mla.serve.kvcache import kv_cache_bytes, kv_values_per_token_per_layer
from tests.conftest import small_mla_config


def test_mla_caches_the_latent_and_the_rope_key_and_mha_every_kv_head():
    mla = small_mla_config(kv_lora_rank=96, qk_rope_head_dim=32)
    assert kv_values_per_token_per_layer(mla) == kv_values_per_token_per_layer(mla.to_dict()) == 128
    gqa = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_hidden_layers=30)
    assert kv_values_per_token_per_layer(gqa) == 2 * 3 * 64
    mha = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": None, "num_hidden_layers": 2}
    assert kv_values_per_token_per_layer(mha) == 2 * 4 * 16  # no KV heads given: MHA; head_dim from the hidden size


def test_cache_bytes_scale_with_layers_context_width_and_batch():
    gqa = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "num_hidden_layers": 30}
    assert kv_cache_bytes(gqa, context=4096) == 384 * 30 * 4096 * 2
    assert kv_cache_bytes(gqa, context=4096, bytes_per_value=4, batch=3) == 384 * 30 * 4096 * 4 * 3
    assert kv_cache_bytes(small_mla_config(), context=10) == (16 + 8) * 2 * 10 * 2
