"""Pieces of the healing loop that do math on tensors and modules: no files, no logging.

The latent norm of a converted checkpoint
-----------------------------------------
mha2mla makes ``kv_a_layernorm`` (an RMSNorm over the ``kv_lora_rank`` latent, eps 1e-6) act linearly: the latent rows
of ``kv_a_proj_with_mqa`` are scaled by a tiny α so that the latent's mean square is far below eps, and the norm weight
is ``sqrt(eps)/α``. Adam's updates do not depend on the scale of a weight, so with a normal learning rate the tiny
rows would change by a huge relative amount in a few steps (and their gradients, ~1/α times normal, would dominate
gradient clipping). Healing therefore trains them in an exactly equivalent form::

        stock checkpoint                          training form (s = power of two ≈ α)
        W_lat (tiny), eps                         W_lat / s (normal size), eps / s²
        RMSNorm(x W_latᵀ; eps) == RMSNorm(x (W_lat/s)ᵀ; eps/s²)     for every x

so the optimizer sees normal-sized weights and gradients, and a step of size lr on ``W_lat/s`` is a step of size
lr·s on ``W_lat``: the learning rate of those rows is scaled by s. Powers of two make the change of form exact in
floating point; the saved checkpoint is always in the stock form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "latent_modules",
    "measure_latent_scales",
    "to_training_form",
    "to_stock_state_dict",
    "select_trainable",
    "causal_lm_loss",
    "block_indices",
]


def latent_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """MLA attention modules (those with ``kv_a_proj_with_mqa`` and ``kv_a_layernorm``), by module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "kv_a_proj_with_mqa") and hasattr(m, "kv_a_layernorm")
    }


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt()) if t.numel() else 0.0


def measure_latent_scales(model: torch.nn.Module, *, threshold: float = 1 / 16) -> dict[str, float]:
    """Per attention module, the power of two s ≈ RMS(latent rows) / RMS(a normal weight of the same layer).

    The normal weight is the RoPE rows of ``kv_a_proj_with_mqa`` (the source's key rows), else the query projection.
    Layers whose latent rows are not small (ratio ≥ ``threshold``, e.g. a checkpoint not made by mha2mla) get 1.0.
    """
    scales = {}
    for name, attn in latent_modules(model).items():
        r = attn.kv_a_layernorm.weight.numel()
        w = attn.kv_a_proj_with_mqa.weight
        ref = _rms(w[r:])
        if ref == 0.0:
            q = getattr(attn, "q_proj", None) or getattr(attn, "q_a_proj", None)
            ref = _rms(q.weight) if q is not None else 0.0
        lat = _rms(w[:r])
        ratio = lat / ref if ref > 0 and lat > 0 else 1.0
        scales[name] = 1.0 if ratio >= threshold else 2.0 ** round(math.log2(ratio))
    return scales


@torch.no_grad()
def to_training_form(model: torch.nn.Module, scales: dict[str, float]) -> None:
    """Divide each module's latent rows (and bias) by s and its latent-norm eps by s², in place (exact for powers of two)."""
    modules = latent_modules(model)
    for name, s in scales.items():
        if s == 1.0:
            continue
        attn = modules[name]
        r = attn.kv_a_layernorm.weight.numel()
        attn.kv_a_proj_with_mqa.weight[:r] /= s
        if attn.kv_a_proj_with_mqa.bias is not None:
            attn.kv_a_proj_with_mqa.bias[:r] /= s
        attn.kv_a_layernorm.variance_epsilon = attn.kv_a_layernorm.variance_epsilon / (s * s)


def to_stock_state_dict(state_dict: dict[str, torch.Tensor], scales: dict[str, float], kv_lora_rank: int) -> dict:
    """A copy of a training-form state dict with the latent rows multiplied back by s (the stock checkpoint form)."""
    out = dict(state_dict)
    for name, s in scales.items():
        if s == 1.0:
            continue
        for suffix in ("weight", "bias"):
            key = f"{name}.kv_a_proj_with_mqa.{suffix}"
            if key in out and out[key] is not None:
                t = out[key].clone()
                t[:kv_lora_rank] *= s
                out[key] = t
    return out


def select_trainable(model: torch.nn.Module, *, train: str, freeze_latent_norm: bool) -> list[str]:
    """Set ``requires_grad``: every parameter (``train='all'``) or the attention ones (``'attention'``).

    Returns:
        The names of the trainable parameters.
    """
    names = []
    for name, p in model.named_parameters():
        keep = train == "all" or ".self_attn." in f".{name}"
        if freeze_latent_norm and "kv_a_layernorm" in name:
            keep = False
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    return names


def causal_lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Next-token cross-entropy, mixed with distillation when teacher logits are given.

    ``loss = (1 - alpha)·CE + alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, KL summed over the vocabulary
    and averaged over positions.

    Args:
        logits: student logits ``[batch, seq, vocab]``.
        input_ids: the tokens ``[batch, seq]``; position t predicts token t+1.
        teacher_logits: teacher logits of the same shape, or None for plain cross-entropy.

    Returns:
        ``(loss, ce, kd)``; ``kd`` is None without a teacher.
    """
    s = logits[:, :-1].float()
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), input_ids[:, 1:].reshape(-1))
    if teacher_logits is None:
        return ce, ce, None
    t = teacher_logits[:, :-1].float()
    if t.shape != s.shape:
        raise ValueError(f"teacher logits {tuple(t.shape)} and student logits {tuple(s.shape)} differ")
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kd = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1).mean() * temperature**2
    return (1.0 - alpha) * ce + alpha * kd, ce, kd


def block_indices(start: int, count: int, *, n_blocks: int, seed: int) -> torch.Tensor:
    """Indices of blocks ``start … start+count-1`` of an endless, seeded stream: one fresh permutation per epoch.

    The stream is a pure function of ``(seed, position)``, which is what makes an interrupted run resumable.
    """
    out = []
    perms: dict[int, torch.Tensor] = {}
    for g in range(start, start + count):
        epoch, i = divmod(g, n_blocks)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n_blocks, generator=gen)
        out.append(int(perms[epoch][i]))
    return torch.tensor(out, dtype=torch.long)
