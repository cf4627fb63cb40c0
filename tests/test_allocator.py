"""glibc's allocator kept from returning freed memory (:mod:`mha2mla.allocator`)."""

from __future__ import annotations


def test_keep_freed_memory_is_idempotent():
    import platform

    from mha2mla.allocator import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    assert first == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")  # elsewhere a no-op
