"""The live code path end to end, with the real (tiny, random-weights) bundle on phantoms:
``dicom-node evaluate --now`` on a synthesized reference set prints the expected table,
and the same phantoms sent by DCMTK storescu through the node, with their labels posted as
confirmed ground truth, give the very same figures in the 'confirmed' job."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import storescu, wait_until
from helpers.node import node_settings, start_node, studies

from dicom_node.analysis import load_analyzer
from dicom_node.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VARIANTS = ["dx_mono2_explicit", "cr_mono1_jpeg_lossless", "dx_mono1_j2k", "cr_mono2_jpegls",
            "dx_lateral", "ct_slice"]


def _table(out: str) -> dict[str, list[str]]:
    """Rows of the printed table by label (the label column first, then the numbers)."""
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 13 and cells[0] != "Label":
            rows[cells[0]] = cells
    return rows


def test_cli_reference_run_and_live_traffic_agree(tmp_path: Path, tiny_bundle: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from training.synth import synthesize

    synth = synthesize(tmp_path / "ref", 6, seed=7, size=256, variants=VARIANTS,
                       prevalence=0.5)
    with synth.labels_csv.open(newline="") as fh:
        labels = list(csv.DictReader(fh))
    frontal = [r for r in labels if r["view"] in ("PA", "AP")]
    jobs: list[dict[str, Any]] = [
        {"name": "ref", "kind": "reference",
         "reference": {"dicom_dir": str(synth.out_dir), "labels_csv": str(synth.labels_csv)},
         "floors": {"pneumothorax": {"sensitivity": 0.5}}},
        {"name": "live", "kind": "confirmed", "window_days": 1}]
    settings = node_settings(tmp_path / "node", quiet=0.3, **{
        "models.bundles": [str(tiny_bundle)], "models.device": "cpu",
        "evaluation.jobs": jobs})
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))

    assert main(["evaluate", "--now", "ref", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "model tiny-test-classifier 0.0.1" in out and "DEMO" in out
    assert "thresholds: cardiomegaly=0.5, nodule=0, pneumothorax=1" in out  # thresholds used
    table = _table(out)
    assert set(table) == {"nodule", "cardiomegaly", "pneumothorax"}
    for label, cells in table.items():
        n_pos = sum(int(r[label]) for r in frontal)
        n_neg = len(frontal) - n_pos
        assert cells[1:3] == [str(n_pos), str(n_neg)], label
    n_pos = sum(int(r["nodule"]) for r in frontal)
    # threshold 0: every image positive; threshold 1: none
    assert table["nodule"][3:7] == [str(n_pos), str(len(frontal) - n_pos), "0", "0"]
    ptx = sum(int(r["pneumothorax"]) for r in frontal)
    assert table["pneumothorax"][3:7] == ["0", "0", str(len(frontal) - ptx), str(ptx)]
    assert re.search(r"\n\s+\d+\s+view position LL is not frontal", out)
    assert re.search(r"\n\s+\d+\s+SOP class CT Image Storage is not a projection", out)
    assert "labels without images" not in out  # the excluded images had their labels
    if ptx:
        assert "ALERT: tiny-test-classifier pneumothorax sensitivity 0.000 below floor 0.500" in out

    node = start_node(settings, load_analyzer)
    try:
        files = sorted(synth.out_dir.rglob("*.dcm"))
        assert storescu(settings.dicom.port, files).returncode == 0
        wanted = {r["study_instance_uid"] for r in labels}
        wait_until(lambda: wanted <= {u for u, s in studies(settings).items()
                                      if s.state in ("done", "ignored")}, 120, interval=0.3,
                   what="all phantom studies analysed")
        for r in labels:
            node.evaluation.post_confirmed_labels(
                "sop", r["sop_instance_uid"],
                {k: int(r[k]) for k in ("nodule", "cardiomegaly", "pneumothorax")}, "test")
        live = node.evaluation.run_now("live")
        reference = node.evaluation.list_runs("ref")[0]
        ref = node.evaluation.get_run(reference.id)
    finally:
        node.stop()
    assert live.run.state == "succeeded" and ref is not None
    assert live.run.n_images == len(frontal)  # lateral and CT were ignored by the node too
    key = [(f.label, f.n_pos, f.n_neg, f.tp, f.fp, f.tn, f.fn) for f in ref.figures]
    assert [(f.label, f.n_pos, f.n_neg, f.tp, f.fp, f.tn, f.fn) for f in live.figures] == key
    for a, b in zip(ref.figures, live.figures, strict=True):
        assert a.auroc.as_dict()["value"] == pytest.approx(b.auroc.as_dict()["value"])
