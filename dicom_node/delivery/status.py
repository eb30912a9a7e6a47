"""DIMSE response statuses, by class (PS3.4 Annex B.2.3, PS3.7 Annex C).

A C-STORE response decides the fate of one delivery; the class, not the code, is what the
sender acts on. Codes not listed in a class fall into the range rules of PS3.7 C.1-C.5.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class StoreStatus(IntEnum):
    """C-STORE and general DIMSE status codes the sender names in its decisions."""

    SUCCESS = 0x0000
    WARNING_GENERAL = 0x0001  # PS3.7 C.4: warning, no further meaning
    ATTRIBUTE_LIST_ERROR = 0x0107
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    UNRECOGNISED_OPERATION = 0x0211
    RESOURCE_LIMITATION = 0x0213
    OUT_OF_RESOURCES = 0xA700  # storage: 0xA7xx
    DATA_SET_DOES_NOT_MATCH = 0xA900  # storage: 0xA9xx
    CANNOT_UNDERSTAND = 0xC000  # storage: 0xCxxx
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    CANCEL = 0xFE00


class StatusClass(StrEnum):
    """What a response status means for the delivery that got it."""

    SUCCESS = "success"  # stored: sent
    WARNING = "warning"  # stored with a remark: sent, status recorded
    OUT_OF_RESOURCES = "out_of_resources"  # transient: retried after a backoff
    NOT_SUPPORTED = "not_supported"  # the destination does not take this SOP class
    FAILURE = "failure"  # retried, dead letter after sender.max_attempts
    NO_RESPONSE = "no_response"  # timeout or abort: retried like a failure


_WARNINGS = frozenset({StoreStatus.WARNING_GENERAL, StoreStatus.ATTRIBUTE_LIST_ERROR,
                       StoreStatus.ATTRIBUTE_VALUE_OUT_OF_RANGE})


def classify(code: int | None) -> StatusClass:
    """The class of a response status; ``None`` is no response at all."""
    if code is None:
        return StatusClass.NO_RESPONSE
    if code == StoreStatus.SUCCESS:
        return StatusClass.SUCCESS
    if code in _WARNINGS or code & 0xF000 == 0xB000:
        return StatusClass.WARNING
    if code & 0xFF00 == StoreStatus.OUT_OF_RESOURCES or code == StoreStatus.RESOURCE_LIMITATION:
        return StatusClass.OUT_OF_RESOURCES
    if code == StoreStatus.SOP_CLASS_NOT_SUPPORTED:
        return StatusClass.NOT_SUPPORTED
    return StatusClass.FAILURE


def describe(code: int | None) -> str:
    """``0xA700 (Out of Resources)``-style text for logs, errors and the dashboard."""
    if code is None:
        return "no response (timeout or abort)"
    try:
        name = StoreStatus(code).name.replace("_", " ").lower()
    except ValueError:
        name = classify(code).value.replace("_", " ")
    return f"status 0x{code:04X} ({name})"
