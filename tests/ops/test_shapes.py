"""The target's shapes and constants (:mod:`mha2mla.ops.shapes`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mha2mla.ops.shapes import ConversionPlan, kv_group, max_rank


@pytest.mark.parametrize("n_kv,head_dim,hidden,want", [(1, 16, 64, 32), (2, 16, 64, 64), (4, 16, 64, 64),
                                                       (3, 64, 576, 384), (8, 128, 4096, 2048)])
def test_max_rank_is_the_rank_of_the_stacked_keys_and_values(n_kv, head_dim, hidden, want):
    assert max_rank(n_kv=n_kv, head_dim=head_dim, hidden=hidden) == want
    # that bound is the rank: [W_k; W_v] of 2·n_kv·head_dim random rows over hidden inputs has exactly this rank
    g = torch.Generator().manual_seed(n_kv)
    stack = torch.randn(2 * n_kv * head_dim, hidden, generator=g, dtype=torch.float64)
    assert int(torch.linalg.matrix_rank(stack)) == want


@pytest.mark.parametrize("n_heads,n_kv,want", [(4, 1, [0, 0, 0, 0]), (4, 2, [0, 0, 1, 1]), (4, 4, [0, 1, 2, 3]),
                                               (6, 3, [0, 0, 1, 1, 2, 2])])
def test_kv_group_gives_consecutive_query_heads_one_kv_head(n_heads, n_kv, want):
    """transformers' repeat_kv order: query head h reads KV head h // (n_heads / n_kv)."""
    assert kv_group(n_heads, n_kv).tolist() == want
    keys = torch.arange(n_kv)[:, None].repeat(1, 3)
    repeated = keys.repeat_interleave(n_heads // n_kv, dim=0)  # what repeat_kv does to [n_kv, ...]
    assert torch.equal(keys[kv_group(n_heads, n_kv)], repeated)


def test_plan_properties_follow_its_fields():
    plan = ConversionPlan(rank=96, rope_dim=32, rope_stride=2, rope_theta=100.0, n_layers=30, hidden=576, n_heads=9,
                          n_kv=3, head_dim=64, q_lora_rank=None, attention_bias=False, residual_scale=1.0,
                          tie_embeddings=True, dtype="bfloat16")
    assert (plan.source_kv_values, plan.kv_values, plan.max_rank) == (2 * 3 * 64, 96 + 32, 384)
    assert plan.torch_dtype is torch.bfloat16 and dataclasses.replace(plan, dtype="float32").torch_dtype is torch.float32
    d = plan.to_dict()
    assert d["rank"] == 96 and d["dtype"] == "bfloat16" and set(d) == {f.name for f in dataclasses.fields(plan)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rank = 8
