"""Weight-absorbed MLA decoding for stock transformers ``DeepseekV3ForCausalLM`` models.

The stock attention caches the normalised latent ``c`` (``kv_lora_rank`` = R values per token) and the roped shared
key ``k_pe`` (``qk_rope_head_dim`` = D values), then re-expands the *whole* cached latent with ``kv_b_proj`` at every
step: O(context · R · heads · (qk_nope + v)) work per decode step. Weight absorption (DeepSeek-V2 §2.1.2) never
expands the cache. With ``kv_b_proj`` split per head h into ``W_uk[h]`` (qk_nope × R) and ``W_uv[h]`` (v × R)::

    score[h, t] = (q_nope[h] · W_uk[h] c_t  +  q_pe[h] · k_pe_t) · scale
                = ((W_uk[h]ᵀ q_nope[h]) · c_t  +  q_pe[h] · k_pe_t) · scale      # query moved into latent space
    out[h]      = W_uv[h] Σ_t softmax(score[h])_t c_t                              # attend over c, then up-project

i.e. multi-query attention with one shared head of width R + D (values: width R), costing
O(context · heads · (R + D)) per decode step. The same cache tensors serve both paths. Long prefills stay expanded
(cheaper there: see :func:`absorbed_is_cheaper`), but go through SDPA with V zero-padded to the qk head width: the
stock call, with qk_nope + qk_rope ≠ v, misses torch's fused CPU kernel (the math fallback: slower, O(T²) memory).

Nothing in the checkpoint changes: :func:`absorb` only replaces each attention module's ``forward`` on the loaded
model (an instance attribute; the parameters, ``state_dict`` and ``save_pretrained`` output are untouched), so the same
directory keeps loading and running in plain transformers without mha2mla (and vLLM/SGLang absorb on their own).

>>> model = absorb(DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16))  # doctest: +SKIP
>>> model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)  # doctest: +SKIP
>>> with absorbed(model, mode="always"): ...     # or unabsorb(model)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)

__all__ = ["absorb", "unabsorb", "absorbed", "is_absorbed", "absorbed_is_cheaper"]

Mode = Literal["auto", "always"]
_MODES = ("auto", "always")
_MODE_ATTR = "_mha2mla_absorb_mode"


def _attention_modules(model: nn.Module) -> list[DeepseekV3Attention]:
    modules = [m for m in model.modules() if isinstance(m, DeepseekV3Attention)]
    if not modules:
        raise TypeError(f"{type(model).__name__} has no DeepseekV3Attention modules; absorb() needs DeepSeek-V3")
    return modules


def absorb(model: nn.Module, *, mode: Mode = "auto") -> nn.Module:
    """Make every ``DeepseekV3Attention`` in ``model`` use weight absorption; returns ``model`` (changed in place).

    Works with stock ``model.generate(...)``, ``DynamicCache``/``StaticCache``, left padding, fp32 and bf16. Calling it
    again only updates ``mode`` (idempotent). Training mode, and masks that are not 4-D tensors (flash-attention's 2-D
    masks, flex-attention block masks), always take the stock path.

    Args:
        model: a loaded ``DeepseekV3ForCausalLM`` (or any module containing ``DeepseekV3Attention`` layers).
        mode: ``"auto"`` absorbs a step when it needs fewer multiply-adds than the stock path (decode steps and short
            chunks over a cache; long prefills stay on the stock, fused-kernel path); ``"always"`` absorbs every step.

    Raises:
        ValueError: for an unknown ``mode``.
        TypeError: when ``model`` has no ``DeepseekV3Attention`` module.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    for attn in _attention_modules(model):
        attn.__dict__[_MODE_ATTR] = mode
        if getattr(attn.__dict__.get("forward"), "__func__", None) is not _absorbed_forward:
            attn.forward = types.MethodType(_absorbed_forward, attn)
    return model


def unabsorb(model: nn.Module) -> nn.Module:
    """Restore the stock attention forward everywhere in ``model``; a no-op on a model never absorbed."""
    for attn in _attention_modules(model):
        _restore_stock(attn)
    return model


