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

__all__ = ["atomic_output_dir", "ShardWriter", "parse_size"]

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


@contextmanager
def atomic_output_dir(output: str, *, force: bool = False, protect: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a temporary directory beside ``output`` that is renamed to ``output`` only if the block succeeds.

    Args:
        output: final directory.
        force: replace an existing ``output`` (it is removed only after the new one is complete).
        protect: directories that ``output`` must not be, nor lie inside (e.g. the source model).

    Raises:
        Mha2mlaError: ``output`` exists without ``force``, is a file, or lies inside a protected directory.
    """
    out = os.path.abspath(output)
    for p in protect:
        p = os.path.abspath(p)
        if out == p or out.startswith(p.rstrip(os.sep) + os.sep):
            raise Mha2mlaError(f"output {output} is inside the source directory {p}; choose a directory elsewhere")
    if os.path.exists(out) and not os.path.isdir(out):
        raise Mha2mlaError(f"output {output} exists and is a file; choose another path")
    if os.path.isdir(out) and not force:
        raise Mha2mlaError(f"output {output} already exists; pass --force to replace it")
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
