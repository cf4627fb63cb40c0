"""One attention layer, source → MLA (:mod:`mha2mla.conversion.latent`): the latent, the rope key, the balance
search, and what each calibrated ingredient switches."""

from __future__ import annotations

import math

import pytest
import torch

import mha2mla
from mha2mla.checkpoint.source import load_source
from mha2mla.conversion.latent import convert_attention
from mha2mla.conversion.layer import read_layer
from mha2mla.conversion.options import Method
from mha2mla.conversion.plan import make_plan
from mha2mla.conversion.stream import Propagation
from mha2mla.ops.attention import mla_attention, relative_output_error, source_attention
from mha2mla.ops.rope import kept_frequencies
from tests.conftest import corpus_tokens


@pytest.mark.parametrize("rank,exact", [(16, True), (8, False)])
def test_data_free_mqa_with_full_rope_is_the_source_attention_at_full_rank(tiny_source, rank, exact):
    """One KV head, every frequency kept: the shared rope key is the key and the latent carries the values alone;
    at rank head_dim the converted layer computes the source layer's attention (the latent norm linear to 1e-5),
    below it the values lose rank."""
    src = load_source(tiny_source(n_kv=1, head_dim=16, eps=1e-5))
    plan = make_plan(source=src, rank=rank, rope_dim=16, dtype="float32")
    attn, rest = read_layer(src, 0, torch.float64)
    bound = math.sqrt(plan.hidden) * float(rest["input_layernorm.weight"].abs().max())
    tensors, stats = convert_attention(plan=plan, weights=attn, input_norm_bound=bound)
    assert stats.rope_energy_kept == pytest.approx(1.0, abs=1e-9) and stats.output_rel_error is None
    x = torch.randn(2, 12, plan.hidden, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * (0.9 * bound / x.norm(dim=-1, keepdim=True))  # inputs within the bound the latent norm is linear up to
    inv_freq = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    angles = torch.arange(12, dtype=torch.float64)[:, None] * inv_freq
    kept = kept_frequencies(head_dim=16, rope_dim=16, stride=plan.rope_stride)
    want = source_attention(weights=attn, x=x, angles=angles, n_heads=plan.n_heads, n_kv=1, head_dim=16)
    got = mla_attention(tensors=tensors, plan=plan, x=x, angles=angles[:, kept]) / plan.residual_scale
    error = relative_output_error(want, got)
    if exact:
        assert error < 1e-4 and stats.v_rel_error < 1e-9
    else:
        assert error > 1e-2 and stats.v_rel_error > 1e-2


def test_method_ablation_switches_are_respected(tiny_source, tmp_path, corpus):
    src = tiny_source(n_kv=2, head_dim=16, seed=2)
    res = mha2mla.convert(source=src, output=str(tmp_path / "a"), rank=12, rope_dim=8, progress=False,
                          calibration=corpus, calibration_samples=4, calibration_length=32,
                          method=Method(balance_search=False, value_refit=False))
    assert res.record["calibration"]["method"]["balance_search"] is False
    assert all(layer["attention_output_rel_error"] is None for layer in res.record["layers"])


def test_balance_search_reads_the_statistics_source_heads_as_its_reference(tiny_source, tmp_path):
    # The balance search ranks candidates against the source layer's output on a few sequences; with the statistics'
    # source heads at hand it takes them instead of rerunning the source attention: same choice, same error.
    import dataclasses

    src = load_source(tiny_source(n_kv=2, head_dim=16, seed=5, layers=1))
    plan = make_plan(source=src, rank=12, rope_dim=8, rope_stride=None, dtype="auto")
    attn, rest = read_layer(src, 0, torch.float64)
    bound = math.sqrt(plan.hidden) * float(rest["input_layernorm.weight"].abs().max())
    prop = Propagation(source=src, tokens=corpus_tokens(src, tmp_path, samples=6, length=32), batch=4)
    calib = prop.layer_calibration(0, head_outputs=True)
    assert calib.head_outputs[0].shape[0] >= calib.x_sample.shape[0]
    _, kept = convert_attention(plan=plan, weights=attn, input_norm_bound=bound, calib=calib, method=Method())
    _, rerun = convert_attention(plan=plan, weights=attn, input_norm_bound=bound,
                                 calib=dataclasses.replace(calib, head_outputs=None), method=Method())
    assert kept.key_weight == rerun.key_weight
    assert kept.output_rel_error == pytest.approx(rerun.output_rel_error, rel=1e-4)
