"""Output-matched value path (:mod:`mha2mla.value_path`) and the layer-by-layer calibration stream."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CORPUS

import mha2mla
from mha2mla.attention import AttentionWeights, Method, convert_attention
from mha2mla.calibration import Propagation, calibration_tokens
from mha2mla.plan import make_plan
from mha2mla.reference import mla_attention, mla_head_contexts, relative_output_error, source_attention
from mha2mla.rope import kept_frequencies
from mha2mla.source import load_source
from mha2mla.value_path import ValuePathFit, factor_heads, value_path_prior, with_value_path


def _plan(tiny_source, *, n_kv=2, head_dim=16, rank=12, rope_dim=8, seed=3, **kw):
    src = load_source(tiny_source(n_kv=n_kv, head_dim=head_dim, seed=seed, **kw))
    return src, make_plan(source=src, rank=rank, rope_dim=rope_dim, rope_stride=None, dtype="float32")


@pytest.mark.parametrize("rank", [12, 24])  # R ≤ head_dim (joint closed form) and R > head_dim (reduced rank)
def test_fit_recovers_an_exact_value_path(tiny_source, rank):
    _, plan = _plan(tiny_source, rank=rank)
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


def _tokens(src, tmp_path, *, samples, length):
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 20)
    return calibration_tokens(source=src, data=str(corpus), samples=samples, length=length)


def _layer(src, plan, tokens):
    from mha2mla.conversion import _layer_tensors

    attn, rest = _layer_tensors(src, 0, torch.float64)
    prop = Propagation(source=src, tokens=tokens)
    calib = prop.layer_calibration(0)
    bound = math.sqrt(plan.hidden) * float(rest["input_layernorm.weight"].abs().max())
    tensors, _ = convert_attention(plan=plan, weights=attn, input_norm_bound=bound, calib=calib, method=Method())
    x = torch.cat(list(prop.inputs(0))).double()
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * calib.inv_freq
    mla_angles = angles[:, kept_frequencies(head_dim=plan.head_dim, rope_dim=plan.rope_dim, stride=plan.rope_stride)]
    return attn, tensors, x, angles, mla_angles


# rank < head_dim: scores against the cached state (W_upK in q); else per head. Biases: the query behind q_a_proj.
@pytest.mark.parametrize("rank,bias", [(8, False), (8, True), (16, False), (24, False), (24, True)])
def test_latent_contexts_are_the_attention_weighted_latent(tiny_source, tmp_path, rank, bias):
    from mha2mla.reference import _mla_scores_inputs, absorbs_keys

    src, plan = _plan(tiny_source, rank=rank, attention_bias=bias)
    assert absorbs_keys(plan) == (rank < plan.head_dim)
    _, tensors, x, _, mla_angles = _layer(src, plan, _tokens(src, tmp_path, samples=4, length=32))
    assert ("q_a_proj.weight" in tensors) == bias
    qq, kk, c, _ = _mla_scores_inputs(tensors, plan, x, mla_angles, values=False)
    mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    p = (qq @ kk.transpose(-1, -2) * (plan.head_dim + plan.rope_dim) ** -0.5).masked_fill(~mask, -math.inf).softmax(-1)
    want = p @ c[:, None]
    got = mla_head_contexts(tensors=tensors, plan=plan, x=x, angles=mla_angles)
    assert got.shape == (x.shape[0], plan.n_heads, x.shape[1], rank)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-10 * float(want.abs().max()))


def test_fitted_path_is_what_the_layer_computes_and_fits_better(tiny_source, tmp_path):
    src, plan = _plan(tiny_source)
    tokens = _tokens(src, tmp_path, samples=6, length=32)
    attn, tensors, x, angles, mla_angles = _layer(src, plan, tokens)
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


@pytest.mark.parametrize("stride", [1, 3])
def test_value_contexts_second_moment_matches_the_explicit_average(tiny_source, tmp_path, stride):
    # stride > 1: every stride-th query position, starting at the batch's index mod stride (batches of 2 sequences)
    src = load_source(tiny_source(n_kv=2, head_dim=16, layers=1))
    tokens = _tokens(src, tmp_path, samples=3, length=24)
    prop = Propagation(source=src, tokens=tokens, batch=2)
    calib = prop.layer_calibration(0, context_stride=stride)
    x = torch.cat(list(prop.inputs(0))).double()
    from mha2mla.conversion import _layer_tensors

    attn, _ = _layer_tensors(src, 0, torch.float64)
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * calib.inv_freq
    n_h, n_kv, hd = src.n_heads, src.n_kv, src.head_dim
    # Attention weights of the source, from the reference forward with identity values.
    eye = AttentionWeights(q=attn.q, k=attn.k, v=attn.v, o=attn.o)
    q = (x @ eye.q.T).view(*x.shape[:2], n_h, hd).transpose(1, 2)
    k = (x @ eye.k.T).view(*x.shape[:2], n_kv, hd).transpose(1, 2).repeat_interleave(n_h // n_kv, 1)
    from mha2mla.reference import _rotate_half

    s = _rotate_half(q, angles) @ _rotate_half(k, angles).transpose(-1, -2) * hd**-0.5
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


def test_sequential_conversion_records_fit_and_beats_no_fit(tiny_source, tmp_path):
    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=3)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=10, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    fitted = mha2mla.convert(source=src, output=str(tmp_path / "fit"), **kw)
    assert all(0 <= layer["output_fit_rel_error"] < 1 for layer in fitted.record["layers"])
    assert "mean relative error after the fit" in (tmp_path / "fit" / "README.md").read_text()
    plain = mha2mla.convert(source=src, output=str(tmp_path / "plain"), method=Method(output_fit=False, sequential=False), **kw)
    assert all(layer["output_fit_rel_error"] is None for layer in plain.record["layers"])
    from test_calibration import _held_out_error

    assert _held_out_error(src, str(tmp_path / "fit")) < _held_out_error(src, str(tmp_path / "plain"))


@pytest.mark.parametrize("joint_max", [4096, 0])  # the joint fit, and the per-head fit wide models get
def test_output_fit_keeps_a_biased_full_rank_conversion_exact(tiny_source, tmp_path, monkeypatch, joint_max):
    import mha2mla.conversion as conversion
    from test_calibration import _held_out_error

    monkeypatch.setattr(conversion, "JOINT_MAX_FEATURES", joint_max)
    src = tiny_source(arch="qwen2", n_kv=1, head_dim=16, seed=5)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 20)
    res = mha2mla.convert(source=src, output=str(tmp_path / "q"), rank=16, rope_dim=16, progress=False, dtype="float32",
                          calibration=str(corpus), calibration_samples=4, calibration_length=32,
                          method=Method(mlp_dtype="float32"))  # (exactness: no bfloat16 stream rounding)
    assert res.record["calibration"]["propagation"]["mlp_dtype"] == "float32"
    assert all(layer["output_fit_rel_error"] < 1e-3 for layer in res.record["layers"])
    # float32 calibration: the fits' rounding alone leaves 0.8-1.1e-4 here; one rank short (15) gives 2.3e-4, 12 7.2e-4
    assert _held_out_error(src, str(tmp_path / "q")) < 1.5e-4


@pytest.mark.parametrize("rank", [12, 24])  # below head_dim the contexts score the cached state (absorbed keys)
def test_output_from_contexts_equals_the_layer_and_calibration_keeps_source_heads(tiny_source, tmp_path, rank):
    from mha2mla.attention import _candidate_output
    from mha2mla.reference import absorbs_keys, mla_output_from_contexts

    src, plan = _plan(tiny_source, rank=rank)
    assert absorbs_keys(plan) == (rank < plan.head_dim)
    tokens = _tokens(src, tmp_path, samples=3, length=24)
    attn, tensors, x, angles, mla_angles = _layer(src, plan, tokens)
    ctx = mla_head_contexts(tensors=tensors, plan=plan, x=x, angles=mla_angles)
    direct = mla_attention(tensors=tensors, plan=plan, x=x, angles=mla_angles)
    assert torch.allclose(mla_output_from_contexts(tensors=tensors, plan=plan, contexts=ctx), direct, atol=1e-9)
    # what the balance search ranks its candidates by
    assert torch.allclose(_candidate_output(tensors, plan, x, mla_angles), direct, atol=1e-9)
    # The statistics pass keeps each source head's output: the output fit's targets, without a second source pass.
    calib = Propagation(source=src, tokens=tokens).layer_calibration(0, head_outputs=True)
    heads = source_attention(weights=attn, x=x, angles=angles, n_heads=plan.n_heads, n_kv=plan.n_kv,
                             head_dim=plan.head_dim, heads=True)
    assert torch.allclose(torch.cat(calib.head_outputs).double(), heads, rtol=1e-4, atol=1e-5)


def test_kept_layer_outputs_move_the_stream_like_rerunning_the_layer(tiny_source, tmp_path, monkeypatch):
    import mha2mla.conversion as conversion

    src = tiny_source(n_kv=2, head_dim=16, seed=8, layers=3)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 20)
    # float32 streams: the two paths round differently (fused vs blockwise attention), bfloat16 would magnify that
    kw = dict(rank=10, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=4, calibration_length=32,
              method=Method(mlp_dtype="float32"))
    kept = mha2mla.convert(source=src, output=str(tmp_path / "kept"), **kw)
    monkeypatch.setattr(conversion, "CONTEXT_CACHE_MAX_FLOATS", 0)  # run the converted layer again instead
    rerun = mha2mla.convert(source=src, output=str(tmp_path / "rerun"), **kw)
    for a, b in zip(kept.record["layers"], rerun.record["layers"]):
        assert a["output_fit_rel_error"] == pytest.approx(b["output_fit_rel_error"], rel=1e-3, abs=1e-6)


def test_tracked_source_stream_moves_like_the_source_model(tiny_source, tmp_path):
    # The drift correction carries the source's own hidden states beside the converted ones: advancing them with the
    # attention outputs computed in the fit must equal running the source layer, and equal a plain source propagation.
    src = load_source(tiny_source(n_kv=2, head_dim=16, seed=3, layers=2))
    tokens = _tokens(src, tmp_path, samples=4, length=24)
    plain = Propagation(source=src, tokens=tokens, batch=2)
    tracked = Propagation(source=src, tokens=tokens, batch=2, track_source=True)
    reused = Propagation(source=src, tokens=tokens, batch=2, track_source=True)
    assert tracked.tracks_source and not plain.tracks_source
    from mha2mla.conversion import _layer_tensors

    attn, _ = _layer_tensors(src, 0, torch.float32)
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
    tokens = _tokens(src, tmp_path, samples=6, length=24)
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
    tokens = _tokens(src, tmp_path, samples=6, length=24)
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


def test_balance_search_reads_the_statistics_source_heads_as_its_reference(tiny_source, tmp_path):
    # The balance search ranks candidates against the source layer's output on a few sequences; with the statistics'
    # source heads at hand it takes them instead of rerunning the source attention: same choice, same error.
    import dataclasses

    from mha2mla.conversion import _layer_tensors

    src = load_source(tiny_source(n_kv=2, head_dim=16, seed=5, layers=1))
    plan = make_plan(source=src, rank=12, rope_dim=8, rope_stride=None, dtype="auto")
    attn, rest = _layer_tensors(src, 0, torch.float64)
    bound = math.sqrt(plan.hidden) * float(rest["input_layernorm.weight"].abs().max())
    prop = Propagation(source=src, tokens=_tokens(src, tmp_path, samples=6, length=32), batch=4)
    calib = prop.layer_calibration(0, head_outputs=True)
    assert calib.head_outputs[0].shape[0] >= calib.x_sample.shape[0]
    _, kept = convert_attention(plan=plan, weights=attn, input_norm_bound=bound, calib=calib, method=Method())
    _, rerun = convert_attention(plan=plan, weights=attn, input_norm_bound=bound,
                                 calib=dataclasses.replace(calib, head_outputs=None), method=Method())
    assert kept.key_weight == rerun.key_weight
    assert kept.output_rel_error == pytest.approx(rerun.output_rel_error, rel=1e-4)


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


def test_drift_correction_lowers_the_error_that_reaches_the_logits(tiny_source, tmp_path):
    from test_calibration import _held_out_error

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=4)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=6, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    errors = {}
    for drift in (0.0, 0.5):
        out = str(tmp_path / f"d{drift}")
        res = mha2mla.convert(source=src, output=out, method=Method(drift_correction=drift, mlp_drift=0.0), **kw)
        assert res.record["calibration"]["method"]["drift_correction"] == drift
        assert res.record["calibration"]["propagation"]["tracks_source"] == (drift > 0)
        assert ("drift that the layers below" in (tmp_path / f"d{drift}" / "README.md").read_text()) == (drift > 0)
        errors[drift] = _held_out_error(src, out)
    assert errors[0.5] < errors[0.0], errors


def test_down_projection_fit_keeps_its_prior_and_recovers_a_linear_target():
    from mha2mla.mlp_fit import DownProjectionFit

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 200, 24, generator=g)
    w0, w_star = torch.randn(10, 24, generator=g), torch.randn(10, 24, generator=g)
    fit = DownProjectionFit(features=24, out_features=10)
    for batch in a:
        fit.add(activations=batch, residual=batch @ w_star.T)  # the source output is W* a; the MLP gives W0 a
    assert torch.equal(fit.solve(prior=w0, beta=0.0), w0.double())  # β = 0: the source weight, to the last bit
    assert torch.allclose(fit.solve(prior=w0, beta=1.0, ridge=1e-9), w_star.double(), atol=1e-4)
    half = fit.solve(prior=w0, beta=0.5, ridge=1e-9)  # the target is linear in β, and so is the fit
    assert torch.allclose(half, 0.5 * (w0 + w_star).double(), atol=1e-4)
    shrunk = fit.solve(prior=w0, beta=1.0, ridge=1e3)  # a huge ridge returns (almost) the prior
    assert (shrunk - w0.double()).norm() < 0.01 * (w_star - w0).norm()
    still = DownProjectionFit(features=24, out_features=10)
    for batch in a:  # no drift: the source stream is what the MLP gives, up to float32 rounding
        still.add(activations=batch, residual=batch @ w0.T)
    assert torch.equal(still.solve(prior=w0, beta=1.0, ridge=1e-9), w0.double())  # the prior, to the last bit


def test_down_projection_fit_survives_rank_deficient_activations():
    from mha2mla.mlp_fit import DownProjectionFit
    from mha2mla.moments import symmetric_from_lower

    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 12, generator=g)
    a = torch.cat((a, a[:, :4]), dim=1)  # 16 features, 4 of them copies: E[aaᵀ] has rank 12
    w0, w_star = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    fit = DownProjectionFit(features=16, out_features=5)
    fit.add(activations=a, residual=a @ w_star.T)
    assert torch.linalg.cholesky_ex(symmetric_from_lower(fit.aa)).info > 0  # (so the fallback below is what runs)
    w = fit.solve(prior=w0, beta=1.0, ridge=0.0)  # no ridge: the Cholesky factorisation fails, least squares takes over
    assert torch.isfinite(w).all()
    assert torch.allclose(a.double() @ w.T, a.double() @ w_star.double().T, atol=1e-4)  # met (float32 inputs)
    assert torch.equal(fit.solve(prior=w0, beta=0.0, ridge=0.0), w0.double())  # β = 0: the prior, to the last bit


def test_mlp_refit_lowers_the_error_that_reaches_the_logits_and_is_recorded(tiny_source, tmp_path):
    from safetensors.torch import load_file

    from test_calibration import _held_out_error

    def down_proj(folder):
        name = "model.layers.3.mlp.down_proj.weight"
        return next(t[name] for f in sorted(folder.glob("*.safetensors")) if name in (t := load_file(str(f))))

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=4)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=6, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    errors, downs = {}, {}
    for beta in (0.0, 0.4):
        out = tmp_path / f"m{beta}"
        res = mha2mla.convert(source=src, output=str(out), method=Method(mlp_drift=beta), **kw)
        changes = [x["mlp_down_rel_change"] for x in res.record["layers"]]
        if beta:
            assert all(c is not None and c > 1e-4 for c in changes), changes  # every layer, the last one too
        else:
            assert changes == [None] * 4
        assert ("MLP down-projections refit" in (out / "README.md").read_text()) == (beta > 0)
        downs[beta] = down_proj(out)
        errors[beta] = _held_out_error(src, str(out))
    source_down = down_proj(tmp_path / "src") * res.plan.residual_scale  # the writer scales the residual branch
    assert torch.allclose(downs[0.0], source_down, rtol=1e-6) and not torch.allclose(downs[0.4], source_down, rtol=1e-3)
    assert errors[0.4] < errors[0.0], errors


def test_cli_keep_mlp_switches_the_mlp_refit_off(tiny_source, tmp_path):
    import json

    from click.testing import CliRunner

    from mha2mla.cli import main

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=2)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    changes = {}
    for flag in ([], ["--keep-mlp"]):
        out = tmp_path / ("keep" if flag else "refit")
        res = CliRunner().invoke(main, ["convert", src, "-o", str(out), "--rank", "6", "--rope-dim", "8", "-q",
                                        "--calibration", str(corpus), "--calibration-samples", "8",
                                        "--calibration-length", "32", *flag])
        assert res.exit_code == 0, res.output
        record = json.loads((out / "mha2mla.json").read_text())
        assert record["calibration"]["method"]["mlp_drift"] == (0.0 if flag else 0.4)
        changes[bool(flag)] = [x["mlp_down_rel_change"] for x in record["layers"]]
    assert changes[True] == [None, None] and all(c > 0 for c in changes[False])


def test_cli_mlp_dtype_reaches_the_record(tiny_source, tmp_path):
    import json

    from click.testing import CliRunner

    from mha2mla.calibration import native_bfloat16
    from mha2mla.cli import main

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=1)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    expected = {"float32": "float32", "bfloat16": "bfloat16",
                "auto": "bfloat16" if native_bfloat16(torch.device("cpu")) else "float32"}
    for choice, want in expected.items():
        out = tmp_path / choice
        res = CliRunner().invoke(main, ["convert", src, "-o", str(out), "--rank", "6", "--rope-dim", "8", "-q",
                                        "--calibration", str(corpus), "--calibration-samples", "4",
                                        "--calibration-length", "32", "--mlp-dtype", choice])
        assert res.exit_code == 0, res.output
        record = json.loads((out / "mha2mla.json").read_text())
        assert record["calibration"]["propagation"]["mlp_dtype"] == want
        assert record["calibration"]["method"]["mlp_dtype"] == choice
    res = CliRunner().invoke(main, ["convert", src, "-o", str(tmp_path / "x"), "--rank", "6", "--mlp-dtype", "fp8"])
    assert res.exit_code == 2 and "fp8" in res.output


@pytest.mark.parametrize("dq,dv", [(24, 40), (24, 8), (16, 16)])
def test_causal_attention_with_unequal_widths_equals_the_explicit_softmax(dq, dv):
    """The zero-padded fused attention (query/key and value widths differ, as in MLA) equals softmax(qkᵀ)v computed
    explicitly."""
    from mha2mla.reference import causal_sdpa

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 20, dq, generator=g), torch.randn(2, 3, 20, dq, generator=g)
    v = torch.randn(2, 3, 20, dv, generator=g)
    scale = 0.3
    mask = torch.ones(20, 20, dtype=torch.bool).tril()
    want = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf).softmax(-1) @ v
    got = causal_sdpa(q, k, v, scale)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_streams_keep_a_lossy_conversion_as_good_as_float32(tiny_source, tmp_path):
    """bfloat16 MLP forwards of the two calibration streams (the default where the CPU multiplies bfloat16 natively)
    round at ~1e-3: far below a lossy conversion's error, which must stay what float32 streams give."""
    from test_calibration import _held_out_error

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=3)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=6, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    errors = {}
    for dt in ("float32", "bfloat16"):
        res = mha2mla.convert(source=src, output=str(tmp_path / dt), method=Method(mlp_dtype=dt), **kw)
        assert res.record["calibration"]["propagation"]["mlp_dtype"] == dt
        errors[dt] = _held_out_error(src, str(tmp_path / dt))
    assert errors["float32"] > 1e-2  # lossy
    assert abs(errors["bfloat16"] - errors["float32"]) < 0.03 * errors["float32"], errors


