"""The one "is this a DICOM file" check, as reference sets and labelled trees use it."""

from __future__ import annotations

from pathlib import Path

from ai.reference.dicom_files import looks_like_dicom


def test_preamble_or_suffix_says_dicom_and_dicomdir_does_not(tmp_path: Path) -> None:
    preamble = b"\x00" * 128 + b"DICM"
    files = {"a.dcm": b"", "b.DICOM": b"x", "c.dic": b"", "noext": preamble,
             "image.bin": preamble, "DICOMDIR": preamble, "labels.csv": b"a,b", "readme": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    found = {name for name in files if looks_like_dicom(tmp_path / name)}
    assert found == {"a.dcm", "b.DICOM", "c.dic", "noext", "image.bin"}
