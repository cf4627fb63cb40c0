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
    """Accumulates ``E[aaᵀ]`` and ``E[daᵀ]`` batch by batch (float64, on the CPU), then solves for ``W``.

    ``d = h_src − h' − m`` is how far the MLP's own output ``m = W_down a`` misses the source's stream, so the target's
    cross-moment is ``E[taᵀ] = W_down·E[aaᵀ] + β·E[daᵀ]``. (Passing ``d`` rather than ``h_src − h'`` keeps a conversion
    that does not drift exact: ``d`` is then ~0, whereas ``W_down·E[aaᵀ]`` and an accumulated ``E[(h_src − h')aᵀ]``
    would differ by float32 rounding.)

    Args:
        features: the MLP's intermediate size.
        out_features: the hidden size.
    """

    def __init__(self, *, features: int, out_features: int):
        self.aa = torch.zeros(features, features, dtype=torch.float64)
        self.da = torch.zeros(out_features, features, dtype=torch.float64)
        self.n = 0

    def add(self, *, activations: torch.Tensor, miss: torch.Tensor) -> None:
        """``activations [..., features]`` and ``miss [..., out_features]`` (``d``) of the same tokens, on any device."""
        low = activations.reshape(-1, activations.shape[-1])
        a = low.float()
        d = miss.reshape(-1, miss.shape[-1])
        # E[aaᵀ] is symmetric: only its column blocks on and below the diagonal are computed (5/8 of the flops)
        f = a.shape[1]
        add_lower_gram(self.aa, a, block_edges(f, GRAM_BLOCKS))
        # the cross moment in the activations' precision: bfloat16 activations (Method.mlp_dtype) make it 2x faster,
        # and its rounding (2^-9 relative) only perturbs the correction, linearly; the Gram stays float32 (its
        # rounding would swamp the ridge in the solve)
        self.da += (d.to(low.dtype).T @ low).double().cpu()
        self.n += a.shape[0]

    def solve(self, *, prior: torch.Tensor, beta: float, ridge: float = 1e-4) -> torch.Tensor:
        """``W [out_features, features]`` (float64) for the target ``t = m + β·d``, shrunk towards ``prior`` (the
        source ``W_down``, which defines ``m``) by ``ridge·mean(diag E[aaᵀ])``.

        ``W = (W_down·G + β·E[daᵀ] + λ·W_down)(G + λI)⁻¹ = W_down + β·E[daᵀ](G + λI)⁻¹`` with ``G = E[aaᵀ]``: only the
        correction is solved for (one Cholesky solve, no ``W_down·G`` product), so ``W`` stays ``W_down`` to the last
        bit where nothing drifts (``d = 0``) whatever the conditioning of ``G``."""
        if self.n == 0:
            raise ValueError("no calibration tokens were added")
        w0 = prior.to(torch.float64)
        # (G + λI)⁻¹E[daᵀ]ᵀ = (Σaaᵀ + nλI)⁻¹Σadᵀ; the Cholesky factorisation reads only the lower triangle, which is
        # what add_lower_gram keeps
        g = self.aa.clone()
        g.diagonal().add_(ridge * float(g.diagonal().mean()))
        rhs = beta * self.da.T
        factor, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            delta = torch.cholesky_solve(rhs, factor)
        else:  # not numerically positive definite (a rank-deficient G and a ridge at rounding level): least squares
            delta = torch.linalg.lstsq(symmetric_from_lower(g), rhs, driver="gelsd").solution
        return w0 + delta.T
