"""The classical pipeline's parameters and the record every segmentation returns.

:class:`SegmentationParams` replaces a mutable module-level dict: one frozen, validated
value passed down the pipeline (``segment_instances(..., params=...)``), so that two runs
with different settings cannot see each other's. :class:`SegmentationInfo` is what
:func:`napari_mae.segmentation.segment_instances` returns beside the labels: typed
fields, read like the mapping it replaces (``info["radius"]``, ``info.get("model")``,
``dict(info)``), with optional entries absent rather than None.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["DEFAULT_PARAMS", "SegmentationInfo", "SegmentationParams"]


@dataclass(frozen=True)
class SegmentationParams:
    """Lengths and thresholds of the classical pipeline (frozen, validated).

    Lengths are fractions of the object radius estimated per image, tuned on the dev data
    (see ``benchmarks/bench_segmentation.py``); none depends on a particular image.

    Parameters
    ----------
    smooth : float
        Gaussian pre-smoothing sigma / radius.
    background : float
        Half side of the grey-opening box that estimates the background / radius.
    gamma : float
        The automatic threshold applies to ``top-hat ** gamma`` (< 1 lifts dim objects).
    threshold_scale : float
        Multiplies the Otsu threshold (2D).
    threshold_scale_3d : float
        The same in 3D: the axial point-spread function is 2-3x longer than the lateral
        one, so blur spreads each object over its neighbours; cut higher (measured: 0.55
        -> 0.66 on the 3D dev volume, while 2D drops 0.64 -> 0.61 at this value).
    h : float
        h-maxima depth of the distance-transform seeds / radius.
    dist_smooth : float
        Smoothing of the distance transform / radius.
    min_size : float
        Smallest object kept, as a fraction of the expected object volume.
    intensity : float
        Weight of the normalised intensity in the watershed landscape (times the radius).
    low_probability : float
        Scribble mode: Otsu's threshold of P(object) replaces 0.5 where below this.
    thin_foreground : float
        Automatic mode: where more than this fraction of the foreground's volume lies in
        components thinner than half the object radius (distance-transform maximum), the
        Otsu threshold has cut a bright thin structure (a membrane-like streak through a
        nuclei volume) from everything else, and is taken again on the pixels below it.
    working_radius_px : float
        Axes on which the object radius spans more pixels than this are downsampled to it
        (never upsampled), segmented there and the labels brought back
        (:func:`napari_mae.segmentation.scale.working_shape`).

    Raises
    ------
    ValueError
        If a value is not finite, a length or weight is negative, ``gamma``,
        ``threshold_scale*`` or ``working_radius_px`` is not positive, or
        ``low_probability`` is outside (0, 1) or ``thin_foreground`` outside (0, 1].
    """

    smooth: float = 0.12
    background: float = 1.5
    gamma: float = 1.0
    threshold_scale: float = 0.7
    threshold_scale_3d: float = 0.85
    h: float = 0.1
    dist_smooth: float = 0.1
    min_size: float = 0.25
    intensity: float = 0.5
    low_probability: float = 0.4
    thin_foreground: float = 0.5
    working_radius_px: float = 8.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                if f.name == "working_radius_px" and v == math.inf:
                    continue  # full resolution
                raise ValueError(f"{f.name}={v!r} must be a finite number")
        for name in ("smooth", "background", "h", "dist_smooth", "min_size", "intensity"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("gamma", "threshold_scale", "threshold_scale_3d", "working_radius_px"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0.0 < self.low_probability < 1.0:
            raise ValueError(f"low_probability={self.low_probability} must be in (0, 1)")
        if not 0.0 < self.thin_foreground <= 1.0:
            raise ValueError(f"thin_foreground={self.thin_foreground} must be in (0, 1]")

    def replace(self, **changes: float) -> SegmentationParams:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)


#: The defaults, tuned on the dev data.
DEFAULT_PARAMS = SegmentationParams()

#: Entries that are present only when set (absent, not None, otherwise).
_OPTIONAL = frozenset(
    {
        "radius_log", "radius_foreground", "radius_strokes", "radius_image", "radius_auto",
        "outlier_pixels", "working_shape", "tile_thresholds", "model", "scale", "passes",
        "radius_found", "radius_planes", "decoder", "ambiguity", "fallback",
    }
)  # fmt: skip
#: Entries of the learned method that are present even when None (nothing found).
_LEARNED_NULLABLE = frozenset({"radius_found", "radius_planes"})


@dataclass(frozen=True)
class SegmentationInfo(Mapping):
    """What a segmentation estimated and used, beside its labels.

    A read-only mapping of the fields that apply to the run (``info["radius"]``,
    ``"tile_thresholds" in info``, ``dict(info)``, ``json.dumps(dict(info))``): optional
    fields that do not apply are absent, not None.

    Parameters
    ----------
    mode : {"automatic", "scribbles"}
    method : {"classical", "learned"}
    spacing : tuple of float
        Physical pixel size per spatial axis used.
    n_objects : int
        Number of labels (consecutive 1..n).
    radius : float
        Object radius used, physical units (NaN for a constant image).
    radius_px : tuple of float
        The same per axis, in pixels.
    radius_source : {"estimate", "given", "model", "strokes"}
        Where ``radius`` came from: the image (:func:`~napari_mae.segmentation.scale.estimate_object_radius`),
        the caller's ``object_radius``, the fine-tuned model's own radius
        (:func:`napari_mae.models.decoder.fitted_radius`), or the object strokes (scribble mode,
        where they disagree with the estimate).
    threshold : float
        Foreground threshold actually used (NaN for the learned method): on the
        background-subtracted image (automatic) or on P(object) (scribbles).
    bright_objects : bool
        Polarity used.
    message : str
        Non-empty when the result is empty for a reason (a constant image, nothing found).
    tiles : int
        Number of tiles processed.
    radius_log, radius_foreground : float, optional
        The two radius estimates (see :func:`~napari_mae.segmentation.scale.estimate_object_radius`);
        None where that estimate found nothing, and when the radius was given.
    radius_strokes : float, optional
        Scribble mode: half the median length of the object strokes.
    radius_image : float, optional
        The image-wide estimate, where the strokes' size replaced it.
    radius_auto : float, optional
        The estimate before the scribble-taught foreground refined it.
    outlier_pixels : int, optional
        Isolated hot or dead pixels repaired.
    working_shape : tuple of int, optional
        The grid segmented (see :func:`~napari_mae.segmentation.scale.working_shape`).
    tile_thresholds : tuple of float, optional
        Tiled runs: each tile's threshold.
    model : str, optional
        Learned method: the segmentation model.
    scale : tuple of float, optional
        Learned method: resampling factor per axis.
    passes : int, optional
        Learned method: prediction passes.
    radius_found : float or None, optional
        Learned method: median radius of the objects found (physical units).
    radius_planes : float or None, optional
        Learned method on a volume: the decoder's radius estimate from a few planes.
    decoder : {"2d", "planes", "3d"}, optional
        Learned method: a 2D decoder on an image, a 2D decoder on a volume's orthogonal
        planes, or a 3D decoder on the volume.
    ambiguity : float, optional
        The learned method on a 2D image, or ``method="auto"`` that fell back from it: the
        decoder's :func:`~napari_mae.segmentation.learned.foreground_ambiguity`.
    fallback : str, optional
        ``method="auto"`` without a model on a 2D image: why the classical pipeline ran
        instead of the bundled decoder (its foreground was too ambiguous for an image of
        its kind, with ``ambiguity``; or why it was not tried: a colour image, a
        ``threshold`` given, too small or too large).
    """

    mode: str
    method: str
    spacing: tuple[float, ...]
    n_objects: int
    radius: float
    radius_px: tuple[float, ...]
    threshold: float
    bright_objects: bool
    radius_source: str = "estimate"
    message: str = ""
    tiles: int = 1
    radius_log: float | None = None
    radius_foreground: float | None = None
    radius_strokes: float | None = None
    radius_image: float | None = None
    radius_auto: float | None = None
    outlier_pixels: int | None = None
    working_shape: tuple[int, ...] | None = None
    tile_thresholds: tuple[float, ...] | None = None
    model: str | None = None
    scale: tuple[float, ...] | None = None
    passes: int | None = None
    radius_found: float | None = None
    radius_planes: float | None = None
    decoder: str | None = None
    ambiguity: float | None = None
    fallback: str | None = None

    def _present(self, name: str) -> bool:
        if name not in _OPTIONAL:
            return True
        if name in _LEARNED_NULLABLE and self.method == "learned":
            return name != "radius_planes" or len(self.spacing) == 3
        return getattr(self, name) is not None

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key.startswith("_") or key not in _FIELDS or not self._present(key):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (name for name in _FIELDS if self._present(name))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def to_dict(self) -> dict[str, Any]:
        """The present entries as a plain dict (for JSON, see :func:`napari_mae._json.to_jsonable`)."""
        return dict(self)


_FIELDS = tuple(f.name for f in fields(SegmentationInfo))
