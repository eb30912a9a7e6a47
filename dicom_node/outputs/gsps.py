"""Grayscale Softcopy Presentation State: the boxes as vector graphics a viewer can toggle.

A GSPS replaces the viewer's own grayscale pipeline for the images it references, so it
must repeat the source's Modality LUT (highdicom copies it), VOI (copied here, window or
VOI LUT) and polarity: for MONOCHROME1 the Presentation LUT Shape is INVERSE, else the
radiograph would show inverted. One GSPS has one Presentation LUT and (in highdicom) one
image size, so images that differ in photometric interpretation, size or rescale get one
GSPS each, all in the same series; a usual study (one size, one polarity) gets one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from highdicom import (
    VOILUT,
    PresentationLUTShapeValues,
    PresentationLUTTransformation,
    ReferencedImageSequence,
)
from highdicom.color import CIELabColor
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextObject,
)
from pydicom.dataset import Dataset
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage

from dicom_node.outputs import render
from dicom_node.outputs.common import (
    DEMO_BANNER,
    DISCLAIMER,
    NO_FINDING_TEXT,
    OutputObject,
    OutputSettings,
    Source,
    any_demo,
    clip_box,
    closed_polyline,
    finding_text,
    instance_uid,
    models_of,
    restore_person_names,
    series_uid,
    set_body_part,
    software_versions,
    tracking,
)
from dicom_node.outputs.ood import WITHHELD_TEXT, banner_lines

logger = logging.getLogger(__name__)

LAYER_NAME = "AI_FINDINGS"
_DISPLAY_LINES = 2  # banner + summary: the pixel labels stay below both
CONTENT_LABEL = "AI_RESULTS"
SERIES_DESCRIPTION = "AI findings GSPS (CXR AI node)"
_LAYER_COLOUR = CIELabColor(97.1, -21.6, 94.5)  # yellow, like the SC's first box colour


def build_gsps(
    sources: Sequence[Source], settings: OutputSettings, uid_seed: str
) -> list[OutputObject]:
    """One GSPS per group of compatible images (normally: one for the study)."""
    groups: dict[tuple, list[tuple[int, Source]]] = {}
    for image_index, source in enumerate(sources, start=1):
        groups.setdefault(_group_key(source.work), []).append((image_index, source))
    series = series_uid(uid_seed, "gsps")
    outputs = []
    for number, members in enumerate(groups.values(), start=1):
        outputs.append(_build_group(members, number, settings, uid_seed, series))
    if len(outputs) > 1:
        logger.debug("Study needs %d GSPS (images differ in size or polarity)", len(outputs))
    return outputs


def _group_key(ds: Dataset) -> tuple:
    rescale = tuple(str(ds.get(k, "")) for k in ("RescaleSlope", "RescaleIntercept", "RescaleType"))
    return int(ds.Rows), int(ds.Columns), str(ds.PhotometricInterpretation), rescale


def _build_group(
    members: list[tuple[int, Source]],
    number: int,
    settings: OutputSettings,
    uid_seed: str,
    series: str,
) -> OutputObject:
    sources = [source for _, source in members]
    images = [source.work for source in sources]
    layer = GraphicLayer(
        LAYER_NAME,
        order=1,
        description="AI results, not for primary diagnosis",
        display_color=_LAYER_COLOUR,
    )
    annotations = [_annotation(index, source, layer, uid_seed) for index, source in members]
    inverse = str(images[0].PhotometricInterpretation) == "MONOCHROME1"
    shape = PresentationLUTShapeValues.INVERSE if inverse else PresentationLUTShapeValues.IDENTITY
    sop_uid = instance_uid(uid_seed, "gsps", *sorted(s.sop_instance_uid for s in sources))
    voi = _voi_transformations(images)
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        series_instance_uid=series,
        series_number=settings.series_number_gsps,
        sop_instance_uid=sop_uid,
        instance_number=number,
        manufacturer=settings.manufacturer,
        manufacturer_model_name="CXR AI node",
        software_versions=software_versions(models_of(sources)),
        device_serial_number=settings.device_serial_number,
        content_label=CONTENT_LABEL,
        content_description="AI findings - not for primary diagnosis",
        graphic_annotations=annotations,
        graphic_layers=[layer],
        institution_name=settings.institution_name,
        voi_lut_transformations=voi or None,  # None: no source VOI, nothing to copy
        presentation_lut_transformation=PresentationLUTTransformation(presentation_lut_shape=shape),
        series_description=SERIES_DESCRIPTION,
    )
    set_body_part(gsps, images[0])
    restore_person_names(gsps, sources[0])
    logger.debug("Built GSPS %s for %d image(s)", sop_uid, len(images))
    return OutputObject("gsps", gsps, sop_uid, GrayscaleSoftcopyPresentationStateStorage)


def _annotation(
    image_index: int, source: Source, layer: GraphicLayer, uid_seed: str
) -> GraphicAnnotation:
    ds = source.work
    rows, cols = int(ds.Rows), int(ds.Columns)
    graphics = []
    boxed: list[tuple[str, tuple[float, float, float, float]]] = []
    unboxed = []
    for finding_index, finding in enumerate(source.result.findings):
        if not finding.positive:
            continue
        box = clip_box(finding, rows, cols)
        if box is None:
            unboxed.append(finding_text(finding))
            continue
        track_id, track_uid = tracking(uid_seed, source, image_index, finding_index)
        graphics.append(
            GraphicObject(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=np.array(closed_polyline(*box), dtype=np.float64),
                units=AnnotationUnitsValues.PIXEL,
                tracking_id=track_id,
                tracking_uid=track_uid,
            )
        )
        boxed.append((finding_text(finding), box))
    texts, unplaced = _label_texts(boxed, rows, cols)
    texts += _display_texts(source, unboxed + unplaced)
    return GraphicAnnotation(
        referenced_images=[ds],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=texts,
    )


def _label_texts(
    boxed: list[tuple[str, tuple[float, float, float, float]]], rows: int, cols: int
) -> tuple[list[TextObject], list[str]]:
    """Text boxes beside the boxes, laid out like the SC's labels (never overlapping each
    other or the banner lines); the texts that found no room go to the summary line."""
    top_limit = math.ceil(_display_line_top(_DISPLAY_LINES) * rows)
    layout = render.layout_labels(
        [text for text, _ in boxed], [box for _, box in boxed], rows, cols, top_limit
    )
    texts, unplaced = [], []
    for (text, _), label in zip(boxed, layout, strict=True):
        if label is None:
            unplaced.append(text)
            continue
        texts.append(
            TextObject(
                text_value=text,
                units=AnnotationUnitsValues.PIXEL,
                bounding_box=tuple(float(v) for v in label.rect),
                text_justification="LEFT",
            )
        )
    return texts, unplaced


def _display_line_top(index: int) -> float:
    """Top of banner line ``index`` in DISPLAY units (fraction of the displayed area)."""
    return 0.01 + 0.045 * index


def _display_texts(source: Source, unboxed: list[str]) -> list[TextObject]:
    """Banner and summary lines in DISPLAY units (fractions of the displayed area)."""
    banner = DISCLAIMER + (f" - {DEMO_BANNER}" if any_demo([source]) else "")
    lines = [banner, *banner_lines(source.result)]
    if not source.result.positive_findings:
        lines.append(WITHHELD_TEXT if source.result.withheld else NO_FINDING_TEXT)
    elif unboxed:
        lines.append("AI: " + ", ".join(unboxed))
    texts = []
    for k, line in enumerate(lines):
        top = _display_line_top(k)
        texts.append(
            TextObject(
                text_value=line[:1024],
                units=AnnotationUnitsValues.DISPLAY,
                bounding_box=(0.02, top, 0.98, top + 0.04),
            )
        )
    return texts


def _voi_transformations(images: Sequence[Dataset]) -> list[SoftcopyVOILUTTransformation]:
    """The sources' own VOI, per image when there is more than one image."""
    many = len(images) > 1
    transformations = []
    for ds in images:
        refs = ReferencedImageSequence(referenced_images=[ds]) if many else None
        if "VOILUTSequence" in ds and ds.VOILUTSequence:
            luts = [_voi_lut(item) for item in ds.VOILUTSequence]
            transformations.append(
                SoftcopyVOILUTTransformation(voi_luts=luts, referenced_images=refs)
            )
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            window = _window_transformation(ds, refs)
            if window is not None:
                transformations.append(window)
    return transformations


