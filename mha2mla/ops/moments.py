"""Second-moment accumulation helpers shared by the least-squares fits (pure math, no I/O)."""

from __future__ import annotations

import torch

__all__ = ["add_lower_gram", "block_edges", "context_moment_from_columns", "symmetric_from_lower"]


def add_lower_gram(acc: torch.Tensor, x: torch.Tensor, edges: list[int]) -> None:
    """``acc += xᵀx`` (on ``acc``'s device, in its dtype) computed only for the column blocks on and below the diagonal.

    ``x [..., rows, f]`` (leading dimensions: a batch of Grams, ``acc [..., f, f]``); ``edges``: block boundaries
    ``0 = e_0 < … < e_k = f``. Only ``acc[..., e_j:, e_j:e_{j+1}]`` is updated (the Gram is symmetric): read the
    result with :func:`symmetric_from_lower`.
    """
    for j0, j1 in zip(edges[:-1], edges[1:]):
        acc[..., j0:, j0:j1] += (x[..., j0:].transpose(-1, -2) @ x[..., j0:j1]).to(acc.device, acc.dtype)


def symmetric_from_lower(acc: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix (or batch of them) from the lower triangle that :func:`add_lower_gram` keeps."""
    g = acc.tril()
    return g + g.tril(-1).transpose(-1, -2)


def block_edges(length: int, blocks: int) -> list[int]:
    """``0 = e_0 < … < e_k = length``: ``blocks`` near-equal spans (fewer when ``length < blocks``)."""
    return sorted({length * j // blocks for j in range(blocks + 1)})


def context_moment_from_columns(columns: list[torch.Tensor], edges: list[int], x: torch.Tensor,
                                n_groups: int) -> torch.Tensor:
    """``[n_groups, d, d]``: ``Σ_b Σ_{h∈g} (P_bh X_b)ᵀ(P_bh X_b) = Σ_b X_bᵀ (Σ_{h∈g} P_bhᵀ P_bh) X_b`` (float32), for
    causal attention weights ``P [B, H, L, L]`` (heads in ``n_groups`` consecutive groups) and ``x [B, L, d]``, from
    the causal part of each key block: ``columns[i] = P[..., e_i:, e_i:e_{i+1}]``
    (``[B, H, L − e_i, e_{i+1} − e_i]``, the queries from block ``i`` on: the only ones that see its keys).

    ``PᵀP`` is symmetric and its block ``(i, j)`` only sums over the queries from block ``max(i, j)`` on, so its lower
    blocks cost 5/16 of the dense product at 4 blocks, and ``XᵀSX`` is formed from its lower half (``T`` with
    ``S = T + Tᵀ``) in 5/8.
    """
    b, h = columns[0].shape[:2]
    l, g, d = edges[-1], h // n_groups, x.shape[-1]
    spans = list(zip(edges[:-1], edges[1:]))
    tx = torch.zeros(b, n_groups, l, d, dtype=x.dtype, device=x.device)  # T X, T = lower blocks (diagonal ones halved)
    for i, (i0, i1) in enumerate(spans):
        left = columns[i].transpose(-1, -2)
        for j, (j0, j1) in enumerate(spans[: i + 1]):
            right = columns[j][..., i0 - j0 :, :]  # queries from block i on
            blk = (left @ right).view(b, n_groups, g, i1 - i0, j1 - j0).sum(2)  # (PᵀP)_ij per group
            if i == j:
                blk = blk * 0.5
            tx[..., i0:i1, :] += blk @ x[:, None, j0:j1, :]
    m = torch.einsum("bli,bglj->gij", x, tx)
    return m + m.transpose(-1, -2)
