"""Live training curves drawn with matplotlib's Qt canvas: loss (train, validation) and a validation metric."""

from __future__ import annotations

import time

from qtpy.QtWidgets import QVBoxLayout, QWidget

TEXT = "#dddddd"


class LossPlot(QWidget):
    """A small matplotlib canvas: train and validation loss, and optionally a metric on a second axis.

    The metric (the segmentation task's validation acc@0.5, in [0, 1]) is drawn
    against the right-hand axis once :meth:`show_metric` names it. The legend
    sits above the axes, never over the curves. Redraws at most every
    :attr:`min_interval_s` seconds so a fast training loop cannot flood the GUI
    thread.
    """

    min_interval_s = 0.25

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 2.0), dpi=100, layout="constrained")
        self.figure.patch.set_facecolor("#262930")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        ax = self.axes = self.figure.add_subplot(1, 1, 1)
        ax.set_facecolor("#262930")
        ax.set_xlabel("epoch", color=TEXT, fontsize=8)
        ax.set_ylabel("loss", color=TEXT, fontsize=8)
        (self.train_line,) = ax.plot([], [], color="#4fc3f7", lw=1.2, label="train")
        (self.val_line,) = ax.plot([], [], "o-", color="#ffb74d", lw=1.2, ms=3, label="validation")
        # The metric's own axis on the right (a fraction in [0, 1], the loss is not).
        self.metric_axes = ax.twinx()
        self.metric_axes.set_ylim(0.0, 1.0)
        (self.metric_line,) = self.metric_axes.plot([], [], "s-", color="#81c784", lw=1.2, ms=3, label="")
        for axes in (ax, self.metric_axes):
            for spine in axes.spines.values():
                spine.set_color("#aaaaaa")
            axes.tick_params(colors=TEXT, labelsize=7)
        self.train: tuple[list[float], list[float]] = ([], [])
        self.val: tuple[list[float], list[float]] = ([], [])
        self.metric: tuple[list[float], list[float]] = ([], [])
        self.metric_label: str | None = None
        self._last_draw = 0.0
        self.show_metric(None)

    def show_metric(self, label: str | None) -> None:
        """Draw a metric curve named ``label`` on the right-hand axis; ``None`` hides it."""
        self.metric_label = label
        self.metric_axes.set_visible(label is not None)
        lines = [self.train_line]
        if label is None:
            lines.append(self.val_line)  # the segmentation task reports no validation loss
        else:
            self.metric_line.set_label(label)
            self.metric_axes.set_ylabel(label, color=TEXT, fontsize=8)
            lines.append(self.metric_line)
        # Above the axes, not over the curves (a falling loss curve runs through "upper right").
        legend = self.axes.legend(
            handles=lines,
            fontsize=7,
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            ncol=len(lines),
            frameon=False,
            borderaxespad=0.2,
        )
        for text in legend.get_texts():
            text.set_color(TEXT)
        self.redraw(force=True)

    def clear(self) -> None:
        """Forget all points."""
        self.train = ([], [])
        self.val = ([], [])
        self.metric = ([], [])
        self.redraw(force=True)

    def add(self, kind: str, x: float, value: float) -> None:
        """Add a point (x in epochs) to the ``"train"``, ``"val"`` (losses) or ``"metric"`` curve."""
        xs, ys = {"train": self.train, "val": self.val, "metric": self.metric}[kind]
        xs.append(float(x))
        ys.append(float(value))
        self.redraw(force=kind != "train")

    def redraw(self, force: bool = False) -> None:
        """Update the lines and axes (throttled unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        self.train_line.set_data(*self.train)
        self.val_line.set_data(*self.val)
        self.metric_line.set_data(*self.metric)
        self.axes.relim()
        self.axes.autoscale_view()  # the metric's axis shares x (twinx); its y stays [0, 1]
        self.canvas.draw_idle()
