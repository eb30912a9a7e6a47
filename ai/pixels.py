"""DICOM pixels to model input, with an exact mapping back to source pixels.

The chain follows the DICOM grayscale pipeline (PS3.4 N.2): Modality LUT (rescale or LUT),
then VOI (window or VOI LUT sequence; a percentile window when the image carries neither),
then the MONOCHROME1 inversion, *after* VOI, because the window values are stated in the
stored (not inverted) domain. The result is a display-like float image in [0, 1] that looks
the same whatever the vendor wrote, which is what the model was trained on.

Geometry: :class:`Letterbox` resizes keeping the aspect ratio and pads to a square. It keeps
the per-axis scale it really used (``new / old`` pixels, an exact affine map in pixel-edge
coordinates), so boxes and heatmaps land on the source pixels they came from.

Only one grey frame is analysed: multi-frame images give their first frame (documented
policy: CR/DX are single-frame; a multi-frame object is a rarity we tolerate, not reject).
Colour images (RGB, YBR, palette) are converted to grey with ITU-R BT.601 luma weights.
"""

from __future__ import annotations

import copy
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from ai.decoders import (
    J2K_SYNTAXES,
    decode_j2k_reduced,
    decoder_for,
    deepest_level,
    j2k_decodes_at,
    j2k_reduce_level,
    transfer_syntax,
)
from ai.types import BoundingBox, PixelDataError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_PERCENTILE_WINDOW: tuple[float, float] = (0.5, 99.5)

_JPEG_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
    }
)
# SOFn markers that carry the frame size (not DHT C4, JPG C8, DAC CC); F7 = JPEG-LS SOF55.
_JPEG_SOF = frozenset(set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}) | {0xF7}
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
# Elements the LUT functions read; they get a private copy because pydicom's LUT helpers
# write some of them back (casts) and the node must not see its input datasets change.
_VOI_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)


# --------------------------------------------------------------------------------------------
# Size checks: before any decoder allocates


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        raise PixelDataError(f"Missing or empty {keyword}; cannot size the pixel data")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise PixelDataError(f'Invalid {keyword} "{value}"') from exc


