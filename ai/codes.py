"""Coded concepts for the findings the node reports.

The SR, GSPS and dashboards show these codes, so a bundle that does not name a code for a
label gets the default from here. Values follow DESIGN.md (SNOMED CT, with DCM where SNOMED
has no better fit).
"""

from __future__ import annotations

import logging

from ai.types import CodedConcept

logger = logging.getLogger(__name__)

SCT = "SCT"
DCM = "DCM"

DEFAULT_CODES: dict[str, CodedConcept] = {
    "nodule": CodedConcept("27925004", SCT, "Nodule"),
    "mass": CodedConcept("4147007", SCT, "Mass"),
    "pneumothorax": CodedConcept("36118008", SCT, "Pneumothorax"),
    "pleural_effusion": CodedConcept("60046008", SCT, "Pleural effusion"),
    "cardiomegaly": CodedConcept("287272002", SCT, "Cardiomegaly"),
    "consolidation": CodedConcept("95436008", SCT, "Lung consolidation"),
    "edema": CodedConcept("19242006", SCT, "Pulmonary edema"),
    "pneumonia": CodedConcept("233604007", SCT, "Pneumonia"),
    "atelectasis": CodedConcept("46621007", SCT, "Atelectasis"),
    "opacity": CodedConcept("112001", DCM, "Opacity"),
    "infiltrate": CodedConcept("112121", DCM, "Infiltrate"),
}
"""Label name (lower case, ``_`` for spaces) -> coded concept."""


def normalise_label(name: str) -> str:
    """Canonical form of a label name: ``"Pleural Effusion"`` -> ``"pleural_effusion"``."""
    return "_".join(name.strip().lower().replace("-", " ").split())


def default_code(label: str) -> CodedConcept | None:
    """Default code for ``label`` (any spelling that normalises to a known key), or None."""
    return DEFAULT_CODES.get(normalise_label(label))
