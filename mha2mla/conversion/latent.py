"""One attention layer, source → MLA (pure math: tensors in, tensors out; no files, no models).

Source (Llama/Mistral/Qwen2, rotate-half RoPE, GQA with ``n_kv`` KV heads)::

    q_h = W_q,h x + b_q,h     k_g = W_k,g x + b_k,g     v_g = W_v,g x + b_v,g      score = q_h·k_g(h) / sqrt(hd)

Target (DeepseekV3 attention, ``q_lora_rank=None``)::

    q_h      = [q_nope,h ; q_rope,h]                       (q_proj; scaled so the softmax scale matches)
    c        = RMSNorm_lin(α · W_down x)                    (kv_a_proj_with_mqa latent rows; norm made linear)
    k_rope   = shared rope key                             (kv_a_proj_with_mqa last D rows; one head)
    k_nope,h = W_upK,g(h) c      v_h = W_upV,g(h) c        (kv_b_proj, repeated across the heads of a group)

Biases: the no-RoPE part of a key bias adds a per-query constant to the scores and drops exactly. Calibrated (the
default, ``plan.attention_bias`` false), the query rows, the shared rope key and the values absorb theirs by least
squares on the layer's inputs (:func:`_absorb_biases`; engines drop attention biases). Kept (``--biases keep``): a
value bias passes to the output as ``W_o b_v`` (softmax weights sum to 1); the rope part of a key bias rides on
``kv_a_proj_with_mqa.bias``; a query bias needs ``q_a_proj`` (``q_lora_rank = hidden``, ``q_a_proj = α·I`` with the
bias pre-image, ``q_a_layernorm`` made linear, ``q_b_proj`` = the query rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mha2mla.conversion.options import Method
from mha2mla.conversion.stream import LayerCalibration
from mha2mla.ops.factorize import absorb_bias, balance_weight, factorize_latent, fit_up, linear_norm_scale, refine_latent, sqrtm_psd, cholesky_root
from mha2mla.ops.shapes import TARGET_EPS, ConversionPlan, kv_group
from mha2mla.ops.attention import mla_output, relative_output_error, source_attention, source_output_from_heads
from mha2mla.ops.rope import expected_rotation, key_planes, kept_frequencies, principal_mix, scale_planes, split_rope

__all__ = ["LayerStats", "AttentionWeights", "convert_attention", "rope_need", "rope_frequency_scores"]


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
    key_weight: float = 1.0
    output_rel_error: float | None = None
    output_fit_rel_error: float | None = None
    query_kl_before: float | None = None
    query_kl_after: float | None = None
    mlp_rel_change: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "k_rel_error": self.k_rel_error,
            "v_rel_error": self.v_rel_error,
            "svd_energy_kept": self.energy_kept,
            "rope_energy_kept": self.rope_energy_kept,
            "latent_scale": self.latent_scale,
            "q_bias_residual": self.q_bias_residual,
            "key_weight": self.key_weight,
            "attention_output_rel_error": self.output_rel_error,
            "output_fit_rel_error": self.output_fit_rel_error,
            "attention_kl_before_query_fit": self.query_kl_before,
            "attention_kl_after_query_fit": self.query_kl_after,
            "mlp_down_rel_change": self.mlp_rel_change,
            "seconds": round(self.seconds, 3),
        }


def _with_bias(w: torch.Tensor, b: torch.Tensor | None, heads: int, hd: int) -> torch.Tensor:
    w = w.reshape(heads, hd, -1)
    return w if b is None else torch.cat((w, b.reshape(heads, hd, 1)), dim=-1)


# Key weights (times the energy-balancing one) the balance search tries, from the top down: it stops at the first
# candidate that does not lower the layer's output error. Keys usually want the most weight, so most layers measure
# two candidates, not five. The grid stops at 16: above it the pre-fit error keeps falling in many layers, but the
# converted model gets worse (the value side still needs its share of the latent; benchmarks/RESULTS.md).
BALANCE_GRID = (16.0, 4.0, 1.0, 1 / 4, 1 / 16)


def _quadratic_planes(planes: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``E|z|²`` of complex planes ``[F, n, in]`` under the second moment ``sigma [in, in]`` → ``[F, n]``."""
    s = sigma.to(planes.dtype)
    return torch.einsum("fni,ij,fnj->fn", planes.conj(), s, planes).real


def _key_sigma(calib: LayerCalibration, method: Method) -> torch.Tensor:
    """The second moment the key side is fitted under: attention-weighted when asked and measured."""
    if method.attention_weighted_keys and calib.sigma_key is not None:
        return calib.sigma_key
    return calib.sigma


