"""The one DICOM UID validator, with its modes written down where callers differ on purpose.

PS3.5 9.1: at most 64 characters, components of digits separated by dots, no empty
component, no leading zero in a multi-digit component. Real traffic breaks the last rule
(and sometimes more), and the node must not refuse an image it can still file:

``"strict"``    PS3.5 9.1 exactly. UIDs this project writes or is configured with (bundle
                device UIDs, output UIDs in tests, UIDs in web API requests).
``"lenient"``   Components of digits, leading zeros allowed: UIDs an operator types in from a
                real archive (confirmed labels keyed by study or SOP Instance UID).
``"received"``  Only digits and dots, not starting with a dot: what ingest accepts from a
                C-STORE, so a modality's UID with leading zeros or an empty component is
                still filed under that UID (refusing it would lose the image).

It lives in ``ai`` because bundle metadata (:mod:`ai.bundle.metadata`, the device UID) and
the node both validate UIDs, and ``ai`` is the layer both may import.
"""

from __future__ import annotations

import re
from typing import Literal

UidMode = Literal["strict", "lenient", "received"]

MAX_UID_LENGTH = 64
_PATTERNS: dict[str, re.Pattern[str]] = {
    "strict": re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*"),
    "lenient": re.compile(r"[0-9]+(?:\.[0-9]+)*"),
    "received": re.compile(r"(?:[0-9][0-9.]*)"),
}


def is_valid_uid(value: object, mode: UidMode = "strict", *, min_components: int = 1) -> bool:
    """True when ``value`` is a UID under ``mode`` (see the module docstring) with at least
    ``min_components`` components. ``"received"`` takes any value as its text (a pydicom
    element value, None); the other modes want a ``str``."""
    if mode == "received":
        text = str(value or "")
    elif isinstance(value, str):
        text = value
    else:
        return False
    if not 0 < len(text) <= MAX_UID_LENGTH or not _PATTERNS[mode].fullmatch(text):
        return False
    return text.count(".") + 1 >= min_components
