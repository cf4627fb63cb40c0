"""Plain-torch reference forwards of one attention layer, source and MLA (pure math, used to measure conversions).

Both take the attention input ``x [B, L, hidden]`` (after the layer's input RMSNorm) and the angles
``pos·ω`` of their rotary frequencies, and return the attention block's output ``[B, L, hidden]`` (after ``o_proj``).
They follow transformers' Llama and DeepseekV3 attention exactly (causal, no padding).
"""

from __future__ import annotations


import torch

from mha2mla.ops.moments import block_edges
from mha2mla.ops.shapes import TARGET_EPS, ConversionPlan

__all__ = ["absorbs_keys", "causal_score_blocks", "causal_sdpa", "key_up_projection", "mla_attention", "mla_head_contexts",
           "mla_latent", "mla_output", "mla_output_from_contexts", "mla_score_inputs", "query_features",
           "query_weight_name", "relative_output_error", "rotate_half", "rotate_interleaved", "source_attention",
           "source_output_from_heads", "source_qkv", "value_up_projection", "weighted_sum"]


def rotate_half(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention ``[B, heads, L, d_v]`` of ``q, k [B, heads, L, d]`` and ``v [B, heads, L, d_v]``.

    On the CPU, torch's fused (flash) kernel needs ``d == d_v`` and otherwise falls back to materialising the scores;
    MLA has ``d = head_dim + rope_dim`` and, for the latent contexts, ``d_v = rank``. Zero-padding the narrower side
    changes no score or output and lets the fused kernel run.
    """
    dq, dv = q.shape[-1], v.shape[-1]
    if dq == dv or q.device.type != "cpu":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    pad = torch.nn.functional.pad
    if dq < dv:
        q, k = pad(q, (0, dv - dq)), pad(k, (0, dv - dq))
    else:
        v = pad(v, (0, dq - dv))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out[..., :dv]


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``q, k, v: [B, heads, L, d]`` → ``[B, L, heads·d_v]``."""
    return causal_sdpa(q, k, v, scale).transpose(1, 2).flatten(2)


def source_qkv(*, weights, x: torch.Tensor, angles: torch.Tensor, n_heads: int, n_kv: int, head_dim: int,
               values: bool = True, repeat: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Source queries ``[B, n_heads, L, head_dim]`` and keys (rotated) and values, ``[B, n_heads, L, head_dim]`` with
    the KV heads repeated per group, or ``[B, n_kv, L, head_dim]`` without ``repeat`` (values None unless ``values``),
    in ``x``'s dtype. The rotation is computed in the precision of ``angles`` and then cast: callers pass float32 (or
    float64) angles with bfloat16 inputs, since a bfloat16 angle is off by radians at long positions."""
    b, l, _ = x.shape

    def proj(w, bias, heads):
        y = x @ w.T + (0 if bias is None else bias)
        return y.view(b, l, heads, head_dim).transpose(1, 2)

    def grouped(t):
        return t.repeat_interleave(n_heads // n_kv, dim=1) if repeat else t

    q = rotate_half(proj(weights.q, weights.q_bias, n_heads), angles).to(x.dtype)
    k = grouped(rotate_half(proj(weights.k, weights.k_bias, n_kv), angles).to(x.dtype))
    v = grouped(proj(weights.v, weights.v_bias, n_kv)) if values else None
    return q, k, v


def source_attention(*, weights, x: torch.Tensor, angles: torch.Tensor, n_heads: int, n_kv: int, head_dim: int,
                     heads: bool = False) -> torch.Tensor:
    """Llama/Mistral/Qwen2 attention. ``weights``: :class:`mha2mla.conversion.latent.AttentionWeights`; ``angles [L, hd/2]``.

    With ``heads`` returns each head's output before ``o_proj`` (``[B, heads, L, head_dim]``) instead.
    """
    # on the CPU the fused kernel reads each KV head once (enable_gqa); elsewhere the KV heads are repeated, since
    # not every CUDA kernel takes grouped heads in every dtype and the fallback would form the L×L scores
    gqa = n_kv != n_heads and x.device.type == "cpu"
    q, k, v = source_qkv(weights=weights, x=x, angles=angles, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
                         repeat=not gqa)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head_dim**-0.5,
                                                           enable_gqa=gqa)
    return out if heads else source_output_from_heads(weights=weights, heads=out)


def source_output_from_heads(*, weights, heads: torch.Tensor) -> torch.Tensor:
    """The source attention block's output ``[B, L, hidden]`` from its heads' outputs ``[B, heads, L, head_dim]``
    (``o_proj``, with its bias when there is one)."""
    out = heads.transpose(1, 2).flatten(2) @ weights.o.T
    return out if weights.o_bias is None else out + weights.o_bias


def query_weight_name(tensors: dict) -> str:
    """The converted tensor that maps the (normalised) query input to the heads' queries."""
    return "q_proj.weight" if "q_proj.weight" in tensors else "q_b_proj.weight"


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + TARGET_EPS))


