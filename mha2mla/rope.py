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

import torch

__all__ = [
    "kept_frequencies",
    "rope_theta_for_stride",
    "key_planes",
    "principal_mix",
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


def principal_mix(planes: torch.Tensor, *, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Per frequency, the unit complex vector ``u`` across KV heads that captures most of the key energy.

    Args:
        planes: ``[F, n_kv, in]`` complex key planes (from :func:`key_planes`, weights only).
        gram: optional ``[F, n_kv, n_kv]`` Hermitian matrices to maximise ``u^H G u`` instead of the data-free
            ``Z Z^H`` (for example ``Z Σ_x Z^H`` weighted by the queries that read the keys).

    Returns:
        ``[F, n_kv]`` complex unit vectors, phase fixed so the largest entry is real and positive (deterministic).
    """
    if gram is None:
        gram = planes @ planes.conj().transpose(-1, -2)
    _, vecs = torch.linalg.eigh(gram)
    u = vecs[..., -1]  # eigenvector of the largest eigenvalue
    idx = u.abs().argmax(dim=-1, keepdim=True)
    phase = torch.gather(u, -1, idx)
    return u * (phase.conj() / phase.abs())


def _interleave(planes: torch.Tensor) -> torch.Tensor:
    """``[..., F, in]`` complex → ``[..., 2F, in]`` real rows ``(Re_0, Im_0, Re_1, Im_1, …)``."""
    return torch.stack((planes.real, planes.imag), dim=-2).flatten(-3, -2)


def split_rope(
    *, q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split queries and keys into the shared rope slice and the no-RoPE remainder.

    Args:
        q: ``[n_heads, head_dim, in_q]`` query rows per head (a bias may ride along as the last column).
        k: ``[n_kv, head_dim, in_k]`` key rows per KV head (likewise).
        freqs: ``[F]`` kept frequency indices, ``F = rope_dim/2``.
        u: ``[F, n_kv]`` unit mixing vectors from :func:`principal_mix`.

    Returns:
        ``(q_rope [n_heads, 2F, in_q], k_rope [2F, in_k], k_nope [n_kv, head_dim, in_k])``: interleaved rope rows for
        each query head and for the one shared key, and the keys with the kept component removed from the kept
        planes (to be used without rotation, against the unchanged query rows).
    """
    n_heads, n_kv = q.shape[0], k.shape[0]
    if n_heads % n_kv:
        raise ValueError(f"query heads {n_heads} must be a multiple of KV heads {n_kv}")
    group = torch.arange(n_heads) // (n_heads // n_kv)
    zk = key_planes(k, freqs)  # [F, n_kv, in_k]
    shared = torch.einsum("fg,fgi->fi", u.conj(), zk)  # z'_0 = u^H z
    residual = zk - u[..., None] * shared[:, None, :]
    zq = key_planes(q, freqs)  # [F, n_heads, in_q]
    q_rope = zq * u.conj()[:, group, None]  # query coefficient conj(u_g)
    k_nope = k.clone()
    half = k.shape[1] // 2
    k_nope[:, freqs, :] = residual.real.transpose(0, 1)
    k_nope[:, freqs + half, :] = residual.imag.transpose(0, 1)
    return _interleave(q_rope.transpose(0, 1)), _interleave(shared), k_nope
