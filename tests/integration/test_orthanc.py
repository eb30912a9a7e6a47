"""Round trip with a real PACS: REST upload -> Orthanc -> Lua OnStableStudy auto-route ->
node (real model, real outputs) -> Orthanc, results in the same study, no routing loop."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT, free_port, wait_until
from helpers.node import node_settings, query, start_node
from helpers.orthanc import modalities, start_orthanc, store_jobs
from sqlalchemy import select

from dicom_node.analysis import load_analyzer
from dicom_node.outputs.equipment import is_algorithm_item
from dicom_node.store import db

sys.path.insert(0, str(ROOT / "tests" / "unit" / "dicom_node" / "outputs"))
from test_outputs_ihe import library_modalities  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VARIANTS = [("dx_mono1_j2k", 11, 520, 480), ("cr_mono1_jpeg_lossless", 12, 480, 560)]
STABLE_AGE = 2
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


def test_orthanc_auto_route_round_trip(tmp_path: Path, tiny_bundle: Path) -> None:
    from training.synth import make_dataset

    # Each names the other: reserve the node's port, start Orthanc routing to it, then
    # start the node with Orthanc as its destination.
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", node_port, stable_age=STABLE_AGE)
    node = None
    try:
        settings = node_settings(tmp_path / "node", destinations=[pacs.destination], quiet=0.5,
                                 **{"dicom.port": node_port, "models.bundles": [str(tiny_bundle)],
                                    "models.device": "cpu"})
        node = start_node(settings, load_analyzer)

        sources: dict[str, pydicom.Dataset] = {}
        for variant, seed, rows, cols in VARIANTS:
            path = tmp_path / "in" / f"{variant}.dcm"
            path.parent.mkdir(exist_ok=True)
            make_dataset(variant, seed=seed, rows=rows, columns=cols).save_as(
                path, enforce_file_format=True)
            answer = pacs.upload(path)
            assert answer["Status"] == "Success"
            sources[answer["ParentStudy"]] = pydicom.dcmread(path, stop_before_pixels=True)
        t0 = time.monotonic()

        def done() -> bool:
            return all(len(pacs.study_series(s)) >= 4 and pacs.study(s)["IsStable"]
                       for s in sources)

        wait_until(done, 45, interval=0.5, what="SR, SC and GSPS back in Orthanc, stable")
        print(f"round trip: {time.monotonic() - t0:.1f} s (StableAge {STABLE_AGE} s)")
        # The results made each study unstable; once stable again OnStableStudy ran a
        # second time. Give the Lua thread a moment, then check nothing was re-sent.
        time.sleep(1.5)

        assert sorted(pacs.rest("/studies")) == sorted(sources), "a study was duplicated"
        for study_id, src in sources.items():
            uid = str(src.StudyInstanceUID)
            assert pacs.find_study(uid) == study_id
            assert pacs.study(study_id)["MainDicomTags"]["StudyInstanceUID"] == uid
            series = pacs.study_series(study_id)
            assert len(series) == 4, pacs.series_summary(study_id)
            assert modalities(pacs, study_id) == sorted([src.Modality, "SR", "OT", "PR"])
            for s in series:
                assert s["ParentStudy"] == study_id
                assert len(s["Instances"]) == 1
            sr_series = next(s for s in series if s["MainDicomTags"]["Modality"] == "SR")
            sr_bytes = pacs.rest(f"/instances/{sr_series['Instances'][0]}/file", raw=True)
            sr = pydicom.dcmread(io.BytesIO(sr_bytes))
            assert str(sr.SOPClassUID) == SR_CLASS
            assert str(sr.StudyInstanceUID) == uid
            assert sr.PatientID == src.PatientID
            assert len(sr.ContentSequence) > 0
            refs = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                    for i in _walk(sr.ContentSequence) if "ReferencedSOPSequence" in i}
            assert str(src.SOPInstanceUID) in refs
            _assert_ihe_air(sr, tiny_bundle, src)

        # No loop: the node received exactly the originals, once each, from ORTHANC.
        received = query(settings, select(db.instances))
        assert sorted(r.sop_instance_uid for r in received) == sorted(
            str(s.SOPInstanceUID) for s in sources.values())
        assert {r.calling_ae for r in received} == {"ORTHANC"}
        jobs = store_jobs(pacs)
        assert len(jobs) == len(sources), jobs
        assert all(j["State"] == "Success" and j["Content"]["InstancesCount"] == 1 for j in jobs)
        sent = query(settings, select(db.deliveries))
        assert len(sent) == 3 * len(sources) and {d.state for d in sent} == {"sent"}
        log = pacs.log_path.read_text(encoding="utf-8", errors="replace")
        assert log.count("nothing to route") >= len(sources)  # the second stable events
    finally:
        if node is not None:
            node.stop()
        pacs.stop()


def _assert_ihe_air(sr: pydicom.Dataset, bundle: Path, src: pydicom.Dataset) -> None:
    """The bundle, as loaded by the node, names itself as the SR's Processing Algorithm, and
    the Image Library gives the source its own modality (IHE AI Results)."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    items = [i for i in sr.ContributingEquipmentSequence if is_algorithm_item(i)]
    assert [(str(i.DeviceUID), i.ManufacturerModelName, i.SoftwareVersions[0])
            for i in items] == [(meta["device_uid"], meta["name"], meta["version"])]
    assert library_modalities(sr) == {
        str(src.SOPInstanceUID): src.Modality}


def _walk(items: pydicom.Sequence) -> list[pydicom.Dataset]:
    out: list[pydicom.Dataset] = []
    for item in items:
        out.append(item)
        if "ContentSequence" in item:
            out.extend(_walk(item.ContentSequence))
    return out
