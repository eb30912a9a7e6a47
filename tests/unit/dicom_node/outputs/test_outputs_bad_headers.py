"""Outputs that survive real headers (issue 7): values that break their VR never cost a study
its results, never reach an output, never reach the log; source UIDs stay exact.

Headers are written byte for byte and read back as the worker reads them
(``read_untrusted``); every SR, SC, GSPS (and heatmap SEG) built from them goes through
dciodvfy, whose only permitted complaint is about the source UIDs we copy faithfully
(leading zeros).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from bad_headers import (
    BAD_CODE_ITEM,
    FIELD_CASES,
    ODD_BUT_VALID,
    ZERO_SERIES_UID,
    ZERO_SOP_UID,
    ZERO_STUDY_UID,
    about_copied_uid,
    dciodvfy_errors,
    detached,
    raw_item,
    small_real_header,
    with_raw_values,
)
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from outputs_helpers import make_result, make_source
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from sr_checks import dsrdump_problems

from ai.types import BoundingBox, ImageResult
from dicom_node.dicomio import quiet
from dicom_node.outputs import OutputObject, OutputSettings, build_outputs
from dicom_node.outputs.sanitise import KEPT_EXACT, sanitise

# Bounded for `make test` (4 headers x 20 examples, 3 dciodvfy runs each: about 30 s);
# OUTPUTS_FUZZ_EXAMPLES=500 OUTPUTS_FUZZ_RANDOM=1 for a longer, randomised hunt.
FUZZ_EXAMPLES = int(os.environ.get("OUTPUTS_FUZZ_EXAMPLES", "20"))
DERANDOMIZE = not os.environ.get("OUTPUTS_FUZZ_RANDOM")
WITH_SEG = OutputSettings(seg=True)  # the heatmap SEG meets the same headers
SUMMARY = "Error - Dicom dataset contains invalid data values for Value Representations"
# Copied attributes a header may carry beyond the base files' own (patient, study, series,
# equipment, and what the builders read: orientation, spacing, VOI, rescale, lossy flags).
EXTRA_KEYWORDS = (
    "PatientAge", "PatientWeight", "PatientSize", "PatientBirthTime", "OtherPatientNames",
    "PatientComments", "AdditionalPatientHistory", "IssuerOfPatientID", "EthnicGroup",
    "StudyDescription", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "InstitutionName", "InstitutionAddress", "StationName", "InstitutionalDepartmentName",
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "BodyPartExamined",
    "Laterality", "PatientOrientation", "ImagerPixelSpacing", "PixelSpacing", "WindowCenter",
    "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction", "RescaleSlope",
    "RescaleIntercept", "RescaleType", "LossyImageCompression", "PatientIdentityRemoved",
    "ReferencedStudySequence", "ProcedureCodeSequence",
)  # fmt: skip
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
             "UC", "UI", "UR", "UT"}  # fmt: skip


def _result(ds: Dataset, box: BoundingBox | None = None) -> ImageResult:
    with quiet():  # the source's own UIDs may break UID rules: reading them warns
        return make_result(ds, box=box, heat_box=(10, 60, 10, 60))


def _uids(ds: Dataset) -> dict[str, str]:
    with quiet():
        return {k: str(ds[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                              "SOPInstanceUID")}  # fmt: skip


def _save(output: OutputObject, path: Path) -> Path:
    output.dataset.save_as(path, enforce_file_format=True)
    return path


def _unexplained(errors: list[str], copied: set[str]) -> list[str]:
    """dciodvfy errors that are not about a faithfully copied source UID."""
    about_uids = [e for e in errors if about_copied_uid(e, copied)]
    rest = [e for e in errors if e not in about_uids]
    if about_uids:
        rest = [e for e in rest if e != SUMMARY]  # dciodvfy's summary of those UID lines
    return rest


def _assert_valid_outputs_in_source_study(
    outputs: list[OutputObject], source_uids: dict[str, str], tmp: Path, copied: set[str]
) -> None:
    kinds = ["gsps", "sc", "seg", "sr"] if any(o.kind == "seg" for o in outputs) else [
        "gsps", "sc", "sr"]
    assert sorted(o.kind for o in outputs) == kinds
    for output in outputs:
        ds = output.dataset
        assert str(ds.StudyInstanceUID) == source_uids["StudyInstanceUID"]  # same study
        refs = {str(i.ReferencedSOPInstanceUID) for i in _referenced(ds)}
        assert refs == {source_uids["SOPInstanceUID"]}, (output.kind, refs)
        errors = dciodvfy_errors(_save(output, tmp / f"{output.kind}.dcm"))
        assert _unexplained(errors, copied) == [], output.kind
        if output.kind == "sr":
            assert dsrdump_problems(ds, source_uids_break_rules=bool(copied)) == []


def _referenced(ds: Dataset):  # noqa: ANN202 - generator of referencing items
    for elem in ds.iterall():
        if elem.VR == "SQ":
            for item in elem.value:
                if "ReferencedSOPInstanceUID" in item:
                    yield item


# ---------------------------------------------------------------------------------------
# The cases seen in the field, one by one and all at once


@pytest.mark.parametrize("case", sorted(FIELD_CASES), ids=sorted(FIELD_CASES))
def test_field_case_still_gives_valid_outputs(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keyword, raw = FIELD_CASES[case]
    caplog.set_level(logging.WARNING, logger="dicom_node.outputs")
    ds = with_raw_values(make_source(photometric="MONOCHROME1"), {keyword: raw}, tmp_path / "s.dcm")
    outputs = build_outputs([(ds, _result(ds, BoundingBox(20, 40, 120, 140)))], WITH_SEG, "s")
    _assert_valid_outputs_in_source_study(outputs, _uids(ds), tmp_path, set())
    tag = tag_for_keyword(keyword)
    bad = raw.decode("latin-1").strip()
    for output in outputs:
        element = output.dataset.get(tag)
        copied = "" if element is None or element.value is None else str(element.value)
        assert copied != bad and bad not in copied, f"{keyword} copied into the {output.kind}"
    assert keyword in caplog.text
    assert bad not in caplog.text  # the fact, never the value


@pytest.mark.parametrize("case", sorted(ODD_BUT_VALID), ids=sorted(ODD_BUT_VALID))
def test_odd_but_valid_value_is_copied_exactly(case: str, tmp_path: Path) -> None:
    keyword, raw = ODD_BUT_VALID[case]
    ds = with_raw_values(make_source(), {keyword: raw}, tmp_path / "s.dcm")
    outputs = build_outputs([(ds, _result(ds))], OutputSettings(), "s")
    _assert_valid_outputs_in_source_study(outputs, _uids(ds), tmp_path, set())
    for output in outputs:
        assert str(output.dataset[keyword].value) == raw.decode("latin-1"), output.kind


def test_all_field_cases_with_leading_zero_uids_keep_the_source_uids(tmp_path: Path) -> None:
    values = {keyword: raw for keyword, raw in FIELD_CASES.values()}
    values |= {"StudyInstanceUID": ZERO_STUDY_UID.encode(),
               "SeriesInstanceUID": ZERO_SERIES_UID.encode(),
               "SOPInstanceUID": ZERO_SOP_UID.encode()}  # fmt: skip
    ds = with_raw_values(make_source(modality="DX"), values, tmp_path / "s.dcm")
    outputs = build_outputs([(ds, _result(ds, BoundingBox(10, 20, 90, 120)))], WITH_SEG, "s")
    assert _uids(ds) == {"StudyInstanceUID": ZERO_STUDY_UID, "SeriesInstanceUID": ZERO_SERIES_UID,
                         "SOPInstanceUID": ZERO_SOP_UID}  # fmt: skip
    copied = {ZERO_STUDY_UID, ZERO_SERIES_UID, ZERO_SOP_UID}
    _assert_valid_outputs_in_source_study(outputs, _uids(ds), tmp_path, copied)
    sr = outputs[0].dataset
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == ZERO_STUDY_UID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == ZERO_SERIES_UID


def test_valid_header_is_copied_unchanged(real_cr: Dataset) -> None:
    work = detached(small_real_header(real_cr))
    before = {e.keyword: e.value for e in work if e.keyword != "PixelData"}
    assert sanitise(work, "test") == []
    assert {e.keyword: e.value for e in work if e.keyword != "PixelData"} == before


def test_sequence_item_with_a_bad_value_drops_the_attribute_not_the_output(tmp_path: Path) -> None:
    ds = make_source()
    ds.ProcedureCodeSequence = [raw_item(BAD_CODE_ITEM)]  # CodeMeaning: 80 characters of LO
    src = with_raw_values(ds, {}, tmp_path / "s.dcm")
    outputs = build_outputs([(src, _result(src))], OutputSettings(), "s")
    for output in outputs:
        assert "ProcedureCodeSequence" not in output.dataset
    _assert_valid_outputs_in_source_study(outputs, _uids(src), tmp_path, set())


# ---------------------------------------------------------------------------------------
# Fuzz: hypothesis-generated invalid values in every copied attribute of a real header

_HEX = "0123456789abcdef"
_CONTROL = st.sampled_from([b"\x00", b"\x01", b"\x07", b"\x0b", b"\x1f", b"\x7f"])


def _joined(parts: list[bytes]) -> bytes:
    return b"".join(parts)


def _bad_text(vr: str) -> st.SearchStrategy[bytes]:
    """Values that break ``vr``: wrong form, too long, control characters, wrong VM."""
    too_long = st.binary(min_size=70, max_size=120).map(lambda b: bytes(c % 94 + 33 for c in b))
    with_control = st.tuples(st.text("ABC xyz", max_size=6), _CONTROL).map(
        lambda t: t[0].encode() + t[1])
    multi = st.lists(st.text("AB12", min_size=1, max_size=4), min_size=3, max_size=5).map(
        lambda parts: "\\".join(parts).encode())
    specific = {
        "DA": st.one_of(st.text(_HEX, min_size=8, max_size=32).map(str.encode),
                        st.sampled_from([b"2024-01-02", b"20241340", b"20240230", b"19500101-"])),
        "TM": st.sampled_from([b"25:61:00", b"246000", b"noon", b"1010.5.5"]),
        "DT": st.sampled_from([b"2024-01-02T10:10", b"20241301", b"yesterday"]),
        "AS": st.sampled_from([b"81", b"081", b"81Y ", b"1 Y", b"Y081"]),
        "DS": st.sampled_from([b"abc", b"1e400", b"1,5", b"12345678901234567", b"nan"]),
        "IS": st.sampled_from([b"1.5", b"9999999999", b"x", b"1e3", b"0x10"]),
        "PN": st.sampled_from([b"A^B^C^D^E^F^G", b"A=B=C=D", b"X" * 70 + b"^Y",
                               b"Doe\x07^John"]),
        "CS": st.sampled_from([b"lower case", b"TOO_LONG_CODE_STRING_X", b"A-B", b"M\x00"]),
        "UI": st.sampled_from([b"1.2.03.4", b"1.2.x.4", b"1." + b"9" * 70]),
        "AE": st.sampled_from([b"AE\x01", b"A" * 17]),
        "UR": st.sampled_from([b"http://x y/\x02"]),
    }.get(vr)
    anything = st.binary(min_size=1, max_size=40)  # high bytes, backslashes, NULs ...
    generic = [with_control, multi, anything]
    if vr not in ("LT", "ST", "UT", "UC"):
        generic.append(too_long)
    return st.one_of(specific, *generic) if specific is not None else st.one_of(*generic)


def _bad_value(keyword: str) -> st.SearchStrategy[bytes]:
    vr = dictionary_VR(tag_for_keyword(keyword))
    if vr == "SQ":
        return st.just(b"")  # _write_sequences puts in an item with a bad CodeMeaning
    return _bad_text(vr) if vr in _TEXT_VRS else st.binary(max_size=40)


def _copied_keywords(base: Dataset) -> list[str]:
    keywords = {e.keyword for e in base if e.keyword and e.VR in _TEXT_VRS}
    keywords |= set(EXTRA_KEYWORDS)
    return sorted(keywords - KEPT_EXACT)


@pytest.fixture(scope="module")
def bases(real_cr: Dataset, real_nih: Dataset) -> dict[str, Dataset]:
    return {
        "phantom": make_source(photometric="MONOCHROME1", modality="DX"),
        "philips-cr": small_real_header(real_cr),
        "nih": small_real_header(real_nih),
    }


def _write_sequences(values: dict[str, bytes], base: Dataset) -> tuple[Dataset, dict[str, bytes]]:
    """Sequences get one code item with a CodeMeaning of 80 characters; the rest go raw."""
    ds = detached(base)
    plain = {}
    for keyword, raw in values.items():
        if dictionary_VR(tag_for_keyword(keyword)) == "SQ":
            setattr(ds, keyword, [raw_item(BAD_CODE_ITEM)])
        else:
            plain[keyword] = raw
    return ds, plain


@pytest.mark.parametrize(
    ("base_name", "partial"),
    [("phantom", False), ("philips-cr", False), ("philips-cr", True), ("nih", True)],
    ids=["phantom-all-bad", "philips-cr-all-bad", "philips-cr-some-bad", "nih-some-bad"],
)
def test_fuzzed_headers_still_give_valid_outputs_in_the_source_study(
    base_name: str,
    partial: bool,
    bases: dict[str, Dataset],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = bases[base_name]
    keywords = _copied_keywords(base)
    caplog.set_level(logging.DEBUG)

    # no shrinking: a failure prints its example, and the run stays bounded in time
    @hsettings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None,
               phases=[Phase.explicit, Phase.generate],
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])  # fmt: skip
    # each copied attribute: a bad value, or (None) the base header's own valid one
    @given(values=st.fixed_dictionaries(
               {k: st.one_of(_bad_value(k), st.none()) if partial else _bad_value(k)
                for k in keywords}),
           zero_uids=st.booleans())  # fmt: skip
    def check(values: dict[str, bytes | None], zero_uids: bool) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        if zero_uids:
            values = values | {"StudyInstanceUID": ZERO_STUDY_UID.encode(),
                               "SOPInstanceUID": ZERO_SOP_UID.encode()}  # fmt: skip
        ds, raw = _write_sequences(values, base)
        src = with_raw_values(ds, raw, tmp_path / "src.dcm")
        box = BoundingBox(10, 12, 60, 70)
        outputs = build_outputs([(src, _result(src, box))], OutputSettings(), "fuzz")
        copied = {ZERO_STUDY_UID, ZERO_SOP_UID} if zero_uids else set()
        _assert_valid_outputs_in_source_study(outputs, _uids(src), tmp_path, copied)
        logged = caplog.text
        for keyword, raw_value in raw.items():
            if keyword.endswith("UID"):
                continue  # UIDs may be logged (they identify no one)
            text = raw_value.decode("latin-1").strip("\x00 ")
            if len(text) >= 10 and text.isprintable():
                assert text not in logged, "a header value reached the log"

    check()

