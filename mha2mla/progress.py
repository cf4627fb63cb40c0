"""Progress bars for the steps a user waits for, that an error can erase.

A bar iterated directly (``for i in tqdm(...)``) closes itself, bar and newline kept, as soon as an exception leaves
the loop, so a failed command would leave a half-full bar above its ``error:`` line. :class:`Steps` closes its bar only
when the loop completes; after an error the bar is still open, and the CLI erases it before printing the error.
"""

from __future__ import annotations

from collections.abc import Iterator

from tqdm.auto import tqdm

__all__ = ["Steps"]


class Steps:
    """``range(n)`` with a progress bar (``enabled=False``: no bar)."""

    def __init__(self, n: int, *, desc: str, unit: str = "layer", enabled: bool = True) -> None:
        self.n = n
        self.bar = tqdm(total=n, desc=desc, unit=unit, disable=not enabled)

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            yield i
            self.bar.update(1)
        self.bar.close()

    def set_postfix(self, **kw) -> None:
        self.bar.set_postfix(**kw)
