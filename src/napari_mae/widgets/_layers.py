"""Image layers to arrays and back, for the dock widgets.

:func:`prepare_image` reads a layer and its ``scale`` on the GUI thread into a
:class:`PreparedImage` without computing pixels (dask and multiscale layers stay
lazy); the worker then calls :meth:`PreparedImage.frame`; results go back
through :meth:`PreparedImage.to_layer_layout` / :meth:`PreparedImage.output_kwargs`
and :func:`add_or_update`. Handles 2D, 3D, channels (chosen or detected), RGB,
4D ``(T, Z, Y, X)`` (one time point or all), dask, multiscale, anisotropic
scale, singleton axes and NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_mae.preprocess import guess_layer_channel_axis

#: Time-axis choices for 4D (T, Z, Y, X) layers.
TIME_MODES = ("current time point", "all time points")


class UserInputError(ValueError):
    """An input the widget cannot use; its message is shown to the user."""


# --------------------------------------------------------------------------- layers -> arrays


@dataclass
class PreparedImage:
    """A layer reduced to what a core function takes, still lazy.

    Attributes
    ----------
    name : str
        Name of the source layer.
    source : array-like
        The layer's data (level 0 of a multiscale layer; may be dask).
    frames : list of tuple
        One index into ``source`` per frame to process; each gives an array of
        shape ``(*spatial)`` or ``(*spatial, C)``.
    channel_axis : int or None
        ``-1`` when the frames carry channels last, else ``None``.
    spacing : tuple of float
        Physical size of one pixel along each spatial axis, ``(Z, Y, X)`` or
        ``(Y, X)``, in the layer's units.
    translate : tuple of float
        Physical offset of the first spatial pixel.
    time_scale, time_translate : float or None
        Scale and offset of the layer's time axis (4D layers).
    time_point : int or None
        The time point processed in "current time point" mode: outputs get a
        singleton T axis translated to it, so they are drawn at that time point
        only (not over every time point, as a 3D layer would be).
    units : str
        Name of the spatial unit for labels: the layer's (``"µm"``), ``"px"``
        for a layer with neither units nor a scale, ``"scale units"`` for a
        scaled layer without units.
    axis_units : dict
        The layer's napari ``units`` by role: ``"spatial"`` (tuple), ``"time"``
        and ``"channel"``; outputs take them (napari warns about inconsistent
        units across layers otherwise).
    notes : list of str
        What was done to fit the input (singleton axes dropped, ...).
    """

    name: str
    source: Any
    frames: list[tuple]
    channel_axis: int | None
    spacing: tuple[float, ...]
    translate: tuple[float, ...]
    time_scale: float | None = None
    time_translate: float | None = None
    time_point: int | None = None
    units: str = "px"
    axis_units: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rgb: bool = False
    channel_pos: int | None = None
    channel_pos_stacked: int | None = None
    channel_scale: tuple[float, float] = (1.0, 0.0)

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.spacing)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of one frame's spatial axes."""
        shape = _indexed_shape(self.source.shape, self.frames[0])
        return shape[: self.spatial_dims]

    def frame(self, i: int = 0, fill_nan: bool = True) -> np.ndarray:
        """Compute frame ``i`` as a float32 numpy array (call off the GUI thread).

        With ``fill_nan``, NaN and infinite values are replaced by the finite
        minimum, and a note is added to :attr:`notes`.

        Raises
        ------
        UserInputError
            If the frame holds no finite value.
        """
        data = np.asarray(self.source[self.frames[i]])
        data = data.astype(np.float32, copy=False)
        finite = np.isfinite(data)
        if not fill_nan:
            if not finite.any():
                raise UserInputError(f"Layer '{self.name}' holds no finite values (all NaN or inf).")
            return data
        if not finite.all():
            if not finite.any():
                raise UserInputError(f"Layer '{self.name}' holds no finite values (all NaN or inf).")
            data = np.where(finite, data, data[finite].min()).astype(np.float32)
            note = "NaN/inf pixels were replaced by the image minimum."
            if note not in self.notes:
                self.notes.append(note)
        return data

    @property
    def stacked(self) -> bool:
        """Whether several time points are processed (outputs get a T axis)."""
        return len(self.frames) > 1

    @property
    def timed(self) -> bool:
        """Whether outputs get a T axis: all time points, or a singleton one at :attr:`time_point`."""
        return self.stacked or self.time_point is not None

    def _units(self, spatial_only: bool = False) -> tuple | None:
        spatial = self.axis_units.get("spatial")
        if spatial is None:
            return None
        units = list(spatial)
        if self.timed and not spatial_only:
            units.insert(0, self.axis_units.get("time", "pixel"))
        return tuple(units)

    def output_kwargs(self, with_channels: bool = False) -> dict:
        """``scale``/``translate`` keyword arguments for an output layer.

        Outputs have the input's spatial axes (with T first when all time
        points are processed) and, if ``with_channels``, its channel axis at its
        original place (last, as RGB, for RGB input).
        """
        scale, translate = list(self.spacing), list(self.translate)
        units = list(self._units() or ())
        if self.timed:
            t0 = self.time_point or 0
            scale.insert(0, self.time_scale)
            translate.insert(0, self.time_translate + t0 * self.time_scale)
        kwargs: dict = {}
        if with_channels and self.channel_axis is not None:
            if self.rgb:
                kwargs["rgb"] = True
            else:
                pos = self.channel_pos_stacked if self.timed else self.channel_pos
                scale.insert(pos, self.channel_scale[0])
                translate.insert(pos, self.channel_scale[1])
                if units:
                    units.insert(pos, self.axis_units.get("channel", "pixel"))
        kwargs.update(scale=tuple(scale), translate=tuple(translate))
        if units:
            kwargs["units"] = tuple(units)
        return kwargs

    def spatial_kwargs(self) -> dict:
        """``scale``/``translate``/``units`` for an output with the spatial axes only (drawn at every t)."""
        kwargs = {"scale": tuple(self.spacing), "translate": tuple(self.translate)}
        units = self._units(spatial_only=True)
        if units:
            kwargs["units"] = units
        return kwargs

    def place_spatial(self, array: np.ndarray) -> tuple[np.ndarray, dict]:
        """Data and kwargs for one spatial-only output ``(*spatial)`` shared by every frame.

        At the processed time point only in "current time point" mode, else on
        the spatial axes (so drawn at every time point).
        """
        if self.time_point is not None:
            return array[None], self.output_kwargs()
        return array, self.spatial_kwargs()

    def to_layer_layout(self, frames: list[np.ndarray]) -> np.ndarray:
        """Stack per-frame outputs ``(*spatial[, C])`` into the output layer's layout.

        Channels go back to their place in the input layer (see
        :meth:`output_kwargs`); 2 or more frames get a leading T axis, and the
        one frame of a "current time point" run a singleton T axis.
        """
        out = np.stack(frames) if self.timed else frames[0]
        has_channels = out.ndim == (self.spatial_dims + int(self.timed) + 1)
        if has_channels and self.channel_axis is not None and not self.rgb:
            pos = self.channel_pos_stacked if self.timed else self.channel_pos
            out = np.moveaxis(out, -1, pos)
        return out


