"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class Mha2mlaError(Exception):
    """A problem with the user's input or environment, described in one readable line.

    The message names what is wrong (with the offending value) and, where there is one, the fix.
    """


class UnsupportedSourceError(Mha2mlaError):
    """The source checkpoint is of an architecture or layout that mha2mla cannot convert."""
