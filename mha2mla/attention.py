"""One attention layer, source → MLA (pure math: tensors in, tensors out; no files, no models).

Source (Llama/Mistral/Qwen2, rotate-half RoPE, GQA with ``n_kv`` KV heads)::

    q_h = W_q,h x + b_q,h     k_g = W_k,g x + b_k,g     v_g = W_v,g x + b_v,g      score = q_h·k_g(h) / sqrt(hd)

Target (DeepseekV3 attention, ``q_lora_rank=None``)::

    q_h      = [q_nope,h ; q_rope,h]                       (q_proj; scaled so the softmax scale matches)
    c        = RMSNorm_lin(α · W_down x)                    (kv_a_proj_with_mqa latent rows; norm made linear)
    k_rope   = shared rope key                             (kv_a_proj_with_mqa last D rows; one head)
    k_nope,h = W_upK,g(h) c      v_h = W_upV,g(h) c        (kv_b_proj, repeated across the heads of a group)

Biases: the no-RoPE part of a key bias adds a per-query constant to the scores and drops exactly; a value bias passes
to the output as ``W_o b_v`` (softmax weights sum to 1); the rope part of a key bias rides on
``kv_a_proj_with_mqa.bias``; a query bias needs ``q_a_proj`` (``q_lora_rank = hidden``, ``q_a_proj = α·I`` with the
bias pre-image, ``q_a_layernorm`` made linear, ``q_b_proj`` = the query rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mha2mla.factorize import factorize_latent, linear_norm_scale
from mha2mla.plan import TARGET_EPS, ConversionPlan
from mha2mla.rope import key_planes, kept_frequencies, principal_mix, split_rope

__all__ = ["LayerStats", "AttentionWeights", "convert_attention"]


@dataclass
class AttentionWeights:
    """A source layer's attention weights (``[out, in]`` like ``nn.Linear``), biases optional."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


@dataclass
class LayerStats:
    """What the conversion of one layer cost (recorded in ``mha2mla.json``)."""

    k_rel_error: float
    v_rel_error: float
    energy_kept: float
    rope_energy_kept: float
    latent_scale: float
    q_bias_residual: float = 0.0
    singular_values: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "k_rel_error": self.k_rel_error,
            "v_rel_error": self.v_rel_error,
            "svd_energy_kept": self.energy_kept,
            "rope_energy_kept": self.rope_energy_kept,
            "latent_scale": self.latent_scale,
            "q_bias_residual": self.q_bias_residual,
        }


def _with_bias(w: torch.Tensor, b: torch.Tensor | None, heads: int, hd: int) -> torch.Tensor:
    w = w.reshape(heads, hd, -1)
    return w if b is None else torch.cat((w, b.reshape(heads, hd, 1)), dim=-1)


def convert_attention(
    *, plan: ConversionPlan, weights: AttentionWeights, input_norm_bound: float, rope_gram: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], LayerStats]:
    """Convert one attention layer.

    Args:
        plan: the target shapes and constants.
        weights: source weights, in the compute dtype (float64 recommended for small models, float32 for large).
        input_norm_bound: upper bound of ``‖x‖`` for the attention input (``sqrt(hidden)·max|γ|``).
        rope_gram: optional ``[D/2, n_kv, n_kv]`` Hermitian matrices for the per-frequency PCA (calibration).

    Returns:
        ``(tensors, stats)``: target tensors named relative to ``self_attn.`` and the layer's statistics.
    """
    n_h, n_kv, hd, hidden, d = plan.n_heads, plan.n_kv, plan.head_dim, plan.hidden, plan.rope_dim
    q = _with_bias(weights.q, weights.q_bias, n_h, hd)
    k = _with_bias(weights.k, weights.k_bias, n_kv, hd)
    freqs = kept_frequencies(head_dim=hd, rope_dim=d, stride=plan.rope_stride)
    planes = key_planes(k[..., :hidden], freqs)
    w_mix, c_mix = principal_mix(planes, gram=rope_gram)
    q_rope, k_rope, k_nope = split_rope(q=q, k=k, freqs=freqs, w=w_mix, c=c_mix)
    kept_energy = float(planes.abs().pow(2).sum())
    rope_energy = float(k_rope[:, :hidden].pow(2).sum()) / kept_energy if kept_energy > 0 else 1.0

    latent = factorize_latent(k=k_nope[..., :hidden].reshape(n_kv * hd, hidden), v=weights.v, rank=plan.rank)
    alpha, norm_w = linear_norm_scale(down=latent.down, input_norm_bound=input_norm_bound, eps=TARGET_EPS)
    out: dict[str, torch.Tensor] = {}
    out["kv_a_proj_with_mqa.weight"] = torch.cat((latent.down * alpha, k_rope[:, :hidden]), dim=0)
    out["kv_a_layernorm.weight"] = torch.full((plan.rank,), norm_w, dtype=weights.k.dtype)
    group = torch.arange(n_h) // (n_h // n_kv)
    up_k = latent.up_k.reshape(n_kv, hd, plan.rank)[group]
    up_v = latent.up_v.reshape(n_kv, hd, plan.rank)[group]
    out["kv_b_proj.weight"] = torch.cat((up_k, up_v), dim=1).reshape(n_h * 2 * hd, plan.rank)

    q_full = torch.cat((q, q_rope), dim=1) * math.sqrt((hd + d) / hd)  # softmax scale (hd+D)^-½ → hd^-½
    q_full = q_full.reshape(n_h * (hd + d), -1)
    q_bias_residual = 0.0
    if plan.q_lora_rank is None:
        out["q_proj.weight"] = q_full[:, :hidden]
    else:
        w, b = q_full[:, :hidden], q_full[:, hidden]
        beta = torch.linalg.lstsq(w, b[:, None]).solution[:, 0]  # q = W x + b = W (x + β)
        q_bias_residual = float((w @ beta - b).norm() / b.norm().clamp_min(1e-30))
        eye = torch.eye(hidden, dtype=w.dtype)
        a_q, w_q = linear_norm_scale(down=eye, input_norm_bound=input_norm_bound + float(beta.norm()), eps=TARGET_EPS)
        out["q_a_proj.weight"] = eye * a_q
        out["q_a_proj.bias"] = beta * a_q
        out["q_a_layernorm.weight"] = torch.full((hidden,), w_q, dtype=w.dtype)
        out["q_b_proj.weight"] = w

    s = plan.residual_scale
    out["o_proj.weight"] = weights.o * s
    if plan.attention_bias:
        kv_bias = torch.zeros(plan.rank + d, dtype=weights.k.dtype)
        if weights.k_bias is not None:
            kv_bias[plan.rank :] = k_rope[:, hidden]
        out["kv_a_proj_with_mqa.bias"] = kv_bias
        o_bias = torch.zeros(hidden, dtype=weights.o.dtype) if weights.o_bias is None else weights.o_bias.clone()
        if weights.v_bias is not None:
            o_bias = o_bias + weights.o @ weights.v_bias.reshape(n_kv, hd)[group].reshape(-1)
        out["o_proj.bias"] = o_bias * s
        if plan.q_lora_rank is None and weights.q_bias is not None:  # pragma: no cover - plan guarantees q_lora
            raise AssertionError("a query bias needs q_lora_rank")
    stats = LayerStats(
        k_rel_error=latent.k_rel_error, v_rel_error=latent.v_rel_error, energy_kept=latent.energy_kept,
        rope_energy_kept=rope_energy, latent_scale=alpha, q_bias_residual=q_bias_residual,
        singular_values=[float(x) for x in latent.singular_values],
    )
    return out, stats
