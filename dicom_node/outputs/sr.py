"""TID 1500 Measurement Report in a Comprehensive SR that tells the truth and that OHIF opens.

Layout (PS3.16 TID 1500), root 126000 "Imaging Measurement Report", the models as device
observers (a model's device UID changes with every version), an Image Library of the
source images, then:

* **Imaging Measurements**: one TID 1410 planar-ROI group per *positive* finding with a
  box, and nothing else. Each group has a Tracking Identifier and UID (shared with the
  GSPS), the finding's code, an image region (a closed 5-point POLYLINE in source pixels;
  CR/DX have no Frame of Reference, so a 2D ``ImageRegion``), the probability and
  "Present". An absent finding never gets a region: a viewer draws every region it finds.
* **Qualitative Evaluations** (TID 1500 row 12): the study's impression (normal/abnormal)
  and every finding without a location (classifier labels), coded Present or Absent, each
  with its probability (NUM "Certainty of Finding", %), the image it was inferred from and
  the algorithm. Detector candidates below their operating threshold are left out, or
  listed here the same way (Absent, no region) when ``sr_candidates`` is ``"list"``.

How OHIF v3 reads this (OHIF/Viewers, extensions/cornerstone-dicom-sr/src, the version
whose ``_checkIfCanAddMeasurementsToDisplaySet`` raised the field trial's TypeError), and
why the probability NUM of a region group is *named after the finding*:

* ``getSopClassHandlerModule.ts`` ``_getMeasurements`` turns every 125007 group under
  126010 into a measurement; ``_processNonGeometricallyDefinedMeasurement`` gives a group
  without SCOORD ``coords: []``, and ``_checkIfCanAddMeasurementsToDisplaySet`` then reads
  ``const referencedSOPSequence = measurement.coords[0].ReferencedSOPSequence;`` (the
  TypeError): so every group here has a region, and nothing else is a group.
* ``_processTID1410Measurement`` labels a region only from the group's top-level NUMs,
  ``measurement.labels.push(_getLabelFromMeasuredValueSequence(ConceptNameCodeSequence,
  MeasuredValueSequence))``, which returns ``{label: CodeMeaning, value:
  `${Number(NumericValue).toFixed(2)} ${CodeValue}`}`` (plus a SCT 363698007 Finding Site,
  which we do not claim); the Finding (121071) item is not shown on the image.
* ``tools/DICOMSRDisplayTool.ts`` ``_getTextBoxLinesFromLabels`` draws each label as
  ``lines.push(`${_labelToShorthand(labelEntry.label)}: ${labelEntry.value}`)`` and
  ``utils/addSRAnnotation.ts`` sets ``label: measurement.labels?.[0]?.value``.

So the group's NUM has the finding's own code as concept name (TID 1419 row 5; TID 1410
points $Measurement at CID 7469, an extensible group, so a coded finding is a documented
extension, and highdicom's parser and DCMTK accept it), "%" as unit and the Measurement
Method "Certainty of Finding" (DCM 111012) saying what the number is: OHIF shows
"Nodule: 97.00 %" beside the box (before: "Certainty of Finding: 97.00 %").
Normal studies have no Imaging Measurements container (row 6 or row 12 must be present;
highdicom's reader fails on an empty one); the OHIF version above handles its absence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
    ImageLibrary,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForRegion,
    TrackingIdentifier,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE
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
from dicom_node.outputs.image_library import use_source_modalities
from dicom_node.outputs.ood import INDETERMINATE, any_withheld, sr_items

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


@dataclass(frozen=True)
class _Placed:
    """One finding of one image, with where it goes in the report."""

    source: Source
    image_index: int
    finding_index: int
    box: tuple[float, float, float, float] | None

    @property
    def finding(self) -> Finding:
        return self.source.result.findings[self.finding_index]


def build_sr(sources: Sequence[Source], settings: OutputSettings, uid_seed: str) -> OutputObject:
    """One SR for the study: regions for positive boxed findings, the rest as evaluations."""
    regions, evaluations = _sort_findings(sources, settings)
    models = models_of(sources)
    root = _report(
        models,
        [_region_group(placed, uid_seed) for placed in regions],
        [_evaluation(placed) for placed in evaluations],
        sources,
    )
    _drop_invented_descriptors(root, sources)
    use_source_modalities(root, sources)  # not highdicom's SOP-class guess (SC: "OT")
    sop_uid = instance_uid(uid_seed, "sr")
    sr = ComprehensiveSR(
        evidence=[s.work for s in sources],
        content=root,
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
    logger.debug(
        "Built SR %s: %d region group(s), %d finding(s) without region",
        sop_uid,
        len(regions),
        len(evaluations),
    )
    return OutputObject("sr", sr, sop_uid, ComprehensiveSRStorage)


def _sort_findings(
    sources: Sequence[Source], settings: OutputSettings
) -> tuple[list[_Placed], list[_Placed]]:
    """(findings that get an image region, findings listed under Qualitative Evaluations)."""
    regions: list[_Placed] = []
    evaluations: list[_Placed] = []
    for image_index, source in enumerate(sources, start=1):
        ds = source.work
        for finding_index, finding in enumerate(source.result.findings):
            box = clip_box(finding, int(ds.Rows), int(ds.Columns))
            placed = _Placed(source, image_index, finding_index, box)
            if finding.positive and box is not None:
                regions.append(placed)
            elif finding.box is None or finding.positive or settings.sr_candidates == "list":
                evaluations.append(placed)  # candidates (negative, boxed) only on request
    return regions, evaluations


def _report(
    models: Sequence[ModelIdentity],
    groups: Sequence[PlanarROIMeasurementsAndQualitativeEvaluations],
    evaluations: Sequence[CodeContentItem],
    sources: Sequence[Source],
) -> ContainerContentItem:
    """The TID 1500 root, built here because highdicom's ``MeasurementReport`` needs at
    least one measurement group and has no Qualitative Evaluations (row 12)."""
    root = ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    content = ContentSequence()
    content.extend(LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    content.extend(_observation_context(models))
    content.append(
        CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=PROCEDURE,
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    content.extend(ImageLibrary([s.work for s in sources]))
    if groups:  # TID 1500 needs row 6 or row 12; an empty row 6 breaks highdicom's reader
        content.append(_container(codes.DCM.ImagingMeasurements, [i for g in groups for i in g]))
    withheld = [sr_items(v, s.work) for s in sources for v in s.result.withheld]
    content.append(_container(QUALITATIVE_EVALUATIONS,
                              [_impression(sources), *evaluations, *withheld]))
    root.ContentSequence = content
    return root


def _container(name: CodedConcept, items: Sequence[Dataset]) -> ContainerContentItem:
    container = ContainerContentItem(name=name, relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = ContentSequence(items)
    return container


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


def _concept(finding: Finding) -> CodedConcept:
    return CodedConcept(finding.concept.value, finding.concept.scheme, finding.concept.meaning)


def _percent(finding: Finding) -> float:
    return round(float(finding.probability) * 100.0, 2)


def _region_group(
    placed: _Placed, uid_seed: str
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of a positive finding with a box (see the module docstring)."""
    finding, ds = placed.finding, placed.source.work
    assert placed.box is not None
    track_id, track_uid = tracking(uid_seed, placed.source, placed.image_index, placed.finding_index)
    concept = _concept(finding)
    region = ImageRegion(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=np.array(closed_polyline(*placed.box), dtype=np.float64),
        source_image=SourceImageForRegion.from_source_image(ds),
    )
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=track_uid, identifier=track_id),
        referenced_region=region,
        finding_type=concept,
        algorithm_id=_algorithm(finding),
        measurements=[
            Measurement(
                name=concept,  # OHIF's label: "<finding>: <value> %"
                value=_percent(finding),
                unit=PERCENT,
                method=CERTAINTY,
                algorithm_id=_algorithm(finding),
            )
        ],
        qualitative_evaluations=[QualitativeEvaluation(name=concept, value=PRESENT)],
    )


