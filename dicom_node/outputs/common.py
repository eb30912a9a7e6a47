"""What the three output builders share: settings, the result type, source preparation.

highdicom's SR and GSPS constructors read several Type 2 patient/study attributes directly
(``ref.PatientBirthDate`` ...), and its SR Image Library needs ``ImagerPixelSpacing`` and
``PatientOrientation`` on CR/DX images. Real sources miss some of these (the NIH file has
no orientation at all) and break VR rules in others, so every builder works on a *copy* of
the source, passed through :func:`dicom_node.outputs.sanitise.sanitise`, with the gaps
filled; the caller's dataset is never changed.
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from ai.types import Finding, ImageResult, ModelIdentity
from dicom_node.delivery.syntaxes import fastest_lossless, sendable
from dicom_node.outputs.sanitise import Removal, sanitise
from dicom_node.uids import derive_uid

logger = logging.getLogger(__name__)

DISCLAIMER = "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"
DEMO_BANNER = "DEMO MODEL"
NO_FINDING_TEXT = "AI: no finding above threshold"

# Type 2 attributes (present, may be empty) that highdicom reads without a default.
_TYPE2_DEFAULTS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PERSON_NAMES: tuple[str, ...] = ("PatientName", "ReferringPhysicianName")
_REQUIRED: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Rows",
    "Columns",
    "PhotometricInterpretation",
)
SR_CANDIDATE_MODES: tuple[str, ...] = ("omit", "list")
SEG_TYPES: tuple[str, ...] = ("fractional", "binary")
# Used when a projection image carries no orientation: the usual chest display (patient's
# left to the right of the screen, feet down). Only ever written into working copies.
DEFAULT_ORIENTATION: tuple[str, str] = ("L", "F")
MIN_SC_SIDE = 256
# Bulk data a reference dataset never needs: highdicom deep-copies every source it is given
# (the SR's evidence, the Image Library, ...), so these would be copied megabyte by megabyte.
_BULK_TAGS = frozenset({
    0x7FE00008,  # Float Pixel Data
    0x7FE00009,  # Double Float Pixel Data
    0x7FE00010,  # Pixel Data
    0x00880200,  # Icon Image Sequence
    0x54000100,  # Waveform Sequence
    0x00420011,  # Encapsulated Document
    0x00282000,  # ICC Profile
})


@dataclass(frozen=True)
class OutputSettings:
    """Which objects to build and how they are labelled."""

    sr: bool = True
    sc: bool = True
    gsps: bool = True
    # The Grad-CAM as a DICOM Segmentation (outputs/heatmap.py); off by default: many PACS
    # refuse SEG and a result set is SR + SC + GSPS unless asked.
    seg: bool = False
    seg_type: str = "binary"
    manufacturer: str = "CXR AI node"
    institution_name: str | None = None
    series_number_sr: int = 9901
    series_number_sc: int = 9902
    series_number_gsps: int = 9903
    series_number_seg: int = 9904
    heatmap_alpha: float = 0.35
    # Type 1 in the GSPS Enhanced General Equipment module: identifies this node.
    device_serial_number: str = "1"
    # Detector candidates below their operating threshold: "omit" them from the SR, or
    # "list" them (Absent, with probability, never with an image region).
    sr_candidates: str = "omit"
    # The SC's transfer syntax as written (lossless; the sender decompresses it for a
    # destination that does not take it) and its longest side in pixels (None: the display
    # image's size, which may already be a reduced resolution level of the source).
    sc_transfer_syntax: str = field(default_factory=lambda: str(fastest_lossless()))
    sc_max_side: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sc_transfer_syntax", str(sendable(self.sc_transfer_syntax)))
        if self.sc_max_side is not None and self.sc_max_side < MIN_SC_SIDE:
            raise ValueError(f"sc_max_side must be at least {MIN_SC_SIDE} (the banner must "
                             f"stay legible), got {self.sc_max_side!r}")
        if not 0.0 <= self.heatmap_alpha <= 1.0:
            raise ValueError(f"heatmap_alpha must be in [0, 1], got {self.heatmap_alpha!r}")
        for name in ("series_number_sr", "series_number_sc", "series_number_gsps",
                     "series_number_seg"):
            value = getattr(self, name)
            if not 0 < value < 2**31:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.manufacturer:
            raise ValueError("manufacturer must not be empty")
        if self.seg_type not in SEG_TYPES:
            raise ValueError(f"seg_type must be one of {SEG_TYPES}, got {self.seg_type!r}")
        if self.sr_candidates not in SR_CANDIDATE_MODES:
            raise ValueError(
                f"sr_candidates must be one of {SR_CANDIDATE_MODES}, got {self.sr_candidates!r}"
            )


@dataclass(frozen=True)
class OutputObject:
    """One DICOM object ready to send."""

    kind: str  # "sr" | "sc" | "gsps" | "seg"
    dataset: pydicom.Dataset
    sop_instance_uid: str
    sop_class_uid: str


@dataclass
class Source:
    """A source image prepared for highdicom, with its result.

    ``original`` is the caller's dataset (never read by the builders); ``work`` is a
    sanitised shallow copy with missing Type 2 attributes filled and no bulk data (pixel
    data, overlays, icons: see :func:`slim_copy`); ``imaged`` is the same copy *with* its
    pixel data, for the one builder that may render pixels (:attr:`pixels`); ``fabricated`` names the
    attributes that were invented (not copied from the source) so builders can keep them
    out of outputs; ``removed`` lists what the sanitiser dropped or emptied.
    """

    original: Dataset
    work: Dataset
    result: ImageResult
    fabricated: set[str] = field(default_factory=set)
    person_names: dict[str, object] = field(default_factory=dict)
    removed: list[Removal] = field(default_factory=list)
    imaged: Dataset | None = None

    @property
    def pixels(self) -> Dataset:
        """The sanitised source with its pixel data (the SC renders it when the analysis
        kept no display image)."""
        return self.work if self.imaged is None else self.imaged

    @property
    def sop_instance_uid(self) -> str:
        return str(self.work.SOPInstanceUID)


def node_version() -> str:
    """The node's own version as SoftwareVersions writes it: ``cxr-ai-node 1.2.3``."""
    try:
        version = metadata.version("cxr-ai-node")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"cxr-ai-node {version}"


