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

from mha2mla.ops.moments import add_lower_gram, block_edges, symmetric_from_lower

__all__ = ["DownProjectionFit"]

GRAM_BLOCKS = 4
# Below this ‖E[daᵀ]‖/‖E[raᵀ]‖ the two streams agree to float32 rounding (see DownProjectionFit.solve): an exact
# conversion sits orders of magnitude below it, a compressed one orders above.
NO_DRIFT = 1e-4


class DownProjectionFit:
    """Accumulates ``E[aaᵀ]`` and ``E[raᵀ]`` batch by batch (float64, on the CPU), then solves for ``W``.

    ``r = h_src − h'`` is what the MLP would have to output to put the stream back on the source's. The miss
    ``d = r − m`` enters the fit only through ``E[daᵀ] = E[raᵀ] − W_down·E[aaᵀ]``, formed once in the solve, so no
    per-token product ``m = W_down a`` is needed.

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
        # float32 like the Gram, also for bfloat16 activations (Method.mlp_dtype): the miss E[daᵀ] is the difference
        # of E[raᵀ] and W_down·E[aaᵀ], and bfloat16 rounding of r (2^-9·|r|) would be of its size
        self.ra += (r.float().T @ a).double().cpu()
        self.n += a.shape[0]

    def solve(self, *, prior: torch.Tensor, beta: float, ridge: float = 1e-4) -> torch.Tensor:
        """``W [out_features, features]`` (float64) for the target ``t = m + β·d``, shrunk towards ``prior`` (the
        source ``W_down``, which defines ``m``) by ``ridge·mean(diag E[aaᵀ])``.

        ``W = (W_down·G + β·E[daᵀ] + λ·W_down)(G + λI)⁻¹ = W_down + β·E[daᵀ](G + λI)⁻¹`` with ``G = E[aaᵀ]`` and
        ``E[daᵀ] = E[raᵀ] − W_down·G`` (float64): only the correction is solved for (one Cholesky solve). Where the
        streams agree to rounding (``‖E[daᵀ]‖ ≤ NO_DRIFT·‖E[raᵀ]‖``, e.g. an exact conversion) ``W`` is ``W_down`` to the
        last bit: the difference of the two float32-accumulated moments is then rounding noise, which the solve would
        amplify in the weakly excited directions of ``G``. At ``β = 0`` ``W`` is ``W_down`` too."""
        if self.n == 0:
            raise ValueError("no calibration tokens were added")
        w0 = prior.to(torch.float64)
        if beta == 0:
            return w0.clone()
        g = self.aa.clone()
        da = self.ra - w0 @ symmetric_from_lower(g)  # n·E[daᵀ]
        if float(da.norm()) <= NO_DRIFT * float(self.ra.norm()):
            return w0.clone()
        # (Σaaᵀ + nλI)⁻¹ β·Σadᵀ; the Cholesky factorisation reads only the lower triangle, which is what add_lower_gram
        # keeps
        g.diagonal().add_(ridge * float(g.diagonal().mean()))
        rhs = beta * da.T
        factor, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            delta = torch.cholesky_solve(rhs, factor)
        else:  # not numerically positive definite (a rank-deficient G and a ridge at rounding level): least squares
            delta = torch.linalg.lstsq(symmetric_from_lower(g), rhs, driver="gelsd").solution
        return w0 + delta.T