def _evaluation(placed: _Placed) -> CodeContentItem:
    """A finding without region: "<finding> = Present|Absent" with its probability, the
    image it was inferred from and the algorithm (TID 1500 row 13, extended)."""
    finding = placed.finding
    item = CodeContentItem(
        name=_concept(finding),
        value=PRESENT if finding.positive else ABSENT,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    children = ContentSequence(_algorithm(finding))  # concept modifiers first
    children.append(
        NumContentItem(
            name=CERTAINTY,
            value=_percent(finding),
            unit=PERCENT,
            relationship_type=RelationshipTypeValues.HAS_PROPERTIES,
        )
    )
    children.append(SourceImageForMeasurement.from_source_image(placed.source.work))
    item.ContentSequence = children
    return item


def _impression(sources: Sequence[Source]) -> CodeContentItem:
    abnormal = any(s.result.abnormal for s in sources)
    unsure = any_withheld([s.result for s in sources])  # a withheld model said nothing
    return CodeContentItem(
        name=IMPRESSION,
        value=ABNORMAL if abnormal else INDETERMINATE if unsure else NORMAL,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


def _drop_invented_descriptors(root: Dataset, sources: Sequence[Source]) -> None:
    """Remove Image Library descriptors built from placeholder values (all are optional)."""
    invented = {s.sop_instance_uid: s.fabricated for s in sources if s.fabricated}
    if not invented:
        return
    for item in _walk(root):
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


def _walk(item: Dataset) -> Iterator[Dataset]:
    yield item
    for child in item.get("ContentSequence", []):
        yield from _walk(child)