def software_versions(models: Sequence[ModelIdentity]) -> list[str]:
    """SoftwareVersions values: the node first, then each model (LO, 64 chars max)."""
    return [node_version(), *(f"{m.name} {m.version}"[:64] for m in models)]


def shallow_copy(ds: Dataset) -> Dataset:
    """A new dataset with copied elements sharing their values (pixel data is not copied).

    ``copy.copy(Dataset)`` shares the element dictionary in pydicom 3, and setting an
    attribute that exists assigns to the element object itself, so both the dictionary
    and the elements must be new for edits of the copy to leave ``ds`` alone. Elements
    not yet decoded stay raw (immutable tuples): decoding them here, on the caller's
    dataset and outside the sanitiser, would let pydicom warn with their values.
    """
    copied = Dataset({tag: _copy_element(ds.get_item(tag)) for tag in ds.keys()})
    if hasattr(ds, "file_meta"):
        copied.file_meta = ds.file_meta
    return copied


def is_bulk(tag: int) -> bool:
    """Pixel data and the other bulk elements a reference never needs (overlay data too)."""
    return tag in _BULK_TAGS or (tag & 0xFF01FFFF == 0x60003000 and tag >> 16 <= 0x601E)


def slim_copy(ds: Dataset) -> Dataset:
    """:func:`shallow_copy` of the header only: no pixel data or other bulk element, so
    highdicom's deep copies of its reference datasets cost kilobytes, not megabytes."""
    copied = Dataset({tag: _copy_element(ds.get_item(tag)) for tag in ds.keys()
                      if not is_bulk(tag)})
    if hasattr(ds, "file_meta"):
        copied.file_meta = ds.file_meta
    return copied


def _copy_element(elem: DataElement | RawDataElement) -> DataElement | RawDataElement:
    return elem if isinstance(elem, RawDataElement) else copy.copy(elem)


