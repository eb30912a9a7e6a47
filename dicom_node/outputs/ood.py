"""What the outputs say when a model's out-of-distribution gate withheld its findings.

The Analyzer drops a model's findings for an image whose features lie beyond the model's
gate threshold (:mod:`ai.bundle.gate`). A silent gap would read as "no finding", so each
output says it:

* SR (TID 1500 Qualitative Evaluations): a CODE item, concept DCM 111101 "Image Quality"
  (the CAD templates' image-quality concept), value DCM 128619 "Outside operational limits
  of the device" (the model is the SR's device observer), with the algorithm, a TEXT
  "Comment" (DCM 121106) giving the score and threshold, and the image it refers to; the
  impression becomes SCT 82334004 "Indeterminate" unless another finding is positive;
* SC and GSPS: a banner line per withheld model, and no "no finding" line;
* GSPS carries no boxes for that model (it has no findings to draw).
"""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ContentSequence,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    TextContentItem,
)
from pydicom.dataset import Dataset

from ai.types import ImageResult, OodVerdict

IMAGE_QUALITY = CodedConcept("111101", "DCM", "Image Quality")
OUTSIDE_LIMITS = CodedConcept("128619", "DCM", "Outside operational limits of the device")
COMMENT = CodedConcept("121106", "DCM", "Comment")
INDETERMINATE = CodedConcept("82334004", "SCT", "Indeterminate")
WITHHELD_TEXT = "AI: findings withheld, image outside the validated input range"


def verdict_text(verdict: OodVerdict) -> str:
    """The sentence every output uses (SR comment, API, ``dicom-node results``)."""
    return (f"Image is outside the validated input range of {verdict.model.display_name}: "
            f"out-of-distribution score {verdict.score:.2f} above the threshold "
            f"{verdict.threshold:.2f}; the model's findings are withheld for this image.")


def banner_lines(result: ImageResult) -> list[str]:
    """One short line per withheld model, for the SC and GSPS banners."""
    return [f"OUT OF DISTRIBUTION for {v.model.name} {v.model.version}: findings withheld"
            for v in result.withheld]  # fmt: skip


def sr_items(verdict: OodVerdict, source_image: Dataset) -> CodeContentItem:
    """The coded qualitative evaluation of one withheld (model, image) pair."""
    item = CodeContentItem(name=IMAGE_QUALITY, value=OUTSIDE_LIMITS,
                           relationship_type=RelationshipTypeValues.CONTAINS)  # fmt: skip
    model = verdict.model
    children = ContentSequence(AlgorithmIdentification(
        name=model.display_name, version=model.version, manufacturer=model.manufacturer,
        parameters=[f"out-of-distribution threshold {verdict.threshold:.4g}"]))  # fmt: skip
    children.append(TextContentItem(name=COMMENT, value=verdict_text(verdict),
                                    relationship_type=RelationshipTypeValues.HAS_PROPERTIES))
    children.append(SourceImageForMeasurement.from_source_image(source_image))
    item.ContentSequence = children
    return item


def any_withheld(results: Sequence[ImageResult]) -> bool:
    return any(r.withheld for r in results)
