"""Selection rules: which received images the models should see, and why not the others.

One module for the node (the study assembler and the reference evaluation job apply
:func:`rejection_reason` with the configured :class:`SelectionRules`) and ``training
evaluate`` (:func:`screening_reason`, the part of the node's default rules that needs nothing
but the header's modality, view and frame layout). It lives in ``ai`` because both sides use
it and ``training`` never imports ``dicom_node``; the node's pydantic ``SelectionSettings``
produces a :class:`SelectionRules` (``SelectionSettings.to_rules()``).

The rules read a header only through ``header.get(keyword, default)`` for the keywords in
:data:`SELECTION_KEYWORDS`, so they work on a pydicom ``Dataset`` and equally on a plain
mapping keyword -> value (the attributes the node stores for an instance at ingest).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.uid import UID

# Storage SOP classes that can hold a projection radiograph the node can analyse.
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (e.g. NIH ChestX-ray14 as distributed)
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
}

LATERAL_VIEWS = frozenset({"LL", "RL", "LLD", "RLD", "LAT", "LATERAL"})
FRONTAL_MODALITIES = frozenset({"CR", "DX"})  # the default modalities, as training screens

SELECTION_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID", "Modality", "BodyPartExamined", "ViewPosition", "SamplesPerPixel",
    "NumberOfFrames", "Rows", "Columns",
)
"""Every attribute :func:`rejection_reason` and :func:`screening_reason` read: what the
ingest side stores so the rules can run without the file."""


class Header(Protocol):
    """A pydicom ``Dataset`` or a mapping keyword -> value: only ``get`` is used."""

    def get(self, key: str, default: Any = ..., /) -> Any: ...


@dataclass(frozen=True)
class SelectionRules:
    """The configurable part of the selection (the node's ``studies.selection`` settings)."""

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG")
    accept_missing_body_part: bool = True
    view_positions: tuple[str, ...] = ("PA", "AP")
    accept_missing_view_position: bool = True
    min_rows: int = 256
    min_columns: int = 256


def header_values(header: Header) -> dict[str, Any]:
    """The :data:`SELECTION_KEYWORDS` of ``header`` as a plain mapping (absent: None)."""
    return {k: header.get(k, None) for k in SELECTION_KEYWORDS}


def _upper(header: Header | Mapping[str, Any], keyword: str) -> str:
    return str(header.get(keyword, "") or "").strip().upper()


def _frame_reason(header: Header | Mapping[str, Any], colour: str) -> str | None:
    if int(header.get("SamplesPerPixel", 1) or 1) != 1:
        return colour
    if int(header.get("NumberOfFrames", 1) or 1) != 1:
        return "multi-frame image"
    return None


def rejection_reason(header: Header | Mapping[str, Any], rules: SelectionRules) -> str | None:
    """Return why ``header`` must not be analysed, or None when it should be."""
    sop_class = str(header.get("SOPClassUID", "") or "")
    modality = _upper(header, "Modality")
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "unknown"
        return f"SOP class {name} is not a projection radiograph"
    if modality not in {m.upper() for m in rules.modalities}:
        return f"modality {modality or '<empty>'} is not one of {', '.join(rules.modalities)}"
    body = _upper(header, "BodyPartExamined")
    if body:
        if body not in {b.upper() for b in rules.body_parts}:
            return f"body part {body} is not a chest"
    elif not rules.accept_missing_body_part:
        return "BodyPartExamined is empty"
    view = _upper(header, "ViewPosition")
    if view:
        if view in LATERAL_VIEWS or view not in {v.upper() for v in rules.view_positions}:
            return f"view position {view} is not frontal ({', '.join(rules.view_positions)})"
    elif not rules.accept_missing_view_position:
        return "ViewPosition is empty"
    reason = _frame_reason(header, "colour image (SamplesPerPixel != 1)")
    if reason is not None:
        return reason
    rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    if rows < rules.min_rows or cols < rules.min_columns:
        return f"image {rows}x{cols} is smaller than {rules.min_rows}x{rules.min_columns}"
    return None


def screening_reason(header: Header | Mapping[str, Any]) -> str | None:
    """Why the node's default selection would not analyse ``header`` (None: it would), from
    its modality, view and frame layout only: what ``training evaluate`` applies to labelled
    sets, which often lack the SOP class, body part or size the full rules read. Its reasons
    are worded as ``training evaluate`` reports have always counted them."""
    modality = _upper(header, "Modality")
    if modality not in FRONTAL_MODALITIES:
        return f"modality {modality or '<empty>'} is not CR/DX"
    if _upper(header, "ViewPosition") in LATERAL_VIEWS:
        return "lateral view"
    return _frame_reason(header, "colour image")
