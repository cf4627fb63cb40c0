"""Text data for calibration, healing and perplexity: plain text, JSONL, or a Hugging Face dataset.

A data spec is one of
  * a ``.txt`` (or any non-JSONL) file: read whole, as one document;
  * a ``.jsonl`` / ``.json`` file with one JSON object per line, text in ``text_field``;
  * a directory: every ``*.txt`` / ``*.jsonl`` file in it, sorted by name;
  * ``hf:NAME[:CONFIG][@SPLIT]`` or a bare dataset id that is not a local path: loaded with
    ``datasets.load_dataset`` (needs the network or a populated HF cache).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import warnings
from collections.abc import Iterator

import torch

from mha2mla.errors import Mha2mlaError

__all__ = ["load_texts", "pack_tokens", "token_blocks"]


def _no_field(where: str, text_field: str, keys, hint: str | None) -> Mha2mlaError:
    fix = f"pass {hint} to name the text field" if hint else f"put each document's text under {text_field!r}"
    return Mha2mlaError(f"{where}: no {text_field!r} field (found {sorted(map(str, keys))[:8]}); {fix}")


def _text_of(value, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise Mha2mlaError(f"{where}: the {text_field!r} field is a {type(value).__name__}, not a string")
    return value


def _read_jsonl(path: str, text_field: str, hint: str | None) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise Mha2mlaError(f"{path}:{lineno}: not valid JSON ({e.msg}); JSONL needs one object per line") from None
            if not isinstance(row, dict):
                raise Mha2mlaError(f"{path}:{lineno}: a JSON {type(row).__name__}, not an object; JSONL needs one "
                                   f"object per line with the text under {text_field!r}")
            if text_field not in row:
                raise _no_field(f"{path}:{lineno}", text_field, row, hint)
            yield _text_of(row[text_field], f"{path}:{lineno}", text_field)


def _read_file(path: str, text_field: str, hint: str | None) -> list[str]:
    try:
        if path.endswith((".jsonl", ".json")):
            return list(_read_jsonl(path, text_field, hint))
        with open(path, encoding="utf-8") as f:
            return [f.read()]
    except UnicodeDecodeError:
        raise Mha2mlaError(f"{path}: not UTF-8 text; give a .txt or .jsonl file") from None
    except OSError as e:
        raise Mha2mlaError(f"{path}: cannot read ({e.strerror})") from None


def _load_hf_dataset(spec: str, text_field: str, split: str, max_docs: int | None, hint: str | None) -> list[str]:
    name = spec[3:] if spec.startswith("hf:") else spec
    if "@" in name:
        name, split = name.rsplit("@", 1)
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        import datasets  # optional: only for hub datasets
    except ImportError:
        raise Mha2mlaError(f"data {spec!r} is not a local file; loading hub datasets needs `pip install datasets`") from None
    try:
        with _quiet_hub():
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
            rows = iter(ds)
            first = next(rows, None)
        texts = []
        for row in ([] if first is None else itertools.chain([first], rows)):
            if text_field not in row:
                raise _no_field(f"dataset {name!r}", text_field, row, hint)
            texts.append(_text_of(row[text_field], f"dataset {name!r}", text_field))
            if max_docs is not None and len(texts) >= max_docs:
                break
        return texts
    except Mha2mlaError:
        raise
    except Exception as e:  # network, unknown dataset, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Mha2mlaError(f"data {spec!r}: not a local file and could not be loaded as a dataset ({first[:200]})") from None


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Hold back the hub libraries' warnings and progress bars: a failure is reported as one line by the caller."""
    names = ("datasets", "huggingface_hub", "fsspec", "urllib3", "filelock")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def load_texts(spec: str, *, text_field: str = "text", split: str = "train", max_docs: int | None = None,
               field_option: str | None = None) -> list[str]:
    """Load documents from a data spec (see module docstring).

    Args:
        spec: path to a text/JSONL file or directory, or a dataset name.
        text_field: JSON key / dataset column holding the text.
        split: dataset split when ``spec`` names a hub dataset.
        max_docs: stop after this many documents (hub datasets are streamed).
        field_option: the caller's option that names ``text_field`` (e.g. ``--text-field``), for the error message.

    Returns:
        The non-empty documents, in a deterministic order.

    Raises:
        Mha2mlaError: unreadable, empty, or malformed data.
    """
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        files = sorted(os.path.join(spec, n) for n in os.listdir(spec) if n.endswith((".txt", ".jsonl", ".json")))
        if not files:
            raise Mha2mlaError(f"{spec}: directory holds no .txt or .jsonl files")
        texts = [t for p in files for t in _read_file(p, text_field, field_option)]
    elif os.path.exists(spec):
        texts = _read_file(spec, text_field, field_option)
    elif spec.startswith("hf:") or ("/" in spec and not spec.startswith((".", "/")) and not os.path.splitext(spec)[1]):
        texts = _load_hf_dataset(spec, text_field, split, max_docs, field_option)
    else:
        raise Mha2mlaError(f"data {spec!r} does not exist; give a .txt/.jsonl file, a directory, or hf:DATASET")
    texts = [t for t in texts if t.strip()]
    if max_docs is not None:
        texts = texts[:max_docs]
    if not texts:
        raise Mha2mlaError(f"data {spec!r} is empty: no text found")
    return texts


# A long document is first tokenised on a prefix of this many characters per wanted token (English runs ~4-5).
_CHARS_PER_TOKEN = 8


def _encode(tokenizer, text: str, wanted: int | None) -> list[int]:
    """Token ids of ``text``; with ``wanted``, only the first ``wanted`` (and a margin) are guaranteed: a long text is
    tokenised on a prefix cut at whitespace (tokenisers split words there, so the ids before the cut are unchanged),
    doubling the prefix until it is long enough."""
    chars = None if wanted is None else max(wanted, 1) * _CHARS_PER_TOKEN
    while chars is not None and chars < len(text):
        cut = text.rfind(" ", 0, chars)
        ids = tokenizer(text[: cut if cut > 0 else chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= wanted + 64:
            return ids[: wanted + 64]
        chars *= 2
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pack_tokens(tokenizer, texts: list[str], *, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise documents and concatenate them (EOS between documents) into one 1-D LongTensor."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(_encode(tokenizer, t, None if max_tokens is None else max_tokens - len(ids)))
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(tokens: torch.Tensor, *, seq_len: int, n_blocks: int | None = None, seed: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into ``[n, seq_len]`` blocks (dropping the tail).

    With ``seed`` the blocks are drawn in a seeded random order; without, they are taken in order.

    Raises:
        Mha2mlaError: fewer tokens than one block.
    """
    if seq_len <= 0:
        raise Mha2mlaError(f"sequence length must be positive, got {seq_len}")
    n_all = tokens.numel() // seq_len
    if n_all == 0:
        raise Mha2mlaError(f"data has {tokens.numel()} tokens, fewer than one block of {seq_len}; give more text or a shorter length")
    blocks = tokens[: n_all * seq_len].view(n_all, seq_len)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        blocks = blocks[torch.randperm(n_all, generator=g)]
    if n_blocks is not None:
        blocks = blocks[:n_blocks]
    return blocks.contiguous()
