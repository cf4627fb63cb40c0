"""The conversion plan: every shape and constant of the target, decided and validated before any weight is read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from mha2mla.errors import Mha2mlaError
from mha2mla.rope import rope_theta_for_stride, validate_rope_dim
from mha2mla.source import SourceModel

__all__ = ["ConversionPlan", "make_plan", "TARGET_EPS"]

TARGET_EPS = 1e-6  # transformers' kv_a_layernorm eps; vLLM/SGLang use rms_norm_eps, so the two must agree
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ConversionPlan:
    """What the target checkpoint looks like.

    Attributes:
        rank: ``kv_lora_rank`` (latent size R).
        rope_dim: ``qk_rope_head_dim`` (D).
        rope_stride: keep source frequencies ``stride·m`` (``head_dim/D`` keeps θ unchanged).
        rope_theta: θ of the target's standard schedule at ``rope_dim``.
        q_lora_rank: ``None`` (plain ``q_proj``), or ``hidden`` when a query bias must be carried through ``q_a_proj``.
        attention_bias: whether the target has attention biases (any source attention bias).
        residual_scale: ``sqrt(1e-6 / source eps)``, applied to the residual stream so ``rms_norm_eps`` can be 1e-6.
        tie_embeddings: the target ties ``lm_head`` to the embedding (only if the source does and no rescale is needed).
        dtype: output dtype name.
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

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def source_kv_values(self) -> int:
        return 2 * self.n_kv * self.head_dim

    @property
    def kv_values(self) -> int:
        return self.rank + self.rope_dim

    @property
    def max_rank(self) -> int:
        return min(2 * self.n_kv * self.head_dim, self.hidden)

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(*, source: SourceModel, rank: int, rope_dim: int | None = None, rope_stride: int | None = None, dtype: str = "auto") -> ConversionPlan:
    """Validate the user's choices against the source and fix every target constant.

    Raises:
        Mha2mlaError: invalid rank, rope dim, stride or dtype (the message shows the values and the valid range).
    """
    hd = source.head_dim
    rope_dim = hd // 2 if rope_dim is None else int(rope_dim)
    try:
        validate_rope_dim(head_dim=hd, rope_dim=rope_dim)
    except ValueError as e:
        raise Mha2mlaError(str(e)) from None
    max_stride = hd // rope_dim
    stride = max_stride if rope_stride is None else int(rope_stride)
    if not 1 <= stride <= max_stride:
        raise Mha2mlaError(f"--rope-stride must be in 1..{max_stride} for head_dim {hd} and --rope-dim {rope_dim}, got {stride}")
    if stride != max_stride and source.rope["rope_type"] != "default":
        raise Mha2mlaError(f"--rope-stride {stride} changes θ, which is only exact for rope type 'default' (this source: {source.rope['rope_type']!r}); use the default stride {max_stride}")
    max_rank = min(2 * source.n_kv * hd, source.hidden)
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise Mha2mlaError(f"--rank must be in 1..{max_rank} (the rank of the stacked keys and values: 2·{source.n_kv} KV heads·{hd}, hidden {source.hidden}), got {rank}")
    if dtype == "auto":
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "bfloat16"}.get(source.dtype, "float32")
    if dtype == "float16":
        raise Mha2mlaError("--dtype float16 is not supported: the linearised latent norm keeps latents near 1e-6, which underflow in float16; use bfloat16 or float32")
    if dtype not in _DTYPES:
        raise Mha2mlaError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    theta = float(source.rope.get("rope_theta", 10000.0))
    scale = math.sqrt(TARGET_EPS / source.eps)
    return ConversionPlan(
        rank=rank, rope_dim=rope_dim, rope_stride=stride,
        rope_theta=rope_theta_for_stride(theta=theta, head_dim=hd, rope_dim=rope_dim, stride=stride),
        n_layers=source.n_layers, hidden=source.hidden, n_heads=source.n_heads, n_kv=source.n_kv, head_dim=hd,
        q_lora_rank=source.hidden if source.bias["q"] else None,
        attention_bias=any(source.bias.values()),
        residual_scale=scale,
        tie_embeddings=source.tied and scale == 1.0,
        dtype=dtype,
    )
