"""Secondary-capture overlay: the source as a viewer shows it, heatmap and boxes burnt in.

Every viewer shows an SC, including those that ignore SR and GSPS, so this is the object
that must carry the warning on its pixels: "AI RESULT - NOT FOR PRIMARY DIAGNOSIS" (and
"DEMO MODEL" for the phantom-trained demo bundles), plus BurnedInAnnotation=YES.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from ai.types import Finding, ImageResult
from dicom_node.delivery.syntaxes import convert
from dicom_node.outputs import render
from dicom_node.outputs.common import (
    DEMO_BANNER,
    DISCLAIMER,
    NO_FINDING_TEXT,
    OutputObject,
    OutputSettings,
    Source,
    clip_box,
    finding_text,
    finding_with_model,
    instance_uid,
    model_tag,
    models_of,
    restore_person_names,
    series_uid,
    set_body_part,
    software_versions,
)
from dicom_node.outputs.ood import WITHHELD_TEXT, banner_lines

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI overlay (CXR AI node)"
BOX_TEXT = render.BOX_COLOURS[0]
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
_LOSSY_KEYWORDS = (
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)


def build_sc(
    sources: Sequence[Source], settings: OutputSettings, uid_seed: str
) -> list[OutputObject]:
    """One RGB SC per source image, all in one new series."""
    return [encode_sc(draw_sc(source, index, settings, uid_seed), settings)
            for index, source in enumerate(sources, start=1)]


def draw_sc(
    source: Source, index: int, settings: OutputSettings, uid_seed: str
) -> OutputObject:
    """The SC of one source image, the ``index``-th (from 1) of its series, drawn and not
    yet encoded (Explicit VR Little Endian): :func:`encode_sc` finishes it."""
    return _build_one(source, index, settings, uid_seed, series_uid(uid_seed, "sc"))


def encode_sc(sc: OutputObject, settings: OutputSettings) -> OutputObject:
    """``sc`` encoded in place in ``outputs.sc_transfer_syntax`` (the same object back).

    Encoded here rather than by highdicom, which takes pydicom's first plugin (its own RLE
    encoder is ten times slower than pylibjpeg-rle) and cannot write a deflated SC. The
    JPEG-LS encoder releases the GIL (``dicom_node.delivery.jpegls``): ``build_outputs``
    runs this on another thread while it builds the SR and GSPS.
    """
    convert(sc.dataset, UID(settings.sc_transfer_syntax))
    return sc


@dataclass(frozen=True)
class Overlay:
    """The SC's pixels and what was burnt into them (for callers that check the layout)."""

    pixels: np.ndarray  # RGB uint8 (display rows, display columns, 3)
    labels: list[render.PlacedLabel]
    banner_bottom: int  # first row below the banner and the summary line
    summary: str | None  # the line under the banner (findings without a label on the image)


def overlay_grey(source: Source, settings: OutputSettings) -> np.ndarray:
    """The grey image the overlay is drawn on, at the size the SC will have.

    The display image the analysis kept is used as it is, also when it is smaller than the
    source (a JPEG 2000 decoded at a reduced resolution level; same aspect ratio); without
    one the source is rendered again. ``settings.sc_max_side`` shrinks it further.
    """
    result = source.result
    grey = result.display  # what the model saw, when the analysis kept it: no second decode
    if grey is None or not _same_aspect(grey.shape, (result.rows, result.columns)):
        grey = render.render_grey(source.pixels)  # sanitised: a bad VOI value cannot break it
    limit = settings.sc_max_side
    if limit is not None and max(grey.shape) > limit:
        scale = limit / max(grey.shape)
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    return grey


def _same_aspect(shape: tuple[int, ...], source: tuple[int, int]) -> bool:
    """A display of the source's shape or a reduction of it (each side within a pixel of
    the same scale, as a resolution level rounds)."""
    if len(shape) != 2 or not 0 < shape[0] <= source[0] or not 0 < shape[1] <= source[1]:
        return False
    scale = shape[0] / source[0]
    return abs(shape[1] - source[1] * scale) <= 1.0 + scale


def to_display(
    box: tuple[float, float, float, float], source: tuple[int, int], display: tuple[int, int]
) -> tuple[float, float, float, float]:
    """A box in source pixel coordinates mapped onto a display of another size."""
    sy, sx = display[0] / source[0], display[1] / source[1]
    x0, y0, x1, y1 = box
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy


