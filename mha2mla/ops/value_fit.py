"""Output-matched value path: refit every head's ``W_upV,h`` and ``W_o,h`` on the layer's real output (pure math).

In the converted layer head ``h`` outputs ``W_upV,h c̄_h`` with ``c̄_h,m = Σ_n p'_h,mn c_n`` (its attention-weighted
latent, under the *converted* attention ``p'``), and the layer ``y' = Σ_h W_o,h W_upV,h c̄_h``. The cache holds only
``c``, so every head may have its own ``W_upV,h`` (the source's grouping of values is not a constraint of MLA). With
``M_h = W_o,h W_upV,h`` (``hidden × R``, rank ≤ head_dim) the best value path for a target output ``y`` (the source
layer's attention output) is the least-squares problem

    min Σ_m ‖y_m − Σ_h M_h c̄_h,m‖²   s.t. rank M_h ≤ head_dim,

solved from the second moments of ``z = [c̄_1; …; c̄_H]`` and ``y``: jointly in closed form when ``R ≤ head_dim`` (no
rank limit binds), else by block-coordinate reduced-rank regression over the heads. Fitting on the converted attention
also absorbs part of the key error (the values learn what the changed attention weights average).
"""

from __future__ import annotations

import torch

from mha2mla.ops.attention import value_up_projection
from mha2mla.ops.factorize import svd_via_gram
from mha2mla.ops.moments import add_lower_gram, symmetric_from_lower
from mha2mla.ops.shapes import ConversionPlan

__all__ = ["JOINT_MAX_FEATURES", "OUTPUT_FIT_FULL_FEATURES", "HeadwiseValueFit", "ValuePathFit", "factor_heads",
           "moment_stride", "value_path_prior", "with_head_values", "with_value_path"]


# Up to this many features (heads × rank) the joint fit's moments read every query position; above it every k-th
# (moment_stride), so that their cost per layer, which grows with features² per position, stays near this size's.
OUTPUT_FIT_FULL_FEATURES = 1024


def moment_stride(*, features: int) -> int:
    """The query-position stride for the joint fit's moments: 1 up to :data:`OUTPUT_FIT_FULL_FEATURES` features, else
    ``round((features / OUTPUT_FIT_FULL_FEATURES)²)``, which holds the moments' cost near that of the full-stride fit
    at :data:`OUTPUT_FIT_FULL_FEATURES`."""
    if features < 1:
        raise ValueError(f"features must be ≥ 1, got {features}")
    return max(1, round((features / OUTPUT_FIT_FULL_FEATURES) ** 2))


