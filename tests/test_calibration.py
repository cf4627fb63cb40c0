"""Calibrated conversion: layer-by-layer statistics, the math pieces, and quality over data-free."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CORPUS

import mha2mla
from mha2mla.attention import Method
from mha2mla.calibration import calibrate, calibration_tokens
from mha2mla.factorize import factorize_latent, refine_latent, sqrtm_psd, svd_via_gram
from mha2mla.source import load_source


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(CORPUS * 40)
    return str(path)


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


def test_long_document_is_tokenised_on_a_prefix_with_the_same_ids(tiny_source):
    from transformers import AutoTokenizer

    from mha2mla.data import pack_tokens

    tok = AutoTokenizer.from_pretrained(tiny_source())
    long_doc = CORPUS * 40
    full = tok(long_doc, add_special_tokens=False)["input_ids"]
    for wanted in (1, 37, 300, len(full) - 5, len(full) + 50):
        got = pack_tokens(tok, [long_doc, "the cat sat"], max_tokens=wanted)
        want = (full + [tok.eos_token_id] + tok("the cat sat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        assert got.tolist() == want[:wanted]


def _held_out_error(src_dir: str, out: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src_dir)
    ids = torch.tensor([tok(CORPUS * 2)["input_ids"][7:71]])
    outs = []
    for path in (src_dir, out):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            outs.append(m(ids).logits)
    return ((outs[1] - outs[0]).norm() / outs[0].norm()).item()


def test_calibrated_conversion_beats_data_free(tiny_source, tmp_path, corpus):
    src = tiny_source(n_kv=2, head_dim=16, seed=7)
    mha2mla.convert(source=src, output=str(tmp_path / "free"), rank=12, rope_dim=8, progress=False)
    cal = mha2mla.convert(source=src, output=str(tmp_path / "cal"), rank=12, rope_dim=8, progress=False,
                          calibration=corpus, calibration_samples=8, calibration_length=32)
    assert cal.record["calibration"]["tokens"] == 8 * 32
    assert all(layer["attention_output_rel_error"] is not None for layer in cal.record["layers"])
    e_free = _held_out_error(src, str(tmp_path / "free"))
    e_cal = _held_out_error(src, str(tmp_path / "cal"))
    assert e_cal < e_free, (e_cal, e_free)


def test_calibrated_mqa_full_rank_stays_exact(tiny_source, tmp_path, corpus):
    src = tiny_source(n_kv=1, head_dim=16)
    # float32 streams: bfloat16 MLP rounding (the default on CPUs that multiply it natively) is ~1e-3 of an exact
    # conversion's output
    mha2mla.convert(source=src, output=str(tmp_path / "cal"), rank=16, rope_dim=16, progress=False, dtype="float32",
                    calibration=corpus, calibration_samples=4, calibration_length=32,
                    method=Method(mlp_dtype="float32"))
    assert _held_out_error(src, str(tmp_path / "cal")) < 1e-5


def test_weighted_factorisation_is_optimal_in_its_norm():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(16, 24, generator=g, dtype=torch.float64), torch.randn(16, 24, generator=g, dtype=torch.float64)
    a = torch.randn(24, 24, generator=g, dtype=torch.float64)
    s = sqrtm_psd(a @ a.T / 24)
    errs = [factorize_latent(k=k, v=v, rank=r, input_sqrt_cov=s) for r in (4, 8, 16, 24)]
    weighted = [math.hypot(f.k_rel_error * (k @ s).norm(), f.v_rel_error * (v @ s).norm()) for f in errs]
    assert weighted == sorted(weighted, reverse=True) and weighted[-1] < 1e-8
    # The weighted SVD beats the plain one in the weighted norm.
    plain = factorize_latent(k=k, v=v, rank=8)
    stack = torch.cat((k, v)) @ s
    plain_err = (stack - torch.cat((plain.up_k, plain.up_v)) @ plain.down @ s).norm()
    assert weighted[1] < plain_err


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (7, 7)])
def test_svd_via_gram_equals_lapack_svd(shape):
    g = torch.Generator().manual_seed(2)
    m = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(0, -3, shape[1], dtype=torch.float64)
    u, s, vh = svd_via_gram(m)
    k = min(shape)
    assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    assert torch.allclose(s, torch.linalg.svdvals(m), rtol=1e-9, atol=1e-12 * float(s[0]))
    assert float((u * s @ vh - m).norm() / m.norm()) < 1e-12
    assert torch.allclose(u.T @ u, torch.eye(k, dtype=m.dtype), atol=1e-9)
    assert torch.allclose(vh @ vh.T, torch.eye(k, dtype=m.dtype), atol=1e-9)
    # float32 in, float32 out (computed in float64)
    u32, s32, _ = svd_via_gram(m.float())
    assert u32.dtype == torch.float32 and torch.allclose(s32.double(), s, rtol=1e-5)


def test_svd_via_gram_of_a_rank_deficient_matrix_zeroes_the_missing_directions():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)
    u, s, vh = svd_via_gram(m)  # tall: U = M V / S, undefined where S = 0
    assert float((u * s @ vh - m).norm() / m.norm()) < 1e-12
    assert torch.allclose(u[:, :3].T @ u[:, :3], torch.eye(3, dtype=m.dtype), atol=1e-9)
    assert float(u[:, 3:].abs().max()) == 0 and float(s[3:].max()) < 1e-6 * float(s[0])


def test_alternating_refinement_never_increases_the_objective():
    g = torch.Generator().manual_seed(1)
    n_kv, hd, d, r = 2, 4, 12, 5
    k, v = torch.randn(n_kv * hd, d, generator=g, dtype=torch.float64), torch.randn(n_kv * hd, d, generator=g, dtype=torch.float64)
    def psd(n):
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        return m @ m.T / n
    sk, sv = psd(d), torch.stack([psd(d) for _ in range(n_kv)])
    start = factorize_latent(k=k, v=v, rank=r, input_sqrt_cov=sqrtm_psd(sk)).down

    def objective(a, bk, bv):
        ek, ev = (k - bk @ a).reshape(n_kv, hd, d), (v - bv @ a).reshape(n_kv, hd, d)
        return float(torch.einsum("gai,ij,gaj->", ek, sk, ek) + torch.einsum("gai,gij,gaj->", ev, sv, ev))

    _, bk0, bv0 = refine_latent(k=k, v=v, down=start, sigma_k=sk, sigma_v=sv, iters=0)
    a1, bk1, bv1 = refine_latent(k=k, v=v, down=start, sigma_k=sk, sigma_v=sv, iters=6)
    assert objective(a1, bk1, bv1) <= objective(start, bk0, bv0) + 1e-9


def test_method_ablation_switches_are_respected(tiny_source, tmp_path, corpus):
    src = tiny_source(n_kv=2, head_dim=16, seed=2)
    res = mha2mla.convert(source=src, output=str(tmp_path / "a"), rank=12, rope_dim=8, progress=False,
                          calibration=corpus, calibration_samples=4, calibration_length=32,
                          method=Method(balance_search=False, value_refit=False))
    assert res.record["calibration"]["method"]["balance_search"] is False
    assert all(layer["attention_output_rel_error"] is None for layer in res.record["layers"])


def test_kv_budget_chooses_a_split_by_measurement(tiny_source, tmp_path, corpus):
    src = tiny_source(n_kv=2, head_dim=16, seed=4)
    res = mha2mla.convert(source=src, output=str(tmp_path / "b"), kv_budget=24, progress=False, report=True,
                          calibration=corpus, calibration_samples=4, calibration_length=32)
    info = res.record["calibration"]["kv_budget"]
    assert res.plan.rank + res.plan.rope_dim == 24
    errors = info["mean_attention_output_rel_error"]
    assert info["chosen"] == min(errors, key=errors.get) and len(errors) >= 2
    assert (tmp_path / "b" / "mha2mla-report.png").stat().st_size > 1000
    with pytest.raises(mha2mla.Mha2mlaError, match="--kv-budget chooses the rank/rope split"):
        mha2mla.convert(source=src, output=str(tmp_path / "c"), kv_budget=24)
    with pytest.raises(mha2mla.Mha2mlaError, match="either --rank"):
        mha2mla.convert(source=src, output=str(tmp_path / "c"), rank=8, kv_budget=24, calibration=corpus)


def test_latent_step_solves_its_normal_equations_with_per_head_value_blocks():
    """One alternating round with many CG steps gives the exact minimiser over ``A`` for the fitted up-projections
    (checked against the dense Kronecker solve), with more value blocks (query heads) than key blocks (KV heads)."""
    from mha2mla.factorize import _fit_up

    g = torch.Generator().manual_seed(4)
    n_kv, n_h, hd, d, r = 2, 4, 3, 7, 4
    k = torch.randn(n_kv * hd, d, generator=g, dtype=torch.float64)
    v = torch.randn(n_h * hd, d, generator=g, dtype=torch.float64)

    def psd(n):
        m = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
        return m @ m.T / n

    sk, sv = psd(d), torch.stack([psd(d) for _ in range(n_h)])
    wv = torch.stack([psd(hd) for _ in range(n_h)])
    start = factorize_latent(k=k, v=v[: n_kv * hd], rank=r, input_sqrt_cov=sqrtm_psd(sk)).down
    a, bk, bv = refine_latent(k=k, v=v, down=start, sigma_k=sk, sigma_v=sv, weight_v=wv, iters=1, cg_iters=200)
    assert bk.shape == (n_kv * hd, r) and bv.shape == (n_h * hd, r)
    # The same round by hand: up-projections for ``start``, then A from vec(Σ_b P_b A Σ_b) = vec(rhs).
    bk0 = _fit_up(k.reshape(n_kv, hd, d), start, sk)
    bv0 = _fit_up(v.reshape(n_h, hd, d), start, sv)
    op = sum(torch.kron(b.T @ b, sk) for b in bk0)
    op = op + sum(torch.kron(b.T @ w @ b, s) for b, w, s in zip(bv0, wv, sv))
    rhs = sum(b.T @ kk @ sk for b, kk in zip(bk0, k.reshape(n_kv, hd, d)))
    rhs = rhs + sum(b.T @ w @ vv @ s for b, w, vv, s in zip(bv0, wv, v.reshape(n_h, hd, d), sv))
    want = torch.linalg.solve(op, rhs.reshape(-1)).reshape(r, d)
    assert torch.allclose(a, want, rtol=1e-6, atol=1e-8)


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


@pytest.mark.parametrize("length,blocks", [(37, 4), (32, 4), (9, 2), (5, 8)])
def test_causal_context_moment_equals_the_dense_product(length, blocks):
    from mha2mla.moments import block_edges, context_moment_from_columns

    g = torch.Generator().manual_seed(length)
    b, heads, groups, d = 3, 6, 2, 11
    scores = torch.randn(b, heads, length, length, generator=g, dtype=torch.float64)
    p = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    x = torch.randn(b, length, d, generator=g, dtype=torch.float64)
    pp = (p.transpose(-1, -2) @ p).view(b, groups, heads // groups, length, length).sum(2)
    want = torch.einsum("bni,bgnm,bmj->gij", x, pp, x)
    edges = block_edges(length, blocks)  # each key block's columns, from the queries that can see it
    columns = [p[..., i0:, i0:i1] for i0, i1 in zip(edges[:-1], edges[1:])]
    got = context_moment_from_columns(columns, edges, x, groups)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length,stride", [(37, 1), (3, 1), (37, 4)])
def test_blockwise_attention_statistics_match_the_dense_eager_attention(tiny_source, corpus, length, stride):
    from mha2mla.calibration import Propagation, _attention_stats

    src = load_source(tiny_source(n_kv=2, layers=1))
    tokens = calibration_tokens(source=src, data=corpus, samples=3, length=max(length, 16))[:, :length]
    prop = Propagation(source=src, tokens=tokens, batch=3)
    layer = prop._load(0)
    x = next(prop.inputs(0))
    # transformers' own eager attention, with its probabilities
    layer.self_attn.config._attn_implementation = "eager"
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out, p = layer.self_attn(hidden_states=x, position_embeddings=(prop.cos, prop.sin), attention_mask=causal)
    nh, nkv, hd = src.n_heads, src.n_kv, src.head_dim
    hist, ctx, queries, received, heads = _attention_stats(layer, x, prop.cos[:, None], prop.sin[:, None], nh, nkv, hd,
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


@pytest.mark.parametrize("arch,bias", [("llama", False), ("qwen2", True)])
def test_reference_source_attention_is_the_transformers_layer(tiny_source, corpus, arch, bias):
    """The plain-torch source attention (grouped KV heads read once on the CPU) equals transformers' own attention."""
    from mha2mla.attention import AttentionWeights
    from mha2mla.calibration import Propagation
    from mha2mla.reference import source_attention, source_qkv

    kw = {"attention_bias": True} if bias else {}
    src = load_source(tiny_source(arch=arch, n_kv=2, layers=1, **kw))
    tokens = calibration_tokens(source=src, data=corpus, samples=2, length=24)
    prop = Propagation(source=src, tokens=tokens, batch=2)
    layer = prop._load(0)
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