def render_overlay(source: Source, settings: OutputSettings) -> Overlay:
    """Grey display image, heatmap, boxes, labels laid out clear of each other, banner.

    Drawn at the display size (:func:`overlay_grey`); boxes and heatmap come in source
    pixels and are scaled onto it (the SR, GSPS and SEG keep source pixels).
    """
    result = source.result
    grey = overlay_grey(source, settings)
    rgb = cv2.merge((grey, grey, grey))
    if result.heatmap is not None:
        render.blend_heatmap(rgb, result.heatmap, settings.heatmap_alpha)
    banner = [DISCLAIMER]
    if any(m.demo for m in [*result.models, *(f.model for f in result.findings)]):
        banner.append(DEMO_BANNER)
    banner += banner_lines(result)
    rows, cols = grey.shape
    # Labels stay out from under the banner and the summary line below it.
    top_limit = render.banner_height([*banner, "AI"], rows, cols)
    source_shape = (result.rows, result.columns)
    boxed = [
        (f, to_display(box, source_shape, (rows, cols)))
        for f in result.positive_findings
        if (box := clip_box(f, result.rows, result.columns)) is not None
    ]
    for index, (_, box) in enumerate(boxed):
        render.draw_box(rgb, box, render.BOX_COLOURS[index % len(render.BOX_COLOURS)])
    layout = render.layout_labels(
        [finding_text(f) for f, _ in boxed], [box for _, box in boxed], rows, cols, top_limit
    )
    for index, label in enumerate(layout):
        if label is not None:
            render.draw_label(rgb, label, render.BOX_COLOURS[index % len(render.BOX_COLOURS)])
    labelled = {id(f) for (f, _), label in zip(boxed, layout, strict=True) if label is not None}
    bottom = render.draw_banner(rgb, banner)
    summary = _summary_line(result, labelled, rows, cols)
    if summary:
        bottom = render.draw_banner(rgb, [summary], bottom, render.LABEL_BACKGROUND, BOX_TEXT)
    placed = [label for label in layout if label is not None]
    return Overlay(rgb, placed, bottom, summary)


def _summary_line(
    result: ImageResult, labelled_ids: set[int], rows: int, cols: int
) -> str | None:
    """Positive findings without a label on the image (classifiers; no room) are listed
    under the banner with their models, as long as the line fits at full size: with the
    model versions, else with the model names, else without models (ImageComments always
    names them)."""
    if not result.positive_findings:
        return WITHHELD_TEXT if result.withheld else NO_FINDING_TEXT
    unlabelled = [f for f in result.positive_findings if id(f) not in labelled_ids]
    if not unlabelled:
        return None
    for version in (True, False):
        line = "AI: " + _grouped_by_model(unlabelled, version=version)
        if render.banner_fits(line, rows, cols):
            return line
    return "AI: " + ", ".join(finding_text(f) for f in unlabelled)


def _grouped_by_model(findings: list[Finding], *, version: bool) -> str:
    """``nodule 50%, effusion 45% (cxr-demo-classifier 1.0.0, DEMO); Mass 70% (...)``."""
    groups: dict[str, list[str]] = {}
    for finding in findings:
        tag = model_tag(finding.model, version=version)
        groups.setdefault(tag, []).append(finding_text(finding))
    return "; ".join(f"{', '.join(texts)} ({tag})" for tag, texts in groups.items())


def _build_one(
    source: Source, index: int, settings: OutputSettings, uid_seed: str, series: str
) -> OutputObject:
    ref = source.work
    sop_uid = instance_uid(uid_seed, "sc", source.sop_instance_uid)
    models = list({m.device_uid: m for m in source.result.models}.values())
    sc = SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=render_overlay(source, settings).pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series,
        series_number=settings.series_number_sc,
        sop_instance_uid=sop_uid,
        instance_number=index,
        manufacturer=settings.manufacturer,
        patient_orientation=tuple(ref.PatientOrientation),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name="CXR AI node",
        software_versions=software_versions(models),
        institution_name=settings.institution_name,
    )
    # from_ref_dataset copies only what the SC constructor needs; the rest of the patient
    # and study modules (StudyDescription, PatientAge, ...) keeps the study consistent.
    sc.copy_patient_and_study_information(ref)
    _describe(sc, source)
    restore_person_names(sc, source)
    logger.debug("Built SC %s for source %s", sop_uid, source.sop_instance_uid)
    return OutputObject("sc", sc, sop_uid, SecondaryCaptureImageStorage)


def _describe(sc: Dataset, source: Source) -> None:
    """Attributes highdicom leaves to us: provenance, burnt-in text, body part."""
    ref = source.work
    if "PatientOrientation" in source.fabricated:
        sc.PatientOrientation = None  # Type 2C: empty rather than a guess
    sc.ConversionType = "WSD"  # workstation: rendered by software from a source image
    sc.BurnedInAnnotation = "YES"
    set_body_part(sc, ref)
    models = "; ".join(model_tag(m) for m in models_of([source])) or "none"
    sc.DerivationDescription = (
        "AI overlay of the source image: VOI-rendered grey image with heatmap and boxes "
        f"of positive findings burnt in. {DISCLAIMER}."
    )[:1024]
    positives = ", ".join(finding_with_model(f) for f in source.result.positive_findings)
    sc.ImageComments = (
        f"{DISCLAIMER}. Models: {models}. Positive findings: {positives or 'none'}."
    )[:10240]
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _SOURCE_PURPOSE
    item.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [item]
    if str(ref.get("LossyImageCompression", "")) == "01":
        # Once lossy, always lossy (PS3.3 C.7.6.1.1.5): the derived image says so too.
        for keyword in _LOSSY_KEYWORDS:
            if keyword in ref:
                setattr(sc, keyword, ref.get(keyword))
