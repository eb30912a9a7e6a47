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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.uid import UID

from ai.anatomy import (
    CHEST_KEYWORDS,
    FRONTAL_KEYWORDS,
    LATERAL_KEYWORDS,
    LATERAL_VIEW_CODES,
    NON_CHEST_KEYWORDS,
    anatomy_named,
    keyword_set,
)

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

# Other systems' results sent along with the images (another vendor's AI, a workstation):
# words in the SOP class keyword -> what the reason calls it. Never pixels for a model.
RESULT_OBJECT_KINDS: tuple[tuple[str, str], ...] = (
    ("PresentationState", "presentation state"), ("SRStorage", "structured report"),
    ("KeyObjectSelection", "key object selection"), ("Segmentation", "segmentation"),
    ("ParametricMap", "parametric map"), ("Encapsulated", "encapsulated document"),
)
SECONDARY_CAPTURE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
})
GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})

# Free-text attributes that may name the anatomy, the most specific first: the first one
# that names any decides. The image's own (series, protocol, CR processing menu) come before
# the study's and the order's, which describe the whole examination ("THORAX + ABDOMEN").
ANATOMY_DESCRIPTIONS: tuple[str, ...] = (
    "SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription",
    "StudyDescription", "RequestedProcedureDescription",
)
# Only the per-image ones can name the view: a study description "THORAX PA + LAT" is
# shared by both images of a two-view study.
VIEW_DESCRIPTIONS: tuple[str, ...] = ANATOMY_DESCRIPTIONS[:3]
QUOTE_CHARS = 64  # descriptions are quoted this long at most in a reason

SELECTION_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID", "Modality", "BodyPartExamined", "ViewPosition", "SamplesPerPixel",
    "NumberOfFrames", "Rows", "Columns", "ImageType", "PhotometricInterpretation",
    "ViewCodeSequence", *ANATOMY_DESCRIPTIONS,
)
"""Every attribute :func:`rejection_reason` and :func:`screening_reason` read: what the
ingest side stores so the rules can run without the file."""


class Header(Protocol):
    """A pydicom ``Dataset`` or a mapping keyword -> value: only ``get`` is used."""

    def get(self, key: str, default: Any = ..., /) -> Any: ...


@dataclass(frozen=True)
class SelectionRules:
    """The configurable part of the selection (the node's ``studies.selection`` settings).

    The keyword lists (:mod:`ai.anatomy`) are matched as whole words, case- and
    accent-insensitively; ``non_chest_keywords`` is (anatomy, keywords) pairs, the anatomy
    being what a reason names."""

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG")
    accept_missing_body_part: bool = True
    view_positions: tuple[str, ...] = ("PA", "AP")
    accept_missing_view_position: bool = True
    min_rows: int = 256
    min_columns: int = 256
    chest_keywords: tuple[str, ...] = CHEST_KEYWORDS
    non_chest_keywords: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
        NON_CHEST_KEYWORDS.items())
    lateral_keywords: tuple[str, ...] = LATERAL_KEYWORDS
    frontal_keywords: tuple[str, ...] = FRONTAL_KEYWORDS


def header_values(header: Header) -> dict[str, Any]:
    """The :data:`SELECTION_KEYWORDS` of ``header`` as a plain mapping (absent: None)."""
    return {k: header.get(k, None) for k in SELECTION_KEYWORDS}


def _upper(header: Header | Mapping[str, Any], keyword: str) -> str:
    return str(header.get(keyword, "") or "").strip().upper()


def _values(header: Header | Mapping[str, Any], keyword: str) -> list[str]:
    """A possibly multi-valued string attribute as upper-case values."""
    value = header.get(keyword, None)
    if value is None or isinstance(value, str):
        return [v.strip().upper() for v in str(value or "").split("\\")]
    return [str(v).strip().upper() for v in value]


