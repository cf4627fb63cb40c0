"""The calibration stream (:mod:`mha2mla.conversion.stream`): the source run layer by layer, the statistics each
layer's conversion reads, and the streams the converted and source models move along."""

from __future__ import annotations

import math

import pytest
import torch

import mha2mla
from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.latent import AttentionWeights
from mha2mla.conversion.layer import read_layer
from mha2mla.conversion.options import Method
from mha2mla.conversion.stream import Propagation, attention_stats, calibrate, calibration_tokens
from mha2mla.ops.attention import rotate_half, source_attention
from tests.conftest import CORPUS, corpus_tokens, held_out_error


def test_layer_by_layer_statistics_match_the_full_model(tiny_source, corpus):
    from transformers import AutoModelForCausalLM

    src_dir = tiny_source(n_kv=2, layers=3)
    src = load_source(src_dir)
    tokens = calibration_tokens(source=src, data=corpus, samples=4, length=32)
    stats = calibrate(source=src, tokens=tokens, progress=False)
    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    for i, layer in enumerate(model.model.layers):
        x = layer.input_layernorm(hidden[i]).reshape(-1, 64).double()
        want = x.T @ x / x.shape[0]
        assert torch.allclose(stats[i].sigma[:-1, :-1], want, rtol=1e-4, atol=1e-6), i
        assert stats[i].distance_hist.sum().item() == pytest.approx(4 * 32 * 4, rel=1e-6)  # heads·queries·seqs


def test_calibration_errors(tiny_source, tmp_path):
    src = load_source(tiny_source())
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(mha2mla.Mha2mlaError, match="empty"):
        calibration_tokens(source=src, data=str(empty), samples=2, length=16)
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    with pytest.raises(mha2mla.Mha2mlaError, match="fewer than one block|fewer than --calibration-samples"):
        calibration_tokens(source=src, data=str(short), samples=2, length=16)


def test_calibration_longer_than_the_source_context_is_shortened_and_recorded(tiny_source, tmp_path):
    import json

    src = tiny_source(layers=1)  # max_position_embeddings 256
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 200)
    res = mha2mla.convert(source=src, output=str(tmp_path / "out"), rank=8, rope_dim=8, calibration=str(corpus),
                          calibration_samples=2, calibration_length=300, progress=False,
                          method=Method(query_fit=2, alternating=0))
    info = json.loads((tmp_path / "out" / "mha2mla.json").read_text())["calibration"]
    assert (info["length"], info["length_requested"], info["tokens"]) == (256, 300, 2 * 256)
    assert res.record["calibration"]["length"] == 256


