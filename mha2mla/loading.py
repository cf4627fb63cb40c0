"""Loading Hugging Face models and tokenizers for the commands: quietly, and with one-line errors.

transformers prints a progress bar per model load and a multi-line load report on stderr; a command of this tool
shows its own progress and reports problems as one ``error:`` line, so loads run inside :func:`quiet_loading`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

from mha2mla.errors import Mha2mlaError

__all__ = ["quiet_loading", "load_tokenizer", "check_device"]


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No transformers progress bars, warnings or load reports inside the block (restored after it)."""
    import transformers.utils.logging as tlog

    bars, level = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


# Files of which at least one makes a directory's tokenizer loadable.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tokenizer.model.v3")


def load_tokenizer(path: str, *, what: str = "model", gguf_file: str | None = None, vocab_size: int | None = None):
    """The tokenizer of a model directory (or of a ``.gguf`` file in it), checked against the model's vocabulary.

    Args:
        path: the model directory.
        what: how the messages name the model (``source``, ``model``, ``teacher``...).
        gguf_file: a ``.gguf`` file name inside ``path`` to read the tokenizer from.
        vocab_size: the model's number of embeddings; a tokenizer with more tokens is refused (its ids would index
            past the embedding).

    Raises:
        Mha2mlaError: no tokenizer files, an unreadable tokenizer, or one larger than the vocabulary.
    """
    from transformers import AutoTokenizer

    if gguf_file is None and not any(os.path.isfile(os.path.join(path, n)) for n in _TOKENIZER_FILES):
        raise Mha2mlaError(f"{what} {path!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:2])}); copy the "
                           "tokenizer files of the model it came from into it")
    try:
        with quiet_loading():
            tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file) if gguf_file else AutoTokenizer.from_pretrained(path)
    except Exception as e:  # corrupt JSON, missing vocab files, unknown tokenizer class...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise Mha2mlaError(f"{what} {path!r}: its tokenizer cannot be loaded ({first})") from None
    if vocab_size is not None and len(tok) > vocab_size:
        raise Mha2mlaError(f"{what} {path!r}: the tokenizer has {len(tok)} tokens but the model only {vocab_size} "
                           "embeddings; the tokenizer does not belong to this model")
    return tok


def check_device(device: str, *, kinds: tuple[str, ...] = ("cpu", "cuda")) -> "torch.device":
    """``device`` as a torch device that this machine has, of one of ``kinds``; else a one-line error."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise Mha2mlaError(f"--device {device!r} is not a torch device; use {', '.join(kinds)} or cuda:N") from None
    if dev.type not in kinds:
        raise Mha2mlaError(f"--device {device!r}: only {' and '.join(kinds)} are supported here")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Mha2mlaError(f"--device {device!r}: torch sees no CUDA device here (torch {torch.__version__}); "
                           "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise Mha2mlaError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise Mha2mlaError(f"--device {device!r}: MPS is not available here; use --device cpu")
    return dev
