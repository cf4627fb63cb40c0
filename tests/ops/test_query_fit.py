"""Query refit to the source attention distributions (:mod:`mha2mla.ops.query_fit`)."""

from __future__ import annotations

import math

import pytest
import torch

from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.latent import AttentionWeights, convert_attention
from mha2mla.conversion.options import Method
from mha2mla.conversion.plan import make_plan
from mha2mla.conversion.stream import Propagation, calibration_tokens
from mha2mla.ops.attention import absorbs_keys, mla_score_inputs
from mha2mla.ops.query_fit import causal_logsumexp, fit_queries, query_weight_name, source_log_probs, spread_rows
from mha2mla.ops.rope import kept_frequencies
from tests.conftest import CORPUS


def _layer(tiny_source, tmp_path, *, arch="llama", n_kv=2, rope_dim=4, rank=None, samples=12, length=48,
           source_side=False, **kw):
    """A tiny source, layer 0 converted with calibration (no query fit), and what the query fit needs (with
    ``source_side``, also the source's float32 attention weights and rotary angles)."""
    src = load_source(tiny_source(arch=arch, n_kv=n_kv, head_dim=16, seed=5, **kw))
    rank = rank or 2 * n_kv * 16
    plan = make_plan(source=src, rank=rank, rope_dim=rope_dim, rope_stride=None, dtype="float32")
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    tokens = calibration_tokens(source=src, data=str(corpus), samples=samples, length=length)
    prop = Propagation(source=src, tokens=tokens, batch=4)
    calib = prop.layer_calibration(0)
    prefix = "model.layers.0.self_attn."
    names = {"q": "q_proj.weight", "k": "k_proj.weight", "v": "v_proj.weight", "o": "o_proj.weight",
             "q_bias": "q_proj.bias", "k_bias": "k_proj.bias", "v_bias": "v_proj.bias"}
    weights = AttentionWeights(**{f: src.get(prefix + n).double() for f, n in names.items() if src.has(prefix + n)})
    gamma = src.get("model.layers.0.input_layernorm.weight").double()
    bound = math.sqrt(plan.hidden) * float(gamma.abs().max())
    tensors, _ = convert_attention(plan=plan, weights=weights, input_norm_bound=bound, calib=calib,
                                   method=Method(query_fit=0))
    xs = list(prop.inputs(0))
    w32 = AttentionWeights(**{k: None if v is None else v.float() for k, v in vars(weights).items()})
    angles = torch.arange(length, dtype=torch.float32)[:, None] * calib.inv_freq.float()
    targets = [source_log_probs(weights=w32, x=x, angles=angles, n_heads=plan.n_heads, n_kv=plan.n_kv,
                                head_dim=plan.head_dim) for x in xs]
    mla_angles = angles[:, kept_frequencies(head_dim=16, rope_dim=rope_dim, stride=plan.rope_stride)]
    t32 = {k: v.float() for k, v in tensors.items()}
    if source_side:
        return plan, t32, xs, targets, mla_angles, w32, angles
    return plan, t32, xs, targets, mla_angles


def _kl(plan, tensors, xs, targets, angles) -> float:
    return fit_queries(tensors=tensors, plan=plan, inputs=xs, targets=targets, angles=angles, iterations=0)[1]["kl_after"]


@pytest.mark.parametrize("bias", [False, True])  # q_proj, and q_b_proj behind the linear query norm (biases)
def test_query_fit_lowers_the_attention_kl_on_held_out_inputs(tiny_source, tmp_path, bias):
    # 2 KV heads share one rope key of 4 of 16 dims: the converted attention differs from the source at full rank
    plan, tensors, xs, targets, angles = _layer(tiny_source, tmp_path, attention_bias=bias)
    fit_x, fit_t, held_x, held_t = xs[:2], targets[:2], xs[2:], targets[2:]
    fitted, info = fit_queries(tensors=tensors, plan=plan, inputs=fit_x, targets=fit_t, angles=angles, iterations=20)
    assert info["kl_before"] > 1e-3
    assert info["kl_after"] < 0.7 * info["kl_before"]
    held_before, held_after = _kl(plan, tensors, held_x, held_t, angles), _kl(plan, fitted, held_x, held_t, angles)
    assert held_after < 0.8 * held_before
    name = query_weight_name(tensors)
    assert name == ("q_b_proj.weight" if bias else "q_proj.weight")
    assert not torch.equal(fitted[name], tensors[name])
    assert all(fitted[k] is tensors[k] for k in tensors if k != name)  # only the query weight changes


