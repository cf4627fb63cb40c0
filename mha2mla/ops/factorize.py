"""The latent: joint low-rank factorisation of the stacked no-RoPE keys and values (pure math).

MLA caches one latent ``c = W_down · x`` per token (``kv_lora_rank = R`` values) and rebuilds every head's no-RoPE key
and value from it: ``k_nope = W_upK · c``, ``v = W_upV · c``. Stacking all KV heads' no-RoPE key rows and value rows
into ``M = [K; V]`` (``2·n_kv·head_dim × hidden``), the best rank-R factorisation in Frobenius norm is the truncated SVD
``M ≈ (U_R S_R)(V_Rᵀ)``: ``W_down = V_Rᵀ`` (orthonormal rows) and ``[W_upK; W_upV] = U_R S_R``.

An optional input covariance ``Σ = E[x xᵀ]`` makes it activation-aware: minimise ``E‖(M - BA)x‖²`` instead, by taking
the SVD of ``M Σ^{1/2}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["absorb_bias", "LatentFactors", "factorize_latent", "refine_latent", "fit_up", "balance_weight", "svd_via_gram", "truncated_svd",
           "linear_norm_scale", "sqrtm_psd", "cholesky_root"]

# Up to this many columns/rows an exact SVD is cheap; above it a randomised SVD with power iterations is used.
EXACT_SVD_MAX_DIM = 2048


@dataclass
class LatentFactors:
    """Result of :func:`factorize_latent`.

    Attributes:
        down: ``[R, in]`` the latent projection ``W_down``.
        up_k: ``[k_rows, R]`` key up-projection ``W_upK``.
        up_v: ``[v_rows, R]`` value up-projection ``W_upV``.
        k_rel_error: ``‖K − W_upK W_down‖_F / ‖K‖_F`` (weighted when a covariance was given).
        v_rel_error: the same for values.
        energy_kept: share of ``‖M‖_F²`` (weighted) captured by the first R singular values.
        singular_values: all singular values of the (weighted) stack, for rank selection reports.
    """

    down: torch.Tensor
    up_k: torch.Tensor
    up_v: torch.Tensor
    k_rel_error: float
    v_rel_error: float
    energy_kept: float
    singular_values: torch.Tensor


def truncated_svd(m: torch.Tensor, rank: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``m ≈ U diag(S) Vᵀ``, plus all singular values when exact.

    Exact (LAPACK) when ``min(m.shape) ≤ EXACT_SVD_MAX_DIM``; otherwise a seeded randomised SVD with oversampling and
    power iterations (deterministic for a given seed), whose leading singular values agree with the exact ones to
    high relative precision for the spectra of attention weights.

    Returns:
        ``(U [rows, rank], S [rank], V [cols, rank], S_all)``; ``S_all`` holds every singular value when exact, else
        the ``rank + oversample`` computed ones.
    """
    if min(m.shape) <= EXACT_SVD_MAX_DIM:
        u, s, vh = svd_via_gram(m)
        return u[:, :rank], s[:rank], vh[:rank].T, s
    q = min(rank + 32, min(m.shape))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        u, s, v = torch.svd_lowrank(m, q=q, niter=4)
    finally:
        torch.random.set_rng_state(state)
    return u[:, :rank], s[:rank], v[:, :rank], s


def _smaller_gram(a: torch.Tensor) -> torch.Tensor:
    """``a aᵀ`` or ``aᵀ a``, whichever is smaller (same nonzero eigenvalues: the squared singular values of ``a``)."""
    return a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a


