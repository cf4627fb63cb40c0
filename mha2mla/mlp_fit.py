"""Refit an MLP's down-projection by least squares (pure math, no I/O).

The converted attention cannot express everything the source's did, so the residual stream of the converted model
drifts from the source's, layer after layer. The MLP's down-projection ``W_down`` is linear in the MLP's hidden
activations ``a`` (``intermediate`` features per token, far more than the attention's latent), so it can take back part
of that drift: with ``h'`` the stream after the converted attention, ``m = W_down a`` the MLP's output and ``h_src``
the source model's stream after the same layer, the target is

    t = m + β·(h_src − h' − m),

and ``W = argmin Σ‖W a − t‖² + λ‖W − W_down‖²`` (shrunk towards the source weight; ``β = 0`` returns it exactly).
"""

from __future__ import annotations

import torch

from mha2mla.moments import add_lower_gram, block_edges, symmetric_from_lower

__all__ = ["DownProjectionFit"]

GRAM_BLOCKS = 4


class DownProjectionFit:
    """Accumulates ``E[aaᵀ]`` and ``E[raᵀ]`` batch by batch (float64, on the CPU), then solves for ``W``.

    ``r = h_src − h'`` is what the MLP would have to output to put the stream back on the source's; the target
    ``t = m + β·(r − m)`` is linear in ``r`` and ``m = W_down a``, so only ``E[raᵀ]`` is accumulated and no per-token
    product ``m = W_down a`` is needed (on SmolLM2 that product was a fifth of the refit's arithmetic).

    Args:
        features: the MLP's intermediate size.
        out_features: the hidden size.
    """

    def __init__(self, *, features: int, out_features: int):
        self.aa = torch.zeros(features, features, dtype=torch.float64)
        self.ra = torch.zeros(out_features, features, dtype=torch.float64)
        self.n = 0

    def add(self, *, activations: torch.Tensor, residual: torch.Tensor) -> None:
        """``activations [..., features]`` and ``residual [..., out_features]`` (``r``) of the same tokens, on any
        device."""
        a = activations.reshape(-1, activations.shape[-1]).float()
        r = residual.reshape(-1, residual.shape[-1])
        # E[aaᵀ] is symmetric: only its column blocks on and below the diagonal are computed (5/8 of the flops)
        f = a.shape[1]
        add_lower_gram(self.aa, a, block_edges(f, GRAM_BLOCKS))
        # float32 like the Gram, also for bfloat16 activations (Method.mlp_dtype): the fit's correction β(X − W_down)
        # is small, and bfloat16 rounding of r (2^-9·|r|) would reach it
        self.ra += (r.float().T @ a).double().cpu()
        self.n += a.shape[0]

    def solve(self, *, prior: torch.Tensor, beta: float, ridge: float = 1e-4) -> torch.Tensor:
        """``W [out_features, features]`` (float64) for the target ``t = m + β·d = (1 − β)·m + β·r``, shrunk towards
        ``prior`` (the source ``W_down``, which defines ``m``) by ``ridge·mean(diag E[aaᵀ])``.

        The target is linear in β, and so is the fit: ``W = (1 − β)·W_down + β·X`` with ``X`` the ridge fit of ``r``,
        ``X = (E[raᵀ] + λ·W_down)(G + λI)⁻¹`` (``G = E[aaᵀ]``; one Cholesky solve, no ``W_down·G`` product). At
        ``β = 0`` ``W`` is ``W_down`` to the last bit."""
        if self.n == 0:
            raise ValueError("no calibration tokens were added")
        w0 = prior.to(torch.float64)
        if beta == 0:
            return w0.clone()
        # (Σaaᵀ + nλI)⁻¹(Σarᵀ + nλW_downᵀ); the Cholesky factorisation reads only the lower triangle, which is what
        # add_lower_gram keeps
        g = self.aa.clone()
        lam = ridge * float(g.diagonal().mean())
        g.diagonal().add_(lam)
        rhs = self.ra.T + lam * w0.T
        factor, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            x = torch.cholesky_solve(rhs, factor)
        else:  # not numerically positive definite (a rank-deficient G and a ridge at rounding level): least squares
            x = torch.linalg.lstsq(symmetric_from_lower(g), rhs, driver="gelsd").solution
        return (1 - beta) * w0 + beta * x.T
