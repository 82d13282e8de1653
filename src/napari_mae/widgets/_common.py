"""Plumbing shared by the dock widgets: jobs, notifications, layer pickers.

Every widget follows the same path (see ``docs/architecture.md``):

1. on the GUI thread, :func:`~._layers.prepare_image` reads a layer and its
   ``scale`` into a :class:`~._layers.PreparedImage` (no pixel data is computed
   yet, so dask and multiscale layers stay lazy);
2. :class:`Job` runs ONE core function in a superqt worker thread, with a
   napari ``progress`` bar and a Stop that raises
   :class:`napari_mae._progress.Cancelled` from the progress callback;
3. the result comes back on the GUI thread, where layers are added.

Nothing here imports torch: the core modules are imported inside the worker
functions, so napari starts fast.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Qt, QThreadPool, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker

from napari_mae._progress import Cancelled

from ._layers import TIME_MODES, PreparedImage, UserInputError, prepare_image

# --------------------------------------------------------------------------- jobs


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progressed = Signal(int, int, str)


class Job:
    """One core call in a worker thread, with progress and a working Stop.

    Parameters
    ----------
    func : callable
        ``func(progress)`` or a generator function ``func(progress)``; it runs
        in a worker thread and must only touch numpy arrays, never layers.
        ``progress(done, total, message)`` is the core's progress callback: it
        raises :class:`~napari_mae._progress.Cancelled` once Stop was pressed.
    description : str
        Label of the napari progress bar.
    on_returned : callable
        Called on the GUI thread with ``func``'s return value.
    on_yielded : callable, optional
        Called on the GUI thread with each value a generator yields.
    on_progress : callable, optional
        Called on the GUI thread with ``(done, total, message)``.
    on_error : callable
        Called on the GUI thread with a message for the user.
    on_finished : callable, optional
        Called on the GUI thread with this job at the end, whatever happened.

    Notes
    -----
    Stop releases the widget at once (:attr:`running` becomes False and no
    result is shown), while the worker thread ends at the core's next progress
    report, where :class:`~napari_mae._progress.Cancelled` is raised;
    :attr:`thread_running` tells when it has.
    """

    #: Seconds between forwarded progress reports (the last one always goes).
    throttle_s = 0.05

    def __init__(
        self,
        func: Callable,
        *,
        description: str,
        on_returned: Callable[[Any], None],
        on_error: Callable[[str], None],
        on_yielded: Callable[[Any], None] | None = None,
        on_progress: Callable[[int, int, str], None] | None = None,
        on_finished: Callable[[Job], None] | None = None,
    ) -> None:
        from napari.utils import progress as napari_progress

        self.stop_event = threading.Event()
        self.cancelled = False
        self.running = True
        self.thread_running = True
        self._on_progress = on_progress
        self._on_error = on_error
        self._on_finished = on_finished
        self._last_emit = 0.0
        self._relay = _Relay()
        self._relay.progressed.connect(self._progressed)
        self._pbar = napari_progress(total=0, desc=description)
        self.worker = create_worker(
            func,
            self.progress,
            _start_thread=False,
            _connect={"errored": self._errored, "finished": self._finished},
        )
        self._on_returned = on_returned
        self.worker.returned.connect(self._returned)
        self.worker.warned.connect(lambda w: show_warning(str(w[0])))
        if on_yielded is not None and hasattr(self.worker, "yielded"):
            self.worker.yielded.connect(lambda value: self.running and on_yielded(value))

    def start(self) -> Job:
        """Start the worker thread (now, even if other jobs fill Qt's thread pool)."""
        pool = QThreadPool.globalInstance()
        if pool.activeThreadCount() >= pool.maxThreadCount():
            # The pool holds one thread per core: on 2 cores a long training run
            # and a stopped job still finishing would queue any new job behind them.
            pool.setMaxThreadCount(pool.activeThreadCount() + 1)
        self.worker.start()
        return self

    def progress(self, done: int, total: int, message: str = "") -> None:
        """The core's progress callback (worker thread); raises ``Cancelled`` after Stop."""
        if self.stop_event.is_set():
            raise Cancelled("stopped by the user")
        now = time.monotonic()
        if now - self._last_emit >= self.throttle_s or done >= total:
            self._last_emit = now
            self._relay.progressed.emit(int(done), int(total), str(message))

    def stop(self) -> None:
        """Stop: release the widget now; the next progress report raises ``Cancelled``."""
        self.cancelled = True
        self.stop_event.set()
        self.worker.quit()
        self._end()

    # GUI-thread slots
    def _returned(self, result) -> None:
        if not self.running:
            return
        try:
            self._on_returned(result)
        except Exception as exc:  # shown to the user; the widget stays usable
            self._on_error(f"Could not show the result: {type(exc).__name__}: {exc}")

    def _progressed(self, done: int, total: int, message: str) -> None:
        if not self.running:
            return
        if self._on_progress is not None:
            self._on_progress(done, total, message)
        # napari's progress may process events (and so end this job) re-entrantly: update it last.
        if total and self._pbar.total != total:
            self._pbar.total = total
        if self.running and done != self._pbar.n:
            self._pbar.update(done - self._pbar.n)
        if self.running and message:
            self._pbar.set_description(message)

    def _errored(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled) or self.cancelled:
            return
        if isinstance(exc, (UserInputError, ValueError, FileNotFoundError, MemoryError)):
            self._on_error(str(exc))
        else:
            self._on_error(f"{type(exc).__name__}: {exc}")

    def _finished(self) -> None:
        self.thread_running = False
        self._end()

    def _end(self) -> None:
        if not self.running:
            return
        self.running = False
        self._pbar.close()
        if self._on_finished is not None:
            self._on_finished(self)


@contextlib.contextmanager
def torch_threads_leaving_a_core():
    """In a worker thread: let torch use all cores but one, so the GUI thread keeps one.

    torch's OpenMP threads spin between operations; on a 2-core machine they
    would otherwise starve the Qt event loop. The thread count is restored on
    exit. Imports torch, so call it only inside worker functions.
    """
    import os

    import torch

    before = torch.get_num_threads()
    cores = os.cpu_count() or 1
    if cores > 1 and before >= cores:
        torch.set_num_threads(cores - 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- widgets


def magic_field(value, widget_type: str | None = None, *, tooltip: str, **options):
    """A magicgui value widget (``magicgui.widgets.create_widget``) with a tooltip.

    Parameters
    ----------
    value : object
        Initial value; its type chooses the widget unless ``widget_type`` does.
    widget_type : str, optional
        A magicgui widget name (``"FloatSlider"``, ...).
    tooltip : str
        Shown on the whole field, also over the slider's read-out box.
    **options
        Widget options (``min``, ``max``, ``step``, ``choices``, ...).

    Returns
    -------
    magicgui.widgets.ValueWidget
        Read and set through ``.value``; ``.native`` is the Qt widget to place.
    """
    from magicgui.widgets import create_widget

    widget = create_widget(value=value, widget_type=widget_type, options={**options, "tooltip": tooltip})
    widget.native.setToolTip(tooltip)
    return widget


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of some types, kept in sync.

    Hand-built rather than magicgui's layer-annotated ComboBox: magicgui fills
    its choices only when napari calls ``reset_choices`` on a docked magicgui
    ``Container`` (our dock widgets are QWidgets with a job area under the
    form), and here the choice also follows renames, keeps "none" as an
    explicit first entry that is never picked silently, and filters by a
    predicate (e.g. only mask layers made by the Masking widget).

    Parameters
    ----------
    viewer : napari.Viewer
    layer_types : tuple of type
        Layer classes listed.
    none_text : str, optional
        If given, a first entry meaning "no layer".
    predicate : callable, optional
        Extra filter on layers.
    avoid : callable, optional
        Layers listed but not chosen by default (e.g. the Masking widget's
        masked output, where its original is there); the user may still pick them.
    """

    def __init__(
        self, viewer, layer_types: tuple, none_text: str | None = None, predicate=None, avoid=None
    ) -> None:
        super().__init__()
        self._viewer = viewer
        self._types = layer_types
        self._none_text = none_text
        self._predicate = predicate
        self._avoid = avoid or (lambda layer: False)
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        events = viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved, events.changed):
            emitter.connect(self.refresh)
        self.destroyed.connect(lambda *_: _disconnect(events, self.refresh))
        self.refresh()

    def layers(self) -> list:
        """The layers listed, top of the layer list first."""
        found = [ly for ly in self._viewer.layers if isinstance(ly, self._types)]
        if self._predicate is not None:
            found = [ly for ly in found if self._predicate(ly)]
        return found[::-1]

    def refresh(self, event=None) -> None:
        """Re-list the layers, keeping the current choice if it still exists."""
        previous = current = self.currentText()
        layers = self.layers()
        names = [ly.name for ly in layers]
        inserted = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        if inserted is not None and self._avoid(inserted):
            inserted = None
        if current not in names and self._none_text is None:
            preferred = [ly.name for ly in layers if not self._avoid(ly)]
            current = preferred[0] if preferred else current
        for ly in self.layers():  # follow renames
            with _suppress_runtime():
                ly.events.name.connect(self.refresh)
        self.blockSignals(True)
        self.clear()
        if self._none_text is not None:
            self.addItem(self._none_text)
        self.addItems(names)
        if (
            inserted is not None
            and inserted.name in names
            and self._none_text is None
            and current not in names
        ):
            current = inserted.name  # follow a new layer only when nothing valid was chosen
        idx = self.findText(current)
        self.setCurrentIndex(idx if idx >= 0 else 0)
        self.blockSignals(False)
        if self.currentText() != previous:
            self.currentIndexChanged.emit(self.currentIndex())

    def value(self):
        """The chosen layer, or None."""
        name = self.currentText()
        for ly in self._viewer.layers:
            if ly.name == name and isinstance(ly, self._types):
                return ly
        return None

    def set_value(self, layer) -> None:
        """Select ``layer`` (or its name)."""
        idx = self.findText(getattr(layer, "name", layer))
        if idx >= 0:
            self.setCurrentIndex(idx)


def _suppress_runtime():
    return contextlib.suppress(RuntimeError, TypeError, ValueError)


def _disconnect(events, callback) -> None:
    for name in ("inserted", "removed", "moved", "changed"):
        with _suppress_runtime():
            getattr(events, name).disconnect(callback)


class JobWidget(QWidget):
    """Base of the dock widgets: Run/Stop buttons, a progress bar and a status line.

    Subclasses build their form into ``self.form_layout`` (a ``QVBoxLayout``
    above the buttons) and call :meth:`start_job`.
    """

    def __init__(self, napari_viewer, run_text: str = "Run") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.job: Job | None = None
        self._job_layers: list = []
        outer = QVBoxLayout(self)
        self.form_layout = QVBoxLayout()
        outer.addLayout(self.form_layout)
        buttons = QHBoxLayout()
        self.run_button = QPushButton(run_text)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.run_button.clicked.connect(self.run)
        self.stop_button.clicked.connect(self.stop)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        self.button_layout = buttons
        outer.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setFormat("idle")
        self.progress_bar.setValue(0)
        outer.addWidget(self.progress_bar)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        outer.addWidget(self.status)
        self.results_layout = QVBoxLayout()
        outer.addLayout(self.results_layout)
        outer.addStretch(1)
        layers_events = napari_viewer.layers.events
        layers_events.removed.connect(self._layer_removed)
        self.destroyed.connect(lambda *_: _disconnect_one(layers_events.removed, self._layer_removed))
        self.stop_button.setToolTip("Stop the running job (shortcut Shift-X); nothing is added to the viewer")
        from ._shortcuts import register

        register(napari_viewer, self)

    # ----------------------------------------------------------------- notifications
    def notify_error(self, message: str) -> None:
        """Show ``message`` as a napari error notification and in the status line."""
        self.status.setText(f"Error: {message}")
        show_error(message)

    def notify_info(self, message: str) -> None:
        """Show ``message`` as a napari info notification and in the status line."""
        self.status.setText(message)
        show_info(message)

    def notify_notes(self, notes: Iterable[str]) -> None:
        """Show the notes of a :class:`PreparedImage` as one warning."""
        notes = [n for n in notes if n]
        if notes:
            show_warning(" ".join(notes))

    # ----------------------------------------------------------------- jobs
    @property
    def busy(self) -> bool:
        """Whether a job is running."""
        return self.job is not None and self.job.running

    def run(self) -> None:  # pragma: no cover - overridden
        """Start the widget's job (subclasses)."""
        raise NotImplementedError

    def start_job(self, func, *, description: str, on_returned, on_yielded=None, layers=()) -> Job | None:
        """Run ``func(progress)`` in a worker; see :class:`Job`.

        ``layers`` are the input layers: removing one stops the job.
        """
        if self.busy:
            self.notify_error("A job is already running; press Stop first.")
            return None
        self._job_layers = list(layers)
        self.run_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.progress_bar.setRange(0, 0)  # busy until the first report
        self.progress_bar.setFormat(description)
        self.status.setText(f"{description}...")
        self._t0 = time.monotonic()
        self.job = Job(
            func,
            description=description,
            on_returned=on_returned,
            on_yielded=on_yielded,
            on_error=self.notify_error,
            on_progress=self._on_progress,
            on_finished=self._on_finished,
        )
        return self.job.start()

    def stop(self) -> None:
        """Stop the running job (it ends at its next progress report)."""
        if self.busy:
            self.job.stop()

    def closeEvent(self, event) -> None:
        """Stop a running job when the dock widget is closed."""
        self.stop()
        super().closeEvent(event)

    def _on_progress(self, done: int, total: int, message: str) -> None:
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(min(done, total))
            self.progress_bar.setFormat(f"{message} %v/%m" if message else "%v/%m")

    def _on_finished(self, job: Job) -> None:
        if job is not self.job:  # a stopped job's thread ending after a new job started
            return
        self.run_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0 if job.cancelled else 1)
        if job.cancelled:
            self.progress_bar.setFormat("stopped")
            self.status.setText("Stopped.")
            show_info("Stopped.")
        else:
            self.progress_bar.setFormat(f"done in {time.monotonic() - self._t0:.1f} s")
        self._job_layers = []

    def _layer_removed(self, event) -> None:
        layer = event.value
        if self.busy and any(layer is ly or layer == ly for ly in self._job_layers):
            self.job.stop()
            self.notify_error(f"Layer '{layer.name}' was removed while in use; the job was stopped.")


class ImageJobWidget(JobWidget):
    """A :class:`JobWidget` whose form has an image choice (``self.image``), a channel
    choice (``self.channel``) and a 4D-input choice (``self.time_mode``), set by the subclass.
    """

    def prepared_image(self, *, for_run: bool = True) -> PreparedImage:
        """The chosen image layer as :func:`._layers.prepare_image` frames (lazy).

        Parameters
        ----------
        for_run : bool
            Apply the widget's 4D-input choice (a run); False: the first choice, which is
            all a form update needs (the spatial dimensions, spacing).

        Raises
        ------
        UserInputError, ValueError
            From :func:`._layers.prepare_image`: no layer, a bad channel axis.
        """
        return prepare_image(
            self.image.value(),
            self.viewer,
            channel_axis=parse_channel_axis(self.channel.currentText()),
            time_mode=self.time_mode.currentText() if for_run else TIME_MODES[0],
        )


def _disconnect_one(emitter, callback) -> None:
    with _suppress_runtime():
        emitter.disconnect(callback)


#: Channel-axis choices: detect, none, or an axis of the layer data.
CHANNEL_CHOICES = ("auto", "none", "0", "1", "2", "3", "last")


def channel_axis_combo() -> QComboBox:
    """A combo of :data:`CHANNEL_CHOICES`."""
    combo = QComboBox()
    combo.addItems(CHANNEL_CHOICES)
    combo.setToolTip(
        "Axis of the layer data that holds channels. 'auto' uses the RGB axis, or a short (2-6) "
        "first or last axis."
    )
    return combo


def parse_channel_axis(text: str) -> int | str | None:
    """Turn a :data:`CHANNEL_CHOICES` entry into ``prepare_image``'s ``channel_axis``."""
    return {"auto": "auto", "none": None, "last": -1}.get(text, int(text) if text.isdigit() else "auto")


def time_mode_combo() -> QComboBox:
    """A combo of :data:`TIME_MODES` (used for 4D layers)."""
    combo = QComboBox()
    combo.addItems(TIME_MODES)
    combo.setToolTip("For 4D (T, Z, Y, X) layers: process the time point shown, or every time point.")
    return combo