def svd_via_gram(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``m = U diag(S) Vᴴ`` (like ``torch.linalg.svd(m, full_matrices=False)``, descending ``S``) from the
    float64 eigendecomposition of the smaller Gram matrix, faster than LAPACK's SVD at the shapes of a layer.

    Singular values are exact to ~1e-8 of the largest (the Gram squares them); the singular vectors of the side the
    Gram is not formed on are ``m V / S`` and are set to zero where ``S`` is below that precision (they carry no part of
    ``m``). Results are in ``m``'s dtype.
    """
    a = m.double()
    wide = a.shape[0] <= a.shape[1]
    ev, vec = torch.linalg.eigh(_smaller_gram(a))
    ev, vec = ev.flip(0), vec.flip(1)
    s = ev.clamp_min(0).sqrt()
    inv = torch.where(s > 1e-7 * s[0].clamp_min(1e-300), 1 / s.clamp_min(1e-300), torch.zeros_like(s))
    if wide:
        u, vh = vec, (vec.T @ a) * inv[:, None]
    else:
        u, vh = (a @ vec) * inv, vec.T
    return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def _blockwise(left: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Apply ``left [n, b, b]`` to ``rows [n·b, in]`` block by block (identity when ``left`` is None)."""
    if left is None:
        return rows
    n, b, _ = left.shape
    return (left @ rows.reshape(n, b, -1)).reshape(n * b, -1)


def balance_weight(*, k: torch.Tensor, v: torch.Tensor, left_k: torch.Tensor | None = None,
                   left_v: torch.Tensor | None = None, input_sqrt_cov: torch.Tensor | None = None) -> float:
    """The key weight that gives keys and values the same total weighted energy under the same weights as
    :func:`factorize_latent` (the centre of the key/value balance search); 1 when one side is numerically empty
    (e.g. every key plane kept its rotation)."""
    kk = _blockwise(left_k, k)
    vv = _blockwise(left_v, v)
    if input_sqrt_cov is not None:
        kk, vv = kk @ input_sqrt_cov, vv @ input_sqrt_cov
    ek, ev = float(kk.pow(2).sum()), float(vv.pow(2).sum())
    if ek <= 1e-20 * ev or ev <= 1e-20 * ek:
        return 1.0
    return ev / ek


def _blockwise_solve(left: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    if left is None:
        return rows
    n, b, _ = left.shape
    return torch.linalg.solve(left, rows.reshape(n, b, -1)).reshape(n * b, -1)


def factorize_latent(
    *,
    k: torch.Tensor,
    v: torch.Tensor,
    rank: int,
    k_weight: float = 1.0,
    input_sqrt_cov: torch.Tensor | None = None,
    left_k: torch.Tensor | None = None,
    left_v: torch.Tensor | None = None,
) -> LatentFactors:
    """Jointly factorise stacked no-RoPE key rows ``k`` and value rows ``v`` through one rank-``rank`` latent.

    Minimises ``k_weight·E‖L_k(K − K̂)x‖² + E‖L_v(V − V̂)x‖²`` over ``[K̂; V̂] = B·W_down`` of rank R, where ``E[xxᵀ] =
    S Sᵀ`` (``S = input_sqrt_cov``, identity when None) and ``L_k``/``L_v`` are block-diagonal output weights (identity
    when None): the SVD of ``L M S`` gives ``U_R``; then ``W_down = U_Rᵀ L M`` and ``B = L⁻¹ U_R``.

    Args:
        k: ``[k_rows, in]`` no-RoPE key rows of every KV head, stacked.
        v: ``[v_rows, in]`` value rows of every KV head, stacked.
        rank: ``kv_lora_rank``; ``1 ≤ rank ≤ min(k_rows + v_rows, in)``.
        k_weight: relative weight of the key rows in the joint objective (values have weight 1).
        input_sqrt_cov: optional ``[in, in]`` square root ``S`` (``S Sᵀ = E[xxᵀ]``: symmetric, or a Cholesky factor) of
            the input second moment (activation-aware).
        left_k: optional ``[n_kv, hd, hd]`` invertible weights on each KV head's key rows (e.g. the root of the
            second moment of the queries that read them).
        left_v: optional ``[n_kv, hd, hd]`` invertible weights on each KV head's value rows (e.g. ``(W_oᵀW_o)^{1/2}``).

    Returns:
        :class:`LatentFactors`; errors are measured in the weighted norm.

    Raises:
        ValueError: shapes disagree or the rank is out of range (message shows the values).
    """
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"key and value rows must read the same input width, got {k.shape[1]} and {v.shape[1]}")
    max_rank = min(k.shape[0] + v.shape[0], k.shape[1])
    if not 1 <= rank <= max_rank:
        raise ValueError(f"--rank must be in 1..{max_rank} (the rank of the stacked keys and values), got {rank}")
    if k_weight <= 0:
        raise ValueError(f"key weight must be positive, got {k_weight}")
    kw = math.sqrt(k_weight)
    kl, vl = _blockwise(left_k, k) * kw, _blockwise(left_v, v)
    stack = torch.cat((kl, vl), dim=0)
    target = stack if input_sqrt_cov is None else stack @ input_sqrt_cov
    u, s, _, s_all = truncated_svd(target, rank)
    down = u.T @ stack  # optimal for the fixed orthonormal left factor, in the weighted norm too
    up_k = _blockwise_solve(left_k, u[: k.shape[0]]) / kw
    up_v = _blockwise_solve(left_v, u[k.shape[0] :])

    scale = float(stack.norm())

    def rel(err_rows: torch.Tensor, ref: torch.Tensor) -> float:
        den = float(ref.norm())
        return float(err_rows.norm()) / den if den > 1e-12 * scale else 0.0  # an (numerically) empty block: no error

    # the weighted residual (M − U Uᵀ M) S = T − U (Uᵀ T) of the target T = M S: no second product with S
    resid = target - u @ (u.T @ target)
    k_err = rel(resid[: k.shape[0]], target[: k.shape[0]])
    v_err = rel(resid[k.shape[0] :], target[k.shape[0] :])
    total = float(target.norm() ** 2)
    kept = float((s**2).sum())
    return LatentFactors(
        down=down,
        up_k=up_k,
        up_v=up_v,
        k_rel_error=k_err,
        v_rel_error=v_err,
        energy_kept=kept / total if total > 0 else 1.0,
        singular_values=s_all,
    )


def sqrtm_psd(m: torch.Tensor, *, ridge: float = 1e-6) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix, with a relative ridge so it is invertible."""
    m = (m + m.transpose(-1, -2)) / 2
    eye = torch.eye(m.shape[-1], dtype=m.dtype)
    scale = m.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1e-30)
    vals, vecs = torch.linalg.eigh(m + ridge * scale * eye)
    return (vecs * vals.clamp_min(0).sqrt()[..., None, :]) @ vecs.transpose(-1, -2)


def cholesky_root(m: torch.Tensor, *, ridge: float = 1e-6) -> torch.Tensor:
    """A square root ``L`` (lower triangular, ``L Lᵀ = m + ridge``) of a positive semi-definite matrix, with the same
    relative ridge as :func:`sqrtm_psd`: where only ``‖X L‖`` matters (a weighted norm), any root gives the same value,
    and a Cholesky factor costs a fraction of an eigendecomposition. Computed in float64, returned in ``m``'s dtype;
    falls back to :func:`sqrtm_psd` if the factorisation fails."""
    a = m.double()
    a = (a + a.transpose(-1, -2)) / 2
    scale = a.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1e-30)
    root, info = torch.linalg.cholesky_ex(a + ridge * scale * torch.eye(a.shape[-1], dtype=a.dtype))
    if bool((info != 0).any()):
        return sqrtm_psd(m, ridge=ridge)
    return root.to(m.dtype)


def linear_norm_scale(*, down: torch.Tensor, input_norm_bound: float, eps: float = 1e-6, rel_error: float = 1e-5) -> tuple[float, float]:
    """Scale α for the latent rows and the RMSNorm weight that make ``kv_a_layernorm`` act linearly.

    ``RMSNorm(αc)·w = αc·w / sqrt(α²·ms(c) + eps)``. With ``α²·ms(c) ≤ 2·rel_error·eps`` for every input and
    ``w = sqrt(eps)/α`` the norm returns ``c`` up to a relative error ``rel_error``. ``ms(c) ≤ ‖W_down‖₂²·‖x‖²/R`` and
    ``‖x‖ ≤ input_norm_bound``. ``w`` is rounded up to a power of two (exact in bf16), α follows from it.

    Args:
        down: ``[R, in]`` latent projection (before scaling).
        input_norm_bound: an upper bound of ``‖x‖`` over all inputs (``sqrt(hidden)·max|γ|`` after an RMSNorm).
        eps: epsilon of the latent RMSNorm.
        rel_error: worst-case relative error allowed.

    Returns:
        ``(alpha, norm_weight)`` with ``alpha · norm_weight == sqrt(eps)``.
    """
    rank = down.shape[0]
    spec = float(torch.linalg.eigvalsh(_smaller_gram(down.double()))[-1].clamp_min(0).sqrt())  # ‖W_down‖₂
    ms_bound = (spec * input_norm_bound) ** 2 / rank
    if ms_bound == 0:
        return 1.0, math.sqrt(eps)
    alpha_max = math.sqrt(2 * rel_error * eps / ms_bound)
    weight = 2.0 ** math.ceil(math.log2(math.sqrt(eps) / alpha_max))
    return math.sqrt(eps) / weight, weight


def fit_up(rows: torch.Tensor, down: torch.Tensor, sigma: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
    """Least-squares up-projection ``B = M Σ Aᵀ (A Σ Aᵀ)⁻¹`` of ``rows`` M onto the latent ``down`` A under the input
    second moment Σ (``rows [..., m, in]`` and ``sigma [..., in, in]`` batched per block of rows; a relative ``ridge``
    keeps the solve defined)."""
    a_s = down @ sigma
    gram = a_s @ down.T
    gram = gram + ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype)
    return torch.linalg.solve(gram, (rows @ a_s.transpose(-1, -2)).transpose(-1, -2)).transpose(-1, -2)


def absorb_bias(rows: torch.Tensor, sigma: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
    """Bias-free rows ``W'`` closest to affine ones in the mean square: ``min E‖W'x − (Wx + b)‖²`` for ``[x;1]`` with
    second moment ``sigma``, i.e. ``W' = [W b] Σ[:, :d] Σ_dd⁻¹`` (``rows [n, d+1]`` = ``[W b]``, ``sigma [d+1, d+1]``;
    a relative ``ridge`` keeps the solve defined). The part of ``b`` along the inputs' mean direction is kept; a bias of
    zero returns ``W``."""
    s = sigma[:-1, :-1]
    s = s + ridge * s.diagonal().mean() * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    return torch.linalg.solve(s, (rows.to(s.dtype) @ sigma[:, :-1]).T).T.to(rows.dtype)


def _ridge_inverse(m: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
    m = (m + m.T) / 2
    scale = float(m.diagonal().mean().clamp_min(1e-300))
    return torch.linalg.inv(m + ridge * scale * torch.eye(m.shape[0], dtype=m.dtype))


def refine_latent(
    *, k: torch.Tensor, v: torch.Tensor, down: torch.Tensor, sigma_k: torch.Tensor, sigma_v: torch.Tensor,
    weight_k: torch.Tensor | None = None, weight_v: torch.Tensor | None = None, k_weight: float = 1.0,
    iters: int = 4, cg_iters: int = 5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alternating least squares when keys and values see different input statistics.

    Minimises ``k_weight·Σ_g ‖W_k,g^{½}(K_g − B_k,g A)Σ_k^{½}‖² + Σ_b ‖W_v,b^{½}(V_b − B_v,b A)Σ_v,b^{½}‖²``: keys see the
    token inputs (``Σ_k``), value blocks ``b`` (KV groups, or query heads each with its own up-projection) the
    attention-averaged ones (``Σ_v,b``). Each round fits the
    up-projections in closed form, then the shared ``A`` by conjugate gradients on
    ``Σ_b P_b A Σ_b = Σ_b B_bᵀ W_b M_b Σ_b`` (``P_b = B_bᵀ W_b B_b``), preconditioned by ``(Σ_b P_b)⁻¹ · Σ̄⁻¹``.
    Starts from ``down``; never increases the objective.

    Args:
        k: ``[n_kv·hd, in]``; v: ``[n_v·hd, in]`` (``n_v`` value blocks); down: ``[R, in]`` initial latent projection.
        sigma_k: ``[in, in]``; sigma_v: ``[n_v, in, in]``.
        weight_k: ``[n_kv, hd, hd]``, weight_v: ``[n_v, hd, hd]`` PSD output weights (identity when None).

    Returns:
        ``(down, up_k, up_v)``.
    """
    n_v = sigma_v.shape[0]
    hd = v.shape[0] // n_v
    n_k = k.shape[0] // hd
    kg, vg = k.reshape(n_k, hd, -1), v.reshape(n_v, hd, -1)
    eye = torch.eye(hd, dtype=k.dtype)
    wk = (eye.expand(n_k, hd, hd) if weight_k is None else weight_k) * k_weight
    wv = eye.expand(n_v, hd, hd) if weight_v is None else weight_v

    def objective(a, bk, bv):
        ek, ev = kg - bk @ a, vg - bv @ a
        jk = torch.einsum("gai,gab,gbj,ij->", ek, wk, ek, sigma_k)
        jv = torch.einsum("gai,gab,gbj,gij->", ev, wv, ev, sigma_v)
        return float(jk + jv)

    a = down
    for _ in range(iters):
        bk = fit_up(kg, a, sigma_k)
        bv = fit_up(vg, a, sigma_v)
        pk = bk.transpose(1, 2) @ wk @ bk  # [n_kv, R, R]
        pv = bv.transpose(1, 2) @ wv @ bv
        rhs = torch.einsum("gar,gab,gbi,ij->rj", bk, wk, kg, sigma_k) + torch.einsum("gar,gab,gbi,gij->rj", bv, wv, vg, sigma_v)
        pk_sum = pk.sum(0)

        def op(x):
            return pk_sum @ x @ sigma_k + torch.einsum("grs,si,gij->rj", pv, x, sigma_v)

        # preconditioner: the Kronecker approximation P̄ ⊗ Σ̄ of the operator (exact when all blocks see one Σ)
        tk, tv = float(pk_sum.diagonal().sum()), pv.diagonal(dim1=1, dim2=2).sum(-1)
        sig_bar = (tk * sigma_k + torch.einsum("g,gij->ij", tv, sigma_v)) / max(tk + float(tv.sum()), 1e-300)
        p_inv = _ridge_inverse(pk_sum + pv.sum(0))
        s_inv = _ridge_inverse(sig_bar)

        def precond(res):
            return p_inv @ res @ s_inv

        x = a.clone()
        r = rhs - op(x)
        zr = precond(r)
        p = zr.clone()
        rz = float((r * zr).sum())
        tol = 1e-24 * float((rhs * rhs).sum())
        for _ in range(cg_iters):
            if float((r * r).sum()) <= tol or rz <= 0:
                break
            ap = op(p)
            step = rz / float((p * ap).sum())
            x = x + step * p
            r = r - step * ap
            zr = precond(r)
            rz_new = float((r * zr).sum())
            p = zr + (rz_new / rz) * p
            rz = rz_new
        if objective(x, bk, bv) <= objective(a, bk, bv):
            a = x
    bk = fit_up(kg, a, sigma_k)
    bv = fit_up(vg, a, sigma_v)
    return a, bk.reshape(n_k * hd, -1), bv.reshape(n_v * hd, -1)
