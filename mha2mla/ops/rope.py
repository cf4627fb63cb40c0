"""The decoupled RoPE slice: which frequencies keep their rotation, and the shared rope key (pure math).

Conventions (Llama's rotate-half layout): in a head of ``head_dim`` rows, frequency ``j`` owns the plane of rows
``(j, j + head_dim/2)`` and rotates with angle ``pos · θ^(-2j/head_dim)``. Read the plane as the complex number
``z = x[j] + i·x[j + head_dim/2]``; RoPE multiplies it by ``e^{i·pos·ω_j}`` and a query/key pair scores
``Re(conj(q)·k·e^{i(n-m)ω_j})``.

MLA keeps ONE rope key per token, shared by all query heads, with ``qk_rope_head_dim = D`` rows, i.e. ``D/2``
frequencies. For each kept frequency a GQA/MHA source has ``n_kv`` key planes. Any complex combination across KV heads
commutes with the rotation, so we mix the planes with a unitary ``U`` and keep its first component
``z'_0 = u^H z`` as the shared rope key; query head ``h`` of group ``g`` then reads it with coefficient ``conj(u_g)``.
The remainder ``z_g - u_g z'_0`` (and every dropped frequency) loses its rotation and joins the no-RoPE part.
With one KV head (MQA) and ``D = head_dim`` nothing is lost: the conversion is exact.

Output rows of the rope part are interleaved, ``(Re_0, Im_0, Re_1, Im_1, …)``, the layout DeepSeek-V3 uses.
"""

from __future__ import annotations

import math

import torch

from mha2mla.ops.shapes import kv_group

__all__ = [
    "kept_frequencies",
    "unscaled_frequencies",
    "rope_theta_for_stride",
    "key_planes",
    "principal_mix",
    "expected_rotation",
    "scale_planes",
    "split_rope",
]


