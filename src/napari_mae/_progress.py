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


def sub_progress(progress: ProgressCallback | None, lo: float, hi: float, total: int = 1000):
    """A callback mapping a step's own ``(done, total)`` onto ``[lo, hi]`` of ``total``.

    Every long step reports through one of these, so that a caller that cancels from the
    callback (the widget's Stop) is heard within a fraction of a second while the overall
    ``done / total`` keeps rising. Returns None when ``progress`` is None.
    """
    if progress is None:
        return None

    def sub(done: int, sub_total: int, message: str = "") -> None:
        frac = min(max(done / sub_total, 0.0), 1.0) if sub_total > 0 else 0.0
        report(progress, int(lo + (hi - lo) * frac), total, message)

    return sub
