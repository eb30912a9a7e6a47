"""The one UID validator: its modes differ where the callers differ on purpose."""

from __future__ import annotations

import pytest

from ai.uids import is_valid_uid


@pytest.mark.parametrize(("uid", "strict", "lenient", "received"), [
    ("1.2.3", True, True, True),
    ("1", True, True, True),
    ("1.02.3", False, True, True),  # leading zero: real archives have them
    ("1..2", False, False, True),  # ingest still files it under that UID
    ("1.2.", False, False, True),
    (".1.2", False, False, False),
    ("1.2.a", False, False, False),
    ("", False, False, False),
    ("1." + "1" * 63, False, False, False),  # 65 characters
    ("1.2\n", False, False, False),
])
def test_modes(uid: str, strict: bool, lenient: bool, received: bool) -> None:
    assert is_valid_uid(uid) is strict
    assert is_valid_uid(uid, "lenient") is lenient
    assert is_valid_uid(uid, "received") is received


def test_received_takes_any_value_and_components_can_be_required() -> None:
    assert is_valid_uid(None, "received") is False and is_valid_uid(12, "received") is True
    assert is_valid_uid(12) is False
    assert is_valid_uid("1", min_components=2) is False
    assert is_valid_uid("1.2", min_components=2) is True
