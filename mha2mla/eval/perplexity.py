"""Perplexity and bits per byte of a causal LM on a text, with fixed non-overlapping windows.

Method (the same for every model, so source and converted numbers are comparable):

1. The documents are tokenised without special tokens and concatenated with EOS between them
   (:func:`mha2mla.data.pack_tokens`); the first ``max_tokens`` tokens are kept.
2. That stream is cut into consecutive, non-overlapping windows of ``ctx`` tokens; a shorter last
   window is kept when it has at least two tokens. No BOS is added and no context is carried over
   from one window to the next, so each window starts cold.
3. In each window every token but the first is predicted from the tokens before it in the window.
   ``nll`` is the mean negative log-likelihood (nats) over all predicted tokens and ``ppl = exp(nll)``.
4. ``bits_per_byte`` is the total NLL in bits divided by the UTF-8 bytes of the predicted text: per
   window, ``len(decode(window)) - len(decode(window[:1]))`` with special tokens skipped (so EOS
   separators are predicted but count no bytes). Unlike perplexity it does not depend on the tokenizer.

Windows that do not overlap are cheaper than a sliding window with stride and give a somewhat higher
perplexity (early tokens of a window have little context); only compare numbers computed the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mha2mla.data import pack_tokens
from mha2mla.errors import Mha2mlaError

__all__ = ["PerplexityResult", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model on one token stream.

    Attributes:
        ppl: ``exp(nll)``.
        nll: mean negative log-likelihood per predicted token, in nats.
        bits_per_byte: total NLL in bits over the UTF-8 bytes of the predicted text.
        tokens: number of predicted tokens.
        bytes: UTF-8 bytes of the predicted text.
        windows: number of windows evaluated.
        ctx: window length in tokens.
    """

    ppl: float
    nll: float
    bits_per_byte: float
    tokens: int
    bytes: int
    windows: int
    ctx: int

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-ready)."""
        return asdict(self)


def _windows(tokens: torch.Tensor, ctx: int) -> list[torch.Tensor]:
    wins = list(tokens.split(ctx))
    if wins and wins[-1].numel() < 2:
        wins.pop()
    return wins


def perplexity(
    *,
    model,
    tokenizer,
    text: str | list[str] | None = None,
    tokens: torch.Tensor | None = None,
    ctx: int = 1024,
    max_tokens: int | None = 16384,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> PerplexityResult:
    """Perplexity and bits per byte of ``model`` over fixed windows of ``ctx`` tokens (see module docstring).

    Args:
        model: a causal LM returning ``.logits`` of shape ``[batch, seq, vocab]`` (any HF ``*ForCausalLM``).
        tokenizer: its tokenizer; tokenises ``text`` and decodes windows to count bytes.
        text: one document or a list of documents. Give either ``text`` or ``tokens``.
        tokens: a 1-D LongTensor of token ids, used as is (no EOS is added).
        ctx: window length in tokens; at most the model's ``max_position_embeddings``.
        max_tokens: evaluate only the first ``max_tokens`` tokens (``None``: all).
        batch_size: full windows per forward pass.
        device: where to run; default the model's device.

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        Mha2mlaError: bad arguments, or fewer than two tokens of text.

    >>> r = perplexity(model=model, tokenizer=tok, text=open("wiki.test.txt").read(), ctx=1024)  # doctest: +SKIP
    >>> r.ppl, r.bits_per_byte  # doctest: +SKIP
    """
    if (text is None) == (tokens is None):
        raise Mha2mlaError("perplexity: give exactly one of text= or tokens=")
    if ctx < 2:
        raise Mha2mlaError(f"perplexity context must be at least 2 tokens, got {ctx}")
    if max_tokens is not None and max_tokens < 2:
        raise Mha2mlaError(f"perplexity token count must be at least 2, got {max_tokens}")
    if batch_size < 1:
        raise Mha2mlaError(f"batch size must be at least 1, got {batch_size}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and ctx > max_pos:
        raise Mha2mlaError(
            f"perplexity context {ctx} exceeds the model's max_position_embeddings {max_pos}; use a smaller ctx"
        )

    if tokens is None:
        texts = [text] if isinstance(text, str) else list(text)
        tokens = pack_tokens(tokenizer, texts, max_tokens=max_tokens)
    else:
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
    wins = _windows(tokens, ctx)
    if not wins:
        raise Mha2mlaError(f"perplexity needs at least 2 tokens of text, got {tokens.numel()}")

    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, n_tok = 0.0, 0
    try:
        with torch.inference_mode():
            full = [w for w in wins if w.numel() == ctx]
            groups = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
            groups += [w[None] for w in wins if w.numel() != ctx]
            for ids in groups:
                ids = ids.to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                for row, target in zip(logits, ids):  # one row at a time: a float32 copy of [ctx, vocab] only
                    total_nll += float(F.cross_entropy(row[:-1].float(), target[1:], reduction="sum"))
                    n_tok += target.numel() - 1
                del logits
    finally:
        model.train(was_training)

    n_bytes = 0
    for w in wins:
        ids = w.tolist()
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        first = tokenizer.decode(ids[:1], skip_special_tokens=True)
        n_bytes += max(len(whole.encode("utf-8")) - len(first.encode("utf-8")), 0)

    nll = total_nll / n_tok
    bpb = total_nll / math.log(2) / n_bytes if n_bytes else float("nan")
    return PerplexityResult(
        ppl=math.exp(nll), nll=nll, bits_per_byte=bpb, tokens=n_tok, bytes=n_bytes, windows=len(wins), ctx=ctx
    )
