"""dicom_node.uids: deterministic, valid UIDs."""

from __future__ import annotations

import re

import pytest
from pydicom.uid import UID

from ai.uids import is_valid_uid
from dicom_node.uids import derive_uid


def test_same_parts_give_the_same_uid() -> None:
    assert derive_uid("a", "b", "c") == derive_uid("a", "b", "c")


def test_different_parts_give_different_uids() -> None:
    uids = {derive_uid("seed", kind) for kind in ("sr", "sc", "gsps")}
    uids.add(derive_uid("other seed", "sr"))
    assert len(uids) == 4


def test_part_boundaries_matter() -> None:
    assert derive_uid("ab", "c") != derive_uid("a", "bc")


@pytest.mark.parametrize("parts", [("x",), ("1.2.3", "2.25.42", "model 1.0"), ("é" * 500,)])
def test_uid_is_valid_2_25_form(parts: tuple[str, ...]) -> None:
    uid = derive_uid(*parts)
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid)
    assert len(uid) <= 64
    assert int(uid[5:]) < 2**128
    assert is_valid_uid(uid)
    assert UID(uid).is_valid


def test_uid_is_a_version_8_rfc_uuid() -> None:
    value = int(derive_uid("seed")[5:])
    assert (value >> 76) & 0xF == 8
    assert (value >> 62) & 0x3 == 0b10


def test_no_parts_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        derive_uid()


def test_non_str_part_is_an_error() -> None:
    with pytest.raises(TypeError, match="must be str"):
        derive_uid("a", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        ("1.2.3", True),
        ("1.02.3", False),
        ("1..2", False),
        ("1.2.a", False),
        ("", False),
        ("1." + "1" * 63, False),
    ],
)
def test_is_valid_uid(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid
