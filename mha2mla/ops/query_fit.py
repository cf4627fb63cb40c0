"""Refit the converted layer's queries so that its attention distributions match the source's (pure math, no I/O).

Sharing one rope key among the KV heads, and dropping the rotation of the slow planes, change the attention scores
even at full latent rank; the query projection, free in MLA, can absorb much of that. Keys (latent and shared rope
key) stay as converted; the query weight is fitted by L-BFGS to minimise the mean KL divergence between each source
head's attention distribution and the converted head's, over calibration inputs::

    min_W  mean_{b,h,m}  KL( p_src[b,h,m,:] ‖ softmax(q_h(W, x_m) · k_n · scale)[:] )

The queries are linear in ``W`` (``q_proj.weight``, or ``q_b_proj.weight`` after the linear query norm), so each step
is one batched attention-score forward and backward; the converted keys are computed once.
"""

from __future__ import annotations

import torch

from mha2mla.ops.shapes import ConversionPlan
from mha2mla.ops.attention import (key_up_projection, mla_latent, mla_score_inputs, query_features,
                               rotate_interleaved, absorbs_keys, causal_score_blocks, query_weight_name, source_qkv,
                               weighted_sum)

__all__ = ["causal_logsumexp", "source_log_probs", "spread_rows", "fit_queries", "query_weight_name"]

# Below this mean KL (nats) the converted attention already matches the source (e.g. an exact conversion): no fit.
NEGLIGIBLE_KL = 1e-6


def _causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


@torch.no_grad()
def source_log_probs(*, weights, x: torch.Tensor, angles: torch.Tensor, n_heads: int, n_kv: int,
                     head_dim: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Source (Llama/Mistral/Qwen2) attention log-probabilities ``[B, heads, L, L]`` (−inf above the diagonal); with
    ``rows`` (sorted query positions ``[R]``) only those queries' rows, ``[B, heads, R, L]`` (−inf past each row's
    position). ``angles`` covers at least the ``L`` positions of ``x``."""
    l = x.shape[1]
    q, k, _ = source_qkv(weights=weights, x=x, angles=angles[:l], n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
                         values=False)
    if rows is not None:
        q = q[..., rows, :]
    scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
    return scores.masked_fill(~_visible(rows, l, x.device), float("-inf")).log_softmax(-1)


def _visible(rows: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """``[R, L]`` (or ``[L, L]`` for every row): which keys each query row sees (those at or before its position)."""
    if rows is None:
        return _causal_mask(length, device)
    return torch.arange(length, device=device)[None, :] <= rows.to(device)[:, None]


def spread_rows(*, length: int, count: int) -> torch.Tensor:
    """``min(count, length)`` query positions spread evenly over ``0..length−1``, the last one included."""
    if count < 1 or length < 1:
        raise ValueError(f"need at least one row and one position, got count {count} and length {length}")
    return torch.linspace(length - 1, 0, min(count, length)).round().long().flip(0).unique()


# Query rows per block of the fused causal log-sum-exp: block j only reads the keys up to its last row (5/8 of the
# score matrix at 4 blocks), and a block's scores stay small enough to be re-read from cache.
LSE_BLOCKS = 4


class _CausalLogSumExp(torch.autograd.Function):
    """``lse[..., m] = log Σ_{n≤m} exp(q_m·k_n)`` for ``q [B, H, L, d]`` and ``k [B, H, L, d]`` (or ``[B, L, d]``
    shared by the heads), with its gradient in ``q`` only
    (``∂lse_m/∂q_m = Σ_n softmax_mn k_n``, kept from the forward: the backward reads no score matrix again). With
    ``rows``, ``q`` holds only the queries at those sorted positions of a longer sequence (``[B, H, R, d]``), each over
    the keys up to its position."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        lse = q.new_empty(q.shape[:-1])
        pk = torch.empty_like(q)
        for r0, r1, s in causal_score_blocks(q, k, LSE_BLOCKS, rows):  # s [B, H, r1−r0, keys seen]
            mx = s.amax(-1, keepdim=True)
            s.sub_(mx).exp_()
            total = s.sum(-1, keepdim=True)
            pk[..., r0:r1, :] = weighted_sum(s, k[..., : s.shape[-1], :]) / total
            lse[..., r0:r1] = (mx + total.log()).squeeze(-1)
        ctx.save_for_backward(pk)
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pk,) = ctx.saved_tensors
        return grad[..., None] * pk, None, None


def causal_logsumexp(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``lse[..., m] = log Σ_{n≤m} exp(q_m·k_n)`` with its gradient in ``q`` (see :class:`_CausalLogSumExp`; ``rows``:
    the positions of ``q``'s rows when they are a few queries of a longer sequence)."""
    return _CausalLogSumExp.apply(q, k, rows)


def fit_queries(*, tensors: dict, plan: ConversionPlan, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                angles: torch.Tensor, iterations: int = 15,
                rows: list[torch.Tensor | None] | None = None) -> tuple[dict, dict]:
    """Fit the converted layer's query weight to the source attention distributions.

    Args:
        tensors: the converted layer's tensors (names relative to ``self_attn.``), float32, on the inputs' device.
        plan: the conversion plan.
        inputs: batches ``[b, L, hidden]`` of attention inputs (after the layer's input norm).
        targets: for each batch, the source log-probabilities ``[b, heads, L, L]``, or ``[b, heads, R, L]`` for the
            batches with ``rows`` (:func:`source_log_probs`).
        angles: ``[L, rope_dim/2]`` angles of the converted model's rotary frequencies, for the longest batch's ``L``
            positions (a shorter batch reads its first rows).
        iterations: L-BFGS iterations (each one or a few forward/backward passes over all batches).
        rows: per batch, the sorted query positions its targets hold (``None``: every position). A long sequence is
            fitted on a few of its queries, each against all the keys it sees: the loss reads ``R·L``, not ``L²``,
            scores.

    Returns:
        ``(tensors, info)``: the tensors with the query weight replaced (other entries shared, not copied), and
        ``{"kl_before", "kl_after"}``, the mean KL per query and head on the fitted inputs (nats).
    """
    rows = [None] * len(inputs) if rows is None else rows
    if len(inputs) != len(targets) or len(rows) != len(inputs) or not inputs:
        raise ValueError(f"need one target (and one rows entry) per input batch and at least one batch, got "
                         f"{len(inputs)} inputs, {len(targets)} targets and {len(rows)} rows")
    name = query_weight_name(tensors)
    hd, d, n_h = plan.head_dim, plan.rope_dim, plan.n_heads
    scale = (hd + d) ** -0.5
    fixed = {k: v for k, v in tensors.items() if k != name}
    # keys against which the queries are scored: per head [b, H, L, hd+d], or with the key up-projection folded into
    # the queries (reference.absorbs_keys) the cached state [c; k_pe] shared by the heads, [b, L, R+d]
    absorbed = absorbs_keys(plan)
    width, fold = hd, None
    if absorbed:
        # The loss reads each head's non-rope query rows W_h only through W_upK,hᵀ W_h. With W_upK,h = Q_h F_h (QR,
        # Q_h orthonormal [hd, R]) that is F_hᵀ (Q_hᵀ W_h): the inputs are multiplied by the R rows Q_hᵀ W_h instead of
        # the hd rows of W_h (a third fewer query flops at R = hd/2), and the fold is F_h (R × R). The variable stays
        # W, so L-BFGS takes the same steps.
        basis, fold = torch.linalg.qr(key_up_projection(tensors, plan).detach().to(tensors[name].dtype))
        width = plan.rank

    def read_rows(w: torch.Tensor) -> torch.Tensor:
        """The rows of ``w`` the inputs are multiplied by: ``[heads·(width+D), in]``."""
        if not absorbed:
            return w
        per_head = w.view(n_h, hd + d, -1)
        return torch.cat((basis.transpose(1, 2) @ per_head[:, :hd], per_head[:, hd:]), dim=1).reshape(-1, w.shape[-1])

    batches = []
    with torch.no_grad():
        for x, lp, sel in zip(inputs, targets, rows):
            ang = angles[: x.shape[1]]
            if absorbed:
                kk = torch.cat(mla_latent(tensors, plan, x, ang), dim=-1)
            else:
                _, kk, _, _ = mla_score_inputs(tensors, plan, x, ang, values=False)
            p = lp.exp()
            z = query_features(tensors, x)
            if sel is not None:
                z, ang = z[:, sel], ang[sel]
            # Σ_n p_n log q_n = scale·q·(Σ_n p_n k_n) − logsumexp(s): the target-weighted keys are fixed
            batches.append((z, kk, weighted_sum(p, kk), (p * lp.clamp_min(-1e30)).sum(-1), ang, sel))
    count = sum(int(b[2].shape[0]) * n_h * int(b[2].shape[2]) for b in batches)

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        total, read = 0.0, read_rows(w)
        for z, kk, pk, neg_ent, ang, sel in batches:
            b, l, _ = z.shape
            q = (z @ read.T).view(b, l, n_h, width + d).transpose(1, 2)
            q_nope = q[..., :width] @ fold if absorbed else q[..., :width]
            q = torch.cat((q_nope, rotate_interleaved(q[..., width:], ang)), dim=-1) * scale
            lse = causal_logsumexp(q, kk, sel)
            cross = (q * pk).sum(-1) - lse  # Σ_n p_n log softmax(s)_n
            total = total + (neg_ent - cross).sum()
        return total / count

    w0 = tensors[name].detach()
    with torch.no_grad():
        before = float(loss_of(w0))
    w = w0.clone().requires_grad_(True)
    if iterations > 0 and before > NEGLIGIBLE_KL:
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = loss_of(w)
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        after = float(loss_of(w))
        if not after < before or not torch.isfinite(w).all():  # keep the converted queries if the fit did not help
            w, after = w0, before
    out = dict(fixed)
    out[name] = w.detach().to(w0.dtype)
    return out, {"kl_before": before, "kl_after": after}
