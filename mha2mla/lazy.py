"""Lazy package exports: a package names its public functions without importing their modules (and torch) until
one is used, so the command line starts fast and importing one module does not import them all."""

from __future__ import annotations

import importlib

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, where: dict[str, str]):
    """A module-level ``__getattr__`` for ``package`` that imports ``where[name]`` and returns its ``name``."""

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
