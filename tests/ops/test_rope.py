"""The decoupled RoPE slice (:mod:`mha2mla.ops.rope`): which frequencies keep their rotation, the shared rope key,
and the expected rotation of the planes that lose it."""

from __future__ import annotations

import pytest
import torch

from mha2mla.ops.attention import rotate_half, rotate_interleaved
from mha2mla.ops.rope import (expected_rotation, key_planes, kept_frequencies, principal_mix, rope_theta_for_stride,
                              split_rope, validate_rope_dim)


@pytest.mark.parametrize("head_dim,rope_dim", [(64, 32), (64, 16), (16, 4), (16, 16), (128, 64)])
def test_every_stride_keeps_a_standard_schedule_at_rope_dim(head_dim, rope_dim):
    """The kept source frequencies are the standard RoPE schedule at rope_dim with θ' = rope_theta_for_stride(θ):
    for the default stride (head_dim/rope_dim) θ' is θ itself and the kept frequencies are every stride-th one."""
    theta = 10000.0
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # the source's schedule
    max_stride = head_dim // rope_dim
    assert torch.equal(kept_frequencies(head_dim=head_dim, rope_dim=rope_dim),
                       torch.arange(rope_dim // 2) * max_stride)
    assert rope_theta_for_stride(theta=theta, head_dim=head_dim, rope_dim=rope_dim, stride=max_stride) == theta
    for stride in range(1, max_stride + 1):
        kept = kept_frequencies(head_dim=head_dim, rope_dim=rope_dim, stride=stride)
        assert kept.tolist() == [stride * m for m in range(rope_dim // 2)]
        target = rope_theta_for_stride(theta=theta, head_dim=head_dim, rope_dim=rope_dim, stride=stride)
        standard = target ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
        assert torch.allclose(inv_freq[kept], standard, rtol=1e-12)
        assert (target < theta) == (stride < max_stride)  # denser strides keep the slow frequencies out: a smaller θ'


@pytest.mark.parametrize("rope_dim", [0, -2, 3, 6, 32])
def test_rope_dims_that_do_not_divide_head_dim_are_refused_with_the_values(rope_dim):
    with pytest.raises(ValueError, match=f"divides head_dim 16 \\(e.g. 8 or 16\\), got {rope_dim}"):
        validate_rope_dim(head_dim=16, rope_dim=rope_dim)
    with pytest.raises(ValueError, match=f"got {rope_dim}"):
        kept_frequencies(head_dim=16, rope_dim=rope_dim)


@pytest.mark.parametrize("stride", [0, 3])
def test_strides_outside_one_to_head_dim_over_rope_dim_are_refused(stride):
    with pytest.raises(ValueError, match=f"rope stride must be in 1..2 for head_dim 16 and rope dim 8, got {stride}"):
        kept_frequencies(head_dim=16, rope_dim=8, stride=stride)


def _random_heads(n_heads, n_kv, hd=8, width=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_heads, hd, width, generator=g, dtype=torch.float64)
    k = torch.randn(n_kv, hd, width, generator=g, dtype=torch.float64)
    return q, k, g


def _scores(q_rows, k_rows, x, rotate, angles_m, angles_n):
    """``rotate(W_q x, m·ω)·rotate(W_k x, n·ω)`` for every (query head, key head) pair."""
    qm, kn = rotate(x @ q_rows.transpose(-1, -2), angles_m), rotate(x @ k_rows.transpose(-1, -2), angles_n)
    return (qm[:, None] * kn[None]).sum(-1)


def test_mqa_with_every_frequency_kept_loses_nothing():
    """One KV head and rope_dim = head_dim: the shared rope key is the key (its mix is a unit phase), nothing is
    left without rotation, and the interleaved rope rows score exactly like the source at any two positions."""
    hd = 8
    q, k, g = _random_heads(n_heads=3, n_kv=1, hd=hd)
    freqs = kept_frequencies(head_dim=hd, rope_dim=hd)
    w, c = principal_mix(key_planes(k, freqs))
    assert torch.allclose(w.abs(), torch.ones_like(w.abs()), rtol=1e-12) and torch.allclose(w, c)
    q_rope, k_rope, k_nope = split_rope(q=q, k=k, freqs=freqs, w=w, c=c)
    assert q_rope.shape == (3, hd, 5) and k_rope.shape == (hd, 5) and k_nope.shape == (1, hd, 5)
    assert float(k_nope.abs().max()) < 1e-12
    x = torch.randn(5, generator=g, dtype=torch.float64)
    omega = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    for m, n in ((0, 0), (7, 3), (100, 1), (2, 9)):
        want = _scores(q, k[0], x, rotate_half, m * omega, n * omega)[:, 0]
        got = _scores(q_rope, k_rope, x, rotate_interleaved, m * omega, n * omega)[:, 0]
        assert torch.allclose(got, want, atol=1e-10), (m, n)


def test_gqa_split_is_exact_without_rotation_and_lossy_with_it():
    """Two KV heads share one rope key: the kept planes split into c_g·s (rotated) plus a remainder (not rotated).
    At distance 0 no rotation acts, so the split scores exactly like the source; at other distances the remainder's
    lost rotation shows."""
    hd = 8
    q, k, g = _random_heads(n_heads=4, n_kv=2, hd=hd, seed=1)
    freqs = kept_frequencies(head_dim=hd, rope_dim=hd)
    w, c = principal_mix(key_planes(k, freqs))
    q_rope, k_rope, k_nope = split_rope(q=q, k=k, freqs=freqs, w=w, c=c)
    assert float(k_nope.abs().max()) > 1e-3  # two heads' planes are not one plane times a phase
    x = torch.randn(5, generator=g, dtype=torch.float64)
    omega = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    group = torch.tensor([0, 0, 1, 1])
    errors = {}
    for m, n in ((4, 4), (9, 2)):
        source = _scores(q, k, x, rotate_half, m * omega, n * omega)[torch.arange(4), group]
        rope = _scores(q_rope, k_rope, x, rotate_interleaved, m * omega, n * omega)[:, 0]
        nope = ((x @ q.transpose(-1, -2)) * (x @ k_nope.transpose(-1, -2))[group]).sum(-1)
        errors[m - n] = float((rope + nope - source).abs().max())
    assert errors[0] < 1e-10 and errors[7] > 1e-3, errors
    with pytest.raises(ValueError, match="query heads 3 must be a multiple of KV heads 2"):
        split_rope(q=q[:3], k=k, freqs=freqs, w=w, c=c)


def test_expected_rotation_is_one_at_distance_zero_and_averages_the_phase():
    inv_freq = torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64)
    hist = torch.zeros(2, 5, dtype=torch.float64)
    hist[0, 0] = 3.0  # head 0 only looks at itself
    hist[1, [0, 4]] = 1.0  # head 1: half at distance 0, half at distance 4
    rho = expected_rotation(distance_hist=hist, inv_freq=inv_freq)
    assert rho.shape == (2, 3)
    assert torch.allclose(rho[0], torch.ones(3, dtype=rho.dtype))
    want = 0.5 * (1 + torch.exp(-4j * inv_freq))
    assert torch.allclose(rho[1], want.to(rho.dtype))
    assert float(rho.abs().max()) <= 1 + 1e-12 and rho[1, 2] == 1  # a zero frequency never turns


def test_slow_frequencies_need_their_rotation_only_over_long_distances():
    """What moves the RoPE schedule at long range: 1 − |ρ|² of a slow frequency is ~0 over short attention distances
    and large over long ones, while a fast one needs its rotation at both."""
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    short, long = torch.zeros(1, 4096, dtype=torch.float64), torch.zeros(1, 4096, dtype=torch.float64)
    short[0, :512] = 1.0
    long[0, :] = 1.0
    need = {k: 1 - expected_rotation(distance_hist=h, inv_freq=inv_freq).abs().pow(2)[0] for k, h in
            (("short", short), ("long", long))}
    slow = 18  # wavelength ~4k tokens
    assert need["short"][slow] < 0.1 < 0.5 < need["long"][slow]
    assert need["short"][0] > 0.9 and need["long"][0] > 0.9
