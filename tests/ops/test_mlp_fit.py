"""The MLP down-projection refit against the drift (:mod:`mha2mla.ops.mlp_fit`)."""

from __future__ import annotations

import torch

from mha2mla.ops.mlp_fit import DownProjectionFit
from mha2mla.ops.moments import symmetric_from_lower


def test_down_projection_fit_keeps_its_prior_and_recovers_a_linear_target():
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
