"""The target's shapes and constants (:class:`ConversionPlan`): a plain record, no I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["ConversionPlan", "TARGET_EPS", "DTYPES", "kv_group", "max_rank"]

TARGET_EPS = 1e-6  # transformers' kv_a_layernorm eps; vLLM/SGLang use rms_norm_eps, so the two must agree
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ConversionPlan:
    """What the target checkpoint looks like.

    Attributes:
        rank: ``kv_lora_rank`` (latent size R).
        rope_dim: ``qk_rope_head_dim`` (D).
        rope_stride: keep source frequencies ``stride·m`` (``head_dim/D`` keeps θ unchanged).
        rope_theta: θ of the target's standard schedule at ``rope_dim``.
        q_lora_rank: ``None`` (plain ``q_proj``), or ``hidden`` when a kept query bias is carried through ``q_a_proj``.
        attention_bias: whether the target has attention biases (a biased source converted with ``--biases keep``, or
            data-free); a biased source's biases are otherwise absorbed into the calibrated bias-free projections.
        residual_scale: ``sqrt(1e-6 / source eps)``, applied to the residual stream so ``rms_norm_eps`` can be 1e-6.
        tie_embeddings: the target ties ``lm_head`` to the embedding (only if the source does and no rescale is needed).
        dtype: output dtype name.
        rope_type: the target's rope type: ``default``, or the source's scaled type carried over (``--rope-scaling keep``).
        rope_zero: kept planes ``m`` written as zero rows (their source frequency ``stride·m`` is one the source's rope
            scaling changes, so a ``default`` target cannot rotate it right; it joins the no-RoPE part).
    """

    rank: int
    rope_dim: int
    rope_stride: int
    rope_theta: float
    n_layers: int
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    q_lora_rank: int | None
    attention_bias: bool
    residual_scale: float
    tie_embeddings: bool
    dtype: str
    rope_type: str = "default"
    rope_zero: tuple[int, ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def source_kv_values(self) -> int:
        return 2 * self.n_kv * self.head_dim

    @property
    def kv_values(self) -> int:
        return self.rank + self.rope_dim

    @property
    def max_rank(self) -> int:
        return max_rank(n_kv=self.n_kv, head_dim=self.head_dim, hidden=self.hidden)

    def to_dict(self) -> dict:
        return {**asdict(self), "rope_zero": list(self.rope_zero)}  # (as JSON reads it back)


def max_rank(*, n_kv: int, head_dim: int, hidden: int) -> int:
    """The largest useful latent: the rank of the stacked keys and values, at most ``2·n_kv·head_dim`` and ``hidden``."""
    return min(2 * n_kv * head_dim, hidden)


def kv_group(n_heads: int, n_kv: int) -> torch.Tensor:
    """``[n_heads]``: the KV head each query head reads (GQA: consecutive query heads share one)."""
    return torch.arange(n_heads) // (n_heads // n_kv)
