"""Long-context checks of a causal LM: perplexity by position inside long windows, and passkey retrieval.

Both take a loaded model and its tokenizer (no files, no CLI), so the source and a converted model are measured the
same way (``mha2mla eval --long-context`` and ``benchmarks/long_context.py`` call them).

Perplexity by position (:func:`position_perplexity`):

1. The documents are tokenised and packed as in :mod:`mha2mla.eval.perplexity` (EOS between documents, no BOS); the first
   ``windows`` consecutive, non-overlapping windows of ``window`` tokens are kept (no context carried over).
2. In each window the token at position ``p`` (0-based) is predicted from positions ``0..p-1``; its NLL goes to the
   bucket ``[start, end)`` holding ``p`` (position 0 is never predicted). Buckets past the window are dropped.
3. Each bucket reports its mean NLL (nats) and ``ppl = exp(nll)``; the token-weighted mean of the bucket NLLs is the
   whole windows' NLL.

Passkey retrieval (:func:`passkey_prompt`, :func:`passkey_retrieval`): the classic prompt of Mohtashami & Jaggi
(2023) — an instruction, repeated filler sentences with ``The pass key is NNNNN. Remember it. NNNNN is the pass key.``
at a chosen depth, then ``What is the pass key? The pass key is`` — built at the token level to a target length. The
model answers greedily; the first run of digits in the answer must equal the key.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mha2mla.data import pack_tokens
from mha2mla.errors import Mha2mlaError

__all__ = [
    "PASSKEY_FILLER",
    "PASSKEY_INTRO",
    "PASSKEY_KEY",
    "PASSKEY_QUESTION",
    "greedy_tokens",
    "DEFAULT_BUCKETS",
    "PASSKEY_LENGTHS",
    "PositionPerplexity",
    "PasskeyResult",
    "bucket_edges",
    "token_nll",
    "position_perplexity",
    "passkey_prompt",
    "parse_passkey",
    "passkey_retrieval",
    "long_context_report",
    "evaluate_long_context",
    "render_long_context",
]

DEFAULT_BUCKETS = (0, 512, 1024, 2048, 4096, 8192)
PASSKEY_LENGTHS = (1024, 2048, 4096, 8192)
# Positions scored per lm_head call: a float32 [chunk, vocab] block at a time instead of the window's whole logits.
LOGIT_CHUNK = 1024

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_KEY = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def bucket_edges(*, window: int, edges: tuple[int, ...] = DEFAULT_BUCKETS) -> list[tuple[int, int]]:
    """The ``[start, end)`` position buckets that fit a window: edges past ``window`` are cut to it.

    Args:
        window: window length in tokens (at least 2).
        edges: increasing bucket edges starting at 0.

    Returns:
        Buckets ``(start, end)`` with ``start < window``; the last ends at ``min(edges[-1], window)``.

    Raises:
        Mha2mlaError: a window under 2 tokens, or edges that do not start at 0 and increase.
    """
    if window < 2:
        raise Mha2mlaError(f"long-context window must be at least 2 tokens, got {window}")
    if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise Mha2mlaError(f"position buckets must be increasing edges starting at 0, got {list(edges)}")
    return [(a, min(b, window)) for a, b in zip(edges, edges[1:]) if a < window]


def token_nll(*, model, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of one window: ``[L-1]`` float32, entry ``p-1`` for the token at position ``p``.

    The decoder runs once on the window; its last hidden states go through the output head ``LOGIT_CHUNK`` positions
    at a time, so a long window never holds its whole ``[L, vocab]`` logits. Call under ``torch.inference_mode``.

    Args:
        model: an HF ``*ForCausalLM`` (``base_model`` + ``get_output_embeddings()``).
        ids: ``[L]`` token ids on the model's device.
    """
    head = model.get_output_embeddings()
    hidden = model.base_model(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    out = []
    for s in range(0, ids.numel() - 1, LOGIT_CHUNK):
        e = min(s + LOGIT_CHUNK, ids.numel() - 1)
        logits = head(hidden[s:e]).float()
        out.append(F.cross_entropy(logits, ids[s + 1 : e + 1], reduction="none"))
    return torch.cat(out)


@dataclass(frozen=True)
class PositionPerplexity:
    """Perplexity by position inside long windows.

    Attributes:
        window: window length in tokens.
        windows: number of windows evaluated.
        buckets: one dict per bucket: ``start``, ``end`` (positions ``[start, end)``), ``tokens``, ``nll``, ``ppl``.
        nll: mean NLL over every predicted token of the windows.
        ppl: ``exp(nll)``.
        tokens: predicted tokens (``windows · (window − 1)``).
    """

    window: int
    windows: int
    buckets: list[dict]
    nll: float
    ppl: float
    tokens: int

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-ready)."""
        return asdict(self)


def position_perplexity(
    *,
    model,
    tokenizer=None,
    text: str | list[str] | None = None,
    tokens: torch.Tensor | None = None,
    window: int = 4096,
    windows: int = 2,
    edges: tuple[int, ...] = DEFAULT_BUCKETS,
    device: str | torch.device | None = None,
) -> PositionPerplexity:
    """Perplexity by position bucket over the first ``windows`` windows of ``window`` tokens (see module docstring).

    Args:
        model: an HF ``*ForCausalLM``.
        tokenizer: its tokenizer (needed with ``text``).
        text: one document or a list of documents. Give either ``text`` or ``tokens``.
        tokens: a 1-D LongTensor of token ids, used as is.
        window: window length; at most the model's ``max_position_embeddings``.
        windows: number of windows.
        edges: bucket edges (see :func:`bucket_edges`).
        device: where to run; default the model's device.

    Returns:
        A :class:`PositionPerplexity`.

    Raises:
        Mha2mlaError: bad arguments, a window past the model's context, or too little text for the windows.

    >>> r = position_perplexity(model=model, tokenizer=tok, text=open("wiki.test.txt").read(), window=4096)  # doctest: +SKIP
    >>> [(b["start"], b["ppl"]) for b in r.buckets]  # doctest: +SKIP
    """
    if (text is None) == (tokens is None):
        raise Mha2mlaError("position perplexity: give exactly one of text= or tokens=")
    if text is not None and tokenizer is None:
        raise Mha2mlaError("position perplexity: text= needs the tokenizer")
    if windows < 1:
        raise Mha2mlaError(f"long-context window count must be at least 1, got {windows}")
    buckets = bucket_edges(window=window, edges=edges)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and window > max_pos:
        raise Mha2mlaError(f"long-context window {window} exceeds the model's max_position_embeddings {max_pos}")
    need = window * windows
    if tokens is None:
        texts = [text] if isinstance(text, str) else list(text)
        tokens = pack_tokens(tokenizer, texts, max_tokens=need)
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if tokens.numel() < need:
        raise Mha2mlaError(f"long-context perplexity needs {windows} windows of {window} tokens = {need} tokens; "
                           f"the text has {tokens.numel()}")
    if device is None:
        device = next(model.parameters()).device
    sums = torch.zeros(window - 1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for w in tokens[:need].view(windows, window):
                sums += token_nll(model=model, ids=w.to(device)).double().cpu()
    finally:
        model.train(was_training)
    out = []
    for a, b in buckets:
        part = sums[max(a, 1) - 1 : b - 1]  # predicted positions p in [max(a,1), b)
        n = part.numel() * windows
        nll = float(part.sum()) / n if n else float("nan")
        out.append({"start": a, "end": b, "tokens": n, "nll": nll, "ppl": math.exp(nll) if n else float("nan")})
    nll = float(sums.sum()) / (windows * (window - 1))
    return PositionPerplexity(window=window, windows=windows, buckets=out, nll=nll, ppl=math.exp(nll),
                              tokens=windows * (window - 1))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_prompt(*, tokenizer, length: int, depth: float, key: str) -> tuple[list[int], int]:
    """Token ids of a passkey prompt of about ``length`` tokens with the key sentence at ``depth`` of the filler.

    Built from separately tokenised pieces (instruction, ``n`` filler sentences, the key sentence after
    ``round(depth·n)`` of them, the question), so the length and the key's place are exact in tokens; the prompt is
    the longest such one within ``length`` tokens.

    Args:
        tokenizer: the model's tokenizer.
        length: target prompt length in tokens (the prompt is at most this long, and within one filler of it).
        depth: where the key goes, 0 (right after the instruction) … 1 (right before the question).
        key: the pass key (digits).

    Returns:
        ``(ids, key_start)``: the prompt's token ids and the index of the key sentence's first token.

    Raises:
        Mha2mlaError: a depth outside [0, 1], a key that is not digits, or a length too short for one filler.
    """
    if not 0.0 <= depth <= 1.0:
        raise Mha2mlaError(f"passkey depth must be in [0, 1], got {depth}")
    if not key.isdigit():
        raise Mha2mlaError(f"pass key must be digits, got {key!r}")
    intro, filler = _ids(tokenizer, PASSKEY_INTRO), _ids(tokenizer, PASSKEY_FILLER)
    key_ids, question = _ids(tokenizer, PASSKEY_KEY.format(key=key)), _ids(tokenizer, PASSKEY_QUESTION)
    fixed = len(intro) + len(key_ids) + len(question)
    n = (length - fixed) // len(filler)
    if n < 1:
        raise Mha2mlaError(f"passkey prompt length {length} is too short: it needs at least {fixed + len(filler)} tokens")
    before = round(depth * n)
    ids = intro + filler * before + key_ids + filler * (n - before) + question
    return ids, len(intro) + len(filler) * before


def parse_passkey(answer: str) -> str | None:
    """The first run of digits in a model's answer, or ``None``."""
    m = re.search(r"\d+", answer)
    return m.group(0) if m else None