def test_method_rejects_an_unknown_mlp_dtype():
    with pytest.raises(ValueError, match="mlp_dtype must be 'auto', 'float32' or 'bfloat16', got 'float16'"):
        Method(mlp_dtype="float16")
    with pytest.raises(ValueError, match="context_stride must be ≥ 1, got 0"):
        Method(context_stride=0)
    with pytest.raises(ValueError, match=r"source_sequences must be ≥ 0 \(0: all sequences\), got -1"):
        Method(source_sequences=-1)


def test_keep_freed_memory_is_idempotent():
    import platform

    from mha2mla.allocator import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    assert first == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")  # elsewhere a no-op


def test_method_from_spec_parses_every_field_kind_and_rejects_unknown_names():
    m = Method.from_spec("expected_rotation=false, query_fit=3,drift_correction=0.25,mlp_dtype=float32")
    assert (m.expected_rotation, m.query_fit, m.drift_correction, m.mlp_dtype) == (False, 3, 0.25, "float32")
    assert Method.from_spec("") == Method()
    with pytest.raises(ValueError, match="method switch 'qfit=3'.*query_fit"):
        Method.from_spec("qfit=3")
    with pytest.raises(ValueError, match="mlp_dtype must be"):
        Method.from_spec("mlp_dtype=half")


