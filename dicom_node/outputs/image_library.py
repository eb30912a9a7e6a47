"""The SR's Image Library names each source's real modality.

highdicom's TID 1602 descriptors derive the Modality (121139, DCM) item from the SOP Class
(``highdicom.sr.templates._get_coded_modality``): any Secondary Capture becomes "OT",
although the NIH ChestX-ray14 files are Secondary Captures whose Modality says DX. A viewer
that groups or hangs the report by the library's modality then shows "Other". The source's
own Modality wins when it is a CID 29 Acquisition Modality; otherwise highdicom's value
stays (it is never worse than an invented one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.outputs.common import Source

_MODALITY = codes.DCM.Modality
_ACQUISITION_MODALITIES = {code.value: code for code in codes.cid29.concepts.values()}


def source_modality(ds: Dataset) -> CodedConcept | None:
    """The CID 29 code of the image's Modality attribute, None if it has none there."""
    code = _ACQUISITION_MODALITIES.get(str(ds.get("Modality") or "").strip().upper())
    return None if code is None else CodedConcept.from_code(code)


def use_source_modalities(root: Dataset, sources: Sequence[Source]) -> None:
    """Rewrite the Modality descriptor of each Image Library entry from its source."""
    wanted = {s.sop_instance_uid: source_modality(s.work) for s in sources}
    for item in _walk(root):
        if item.get("ValueType") != "IMAGE" or "ContentSequence" not in item:
            continue
        code = wanted.get(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        if code is None:
            continue
        for child in item.ContentSequence:
            name = child.ConceptNameCodeSequence[0]
            if (name.CodeValue, name.CodingSchemeDesignator) == (
                _MODALITY.value,
                _MODALITY.scheme_designator,
            ):
                child.ConceptCodeSequence = [code]


def _walk(item: Dataset) -> Iterator[Dataset]:
    yield item
    for child in item.get("ContentSequence", []):
        yield from _walk(child)
