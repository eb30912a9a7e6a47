"""Delivery per object against a real pynetdicom PACS on loopback, driven one sender round
at a time: negotiation per object, response statuses by class, a missing or broken result
file, and transcoding of the SC to the syntax the destination accepts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers.pacs import UNCOMPRESSED, TestPACS
from helpers.results import ResultBench
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    CTImageStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.outputs import OutputSettings
from dicom_node.store.states import DeliveryState

pytestmark = pytest.mark.integration

SC_ONLY = {SecondaryCaptureImageStorage: UNCOMPRESSED}
LATER = 10_000.0  # a clock past every backoff


@pytest.fixture
def pacs_factory() -> Iterator:  # type: ignore[type-arg]
    started: list[TestPACS] = []

    def make(**kwargs) -> TestPACS:  # type: ignore[no-untyped-def]
        pacs = TestPACS(**kwargs).start()
        started.append(pacs)
        return pacs

    yield make
    for pacs in started:
        pacs.stop()


def _bench(tmp_path: Path, pacs: TestPACS, output_settings: OutputSettings | None = None,  # type: ignore[no-untyped-def]
           db_url: str | None = None, **dest) -> ResultBench:
    return ResultBench(tmp_path, [{**pacs.destination, **dest}], output_settings, db_url)


def _states(bench: ResultBench, study: str | None = None) -> dict[str, str]:
    return {kind: row.state for kind, row in bench.deliveries(study).items()}


def test_unaccepted_sop_class_is_not_accepted_and_blocks_nothing(tmp_path: Path, db_url: str,
                                                                  pacs_factory) -> None:  # type: ignore[no-untyped-def]
    pacs = pacs_factory(accept=SC_ONLY)
    bench = _bench(tmp_path, pacs, db_url=db_url)
    first = bench.study(seed=1)
    sender = bench.sender()
    assert sender.run_once() == 1
    rows = bench.deliveries(first)
    assert {k: r.state for k, r in rows.items()} == {
        "sc": "sent", "sr": "not_accepted", "gsps": "not_accepted"}
    assert rows["sr"].last_error == f"not accepted by {pacs.name}: Comprehensive SR Storage"
    assert rows["gsps"].last_error == (f"not accepted by {pacs.name}: Grayscale Softcopy "
                                       "Presentation State Storage")
    assert rows["sr"].attempts == 1 and rows["sc"].transfer_syntax == UNCOMPRESSED[0]
    assert [s.sop_instance_uid for s in pacs.stored] == [rows["sc"].sop_instance_uid]
    assert {e.subject for e in bench.audit("not_accepted")} == {
        rows["sr"].sop_instance_uid, rows["gsps"].sop_instance_uid}
    # the next study is delivered the same way; the terminal ones are never picked again
    second = bench.study(seed=2)
    assert sender.run_once(time.time() + LATER) == 1
    assert _states(bench, second) == {"sc": "sent", "sr": "not_accepted",
                                      "gsps": "not_accepted"}
    assert len(pacs.stored) == 2
    assert not [r for r in bench.rows() if r.state == DeliveryState.SENDING]


def test_destination_accepting_none_of_the_classes(tmp_path: Path, pacs_factory) -> None:  # type: ignore[no-untyped-def]
    pacs = pacs_factory(accept={CTImageStorage: UNCOMPRESSED})
    bench = _bench(tmp_path, pacs)
    study = bench.study()
    assert bench.sender().run_once() == 0
    rows = bench.deliveries(study)
    assert {r.state for r in rows.values()} == {"not_accepted"}
    assert rows["sc"].last_error.endswith(": Secondary Capture Image Storage")


def test_outputs_per_destination(tmp_path: Path, pacs_factory) -> None:  # type: ignore[no-untyped-def]
    pacs = pacs_factory()
    bench = _bench(tmp_path, pacs, outputs=["sc", "gsps"])
    study = bench.study()
    assert set(bench.deliveries(study)) == {"sc", "gsps"}
    assert bench.sender().run_once() == 2
    assert {s.sop_class_uid for s in pacs.stored} == {
        SecondaryCaptureImageStorage, GrayscaleSoftcopyPresentationStateStorage}


@pytest.mark.parametrize(("code", "state", "dead_after"), [
    (0xB000, "sent", None),  # Warning: coercion of data elements
    (0x0107, "sent", None),  # Warning: attribute list error
    (0xA700, "retrying", None),  # Refused: out of resources, never dead-lettered
    (0xC000, "retrying", 3),  # Error: cannot understand
    (0xA900, "retrying", 3),  # Error: data set does not match SOP class
    (0x0110, "retrying", 3),  # Processing failure
    (0x0122, "not_accepted", None),  # SOP class not supported
])
def test_response_status_by_class(tmp_path: Path, pacs_factory, code: int, state: str,  # type: ignore[no-untyped-def]
                                  dead_after: int | None) -> None:
    pacs = pacs_factory(status=lambda ds: code if ds.SOPClassUID == ComprehensiveSRStorage
                        else 0x0000)
    bench = _bench(tmp_path, pacs)
    study = bench.study()
    sender = bench.sender(max_attempts=3)
    sender.run_once()
    rows = bench.deliveries(study)
    sr = rows["sr"]
    assert (sr.state, sr.attempts, sr.last_status) == (state, 1, code)
    assert rows["sc"].state == rows["gsps"].state == "sent"  # the others are unaffected
    if state == "sent":
        assert sr.last_error == f"stored with warning: status 0x{code:04X} " + {
            0xB000: "(coercion of data elements)",
            0x0107: "(attribute list error)"}[code]
        warned = [e for e in bench.audit("delivered") if e.subject == sr.sop_instance_uid]
        assert [e.outcome for e in warned] == ["warning"]
    if state == "not_accepted":
        assert "Comprehensive SR Storage" in sr.last_error and "0x0122" in sr.last_error
    if state == "retrying":
        for attempt in range(2, 5):
            sender.run_once(time.time() + LATER * attempt)
            sr = bench.deliveries(study)["sr"]
            assert sr.attempts == attempt and sr.last_status == code
            assert sr.state == ("dead" if dead_after and attempt >= dead_after else "retrying")
            if sr.state == "dead":
                break
        assert sr.state == ("dead" if dead_after else "retrying")
        if dead_after:
            assert [e.subject for e in bench.audit("dead_lettered")] == [sr.sop_instance_uid]
    assert not [r for r in bench.rows() if r.state == DeliveryState.SENDING]


def test_missing_or_broken_result_file_is_dead_at_once(tmp_path: Path, pacs_factory) -> None:  # type: ignore[no-untyped-def]
    pacs = pacs_factory()
    bench = _bench(tmp_path, pacs)
    study = bench.study()
    rows = bench.deliveries(study)
    bench.spool.path(rows["sr"].path).unlink()
    bench.spool.path(rows["gsps"].path).write_bytes(b"not DICOM at all")
    assert bench.sender().run_once() == 1
    rows = bench.deliveries(study)
    assert (rows["sr"].state, rows["sr"].attempts) == ("dead", 1)
    assert rows["sr"].last_error == f"result file {rows['sr'].path} is missing"
    assert rows["gsps"].state == "dead"
    assert rows["gsps"].last_error.startswith(f"result file {rows['gsps'].path} is unreadable")
    assert rows["sc"].state == "sent"
    assert len(bench.audit("dead_lettered")) == 2


def test_an_exception_in_one_object_touches_no_other(tmp_path: Path, db_url: str,  # type: ignore[no-untyped-def]
                                                     pacs_factory, monkeypatch) -> None:
    import dicom_node.sender as sender_module

    real = sender_module.convert

    def flaky(ds, syntax):  # type: ignore[no-untyped-def]
        if ds.SOPClassUID == SecondaryCaptureImageStorage:
            raise RuntimeError("encoder crashed")
        return real(ds, syntax)

    real_decide = sender_module.decide

    def decide(assoc, sop_class, *args):  # type: ignore[no-untyped-def]
        if sop_class == GrayscaleSoftcopyPresentationStateStorage:
            raise KeyError("surprise")
        return real_decide(assoc, sop_class, *args)

    monkeypatch.setattr(sender_module, "convert", flaky)
    monkeypatch.setattr(sender_module, "decide", decide)
    pacs = pacs_factory()
    bench = _bench(tmp_path, pacs, db_url=db_url)
    study = bench.study()
    assert bench.sender().run_once() == 1
    rows = bench.deliveries(study)
    assert rows["sr"].state == "sent"
    assert rows["sc"].state == "dead" and "encoder crashed" in rows["sc"].last_error
    assert rows["gsps"].state == "retrying" and "KeyError" in rows["gsps"].last_error


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_sc_transcoded_to_the_accepted_lossless_syntax(tmp_path: Path, pacs_factory,  # type: ignore[no-untyped-def]
                                                       syntax: str) -> None:
    pacs = pacs_factory(accept={SecondaryCaptureImageStorage: [syntax],
                                ComprehensiveSRStorage: UNCOMPRESSED})
    # the SC, written uncompressed, is offered compressed first, then uncompressed: the PACS
    # takes only `syntax`
    bench = _bench(tmp_path, pacs, OutputSettings(sc_transfer_syntax=ExplicitVRLittleEndian),
                   outputs=["sr", "sc"],
                   sc_transfer_syntaxes=["RLELossless", "JPEGLSLossless", "JPEG2000Lossless",
                                         "ExplicitVRLittleEndian"])
    study = bench.study()
    assert bench.sender().run_once() == 2
    rows = bench.deliveries(study)
    assert rows["sc"].transfer_syntax == syntax
    assert rows["sr"].transfer_syntax == UNCOMPRESSED[0]
    got = next(s for s in pacs.stored if s.sop_class_uid == SecondaryCaptureImageStorage)
    assert got.transfer_syntax == syntax and got.sop_instance_uid == rows["sc"].sop_instance_uid
    original = pydicom.dcmread(bench.spool.path(rows["sc"].path))
    assert str(original.file_meta.TransferSyntaxUID) != syntax  # it was transcoded in memory
    assert got.dataset.PixelData != original.PixelData
    assert np.array_equal(got.dataset.pixel_array, original.pixel_array)


def test_sc_in_no_offered_syntax_is_not_accepted(tmp_path: Path, pacs_factory) -> None:  # type: ignore[no-untyped-def]
    pacs = pacs_factory(accept={SecondaryCaptureImageStorage: [JPEGLSLossless]})
    bench = _bench(tmp_path, pacs, outputs=["sc"], sc_transfer_syntaxes=["RLELossless"])
    study = bench.study()
    bench.sender().run_once()
    sc = bench.deliveries(study)["sc"]
    assert sc.state == "not_accepted"
    assert sc.last_error == (f"not accepted by {pacs.name}: Secondary Capture Image Storage "
                             "in RLE Lossless")
