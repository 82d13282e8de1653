"""Live loss curve (train and validation) drawn with matplotlib's Qt canvas."""

from __future__ import annotations

import time

from qtpy.QtWidgets import QVBoxLayout, QWidget


class LossPlot(QWidget):
    """A small matplotlib canvas with a train and a validation loss curve.

    Redraws at most every :attr:`min_interval_s` seconds so a fast training
    loop cannot flood the GUI thread.
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
        for spine in ax.spines.values():
            spine.set_color("#aaaaaa")
        ax.tick_params(colors="#dddddd", labelsize=7)
        ax.set_xlabel("epoch", color="#dddddd", fontsize=8)
        ax.set_ylabel("loss", color="#dddddd", fontsize=8)
        (self.train_line,) = ax.plot([], [], color="#4fc3f7", lw=1.2, label="train")
        (self.val_line,) = ax.plot([], [], "o-", color="#ffb74d", lw=1.2, ms=3, label="validation")
        # Above the axes, not over the curves (a falling loss curve runs through "upper right").
        legend = ax.legend(
            fontsize=7,
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            ncol=2,
            frameon=False,
            borderaxespad=0.2,
        )
        for text in legend.get_texts():
            text.set_color("#dddddd")
        self.train: tuple[list[float], list[float]] = ([], [])
        self.val: tuple[list[float], list[float]] = ([], [])
        self._last_draw = 0.0

    def clear(self) -> None:
        """Forget all points."""
        self.train = ([], [])
        self.val = ([], [])
        self.redraw(force=True)

    def add(self, kind: str, x: float, loss: float) -> None:
        """Add a point to the ``"train"`` or ``"val"`` curve (x in epochs)."""
        xs, ys = self.train if kind == "train" else self.val
        xs.append(float(x))
        ys.append(float(loss))
        self.redraw(force=kind == "val")

    def redraw(self, force: bool = False) -> None:
        """Update the lines and axes (throttled unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        self.train_line.set_data(*self.train)
        self.val_line.set_data(*self.val)
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()
