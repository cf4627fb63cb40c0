"""Second-moment accumulation helpers shared by the least-squares fits (pure math, no I/O)."""

from __future__ import annotations

import torch

__all__ = ["add_lower_gram", "symmetric_from_lower"]


def add_lower_gram(acc: torch.Tensor, x: torch.Tensor, edges: list[int]) -> None:
    """``acc += xᵀx`` (float64, on ``acc``'s device) computed only for the column blocks on and below the diagonal.

    ``x [rows, f]``; ``edges``: block boundaries ``0 = e_0 < … < e_k = f``. Only ``acc[e_j:, e_j:e_{j+1}]`` is updated
    (the Gram is symmetric): read the result with :func:`symmetric_from_lower`.
    """
    for j0, j1 in zip(edges[:-1], edges[1:]):
        acc[j0:, j0:j1] += (x[:, j0:].T @ x[:, j0:j1]).double().to(acc.device)


def symmetric_from_lower(acc: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from the lower triangle that :func:`add_lower_gram` keeps up to date."""
    g = acc.tril()
    return g + g.tril(-1).T
