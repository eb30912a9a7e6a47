"""Selection rules: which received images the models should see, and why not the others."""

from __future__ import annotations

from pydicom import Dataset
from pydicom.uid import UID

from dicom_node.config import SelectionSettings

# Storage SOP classes that can hold a projection radiograph the node can analyse.
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (e.g. NIH ChestX-ray14 as distributed)
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
}

_LATERAL = {"LL", "RL", "LLD", "RLD", "LAT", "LATERAL"}


def _upper(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()


def rejection_reason(ds: Dataset, rules: SelectionSettings) -> str | None:
    """Return why ``ds`` must not be analysed, or None when it should be."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = _upper(ds, "Modality")
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "unknown"
        return f"SOP class {name} is not a projection radiograph"
    if modality not in {m.upper() for m in rules.modalities}:
        return f"modality {modality or '<empty>'} is not one of {', '.join(rules.modalities)}"
    body = _upper(ds, "BodyPartExamined")
    if body:
        if body not in {b.upper() for b in rules.body_parts}:
            return f"body part {body} is not a chest"
    elif not rules.accept_missing_body_part:
        return "BodyPartExamined is empty"
    view = _upper(ds, "ViewPosition")
    if view:
        if view in _LATERAL or view not in {v.upper() for v in rules.view_positions}:
            return f"view position {view} is not frontal ({', '.join(rules.view_positions)})"
    elif not rules.accept_missing_view_position:
        return "ViewPosition is empty"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return "colour image (SamplesPerPixel != 1)"
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return "multi-frame image"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < rules.min_rows or cols < rules.min_columns:
        return f"image {rows}x{cols} is smaller than {rules.min_rows}x{rules.min_columns}"
    return None