def test_query_fit_keeps_an_exact_conversion(tiny_source, tmp_path):
    # MQA with rope on the whole head at full rank is exact: nothing to fit, the queries stay
    plan, tensors, xs, targets, angles = _layer(tiny_source, tmp_path, n_kv=1, rope_dim=16, rank=32)
    fitted, info = fit_queries(tensors=tensors, plan=plan, inputs=xs, targets=targets, angles=angles, iterations=10)
    assert info["kl_before"] < 1e-6 and info["kl_after"] <= info["kl_before"]
    assert torch.allclose(fitted["q_proj.weight"], tensors["q_proj.weight"], atol=1e-4)


def test_query_fit_validates_its_inputs(tiny_source, tmp_path):
    plan, tensors, xs, targets, angles = _layer(tiny_source, tmp_path, samples=4)
    with pytest.raises(ValueError, match="one target .* per input batch"):
        fit_queries(tensors=tensors, plan=plan, inputs=xs, targets=targets + targets, angles=angles)
    with pytest.raises(ValueError, match=f"{len(xs) + 1} rows"):
        fit_queries(tensors=tensors, plan=plan, inputs=xs, targets=targets, angles=angles, rows=[None] * (len(xs) + 1))
    with pytest.raises(ValueError, match="at least one batch"):
        fit_queries(tensors=tensors, plan=plan, inputs=[], targets=[], angles=angles)


@pytest.mark.parametrize("bias,rank", [(False, None), (True, None), (False, 12), (True, 12)])
def test_the_fitted_loss_is_the_mean_attention_kl(tiny_source, tmp_path, bias, rank):
    """The fit's loss (written with the identity Σ p log softmax(s) = q·(Σ p k) − logsumexp(s)) equals the mean KL
    between the source and converted attention distributions computed directly from the converted layer (per-head
    keys; rank 12 < head_dim 16: the fit scores against the cached state with W_upK folded into the queries)."""
    plan, tensors, xs, targets, angles = _layer(tiny_source, tmp_path, attention_bias=bias, rank=rank)
    assert absorbs_keys(plan) == (rank is not None)
    total, count = 0.0, 0
    for x, lp in zip(xs, targets):
        qq, kk, _, _ = mla_score_inputs(tensors, plan, x, angles, values=False)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        logq = (qq @ kk.transpose(-1, -2) * (plan.head_dim + plan.rope_dim) ** -0.5).masked_fill(~mask, -math.inf)
        logq = logq.log_softmax(-1)
        kl = (lp.exp() * (lp - logq).masked_fill(~mask, 0.0)).sum(-1)
        total, count = total + float(kl.sum()), count + kl.numel()
    assert total / count > 1e-3
    assert _kl(plan, tensors, xs, targets, angles) == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("rank", [None, 12])
def test_sampled_rows_score_the_kl_of_those_rows(tiny_source, tmp_path, rank):
    """A long sequence is fitted on a few of its query rows: its targets are exactly those rows of the full
    log-probabilities, the loss on them is the mean KL of those rows, and every row reproduces the full loss."""
    plan, tensors, xs, targets, angles, w32, src_angles = _layer(tiny_source, tmp_path, rank=rank, samples=4,
                                                                source_side=True)
    x, full = xs[0], targets[0]
    sel = spread_rows(length=x.shape[1], count=7)
    assert sel[0] == 0 and sel[-1] == x.shape[1] - 1 and len(sel) == 7 and bool((sel.diff() > 0).all())
    lp = source_log_probs(weights=w32, x=x, angles=src_angles, n_heads=plan.n_heads, n_kv=plan.n_kv,
                          head_dim=plan.head_dim, rows=sel)
    assert torch.allclose(lp, full[:, :, sel], atol=1e-5)
    mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    qq, kk, _, _ = mla_score_inputs(tensors, plan, x, angles, values=False)
    logq = (qq @ kk.transpose(-1, -2) * (plan.head_dim + plan.rope_dim) ** -0.5).masked_fill(~mask, -math.inf)
    kl_rows = (full.exp() * (full - logq.log_softmax(-1)).masked_fill(~mask, 0.0)).sum(-1)[:, :, sel]
    got = fit_queries(tensors=tensors, plan=plan, inputs=[x], targets=[lp], angles=angles, rows=[sel], iterations=0)
    assert got[1]["kl_after"] == pytest.approx(float(kl_rows.mean()), rel=1e-4)
    every = torch.arange(x.shape[1])
    assert _kl(plan, tensors, [x], [full], angles) == pytest.approx(
        fit_queries(tensors=tensors, plan=plan, inputs=[x], targets=[full], angles=angles, rows=[every],
                    iterations=0)[1]["kl_after"], rel=1e-5)
    fitted, info = fit_queries(tensors=tensors, plan=plan, inputs=[x], targets=[lp], angles=angles, rows=[sel],
                               iterations=10)
    assert info["kl_after"] < 0.9 * info["kl_before"]


