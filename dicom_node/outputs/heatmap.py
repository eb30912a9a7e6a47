"""The Grad-CAM heatmap as a DICOM Segmentation: an object a viewer can toggle and fade.

The SC burns the heatmap into pixels; this object carries the map itself, one segment per
positive finding, over the source image, in the source study.

Why a Segmentation (SOP Class 1.2.840.10008.5.1.4.1.1.66.4) and not a Parametric Map
(checked against highdicom 0.28.2 and the OHIF / Cornerstone3D sources, 2026-12):

- A CR/DX image has no Frame of Reference and no Image Plane module. highdicom's
  ``Segmentation`` accepts such a source: without ``FrameOfReferenceUID`` it writes no
  Plane Position / Orientation functional groups and no Dimension Organization Type, and
  refers each frame to its source through the Derivation Image Sequence (Referenced SOP
  Instance UID + Spatial Locations Preserved YES). The IOD then needs Patient Orientation
  (General Image, Type 2C when there is no Frame of Reference): dciodvfy reports
  "Missing attribute Type 2C Conditional Element=<PatientOrientation>" without it, so the
  source's value is copied (empty when the source had none).
- A Parametric Map requires a Frame of Reference and plane positions of every frame; on a
  projection radiograph they would be invented. OHIF's ``cornerstone-dicom-pmap`` loads a
  map as a volume, which needs exactly that geometry.
- FRACTIONAL keeps the Grad-CAM's grades (0..255 for 0..1). OHIF 3.x does not load it:
  ``@cornerstonejs/adapters`` ``labelmapImagesFromBuffer`` throws "Fractional
  segmentations are not yet supported" for SegmentationType FRACTIONAL (and older dcmjs
  adapters refused fractional values the same way). Weasis, 3D Slicer and highdicom read
  it. OHIF 3.13.2's own bundle (``dist/9383.bundle.*.js``) accepts a FRACTIONAL SEG only
  when every value is 0 or MaximumFractionalValue ("pseudo-binary"), so a graded heatmap
  is refused there too.
- ``seg_type: binary`` (the default) writes the region where the map is >= 0.5, the form
  OHIF's stack segmentation (OHIF 3.9+, OHIF/Viewers#4103) reads. Proven in Chromium with
  OHIF 3.13.2 over Orthanc's DICOMweb: the SEG series is listed, loads after OHIF's "Do you
  want to open this Segmentation?", one segment per finding with its label, drawn over the
  nodule, no page error. OHIF 3.13.2 aligns every SEG
  frame through its Plane Orientation functional group (``checkOrientation`` reads
  ``PerFrameFunctionalGroupsSequence[0].PlaneOrientationSequence.ImageOrientationPatient``
  and fails with a TypeError without it) against the source image's orientation, which it
  takes as [1, 0, 0, 0, 1, 0] for a radiograph without ImageOrientationPatient. The binary
  SEG therefore carries a shared Plane Orientation (Patient) of the source's own
  ImageOrientationPatient, or that identity when the source has none: it states that the
  SEG frame's axes are the source's pixel axes, nothing about the patient (there is no
  Frame of Reference); dciodvfy accepts it. OHIF's SEG viewport also reads the shared
  Pixel Measures functional group unconditionally (``_getReferencedDisplaySetMetadata``
  in ``dist/899.bundle.*.js``: "Cannot destructure property 'SpacingBetweenSlices' of
  'PixelMeasures' as it is undefined" without it, seen in Chromium), and highdicom's
  reader refuses Pixel Measures without Slice Thickness, so the binary SEG carries Pixel
  Measures of the source's pixel spacing (Pixel Spacing, else Imager Pixel Spacing, else
  1\\1 as OHIF assumes) and a nominal Slice Thickness of 1 mm (a projection has none).
  The fractional SEG stays without these nominal values. Each segment has a Recommended
  Display CIELab Value (the overlay's box colours), else OHIF warns and picks its own.

Each segment: label = finding + model (``Nodule (cxr-demo 1.0.0, DEMO)``, LO 64), property
type = the finding's code, category "Morphologically abnormal structure", algorithm type
AUTOMATIC, algorithm identification = the bundle (name, version, family "Artificial
Intelligence"), and the finding's tracking identifier and UID shared with the SR and GSPS.
A finding with its own Grad-CAM (``ImageResult.finding_heatmaps``) gets that map; when a
result carries only the combined map, it becomes one segment naming every positive finding.
An image without a heatmap gets no SEG (a Segmentation needs at least one segment).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from highdicom import AlgorithmIdentificationSequence
from highdicom.color import CIELabColor
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

from ai.types import Finding, ModelIdentity
from dicom_node.outputs.common import (
    DISCLAIMER,
    OutputObject,
    OutputSettings,
    Source,
    finding_with_model,
    instance_uid,
    model_tag,
    models_of,
    restore_person_names,
    series_uid,
    set_body_part,
    shallow_copy,
    software_versions,
    tracking,
)
from dicom_node.outputs.render import BOX_COLOURS

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI heatmap SEG (CXR AI node)"
CONTENT_LABEL = "AI_GRADCAM"
MAX_FRACTIONAL = 255  # FRACTIONAL: 8-bit values, 255 = 1.0
BINARY_LEVEL = 0.5  # seg_type "binary": the region where the Grad-CAM is at least this
SOURCE_AXES = (1, 0, 0, 0, 1, 0)  # SEG frame axes = source pixel axes (binary SEG, for OHIF)
NOMINAL_SLICE_THICKNESS = 1.0  # binary SEG, for OHIF and highdicom: a projection has none
_CATEGORY = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
_COMBINED_TYPE = _CATEGORY  # no finding code fits a map of several findings


@dataclass(frozen=True)
class _Segment:
    """One segment before encoding: its map and what it says."""

    label: str
    concept: CodedConcept
    model: ModelIdentity
    heatmap: np.ndarray  # (rows, columns) float in [0, 1]
    tracking: tuple[str, str] | None


def build_seg(
    sources: Sequence[Source], settings: OutputSettings, uid_seed: str
) -> list[OutputObject]:
    """One SEG per source image with a heatmap, all in one new series."""
    series = series_uid(uid_seed, "seg")
    outputs = []
    for index, source in enumerate(sources, start=1):
        segments = segments_of(source, index, uid_seed)
        if segments:
            outputs.append(_build_one(source, segments, index, settings, uid_seed, series))
    return outputs


def segments_of(source: Source, image_index: int, uid_seed: str) -> list[_Segment]:
    """The segments of one image, in the order of its findings."""
    result = source.result
    segments = []
    for finding_index, finding in enumerate(result.findings):
        own = result.finding_heatmaps.get((finding.model.device_uid, finding.label))
        if finding.positive and own is not None:
            segments.append(
                _Segment(
                    _label(finding),
                    _concept(finding),
                    finding.model,
                    own,
                    tracking(uid_seed, source, image_index, finding_index),
                )
            )
    if segments or result.heatmap is None or not result.positive_findings:
        return segments
    positives = result.positive_findings
    if len(positives) == 1:  # the combined map is this finding's map
        finding = positives[0]
        index = result.findings.index(finding)
        track = tracking(uid_seed, source, image_index, index)
        return [_Segment(_label(finding), _concept(finding), finding.model, result.heatmap, track)]
    names = ", ".join(f.label for f in positives)
    label = f"AI heatmap: {names}"[:64]
    return [_Segment(label, _COMBINED_TYPE, positives[0].model, result.heatmap, None)]


def _label(finding: Finding) -> str:
    return f"{finding.label} ({model_tag(finding.model)})"[:64]


def _concept(finding: Finding) -> CodedConcept:
    c = finding.concept
    return CodedConcept(c.value, c.scheme, c.meaning)


def _algorithm(model: ModelIdentity) -> AlgorithmIdentificationSequence:
    return AlgorithmIdentificationSequence(
        name=model.name[:64],
        version=model.version[:64],
        family=codes.cid7162.ArtificialIntelligence,
        source=model.manufacturer[:64],
    )


def _pixels(segments: Sequence[_Segment], seg_type: str, shape: tuple[int, int]) -> np.ndarray:
    """(1, rows, columns, segments): fractional float in [0, 1], or binary bool."""
    for segment in segments:
        if segment.heatmap.shape != shape:
            raise ValueError(
                f'Heatmap of segment "{segment.label}" has shape {segment.heatmap.shape}, '
                f"the image is {shape[0]}x{shape[1]}"
            )
    stacked = np.stack([np.clip(s.heatmap, 0.0, 1.0) for s in segments], axis=-1)[np.newaxis]
    if seg_type == "binary":
        return stacked >= BINARY_LEVEL
    # Quantised to the 256 stored levels here (highdicom rounds the same way, so nothing
    # changes): its range check runs np.unique over every value, 0.44 -> 0.3 s for two
    # segments of 2000 x 2000 once there are at most 256 distinct values.
    return (np.round(stacked * MAX_FRACTIONAL) / MAX_FRACTIONAL).astype(np.float32)


def _build_one(
    source: Source,
    segments: Sequence[_Segment],
    index: int,
    settings: OutputSettings,
    uid_seed: str,
    series: str,
) -> OutputObject:
    ref = source.work
    descriptions = [
        SegmentDescription(
            segment_number=number,
            segment_label=segment.label,
            segmented_property_category=_CATEGORY,
            segmented_property_type=segment.concept,
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(segment.model),
            tracking_id=segment.tracking[0] if segment.tracking else None,
            tracking_uid=segment.tracking[1] if segment.tracking else None,
            display_color=CIELabColor.from_rgb(*BOX_COLOURS[(number - 1) % len(BOX_COLOURS)]),
        )
        for number, segment in enumerate(segments, start=1)
    ]
    sop_uid = instance_uid(uid_seed, "seg", source.sop_instance_uid)
    seg = Segmentation(
        source_images=[_geometry_source(ref)],
        pixel_array=_pixels(segments, settings.seg_type, (int(ref.Rows), int(ref.Columns))),
        segmentation_type=SegmentationTypeValues(settings.seg_type.upper()),
        segment_descriptions=descriptions,
        series_instance_uid=series,
        series_number=settings.series_number_seg,
        sop_instance_uid=sop_uid,
        instance_number=index,
        manufacturer=settings.manufacturer,
        manufacturer_model_name="CXR AI node",
        software_versions=software_versions(models_of([source])),
        device_serial_number=settings.device_serial_number,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label=CONTENT_LABEL,
        content_description="AI Grad-CAM heatmap - not for primary diagnosis",
        series_description=SERIES_DESCRIPTION,
        institution_name=settings.institution_name,
        max_fractional_value=MAX_FRACTIONAL,
        omit_empty_frames=False,  # one frame per segment, even a flat one
    )
    seg.copy_patient_and_study_information(ref)
    if settings.seg_type == "binary":
        _add_viewer_geometry(seg, source)
    _describe(seg, source)
    restore_person_names(seg, source)
    logger.debug("Built SEG %s (%d segment(s)) for source %s", sop_uid, len(segments),
                 source.sop_instance_uid)
    return OutputObject("seg", seg, sop_uid, SegmentationStorage)


def _add_viewer_geometry(seg: Segmentation, source: Source) -> None:
    """Plane Orientation (Patient) and Pixel Measures for OHIF's SEG loader and viewport
    (see the module docstring)."""
    ref = source.work
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(
        ref.get("ImageOrientationPatient") or SOURCE_AXES
    )
    measures = Dataset()
    measures.PixelSpacing = _source_spacing(source)
    measures.SliceThickness = NOMINAL_SLICE_THICKNESS
    shared = seg.SharedFunctionalGroupsSequence[0]
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]


def _source_spacing(source: Source) -> list[float]:
    """The spacing of the source's pixel grid: Pixel Spacing when two positive numbers,
    else Imager Pixel Spacing (common.py fills it from either, or marks it invented)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword == "ImagerPixelSpacing" and keyword in source.fabricated:
            break
        try:
            pair = [float(v) for v in source.work.get(keyword) or []]
        except (TypeError, ValueError):
            continue
        if len(pair) == 2 and all(v > 0 for v in pair):
            return pair
    return [1.0, 1.0]