def prepare_sources(
    items: Sequence[tuple[Dataset, ImageResult]], *, slim: bool = True
) -> list[Source]:
    """Check that ``items`` form one study and return working copies of the sources.

    ``slim=False`` keeps the bulk data in ``work`` (how the sources were prepared before
    they were slimmed; the tests compare both to prove the outputs are the same).
    """
    if not items:
        raise ValueError("build_outputs() needs at least one (dataset, result) item")
    sources = []
    for ds, result in items:
        missing = [kw for kw in _REQUIRED if kw not in ds]
        if missing:
            raise ValueError(f"Source dataset lacks required attribute(s) {missing}")
        if str(ds.SOPInstanceUID) != result.sop_instance_uid:
            raise ValueError(
                f'Result for SOP Instance UID "{result.sop_instance_uid}" paired with '
                f'dataset "{ds.SOPInstanceUID}"'
            )
        if (int(ds.Rows), int(ds.Columns)) != (result.rows, result.columns):
            raise ValueError(
                f"Result size {result.rows}x{result.columns} does not match image "
                f'"{ds.SOPInstanceUID}" of {ds.Rows}x{ds.Columns}'
            )
        sources.append(_prepare(ds, result, slim=slim))
    study_uids = sorted({str(s.work.StudyInstanceUID) for s in sources})
    if len(study_uids) > 1:
        raise ValueError(f"Items belong to more than one study: {study_uids}")
    sop_uids = [s.sop_instance_uid for s in sources]
    if len(set(sop_uids)) != len(sop_uids):
        raise ValueError(f"Duplicate SOP Instance UIDs among items: {sorted(sop_uids)}")
    return sources


def _prepare(ds: Dataset, result: ImageResult, *, slim: bool) -> Source:
    work = shallow_copy(ds)
    removed = sanitise(work, str(ds.SOPInstanceUID))  # e.g. NIH PatientAge "81": not AS
    fabricated: set[str] = set()
    for keyword in _TYPE2_DEFAULTS:
        if keyword not in work:
            setattr(work, keyword, "")
    person_names = _disambiguate_person_names(work)
    orientation = list(work.get("PatientOrientation") or [])
    if len(orientation) != 2 or not all(orientation):
        work.PatientOrientation = list(DEFAULT_ORIENTATION)
        fabricated.add("PatientOrientation")
    if not _positive_pair(work.get("ImagerPixelSpacing")):
        spacing = work.get("PixelSpacing")
        if _positive_pair(spacing):
            work.ImagerPixelSpacing = list(spacing)
        else:
            # Placeholder only for highdicom's Image Library; removed from the SR again.
            work.ImagerPixelSpacing = [1, 1]
            fabricated.add("ImagerPixelSpacing")
    if "SamplesPerPixel" not in work:
        work.SamplesPerPixel = 1
    return Source(
        original=ds,
        work=slim_copy(work) if slim else work,
        imaged=work,
        result=result,
        fabricated=fabricated,
        person_names=person_names,
        removed=removed,
    )


def _disambiguate_person_names(work: Dataset) -> dict[str, object]:
    """Add a trailing caret to single-component names; return the original values.

    highdicom warns about names like "ward" and puts the name into the warning text,
    which must never reach a log (PHI). "ward^" is the same name (PS3.5 6.2.1.2);
    :func:`restore_person_names` puts the exact source value back into each output.
    """
    originals: dict[str, object] = {}
    for keyword in _PERSON_NAMES:
        value = work.get(keyword)
        if value is not None and str(value) and "^" not in str(value):
            originals[keyword] = value
            setattr(work, keyword, f"{value}^")
    return originals


def restore_person_names(output: Dataset, source: Source) -> None:
    """Give an output the exact person names of its source (see above)."""
    for keyword, value in source.person_names.items():
        if keyword in output:
            # A new element: highdicom may have shared the element object with ``work``.
            output[keyword] = DataElement(tag_for_keyword(keyword), "PN", value)


def _positive_pair(value: object) -> bool:
    try:
        pair = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return False
    return len(pair) == 2 and all(v > 0 for v in pair)


UNPAIRED_BODY_PART = "CHEST"


def set_body_part(output: Dataset, source: Dataset) -> None:
    """General Series of an output: the source's body part (CHEST when it has none), and
    its Laterality; Laterality is Type 2C, required for any body part that may be paired,
    and validators know only a fixed list of unpaired ones (THORAX and LUNG are not on it),
    so it is sent empty ("unknown") with any body part but CHEST when the source gave none.
    """
    output.BodyPartExamined = str(source.get("BodyPartExamined") or UNPAIRED_BODY_PART)
    laterality = source.get("Laterality")
    if laterality:
        output.Laterality = laterality
    elif output.BodyPartExamined != UNPAIRED_BODY_PART:
        output.Laterality = None


def models_of(sources: Sequence[Source]) -> list[ModelIdentity]:
    """Every model that contributed, in first-seen order (the SR's device observers)."""
    seen: dict[str, ModelIdentity] = {}
    for source in sources:
        for model in [*source.result.models, *(f.model for f in source.result.findings)]:
            seen.setdefault(model.device_uid, model)
    return list(seen.values())