def rope_need(*, q: torch.Tensor, calib: LayerCalibration) -> torch.Tensor:
    """``[head_dim/2, n_heads]``: how much each query head's plane needs its rotation, ``E|q|²·(1 − |ρ|²)``.

    ``ρ = E[e^{-iΔω}]`` over the head's attention distances: a slow frequency barely turns over the distances a head
    looks at (|ρ|≈1) and loses little without RoPE; a fast one needs it.
    """
    hd = q.shape[1]
    sig = calib.sigma if q.shape[-1] == calib.sigma.shape[0] else calib.sigma[:-1, :-1]
    eq = _quadratic_planes(key_planes(q, torch.arange(hd // 2)), sig)
    rho = expected_rotation(distance_hist=calib.distance_hist, inv_freq=calib.inv_freq)  # [n_heads, F]
    return eq * (1 - rho.abs().pow(2)).T.to(eq.dtype)


def convert_attention(
    *, plan: ConversionPlan, weights: AttentionWeights, input_norm_bound: float, calib: LayerCalibration | None = None,
    method: Method = Method(),
) -> tuple[dict[str, torch.Tensor], LayerStats]:
    """Convert one attention layer.

    Args:
        plan: the target shapes and constants.
        weights: source weights, in the compute dtype (float64 recommended for small models, float32 for large).
        input_norm_bound: upper bound of ``‖x‖`` for the attention input (``sqrt(hidden)·max|γ|``).
        calib: this layer's calibration statistics; ``None`` converts data-free.
        method: calibrated ingredients to use (ignored without ``calib``).

    Returns:
        ``(tensors, stats)``: target tensors named relative to ``self_attn.`` and the layer's statistics.
    """
    n_h, n_kv, hd, hidden, d = plan.n_heads, plan.n_kv, plan.head_dim, plan.hidden, plan.rope_dim
    q = _with_bias(weights.q, weights.q_bias, n_h, hd)
    k = _with_bias(weights.k, weights.k_bias, n_kv, hd)
    freqs = kept_frequencies(head_dim=hd, rope_dim=d, stride=plan.rope_stride)
    group = kv_group(n_h, n_kv)
    planes = key_planes(k[..., :hidden], freqs)
    q_nope = q
    if calib is None:
        w_mix, c_mix = principal_mix(planes)
    else:
        sig_key = _key_sigma(calib, method)
        sig_k = sig_key if k.shape[-1] == hidden + 1 else sig_key[:-1, :-1]
        zk = key_planes(k, freqs)
        gram = torch.einsum("fgi,ij,fhj->fgh", zk, sig_k.to(zk.dtype), zk.conj())
        weights_g = None
        if method.weighted_rope:
            need = rope_need(q=q, calib=calib)[freqs]  # [F, n_heads]
            weights_g = torch.zeros(len(freqs), n_kv, dtype=need.dtype).index_add_(1, group, need)
        w_mix, c_mix = principal_mix(planes, gram=gram, weights=weights_g)
        if method.expected_rotation:
            rho = expected_rotation(distance_hist=calib.distance_hist, inv_freq=calib.inv_freq)
            q_nope = scale_planes(q, rho.conj().to(torch.complex128 if q.dtype == torch.float64 else torch.complex64))
    if plan.rope_zero:  # planes a default target cannot rotate at the source's (scaled) frequency carry nothing
        zero = torch.tensor(plan.rope_zero)
        w_mix, c_mix = w_mix.index_fill(0, zero, 0), c_mix.index_fill(0, zero, 0)
    q_rope, k_rope, k_nope = split_rope(q=q, k=k, freqs=freqs, w=w_mix, c=c_mix)
    source_weights = weights
    if not plan.attention_bias and any(b is not None for b in (weights.q_bias, weights.k_bias, weights.v_bias)):
        q_nope, q_rope, k_rope, weights = _absorb_biases(weights, q_nope, q_rope, k_rope, calib, method)
    half = hd // 2
    kept_energy = float(planes.abs().pow(2).sum())
    res_energy = float(k_nope[:, freqs, :hidden].pow(2).sum() + k_nope[:, freqs + half, :hidden].pow(2).sum())
    rope_energy = 1 - res_energy / kept_energy if kept_energy > 0 else 1.0

    k_rows = k_nope[..., :hidden].reshape(n_kv * hd, hidden)
    factor_kw: dict = {}
    if calib is not None:
        sig_x = calib.sigma[:-1, :-1].to(k_rows.dtype)
        if method.activation_aware:
            # float64 (small models): the symmetric root; float32 (large ones): a Cholesky factor, the same weighted
            # norm for a fraction of the cost of a hidden × hidden eigendecomposition
            root = sqrtm_psd if k_rows.dtype == torch.float64 else cholesky_root
            factor_kw["input_sqrt_cov"] = root(_key_sigma(calib, method)[:-1, :-1].to(k_rows.dtype))
        if method.output_weighted:
            sig_q = calib.sigma.to(q.dtype) if q_nope.shape[-1] == hidden + 1 else sig_x
            qn = q_nope.reshape(n_h, hd, -1)
            cq = torch.einsum("hai,ij,hbj->hab", qn, sig_q, qn)
            factor_kw["left_k"] = sqrtm_psd(torch.zeros(n_kv, hd, hd, dtype=cq.dtype).index_add_(0, group, cq))
            wo = weights.o.reshape(hidden, n_h, hd).transpose(0, 1)  # [n_h, hidden, hd]
            factor_kw["left_v"] = sqrtm_psd(torch.zeros(n_kv, hd, hd, dtype=wo.dtype).index_add_(0, group, wo.transpose(1, 2) @ wo))

    searched = calib is not None and method.balance_search
    w32 = weights  # float32 copies for the balance search's candidates (only ranked)
    if searched:
        w32 = AttentionWeights(**{k: None if v is None else v.float() for k, v in vars(weights).items()})

    def assemble(k_weight: float, final: bool = True):
        # the balance search's candidates (not final) are computed in float32: they are only ranked (faster SVDs)
        dt = k_rows.dtype if final else torch.float32
        w = weights if final else w32

        def cast(t):
            return None if t is None else t.to(dt)

        latent = factorize_latent(k=cast(k_rows), v=w.v, rank=plan.rank, k_weight=k_weight,
                                  **{n: cast(t) for n, t in factor_kw.items()})
        if calib is not None and method.value_refit and calib.sigma_ctx is not None:
            sig_v = calib.sigma_ctx.to(dt)
            if method.alternating > 0 and final:
                lk, lv = factor_kw.get("left_k"), factor_kw.get("left_v")
                latent.down, latent.up_k, latent.up_v = refine_latent(
                    k=k_rows, v=weights.v, down=latent.down, sigma_k=_key_sigma(calib, method)[:-1, :-1].to(k_rows.dtype),
                    sigma_v=sig_v, weight_k=None if lk is None else lk @ lk, weight_v=None if lv is None else lv @ lv,
                    k_weight=k_weight, iters=method.alternating)
            else:
                n_kv_v = sig_v.shape[0]  # W_upV per KV group, least squares on the attention-averaged inputs
                latent.up_v = fit_up(w.v.reshape(n_kv_v, -1, w.v.shape[1]), latent.down, sig_v, ridge=1e-6).reshape(w.v.shape[0], -1)
        return _assemble(plan=plan, weights=w, latent=latent, q_nope=cast(q_nope), q_rope=cast(q_rope),
                         k_rope=cast(k_rope), group=group, input_norm_bound=input_norm_bound), latent

    chosen_kw, out_err = 1.0, None
    if searched:
        base = balance_weight(k=k_rows, v=weights.v, **factor_kw)
        # ranked in float32 (the search only orders the candidates)
        x = calib.x_sample.float()
        pos = torch.arange(x.shape[1], dtype=torch.float32)[:, None]
        heads = calib.head_outputs[0] if calib.head_outputs else None
        src32 = w32 if source_weights is weights else AttentionWeights(
            **{k: None if v is None else v.float() for k, v in vars(source_weights).items()})
        if heads is not None and heads.shape[0] >= x.shape[0]:  # the statistics' source heads on the same inputs
            ref = source_output_from_heads(weights=src32, heads=heads[: x.shape[0]].cpu().float())
        else:
            ref = source_attention(weights=src32, x=x, angles=pos * calib.inv_freq.float(), n_heads=n_h, n_kv=n_kv,
                                   head_dim=hd)
        angles = pos * calib.inv_freq.float()[freqs]
        best = None
        for g in BALANCE_GRID:
            (tensors, _), _ = assemble(base * g, final=False)  # the search ranks balances; ALS refines the winner
            t32 = {k: v.float() for k, v in tensors.items()}
            err = relative_output_error(ref * plan.residual_scale, mla_output(tensors=t32, plan=plan, x=x, angles=angles))
            if best is not None and not err < best[0]:
                break  # (see BALANCE_GRID)
            best = (err, base * g)
        out_err, chosen_kw = best
    elif calib is not None:
        chosen_kw = balance_weight(k=k_rows, v=weights.v, **factor_kw)
    (out, extra), latent = assemble(chosen_kw)
    stats = LayerStats(
        k_rel_error=latent.k_rel_error, v_rel_error=latent.v_rel_error, energy_kept=latent.energy_kept,
        rope_energy_kept=rope_energy, latent_scale=extra["alpha"], q_bias_residual=extra["q_bias_residual"],
        singular_values=[float(x) for x in latent.singular_values], key_weight=chosen_kw, output_rel_error=out_err,
    )
    return out, stats


def _absorb_biases(weights: AttentionWeights, q_nope: torch.Tensor, q_rope: torch.Tensor, k_rope: torch.Tensor,
                   calib: LayerCalibration | None, method: Method):
    """A bias-free target for a biased source (engines drop attention biases): the query rows and the shared rope key
    absorb their biases by least squares on the calibration inputs (queries under every token's moment, the rope key
    under the attention-weighted keys' one), the values theirs likewise (the output fit refines them on what the
    source layer outputs); the no-RoPE key bias drops exactly (a per-query constant in the scores)."""
    if calib is None:
        raise ValueError("absorbing attention biases needs the layer's calibration statistics")
    n_h, width = q_nope.shape[0], q_nope.shape[-1]
    if width == calib.sigma.shape[0]:  # (a bias column rides along)
        q_nope = absorb_bias(q_nope.reshape(-1, width), calib.sigma).reshape(n_h, -1, width - 1)
        q_rope = absorb_bias(q_rope.reshape(-1, width), calib.sigma).reshape(n_h, -1, width - 1)
    if k_rope.shape[-1] == calib.sigma.shape[0]:
        k_rope = absorb_bias(k_rope, _key_sigma(calib, method))
    v = weights.v
    if weights.v_bias is not None:
        v = absorb_bias(torch.cat((v, weights.v_bias[:, None]), dim=1), calib.sigma)
    return q_nope, q_rope, k_rope, AttentionWeights(q=weights.q, k=weights.k, v=v, o=weights.o, o_bias=weights.o_bias)


def _assemble(*, plan: ConversionPlan, weights: AttentionWeights, latent, q_nope: torch.Tensor, q_rope: torch.Tensor,
              k_rope: torch.Tensor, group: torch.Tensor, input_norm_bound: float) -> tuple[dict[str, torch.Tensor], dict]:
    n_h, n_kv, hd, hidden, d = plan.n_heads, plan.n_kv, plan.head_dim, plan.hidden, plan.rope_dim
    alpha, norm_w = linear_norm_scale(down=latent.down, input_norm_bound=input_norm_bound, eps=TARGET_EPS)
    out: dict[str, torch.Tensor] = {}
    out["kv_a_proj_with_mqa.weight"] = torch.cat((latent.down * alpha, k_rope[:, :hidden]), dim=0)
    out["kv_a_layernorm.weight"] = torch.full((plan.rank,), norm_w, dtype=weights.k.dtype)
    up_k = latent.up_k.reshape(n_kv, hd, plan.rank)[group]
    up_v = latent.up_v.reshape(n_kv, hd, plan.rank)[group]
    out["kv_b_proj.weight"] = torch.cat((up_k, up_v), dim=1).reshape(n_h * 2 * hd, plan.rank)

    q_full = torch.cat((q_nope, q_rope), dim=1) * math.sqrt((hd + d) / hd)  # softmax scale (hd+D)^-½ → hd^-½
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
    return out, {"alpha": alpha, "q_bias_residual": q_bias_residual}


def rope_frequency_scores(*, weights: AttentionWeights, calib: LayerCalibration, n_heads: int, n_kv: int,
                          head_dim: int, method: Method = Method()) -> torch.Tensor:
    """``[head_dim/2]``: for each source frequency, the query-weighted key energy one shared rope plane can keep.

    Summed over layers, this ranks the standard RoPE schedules (strides) for ``--rope-dim``.
    """
    q = _with_bias(weights.q, weights.q_bias, n_heads, head_dim)
    k = _with_bias(weights.k, weights.k_bias, n_kv, head_dim)
    hidden = weights.q.shape[1]
    all_f = torch.arange(head_dim // 2)
    group = kv_group(n_heads, n_kv)
    sig_key = _key_sigma(calib, method)
    sig_k = sig_key if k.shape[-1] == hidden + 1 else sig_key[:-1, :-1]
    zk = key_planes(k, all_f)
    gram = torch.einsum("fgi,ij,fhj->fgh", zk, sig_k.to(zk.dtype), zk.conj())
    need = rope_need(q=q, calib=calib)
    a = torch.zeros(len(all_f), n_kv, dtype=need.dtype).index_add_(1, group, need).clamp_min(0).sqrt().to(gram.dtype)
    weighted = a[..., :, None] * gram * a[..., None, :]
    return torch.linalg.eigvalsh(weighted)[..., -1].real
