"""The ``mha2mla`` command line: one module per command, each only parsing its options and calling the Python API."""

from mha2mla.cli.main import main

__all__ = ["main"]