@torch.inference_mode()
def greedy_tokens(model, ids: list[int], new_tokens: int, device) -> list[int]:
    x = torch.tensor([ids], device=device)
    out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    past, got = out.cache, []
    for _ in range(new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        got.append(nxt)
        if len(got) == new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]], device=device), cache=past, use_cache=True)
        past = out.cache
    return got


@dataclass(frozen=True)
class PasskeyResult:
    """Passkey retrieval at one prompt length.

    Attributes:
        length: tokens of prompt plus answer asked for.
        tokens: mean actual prompt length.
        trials: number of trials.
        correct: trials whose answer's first digits equal the key.
        details: per trial ``depth``, ``key``, ``answer`` (decoded greedy continuation), ``correct``.
    """

    length: int
    tokens: float
    trials: int
    correct: int
    details: list[dict]

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-ready)."""
        return asdict(self)


def passkey_retrieval(
    *,
    model,
    tokenizer,
    length: int,
    trials: int = 10,
    seed: int = 0,
    new_tokens: int = 8,
    device: str | torch.device | None = None,
) -> PasskeyResult:
    """Greedy passkey retrieval: ``trials`` prompts with a random 5-digit key at a random depth (uniform in [0, 1];
    seeded, so every model gets the same prompts), each prompt and its answer within ``length`` tokens.

    Args:
        model: an HF ``*ForCausalLM`` supporting a KV cache.
        tokenizer: its tokenizer.
        length: tokens of prompt plus answer (the prompt gets ``length − new_tokens``); at most the model's
            ``max_position_embeddings``.
        trials: number of prompts.
        seed: seed of the keys and depths.
        new_tokens: greedy tokens generated per answer.
        device: where to run; default the model's device.

    Returns:
        A :class:`PasskeyResult`.

    Raises:
        Mha2mlaError: bad arguments or a prompt past the model's context.
    """
    if trials < 1 or new_tokens < 1:
        raise Mha2mlaError(f"passkey trials and new tokens must be at least 1, got {trials=} {new_tokens=}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and length > max_pos:
        raise Mha2mlaError(f"passkey length {length} exceeds the model's max_position_embeddings {max_pos}")
    if device is None:
        device = next(model.parameters()).device
    rng = random.Random(seed)
    details = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(trials):
            key, depth = str(rng.randint(10000, 99999)), rng.random()
            ids, _ = passkey_prompt(tokenizer=tokenizer, length=length - new_tokens, depth=depth, key=key)
            answer = tokenizer.decode(greedy_tokens(model, ids, new_tokens, device), skip_special_tokens=True)
            details.append({"depth": round(depth, 4), "key": key, "answer": answer, "tokens": len(ids),
                            "correct": parse_passkey(answer) == key})
    finally:
        model.train(was_training)
    return PasskeyResult(length=length, tokens=sum(d["tokens"] for d in details) / trials, trials=trials,
                         correct=sum(d["correct"] for d in details), details=details)


def long_context_report(
    *,
    model,
    tokenizer,
    tokens: torch.Tensor | None,
    windows_of: list[int],
    windows: int = 2,
    passkey_lengths: list[int] = list(PASSKEY_LENGTHS),
    trials: int = 10,
    seed: int = 0,
    log=None,
) -> dict:
    """Perplexity by position at each window length and passkey retrieval at each length, as one JSON-ready dict.

    Args:
        model: an HF ``*ForCausalLM``.
        tokenizer: its tokenizer.
        tokens: a 1-D LongTensor of held-out text (at least ``max(windows_of)·windows`` tokens); ``None`` with an
            empty ``windows_of``.
        windows_of: window lengths for :func:`position_perplexity` (may be empty).
        windows: windows per window length.
        passkey_lengths: lengths for :func:`passkey_retrieval` (may be empty).
        trials: passkey trials per length.
        seed: passkey seed.
        log: optional callable taking one progress line.

    Returns:
        ``{"positions": [PositionPerplexity.to_dict(), ...], "passkey": [PasskeyResult.to_dict(), ...]}``.
    """
    out: dict = {"positions": [], "passkey": []}
    for w in windows_of:
        r = position_perplexity(model=model, tokens=tokens, window=w, windows=windows)
        out["positions"].append(r.to_dict())
        if log:
            log(f"window {w}: " + " ".join(f"{b['start']}-{b['end']}:{b['ppl']:.2f}" for b in r.buckets))
    for n in passkey_lengths:
        r = passkey_retrieval(model=model, tokenizer=tokenizer, length=n, trials=trials, seed=seed)
        out["passkey"].append(r.to_dict())
        if log:
            log(f"passkey {n}: {r.correct}/{r.trials}")
    return out


def evaluate_long_context(
    *,
    model,
    tokenizer,
    texts: list[str] | None,
    max_len: int = 8192,
    windows: int = 2,
    trials: int = 10,
    seed: int = 0,
    log=None,
) -> dict:
    """What ``mha2mla eval --long-context`` reports for one model: perplexity by position on windows of
    ``min(max_position_embeddings, max_len)`` tokens of ``texts``, and passkey retrieval at each length of
    :data:`PASSKEY_LENGTHS` up to that window (see :func:`long_context_report`).

    Args:
        model: an HF ``*ForCausalLM``.
        tokenizer: its tokenizer.
        texts: held-out documents for the perplexity windows; ``None``: passkey retrieval only.
        max_len: cap on the window and the passkey lengths.
        windows: perplexity windows.
        trials: passkey trials per length.
        seed: passkey seed.
        log: optional callable taking one progress line.

    Returns:
        :func:`long_context_report`'s dict, plus ``window``.
    """
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None) or max_len
    window = min(int(max_pos), max_len)
    tokens = pack_tokens(tokenizer, texts, max_tokens=window * windows) if texts is not None else None
    out = long_context_report(model=model, tokenizer=tokenizer, tokens=tokens,
                              windows_of=[window] if texts is not None else [], windows=windows,
                              passkey_lengths=[n for n in PASSKEY_LENGTHS if n <= window], trials=trials, seed=seed,
                              log=log)
    return {"window": window, **out}


def render_long_context(results: dict[str, dict]) -> str:
    """Markdown tables of long-context results per model: perplexity by position (and the ratio to the first model,
    the source) and passkey retrieval.

    Args:
        results: model label → ``{"positions": [PositionPerplexity.to_dict(), ...], "passkey": [PasskeyResult.to_dict(), ...]}``
            (either list may be empty); the first label is the reference for the ratios.
    """
    lines: list[str] = []
    labels = list(results)
    ref = labels[0] if labels else None
    windows = sorted({p["window"] for r in results.values() for p in r.get("positions", [])})
    for win in windows:
        rows = {lab: next((p for p in results[lab].get("positions", []) if p["window"] == win), None) for lab in labels}
        spans = [(b["start"], b["end"]) for b in next(p for p in rows.values() if p)["buckets"]]
        head = [f"{a}–{b}" for a, b in spans]
        n_win = next(p for p in rows.values() if p)["windows"]
        lines += [f"Perplexity by position, windows of {win} tokens ({n_win} windows):", "",
                  "| model | " + " | ".join(head) + " | all |", "|---" * (len(head) + 2) + "|"]
        for lab, p in rows.items():
            if p is None:
                continue
            cells = [f"{b['ppl']:.2f}" for b in p["buckets"]] + [f"{p['ppl']:.2f}"]
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
            if lab != ref and rows.get(ref):
                r = rows[ref]
                ratio = [f"{b['ppl'] / rb['ppl']:.2f}" for b, rb in zip(p["buckets"], r["buckets"])]
                lines.append(f"| ↳ ratio to {ref} | " + " | ".join(ratio) + f" | {p['ppl'] / r['ppl']:.2f} |")
        lines.append("")
    lengths = sorted({k["length"] for r in results.values() for k in r.get("passkey", [])})
    if lengths:
        lines += ["Passkey retrieval (correct / trials):", "",
                  "| model | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for lab in labels:
            by = {k["length"]: k for k in results[lab].get("passkey", [])}
            cells = [f"{by[n]['correct']}/{by[n]['trials']}" if n in by else "–" for n in lengths]
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