def query_features(tensors: dict, x: torch.Tensor) -> torch.Tensor:
    """What the query weight (:func:`query_weight_name`) multiplies: ``x`` itself, or the (linear) query norm's
    output."""
    if "q_proj.weight" in tensors:
        return x
    qa = x @ tensors["q_a_proj.weight"].T + tensors["q_a_proj.bias"]
    return _rms(qa, tensors["q_a_layernorm.weight"])


def _mla_queries(tensors: dict, plan: ConversionPlan, x: torch.Tensor) -> torch.Tensor:
    """DeepseekV3 queries ``[B, heads, L, hd+D]`` before the rotation of their rope part."""
    b, l, _ = x.shape
    q = query_features(tensors, x) @ tensors[query_weight_name(tensors)].T
    return q.view(b, l, plan.n_heads, plan.head_dim + plan.rope_dim).transpose(1, 2)


def mla_latent(tensors: dict, plan: ConversionPlan, x: torch.Tensor,
                angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached per-token state: the normalised latent ``c [B, L, R]`` and the rotated shared rope key ``[B, L, D]``."""
    r = plan.rank
    kv_a = x @ tensors["kv_a_proj_with_mqa.weight"].T + tensors.get("kv_a_proj_with_mqa.bias", 0)
    return _rms(kv_a[..., :r], tensors["kv_a_layernorm.weight"]), rotate_interleaved(kv_a[..., r:], angles)


def mla_score_inputs(tensors: dict, plan: ConversionPlan, x: torch.Tensor, angles: torch.Tensor, values: bool = True):
    """DeepseekV3 queries and keys ``[B, heads, L, hd+D]`` (rope part rotated), the latent ``c [B, L, R]`` and the
    values ``[B, heads, L, hd]`` (None unless ``values``)."""
    b, l, _ = x.shape
    n_h, hd, r = plan.n_heads, plan.head_dim, plan.rank
    q = _mla_queries(tensors, plan, x)
    c, k_pe = mla_latent(tensors, plan, x, angles)
    kv_b = tensors["kv_b_proj.weight"].view(n_h, 2 * hd, r)
    kv_b = kv_b if values else kv_b[:, :hd]
    kv = (c @ kv_b.reshape(-1, r).T).view(b, l, n_h, -1).transpose(1, 2)
    k_nope, v = kv[..., :hd], (kv[..., hd:] if values else None)
    qq = torch.cat((q[..., :hd], rotate_interleaved(q[..., hd:], angles)), dim=-1)
    kk = torch.cat((k_nope, k_pe[:, None].expand(-1, n_h, -1, -1)), dim=-1)
    return qq, kk, c, v


def absorbs_keys(plan: ConversionPlan) -> bool:
    """Whether scores are computed against the cached state itself rather than against per-head keys: with the key
    up-projection folded into the queries (``q_h·W_upK,h c = (W_upK,hᵀ q_h)·c``) every head reads the one shared key
    ``[c; k_pe]`` of width ``R+D`` instead of its own of width ``hd+D``, and no per-head keys are formed; fewer flops
    when ``R < hd``, and only then."""
    return plan.rank < plan.head_dim


def key_up_projection(tensors: dict, plan: ConversionPlan) -> torch.Tensor:
    """``W_upK`` per head, ``[H, hd, R]`` (a view of ``kv_b_proj``'s key rows)."""
    return tensors["kv_b_proj.weight"].view(plan.n_heads, 2 * plan.head_dim, plan.rank)[:, : plan.head_dim]


def value_up_projection(tensors: dict, plan: ConversionPlan) -> torch.Tensor:
    """``W_upV`` per head, ``[H, hd, R]`` (a view of ``kv_b_proj``'s value rows)."""
    return tensors["kv_b_proj.weight"].reshape(plan.n_heads, 2 * plan.head_dim, plan.rank)[:, plan.head_dim :]


def _absorbed_query_weight(tensors: dict, plan: ConversionPlan) -> torch.Tensor:
    """``[heads·(R+D), in]``: the query weight (``q_proj``, or ``q_b_proj`` behind the query norm) with each head's
    key up-projection folded into its non-rope rows, ``W_upK,hᵀ W_q,h`` (R rows instead of hd), its rope rows as they
    are: the absorbed queries in one product with fewer outputs, ``x·(W_upK,hᵀ W_q,h)ᵀ = (x·W_q,hᵀ)·W_upK,h``."""
    hd, d = plan.head_dim, plan.rope_dim
    w = tensors[query_weight_name(tensors)]
    w = w.view(plan.n_heads, hd + d, w.shape[-1])
    folded = key_up_projection(tensors, plan).transpose(1, 2).to(w.dtype) @ w[:, :hd]  # [H, R, in]
    return torch.cat((folded, w[:, hd:]), dim=1).reshape(-1, w.shape[-1])


def _mla_absorbed_inputs(tensors: dict, plan: ConversionPlan, x: torch.Tensor, angles: torch.Tensor):
    """Absorbed scores' inputs (:func:`absorbs_keys`): queries ``[B, heads, L, R+D]`` (``W_upK,hᵀ q_nope,h`` and the
    rotated rope part, from :func:`_absorbed_query_weight`), the shared keys ``[c; k_pe]`` ``[B, L, R+D]`` and the
    latent ``c [B, L, R]``."""
    b, l, _ = x.shape
    r = plan.rank
    q = query_features(tensors, x) @ _absorbed_query_weight(tensors, plan).T
    q = q.view(b, l, plan.n_heads, r + plan.rope_dim).transpose(1, 2)
    c, k_pe = mla_latent(tensors, plan, x, angles)
    qq = torch.cat((q[..., :r], rotate_interleaved(q[..., r:], angles)), dim=-1)
    return qq, torch.cat((c, k_pe), dim=-1), c


def mla_attention(*, tensors: dict, plan: ConversionPlan, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """DeepseekV3 attention from converted ``tensors`` (names relative to ``self_attn.``); ``angles [L, D/2]``."""
    qq, kk, _, v = mla_score_inputs(tensors, plan, x, angles)
    out = _causal_attention(qq, kk, v, (plan.head_dim + plan.rope_dim) ** -0.5)
    return out @ tensors["o_proj.weight"].T + tensors.get("o_proj.bias", 0)


def relative_output_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """``‖got − ref‖ / ‖ref‖`` over all positions."""
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def mla_head_contexts(*, tensors: dict, plan: ConversionPlan, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """``[B, heads, L, R]``: each head's attention-weighted latent ``c̄_h,m = Σ_n p_h,mn c_n`` in the converted layer.

    The value path is linear in it: head ``h`` outputs ``W_upV,h c̄_h``, and the layer ``Σ_h W_o,h W_upV,h c̄_h``.
    """
    scale = (plan.head_dim + plan.rope_dim) ** -0.5
    if x.device.type != "cpu":
        qq, kk, c, _ = mla_score_inputs(tensors, plan, x, angles, values=False)
        return causal_sdpa(qq, kk, c[:, None].expand(-1, plan.n_heads, -1, -1), scale)
    if absorbs_keys(plan):
        qq, kk, c = _mla_absorbed_inputs(tensors, plan, x, angles)
    else:
        qq, kk, c, _ = mla_score_inputs(tensors, plan, x, angles, values=False)
    return _shared_value_attention(qq, kk, c, scale)


# Blocks of queries for the latent contexts on the CPU (each block reads the keys up to its last query).
CONTEXT_QUERY_BLOCKS = 8


def causal_score_blocks(q: torch.Tensor, k: torch.Tensor, blocks: int, rows: torch.Tensor | None = None):
    """Causal scores a block of queries at a time: yields ``(r0, r1, q[..., r0:r1, :] · k[..., :e, :]ᵀ)`` with −inf
    on the keys each query cannot see, for ``blocks`` near-equal query blocks (:func:`mha2mla.ops.moments.block_edges`).
    Each block reads only the keys up to its last query (``e = r1``: 5/8 of the score matrix at 4 blocks, 9/16 at 8),
    and its scores are a fresh tensor the caller may overwrite. ``q [B, H, L, d]``; ``k [B, H, L, d]``, or ``[B, L, d]``
    shared by all heads (one product per block, no per-head copy of the keys). ``rows``: the sorted positions of
    ``q``'s rows when they are a few queries of a longer sequence (``e = rows[r1−1] + 1``); default ``0…L−1``."""
    edges = block_edges(q.shape[-2], blocks)
    shared = k.dim() == q.dim() - 1
    for r0, r1 in zip(edges[:-1], edges[1:]):
        end = r1 if rows is None else int(rows[r1 - 1]) + 1
        if shared:
            b, h = q.shape[:2]
            s = (q[..., r0:r1, :].reshape(b, h * (r1 - r0), -1) @ k[:, :end].transpose(-1, -2)).view(b, h, r1 - r0, end)
        else:
            s = q[..., r0:r1, :] @ k[..., :end, :].transpose(-1, -2)
        if rows is None:
            s[..., r0:].masked_fill_(~torch.ones(r1 - r0, r1 - r0, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        else:
            s.masked_fill_(torch.arange(end, device=q.device)[None, :] > rows[r0:r1, None], float("-inf"))
        yield r0, r1, s


def weighted_sum(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p [B, H, m, n] @ v`` for ``v [B, H, n, d]`` or ``[B, n, d]`` shared by all heads (one product, no copies)."""
    if v.dim() == p.dim():
        return p @ v
    b, h, m, n = p.shape
    return (p.reshape(b, h * m, n) @ v).view(b, h, m, v.shape[-1])


def _shared_value_attention(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention ``[B, heads, L, R]`` of ``q [B, heads, L, d]`` and keys ``k`` (``[B, heads, L, d]``, or
    ``[B, L, d]`` shared, :func:`causal_score_blocks`) over values ``c [B, L, R]`` shared by all heads (the latent), on
    the CPU: a block of queries at a time, every head's probabilities times the one latent in a single product (no
    per-head copies of the latent, unlike the padded fused kernel of :func:`causal_sdpa`)."""
    b, h, l, _ = q.shape
    r = c.shape[-1]
    out = torch.empty(b, h, l, r, dtype=q.dtype, device=q.device)
    for r0, r1, s in causal_score_blocks(q * scale, k, CONTEXT_QUERY_BLOCKS):
        out[..., r0:r1, :] = weighted_sum(s.softmax(-1), c[:, :r1])
    return out


def mla_output_from_contexts(*, tensors: dict, plan: ConversionPlan, contexts: torch.Tensor) -> torch.Tensor:
    """The attention block's output ``[B, L, hidden]`` from :func:`mla_head_contexts` (equal to :func:`mla_attention`
    on the same input: values are linear in the latent, so ``Σ_n p_mn W_upV c_n = W_upV c̄_m``)."""
    n_h, hd, r = plan.n_heads, plan.head_dim, plan.rank
    up_v = value_up_projection(tensors, plan).to(contexts.dtype)
    w_o = tensors["o_proj.weight"].to(contexts.dtype)
    if r * plan.hidden < hd * (r + plan.hidden):
        # a narrow latent: one product with the folded value path W_o,h·W_upV,h ([hidden, heads·R]) costs less than
        # up-projecting every head first (fewer flops)
        path = torch.einsum("ohd,hdr->ohr", w_o.reshape(-1, n_h, hd), up_v).flatten(1)
        out = contexts.transpose(1, 2).flatten(2) @ path.T
    else:
        heads = torch.matmul(contexts, up_v.transpose(1, 2)).transpose(1, 2).flatten(2)
        out = heads @ w_o.T
    return out + tensors.get("o_proj.bias", 0)


def mla_output(*, tensors: dict, plan: ConversionPlan, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """A converted layer's output on ``x``: :func:`mla_attention`, or below head_dim (:func:`absorbs_keys`) the same
    from the absorbed latent contexts, which score the cached state instead of per-head keys and values (cheaper
    there)."""
    if not absorbs_keys(plan):
        return mla_attention(tensors=tensors, plan=plan, x=x, angles=angles)
    contexts = mla_head_contexts(tensors=tensors, plan=plan, x=x, angles=angles)
    return mla_output_from_contexts(tensors=tensors, plan=plan, contexts=contexts)
