"""The heatmap SEG on the wire: delivered with the other outputs into a real Orthanc (the
node end to end, real model, ``outputs.seg`` on), and ``not_accepted`` on its own at a
destination that does not negotiate Segmentation Storage."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import free_port, wait_until
from helpers.node import node_settings, query, start_node
from helpers.orthanc import modalities, start_orthanc
from helpers.pacs import ALL_RESULTS, UNCOMPRESSED, TestPACS
from helpers.results import ResultBench
from pydicom.uid import SegmentationStorage
from sqlalchemy import select

from dicom_node.analysis import load_analyzer
from dicom_node.outputs import OutputSettings
from dicom_node.store import db

pytestmark = pytest.mark.integration

WITH_SEG = OutputSettings(seg=True)


def test_destination_without_seg_gets_the_rest(tmp_path: Path) -> None:
    pacs = TestPACS().start()  # SR, SC and GSPS only, like many PACS
    try:
        bench = ResultBench(tmp_path, [pacs.destination], WITH_SEG)
        study = bench.study(seed=1)
        assert bench.sender().run_once() == 3
        rows = bench.deliveries(study)
        assert {k: r.state for k, r in rows.items()} == {
            "sr": "sent", "sc": "sent", "gsps": "sent", "seg": "not_accepted"}
        assert rows["seg"].last_error == f"not accepted by {pacs.name}: Segmentation Storage"
        assert rows["seg"].sop_class_uid == SegmentationStorage
    finally:
        pacs.stop()


def test_destination_taking_seg_stores_it(tmp_path: Path) -> None:
    pacs = TestPACS(accept={**ALL_RESULTS, SegmentationStorage: UNCOMPRESSED}).start()
    try:
        bench = ResultBench(tmp_path, [pacs.destination], WITH_SEG)
        study = bench.study(seed=2)
        assert bench.sender().run_once() == 4
        assert {r.state for r in bench.deliveries(study).values()} == {"sent"}
        (stored,) = [s for s in pacs.stored if s.sop_class_uid == SegmentationStorage]
        seg = hd.seg.Segmentation.from_dataset(stored.dataset)
        assert seg.StudyInstanceUID == study
        (segment,) = seg.SegmentSequence  # the fake model: one positive nodule
        assert segment.SegmentLabel.startswith("nodule (fake-model 1.0, DEMO)")
    finally:
        pacs.stop()


@pytest.mark.slow
def test_node_delivers_the_seg_into_orthanc(tmp_path: Path, tiny_bundle: Path) -> None:
    from training.synth import make_dataset

    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", node_port, stable_age=2)
    node = None
    try:
        settings = node_settings(tmp_path / "node", destinations=[pacs.destination], quiet=0.5,
                                 **{"dicom.port": node_port, "models.bundles": [str(tiny_bundle)],
                                    "models.device": "cpu", "outputs.seg": True})
        node = start_node(settings, load_analyzer)
        path = tmp_path / "in.dcm"
        source = make_dataset("cr_mono1_jpeg_lossless", seed=12, rows=480, columns=560)
        source.save_as(path, enforce_file_format=True)
        study_id = pacs.upload(path)["ParentStudy"]

        wait_until(lambda: len(pacs.study_series(study_id)) >= 5, 60, interval=0.5,
                   what="SR, SC, GSPS and SEG back in Orthanc")
        assert modalities(pacs, study_id) == sorted([source.Modality, "SR", "OT", "PR", "SEG"])
        seg_series = next(s for s in pacs.study_series(study_id)
                          if s["MainDicomTags"]["Modality"] == "SEG")
        raw = pacs.rest(f"/instances/{seg_series['Instances'][0]}/file", raw=True)
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(raw)))
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert seg.SegmentationType == "BINARY"  # the default: the form OHIF shows
        labels = [d.SegmentLabel.split(" (")[0] for d in seg.SegmentSequence]
        # the tiny bundle: nodule always positive, pneumothorax never
        assert "nodule" in labels and "pneumothorax" not in labels
        pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], dtype=np.float32)
        assert pixels.shape == (1, 480, 560, len(labels))
        assert 0.0 <= pixels.min() and 0.0 < pixels.max() <= 1.0
        deliveries = query(settings, select(db.deliveries))
        wait_until(lambda: {d.state for d in query(settings, select(db.deliveries))} == {"sent"},
                   10, interval=0.2, what="every delivery sent")
        assert len(deliveries) == 4
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
