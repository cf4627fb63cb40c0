"""The latent factorisations and their least-squares steps (:mod:`mha2mla.ops.factorize`)."""

from __future__ import annotations

import math

import pytest
import torch

from mha2mla.ops.factorize import factorize_latent, fit_up, refine_latent, sqrtm_psd, svd_via_gram


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


def test_latent_step_solves_its_normal_equations_with_per_head_value_blocks():
    """One alternating round with many CG steps gives the exact minimiser over ``A`` for the fitted up-projections
    (checked against the dense Kronecker solve), with more value blocks (query heads) than key blocks (KV heads)."""
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
    bk0 = fit_up(k.reshape(n_kv, hd, d), start, sk)
    bv0 = fit_up(v.reshape(n_h, hd, d), start, sv)
    op = sum(torch.kron(b.T @ b, sk) for b in bk0)
    op = op + sum(torch.kron(b.T @ w @ b, s) for b, w, s in zip(bv0, wv, sv))
    rhs = sum(b.T @ kk @ sk for b, kk in zip(bk0, k.reshape(n_kv, hd, d)))
    rhs = rhs + sum(b.T @ w @ vv @ s for b, w, vv, s in zip(bv0, wv, v.reshape(n_h, hd, d), sv))
    want = torch.linalg.solve(op, rhs.reshape(-1)).reshape(r, d)
    assert torch.allclose(a, want, rtol=1e-6, atol=1e-8)


def test_cholesky_root_gives_the_same_factorisation_as_the_symmetric_root():
    """Any square root S of the input moment (S Sᵀ = Σ) weighs the error the same: the latent, up-projections and
    errors from a Cholesky factor equal those from the symmetric root."""
    from mha2mla.ops.factorize import cholesky_root, factorize_latent, sqrtm_psd

    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 48, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 48, dtype=torch.float64)
    sigma = x.T @ x / 400
    k, v = torch.randn(32, 48, generator=g, dtype=torch.float64), torch.randn(32, 48, generator=g, dtype=torch.float64)
    root = cholesky_root(sigma)
    assert torch.allclose(root @ root.T, sigma, rtol=0, atol=1e-5 * float(sigma.diagonal().mean()))
    assert torch.equal(root, root.tril())
    sym = factorize_latent(k=k, v=v, rank=12, input_sqrt_cov=sqrtm_psd(sigma))
    chol = factorize_latent(k=k, v=v, rank=12, input_sqrt_cov=root)
    assert torch.allclose(chol.up_k @ chol.down, sym.up_k @ sym.down, atol=1e-9)
    assert torch.allclose(chol.up_v @ chol.down, sym.up_v @ sym.down, atol=1e-9)
    assert abs(chol.k_rel_error - sym.k_rel_error) < 1e-9 and abs(chol.v_rel_error - sym.v_rel_error) < 1e-9
    assert abs(chol.energy_kept - sym.energy_kept) < 1e-9


def test_cholesky_root_of_a_singular_moment_is_ridged():
    from mha2mla.ops.factorize import cholesky_root

    sigma = torch.zeros(6, 6, dtype=torch.float64)
    sigma[:3, :3] = torch.eye(3, dtype=torch.float64)  # rank 3: the relative ridge keeps it factorisable
    root = cholesky_root(sigma)
    assert torch.isfinite(root).all() and (root.diagonal() > 0).all()


def test_absorbed_bias_is_the_least_squares_bias_free_map():
    from mha2mla.ops.factorize import absorb_bias

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g, dtype=torch.float64) + torch.tensor([2.0, 0, 0, -1.0, 0, 0], dtype=torch.float64)
    x1 = torch.cat((x, torch.ones(4000, 1, dtype=torch.float64)), 1)
    sigma = x1.T @ x1 / len(x1)
    w, b = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    absorbed = absorb_bias(torch.cat((w, b[:, None]), 1), sigma)
    target = x @ w.T + b
    err = (x @ absorbed.T - target).pow(2).mean()
    assert err < (x @ w.T - target).pow(2).mean() * 0.5  # the inputs' mean direction carries part of the bias
    lstsq = torch.linalg.lstsq(x, target).solution.T  # the same least-squares problem, solved directly
    assert torch.allclose(absorbed, lstsq, atol=1e-8)
    assert torch.allclose(absorb_bias(torch.cat((w, torch.zeros(5, 1, dtype=torch.float64)), 1), sigma), w, atol=1e-10)
    const = x.clone()
    const[:, 0] = 3.0  # an input that is constant carries the bias exactly
    c1 = torch.cat((const, torch.ones(4000, 1, dtype=torch.float64)), 1)
    exact = absorb_bias(torch.cat((w, b[:, None]), 1), c1.T @ c1 / len(c1), ridge=0.0)
    assert torch.allclose(const @ exact.T, const @ w.T + b, atol=1e-8)
