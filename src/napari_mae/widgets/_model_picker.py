"""Model and device choosers shared by the Reconstruction and Segmentation widgets."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QLineEdit, QPushButton, QWidget

from ._registry import registry

#: Combo entry that switches to the checkpoint path box.
CHECKPOINT_TEXT = "checkpoint file..."

#: Device choices passed to the core as strings.
DEVICES = ("auto", "cuda", "mps", "cpu")


class ModelPicker(QWidget):
    """Bundled models, trained models (kept across restarts), or a checkpoint file.

    Parameters
    ----------
    report_choice : bool
        Tell the registry which model is chosen (the Reconstruction widget's
        picker: the Masking widget follows its patch size).
    """

    def __init__(self, parent=None, report_choice: bool = False) -> None:
        super().__init__(parent)
        self._report_choice = report_choice
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.combo = QComboBox()
        self.combo.setToolTip(
            "The trained network: 'default-2d' / 'default-3d' come with the plugin; models you "
            "trained or fine-tuned are listed too (also after a restart), or pick a checkpoint file"
        )
        self.path = QLineEdit()
        self.path.setPlaceholderText("path/to/checkpoint.pt")
        self.path.setToolTip("A checkpoint (.pt) written by napari-mae training")
        self.browse = QPushButton("...")
        self.browse.setMaximumWidth(30)
        self.browse.setToolTip("Choose a checkpoint file")
        self.browse.clicked.connect(self._browse)
        self.remove = QPushButton("remove")
        self.remove.setToolTip("Remove this trained model from the list (its checkpoint file is kept)")
        self.remove.clicked.connect(self.remove_current)
        lay.addWidget(self.combo, 1)
        lay.addWidget(self.path, 1)
        lay.addWidget(self.browse)
        lay.addWidget(self.remove)
        self.combo.currentTextChanged.connect(self._update_visibility)
        registry.models_changed.connect(self.refresh)
        self.destroyed.connect(lambda *_: registry.models_changed.disconnect(self.refresh))
        self.refresh()

    def remove_current(self) -> None:
        """Take the chosen trained model off the list (and the registry file)."""
        name = self.combo.currentText()
        if name in registry.models:
            registry.remove_model(name)

    def refresh(self) -> None:
        """List bundled and trained models; a newly trained one becomes current."""
        current = self.combo.currentText()
        names = registry.model_names()
        trained = [n for n in names if n in registry.models]
        # Models listed from earlier sessions are not "new": a fresh picker starts on default-2d.
        new = [n for n in trained if self.combo.findText(n) < 0] if self.combo.count() else []
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItems([*names, CHECKPOINT_TEXT])
        pick = new[0] if new and self.combo.count() > 1 and current != CHECKPOINT_TEXT else current
        idx = self.combo.findText(pick)
        self.combo.setCurrentIndex(max(idx, 0))
        self.combo.blockSignals(False)
        self._update_visibility()

    def _update_visibility(self, *_) -> None:
        name = self.combo.currentText()
        use_path = name == CHECKPOINT_TEXT
        self.path.setVisible(use_path)
        self.browse.setVisible(use_path)
        self.remove.setVisible(name in registry.models)
        if self._report_choice:
            registry.choose(None if use_path else name)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint", "", "Checkpoints (*.pt *.pth *.ckpt)")
        if path:
            self.path.setText(path)

    def set_default_for_dims(self, spatial_dims: int) -> None:
        """Pick ``default-2d`` or ``default-3d`` if a bundled model is chosen."""
        if self.combo.currentText() in ("default-2d", "default-3d"):
            self.combo.setCurrentText(f"default-{spatial_dims}d")

    def spec(self):
        """What to pass to :func:`napari_mae.models.mae.load_model`.

        Raises
        ------
        ValueError
            If a checkpoint file is chosen but no path given.
        """
        name = self.combo.currentText()
        if name == CHECKPOINT_TEXT:
            path = self.path.text().strip()
            if not path:
                raise ValueError("Choose a checkpoint file (or a bundled model).")
            return path
        return registry.resolve(name)

    def describe(self) -> str:
        """Short name of the chosen model, for layer names and messages."""
        name = self.combo.currentText()
        return self.path.text().strip() if name == CHECKPOINT_TEXT else name


def device_combo() -> QComboBox:
    """A combo of :data:`DEVICES`."""
    combo = QComboBox()
    combo.addItems(DEVICES)
    combo.setToolTip(
        "Where the network runs: 'auto' takes an NVIDIA GPU (cuda) or Apple GPU (mps) when "
        "there is one, else the processor (cpu)"
    )
    return combo