def any_demo(sources: Sequence[Source]) -> bool:
    return any(m.demo for m in models_of(sources))


def finding_text(finding: Finding) -> str:
    """Short on-image label: ``Nodule 87%``."""
    return f"{finding.label} {finding.probability * 100:.0f}%"


def model_tag(model: ModelIdentity, *, version: bool = True) -> str:
    """The model as a finding names it: ``cxr-demo-detector 1.0.0, DEMO`` (without the
    version where space is short: ``cxr-demo-detector, DEMO``)."""
    name = f"{model.name} {model.version}" if version else model.name
    return name + (", DEMO" if model.demo else "")


def finding_with_model(finding: Finding) -> str:
    """A finding and the model that made it: ``Nodule 97% (cxr-demo-detector 1.0.0, DEMO)``."""
    return f"{finding_text(finding)} ({model_tag(finding.model)})"


def clip_box(finding: Finding, rows: int, columns: int) -> tuple[float, float, float, float] | None:
    """The finding's box clipped to the image as (x0, y0, x1, y1), None if nothing is left.

    Every output uses this one function so SR, GSPS and SC agree to the last digit.
    """
    if finding.box is None:
        return None
    box = finding.box
    x0 = min(max(box.x0, 0.0), float(columns))
    x1 = min(max(box.x1, 0.0), float(columns))
    y0 = min(max(box.y0, 0.0), float(rows))
    y1 = min(max(box.y1, 0.0), float(rows))
    if x1 <= x0 or y1 <= y0:
        logger.warning(
            "Box of finding %r lies outside its image; reported without box", finding.label
        )
        return None
    return x0, y0, x1, y1


def closed_polyline(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """Closed 5-point (column, row) polyline, the DICOM form of a rectangle."""
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


# The (date, time) attribute pairs that say when an object of each kind was made, besides
# SeriesDate/SeriesTime (every kind). The GSPS IOD has no Content Date; its Presentation
# Creation Date is the same statement (PS3.3 C.11.10).
_CREATION_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "sr": (("ContentDate", "ContentTime"),),
    "sc": (("ContentDate", "ContentTime"), ("DateOfSecondaryCapture", "TimeOfSecondaryCapture")),
    "gsps": (("PresentationCreationDate", "PresentationCreationTime"),),
    "seg": (("ContentDate", "ContentTime"),),
}


def local_time(created: datetime.datetime) -> datetime.datetime:
    """``created`` as the naive local time DICOM dates and times are written in."""
    if created.tzinfo is not None:
        return created.astimezone().replace(tzinfo=None)
    return created


def stamp_created(output: OutputObject, created: datetime.datetime) -> None:
    """Date the object with the moment its result was made, one instant for the whole set.

    Without SeriesDate/SeriesTime (Type 3) a PACS files the AI series under "?"; highdicom
    leaves them out and stamps each object with its own ``now()``. DICOM dates carry no
    zone: an aware ``created`` is written in the node's local time, as highdicom does.
    """
    created = local_time(created)
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S.%f")
    pairs = (
        ("SeriesDate", "SeriesTime"),
        ("InstanceCreationDate", "InstanceCreationTime"),
        *_CREATION_PAIRS[output.kind],
    )
    for date_keyword, time_keyword in pairs:
        setattr(output.dataset, date_keyword, date)
        setattr(output.dataset, time_keyword, time)


def series_uid(uid_seed: str, kind: str) -> str:
    return derive_uid(uid_seed, "series", kind)


def instance_uid(uid_seed: str, kind: str, *key: str) -> str:
    return derive_uid(uid_seed, "instance", kind, *key)


def tracking(
    uid_seed: str, source: Source, image_index: int, finding_index: int
) -> tuple[str, str]:
    """(Tracking Identifier, Tracking UID) of one finding, shared by the SR and the GSPS.

    The identifier is LO in the GSPS (64 characters), so it stays short and UID-free.
    """
    finding = source.result.findings[finding_index]
    text = f"{finding.label} img{image_index} #{finding_index + 1}"[:64]
    uid = derive_uid(
        uid_seed,
        "tracking",
        source.sop_instance_uid,
        finding.model.device_uid,
        finding.label,
        str(finding_index),
    )
    return text, uid