def _geometry_source(ref: Dataset) -> Dataset:
    """The source as highdicom should see it: without Pixel Spacing.

    highdicom copies a projection source's Pixel Spacing into a Pixel Measures functional
    group without Slice Thickness, and then its own reader refuses the object
    ("Sequence does not have the required attributes for a Pixel Measures Sequence",
    highdicom 0.28.2, ``PixelMeasuresSequence.from_sequence``); a zero spacing (the real
    Philips CR has "0\\0") also fails dciodvfy ("Value is zero ... <Pixel Spacing>").
    A radiograph has no slice thickness to give, and every frame maps to its source pixel
    for pixel (Spatial Locations Preserved YES), so the SEG carries no Pixel Measures.
    """
    if "PixelSpacing" not in ref:
        return ref
    copied = shallow_copy(ref)
    del copied.PixelSpacing
    return copied


def _describe(seg: Segmentation, source: Source) -> None:
    """What highdicom leaves to us: orientation (Type 2C without a Frame of Reference),
    body part, and the warning every AI object carries."""
    ref = source.work
    if "PatientOrientation" in source.fabricated:
        seg.PatientOrientation = None  # empty rather than a guess
    else:
        seg.PatientOrientation = list(ref.PatientOrientation)
    set_body_part(seg, ref)
    models = "; ".join(model_tag(m) for m in models_of([source])) or "none"
    positives = ", ".join(finding_with_model(f) for f in source.result.positive_findings)
    seg.ImageComments = (
        f"{DISCLAIMER}. Grad-CAM heatmap. Models: {models}. "
        f"Positive findings: {positives or 'none'}."
    )[:10240]