def test_moment_stride_holds_the_joint_fits_cost_near_its_full_size():
    from mha2mla.value_path import OUTPUT_FIT_FULL_FEATURES, moment_stride

    assert OUTPUT_FIT_FULL_FEATURES == 1024
    # SmolLM2: 9 heads × 32 / 64 / 96 / 160 latent → every position up to 96, every 2nd at 160 (1440 features)
    assert [moment_stride(features=9 * r) for r in (32, 64, 96, 160)] == [1, 1, 1, 2]
    assert [moment_stride(features=f) for f in (1, 1024, 2048, 4096)] == [1, 1, 4, 16]  # ~(features/1024)²
    with pytest.raises(ValueError, match="features must be ≥ 1, got 0"):
        moment_stride(features=0)


def test_drift_corrections_run_only_where_the_latent_is_narrow(tiny_source, tmp_path):
    import dataclasses

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=2)  # key width n_kv·head_dim = 32: drift below rank 16
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    runs = {"narrow": (15, Method()), "wide": (16, Method()),
            "forced": (16, dataclasses.replace(Method(), drift_below_share=float("inf")))}
    for name, (rank, method) in runs.items():
        res = mha2mla.convert(source=src, output=str(tmp_path / name), rank=rank, method=method, **kw)
        prop = res.record["calibration"]["propagation"]
        changes = [x["mlp_down_rel_change"] for x in res.record["layers"]]
        corrected = "drift that the layers below" in (tmp_path / name / "README.md").read_text()
        if name == "wide":
            assert not prop["tracks_source"] and changes == [None, None] and not corrected
            assert prop["drift"] == "off: rank 16 ≥ drift_below_share 0.5 × the source's key width 32 (n_kv·head_dim)"
        else:
            assert prop["tracks_source"] and all(c > 1e-4 for c in changes) and corrected
            assert "drift" not in prop
    off = mha2mla.convert(source=src, output=str(tmp_path / "off"), rank=16, method=Method(mlp_drift=0, drift_correction=0), **kw)
    assert "drift" not in off.record["calibration"]["propagation"]  # (none was asked for: nothing to explain)
    with pytest.raises(ValueError, match=r"drift_below_share must be ≥ 0 \(inf: always\), got -1"):
        Method(drift_below_share=-1)