def kept_frequencies(*, head_dim: int, rope_dim: int, stride: int | None = None) -> torch.Tensor:
    """Indices ``j`` of the source frequencies that keep RoPE: ``j = stride·m`` for ``m < rope_dim/2``.

    Args:
        head_dim: source head dimension (even).
        rope_dim: ``qk_rope_head_dim`` of the target; even, divides ``head_dim``.
        stride: frequency stride, ``1 ≤ stride ≤ head_dim/rope_dim``; default ``head_dim/rope_dim`` (every k-th
            frequency, which is the standard schedule at ``rope_dim`` with the SAME θ).

    Raises:
        ValueError: invalid dimensions or stride (the message shows the values).
    """
    validate_rope_dim(head_dim=head_dim, rope_dim=rope_dim)
    max_stride = head_dim // rope_dim
    stride = max_stride if stride is None else stride
    if not 1 <= stride <= max_stride:
        raise ValueError(f"rope stride must be in 1..{max_stride} for head_dim {head_dim} and rope dim {rope_dim}, got {stride}")
    return torch.arange(rope_dim // 2) * stride


def unscaled_frequencies(*, rope: dict, head_dim: int) -> torch.Tensor:
    """``[head_dim/2]`` bool: which source frequencies the rope type's scaling leaves at ``θ^(-2j/head_dim)``.

    ``default``: all of them. ``llama3``: those whose wavelength ``2π/ω_j`` is below
    ``original_max_position_embeddings / high_freq_factor`` (the scaling divides the slow ones by ``factor`` and blends
    the ones between). Any other type (``linear`` scales every frequency): none.

    Args:
        rope: the source's rope parameters (``rope_type``, ``rope_theta`` and the type's keys).
        head_dim: source head dimension.
    """
    half = head_dim // 2
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return torch.ones(half, dtype=torch.bool)
    if kind != "llama3":
        return torch.zeros(half, dtype=torch.bool)
    theta = float(rope.get("rope_theta", 10000.0))
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    high_freq_wavelen = float(rope["original_max_position_embeddings"]) / float(rope["high_freq_factor"])
    return 2 * math.pi / inv_freq < high_freq_wavelen


def validate_rope_dim(*, head_dim: int, rope_dim: int) -> None:
    """Raise ``ValueError`` unless ``rope_dim`` is positive, even, at most ``head_dim`` and divides it."""
    if rope_dim <= 0 or rope_dim % 2 or rope_dim > head_dim or head_dim % rope_dim:
        raise ValueError(
            f"--rope-dim must be a positive even number that divides head_dim {head_dim} "
            f"(e.g. {head_dim // 2} or {head_dim}), got {rope_dim}"
        )


def rope_theta_for_stride(*, theta: float, head_dim: int, rope_dim: int, stride: int) -> float:
    """θ' such that the standard schedule at ``rope_dim`` reproduces the kept frequencies: ``θ^(stride·D/head_dim)``."""
    return float(theta) ** (stride * rope_dim / head_dim)


def key_planes(weight: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Complex planes of the kept frequencies.

    Args:
        weight: ``[n, head_dim, in]`` per-head projection rows (rotate-half layout); ``in`` may include a bias column.
        freqs: kept frequency indices ``[F]``.

    Returns:
        ``[F, n, in]`` complex tensor ``W[:, j] + i·W[:, j + head_dim/2]``.
    """
    half = weight.shape[1] // 2
    re = weight[:, freqs, :].transpose(0, 1)
    im = weight[:, freqs + half, :].transpose(0, 1)
    return torch.complex(re, im)


def principal_mix(planes: torch.Tensor, *, gram: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frequency, the shared rope key ``s = w^H z`` and each KV head's coefficient ``c_g`` (``z_g ≈ c_g s``).

    Minimises ``Σ_g a_g·E|z_g − c_g s|²``: with ``z̃_g = sqrt(a_g) z_g`` this is the top principal component ``ũ`` of
    ``E[z̃ z̃^H]``, giving ``w = sqrt(a)·ũ`` and ``c = ũ/sqrt(a)``. Data-free (``a = 1``, ``E[z z^H] = Z Z^H``) it is the
    unitary mix ``w = c = u``.

    Args:
        planes: ``[F, n_kv, in]`` complex key planes (from :func:`key_planes`, weights only).
        gram: optional ``[F, n_kv, n_kv]`` Hermitian second moments ``E[z z^H]`` (``Z Σ_x Z^H`` from calibration).
        weights: optional ``[F, n_kv]`` positive importance ``a_g`` of each head's plane (e.g. the energy of the queries
            that read it, times how much they need the rotation).

    Returns:
        ``(w, c)``, each ``[F, n_kv]`` complex; phase fixed so the largest entry of ``ũ`` is real positive.
    """
    if gram is None:
        gram = planes @ planes.conj().transpose(-1, -2)
    if weights is None:
        weights = torch.ones(gram.shape[:2], dtype=gram.real.dtype)
    a = weights.clamp_min(float(weights.max()) * 1e-6 + 1e-30).sqrt().to(gram.dtype)
    _, vecs = torch.linalg.eigh(a[..., :, None] * gram * a[..., None, :])
    u = vecs[..., -1]  # eigenvector of the largest eigenvalue
    idx = u.abs().argmax(dim=-1, keepdim=True)
    phase = torch.gather(u, -1, idx)
    u = u * (phase.conj() / phase.abs())
    return u * a, u / a


def expected_rotation(*, distance_hist: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``ρ_j = E[e^{-iΔω_j}]`` under an attention-distance distribution (per head).

    A plane that loses its rotation scores ``Re(conj(q) k e^{-iΔω})`` with the factor replaced by a constant; the
    constant with the least mean-square error is its expectation ``ρ`` (≈1 for slow frequencies, ≈0 for fast ones),
    a fixed complex scale that folds into the query.

    Args:
        distance_hist: ``[n_heads, L]`` attention mass at query−key distance Δ = 0..L−1.
        inv_freq: ``[head_dim/2]`` source angular frequencies ω_j.

    Returns:
        ``[n_heads, head_dim/2]`` complex.
    """
    p = distance_hist / distance_hist.sum(-1, keepdim=True).clamp_min(1e-30)
    delta = torch.arange(distance_hist.shape[-1], dtype=inv_freq.dtype)
    phase = torch.exp(-1j * delta[:, None] * inv_freq[None, :])  # [L, F]
    return p.to(phase.dtype) @ phase


def scale_planes(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply every complex plane of ``weight [n, head_dim, in]`` by ``factor [n, head_dim/2]`` (complex)."""
    half = weight.shape[1] // 2
    z = torch.complex(weight[:, :half], weight[:, half:]) * factor[..., None]
    return torch.cat((z.real, z.imag), dim=1)


def _interleave(planes: torch.Tensor) -> torch.Tensor:
    """``[..., F, in]`` complex → ``[..., 2F, in]`` real rows ``(Re_0, Im_0, Re_1, Im_1, …)``."""
    return torch.stack((planes.real, planes.imag), dim=-2).flatten(-3, -2)


def split_rope(
    *, q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor, w: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split queries and keys into the shared rope slice and the no-RoPE remainder.

    Args:
        q: ``[n_heads, head_dim, in_q]`` query rows per head (a bias may ride along as the last column).
        k: ``[n_kv, head_dim, in_k]`` key rows per KV head (likewise).
        freqs: ``[F]`` kept frequency indices, ``F = rope_dim/2``.
        w, c: ``[F, n_kv]`` mixing vector and coefficients from :func:`principal_mix`.

    Returns:
        ``(q_rope [n_heads, 2F, in_q], k_rope [2F, in_k], k_nope [n_kv, head_dim, in_k])``: interleaved rope rows for
        each query head and for the one shared key, and the keys with the kept component removed from the kept
        planes (to be used without rotation, against the unchanged query rows).
    """
    n_heads, n_kv = q.shape[0], k.shape[0]
    if n_heads % n_kv:
        raise ValueError(f"query heads {n_heads} must be a multiple of KV heads {n_kv}")
    group = kv_group(n_heads, n_kv)
    zk = key_planes(k, freqs)  # [F, n_kv, in_k]
    shared = torch.einsum("fg,fgi->fi", w.conj(), zk)  # s = w^H z
    residual = zk - c[..., None] * shared[:, None, :]
    zq = key_planes(q, freqs)  # [F, n_heads, in_q]
    q_rope = zq * c.conj()[:, group, None]  # Re(conj(q)·c·s) = Re(conj(conj(c)·q)·s)
    k_nope = k.clone()
    half = k.shape[1] // 2
    k_nope[:, freqs, :] = residual.real.transpose(0, 1)
    k_nope[:, freqs + half, :] = residual.imag.transpose(0, 1)
    return _interleave(q_rope.transpose(0, 1)), _interleave(shared), k_nope
