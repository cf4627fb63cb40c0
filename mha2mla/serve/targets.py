"""The shapes vLLM's MLA kernels accept (``--serve`` targets), as plain data: the command line reads them without
importing torch."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MlaDims", "SERVE_TARGETS"]


@dataclass(frozen=True)
class MlaDims:
    """The attention dims of an MLA checkpoint (``kv_lora_rank``, ``qk_rope_head_dim``, ``qk_nope_head_dim``,
    ``v_head_dim``)."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int

    @classmethod
    def of(cls, config: dict) -> "MlaDims":
        return cls(**{k: int(config[k]) for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")})

    @property
    def cache_values(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def label(self) -> str:
        return f"{self.kv_lora_rank}+{self.qk_rope_head_dim}"


# ``--serve`` targets: 512+64 runs on vLLM's CPU and GPU MLA backends; 256+64 (320) on its GPU backends only.
SERVE_TARGETS = {"vllm": MlaDims(512, 64, 128, 128), "vllm-gpu-320": MlaDims(256, 64, 128, 128)}
