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

Memory
------
The loss never holds the logits of a whole micro-batch (``tokens × vocab`` floats, several copies of them for the
softmaxes and the KL): :func:`chunked_lm_loss` takes the final hidden states and the head's weight, makes one chunk
of logits at a time, and accumulates the gradients with respect to the hidden states and the head on the way
(``softmax − one-hot`` for cross-entropy, ``T·(p_s − p_t)`` for the distillation KL), so the backward pass only
scales them. :func:`split_head` makes a causal LM return its final hidden states instead of logits, and
:data:`SDPA` is transformers' SDPA attention with the values padded to the query/key head size, so that MLA's
unequal head sizes still get PyTorch's fused kernels instead of the math fallback that keeps the probabilities.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = [
    "latent_modules",
    "measure_latent_scales",
    "to_training_form",
    "to_stock_state_dict",
    "tied_embedding_scale",
    "ScaledHeadEmbedding",
    "select_trainable",
    "causal_lm_loss",
    "chunked_lm_loss",
    "auto_loss_chunk_tokens",
    "SDPA",
    "register_sdpa",
    "split_head",
    "activation_bytes",
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


def to_stock_state_dict(state_dict: dict[str, torch.Tensor], scales: dict[str, float], kv_lora_rank: int, *,
                        tied: tuple[str, str, float] | None = None) -> dict:
    """A copy of a training-form state dict in the stock checkpoint form: the latent rows multiplied back by s, and
    for ``tied = (embedding key, head key, scale)`` the input embedding written out as the head times the scale."""
    out = dict(state_dict)
    if tied is not None:
        embed_key, head_key, scale = tied
        out[embed_key] = out[head_key] * scale
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