class ValuePathFit:
    """Accumulates ``E[zzᵀ]``, ``E[yzᵀ]`` batch by batch, then solves for the value path.

    Args:
        plan: the target shapes (heads, head_dim, rank).
        intercept: also fit a constant (``o_proj.bias``; only when the target has attention biases).
    """

    def __init__(self, *, plan: ConversionPlan, intercept: bool):
        self.plan, self.intercept = plan, intercept
        f = plan.n_heads * plan.rank
        self.zz = torch.zeros(f, f, dtype=torch.float64)
        self.yz = torch.zeros(plan.hidden, f, dtype=torch.float64)
        self.z_sum = torch.zeros(f, dtype=torch.float64)
        self.y_sum = torch.zeros(plan.hidden, dtype=torch.float64)
        self.yy = 0.0
        self.n = 0

    def add(self, *, contexts: torch.Tensor, target: torch.Tensor) -> None:
        """``contexts [B, H, L, R]`` (:func:`mha2mla.ops.attention.mla_head_contexts`), ``target [B, L, hidden]``, on any
        device (the moments are kept on the CPU in float64)."""
        b, h, l, r = contexts.shape
        z = contexts.permute(0, 2, 1, 3).reshape(b * l, h * r).float()
        y = target.reshape(b * l, -1).float()
        # E[zzᵀ] is symmetric: only the head blocks on and below the diagonal are computed
        add_lower_gram(self.zz, z, [i * r for i in range(h + 1)])
        self.yz += (y.T @ z).double().cpu()
        self.z_sum += z.sum(0).double().cpu()
        self.y_sum += y.sum(0).double().cpu()
        self.yy += float(y.double().pow(2).sum())
        self.n += b * l

    def solve(self, *, prior: torch.Tensor | None = None, ridge: float = 1e-4,
              sweeps: int = 1) -> tuple[list[torch.Tensor], torch.Tensor | None, float]:
        """Least squares, shrunk towards ``prior`` (``[hidden, H·R]``, the analytic value path; zero when None) by
        ``ridge·mean(diag E[zzᵀ])``.

        Returns:
            ``(M_h per head [hidden, R], bias [hidden] or None, relative residual ‖y − ŷ‖/‖y‖ on the fitted data)``.
        """
        if self.n == 0:
            raise ValueError("no calibration tokens were added")
        p = self.plan
        h_n, r, hd = p.n_heads, p.rank, p.head_dim
        g = symmetric_from_lower(self.zz) / self.n
        c, yy = self.yz / self.n, self.yy / self.n
        if self.intercept:
            zm, ym = self.z_sum / self.n, self.y_sum / self.n
            g, c, yy = g - torch.outer(zm, zm), c - torch.outer(ym, zm), yy - float(ym @ ym)
        reg = g + ridge * float(g.diagonal().mean()) * torch.eye(g.shape[0], dtype=g.dtype)
        lam = ridge * float(g.diagonal().mean())
        rhs = c if prior is None else c + lam * prior.to(c.dtype)
        m = torch.linalg.solve(reg, rhs.T).T  # joint least squares, [hidden, H·R]
        if r > hd:
            m = self._reduced_rank(m, reg, rhs, sweeps)
        resid = yy - 2 * float((m * c).sum()) + float(((m @ g) * m).sum())
        bias = None
        if self.intercept:
            bias = (ym - m @ zm).to(torch.float64)
            yy_tot = self.yy / self.n
        else:
            yy_tot = yy
        rel = (max(resid, 0.0) / max(yy_tot, 1e-300)) ** 0.5
        return [m[:, i * r : (i + 1) * r] for i in range(h_n)], bias, rel

    def _reduced_rank(self, m: torch.Tensor, reg: torch.Tensor, rhs_all: torch.Tensor, sweeps: int) -> torch.Tensor:
        """Block-coordinate reduced-rank regression: each head in turn gets the best rank-``head_dim`` map for what the
        other heads leave unexplained."""
        p = self.plan
        r, hd = p.rank, p.head_dim
        m = m.clone()
        for _ in range(max(1, sweeps)):
            for h in range(p.n_heads):
                s = slice(h * r, (h + 1) * r)
                g_hh = reg[s, s]
                rhs = rhs_all[:, s] - m @ reg[:, s] + m[:, s] @ g_hh  # E[(y − Σ_{h'≠h} M_h' c̄_h') c̄_hᵀ] (+ prior)
                b = torch.linalg.solve(g_hh, rhs.T).T
                ev, evec = torch.linalg.eigh(g_hh)
                root = (evec * ev.clamp_min(0).sqrt()) @ evec.T
                u = svd_via_gram(b @ root)[0][:, :hd]
                m[:, s] = u @ (u.T @ b)
        return m


