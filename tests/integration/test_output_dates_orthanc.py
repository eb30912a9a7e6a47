"""A real Orthanc files the AI series under their date, not under "?".

Orthanc takes a series' date from the SeriesDate of its instances (``MainDicomTags``); the
outputs used to carry none. The source, the SR, the SCs and the GSPS are stored through
Orthanc's REST API and its expanded series records read back.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from helpers.orthanc import all_series, start_orthanc

from ai.types import BoundingBox
from dicom_node.outputs import OutputSettings, build_outputs

sys.path.insert(0, str(ROOT / "tests" / "unit" / "dicom_node" / "outputs"))
from outputs_helpers import DEMO, make_result, make_source, save  # noqa: E402

pytestmark = pytest.mark.integration

CREATED = datetime.datetime(2025, 3, 4, 5, 6, 7, 890123)
SERIES_DESCRIPTIONS = {
    "SR": "AI findings SR (CXR AI node)",
    "OT": "AI overlay (CXR AI node)",
    "PR": "AI findings GSPS (CXR AI node)",
}


def test_orthanc_shows_the_series_date_of_every_ai_series(tmp_path: Path) -> None:
    first = make_source(sop_uid="1.2.826.0.1.3680043.8.498.2.1")
    second = make_source(sop_uid="1.2.826.0.1.3680043.8.498.2.2", rows=200, cols=300)
    items = [(first, make_result(first, box=BoundingBox(20, 40, 120, 140))),
             (second, make_result(second, model=DEMO))]
    outputs = build_outputs(items, OutputSettings(), "orthanc dates", created=CREATED)
    # No node listens on node_port; a StableAge of an hour keeps the auto-route asleep.
    pacs = start_orthanc(tmp_path / "orthanc", free_port(), stable_age=3600)
    try:
        for number, ds in enumerate([first, second, *(o.dataset for o in outputs)]):
            answer = pacs.upload(save(ds, tmp_path / f"{number}.dcm"))
            assert answer["Status"] == "Success", answer
        series = {s["MainDicomTags"]["SeriesDescription"]: s["MainDicomTags"]
                  for s in all_series(pacs) if s["MainDicomTags"].get("Modality") != "CR"}
    finally:
        pacs.stop()
    assert sorted(series) == sorted(SERIES_DESCRIPTIONS.values())
    for modality, description in SERIES_DESCRIPTIONS.items():
        tags = series[description]
        assert tags["Modality"] == modality
        assert (tags.get("SeriesDate"), tags.get("SeriesTime")) == ("20250304", "050607.890123")