def test_output_fit_stride_is_chosen_from_the_joint_fits_size(tiny_source, tmp_path, monkeypatch):
    import mha2mla.value_path as value_path
    from safetensors.torch import load_file

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=2)  # 4 heads
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    kw = dict(rank=8, rope_dim=8, progress=False, calibration=str(corpus), calibration_samples=8, calibration_length=32)
    res = mha2mla.convert(source=src, output=str(tmp_path / "full"), **kw)
    assert res.record["calibration"]["output_fit_stride"] == 1  # 32 features
    monkeypatch.setattr(value_path, "OUTPUT_FIT_FULL_FEATURES", 16)  # 32 features are now twice the full size: every 4th
    auto = mha2mla.convert(source=src, output=str(tmp_path / "auto"), **kw)
    assert auto.record["calibration"]["output_fit_stride"] == 4
    pinned = mha2mla.convert(source=src, output=str(tmp_path / "pinned"), method=Method(output_fit_stride=4), **kw)
    weights = {n: {k: v for f in sorted((tmp_path / n).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
               for n in ("full", "auto", "pinned")}
    assert weights["auto"].keys() == weights["pinned"].keys()
    assert all(torch.equal(weights["auto"][k], weights["pinned"][k]) for k in weights["auto"])
    assert not torch.equal(weights["auto"]["model.layers.0.self_attn.o_proj.weight"],
                           weights["full"]["model.layers.0.self_attn.o_proj.weight"])
    assert pinned.record["calibration"]["output_fit_stride"] == 4


def test_cli_method_switches_reach_the_record_and_bad_ones_fail_in_one_line(tiny_source, tmp_path):
    import json

    from click.testing import CliRunner

    from mha2mla.cli import main

    src = tiny_source(n_kv=2, head_dim=16, seed=7, layers=1)
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 40)
    base = ["convert", src, "--rank", "16", "--rope-dim", "8", "-q", "--calibration", str(corpus),
            "--calibration-samples", "8", "--calibration-length", "32"]
    res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "a"), "--method", "drift_below_share=inf,output_fit_stride=2"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "a" / "mha2mla.json").read_text())
    assert record["calibration"]["method"]["drift_below_share"] == "inf"  # (strict JSON has no Infinity)
    assert record["calibration"]["propagation"]["tracks_source"] and record["calibration"]["output_fit_stride"] == 2
    res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "b")])
    assert res.exit_code == 0 and "drift corrections off: rank 16 ≥ drift_below_share 0.5" in res.output, res.output
    for spec, message in (("qfit=3", "method switch 'qfit=3': expected NAME=VALUE with NAME one of"),
                          ("drift_below_share=x", "method switch 'drift_below_share=x': drift_below_share takes a float, got 'x'")):
        res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "c"), "--method", spec])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "c").exists()