@pytest.mark.parametrize("length,stride", [(37, 1), (3, 1), (37, 4)])
def test_blockwise_attention_statistics_match_the_dense_eager_attention(tiny_source, corpus, length, stride):
    from transformers import AutoModelForCausalLM

    src_dir = tiny_source(n_kv=2, layers=1)
    src = load_source(src_dir)
    tokens = calibration_tokens(source=src, data=corpus, samples=3, length=max(length, 16))[:, :length]
    prop = Propagation(source=src, tokens=tokens, batch=3)
    x = next(prop.inputs(0))
    # transformers' own eager attention, with its probabilities
    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32, attn_implementation="eager")
    layer = model.eval().model.layers[0]
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out, p = layer.self_attn(hidden_states=x, position_embeddings=(prop.cos, prop.sin), attention_mask=causal)
    nh, nkv, hd = src.n_heads, src.n_kv, src.head_dim
    hist, ctx, queries, received, heads = attention_stats(layer, x, prop.cos[:, None], prop.sin[:, None], nh, nkv, hd,
                                                          True, ctx_rows=2, ctx_stride=stride, ctx_offset=1, outputs=True)
    p = p.double()
    delta = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    want_hist = torch.stack([torch.stack([p[:, h][:, delta == d].sum() for d in range(length)]) for h in range(nh)])
    assert torch.allclose(hist, want_hist, atol=1e-5)
    assert torch.allclose(received.double(), p.sum(dim=(1, 2)).reshape(-1, 1), atol=1e-5)
    assert torch.allclose(heads.transpose(1, 2).flatten(2) @ layer.self_attn.o_proj.weight.T, out, atol=1e-5)
    sel = torch.arange(1 if stride > 1 else 0, length, stride)  # the sampled query positions (offset 1)
    assert queries == len(sel)
    ps = p[:2, :, sel]
    pp = (ps.transpose(-1, -2) @ ps).view(2, nkv, nh // nkv, length, length).sum(2)
    want_ctx = torch.einsum("bni,bgnm,bmj->gij", x[:2].double(), pp, x[:2].double())
    assert torch.allclose(ctx, want_ctx, rtol=1e-5, atol=1e-5 * float(want_ctx.abs().max()))


@pytest.mark.parametrize("stride", [1, 3])
def test_value_contexts_second_moment_matches_the_explicit_average(tiny_source, tmp_path, stride):
    # stride > 1: every stride-th query position, starting at the batch's index mod stride (batches of 2 sequences)
    src = load_source(tiny_source(n_kv=2, head_dim=16, layers=1))
    tokens = corpus_tokens(src, tmp_path, samples=3, length=24)
    prop = Propagation(source=src, tokens=tokens, batch=2)
    calib = prop.layer_calibration(0, context_stride=stride)
    x = torch.cat(list(prop.inputs(0))).double()
    attn, _ = read_layer(src, 0, torch.float64)
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * calib.inv_freq
    n_h, n_kv, hd = src.n_heads, src.n_kv, src.head_dim
    # Attention weights of the source, from the reference forward with identity values.
    eye = AttentionWeights(q=attn.q, k=attn.k, v=attn.v, o=attn.o)
    q = (x @ eye.q.T).view(*x.shape[:2], n_h, hd).transpose(1, 2)
    k = (x @ eye.k.T).view(*x.shape[:2], n_kv, hd).transpose(1, 2).repeat_interleave(n_h // n_kv, 1)
    s = rotate_half(q, angles) @ rotate_half(k, angles).transpose(-1, -2) * hd**-0.5
    p = s.masked_fill(~torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    xbar = p @ x[:, None]  # [B, H, L, hidden]
    sampled = (torch.arange(x.shape[1])[None, :] - (torch.arange(x.shape[0]) // 2)[:, None]) % stride == 0  # [B, L]
    xbar = xbar * sampled[:, None, :, None]
    per_head = torch.einsum("bhli,bhlj->hij", xbar, xbar) / int(sampled.sum())
    want = per_head.view(n_kv, n_h // n_kv, *per_head.shape[1:]).sum(1)
    assert torch.allclose(calib.sigma_ctx.double(), want, rtol=1e-3, atol=1e-6)
    received = p.sum(dim=(1, 2)).reshape(-1)
    xa = torch.cat((x, torch.ones(*x.shape[:2], 1, dtype=x.dtype)), -1).reshape(-1, x.shape[-1] + 1)
    want_key = (xa.T * received) @ xa / received.sum()
    assert torch.allclose(calib.sigma_key, want_key, rtol=1e-3, atol=1e-6)


def test_tracked_source_stream_moves_like_the_source_model(tiny_source, tmp_path):
    # The drift correction carries the source's own hidden states beside the converted ones: advancing them with the
    # attention outputs computed in the fit must equal running the source layer, and equal a plain source propagation.
    src = load_source(tiny_source(n_kv=2, head_dim=16, seed=3, layers=2))
    tokens = corpus_tokens(src, tmp_path, samples=4, length=24)
    plain = Propagation(source=src, tokens=tokens, batch=2)
    tracked = Propagation(source=src, tokens=tokens, batch=2, track_source=True)
    reused = Propagation(source=src, tokens=tokens, batch=2, track_source=True)
    assert tracked.tracks_source and not plain.tracks_source
    attn, _ = read_layer(src, 0, torch.float32)
    angles = torch.arange(24, dtype=torch.float32)[:, None] * plain.inv_freq.float()
    shape = dict(n_heads=src.n_heads, n_kv=src.n_kv, head_dim=src.head_dim)
    outs = [source_attention(weights=attn, x=x, angles=angles, **shape) for x, _ in reused.source_inputs(0)]
    assert all(float(gap.abs().max()) == 0 for _, gap in reused.source_inputs(0))  # nothing converted yet
    plain.advance(0)
    zero = lambda x: torch.zeros_like(x)  # a converted attention that drifts: the two streams must now differ
    tracked.advance(0, zero)
    reused.advance(0, zero, source_outputs=outs)
    assert torch.allclose(tracked.h_src, plain.h, atol=1e-5)
    assert torch.allclose(reused.h_src, plain.h, atol=1e-5)
    gaps = torch.cat([gap for _, gap in tracked.source_inputs(1)])
    assert torch.allclose(gaps, plain.h - tracked.h, atol=1e-5) and float(gaps.abs().max()) > 1e-3


def test_last_layer_refit_skips_the_streams_and_fits_the_same_weight(tiny_source, tmp_path):
    # At the model's last layer nothing reads the streams afterwards: advance(last=True) only refits the MLP (on the
    # tracked sequences), and must return the weight the full advance returns, to the last bit.
    src = load_source(tiny_source(n_kv=2, head_dim=16, seed=5, layers=2))
    tokens = corpus_tokens(src, tmp_path, samples=6, length=24)
    attention = lambda x: 0.5 * x[..., : src.hidden]  # a converted attention that drifts from the source's
    downs, streams = {}, {}
    for last in (False, True):
        prop = Propagation(source=src, tokens=tokens, batch=2, track_source=True, source_sequences=4)
        prop.advance(0, attention)  # (both streams move past layer 0)
        before = prop.h.clone()
        downs[last] = prop.advance(1, attention, mlp_drift=0.4, last=last)
        streams[last] = (before, prop.h)
    assert downs[True] is not None and torch.equal(downs[True], downs[False])
    moved, kept = streams[False], streams[True]
    assert not torch.equal(moved[0], moved[1])  # the full advance moves the converted stream past the layer
    assert torch.equal(kept[0][4:], kept[1][4:])  # last=True leaves the untracked sequences' stream alone


def test_source_stream_on_the_first_sequences_only(tiny_source, tmp_path):
    # Method.source_sequences: the source's own stream is carried for the first sequences (whole batches) only; what
    # it moves to is the plain source propagation of those rows, and a conversion uses the drift targets there only.
    src_dir = tiny_source(n_kv=2, head_dim=16, seed=3, layers=2)
    src = load_source(src_dir)
    tokens = corpus_tokens(src, tmp_path, samples=6, length=24)
    plain = Propagation(source=src, tokens=tokens, batch=2)
    part = Propagation(source=src, tokens=tokens, batch=2, track_source=True, source_sequences=3)
    assert part.h_src.shape[0] == 4  # 3 sequences, rounded up to whole batches of 2
    assert len(list(part.source_inputs(0))) == 2
    plain.advance(0)
    part.advance(0, lambda x: torch.zeros_like(x))
    assert torch.allclose(part.h_src, plain.h[:4], atol=1e-5)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=6, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=16, calibration_length=32)
    downs = {}
    for n in (0, 8, 16):
        res = mha2mla.convert(source=src_dir, output=str(tmp_path / f"s{n}"), method=Method(source_sequences=n), **kw)
        assert res.record["calibration"]["method"]["source_sequences"] == n
        downs[n] = [x["mlp_down_rel_change"] for x in res.record["layers"]]
    assert downs[16] == downs[0] and downs[8] != downs[0]  # all 16 sequences tracked = the default; 8 differ
    assert all(math.isfinite(c) and c > 1e-4 for c in downs[8])


def test_bfloat16_streams_keep_a_lossy_conversion_as_good_as_float32(tiny_source, tmp_path):
    """bfloat16 MLP forwards of the two calibration streams (the default where the CPU multiplies bfloat16 natively)
    round at ~1e-3: far below a lossy conversion's error, which must stay what float32 streams give."""
    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=3)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=6, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    errors = {}
    for dt in ("float32", "bfloat16"):
        res = mha2mla.convert(source=src, output=str(tmp_path / dt), method=Method(mlp_dtype=dt), **kw)
        assert res.record["calibration"]["propagation"]["mlp_dtype"] == dt
        errors[dt] = held_out_error(src, str(tmp_path / dt))
    assert errors["float32"] > 1e-2  # lossy
    assert abs(errors["bfloat16"] - errors["float32"]) < 0.03 * errors["float32"], errors
