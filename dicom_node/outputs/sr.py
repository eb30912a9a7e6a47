"""TID 1500 Measurement Report in a Comprehensive SR: every finding, coded.

Laid out the way OHIF and IHE AI Results read it: root 126000 "Imaging Measurement
Report", the model as device observer (its device UID changes with every model version),
an Image Library of the source images, and one measurement group per finding with a
Tracking Identifier and UID, the finding's code, its probability as a NUM (DCM 111012
"Certainty of Finding", UCUM %) and its presence as a qualitative evaluation. Findings
with a box are planar ROI groups (TID 1410) whose region is a closed 5-point POLYLINE in
source pixels; CR/DX images have no Frame of Reference, so regions are 2D ``ImageRegion``.
The study's overall impression (normal/abnormal) sits in the report's "Qualitative
Evaluations" container (TID 1500 row 12, which highdicom does not build itself).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage

from ai.types import Finding, ModelIdentity
from dicom_node.outputs.common import (
    OutputObject,
    OutputSettings,
    Source,
    clip_box,
    closed_polyline,
    instance_uid,
    models_of,
    restore_person_names,
    series_uid,
    software_versions,
    tracking,
)

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI findings SR (CXR AI node)"
PROCEDURE = CodedConcept("399208008", "SCT", "Plain chest X-ray")
CERTAINTY = CodedConcept("111012", "DCM", "Certainty of Finding")
PERCENT = CodedConcept("%", "UCUM", "Percent")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
NORMAL = CodedConcept("17621005", "SCT", "Normal")
ABNORMAL = CodedConcept("263654008", "SCT", "Abnormal")
IMPRESSION = CodedConcept("121073", "DCM", "Impression")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
# Image Library descriptors highdicom writes from attributes we may have had to invent.
_DESCRIPTOR_SOURCES = {
    "111044": "PatientOrientation",  # Patient Orientation Row
    "111043": "PatientOrientation",  # Patient Orientation Column
    "111026": "ImagerPixelSpacing",  # Horizontal Pixel Spacing
    "111066": "ImagerPixelSpacing",  # Vertical Pixel Spacing
}


def build_sr(sources: Sequence[Source], settings: OutputSettings, uid_seed: str) -> OutputObject:
    """One SR for the study, covering every finding of every image."""
    groups = [
        _group(source, image_index, finding_index, uid_seed)
        for image_index, source in enumerate(sources, start=1)
        for finding_index in range(len(source.result.findings))
    ]
    if not groups:
        uids = [s.sop_instance_uid for s in sources]
        raise ValueError(f"No findings to report for images {uids}")
    models = models_of(sources)
    report = MeasurementReport(
        observation_context=_observation_context(models),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
        referenced_images=[s.work for s in sources],
    )
    _drop_invented_descriptors(report, sources)
    report[0].ContentSequence.append(_impression(sources))
    sop_uid = instance_uid(uid_seed, "sr")
    sr = ComprehensiveSR(
        evidence=[s.work for s in sources],
        content=report,
        series_instance_uid=series_uid(uid_seed, "sr"),
        series_number=settings.series_number_sr,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        institution_name=settings.institution_name,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name="CXR AI node",
        software_versions=software_versions(models),
    )
    restore_person_names(sr, sources[0])
    logger.debug("Built SR %s with %d measurement groups", sop_uid, len(groups))
    return OutputObject("sr", sr, sop_uid, ComprehensiveSRStorage)


def _observation_context(models: Sequence[ModelIdentity]) -> ObservationContext:
    """Every model as a device observer (TID 1002 may repeat)."""
    contexts = [
        ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=model.device_uid,
                name=model.display_name,  # carries "DEMO, not for clinical use"
                manufacturer_name=model.manufacturer,
                model_name=f"{model.name} {model.version}",
            ),
        )
        for model in models
    ]
    if not contexts:
        raise ValueError("No model identity found in the results: SR needs a device observer")
    context = ObservationContext(observer_device_context=contexts[0])
    for extra in contexts[1:]:
        context.extend(extra)
    return context


def _algorithm(finding: Finding) -> AlgorithmIdentification:
    model = finding.model
    return AlgorithmIdentification(
        name=model.display_name,
        version=model.version,
        manufacturer=model.manufacturer,
        parameters=[f"operating threshold {finding.threshold * 100:.4g} %"],
    )


def _group(
    source: Source, image_index: int, finding_index: int, uid_seed: str
) -> PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations:
    """TID 1410 group for a boxed finding, TID 1501 (image-referenced) otherwise."""
    finding = source.result.findings[finding_index]
    ds = source.work
    track_id, track_uid = tracking(uid_seed, source, image_index, finding_index)
    concept = CodedConcept(finding.concept.value, finding.concept.scheme, finding.concept.meaning)
    common = {
        "tracking_identifier": TrackingIdentifier(uid=track_uid, identifier=track_id),
        "finding_type": concept,
        "algorithm_id": _algorithm(finding),
        "measurements": [
            Measurement(
                name=CERTAINTY,
                value=round(float(finding.probability) * 100.0, 2),
                unit=PERCENT,
                algorithm_id=_algorithm(finding),
            )
        ],
        "qualitative_evaluations": [
            QualitativeEvaluation(name=concept, value=PRESENT if finding.positive else ABSENT)
        ],
    }
    box = clip_box(finding, int(ds.Rows), int(ds.Columns))
    if box is None:
        return MeasurementsAndQualitativeEvaluations(
            source_images=[SourceImageForMeasurementGroup.from_source_image(ds)], **common
        )
    region = ImageRegion(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=np.array(closed_polyline(*box), dtype=np.float64),
        source_image=SourceImageForRegion.from_source_image(ds),
    )
    return PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)


def _impression(sources: Sequence[Source]) -> ContainerContentItem:
    abnormal = any(s.result.abnormal for s in sources)
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = ContentSequence(
        [
            CodeContentItem(
                name=IMPRESSION,
                value=ABNORMAL if abnormal else NORMAL,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


def _drop_invented_descriptors(report: MeasurementReport, sources: Sequence[Source]) -> None:
    """Remove Image Library descriptors built from placeholder values (all are optional)."""
    invented = {s.sop_instance_uid: s.fabricated for s in sources if s.fabricated}
    if not invented:
        return
    for item in _walk(report[0]):
        if item.get("ValueType") != "IMAGE" or "ContentSequence" not in item:
            continue
        uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        if uid not in invented:
            continue
        kept = [
            child
            for child in item.ContentSequence
            if _DESCRIPTOR_SOURCES.get(child.ConceptNameCodeSequence[0].CodeValue)
            not in invented[uid]
        ]
        item.ContentSequence = ContentSequence(kept)


def _walk(item: Dataset):  # noqa: ANN202 - generator of content items
    yield item
    for child in item.get("ContentSequence", []):
        yield from _walk(child)