def check_pixel_size(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Refuse images whose one decoded frame would exceed ``max_pixels`` samples.

    Checks the header (Rows x Columns x SamplesPerPixel; the message gives the decoded byte
    size, x BitsAllocated / 8) and, for JPEG-family and JPEG 2000 syntaxes, the size the
    codestream itself declares, because a decoder allocates by the codestream, not by the
    DICOM header: a small header over a 60k x 60k codestream is a decompression bomb.

    Returns:
        (rows, columns) from the header.
    """
    if "PixelData" not in ds:
        raise PixelDataError("Dataset has no Pixel Data (7FE0,0010)")
    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    spp, bits = _int_attr(ds, "SamplesPerPixel", 1), _int_attr(ds, "BitsAllocated")
    if rows <= 0 or cols <= 0 or spp not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise PixelDataError(
            f"Implausible image header: Rows={rows}, Columns={cols}, "
            f"SamplesPerPixel={spp}, BitsAllocated={bits}"
        )
    samples = rows * cols * spp
    if samples > max_pixels:
        nbytes = math.ceil(samples * bits / 8)
        raise PixelDataError(
            f"Image of {rows} x {cols} x {spp} samples ({nbytes} bytes decoded) exceeds "
            f"max_pixels={max_pixels}; refusing to decode"
        )
    _check_codestream(ds, rows, cols, spp, max_pixels)
    return rows, cols


def _check_codestream(ds: Dataset, rows: int, cols: int, spp: int, max_pixels: int) -> None:
    tsyntax = transfer_syntax(ds)
    if tsyntax not in J2K_SYNTAXES and tsyntax not in _JPEG_SYNTAXES:
        return
    try:
        fragments = generate_fragments(ds.PixelData)
        next(fragments)  # the first item is always the Basic Offset Table (maybe empty)
        fragment = next(fragments)
    except (StopIteration, ValueError, struct.error) as exc:
        raise PixelDataError(f"Encapsulated Pixel Data has no readable fragment ({exc})") from exc
    head = fragment[:65536]
    size = _j2k_size(head) if tsyntax in J2K_SYNTAXES else _jpeg_size(head)
    if size is None:
        logger.debug("No frame header found in the first fragment (syntax %s)", tsyntax)
        return
    c_rows, c_cols, c_comp = size
    if c_rows * c_cols * c_comp > max_pixels or c_rows > rows or c_cols > cols:
        raise PixelDataError(
            f"Codestream declares {c_rows} x {c_cols} x {c_comp} samples but the header says "
            f"{rows} x {cols} x {spp} (max_pixels={max_pixels}); refusing to decode"
        )


def _j2k_size(head: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 SIZ marker segment (ISO 15444-1 A.5.1)."""
    pos = head.find(b"\xff\x4f\xff\x51")
    if pos < 0 or len(head) < pos + 40:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", head[pos + 8 : pos + 24])
    (csiz,) = struct.unpack(">H", head[pos + 40 : pos + 42]) if len(head) >= pos + 42 else (1,)
    return max(ysiz - yosiz, 0), max(xsiz - xosiz, 0), csiz


def _jpeg_size(head: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the first SOFn segment of a JPEG / JPEG-LS stream."""
    if head[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            if pos + 10 > len(head):
                return None
            y, x = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return y, x, head[pos + 9]
        pos += 2 + length
    return None


# --------------------------------------------------------------------------------------------
# Decoding and the grayscale pipeline


def display_level(ds: Dataset, min_short_side: int) -> int:
    """The resolution level ``ds`` is analysed and shown at: ``1 / 2**level`` of its rows
    and columns (rounded up), the deepest that keeps ``min_short_side`` px on the short side.

    A JPEG 2000 image whose codestream decodes at a reduced level directly gets that level
    (:func:`ai.decoders.j2k_reduce_level`); any other single grey frame gets the level of the
    same size, reached by shrinking the full decode (:func:`shrink`), so an image shows the
    same size and the models see the same picture whatever the transfer syntax. Colour and
    palette images stay at full size (averaging palette indices would mix colours).
    """
    level = j2k_reduce_level(ds, min_short_side)
    if level or not _single_grey_frame(ds):
        return level
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    return deepest_level(min(rows, columns), min_short_side)


def _single_grey_frame(ds: Dataset) -> bool:
    return (int(ds.get("SamplesPerPixel", 1) or 1) == 1
            and str(ds.get("PhotometricInterpretation", "")).strip().upper() in _GREY)


def shrink(arr: np.ndarray, level: int) -> np.ndarray:
    """A decoded grey frame at ``1 / 2**level`` of its size, rows and columns rounded up as
    a reduced JPEG 2000 decode returns them: each output sample the mean of the
    ``2**level`` x ``2**level`` stored values it covers (the last row and column of an odd
    size repeated to fill their block), rounded back to the input's type."""
    if level <= 0:
        return arr
    if arr.ndim != 2:
        raise PixelDataError(f"Expected one grey frame, got an array of shape {arr.shape}")
    native = arr.dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64)
    work = arr if native else arr.astype(np.float64)
    factor = 2**level
    pad_rows, pad_columns = -work.shape[0] % factor, -work.shape[1] % factor
    if pad_rows or pad_columns:
        work = cv2.copyMakeBorder(work, 0, pad_rows, 0, pad_columns, cv2.BORDER_REPLICATE)
    size = (work.shape[1] // factor, work.shape[0] // factor)  # (width, height)
    out = cv2.resize(work, size, interpolation=cv2.INTER_AREA)  # whole blocks: their means
    if native:
        return out
    return np.rint(out).astype(arr.dtype) if arr.dtype.kind in "iub" else out.astype(arr.dtype)


def decode_frame(
    ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS, *, reduce: int = 0
) -> np.ndarray:
    """Decode the first frame as stored (after colour conversion to RGB where applicable).

    The one decode entry point of the model side (the tests count its calls). ``reduce``
    > 0 asks for the image at ``1 / 2**reduce`` resolution (see :func:`display_level`): a
    JPEG 2000 codestream decoded at that level directly, any other image (or a codestream
    that refuses the reduced decode) decoded in full and shrunk (:func:`shrink`).
    """
    check_pixel_size(ds, max_pixels)
    tsyntax = transfer_syntax(ds)
    if reduce > 0 and j2k_decodes_at(ds, reduce):
        try:
            return decode_j2k_reduced(ds, reduce)
        except PixelDataError as exc:
            logger.warning("%s; decoding at full resolution", exc)
    try:
        arr = pydicom.pixels.pixel_array(ds, index=0, decoding_plugin=decoder_for(tsyntax))
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
        raise PixelDataError(
            f"Cannot decode Pixel Data (transfer syntax {tsyntax or 'unknown'}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        logger.info("Multi-frame image: analysing its first frame only")
    return shrink(arr, reduce)


def _lut_view(ds: Dataset) -> Dataset:
    """A private copy of the attributes pydicom's LUT helpers read (and sometimes write)."""
    view = Dataset()
    for keyword in _VOI_KEYWORDS:
        if keyword in ds:
            view[keyword] = copy.deepcopy(ds[keyword])
    if getattr(ds, "file_meta", None) is not None:
        view.file_meta = ds.file_meta
    implicit, little = ds.original_encoding
    if little is None and getattr(ds, "file_meta", None) is None:
        implicit, little = False, True
    view.set_original_encoding(implicit, little, ds.original_character_set)
    return view


def _to_grey(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in _GREY:
        if arr.ndim != 2:
            raise PixelDataError(f"Expected one grey frame, got an array of shape {arr.shape}")
        return arr
    if photometric not in _COLOUR:
        raise PixelDataError(f'Photometric Interpretation "{photometric}" is not supported')
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise PixelDataError(f"Expected an RGB frame, got an array of shape {arr.shape}")
    weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return arr.astype(np.float32) @ weights


def _has_voi(view: Dataset) -> bool:
    lut = view.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        return True
    return view.get("WindowCenter") is not None and view.get("WindowWidth") is not None


def _voi_output_range(view: Dataset) -> tuple[float, float]:
    """The output range of the VOI transform, probed through the same pydicom function.

    A window maps onto [y_min, y_max] (clipped at both ends), so the two extremes give it
    exactly; a LUT maps onto its entries, so the whole input domain of the LUT gives them.
    """
    lut = view.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None:
        entries, first, _ = (int(v) for v in lut[0].LUTDescriptor)
        probe = np.arange(first - 1, first + (entries or 65536) + 1, dtype=np.int64)
    else:
        probe = np.asarray([-1e30, 1e30], dtype=np.float64)
    with np.errstate(over="ignore"):  # SIGMOID at +-1e30: exp overflows to the limits
        out = apply_voi_lut(probe, view).astype(np.float64)
    return float(out.min()), float(out.max())


def _sample(arr: np.ndarray) -> np.ndarray:
    """A strided sample (about 250k values) for percentiles: the same figure to 3 digits."""
    step = max(1, int(math.sqrt(arr.size / 250_000)))
    return arr[::step, ::step] if arr.ndim == 2 else arr[::step]


def _percentile_window(sample: np.ndarray, window: Sequence[float]) -> tuple[float, float]:
    lo, hi = np.percentile(sample, [float(window[0]), float(window[1])])
    if hi <= lo:  # flat image: avoid dividing by zero
        hi = lo + 1.0
    return float(lo), float(hi)


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = (arr.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _grey_transform(
    stored: np.ndarray, view: Dataset, sample: np.ndarray, window: Sequence[float]
) -> np.ndarray:
    """Modality LUT, VOI (or the percentile window of ``sample``) and scaling to [0, 1]."""
    values = apply_modality_lut(stored, view)
    if _has_voi(view):
        try:
            if view.get("VOILUTSequence") and values.dtype.kind == "f":
                values = np.rint(values).astype(np.int64)  # a LUT is indexed by integers
            with np.errstate(over="ignore"):  # a steep SIGMOID saturates: that is fine
                voi = apply_voi_lut(values, view)
            lo, hi = _voi_output_range(view)
            if hi > lo:
                return _scale(voi, lo, hi)
            logger.warning("VOI transform has an empty output range; using a percentile window")
        except (ValueError, NotImplementedError, AttributeError, IndexError, TypeError) as exc:
            logger.warning("Unusable VOI attributes (%s); using a percentile window", exc)
    return _scale(values, *_percentile_window(apply_modality_lut(sample, view), window))


def _apply_grey_pipeline(
    arr: np.ndarray, ds: Dataset, percentile_window: Sequence[float]
) -> np.ndarray:
    """The grayscale pipeline; for integer pixels as a table over the stored values.

    Every step is a pointwise function of the stored value, so for <= 16-bit data it is
    evaluated once per value in [min, max] (at most 65536) through the same pydicom
    functions, and the image is looked up: exact, and several times faster on a 4 MP image.
    """
    view = _lut_view(ds)
    sample = _sample(arr)
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2:
        return _grey_transform(arr, view, sample, percentile_window)
    lo, hi = int(arr.min()), int(arr.max())
    domain = np.arange(lo, hi + 1, dtype=np.int64)
    table = _grey_transform(domain, view, sample.astype(np.int64), percentile_window)
    return table[np.subtract(arr, lo, dtype=np.int32)]


def load_display_image(
    ds: Dataset,
    *,
    percentile_window: Sequence[float] = DEFAULT_PERCENTILE_WINDOW,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce: int = 0,
) -> np.ndarray:
    """The image as a radiologist would first see it: float32 (Rows, Columns) in [0, 1].

    Bright = dense (bone white) whatever the photometric interpretation. Invalid VOI
    attributes fall back to the percentile window with a warning rather than failing,
    because a wrong window is a display problem, not a reason to drop a study. With
    ``reduce`` > 0 a JPEG 2000 image comes back smaller (see :func:`decode_frame`).

    Raises:
        PixelDataError: too large, undecodable, or not a single grey/colour frame.
    """
    return display_image(decode_frame(ds, max_pixels, reduce=reduce), ds, percentile_window)


def load_display_images(
    ds: Dataset,
    windows: Sequence[tuple[float, float]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce: int = 0,
) -> dict[tuple[float, float], np.ndarray]:
    """One decode, then :func:`display_image` for each percentile window (several bundles
    may ask for different ones): what :class:`ai.inference.Analyzer` needs per image."""
    arr = decode_frame(ds, max_pixels, reduce=reduce)
    return {tuple(w): display_image(arr, ds, w) for w in dict.fromkeys(map(tuple, windows))}


def display_image(
    arr: np.ndarray, ds: Dataset, percentile_window: Sequence[float] = DEFAULT_PERCENTILE_WINDOW
) -> np.ndarray:
    """A decoded frame (:func:`decode_frame`) -> the display image of :func:`load_display_image`.

    Separate from decoding so one decoded frame serves every window the bundles ask for.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    grey = _to_grey(arr, ds)
    if photometric in _GREY:
        out = _apply_grey_pipeline(grey, ds, percentile_window)
    else:  # colour images carry no grayscale LUTs: they are presentation values already
        out = _scale(grey, *_percentile_window(_sample(grey), percentile_window))
    if photometric == "MONOCHROME1":
        out = np.subtract(1.0, out, out=out)
    return out


def apply_clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0, 1] float image (16-bit)."""
    as16 = np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tile_grid, tile_grid))
    return clahe.apply(as16).astype(np.float32) / np.float32(65535.0)


# --------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Letterbox:
    """Aspect-preserving resize of a (height, width) image into a ``size`` square.

    The content occupies columns ``[offset_x, offset_x + new_width)`` and rows
    ``[offset_y, offset_y + new_height)`` of the model image. In pixel-edge coordinates
    (x = column, y = row, (0, 0) = top-left corner of the top-left pixel) the map is
    ``x_model = x_img * scale_x + offset_x`` (same for y), exactly what ``cv2.resize`` does
    (half-pixel centres), so a round trip is exact up to float rounding.

    ``source_height`` / ``source_width``: the source image's size when the image was
    decoded smaller (a reduced JPEG 2000 decode: source = image x ``2**level``). Every
    ``*_source`` method and :meth:`to_model` speak source pixels, so results stay in the
    coordinates of the DICOM image whatever resolution was decoded. None: the same size.
    """

    height: int
    width: int
    size: int
    source_height: int | None = None
    source_width: int | None = None

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0 or self.size <= 0:
            raise ValueError(f"Letterbox needs positive sizes, got {self!r}")
        if (self.source_height or 1) <= 0 or (self.source_width or 1) <= 0:
            raise ValueError(f"Letterbox needs positive source sizes, got {self!r}")

    @property
    def src_height(self) -> int:
        return self.source_height or self.height

    @property
    def src_width(self) -> int:
        return self.source_width or self.width

    @property
    def factor_x(self) -> float:
        """Source pixels per image pixel along x (1 unless decoded at a reduced level)."""
        return self.src_width / self.width

    @property
    def factor_y(self) -> float:
        return self.src_height / self.height

    @property
    def new_height(self) -> int:
        return max(1, min(self.size, round(self.height * self.size / max(self.height, self.width))))

    @property
    def new_width(self) -> int:
        return max(1, min(self.size, round(self.width * self.size / max(self.height, self.width))))

    @property
    def scale_x(self) -> float:
        return self.new_width / self.width

    @property
    def scale_y(self) -> float:
        return self.new_height / self.height

    @property
    def scale(self) -> float:
        """Nominal scale (model pixels per image pixel) of the longer side."""
        return self.size / max(self.height, self.width)

    @property
    def offset_x(self) -> int:
        return (self.size - self.new_width) // 2

    @property
    def offset_y(self) -> int:
        return (self.size - self.new_height) // 2

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        """Source point (column, row) -> model point."""
        if self.source_height is not None or self.source_width is not None:
            x, y = x / self.factor_x, y / self.factor_y
        return x * self.scale_x + self.offset_x, y * self.scale_y + self.offset_y

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        """Model point (column, row) -> source point (may lie outside for padding points)."""
        x, y = (x - self.offset_x) / self.scale_x, (y - self.offset_y) / self.scale_y
        if self.source_height is not None or self.source_width is not None:
            x, y = x * self.factor_x, y * self.factor_y
        return x, y

    def box_to_source(self, box: Sequence[float] | BoundingBox) -> BoundingBox | None:
        """Model box (x0, y0, x1, y1) -> source box clipped to the image.

        Returns None when nothing of the box lies on the image (all in the padding).
        """
        if isinstance(box, BoundingBox):
            box = (box.x0, box.y0, box.x1, box.y1)
        x0, y0 = self.to_source(box[0], box[1])
        x1, y1 = self.to_source(box[2], box[3])
        x0, x1 = max(0.0, min(x0, x1)), min(float(self.src_width), max(x0, x1))
        y0, y1 = max(0.0, min(y0, y1)), min(float(self.src_height), max(y0, y1))
        if x1 <= x0 or y1 <= y0:
            return None
        return BoundingBox(x0, y0, x1, y1)

    def resize_content(self, image: np.ndarray) -> np.ndarray:
        """Resize a (height, width) image to (new_height, new_width) float32, anti-aliased."""
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(f"Image shape {image.shape} does not match {self!r}")
        shrinking = self.new_width < self.width or self.new_height < self.height
        return cv2.resize(
            np.ascontiguousarray(image, dtype=np.float32),
            (self.new_width, self.new_height),
            interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
        )

    def pad(self, content: np.ndarray, pad_value: float = 0.0) -> np.ndarray:
        """Place a (new_height, new_width) content image into the (size, size) square."""
        out = np.full((self.size, self.size), pad_value, dtype=np.float32)
        self.crop(out)[...] = content
        return out

    def apply(self, image: np.ndarray, pad_value: float = 0.0) -> np.ndarray:
        """Resize a (height, width) image into the model square (float32)."""
        return self.pad(self.resize_content(image), pad_value)

    def crop(self, model_image: np.ndarray) -> np.ndarray:
        """The content part (new_height, new_width) of a model-space image."""
        if model_image.shape[-2:] != (self.size, self.size):
            raise ValueError(f"Expected a ({self.size}, {self.size}) map, got {model_image.shape}")
        return model_image[
            ..., self.offset_y : self.offset_y + self.new_height,
            self.offset_x : self.offset_x + self.new_width,
        ]  # fmt: skip

    def heatmap_to_source(self, hm_model: np.ndarray) -> np.ndarray:
        """A (size, size) model-space map -> (src_height, src_width) float32 at source
        resolution (the content stretched over the whole source, as :meth:`to_source`)."""
        content = np.ascontiguousarray(self.crop(hm_model), dtype=np.float32)
        shrinking = self.src_width < self.new_width or self.src_height < self.new_height
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(content, (self.src_width, self.src_height), interpolation=interp)


# --------------------------------------------------------------------------------------------
# The whole chain


@dataclass(frozen=True)
class PreprocessParams:
    """How a bundle wants its input: from ``metadata.input`` plus the node's size limit."""

    size: int = 224
    clahe: bool = False
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    percentile_window: tuple[float, float] = DEFAULT_PERCENTILE_WINDOW
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Imported public models expect other input spaces: the grey image repeated to
    # ``channels`` and each channel scaled as ``(x - mean) / std`` (ImageNet statistics for
    # torchvision's DenseNet, [-1024, 1024] for torchxrayvision). The defaults leave [0, 1].
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        lo, hi = self.percentile_window
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentile_window must be 0 <= lo < hi <= 100, got {lo, hi}")
        if self.size < 16:
            raise ValueError(f"size must be >= 16, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean {self.mean} and std {self.std} need {self.channels} value(s)")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std {self.std} must be positive")

    @property
    def scaled(self) -> bool:
        """True when the model input is not the plain one-channel [0, 1] image."""
        return (self.channels, self.mean, self.std) != (1, (0.0,), (1.0,))


def preprocess_image(
    image: np.ndarray, params: PreprocessParams, source_shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, Letterbox]:
    """A display image (H, W) in [0, 1] -> model input (channels, size, size) and its geometry.

    Training renders phantoms straight to display images and calls this, so the node and
    training share every step after decoding. ``source_shape``: (Rows, Columns) of the
    source when ``image`` was decoded smaller; the letterbox then maps to source pixels.
    """
    height, width = int(image.shape[0]), int(image.shape[1])
    src = source_shape if source_shape and tuple(source_shape) != (height, width) else None
    box = Letterbox(height, width, params.size, *(src or (None, None)))
    content = box.resize_content(image)
    if params.clahe:  # on the content only, so the padding does not skew the tiles
        content = apply_clahe(content, params.clahe_clip_limit, params.clahe_tile_grid)
    tensor = box.pad(content)[np.newaxis]
    if params.scaled:
        mean = np.asarray(params.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(params.std, dtype=np.float32)[:, None, None]
        tensor = (np.repeat(tensor, params.channels, axis=0) - mean) / std
    return tensor, box


def preprocess(ds: Dataset, params: PreprocessParams | None = None) -> tuple[np.ndarray, Letterbox]:
    """DICOM dataset -> (float32 (channels, size, size) model input, :class:`Letterbox`)."""
    params = params or PreprocessParams()
    image = load_display_image(
        ds, percentile_window=params.percentile_window, max_pixels=params.max_pixels
    )
    return preprocess_image(image, params)
