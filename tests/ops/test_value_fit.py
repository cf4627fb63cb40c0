"""Output-matched value path (:mod:`mha2mla.ops.value_fit`)."""

from __future__ import annotations

import pytest
import torch

from mha2mla.ops.attention import mla_attention, mla_head_contexts, relative_output_error, source_attention
from mha2mla.ops.value_fit import (OUTPUT_FIT_FULL_FEATURES, ValuePathFit, factor_heads, moment_stride,
                                   value_path_prior, with_value_path)
from tests.conftest import corpus_tokens, first_layer, tiny_plan


@pytest.mark.parametrize("rank", [12, 24])  # R ≤ head_dim (joint closed form) and R > head_dim (reduced rank)
def test_fit_recovers_an_exact_value_path(tiny_source, rank):
    _, plan = tiny_plan(tiny_source, rank=rank)
    g = torch.Generator().manual_seed(0)
    h, hd = plan.n_heads, plan.head_dim
    truth = [torch.randn(plan.hidden, hd, generator=g, dtype=torch.float64)
             @ torch.randn(hd, rank, generator=g, dtype=torch.float64) for _ in range(h)]  # rank ≤ head_dim
    fit = ValuePathFit(plan=plan, intercept=True)
    bias = torch.randn(plan.hidden, generator=g, dtype=torch.float64)
    for _ in range(4):
        ctx = torch.randn(2, h, 64, rank, generator=g, dtype=torch.float64)
        y = torch.einsum("ohr,bhlr->blo", torch.stack(truth, 1), ctx) + bias
        fit.add(contexts=ctx, target=y)
    maps, b, rel = fit.solve(ridge=1e-12)
    assert rel < 1e-3  # the moments accumulate in float32 matmuls
    for got, want in zip(maps, truth):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert torch.allclose(b, bias, atol=1e-3)


def test_factor_heads_reproduces_each_map():
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(20, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 10, generator=g, dtype=torch.float64)
            for _ in range(3)]
    wo, up = factor_heads(maps=maps, head_dim=6)
    assert wo.shape == (20, 18) and up.shape == (3, 6, 10)
    for i, m in enumerate(maps):
        assert torch.allclose(wo[:, 6 * i : 6 * (i + 1)] @ up[i], m, atol=1e-10)


def test_fitted_path_is_what_the_layer_computes_and_fits_better(tiny_source, tmp_path):
    src, plan = tiny_plan(tiny_source)
    tokens = corpus_tokens(src, tmp_path, samples=6, length=32)
    attn, tensors, x, angles, mla_angles = first_layer(src, plan, tokens)
    ctx = mla_head_contexts(tensors=tensors, plan=plan, x=x, angles=mla_angles)
    # The analytic path the tensors hold, applied to the contexts, is exactly the layer's output.
    prior = value_path_prior(tensors=tensors, plan=plan)
    via_ctx = torch.einsum("ohr,bhlr->blo", prior.reshape(plan.hidden, plan.n_heads, plan.rank), ctx)
    direct = mla_attention(tensors=tensors, plan=plan, x=x, angles=mla_angles) / plan.residual_scale
    assert torch.allclose(via_ctx, direct, atol=1e-9)
    target = source_attention(weights=attn, x=x, angles=angles, n_heads=plan.n_heads, n_kv=plan.n_kv,
                              head_dim=plan.head_dim)
    fit = ValuePathFit(plan=plan, intercept=False)
    fit.add(contexts=ctx, target=target)
    maps, _, rel = fit.solve(prior=prior)
    fitted = with_value_path(tensors=tensors, plan=plan, maps=maps, bias=None)
    got = mla_attention(tensors=fitted, plan=plan, x=x, angles=mla_angles) / plan.residual_scale
    assert relative_output_error(target, got) == pytest.approx(rel, rel=1e-3, abs=1e-6)
    assert rel < relative_output_error(target, direct)  # least squares on the data it fits
    # Only the value rows of kv_b_proj and o_proj change: the cache and the keys stay as they were.
    kvb, kvb0 = (t["kv_b_proj.weight"].reshape(plan.n_heads, 2, plan.head_dim, -1) for t in (fitted, tensors))
    assert torch.equal(kvb[:, 0], kvb0[:, 0])
    assert torch.equal(fitted["kv_a_proj_with_mqa.weight"], tensors["kv_a_proj_with_mqa.weight"])


def test_moment_stride_holds_the_joint_fits_cost_near_its_full_size():
    assert OUTPUT_FIT_FULL_FEATURES == 1024
    # SmolLM2: 9 heads × 32 / 64 / 96 / 160 latent → every position up to 96, every 2nd at 160 (1440 features)
    assert [moment_stride(features=9 * r) for r in (32, 64, 96, 160)] == [1, 1, 1, 2]
    assert [moment_stride(features=f) for f in (1, 1024, 2048, 4096)] == [1, 1, 4, 16]  # ~(features/1024)²
    with pytest.raises(ValueError, match="features must be ≥ 1, got 0"):
        moment_stride(features=0)
