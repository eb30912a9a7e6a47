"""PHI canaries (QUALITY 11): unique patient values sent through every path, error paths
included, at DEBUG: they never appear in the logs, in recorded errors or reasons."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, free_port, storescu, wait_until
from helpers.dicomfiles import CT, make_image, write
from helpers.node import node_settings, query, start_node
from sqlalchemy import select

from dicom_node import db
from dicom_node.service import load_analyzer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CANARIES = {
    "PatientName": "Zyx^Canaryname",
    "PatientID": "CANARYPID4711",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "CANARYACC99",
    "OtherPatientIDs": "CANARYOTHER",
    "InstitutionName": "Canary Institute",
    "ReferringPhysicianName": "Canarydoc^Ref",
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
    db_text = " ".join(str(v) for table in (db.jobs, db.studies, db.instances, db.deliveries,
                                            db.quarantine)
                       for row in query(settings, select(table)) for v in row)
    for value in CANARIES.values():
        for variant in {value, value.replace("^", " "), value.split("^")[0]}:
            assert variant not in text, f"{variant!r} leaked into the log"
            assert variant not in db_text, f"{variant!r} leaked into DB reasons/errors"