def _indexed_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    return tuple(n for n, i in zip(shape, index, strict=True) if isinstance(i, slice))


def _unit_name(layer) -> str:
    units = getattr(layer, "units", None)
    if not units or str(units[-1]) == "pixel":
        scale = getattr(layer, "scale", ())
        return "scale units" if any(float(s) != 1.0 for s in scale[-2:]) else "px"
    name = str(units[-1])
    return {"micrometer": "µm", "millimeter": "mm", "nanometer": "nm"}.get(name, name)


def _layer_units(layer) -> tuple[str, ...] | None:
    units = getattr(layer, "units", None)
    return None if units is None else tuple(str(u) for u in units)


def prepare_image(
    layer,
    viewer=None,
    *,
    channel_axis: int | str | None = "auto",
    time_mode: str = TIME_MODES[0],
    max_spatial_dims: int = 3,
) -> PreparedImage:
    """Reduce an image layer to 2D/3D frames with channels last, lazily.

    Parameters
    ----------
    layer : napari.layers.Image or None
        The input layer. Multiscale layers use their full-resolution level.
    viewer : napari.Viewer, optional
        Gives the current time point of 4D layers.
    channel_axis : int, "auto" or None
        Axis of the layer data holding channels. ``"auto"`` uses the RGB axis
        of RGB layers, else a short first or last axis (2-6 long) beside long
        ones; ``None`` means no channels.
    time_mode : str
        For 4D ``(T, Z, Y, X)`` input, one of :data:`TIME_MODES`.
    max_spatial_dims : int
        Most spatial axes accepted (a 4th one is taken as time).

    Returns
    -------
    PreparedImage

    Raises
    ------
    UserInputError
        If ``layer`` is None or not an image, or its shape cannot be read as
        2D/3D (+ channels, + time).
    """
    from napari.layers import Image

    if layer is None:
        raise UserInputError("No image layer: open an image (File > Open Sample > napari MAE) first.")
    if not isinstance(layer, Image):
        raise UserInputError(f"Layer '{layer.name}' is a {type(layer).__name__} layer, not an Image layer.")
    notes: list[str] = []
    source = layer.data[0] if layer.multiscale else layer.data
    if layer.multiscale:
        notes.append("Multiscale layer: using its full-resolution level.")
    shape = tuple(int(n) for n in source.shape)
    ndim = len(shape)
    scale = tuple(float(s) for s in layer.scale)
    translate = tuple(float(t) for t in layer.translate)

    if layer.rgb:
        c_axis: int | None = ndim - 1
    elif channel_axis == "auto":
        c_axis = guess_layer_channel_axis(shape)
        if c_axis is not None:
            notes.append(f"Axis {c_axis} (length {shape[c_axis]}) read as channels.")
    elif channel_axis is None:
        c_axis = None
    else:
        c_axis = int(channel_axis) % ndim if -ndim <= int(channel_axis) < ndim else None
        if c_axis is None:
            raise UserInputError(f"Channel axis {channel_axis} does not exist in a {ndim}D layer.")

    # Layer axes other than channels. napari's scale covers every axis but the
    # RGB one (which is last), so layer.scale[a] is the scale of data axis a.
    axes = [a for a in range(ndim) if a != c_axis]
    index: list = [slice(None)] * ndim
    dropped = [a for a in axes if shape[a] == 1]
    for a in dropped:
        index[a] = 0
    if dropped:
        notes.append(f"Singleton axis {tuple(dropped)} dropped.")
    axes = [a for a in axes if shape[a] > 1]
    if len(axes) < 2:
        raise UserInputError(f"Layer '{layer.name}' of shape {shape} has fewer than 2 spatial axes.")
    time_axis = None
    if len(axes) > max_spatial_dims:
        if len(axes) > max_spatial_dims + 1:
            raise UserInputError(
                f"Layer '{layer.name}' of shape {shape} has {len(axes)} non-channel axes; "
                f"at most {max_spatial_dims + 1} (time + {max_spatial_dims}D) are supported."
            )
        time_axis = axes.pop(0)
    spatial_axes = list(axes)
    c_axis_orig = c_axis
    spacing = tuple(scale[a] for a in axes)
    offset = tuple(translate[a] for a in axes)

    time_scale = time_translate = time_point = None
    time_points: list[int | None] = [None]
    if time_axis is not None:
        time_scale, time_translate = scale[time_axis], translate[time_axis]
        if time_mode == TIME_MODES[1]:
            time_points = list(range(shape[time_axis]))
        else:
            t = 0
            if viewer is not None:
                data_pos = layer.world_to_data(viewer.dims.point)
                t = int(round(float(data_pos[time_axis])))
            t = min(max(t, 0), shape[time_axis] - 1)
            time_points = [t]
            time_point = t
            notes.append(f"4D layer: time point {t} only.")

    # Channels must end up last: move them there with a (lazy) transpose.
    order = list(range(ndim))
    if c_axis is not None and c_axis != ndim - 1:
        order = [a for a in range(ndim) if a != c_axis] + [c_axis]
        source = as_lazy(source).transpose(order)
    frames: list[tuple] = []
    for t in time_points:
        idx = list(index)
        if t is not None:
            idx[time_axis] = t
        frames.append(tuple(idx[a] for a in order))
    channel_pos = channel_pos_stacked = None
    channel_scale = (1.0, 0.0)
    if c_axis_orig is not None:
        channel_pos = sum(1 for a in spatial_axes if a < c_axis_orig)
        channel_pos_stacked = channel_pos + int(time_axis is not None and time_axis < c_axis_orig)
        if not layer.rgb:
            channel_scale = (scale[c_axis_orig], translate[c_axis_orig])
    return PreparedImage(
        rgb=bool(layer.rgb),
        channel_pos=channel_pos,
        channel_pos_stacked=channel_pos_stacked,
        channel_scale=channel_scale,
        name=layer.name,
        source=source,
        frames=frames,
        channel_axis=-1 if c_axis is not None else None,
        spacing=spacing,
        translate=offset,
        time_scale=time_scale,
        time_translate=time_translate,
        time_point=time_point,
        units=_unit_name(layer),
        axis_units=_axis_units(layer, spatial_axes, time_axis, c_axis_orig),
        notes=notes,
    )


