"""PNG and JPEG radiographs (ChestX-ray14 ships PNGs) through the node's own preprocessing.

The node only ever sees DICOM, so an image file is wrapped, in memory, as the uncompressed
MONOCHROME2 dataset a converter would send (8 or 16 bit, no VOI attributes) and handed to
:func:`ai.pixels.preprocess`: the same percentile window, letterbox, CLAHE and input scaling
as a DICOM file, with no second implementation to drift away from the node's. Colour
files are converted to grey first (ITU-R 601 weights, as OpenCV does).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from ai.pixels import DEFAULT_MAX_PIXELS, PreprocessParams, preprocess
from ai.types import PixelDataError
from training.nih import IMAGE_SUFFIXES


def is_image_file(path: Path) -> bool:
    """True for the image files (not DICOM) ``training fit`` reads."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_grey(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The file's pixels as a 2-D uint8 or uint16 array; errors name the file."""
    data = np.fromfile(path, dtype=np.uint8)
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if array is None:
        raise PixelDataError(f'"{Path(path).name}" is not a readable PNG or JPEG image')
    if array.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if array.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        array = cv2.cvtColor(array, code)
    if array.dtype not in (np.uint8, np.uint16):
        raise PixelDataError(f'"{Path(path).name}": {array.dtype} pixels are not supported')
    if array.shape[0] * array.shape[1] > max_pixels:
        raise PixelDataError(f'"{Path(path).name}": {array.shape[1]}x{array.shape[0]} pixels '
                             f"exceed the limit of {max_pixels}")  # fmt: skip
    return np.ascontiguousarray(array)


def as_dataset(pixels: np.ndarray) -> Dataset:
    """A minimal uncompressed MONOCHROME2 dataset holding ``pixels`` (uint8 / uint16)."""
    bits = 8 * pixels.dtype.itemsize
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(f"<u{pixels.dtype.itemsize}").tobytes()
    ds.set_original_encoding(False, True)
    return ds


def load_image_file(path: Path, params: PreprocessParams) -> np.ndarray:
    """PNG / JPEG -> float32 model input, exactly as the node would preprocess it."""
    dataset = as_dataset(read_grey(path, params.max_pixels))
    array, _ = preprocess(dataset, params)
    return np.ascontiguousarray(array, dtype=np.float32)
