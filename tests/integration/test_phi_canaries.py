"""PHI canaries (QUALITY 11): unique patient values sent through every path, error paths
included, at DEBUG: they never appear in the logs, in recorded errors or reasons, in the
audit trail, in API bodies or metrics. The log checks run with the handlers the entry
points configure (dicom_node.logs), pydicom's warnings included, in-process and in a real
``dicom-node serve`` process."""

from __future__ import annotations

import io
import logging
import signal
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import StoreSCP, free_port, storescu, wait_for_port, wait_until
from helpers.dicomfiles import CT, make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, spawn_node, start_node, write_config
from pydicom import config as pydicom_config
from sqlalchemy import select

from dicom_node import logs
from dicom_node.analysis import load_analyzer
from dicom_node.store import db

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CANARIES = {
    "PatientName": "Zyx^Canaryname",
    "PatientID": "CANARYPID4711",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "CANARYACC99",
    "OtherPatientIDs": "CANARYOTHER",
    "InstitutionName": "Canary Institute",
    "ReferringPhysicianName": "Canarydoc^Refcanaryq",
}


def _canary(ds: pydicom.Dataset) -> pydicom.Dataset:
    for keyword, value in CANARIES.items():
        setattr(ds, keyword, value)
    return ds


def test_no_phi_in_logs_or_db_text(tmp_path: Path, tiny_bundle: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    from training.synth import make_dataset

    caplog.set_level(logging.DEBUG)
    dead_port = free_port()  # a destination that never answers -> retries and dead letters
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", quiet=0.3,
                             destinations=[dest.destination, f"GONE@127.0.0.1:{dead_port}"],
                             **{"models.bundles": [str(tiny_bundle)], "models.device": "cpu",
                                "sender.max_attempts": 2, "logging.level": "DEBUG"})
    node = start_node(settings, load_analyzer)
    try:
        good = _canary(make_dataset("cr_mono1_jpeg_lossless", seed=5, rows=400, columns=380))
        lateral = _canary(make_dataset("dx_lateral", seed=6, rows=300, columns=300))
        ct = _canary(make_image(sop_class=CT, modality="CT"))
        broken = _canary(make_image(seed=9))
        broken.PixelData = broken.PixelData[:100]  # undecodable pixels: job fails
        files = [write(ds, tmp_path / "in", f"{i}.dcm")
                 for i, ds in enumerate([good, lateral, ct, broken])]
        for f in files:
            storescu(settings.dicom.port, [f])
        storescu(settings.dicom.port, [files[0]])  # identical duplicate
        changed = _canary(pydicom.dcmread(files[0]))
        changed.StudyDescription = "changed bytes"
        storescu(settings.dicom.port, [write(changed, tmp_path / "in2")])  # conflicting dup
        wait_until(lambda: (r := query(settings, select(db.deliveries))) and all(
            d.state in ("sent", "dead") for d in r) and any(d.state == "dead" for d in r),
            90, what="deliveries settled")
        wait_until(lambda: any(j.state == "failed" for j in query(settings, select(db.jobs))),
                   60, what="broken job failed")
    finally:
        node.stop()
        dest.stop()
    text = caplog.text
    assert "quarantined" in text and "delivery" in text  # the error paths did log
    db_text = database_text(settings)
    for value in CANARIES.values():
        for variant in {value, value.replace("^", " "), value.split("^")[0]}:
            assert variant not in text, f"{variant!r} leaked into the log"
            assert variant not in db_text, f"{variant!r} leaked into DB reasons/errors"


TEXT_TABLES = (db.jobs, db.studies, db.instances, db.deliveries, db.quarantine,
               db.audit_events, db.outputs)


def database_text(settings) -> str:  # type: ignore[no-untyped-def]
    return " ".join(str(v) for table in TEXT_TABLES
                    for row in query(settings, select(table)) for v in row)


def variants(canaries: dict[str, str]) -> set[str]:
    """Each value, its name words, and the forms messages write them in (case-folded)."""
    out = set()
    for value in canaries.values():
        out |= {value, value.replace("^", " "), *value.split("^")}
    return {v.casefold() for v in out if len(v) >= 3}


def assert_no_canary(text: str, canaries: dict[str, str], where: str) -> None:
    folded = text.casefold()
    leaked = sorted(v for v in variants(canaries) if v in folded)
    assert not leaked, f"{leaked} leaked into {where}"


@pytest.fixture
def node_logging() -> Iterator[io.StringIO]:
    """The entry points' logging (dicom_node.logs) at DEBUG, into a string; undone after."""
    stream = io.StringIO()
    with logs.logging_configured("DEBUG", logging.StreamHandler(stream)):
        yield stream


JOB_CANARIES = {"PatientName": "Qwv^Canaryjobname", "PatientID": "CANARYJOBPID58",
                "PatientBirthDate": "19030405", "AccessionNumber": "CANARYJOBACC7"}


