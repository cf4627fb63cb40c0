"""Second moments accumulated in blocks (:mod:`mha2mla.ops.moments`)."""

from __future__ import annotations

import pytest
import torch

from mha2mla.ops.moments import add_lower_gram, block_edges, context_moment_from_columns, symmetric_from_lower


@pytest.mark.parametrize("length,blocks", [(37, 4), (32, 4), (9, 2), (5, 8)])
def test_causal_context_moment_equals_the_dense_product(length, blocks):
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


@pytest.mark.parametrize("length,blocks,want", [(10, 4, [0, 2, 5, 7, 10]), (3, 8, [0, 1, 2, 3]), (7, 1, [0, 7])])
def test_block_edges_split_into_near_equal_spans(length, blocks, want):
    assert block_edges(length, blocks) == want


@pytest.mark.parametrize("blocks", [1, 3, 5])
def test_lower_blocks_of_a_batch_of_grams_give_the_full_symmetric_moment(blocks):
    """add_lower_gram accumulates only the blocks on and below the diagonal (the rest stays as it was);
    symmetric_from_lower gives back Σ xᵀx, in float64 from float32 inputs, over several calls."""
    g = torch.Generator().manual_seed(blocks)
    x1, x2 = torch.randn(2, 30, 9, generator=g), torch.randn(2, 20, 9, generator=g)
    acc = torch.zeros(2, 9, 9, dtype=torch.float64)
    edges = block_edges(9, blocks)
    add_lower_gram(acc, x1, edges)
    add_lower_gram(acc, x2, edges)
    want = (x1.transpose(-1, -2) @ x1 + x2.transpose(-1, -2) @ x2).double()
    assert acc.dtype == torch.float64
    assert torch.allclose(symmetric_from_lower(acc), want, rtol=1e-5, atol=1e-5)
    above = torch.ones(9, 9, dtype=torch.bool).triu(1)
    for j0, j1 in zip(edges[:-1], edges[1:]):
        above[j0:j1, j0:j1] = False  # the diagonal blocks are accumulated whole
    assert float(acc[:, above].abs().sum()) == 0.0 and bool(above.any()) == (blocks > 1)