def _window_transformation(
    ds: Dataset, refs: ReferencedImageSequence | None
) -> SoftcopyVOILUTTransformation | None:
    """All of the source's valid windows (a viewer offers them as presets)."""
    pairs = [
        (float(c), float(w))
        for c, w in zip(_as_list(ds.WindowCenter), _as_list(ds.WindowWidth), strict=False)
        if c is not None and w is not None and float(w) > 0
    ]
    if not pairs:
        logger.warning(
            "Image %s has no usable VOI window; GSPS leaves VOI to the viewer", ds.SOPInstanceUID
        )
        return None
    raw = ds.get("WindowCenterWidthExplanation")
    explanations = [str(e) for e in _as_list(raw)] if raw else []
    if len(explanations) != len(pairs) or not all(explanations):
        explanations = []
    return SoftcopyVOILUTTransformation(
        window_center=[c for c, _ in pairs],
        window_width=[w for _, w in pairs],
        window_explanation=explanations or None,
        voi_lut_function=ds.get("VOILUTFunction") or None,
        referenced_images=refs,
    )


def _as_list(value: object) -> list:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def _voi_lut(item: Dataset) -> VOILUT:
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    raw = item.LUTData
    if isinstance(raw, bytes):
        data = np.frombuffer(raw, dtype="<u2")[:entries]
    else:
        data = np.asarray(_as_list(raw), dtype=np.uint16)
    data = data.astype(np.uint8) if bits <= 8 else data.astype(np.uint16)
    return VOILUT(
        first_mapped_value=first_mapped,
        lut_data=data,
        lut_explanation=item.get("LUTExplanation"),
    )