def factor_heads(*, maps: list[torch.Tensor], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each ``M_h [hidden, R]`` (rank ≤ head_dim) into ``W_o,h [hidden, hd]`` and ``W_upV,h [hd, R]`` with balanced
    singular values. Returns ``(o_proj [hidden, H·hd], up_v [H, hd, R])``."""
    outs, ups = [], []
    for m in maps:
        u, s, vh = svd_via_gram(m)
        k = min(head_dim, s.shape[0])
        root = s[:k].sqrt()
        wo = torch.zeros(m.shape[0], head_dim, dtype=m.dtype)
        up = torch.zeros(head_dim, m.shape[1], dtype=m.dtype)
        wo[:, :k] = u[:, :k] * root
        up[:k] = root[:, None] * vh[:k]
        outs.append(wo)
        ups.append(up)
    return torch.cat(outs, dim=1), torch.stack(ups)


def with_value_path(*, tensors: dict, plan: ConversionPlan, maps: list[torch.Tensor],
                    bias: torch.Tensor | None) -> dict:
    """``tensors`` with ``kv_b_proj``'s value rows, ``o_proj.weight`` (and ``o_proj.bias``) replaced by the fitted path
    (the residual-stream scale of the plan applied to the output, as for the source ``o_proj``)."""
    n_h, hd, r = plan.n_heads, plan.head_dim, plan.rank
    dt = tensors["o_proj.weight"].dtype
    wo, up_v = factor_heads(maps=maps, head_dim=hd)
    kvb = tensors["kv_b_proj.weight"].reshape(n_h, 2 * hd, r).clone()
    kvb[:, hd:] = up_v.to(kvb.dtype)
    out = dict(tensors)
    out["kv_b_proj.weight"] = kvb.reshape(n_h * 2 * hd, r)
    out["o_proj.weight"] = (wo * plan.residual_scale).to(dt)
    if bias is not None:
        out["o_proj.bias"] = (bias * plan.residual_scale).to(dt)
    return out


def value_path_prior(*, tensors: dict, plan: ConversionPlan) -> torch.Tensor:
    """``[hidden, H·R]``: the value path ``M_h = W_o,h W_upV,h`` the tensors already hold (source residual scale)."""
    n_h, hd, r = plan.n_heads, plan.head_dim, plan.rank
    up_v = value_up_projection(tensors, plan).double()
    wo = tensors["o_proj.weight"].double().reshape(plan.hidden, n_h, hd) / plan.residual_scale
    return torch.einsum("ohd,hdr->ohr", wo, up_v).reshape(plan.hidden, n_h * r)


# Above this many features (heads × rank) the joint fit's normal equations get large ((heads·rank)² floats); each
# head's up-projection is then fitted alone against the source head's output, W_o kept.
JOINT_MAX_FEATURES = 4096


class HeadwiseValueFit:
    """Per head, ``W_upV,h = argmin E‖o_h − W_upV,h c̄_h‖²`` against the source head output ``o_h`` (``W_o`` kept).

    The cheap form of :class:`ValuePathFit` for wide models: ``H`` systems of size ``R`` instead of one of ``H·R``.
    """

    def __init__(self, *, plan: ConversionPlan, intercept: bool):
        self.plan, self.intercept = plan, intercept
        h, r, hd = plan.n_heads, plan.rank, plan.head_dim
        self.zz = torch.zeros(h, r, r, dtype=torch.float64)
        self.oz = torch.zeros(h, hd, r, dtype=torch.float64)
        self.z_sum = torch.zeros(h, r, dtype=torch.float64)
        self.o_sum = torch.zeros(h, hd, dtype=torch.float64)
        self.n = 0

    def add(self, *, contexts: torch.Tensor, target: torch.Tensor) -> None:
        """``contexts [B, H, L, R]``, ``target [B, H, L, head_dim]`` (each source head's output before ``o_proj``)."""
        z, o = contexts.float(), target.float()
        self.zz += torch.einsum("bhlr,bhls->hrs", z, z).double().cpu()
        self.oz += torch.einsum("bhld,bhlr->hdr", o, z).double().cpu()
        self.z_sum += z.sum((0, 2)).double().cpu()
        self.o_sum += o.sum((0, 2)).double().cpu()
        self.n += z.shape[0] * z.shape[2]

    def solve(self, *, prior: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``prior [H, hd, R]`` (the current ``W_upV,h``) → ``(W_upV [H, hd, R], head biases [H, hd] or None)``."""
        g, c = self.zz / self.n, self.oz / self.n
        if self.intercept:
            zm, om = self.z_sum / self.n, self.o_sum / self.n
            g = g - zm[:, :, None] * zm[:, None, :]
            c = c - om[:, :, None] * zm[:, None, :]
        lam = ridge * g.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None]
        eye = torch.eye(g.shape[-1], dtype=g.dtype)
        up = torch.linalg.solve(g + lam * eye, (c + lam * prior.double()).transpose(1, 2)).transpose(1, 2)
        bias = (om - torch.einsum("hdr,hr->hd", up, zm)) if self.intercept else None
        return up, bias


def with_head_values(*, tensors: dict, plan: ConversionPlan, up_v: torch.Tensor, head_bias: torch.Tensor | None,
                     o_bias: torch.Tensor | None) -> dict:
    """``tensors`` with each head's value rows of ``kv_b_proj`` replaced; head biases pass through ``W_o`` into
    ``o_proj.bias`` (``o_bias``: the source's, or None)."""
    n_h, hd, r = plan.n_heads, plan.head_dim, plan.rank
    kvb = tensors["kv_b_proj.weight"].reshape(n_h, 2 * hd, r).clone()
    kvb[:, hd:] = up_v.to(kvb.dtype)
    out = dict(tensors)
    out["kv_b_proj.weight"] = kvb.reshape(n_h * 2 * hd, r)
    if head_bias is not None:
        wo = tensors["o_proj.weight"].double()  # already carries the residual scale
        b = wo @ head_bias.reshape(-1)
        if o_bias is not None:
            b = b + o_bias.double() * plan.residual_scale
        out["o_proj.bias"] = b.to(tensors["o_proj.weight"].dtype)
    return out
