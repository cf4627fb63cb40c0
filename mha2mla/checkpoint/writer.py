"""Writing an output directory safely: a temporary sibling renamed into place, and streamed safetensors shards."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from contextlib import contextmanager
from typing import Iterator

import torch
from safetensors.torch import save_file

from mha2mla.errors import Mha2mlaError

__all__ = ["atomic_output_dir", "check_output_path", "is_our_output", "ShardWriter", "parse_size", "shard_bytes"]

_TMP_TAG = ".mha2mla-tmp-"


def parse_size(size: str | int) -> int:
    """``"2GB"`` / ``"500MB"`` / ``1000000`` → bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise Mha2mlaError(f"size {size!r} is not understood; write e.g. 2GB or 500MB") from None


def shard_bytes(size: str | int) -> int:
    """``--max-shard-size`` in bytes, which must be positive."""
    n = parse_size(size)
    if n <= 0:
        raise Mha2mlaError(f"--max-shard-size must be a positive size such as 500MB, got {size!r}")
    return n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: str, base: str) -> None:
    """Remove temporary siblings left by killed runs (their process is gone)."""
    prefix = f".{base}{_TMP_TAG}"
    for n in os.listdir(parent):
        if n.startswith(prefix):
            try:
                pid = int(n[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(os.path.join(parent, n), ignore_errors=True)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs (main thread only)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def is_our_output(path: str) -> bool:
    """Whether ``path`` looks like a directory this tool wrote: a conversion or heal output (``mha2mla.json``), or a
    heal run's working state (``checkpoints/step-N/trainer_state.json`` or ``.heal-data``)."""
    if os.path.isfile(os.path.join(path, "mha2mla.json")) or os.path.isdir(os.path.join(path, ".heal-data")):
        return True
    ckpts = os.path.join(path, "checkpoints")
    return os.path.isdir(ckpts) and any(
        os.path.isfile(os.path.join(ckpts, n, "trainer_state.json")) for n in os.listdir(ckpts))


def _inside(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies below it (both real, absolute paths)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_path(output: str | os.PathLike, *, force: bool = False, protect: tuple = (),
                      flag: str = "--output") -> str:
    """Refuse an output path that a run could not safely create or replace; return it as an absolute path.

    The one guard of every command that deletes or replaces a directory. It refuses, whatever ``force`` says: an
    empty path, a filesystem root, the home directory, the working directory or a directory containing it, a path
    equal to, inside, or containing a ``protect``-ed one (the source model, a teacher, the data), a file, and a
    non-empty directory that this tool did not write (see :func:`is_our_output`). An existing output of ours is
    replaced only with ``force``; an empty directory is used as it is.

    Args:
        output: the directory a command will create or replace.
        force: the user asked to replace an existing output.
        protect: paths that must survive the command (compared after resolving links), each a path or a
            ``(label, path)`` pair; the label (default ``source``) names it in the message.
        flag: how the user named ``output``, for the messages.

    Returns:
        ``output`` as an absolute path.

    Raises:
        Mha2mlaError: the path is refused; nothing on disk was changed.
    """
    text = os.fspath(output)
    if not text.strip():
        raise Mha2mlaError(f"{flag} is empty; give the path of a new directory")
    out = os.path.abspath(text)
    real = os.path.realpath(out)
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    if os.path.dirname(real) == real:
        raise Mha2mlaError(f"{flag} {text} is a filesystem root; give the path of a new directory")
    if _inside(cwd, real):
        what = "the working directory" if cwd == real else f"a parent of the working directory {cwd}"
        raise Mha2mlaError(f"{flag} {text} is {what}; give the path of a new directory")
    if _inside(home, real):
        raise Mha2mlaError(f"{flag} {text} is the home directory or contains it; give the path of a new directory")
    for p in protect:
        label, p = p if isinstance(p, tuple) else ("source", p)
        if not p:
            continue
        pr = os.path.realpath(os.path.abspath(os.fspath(p)))
        if _inside(real, pr):
            raise Mha2mlaError(f"{flag} {text} is inside the {label} directory {pr}; choose a directory elsewhere")
        if _inside(pr, real):
            raise Mha2mlaError(f"{flag} {text} contains the {label} {pr}; choose a directory of its own")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise Mha2mlaError(f"{flag} {text} exists and is a file; choose another path")
    if os.path.isdir(out) and os.listdir(out):
        if not is_our_output(out):
            raise Mha2mlaError(f"{flag} {text} is a non-empty directory that mha2mla did not write (no mha2mla.json); "
                               "refusing to replace it: choose a new path")
        if not force:
            raise Mha2mlaError(f"output {text} already exists; pass --force to replace it")
    return out


@contextmanager
def atomic_output_dir(output: str, *, force: bool = False, protect: tuple = ()) -> Iterator[str]:
    """Yield a temporary directory beside ``output`` that is renamed to ``output`` only if the block succeeds.

    Args:
        output: final directory.
        force: replace an existing ``output`` (it is removed only after the new one is complete).
        protect: directories that ``output`` must not be, nor lie inside (e.g. the source model).

    Raises:
        Mha2mlaError: ``output`` is refused by :func:`check_output_path` (checked again here, at the start).
    """
    out = check_output_path(output, force=force, protect=protect)
    parent, base = os.path.split(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise Mha2mlaError(f"cannot create {parent} ({e.strerror})") from None
    _remove_stale(parent, base)
    tmp = os.path.join(parent, f".{base}{_TMP_TAG}{os.getpid()}")
    try:
        with _terminate_as_interrupt():  # before tmp exists: a signal in between must not leave it behind
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            yield tmp
            if os.path.isdir(out):
                old = os.path.join(parent, f".{base}{_TMP_TAG}{os.getpid()}-old")
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise Mha2mlaError(f"no space left on the device while writing {output}; nothing was written") from None
        raise Mha2mlaError(f"cannot write {output} ({e.strerror or e}); nothing was written") from None
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if "No space left on device" in str(e):  # safetensors' own error type, not an OSError
            raise Mha2mlaError(f"no space left on the device while writing {output}; nothing was written") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Collect tensors and write them as safetensors shards of at most ``max_shard_bytes`` as they fill.

    Shards are named ``model-XXXXX-of-NNNNN.safetensors`` once the count is known (at :meth:`close`), with a
    ``model.safetensors.index.json``. Output is byte-identical for identical inputs.
    """

    def __init__(self, directory: str, *, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self._total += size
        if self._pending_bytes > self.max_shard_bytes:  # full: the next add would flush it anyway (same shards)
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        idx = len(self._shards)
        save_file(self._pending, os.path.join(self.directory, f"shard-{idx:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(sorted(self._pending))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[str]:
        """Flush, name the shards, write the index. Returns the shard file names."""
        self.flush()
        n = len(self._shards)
        names, weight_map = [], {}
        for i, tensors in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.directory, f"shard-{i:05d}.tmp"), os.path.join(self.directory, final))
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        return names
