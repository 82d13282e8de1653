"""Progress and cancellation protocol shared by the core and the widgets.

Long-running core functions take ``progress: ProgressCallback | None``. They
call ``progress(done, total, message)`` between units of work (tiles, windows,
training steps). A caller that wants to cancel raises :class:`Cancelled` from
inside the callback (the widgets do this when Stop is pressed); the core lets it
propagate, so no partial result is returned. This keeps the core free of Qt
while giving widgets a working Stop button (the micro-sam ``pbar_update``
pattern, with cancellation added).
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[int, int, str], None]


class Cancelled(Exception):
    """Raised from a progress callback to stop a long-running core function."""


def report(progress: ProgressCallback | None, done: int, total: int, message: str = "") -> None:
    """Call ``progress(done, total, message)`` if a callback was given."""
    if progress is not None:
        progress(int(done), int(total), message)
