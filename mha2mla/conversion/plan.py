"""The conversion plan: every shape and constant of the target, decided and validated against the source before any
weight is read."""

from __future__ import annotations

import math
import torch

from mha2mla.errors import Mha2mlaError
from mha2mla.ops.shapes import DTYPES, TARGET_EPS, ConversionPlan
from mha2mla.ops.shapes import max_rank as shape_max_rank
from mha2mla.ops.rope import kept_frequencies, rope_theta_for_stride, unscaled_frequencies, validate_rope_dim
from mha2mla.checkpoint.source import SourceModel

__all__ = ["make_plan", "ROPE_SCALING", "BIASES"]

ROPE_SCALING = ("auto", "portable", "keep")
BIASES = ("auto", "absorb", "keep")


def make_plan(*, source: SourceModel, rank: int, rope_dim: int | None = None, rope_stride: int | None = None,
              dtype: str = "auto", rope_scaling: str = "auto", biases: str = "auto",
              calibrated: bool = False) -> ConversionPlan:
    """Validate the user's choices against the source and fix every target constant.

    Args:
        rope_scaling: for a source whose rope type scales frequencies (``llama3``, ``linear``): ``portable`` writes a
            ``default`` rope that keeps only frequencies the scaling leaves unchanged (engines serve it as written);
            ``keep`` carries the scaling over (exact in transformers; vLLM and SGLang rewrite it to DeepSeek YaRN);
            ``auto`` is ``portable`` where some kept frequency is unchanged, else ``keep``.
        biases: for a source with query/key/value biases (Qwen2): ``absorb`` fits bias-free projections on the
            calibration data (engines drop attention biases); ``keep`` carries them (exact, transformers only);
            ``auto`` is ``absorb`` when ``calibrated``, else ``keep``.
        calibrated: the conversion has calibration data (``absorb`` needs it).

    Raises:
        Mha2mlaError: invalid rank, rope dim, stride, dtype or rope scaling (the message shows the values and the
            valid range).
    """
    hd = source.head_dim
    rope_dim = hd // 2 if rope_dim is None else int(rope_dim)
    try:
        validate_rope_dim(head_dim=hd, rope_dim=rope_dim)
    except ValueError as e:
        raise Mha2mlaError(str(e)) from None
    if rope_scaling not in ROPE_SCALING:
        raise Mha2mlaError(f"--rope-scaling must be one of {', '.join(ROPE_SCALING)}, got {rope_scaling!r}")
    max_stride = hd // rope_dim
    if rope_stride is not None and not 1 <= int(rope_stride) <= max_stride:
        raise Mha2mlaError(f"--rope-stride must be in 1..{max_stride} for head_dim {hd} and --rope-dim {rope_dim}, got {rope_stride}")
    stride, rope_type, zero = _rope_schedule(source, rope_dim, rope_stride, rope_scaling)
    biased = _target_biases(source, biases, calibrated)
    max_rank = shape_max_rank(n_kv=source.n_kv, head_dim=hd, hidden=source.hidden)
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise Mha2mlaError(f"--rank must be in 1..{max_rank} (the rank of the stacked keys and values: 2·{source.n_kv} KV heads·{hd}, hidden {source.hidden}), got {rank}")
    if dtype == "auto":
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "bfloat16"}.get(source.dtype, "float32")
    if dtype == "float16":
        raise Mha2mlaError("--dtype float16 is not supported: the linearised latent norm keeps latents near 1e-6, which underflow in float16; use bfloat16 or float32")
    if dtype not in DTYPES:
        raise Mha2mlaError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    theta = float(source.rope.get("rope_theta", 10000.0))
    scale = math.sqrt(TARGET_EPS / source.eps)
    return ConversionPlan(
        rank=rank, rope_dim=rope_dim, rope_stride=stride,
        rope_theta=rope_theta_for_stride(theta=theta, head_dim=hd, rope_dim=rope_dim, stride=stride),
        n_layers=source.n_layers, hidden=source.hidden, n_heads=source.n_heads, n_kv=source.n_kv, head_dim=hd,
        q_lora_rank=source.hidden if biased and source.bias["q"] else None,
        attention_bias=biased,
        residual_scale=scale,
        tie_embeddings=source.tied and scale == 1.0,
        dtype=dtype,
        rope_type=rope_type,
        rope_zero=zero,
    )


def _target_biases(source: SourceModel, mode: str, calibrated: bool) -> bool:
    """Whether the target carries attention biases (``keep``), or has them absorbed by the calibrated fits."""
    if mode not in BIASES:
        raise Mha2mlaError(f"--biases must be one of {', '.join(BIASES)}, got {mode!r}")
    if not any(source.bias.values()):
        return False
    if mode == "absorb" and not calibrated:
        raise Mha2mlaError("--biases absorb fits bias-free projections on calibration data: add --calibration, or use "
                           "--biases keep")
    if mode == "absorb" and source.bias["o"]:
        raise Mha2mlaError("--biases absorb: this source's o_proj has a bias, a constant no bias-free layer can add; "
                           "use --biases keep")
    return mode == "keep" or not calibrated or source.bias["o"]


def _rope_schedule(source: SourceModel, rope_dim: int, rope_stride: int | None, mode: str) -> tuple[int, str, tuple[int, ...]]:
    """``(stride, target rope type, zero planes)``. A ``default`` target keeps the planes whose source frequency is
    unscaled and zeroes the rest; without a stride given, it takes the stride that keeps the most such planes (ties:
    the larger stride, which keeps θ at ``head_dim/D``). A kept scaling (``linear``, ``llama3``: functions of each
    frequency alone) rotates the kept planes exactly at any stride; its default is ``head_dim/D``."""
    hd, kind = source.head_dim, source.rope["rope_type"]
    max_stride = hd // rope_dim
    given = max_stride if rope_stride is None else int(rope_stride)
    if kind == "default" or mode == "keep":
        return given, kind, ()
    unchanged = unscaled_frequencies(rope=source.rope, head_dim=hd)
    kept = {s: unchanged[kept_frequencies(head_dim=hd, rope_dim=rope_dim, stride=s)] for s in range(1, max_stride + 1)}
    stride = max(kept, key=lambda s: (int(kept[s].sum()), s)) if rope_stride is None else given
    if kept[stride].any():
        return stride, "default", tuple(int(m) for m in torch.nonzero(~kept[stride]).flatten())
    if mode == "portable":
        raise Mha2mlaError(f"--rope-scaling portable: the source's {kind!r} rope scaling changes every frequency kept "
                           f"at stride {stride}, so a default rope reproduces none of them; use --rope-scaling keep")
    return given, kind, ()
