"""Response statuses by class (PS3.4 B.2.3, PS3.7 C)."""

from __future__ import annotations

import pytest

from dicom_node.delivery.status import StatusClass, classify, describe


@pytest.mark.parametrize(("code", "cls"), [
    (0x0000, StatusClass.SUCCESS),
    (0x0001, StatusClass.WARNING), (0x0107, StatusClass.WARNING),
    (0x0116, StatusClass.WARNING), (0xB000, StatusClass.WARNING),
    (0xB006, StatusClass.WARNING), (0xB007, StatusClass.WARNING),
    (0xA700, StatusClass.OUT_OF_RESOURCES), (0xA7FF, StatusClass.OUT_OF_RESOURCES),
    (0x0213, StatusClass.OUT_OF_RESOURCES),
    (0x0122, StatusClass.NOT_SUPPORTED),
    (0xA900, StatusClass.FAILURE), (0xA9FF, StatusClass.FAILURE),
    (0xC000, StatusClass.FAILURE), (0xCFFF, StatusClass.FAILURE),
    (0x0110, StatusClass.FAILURE), (0x0211, StatusClass.FAILURE),
    (0x0124, StatusClass.FAILURE), (0xFE00, StatusClass.FAILURE),
    (0xFF00, StatusClass.FAILURE),  # Pending is no answer to a C-STORE
    (None, StatusClass.NO_RESPONSE),
])
def test_classify(code: int | None, cls: StatusClass) -> None:
    assert classify(code) is cls


def test_describe_names_the_code() -> None:
    assert describe(0xA700) == "status 0xA700 (out of resources)"
    assert describe(0xC123) == "status 0xC123 (failure)"
    assert describe(0xB123) == "status 0xB123 (warning)"
    assert describe(None) == "no response (timeout or abort)"
