"""KV-cache sizes from a model config (pure arithmetic, no I/O)."""

from __future__ import annotations

from typing import Any

__all__ = ["kv_values_per_token_per_layer", "kv_cache_bytes"]


def _get(cfg: Any, key: str, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def kv_values_per_token_per_layer(config: Any) -> int:
    """Cached values per token per layer: ``kv_lora_rank + qk_rope_head_dim`` for MLA, else ``2·n_kv·head_dim``.

    Args:
        config: a transformers config object or its ``to_dict()``.
    """
    if _get(config, "kv_lora_rank") is not None and _get(config, "qk_rope_head_dim") is not None:
        return int(_get(config, "kv_lora_rank")) + int(_get(config, "qk_rope_head_dim"))
    n_heads = int(_get(config, "num_attention_heads"))
    n_kv = int(_get(config, "num_key_value_heads") or n_heads)
    head_dim = _get(config, "head_dim") or int(_get(config, "hidden_size")) // n_heads
    return 2 * n_kv * int(head_dim)


def kv_cache_bytes(config: Any, *, context: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Bytes of KV cache for ``context`` tokens over all layers (bf16/fp16 by default)."""
    return kv_values_per_token_per_layer(config) * int(_get(config, "num_hidden_layers")) * context * bytes_per_value * batch
