"""JPEG Lossless (Process 14, ``1.2.840.10008.1.2.4.57`` / ``.70``) decoded by libjpeg-turbo 3.

JPEG Lossless is how most CR/DX modalities and PACS compress radiographs. The one decoder
pydicom has for it here, pylibjpeg-libjpeg, takes 430 ms for a 3000 x 2500 12-bit image on
this machine; libjpeg-turbo 3 (through ``imagecodecs``) returns the same samples, bit for bit,
in 65 ms (``bench/decode.py`` prints both rows). A lossless decoder has one right answer, so
swapping it changes no pixel; lossy JPEG is left to its current decoders, whose IDCTs differ
from libjpeg-turbo's by a level here and there.

This module is a pydicom decoder plugin (:meth:`pydicom.pixels.decoders.base.Decoder.add_plugin`,
label :data:`LABEL`), so pydicom's own handling of the returned frame (its length checked,
sign and bit depth applied) stays what it is for every plugin. Grey frames only: a colour
frame goes to pylibjpeg, as before. Without ``imagecodecs`` installed the plugin is
unavailable and the node uses pylibjpeg.
"""

from __future__ import annotations

from importlib.util import find_spec

from pydicom import uid
from pydicom.pixels.decoders import base
from pydicom.pixels.decoders import pylibjpeg as pylibjpeg_plugin

LABEL = "imagecodecs"
SYNTAXES = (uid.JPEGLossless, uid.JPEGLosslessSV1)
DECODER_DEPENDENCIES = {syntax: ("imagecodecs>=2024.1",) for syntax in SYNTAXES}


def is_available(tsyntax: str) -> bool:
    """pydicom's plugin contract: whether this plugin can decode ``tsyntax`` here."""
    return tsyntax in SYNTAXES and find_spec("imagecodecs") is not None


def _decode_frame(src: bytes, runner: base.DecodeRunner) -> bytes | bytearray:
    """One encapsulated frame -> its samples as pylibjpeg-libjpeg returns them (8-bit
    samples in bytes, 9-16-bit in little-endian 16-bit words)."""
    if runner.samples_per_pixel != 1:
        return pylibjpeg_plugin._decode_frame(src, runner)
    import imagecodecs

    arr = imagecodecs.jpeg8_decode(src)
    if arr.dtype.itemsize > 1 and arr.dtype.byteorder == ">":
        arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


def register() -> None:
    """Add the plugin to pydicom's JPEG Lossless decoders (once; later calls do nothing)."""
    for tsyntax in SYNTAXES:
        try:
            base.get_decoder(tsyntax).add_plugin(LABEL, (__name__, "_decode_frame"))
        except ValueError:  # "already has a plugin named ...": registered before
            continue