def _restore_stock(attn: DeepseekV3Attention) -> None:
    attn.__dict__.pop(_MODE_ATTR, None)
    if getattr(attn.__dict__.get("forward"), "__func__", None) is _absorbed_forward:
        del attn.__dict__["forward"]


def is_absorbed(model: nn.Module) -> bool:
    """Whether every ``DeepseekV3Attention`` in ``model`` currently uses :func:`absorb`'s forward."""
    return all(_MODE_ATTR in attn.__dict__ for attn in _attention_modules(model))


@contextlib.contextmanager
def absorbed(model: nn.Module, *, mode: Mode = "auto") -> Iterator[nn.Module]:
    """Context manager: absorb inside the block, restore the previous state (absorbed or not, and its mode) after."""
    previous = [attn.__dict__.get(_MODE_ATTR) for attn in _attention_modules(model)]
    absorb(model, mode=mode)
    try:
        yield model
    finally:
        for attn, prev in zip(_attention_modules(model), previous):
            if prev is None:
                _restore_stock(attn)
            else:
                attn.__dict__[_MODE_ATTR] = prev


def absorbed_is_cheaper(
    *, query_len: int, kv_len: int, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
    v_head_dim: int,
) -> bool:
    """Whether one attention step costs fewer multiply-adds absorbed than expanded (per batch row; the shared
    projections, identical on both paths, are left out).

    stock:    kv·R·H·(nope+v)  +  q·kv·H·(nope+rope+v)          (expand the cache, then attend)
    absorbed: q·H·R·(nope+v)   +  q·kv·H·(2R+rope)              (absorb W_uk / W_uv, attend over the latent)

    For R=96, nope=v=64, rope=32 the absorbed step is cheaper up to q ≈ 190 new tokens; for 512+64 with 128-wide
    heads up to q ≈ 170.
    """
    q, t, h, r = query_len, kv_len, num_heads, kv_lora_rank
    stock = t * r * h * (qk_nope_head_dim + v_head_dim) + q * t * h * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)
    absorbed_cost = q * h * r * (qk_nope_head_dim + v_head_dim) + q * t * h * (2 * r + qk_rope_head_dim)
    return absorbed_cost < stock


