"""JPEG-LS Lossless encoding of the node's results by CharLS through ``imagecodecs``.

The secondary capture is written in JPEG-LS Lossless (``syntaxes.fastest_lossless``). The
encoder pydicom has for it, pyjpegls, holds the GIL for the whole encoding (about 120 ms
for a 1500 x 1250 RGB overlay here), so nothing else of the job's Python can run meanwhile;
``imagecodecs.jpegls_encode`` runs the same CharLS (2.4) with the GIL released, which lets
the SR and GSPS be built while the SC is encoded (``dicom_node.outputs.build_outputs``).
Lossless has one right answer: the frame decodes to the same samples whichever encoder
wrote it (tested against pyjpegls's and DCMTK's decoders).

A pydicom encoder plugin (:meth:`pydicom.pixels.encoders.base.Encoder.add_plugin`, label
:data:`LABEL`), so pydicom's own checks of the source and of the options stay as for every
plugin. Unsigned 8-bit and 16-bit samples that fill their words, 1 or 3 samples per
pixel (the SC is 8-bit RGB); anything else (another bit depth, signed, near-lossless) goes
to pyjpegls as before.
"""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
from pydicom import uid
from pydicom.pixels.encoders import base
from pydicom.pixels.encoders import pyjpegls as pyjpegls_plugin

LABEL = "imagecodecs"
ENCODER_DEPENDENCIES = {uid.JPEGLSLossless: ("numpy", "imagecodecs>=2024.1")}


def is_available(tsyntax: str) -> bool:
    """pydicom's plugin contract: whether this plugin can encode ``tsyntax`` here."""
    return tsyntax == uid.JPEGLSLossless and find_spec("imagecodecs") is not None


def _frame(src: bytes, runner: base.EncodeRunner) -> np.ndarray | None:
    """The frame as the (rows, columns[, samples]) array CharLS takes, or None when this
    plugin does not handle its layout."""
    samples, bits = runner.samples_per_pixel, runner.bits_stored
    dtype = {8: np.uint8, 16: np.dtype("<u2")}.get(runner.bits_allocated)
    if (dtype is None or samples not in (1, 3) or bits != runner.bits_allocated
            or runner.pixel_representation != 0):
        return None
    arr = np.frombuffer(src, dtype=dtype)
    if samples == 1:
        return arr.reshape(runner.rows, runner.columns)
    if runner.planar_configuration == 1:
        planes = arr.reshape(samples, runner.rows, runner.columns)
        return np.ascontiguousarray(planes.transpose(1, 2, 0))
    return arr.reshape(runner.rows, runner.columns, samples)


def _encode_frame(src: bytes, runner: base.EncodeRunner) -> bytes | bytearray:
    """One frame -> a JPEG-LS Lossless codestream (the GIL released while CharLS runs)."""
    frame = None if runner.get_option("jls_error", 0) else _frame(src, runner)
    if frame is None:
        return pyjpegls_plugin._encode_frame(src, runner)
    import imagecodecs

    # CharLS's size estimate is too small for noise (JPEG-LS then expands a little beyond
    # the raw samples): room for twice the frame, the codestream is returned at its length
    return imagecodecs.jpegls_encode(frame, out=2 * frame.nbytes + 65536)


def register() -> None:
    """Add the plugin to pydicom's JPEG-LS Lossless encoders (once; later calls do nothing)."""
    try:
        base.get_encoder(uid.JPEGLSLossless).add_plugin(LABEL, (__name__, "_encode_frame"))
    except ValueError:  # "already has a plugin named ...": registered before
        pass
