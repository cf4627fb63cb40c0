"""glibc's allocator kept from returning freed memory (:mod:`mha2mla.allocator`)."""

from __future__ import annotations

import pytest


def test_keep_freed_memory_is_idempotent():
    import platform

    from mha2mla.allocator import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    assert first == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")  # elsewhere a no-op


def test_release_freed_memory_gives_back_a_large_freed_block():
    """After a large tensor is freed, trimming brings the process's resident memory back down (glibc only)."""
    import platform
    import subprocess
    import sys

    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("malloc_trim is glibc's: a no-op elsewhere (the test above checks that)")
    script = (
        "import torch\n"
        "from mha2mla.allocator import keep_freed_memory, release_freed_memory\n"
        "def rss():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) * 1024\n"
        "keep_freed_memory()\n"
        "x = torch.ones(2**29 // 4)  # 512 MiB, touched\n"
        "before = rss(); del x\n"
        "kept = rss(); release_freed_memory(above=2**28); after = rss()\n"
        "print(before - kept, kept - after)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    kept_after_free, released = int(out[0]), int(out[1])
    assert kept_after_free < 2**26  # freed but kept by the heap (keep_freed_memory)
    assert released > 2**28  # given back by release_freed_memory