def _axis_units(layer, spatial_axes, time_axis, c_axis) -> dict:
    """The layer's napari units of the spatial, time and channel axes (empty if it has none)."""
    units = _layer_units(layer)
    if units is None or len(units) != len(layer.scale):
        return {}
    out: dict = {"spatial": tuple(units[a] for a in spatial_axes)}
    if time_axis is not None:
        out["time"] = units[time_axis]
    if c_axis is not None and not layer.rgb:
        out["channel"] = units[c_axis]
    return out


def as_lazy(array):
    """Return ``array`` if it slices and transposes lazily, else a dask view of it."""
    if isinstance(array, np.ndarray) or hasattr(array, "dask"):
        return array
    import dask.array as da

    return da.from_array(array, chunks="auto")


def add_or_update(viewer, kind: str, data, name: str, **kwargs):
    """Put ``data`` into the layer ``name`` of type ``kind`` ("image"/"labels"), adding it if needed.

    Re-running a widget refreshes its output layers instead of piling up copies.
    """
    from napari.layers import Image, Labels

    cls = {"image": Image, "labels": Labels}[kind]
    existing = viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401
    rgb = bool(kwargs.get("rgb", False))
    reusable = (
        isinstance(existing, cls)
        and existing.ndim == np.ndim(data) - int(rgb)
        and bool(getattr(existing, "rgb", False)) == rgb
    )
    if reusable:
        existing.data = data
        for key in ("scale", "translate", "units"):
            if key in kwargs:
                setattr(existing, key, kwargs[key])
        if "metadata" in kwargs:
            existing.metadata = kwargs["metadata"]
        if "features" in kwargs:
            existing.features = kwargs["features"]
        if kind == "image" and "contrast_limits" in kwargs:
            existing.contrast_limits = kwargs["contrast_limits"]
        existing.refresh()
        return existing
    if existing is not None:
        viewer.layers.remove(existing)
    add = viewer.add_image if kind == "image" else viewer.add_labels
    return add(data, name=name, **kwargs)


def as_rgb_dtype(data: np.ndarray, dtype) -> np.ndarray:
    """Cast an RGB result back to the input's dtype (clipped to 0-255 for uint8)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(data), info.min, info.max).astype(dtype)
    return np.asarray(data, dtype=dtype)