def test_spread_rows_validates():
    assert spread_rows(length=3, count=10).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="count 0"):
        spread_rows(length=5, count=0)


@pytest.mark.parametrize("bias", [False, True])
def test_absorbed_fit_takes_the_steps_of_the_fit_on_the_query_weight(tiny_source, tmp_path, monkeypatch, bias):
    """Below head_dim the fit multiplies the inputs by Q_hᵀ W_h only (W_upK,h = Q_h F_h) and folds F_h into the
    queries; the variable is still W, so L-BFGS must land where the fit with per-head keys lands, and W_h only moves
    within span(W_upK,h) (the rest has no gradient)."""
    import mha2mla.ops.query_fit as qf

    plan, tensors, xs, targets, angles = _layer(tiny_source, tmp_path, attention_bias=bias, rank=12)
    name = query_weight_name(tensors)
    fits = {}
    for absorbed in (True, False):
        monkeypatch.setattr(qf, "absorbs_keys", lambda p, a=absorbed: a)
        fits[absorbed] = fit_queries(tensors=tensors, plan=plan, inputs=xs[:2], targets=targets[:2], angles=angles,
                                     iterations=8)
    (a, info_a), (w, info_w) = fits[True], fits[False]
    assert info_a["kl_after"] < 0.9 * info_a["kl_before"]
    assert info_a["kl_before"] == pytest.approx(info_w["kl_before"], rel=1e-5)
    assert info_a["kl_after"] == pytest.approx(info_w["kl_after"], rel=1e-3)
    change_a, change_w = a[name] - tensors[name], w[name] - tensors[name]
    assert float((change_a - change_w).norm()) < 1e-2 * float(change_w.norm())
    hd, d = plan.head_dim, plan.rope_dim
    up_k = tensors["kv_b_proj.weight"].view(plan.n_heads, 2 * hd, plan.rank)[:, :hd]
    nope = change_a.view(plan.n_heads, hd + d, -1)[:, :hd]
    outside = nope - up_k @ torch.linalg.pinv(up_k) @ nope  # the part of each head's change outside span(W_upK,h)
    assert float(outside.norm()) < 1e-5 * float(nope.norm())


@pytest.mark.parametrize("length,shared", [(1, False), (7, False), (30, False), (7, True), (30, True)])
def test_fused_causal_logsumexp_matches_autograd_of_the_dense_scores(length, shared):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, 3, length, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, length, 5, generator=g, dtype=torch.float64)
    if shared:  # one key per position for all heads, passed as [B, L, d]
        k = k[:, :1].expand(-1, 3, -1, -1)
    w = torch.randn(2, 3, length, generator=g, dtype=torch.float64)
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    dense = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")).logsumexp(-1)
    (want,) = torch.autograd.grad((dense * w).sum(), q)
    fused = causal_logsumexp(q, k[:, 0] if shared else k)
    (got,) = torch.autograd.grad((fused * w).sum(), q)
    assert torch.allclose(fused, dense, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
def test_rows_logsumexp_matches_autograd_of_the_dense_scores(shared):
    """The sampled-row log-sum-exp (each row over the keys up to its position, blockwise) and its gradient in q equal
    those of the dense masked scores."""
    g = torch.Generator().manual_seed(3)
    length, rows = 40, torch.tensor([0, 3, 9, 10, 22, 31, 39])
    q = torch.randn(2, 3, len(rows), 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, length, 5, generator=g, dtype=torch.float64)
    if shared:
        k = k[:, :1].expand(-1, 3, -1, -1)
    w = torch.randn(2, 3, len(rows), generator=g, dtype=torch.float64)
    mask = torch.arange(length)[None, :] <= rows[:, None]
    dense = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")).logsumexp(-1)
    (grad_dense,) = torch.autograd.grad((dense * w).sum(), q)
    fused = causal_logsumexp(q, k[:, 0] if shared else k, rows)
    (grad_fused,) = torch.autograd.grad((fused * w).sum(), q)
    assert torch.allclose(fused, dense, atol=1e-12)
    assert torch.allclose(grad_fused, grad_dense, atol=1e-12)
