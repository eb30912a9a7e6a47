"""Scrubbing patient identifiers from free text: the values registry and the message
patterns, checked against messages pydicom itself produces."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, IS, TM, DSfloat, validate_value

from dicom_node import phi
from dicom_node.phi import REDACTED, PhiRegistry, redact, redact_patterns, remember_phi


def _registry(*values: str, names: tuple[str, ...] = ()) -> PhiRegistry:
    reg = PhiRegistry()
    for v in values:
        reg.add(v)
    for n in names:
        reg.add_name(n)
    return reg


def test_one_word_values_match_whole_words_in_any_case() -> None:
    reg = _registry("CANARYPID77")
    assert reg.redact("id canarypid77 in CANARYPID77.dcm") == f"id {REDACTED} in {REDACTED}.dcm"
    assert reg.redact("xCANARYPID77 CANARYPID777") == "xCANARYPID77 CANARYPID777"


def test_phrases_match_with_any_separator() -> None:
    reg = _registry("Canary General Hospital", "PAT-0042")
    text = "at canary^general  hospital for pat_0042 / PAT 0042; general hospital"
    assert reg.redact(text) == f"at {REDACTED} for {REDACTED} / {REDACTED}; general hospital"


def test_names_match_as_written_and_given_first_but_not_word_by_word() -> None:
    reg = _registry(names=("Zyx^Canarybird^Q", "Test^First"))
    assert reg.redact("Zyx^Canarybird^Q") == REDACTED
    assert reg.redact("name: Canarybird Q Zyx.") == f"name: {REDACTED}."
    assert reg.redact("First Test, test^first") == f"{REDACTED}, {REDACTED}"
    # common words of a name alone are not the name: messages stay readable
    text = "header not within the first 4194304 B; tiny-test-classifier"
    assert reg.redact(text) == text


def test_short_values_are_not_redacted_but_short_names_whole_are() -> None:
    reg = _registry("12", "M", names=("Li^Bo",))
    assert reg.redact("job 12 M Li^Bo, li and bo") == f"job 12 M {REDACTED}, li and bo"


def test_registry_is_bounded_oldest_first() -> None:
    reg = PhiRegistry(max_values=3)
    for v in ("CANARYA1", "CANARYB2 X", "CANARYC3", "CANARYD4"):
        reg.add(v)
    assert len(reg) == 3
    assert reg.redact("CANARYA1 CANARYB2 X CANARYD4") == f"CANARYA1 {REDACTED} {REDACTED}"
    reg.add("CANARYE5")  # the phrase is now the oldest: gone, with its first-word index
    assert reg.redact("CANARYB2 X") == "CANARYB2 X"
    assert not reg._by_first_word


def test_registry_is_thread_safe() -> None:
    reg = PhiRegistry(max_values=500)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(400):
                reg.add(f"CANARY{n}X{i} Y")
                reg.redact(f"CANARY{n}X{i} Y and CANARY{n}X{i - 1} Y")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(reg) == 500


def _message(fn) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, OverflowError)) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("make", [
    lambda: validate_value("DA", "CANARYQ#1", config.RAISE),
    lambda: validate_value("CS", "canaryq", config.RAISE),
    lambda: validate_value("IS", "CANARYQ", config.RAISE),
    lambda: DA("CANARYQ#1"),
    lambda: TM("CANARYQ"),
    lambda: DSfloat("CANARYQ", validation_mode=config.RAISE),
    lambda: IS("CANARYQ", validation_mode=config.RAISE),
    lambda: datetime.strptime("CANARYQ", "%Y%m%d"),
], ids=["DA regex", "CS regex", "IS regex", "DA convert", "TM convert", "DS convert",
        "IS convert", "strptime"])
def test_pydicom_messages_lose_the_value(make) -> None:  # type: ignore[no-untyped-def]
    message = _message(make)
    assert "canaryq" in message.lower()  # pydicom does quote it
    scrubbed = redact_patterns(message)
    assert "canaryq" not in scrubbed.lower() and REDACTED in scrubbed


def test_dataset_repr_loses_identifying_values_keeps_uids() -> None:
    ds = Dataset()
    ds.PatientName = "Qqq^Canaryrepr"
    ds.AccessionNumber = "CANARYREPRACC"
    ds.ReferringPhysicianName = "Doc^Canaryref"
    ds.SOPInstanceUID = "1.2.3.4"
    text = redact_patterns(str(ds))
    assert "Canary" not in text and "CANARY" not in text
    assert "1.2.3.4" in text and "Patient's Name" in text


@contextmanager
def lenient() -> Iterator[None]:
    modes = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = \
        config.IGNORE
    try:
        yield
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = modes


def malformed_header() -> Dataset:
    """A received header (raw elements) whose identifying values break their VR."""
    with lenient():
        ds = Dataset()
        ds.PatientName = "Xqz^Canarymalformed"
        ds.PatientID = "CANARYMALPID" + "X" * 70  # longer than LO allows
        ds.PatientBirthDate = "CANARYBD#1"  # not a date
        ds.OtherPatientIDsSequence = [Dataset()]
        ds.OtherPatientIDsSequence[0].PatientID = "CANARYSEQPID"
        buf = io.BytesIO()
        ds.save_as(buf, implicit_vr=False, little_endian=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()), force=True)


def test_remember_phi_reads_malformed_headers_without_warning() -> None:
    # pytest turns warnings into errors: a warning from remember_phi fails this test
    ds = malformed_header()
    assert remember_phi(ds) is ds
    text = redact(f"Xqz^Canarymalformed CANARYMALPID{'X' * 70} canarybd#1 CANARYSEQPID "
                  "Canarymalformed Xqz")  # the name given-first, as messages write it
    assert "canary" not in text.lower(), text


def test_remember_phi_survives_anything() -> None:
    assert remember_phi(pydicom.Dataset()) is not None
    before = len(phi._SEEN)
    remember_phi(object())  # type: ignore[type-var]
    assert len(phi._SEEN) == before