def tied_embedding_scale(model: torch.nn.Module, *, candidates: tuple[float, ...], dtype: torch.dtype) -> float | None:
    """The s for which the input embedding is the output head times s, rounded to ``dtype``; None if no candidate is.

    A converted checkpoint of a tied source (SmolLM2, Llama-3.2-1B, Qwen2.5-0.5B…) stores the embedding in the
    residual scale and the head untied (engines never tie DeepSeek's head): one table written twice. ``dtype`` is the
    checkpoint's, so that a bfloat16 checkpoint loaded in float32 is recognised too.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (not isinstance(emb, torch.nn.Embedding) or not isinstance(head, torch.nn.Linear) or head.bias is not None
            or emb.weight is head.weight or emb.weight.shape != head.weight.shape):
        return None
    with torch.no_grad():
        stored = emb.weight.to(dtype)
        for s in candidates:
            if torch.equal((head.weight * s).to(dtype), stored):
                return float(s)
    return None


class ScaledHeadEmbedding(torch.nn.Module):
    """The input embedding as the output head's weight times ``scale``: a tied source's one table, trained once.

    The head is referenced, not registered, so the table is one parameter (the head's), with one gradient and one
    pair of AdamW moments; ``padding_idx`` keeps the replaced embedding's (that row gets no gradient from the input).
    """

    def __init__(self, head: torch.nn.Linear, scale: float, *, padding_idx: int | None = None):
        super().__init__()
        self.__dict__["head"] = head
        self.scale = float(scale)
        self.padding_idx = padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.head.weight, self.padding_idx) * self.scale

    def extra_repr(self) -> str:
        return f"head.weight × {self.scale}"


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


def auto_loss_chunk_tokens(vocab: int, *, target_bytes: int = 64 * 2**20) -> int:
    """Tokens per loss chunk such that one chunk's float32 logits take about ``target_bytes`` (at least 64 tokens)."""
    return max(64, target_bytes // (4 * max(vocab, 1)))


class _ChunkedLMLoss(torch.autograd.Function):
    """Cross-entropy (+ distillation KL) of ``h @ wᵀ`` over token chunks; the gradients are computed in the forward.

    Only one chunk's logits (and softmaxes) exist at a time; what is kept for the backward is the gradient with
    respect to the hidden states (``[tokens, hidden]``) and, when the head is trained, to the head's weight.
    ``w=None`` means ``h`` already holds the logits (a model whose head cannot be split off).
    """

    @staticmethod
    def forward(ctx, h, w, t_h, t_w, targets, alpha, temperature, chunk, want_grad):
        n = h.shape[0]
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and w is not None and ctx.needs_input_grad[1]
        teacher = t_h is not None
        ce_w = (1.0 - alpha) / n if teacher else 1.0 / n  # d loss / d CE-sum
        kd_w = alpha * temperature / n  # d loss / d student logits = kd_w · (p_s − p_t) for the KL part
        g_h = torch.empty_like(h) if need_h else None
        g_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc, y = h[s : s + chunk], targets[s : s + chunk]
            z = (F.linear(hc, w) if w is not None else hc).float()
            lse = torch.logsumexp(z, dim=-1)
            ce_sum += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            dz = None
            if teacher:
                tc = t_h[s : s + chunk]
                tz = (F.linear(tc, t_w) if t_w is not None else tc).float()
                log_pt = F.log_softmax(tz / temperature if temperature != 1.0 else tz, dim=-1)
                del tz
                log_ps = F.log_softmax(z / temperature, dim=-1) if temperature != 1.0 else z - lse[:, None]
                diff = log_pt - log_ps
                p_t = log_pt.exp_()
                del log_pt
                kd_sum += diff.mul_(p_t).sum()  # KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s)
                del diff
                if need_h or need_w:
                    dz = log_ps.exp_().sub_(p_t).mul_(kd_w)
                del p_t, log_ps
            if need_h or need_w:
                p = z.sub_(lse[:, None]).exp_()  # softmax(z), in the logits' memory
                p[torch.arange(p.shape[0], device=p.device), y] -= 1.0
                p.mul_(ce_w)
                dz = p if dz is None else dz.add_(p)
                del p
                if need_h:
                    g_h[s : s + chunk] = dz.to(w.dtype) @ w if w is not None else dz
                if need_w and hc.dtype == g_w.dtype:  # accumulated in place: no head-sized product per chunk
                    g_w.addmm_(dz.t(), hc)
                elif need_w:  # (bf16 hidden states: the product in their precision, as autocast would)
                    g_w.add_(dz.t().to(hc.dtype) @ hc)
            del z, dz
        ce = ce_sum / n
        kd = kd_sum / n * temperature**2 if teacher else torch.zeros((), dtype=torch.float32, device=h.device)
        loss = (1.0 - alpha) * ce + alpha * kd if teacher else ce.clone()
        ctx.save_for_backward(g_h, g_w.to(w.dtype) if need_w else None)
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_kd):
        g_h, g_w = ctx.saved_tensors
        # in place: the gradients were made for this backward alone, and a head-sized copy would add to the peak
        g_h = None if g_h is None else g_h.mul_(g_loss.to(g_h.dtype))
        g_w = None if g_w is None else g_w.mul_(g_loss.to(g_w.dtype))
        return g_h, g_w, None, None, None, None, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    input_ids: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`causal_lm_loss` fused with the output projection and computed ``chunk_tokens`` positions at a time.

    The same loss and gradients as ``causal_lm_loss(hidden @ weightᵀ, ...)``, without ever holding the logits (or
    their softmaxes) of the whole micro-batch: each chunk's logits are made, used and dropped, and the gradients
    with respect to ``hidden`` and ``weight`` are accumulated on the way, so the backward pass only scales them.

    Args:
        hidden: the student's final hidden states ``[batch, seq, hidden]`` (after the final norm), or its logits
            ``[batch, seq, vocab]`` when ``weight`` is None.
        weight: the student's output projection ``[vocab, hidden]`` (no bias), or None (``hidden`` are logits).
        input_ids: the tokens ``[batch, seq]``; position t predicts token t+1.
        teacher_hidden: the teacher's final hidden states (or logits, with ``teacher_weight`` None); None for
            plain cross-entropy. Never differentiated.
        teacher_weight: the teacher's output projection, or None.
        alpha: weight of the distillation term.
        temperature: distillation temperature T (the KL term is scaled by T²).
        chunk_tokens: positions per chunk; 0 picks :func:`auto_loss_chunk_tokens`.

    Returns:
        ``(loss, ce, kd)`` as :func:`causal_lm_loss`; ``ce`` and ``kd`` are detached (for logging).

    Raises:
        ValueError: shapes that do not fit together.
    """
    if hidden.ndim != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and input_ids {tuple(input_ids.shape)} do not fit")
    if teacher_hidden is not None and teacher_hidden.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"teacher hidden {tuple(teacher_hidden.shape)} and hidden {tuple(hidden.shape)} differ")
    vocab = weight.shape[0] if weight is not None else hidden.shape[-1]
    t_vocab = None
    if teacher_hidden is not None:
        t_vocab = teacher_weight.shape[0] if teacher_weight is not None else teacher_hidden.shape[-1]
        if t_vocab != vocab:
            raise ValueError(f"teacher logits ({t_vocab}) and student logits ({vocab}) differ")
    chunk = chunk_tokens if chunk_tokens > 0 else auto_loss_chunk_tokens(vocab)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    t_h = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
    targets = input_ids[:, 1:].reshape(-1)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or (weight is not None and weight.requires_grad))
    loss, ce, kd = _ChunkedLMLoss.apply(h, weight, t_h, teacher_weight, targets, float(alpha), float(temperature), chunk,
                                        want_grad)
    return loss, ce, (kd if teacher_hidden is not None else None)


SDPA = "mha2mla_sdpa"


def _sdpa_padded(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with the values zero-padded to the query/key head size when they are narrower.

    MLA has wider query/key heads (nope + rope) than value heads; PyTorch's fused kernels (flash on CPU and GPU)
    want one head size, and without the padding SDPA falls back to its math kernel, which keeps the attention
    probabilities for the backward pass. The padded columns produce zero outputs that are cut off again.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dv, dq = value.shape[-1], query.shape[-1]
    if dv < dq:
        value = F.pad(value, (0, dq - dv))
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return (out[..., :dv] if dv < dq else out), weights


def register_sdpa() -> str:
    """Register :data:`SDPA` (padded SDPA) with transformers' attention and mask registries; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(SDPA, _sdpa_padded)
    AttentionMaskInterface.register(SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return SDPA


# Causal-LM classes whose logits are exactly ``lm_head(final hidden states)`` (no soft-capping or scaling after it).
_PLAIN_HEAD_TYPES = frozenset({"deepseek_v3", "deepseek_v2", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe",
                               "qwen3", "qwen3_moe", "phi3", "olmo", "olmo2"})


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def split_head(model: torch.nn.Module, *, enabled: bool = True):
    """While active, ``model(...).logits`` are the final hidden states; yields the head's weight (None: not split).

    Only models of :data:`_PLAIN_HEAD_TYPES` with a bias-free linear head are split; any other model (or
    ``enabled=False``) yields None and keeps returning logits. ``model`` is the unwrapped causal LM; a wrapper
    around it (DDP) still runs its own forward, which calls the head.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    ok = (enabled and isinstance(head, torch.nn.Linear) and head.bias is None
          and getattr(model.config, "model_type", None) in _PLAIN_HEAD_TYPES)
    if not ok:
        yield None
        return
    head.forward = _identity
    try:
        yield head.weight
    finally:
        del head.forward


def activation_bytes(config, *, tokens: int, bytes_per_value: int) -> int:
    """A rough size of the activations a decoder keeps for the backward pass of ``tokens`` positions.

    Per position and layer: about 8 hidden-sized tensors (norm inputs and outputs, residuals), 6 query/key-sized,
    3 value-sized and 4 MLP-sized ones (gate, up, activation, product); attention probabilities are not counted
    (a fused attention kernel keeps none).
    """
    h = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    qk = heads * int(getattr(config, "qk_head_dim", None) or
                     (getattr(config, "qk_nope_head_dim", 0) or 0) + (getattr(config, "qk_rope_head_dim", 0) or 0)
                     or head_dim)
    v = heads * int(getattr(config, "v_head_dim", None) or head_dim)
    inter = int(getattr(config, "intermediate_size", None) or 4 * h)
    per = 8 * h + 6 * qk + 3 * v + 4 * inter
    return int(per) * int(config.num_hidden_layers) * tokens * bytes_per_value


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