def _absorbed_forward(
    self: DeepseekV3Attention,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    cache=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``DeepseekV3Attention.forward`` with weight absorption (bound to one attention module by :func:`absorb`).

    Each step takes one of three paths: absorbed attention over the cached latent (decode); expanded attention through
    SDPA with V zero-padded to the qk head width (long prefills under ``sdpa``: with qk ≠ v head dims torch's CPU
    flash kernel is skipped for the math fallback, slower and O(T²) memory); or the stock forward (the rest).
    """
    if cache is None and "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values")
    batch, q_len = hidden_states.shape[:-1]
    mask_ok = attention_mask is None or (torch.is_tensor(attention_mask) and attention_mask.dim() == 4)
    if self.training or not mask_ok:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    use_absorbed = True
    if self.__dict__.get(_MODE_ATTR, "auto") == "auto":
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        use_absorbed = absorbed_is_cheaper(
            query_len=q_len, kv_len=past + q_len, num_heads=self.num_heads, kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
        )
    if not use_absorbed and (self.config._attn_implementation != "sdpa" or self.qk_head_dim == self.v_head_dim):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)

    heads, rank, v_dim = self.num_heads, self.kv_lora_rank, self.v_head_dim
    nope, rope = self.qk_nope_head_dim, self.qk_rope_head_dim

    # Projections and RoPE exactly as the stock forward, so the cache receives the same tensors.
    if self.q_lora_rank is None:
        q_states = self.q_proj(hidden_states)
    else:
        q_states = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q_states = q_states.view(batch, q_len, heads, self.qk_head_dim).transpose(1, 2)  # [B, H, q, nope+rope]
    q_nope, q_rot = torch.split(q_states, [nope, rope], dim=-1)

    compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
    kv_nope, k_rot = torch.split(compressed_kv, [rank, rope], dim=-1)
    kv_nope = self.kv_a_layernorm(kv_nope).view(batch, 1, q_len, rank)
    k_rot = k_rot.view(batch, 1, q_len, rope)

    cos, sin = position_embeddings
    if self.config.rope_interleave:
        q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
    else:
        q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)

    if cache is not None:
        kv_nope, k_rot = cache.update(kv_nope, k_rot, self.layer_idx, kwargs=kwargs)

    if not use_absorbed:
        return _expanded_sdpa(self, q_nope, q_rot, kv_nope, k_rot, attention_mask), None

    latent = kv_nope[:, 0]  # [B, T, R]  (views of the cache, never expanded)
    k_pe = k_rot[:, 0]  # [B, T, D]
    kv_len = latent.shape[-2]

    # Absorb W_uk into the query: q_lat[h] = W_uk[h]ᵀ q_nope[h]. kv_b_proj.weight is [H·(nope+v), R].
    w_kv = self.kv_b_proj.weight.view(heads, nope + v_dim, rank)
    w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]  # [H, nope, R], [H, v, R]
    q_lat = torch.matmul(q_nope * self.scaling, w_uk)  # [B, H, q, R]
    q_rot = q_rot * self.scaling

    # One shared key/value head: fold heads into the query rows ([B, H·q, ·]) so nothing is broadcast-copied.
    scores = torch.bmm(q_lat.reshape(batch, heads * q_len, rank), latent.transpose(1, 2))
    scores = scores.baddbmm_(q_rot.reshape(batch, heads * q_len, rope), k_pe.transpose(1, 2))
    scores = scores.view(batch, heads, q_len, kv_len).float()  # mask and softmax in fp32 (as the stock eager path)
    scores = _apply_mask(scores, attention_mask, q_len=q_len, kv_len=kv_len)
    probs = torch.softmax(scores, dim=-1).to(latent.dtype)

    out_lat = torch.bmm(probs.view(batch, heads * q_len, kv_len), latent).view(batch, heads, q_len, rank)
    out = torch.matmul(out_lat, w_uv.transpose(1, 2))  # [B, H, q, v]: apply W_uv per head
    out = out.transpose(1, 2).reshape(batch, q_len, heads * v_dim)
    return self.o_proj(out), probs


def _expanded_sdpa(self: DeepseekV3Attention, q_nope, q_rot, kv_nope, k_rot, attention_mask) -> torch.Tensor:
    """The stock expanded attention through SDPA, V zero-padded to the qk head width so the fused kernel applies.

    Mask semantics follow transformers' ``sdpa_attention_forward``: no mask with several queries means causal,
    aligned top-left (the mask is only ever omitted when there is no past, or for an empty static cache)."""
    batch, heads, q_len, _ = q_nope.shape
    v_dim = self.v_head_dim
    query = torch.cat((q_nope, q_rot), dim=-1)
    key, value = self.expand_kv(kv_nope, k_rot)
    value = torch.nn.functional.pad(value, (0, self.qk_head_dim - v_dim))
    is_causal = attention_mask is None and q_len > 1
    if is_causal and key.shape[-2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    mask = None if attention_mask is None else attention_mask[..., : key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=self.scaling
    )
    out = out[..., :v_dim].transpose(1, 2).reshape(batch, q_len, heads * v_dim)
    return self.o_proj(out)


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor | None, *, q_len: int, kv_len: int) -> torch.Tensor:
    """Apply a transformers 4-D mask ([B|1, 1, q, ≥kv]; bool keep-mask or additive float) or, for ``None``, causal
    masking aligned top-left as transformers' SDPA path does (query i sees keys 0..i: the mask is only omitted when
    there is no past, or for an empty static cache whose tail is still unwritten)."""
    neg = torch.finfo(scores.dtype).min  # finite: a fully masked (padding) row gives a uniform row, not NaN
    if mask is None:
        if q_len == 1:
            return scores
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).triu(1)
        return scores.masked_fill(future, neg)
    mask = mask[..., -q_len:, :kv_len]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, neg)
    return scores + mask.to(scores.dtype)
