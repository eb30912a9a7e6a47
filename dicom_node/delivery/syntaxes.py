"""Transfer syntaxes the node may send, and the transcoding of a result into one of them.

Only lossless syntaxes are allowed: a result object is evidence and must reach the PACS
exactly as the node made it (the secondary capture decodes to the same pixels). The
compressed ones need a pydicom encoder installed: RLE Lossless (pylibjpeg-rle or numpy),
JPEG-LS Lossless (imagecodecs' CharLS through :mod:`dicom_node.delivery.jpegls`, else
pyjpegls), JPEG 2000 Lossless (pylibjpeg-openjpeg).
"""

from __future__ import annotations

import pydicom.uid as uids
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import UID

from dicom_node.delivery import jpegls

UNCOMPRESSED = (uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian)

# Lossless syntaxes the node can produce; compressed ones only with an encoder installed.
LOSSLESS = (*UNCOMPRESSED, uids.DeflatedExplicitVRLittleEndian, uids.RLELossless,
            uids.JPEGLSLossless, uids.JPEG2000Lossless)
_LOSSLESS_ELSEWHERE = frozenset({uids.JPEGLossless, uids.JPEGLosslessSV1,
                                 uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL,
                                 uids.ExplicitVRBigEndian})


# The fastest installed plugins per syntax, in order, where pydicom's default order picks a
# slower one (measured on 2 cores, 1955 x 1841 RGB overlay of a real CR): JPEG-LS decodes in
# 118 ms with pyjpegls, 554 ms with pylibjpeg, and encodes as fast with imagecodecs as with
# pyjpegls (both CharLS) but with the GIL released (``jpegls``); RLE encodes 3000 x 2500 RGB
# in about 0.4 s with pylibjpeg-rle, 4.7 s with pydicom's own encoder.
jpegls.register()
_FASTEST_ENCODERS = {uids.JPEGLSLossless: (jpegls.LABEL, "pyjpegls"),
                     uids.RLELossless: ("pylibjpeg",)}
_FASTEST_DECODERS = {uids.JPEGLSLossless: ("pyjpegls",), uids.RLELossless: ("pylibjpeg",)}


def _plugin(preferred: dict[UID, tuple[str, ...]], uid: UID, available: list[str]) -> str:
    """The first preferred plugin installed, else "" (pydicom's own choice)."""
    return next((name for name in preferred.get(uid, ()) if name in available), "")


def compress(ds: Dataset, target: UID) -> None:
    """Compress ``ds`` in place into ``target`` with the fastest installed encoder; the SOP
    Instance UID stays (the same object, re-encoded)."""
    plugin = _plugin(_FASTEST_ENCODERS, target, list(get_encoder(target).available_plugins))
    ds.compress(target, encoding_plugin=plugin, generate_instance_uid=False)


def decompress(ds: Dataset) -> None:
    """Decompress ``ds`` in place with the fastest installed decoder."""
    current = UID(ds.file_meta.TransferSyntaxUID)
    plugin = _plugin(_FASTEST_DECODERS, current, list(get_decoder(current).available_plugins))
    ds.decompress(decoding_plugin=plugin, generate_instance_uid=False)


_KNOWN = {key: ts for ts in uids.AllTransferSyntaxes for key in (str(ts), ts.keyword)}


def resolve(name: str) -> UID:
    """A transfer syntax from its pydicom keyword (``RLELossless``) or its UID.

    Raises ``ValueError`` naming the value when it is neither.
    """
    text = str(name).strip()
    candidate = _KNOWN.get(text)
    if candidate is None:
        raise ValueError(f"transfer syntax {text!r} is unknown (use a pydicom keyword such as "
                         f"'RLELossless' or a transfer syntax UID)")
    return candidate


def sendable(name: str) -> UID:
    """A syntax the node can send a result in, or ``ValueError`` saying why not."""
    uid = resolve(name)
    if uid not in LOSSLESS:
        why = ("is lossless but the node does not send it" if uid in _LOSSLESS_ELSEWHERE
               else "is lossy or not an image encoding; only lossless syntaxes are allowed")
        raise ValueError(f"transfer syntax {name!r} ({uid.name}) {why}; choose from "
                         f"{', '.join(u.keyword for u in LOSSLESS)}")
    if uid.is_compressed and not get_encoder(uid).is_available:
        raise ValueError(f"transfer syntax {name!r} ({uid.name}) needs a pixel data encoder "
                         f"that is not installed: "
                         f"{'; '.join(get_encoder(uid).missing_dependencies)}")
    return uid


def convert(ds: Dataset, target: UID) -> Dataset:
    """Re-encode ``ds`` (read from a result file) for sending in ``target``, in memory.

    Uncompressed syntaxes only change the encoding; a compressed target compresses the
    pixel data (decompressing first when the file is compressed). The SOP Instance UID
    never changes. Raises what pydicom raises when an encoder fails.
    """
    current = UID(ds.file_meta.TransferSyntaxUID)
    if current == target:
        return ds
    if current.is_compressed:
        decompress(ds)
    if target.is_compressed:
        compress(ds, target)
    else:
        ds.file_meta.TransferSyntaxUID = target
    # pynetdicom checks that the dataset's encoding matches the file meta
    ds.set_original_encoding(target.is_implicit_VR, target.is_little_endian,
                             ds.original_character_set)
    return ds


def fastest_lossless() -> UID:
    """The lossless syntax the SC is written in by default: the fastest installed encoder.

    Measured on a 3000 x 2500 RGB overlay (2 cores): JPEG-LS (CharLS) 130-530 ms and 2-20x
    smaller; RLE 280-440 ms with pylibjpeg-rle (4.7 s with pydicom's own encoder) and no
    smaller once the image is noisy. Uncompressed when neither encoder is installed.
    """
    if get_encoder(uids.JPEGLSLossless).is_available:
        return uids.JPEGLSLossless
    if "pylibjpeg" in get_encoder(uids.RLELossless).available_plugins:
        return uids.RLELossless
    return uids.ExplicitVRLittleEndian
