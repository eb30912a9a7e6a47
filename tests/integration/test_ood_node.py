"""A real radiograph through a node whose model has an out-of-distribution gate: DCMTK
storescu -> node -> DCMTK storescp. The model's findings are withheld, and every output
says so: the SR's coded evaluation and comment, a GSPS without boxes, the API flag, the
/metrics counter and ``dicom-node results``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import REALDICOM, ROOT, StoreSCP, dciodvfy_errors, free_port, storescu, wait_until
from helpers.node import node_settings, start_node, write_config

from dicom_node.analysis import load_analyzer

pytestmark = [pytest.mark.integration]

SR, GSPS = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.11.1"


def _items(ds: pydicom.Dataset):  # type: ignore[no-untyped-def]
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _code(item: pydicom.Dataset, key: str) -> str:
    seq = item.get(key)
    return f"{seq[0].CodingSchemeDesignator} {seq[0].CodeValue}" if seq else ""


def test_real_radiograph_is_withheld_and_every_output_says_so(
        tmp_path: Path, gated_bundle: tuple[Path, list[Path], list[Path]]) -> None:
    source = REALDICOM / "dx_chest_nih_cxr14_sc.dcm"
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", destinations=[dest.destination],
                             **{"models.bundles": [str(gated_bundle[0])], "models.device": "cpu",
                                "web.enabled": True, "web.port": free_port()})
    node = start_node(settings, load_analyzer)
    try:
        assert storescu(settings.dicom.port, [source]).returncode == 0
        study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
        files = wait_until(lambda: (f := dest.files()) and len(f) >= 3 and f, 240,
                           interval=0.5, what="SR, SC and GSPS")
        objs = {str(pydicom.dcmread(f).SOPClassUID): f for f in files}
        sr = pydicom.dcmread(objs[SR])
        items = list(_items(sr))
        (ood,) = [i for i in items if _code(i, "ConceptNameCodeSequence") == "DCM 111101"]
        assert _code(ood, "ConceptCodeSequence") == "DCM 128619"  # outside operational limits
        (comment,) = [i for i in _items(ood)
                      if _code(i, "ConceptNameCodeSequence") == "DCM 121106"]  # Comment
        assert "outside the validated input range" in comment.TextValue
        assert "tiny-gated-classifier" in comment.TextValue and "threshold" in comment.TextValue
        impression = next(i for i in items if _code(i, "ConceptNameCodeSequence") == "DCM 121073")
        assert _code(impression, "ConceptCodeSequence") == "SCT 82334004"  # Indeterminate
        assert not any(i.get("ValueType") == "SCOORD" for i in items)  # no region anywhere
        assert dciodvfy_errors(Path(objs[SR])) == []
        gsps = pydicom.dcmread(objs[GSPS])
        graphics = [g for a in gsps.get("GraphicAnnotationSequence", [])
                    for g in a.get("GraphicObjectSequence", [])]
        texts = [t.UnformattedTextValue for a in gsps.get("GraphicAnnotationSequence", [])
                 for t in a.get("TextObjectSequence", [])]
        assert graphics == [] and any("OUT OF DISTRIBUTION" in t for t in texts), texts

        base = f"http://127.0.0.1:{settings.web.port}"
        token = (settings.storage.data_dir / "api-token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        study = wait_until(lambda: (r := requests.get(f"{base}/api/v1/studies/{study_uid}",
                                                      headers=auth, timeout=5).json())
                           .get("ood") and r, 30, what="verdicts in the API")
        (verdict,) = study["ood"]
        assert verdict["out_of_distribution"] is True and verdict["score"] > verdict["threshold"]
        assert study["findings"] == []
        page = requests.get(f"{base}/dashboard/studies/{study['key']}", headers=auth, timeout=5)
        assert page.status_code == 200 and "Out of distribution for tiny-gated" in page.text
        metrics = requests.get(f"{base}/metrics", headers=auth, timeout=5).text
        assert 'cxr_ood_withheld_total{model="tiny-gated-classifier 0.0.1"} 1' in metrics
        models = requests.get(f"{base}/api/v1/models", headers=auth, timeout=5).json()
        assert models["items"][0]["ood_gate"]["threshold"] == pytest.approx(verdict["threshold"])
    finally:
        node.stop()
        dest.stop()
    config = write_config(settings, tmp_path / "node.yaml")
    out = subprocess.run([sys.executable, "-m", "dicom_node", "results", "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OUT OF DISTRIBUTION for tiny-gated-classifier 0.0.1 (DEMO" in out.stdout, out.stdout
    assert ": 1 image(s), 0 positive finding(s)" in out.stdout, out.stdout  # withheld, analysed