def test_job_errors_quoting_a_canary_are_scrubbed(tmp_path: Path, node_logging: io.StringIO,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """An exception whose text quotes the header (no pattern matches it: only the values
    the node has seen can catch it), retried then dead-lettered, logged with tracebacks."""
    caplog.set_level(logging.DEBUG)
    boom = RuntimeError("model exploded on " + " / ".join(JOB_CANARIES.values()))
    settings = node_settings(tmp_path / "node", quiet=0.2, **{"logging.level": "DEBUG"})
    node = start_node(settings, lambda s: FakeAnalyzer(fail_with=boom))
    try:
        ds = make_image(patient_name=JOB_CANARIES["PatientName"],
                        patient_id=JOB_CANARIES["PatientID"])
        ds.PatientBirthDate = JOB_CANARIES["PatientBirthDate"]
        ds.AccessionNumber = JOB_CANARIES["AccessionNumber"]
        assert storescu(settings.dicom.port, [write(ds, tmp_path / "in")]).returncode == 0
        wait_until(lambda: any(j.state == "failed" for j in query(settings, select(db.jobs))),
                   60, what="job dead-lettered")
    finally:
        node.stop()
    text = node_logging.getvalue()
    assert "job 1 crashed" in text and "Traceback" in text  # the error path did log
    assert "RuntimeError: model exploded on [redacted] / [redacted]" in text
    assert_no_canary(text, JOB_CANARIES, "the node log")
    assert_no_canary(caplog.text, JOB_CANARIES, "the captured records")
    assert_no_canary("\n".join(r.getMessage() + str(r.exc_text) for r in caplog.records),
                     JOB_CANARIES, "the record objects")
    (job,) = query(settings, select(db.jobs))
    assert job.error.startswith("RuntimeError: model exploded on [redacted]")
    assert_no_canary(database_text(settings), JOB_CANARIES, "the database")


WARN_CANARIES = {"PatientBirthDate": "CANARYBD#77", "AccessionNumber": "canary-acc-lower",
                 "PatientID": "CANARYWARNPID" + "X" * 60}


def canary_file(folder: Path, canaries: dict[str, str], **kwargs: object) -> Path:
    """A radiograph whose identifying values break their VR (written leniently, as a
    modality would)."""
    ds = make_image(**kwargs)  # type: ignore[arg-type]
    modes = (pydicom_config.settings.reading_validation_mode,
             pydicom_config.settings.writing_validation_mode)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        for keyword, value in canaries.items():
            if keyword in ds:  # an element keeps the validation mode it was made with
                del ds[keyword]
            setattr(ds, keyword, value)
        return write(ds, folder)
    finally:
        (pydicom_config.settings.reading_validation_mode,
         pydicom_config.settings.writing_validation_mode) = modes


def test_pydicom_warnings_from_paths_without_read_untrusted(tmp_path: Path,
                                                            node_logging: io.StringIO) -> None:
    """Plain dcmread, values copied into a new dataset and written (what output building
    does): pydicom warns, quoting each value; the records carry none of them."""
    path = canary_file(tmp_path, WARN_CANARIES)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        source = pydicom.dcmread(path)
        target = pydicom.Dataset()
        for keyword in WARN_CANARIES:
            setattr(target, keyword, getattr(source, keyword))
        target.is_little_endian, target.is_implicit_VR = True, False
        pydicom.dcmwrite(io.BytesIO(), target)
    text = node_logging.getvalue()
    assert text.count("py.warnings") >= 2 and "Invalid value for VR DA: [redacted]" in text
    assert_no_canary(text, WARN_CANARIES, "the log")


SUBPROCESS_CANARIES = {**CANARIES, "PatientName": "Zyq^Canaryprocess",
                       "PatientID": "CANARYPROCPID42", "AccessionNumber": "CANARYPROCACC",
                       "PatientBirthDate": "CANARY#0203"}  # a hash in a DA, as seen in the field


def test_no_phi_in_a_real_node_process(tmp_path: Path, tiny_bundle: Path) -> None:
    """``dicom-node serve`` at DEBUG with its own logging: canaries that break VR rules go
    through ingest, selection, the models, output building and the web API; its log file,
    its database and the API bodies carry none of them."""
    token = "canary-process-token-0123456789"
    dest = StoreSCP(tmp_path / "dest", free_port())
    web_port = free_port()
    settings = node_settings(tmp_path / "node", quiet=0.3, destinations=[dest.destination],
                             **{"models.bundles": [str(tiny_bundle)], "models.device": "cpu",
                                "logging.level": "DEBUG", "web.enabled": True,
                                "web.port": web_port, "web.token": token})
    log = tmp_path / "node.log"
    proc = spawn_node(write_config(settings, tmp_path / "node.yaml"), log)
    bodies = []
    try:
        wait_for_port(settings.dicom.port, timeout=90)
        study_uid = pydicom.uid.generate_uid()
        files = [canary_file(tmp_path / "in", SUBPROCESS_CANARIES, seed=s, study_uid=study_uid)
                 for s in (1, 2)]
        assert storescu(settings.dicom.port, files).returncode == 0
        wait_until(lambda: (r := query(settings, select(db.studies))) and all(
            x.state in ("done", "failed", "ignored") for x in r), 120,
            what="study finished")
        auth = {"Authorization": f"Bearer {token}"}
        base = f"http://127.0.0.1:{web_port}"
        wait_for_port(web_port)
        (study,) = query(settings, select(db.studies))
        for url in ("/api/v1/studies", f"/api/v1/studies/{study.study_uid}", "/api/v1/jobs",
                    "/api/v1/audit", "/metrics", "/api/v1/deliveries"):
            resp = requests.get(base + url, headers=auth, timeout=10)
            assert resp.status_code == 200, url
            bodies.append(resp.text)
        # the dashboard reads the headers (patient names are shown there, by design)
        assert requests.get(f"{base}/dashboard/studies", headers=auth,
                            timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        dest.stop()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert " DEBUG " in text and "stored" in text and "job 1" in text  # it did log, at DEBUG
    assert_no_canary(text, SUBPROCESS_CANARIES, "the node's log file")
    assert_no_canary(database_text(settings), SUBPROCESS_CANARIES, "the database")
    assert_no_canary(" ".join(bodies), SUBPROCESS_CANARIES, "API bodies and metrics")