def quote(keyword: str, text: str) -> str:
    """``keyword "text"`` for a reason, the text cut to :data:`QUOTE_CHARS`: a description
    is no identifier, but a technologist may have typed a name into one, so reasons that
    quote it are stored (shown to signed-in users) and never logged."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(text) > QUOTE_CHARS:
        text = text[:QUOTE_CHARS - 1] + "…"
    return f'{keyword} "{text}"'


def _descriptions(header: Header | Mapping[str, Any], keywords: tuple[str, ...]
                  ) -> list[tuple[str, str]]:
    texts = [(k, str(header.get(k, "") or "")) for k in keywords]
    return [(k, text) for k, text in texts if text.strip()]


def _object_reason(header: Header | Mapping[str, Any], sop_class: str) -> str | None:
    """Why the object is not an acquired radiograph: its SOP class, or a result page."""
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        uid = UID(sop_class) if sop_class else None
        name = uid.name if uid else "unknown"
        for word, kind in RESULT_OBJECT_KINDS:
            if uid is not None and word in uid.keyword:
                return f"SOP class {name} is a result object ({kind}), not an image"
        return f"SOP class {name} is not a projection radiograph"
    image_type = _values(header, "ImageType")
    if sop_class in SECONDARY_CAPTURE_CLASSES and image_type[:2] == ["DERIVED", "SECONDARY"]:
        return ("secondary capture with ImageType DERIVED\\SECONDARY is a result page, "
                "not an acquired radiograph")
    photometric = _upper(header, "PhotometricInterpretation")
    if photometric and photometric not in GREYSCALE:
        return f"colour image (PhotometricInterpretation {photometric}): a result page"
    return None


def _anatomy_reason(header: Header | Mapping[str, Any], rules: SelectionRules) -> str | None:
    """Explicit non-chest ``BodyPartExamined`` -> ignored; a chest one -> accepted; empty or
    unknown -> the most specific description that names anatomy decides (non-chest anatomy
    wins over chest in one text: a "THORAX + ABDOMEN" image is no plain chest radiograph);
    none names any -> an empty body part follows ``accept_missing_body_part``, an unknown
    one is no chest."""
    chest = keyword_set(tuple(rules.chest_keywords))
    pairs = rules.non_chest_keywords
    others = {name: tuple(words) for name, words in
              (pairs.items() if isinstance(pairs, Mapping) else pairs)}
    body = _upper(header, "BodyPartExamined")
    if body in {b.upper() for b in rules.body_parts}:
        return None
    if body and anatomy_named(body, others) is not None:
        return f"body part {body} is not a chest"
    if body and chest.matches(body):
        return None
    for keyword, text in _descriptions(header, ANATOMY_DESCRIPTIONS):
        anatomy = anatomy_named(text, others)
        if anatomy is not None:
            return f"{quote(keyword, text)} names non-chest anatomy ({anatomy})"
        if chest.matches(text):
            return None
    if body:
        return f"body part {body} is not a chest"
    return None if rules.accept_missing_body_part else "BodyPartExamined is empty"


def _lateral_source(header: Header | Mapping[str, Any], lateral: tuple[str, ...],
                    frontal: tuple[str, ...]) -> str | None:
    """Where the header says the view is lateral (ViewCodeSequence, or a per-image
    description naming a lateral view and no frontal one), or None."""
    items = header.get("ViewCodeSequence", None) or []
    for item in items if isinstance(items, Sequence) else []:
        if not hasattr(item, "get"):
            continue
        code = str(item.get("CodeValue", "") or "").strip()
        if code in LATERAL_VIEW_CODES:
            return f'ViewCodeSequence {code} "{LATERAL_VIEW_CODES[code]}"'
    lateral_set, frontal_set = keyword_set(tuple(lateral)), keyword_set(tuple(frontal))
    for keyword, text in _descriptions(header, VIEW_DESCRIPTIONS):
        if lateral_set.matches(text) and not frontal_set.matches(text):
            return quote(keyword, text)
    return None


def _view_reason(header: Header | Mapping[str, Any], rules: SelectionRules) -> str | None:
    """Lateral when any of ViewPosition, ViewCodeSequence and the descriptions says so (a
    model validated on frontal views must not see a lateral one); otherwise ViewPosition."""
    view = _upper(header, "ViewPosition")
    frontal = {v.upper() for v in rules.view_positions}
    if view and (view in LATERAL_VIEWS or view not in frontal):
        return f"view position {view} is not frontal ({', '.join(rules.view_positions)})"
    source = _lateral_source(header, rules.lateral_keywords, rules.frontal_keywords)
    if source is not None:
        return f"view position lateral ({source})"
    if not view and not rules.accept_missing_view_position:
        return "ViewPosition is empty"
    return None


def _frame_reason(header: Header | Mapping[str, Any], colour: str) -> str | None:
    if int(header.get("SamplesPerPixel", 1) or 1) != 1:
        return colour
    if int(header.get("NumberOfFrames", 1) or 1) != 1:
        return "multi-frame image"
    return None


def rejection_reason(header: Header | Mapping[str, Any], rules: SelectionRules) -> str | None:
    """Return why ``header`` must not be analysed, or None when it should be."""
    sop_class = str(header.get("SOPClassUID", "") or "")
    reason = _object_reason(header, sop_class)
    if reason is not None:
        return reason
    modality = _upper(header, "Modality")
    if modality not in {m.upper() for m in rules.modalities}:
        return f"modality {modality or '<empty>'} is not one of {', '.join(rules.modalities)}"
    reason = (_anatomy_reason(header, rules) or _view_reason(header, rules)
              or _frame_reason(header, "colour image (SamplesPerPixel != 1)"))
    if reason is not None:
        return reason
    rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    if rows < rules.min_rows or cols < rules.min_columns:
        return f"image {rows}x{cols} is smaller than {rules.min_rows}x{rules.min_columns}"
    return None


def screening_reason(header: Header | Mapping[str, Any]) -> str | None:
    """Why the node's default selection would not analyse ``header`` (None: it would), from
    its modality, view and frame layout only: what ``training evaluate`` applies to labelled
    sets, which often lack the SOP class, body part or size the full rules read. A lateral
    view is recognised as the node does (ViewPosition, ViewCodeSequence, descriptions with
    the default keywords). Its reasons are worded as ``training evaluate`` reports have
    always counted them."""
    modality = _upper(header, "Modality")
    if modality not in FRONTAL_MODALITIES:
        return f"modality {modality or '<empty>'} is not CR/DX"
    if (_upper(header, "ViewPosition") in LATERAL_VIEWS
            or _lateral_source(header, LATERAL_KEYWORDS, FRONTAL_KEYWORDS) is not None):
        return "lateral view"
    return _frame_reason(header, "colour image")
