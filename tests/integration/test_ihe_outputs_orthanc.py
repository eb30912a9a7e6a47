"""A real Orthanc stores every IHE AI Results output and gives back what the node wrote.

The sources (a CR phantom, a DX phantom stored as Secondary Capture, the real NIH
ChestX-ray14 file) and every output are uploaded through Orthanc's REST API; each output is
then downloaded again and checked: the Contributing Equipment items that name the models,
the series date, and the SR Image Library modality of each source.
"""

from __future__ import annotations

import datetime
import io
import sys
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT, free_port
from helpers.orthanc import start_orthanc

from ai.types import BoundingBox
from dicom_node.outputs import OutputSettings, build_outputs
from dicom_node.outputs.equipment import is_algorithm_item

sys.path.insert(0, str(ROOT / "tests" / "unit" / "dicom_node" / "outputs"))
from outputs_helpers import DEMO, DETECTOR, NIH_SC, make_result, make_source, save  # noqa: E402
from test_outputs_ihe import dx_as_sc, library_modalities  # noqa: E402

pytestmark = pytest.mark.integration

CREATED = datetime.datetime(2025, 3, 4, 5, 6, 7, 890123)


def test_orthanc_keeps_the_algorithm_identity_dates_and_library_modality(
    tmp_path: Path,
) -> None:
    cr = make_source(sop_uid="1.2.826.0.1.3680043.8.498.2.1")
    sc = dx_as_sc()
    nih = pydicom.dcmread(NIH_SC)
    study = build_outputs(
        [(cr, make_result(cr, box=BoundingBox(20, 40, 120, 140))),
         (sc, make_result(sc, model=DEMO))],
        OutputSettings(), "ihe orthanc", created=CREATED)
    nih_outputs = build_outputs([(nih, make_result(nih, model=DEMO))], OutputSettings(),
                                "ihe orthanc nih", created=CREATED)
    outputs = [*study, *nih_outputs]
    # No node listens on node_port; a StableAge of an hour keeps the auto-route asleep.
    pacs = start_orthanc(tmp_path / "orthanc", free_port(), stable_age=3600)
    stored: dict[str, pydicom.Dataset] = {}
    try:
        for number, ds in enumerate([cr, sc, nih]):
            pacs.upload(save(ds, tmp_path / f"source{number}.dcm"))
        for number, output in enumerate(outputs):
            answer = pacs.upload(save(output.dataset, tmp_path / f"{output.kind}{number}.dcm"))
            assert answer["Status"] == "Success", (output.kind, answer)
            raw = pacs.rest(f"/instances/{answer['ID']}/file", raw=True)
            stored[output.sop_instance_uid] = pydicom.dcmread(io.BytesIO(raw))
    finally:
        pacs.stop()
    expected = [(o, {DETECTOR.device_uid, DEMO.device_uid}) for o in study]
    expected += [(o, {DEMO.device_uid}) for o in nih_outputs]
    for output, device_uids in expected:
        back = stored[output.sop_instance_uid]
        models = {str(i.DeviceUID): i for i in back.ContributingEquipmentSequence
                  if is_algorithm_item(i)}
        assert set(models) == device_uids, output.kind
        assert {i.ContributionDateTime for i in models.values()} == {"20250304050607.890123"}
        assert "DEMO" in models[DEMO.device_uid].ContributionDescription
        assert (back.SeriesDate, back.SeriesTime) == ("20250304", "050607.890123")
    srs = [stored[o.sop_instance_uid] for o in outputs if o.kind == "sr"]
    assert [library_modalities(sr) for sr in srs] == [
        {str(cr.SOPInstanceUID): "CR", str(sc.SOPInstanceUID): "DX"},
        {str(nih.SOPInstanceUID): "DX"},
    ]
