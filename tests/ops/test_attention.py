"""Plain-torch reference forwards of one attention layer, source and MLA (:mod:`mha2mla.ops.attention`)."""

from __future__ import annotations

import math

import pytest
import torch

from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.latent import AttentionWeights
from mha2mla.conversion.stream import Propagation, calibration_tokens
from mha2mla.ops.attention import (absorbs_keys, causal_sdpa, mla_attention, mla_head_contexts, mla_output,
                                   mla_output_from_contexts, mla_score_inputs, relative_output_error, rotate_half,
                                   rotate_interleaved, source_attention, source_qkv)
from tests.conftest import corpus_tokens, first_layer, tiny_plan


def test_rotate_half_is_a_rotation_of_each_plane():
    """RoPE in Llama's layout rotates the planes (j, j + d/2): angle 0 changes nothing, each plane keeps its norm,
    rotations by a and b compose to a + b, and the score of two rotated vectors depends on the angle difference
    only."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    a, b = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    assert torch.equal(rotate_half(x, torch.zeros(5, 6, dtype=torch.float64)), x)
    rx = rotate_half(x, a)
    assert not torch.allclose(rx, x)
    plane_norms = lambda t: t[..., :6] ** 2 + t[..., 6:] ** 2  # noqa: E731
    assert torch.allclose(plane_norms(rx), plane_norms(x), rtol=1e-12)
    assert torch.allclose(rotate_half(rx, b), rotate_half(x, a + b), atol=1e-12)
    assert torch.allclose((rotate_half(x, a + b) * rotate_half(y, b)).sum(-1), (rx * y).sum(-1), atol=1e-12)


def test_rotate_half_and_rotate_interleaved_differ_only_in_the_layout():
    """rotate_interleaved (DeepseekV3's rope layout) reads its planes from rows (2j, 2j + 1) and returns them rotated
    in rotate_half's layout (real parts; imaginary parts): the same rotation of the same planes."""
    g = torch.Generator().manual_seed(1)
    x, angles = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    interleaved = torch.stack((x[:, :4], x[:, 4:]), dim=-1).flatten(-2)  # (x0, x4, x1, x5, ...)
    assert torch.equal(rotate_interleaved(interleaved, angles), rotate_half(x, angles))


@pytest.mark.parametrize("dq,dv", [(24, 40), (24, 8), (16, 16)])
def test_causal_attention_with_unequal_widths_equals_the_explicit_softmax(dq, dv):
    """The zero-padded fused attention (query/key and value widths differ, as in MLA) equals softmax(qkᵀ)v computed
    explicitly."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 20, dq, generator=g), torch.randn(2, 3, 20, dq, generator=g)
    v = torch.randn(2, 3, 20, dv, generator=g)
    scale = 0.3
    mask = torch.ones(20, 20, dtype=torch.bool).tril()
    want = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf).softmax(-1) @ v
    got = causal_sdpa(q, k, v, scale)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_source_attention_in_bfloat16_stays_close_at_long_positions():
    # The source stream moves in the streams' precision (bfloat16 on CPUs that have it): queries, keys and values are
    # bfloat16, but the rotation is taken from float32 angles (a bfloat16 angle is off by radians past position ~500).
    g = torch.Generator().manual_seed(4)
    hidden, n_h, n_kv, hd, length = 32, 4, 2, 8, 1024
    w = AttentionWeights(q=torch.randn(n_h * hd, hidden, generator=g) / 6, k=torch.randn(n_kv * hd, hidden, generator=g) / 6,
                         v=torch.randn(n_kv * hd, hidden, generator=g) / 6, o=torch.randn(hidden, n_h * hd, generator=g) / 6)
    x = torch.randn(2, length, hidden, generator=g)
    inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq
    shape = dict(n_heads=n_h, n_kv=n_kv, head_dim=hd)
    ref = source_attention(weights=w, x=x, angles=angles, **shape)
    low = AttentionWeights(**{k: None if t is None else t.bfloat16() for k, t in vars(w).items()})
    got = source_attention(weights=low, x=x.bfloat16(), angles=angles, **shape)
    assert got.dtype == torch.bfloat16
    assert relative_output_error(ref[:, 512:], got[:, 512:].float()) < 0.02
    bad = source_attention(weights=low, x=x.bfloat16(), angles=angles.bfloat16(), **shape)
    assert relative_output_error(ref[:, 512:], bad[:, 512:].float()) > 0.1  # what the float32 angles prevent


@pytest.mark.parametrize("arch,bias", [("llama", False), ("qwen2", True)])
def test_reference_source_attention_is_the_transformers_layer(tiny_source, corpus, arch, bias):
    """The plain-torch source attention (grouped KV heads read once on the CPU) equals transformers' own attention."""
    from transformers import AutoModelForCausalLM

    kw = {"attention_bias": True} if bias else {}
    src_dir = tiny_source(arch=arch, n_kv=2, layers=1, **kw)
    src = load_source(src_dir)
    tokens = calibration_tokens(source=src, data=corpus, samples=2, length=24)
    prop = Propagation(source=src, tokens=tokens, batch=2)
    layer = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32).eval().model.layers[0]
    x = next(prop.inputs(0))
    causal = torch.full((24, 24), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want, _ = layer.self_attn(hidden_states=x, position_embeddings=(prop.cos, prop.sin), attention_mask=causal)
    a = layer.self_attn
    w = AttentionWeights(q=a.q_proj.weight, k=a.k_proj.weight, v=a.v_proj.weight, o=a.o_proj.weight,
                         q_bias=a.q_proj.bias, k_bias=a.k_proj.bias, v_bias=a.v_proj.bias)
    angles = torch.arange(24, dtype=torch.float32)[:, None] * prop.inv_freq.float()
    shape = dict(n_heads=src.n_heads, n_kv=src.n_kv, head_dim=src.head_dim)
    with torch.no_grad():
        got = source_attention(weights=w, x=x, angles=angles, **shape)
        q, k, v = source_qkv(weights=w, x=x, angles=angles, **shape)
        k1, v1 = source_qkv(weights=w, x=x, angles=angles, repeat=False, **shape)[1:]
    assert src.n_kv < src.n_heads and k1.shape[1] == src.n_kv
    assert torch.equal(k, k1.repeat_interleave(src.n_heads // src.n_kv, dim=1))
    assert torch.equal(v, v1.repeat_interleave(src.n_heads // src.n_kv, dim=1))
    assert torch.allclose(got, want, atol=1e-5)


# rank < head_dim: scores against the cached state (W_upK in q); else per head. Biases: the query behind q_a_proj.
@pytest.mark.parametrize("rank,bias", [(8, False), (8, True), (16, False), (24, False), (24, True)])
def test_latent_contexts_are_the_attention_weighted_latent(tiny_source, tmp_path, rank, bias):
    src, plan = tiny_plan(tiny_source, rank=rank, attention_bias=bias)
    assert absorbs_keys(plan) == (rank < plan.head_dim)
    _, tensors, x, _, mla_angles = first_layer(src, plan, corpus_tokens(src, tmp_path, samples=4, length=32))
    assert ("q_a_proj.weight" in tensors) == bias
    qq, kk, c, _ = mla_score_inputs(tensors, plan, x, mla_angles, values=False)
    mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    p = (qq @ kk.transpose(-1, -2) * (plan.head_dim + plan.rope_dim) ** -0.5).masked_fill(~mask, -math.inf).softmax(-1)
    want = p @ c[:, None]
    got = mla_head_contexts(tensors=tensors, plan=plan, x=x, angles=mla_angles)
    assert got.shape == (x.shape[0], plan.n_heads, x.shape[1], rank)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-10 * float(want.abs().max()))


@pytest.mark.parametrize("rank", [12, 24])  # below head_dim the contexts score the cached state (absorbed keys)
def test_output_from_contexts_equals_the_layer_and_calibration_keeps_source_heads(tiny_source, tmp_path, rank):
    src, plan = tiny_plan(tiny_source, rank=rank)
    assert absorbs_keys(plan) == (rank < plan.head_dim)
    tokens = corpus_tokens(src, tmp_path, samples=3, length=24)
    attn, tensors, x, angles, mla_angles = first_layer(src, plan, tokens)
    ctx = mla_head_contexts(tensors=tensors, plan=plan, x=x, angles=mla_angles)
    direct = mla_attention(tensors=tensors, plan=plan, x=x, angles=mla_angles)
    assert torch.allclose(mla_output_from_contexts(tensors=tensors, plan=plan, contexts=ctx), direct, atol=1e-9)
    # what the balance search ranks its candidates by
    assert torch.allclose(mla_output(tensors=tensors, plan=plan, x=x, angles=mla_angles), direct, atol=1e-9)
    # The statistics pass keeps each source head's output: the output fit's targets, without a second source pass.
    calib = Propagation(source=src, tokens=tokens).layer_calibration(0, head_outputs=True)
    heads = source_attention(weights=attn, x=x, angles=angles, n_heads=plan.n_heads, n_kv=plan.n_kv,
                             head_dim=plan.head_dim, heads=True)
    assert torch.allclose(torch.cat(calib.head_outputs).double(), heads, rtol=1e-4, atol=1e-5)
