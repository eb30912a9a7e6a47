"""``dicom-node results`` on the populated database of the web tests (ingested, assembled and
analysed by the real ingestor, assembler and worker): per study the findings (label,
probability, positive, model with its DEMO marking) and the result objects with their
deliveries, as text and as the documented ``--json`` document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.fakes import FAKE_MODEL
from sqlalchemy import update
from webdata import CANARY_STRINGS, WebEnv

from dicom_node.cli import main
from dicom_node.results import SCHEMA_VERSION
from dicom_node.store import db

pytest_plugins = ["webfixtures"]


def _demo_bundle(data_dir: Path) -> None:
    """The fake model's bundle metadata where the node looks for demo bundles."""
    meta = data_dir / "models" / "demo" / "fake-model" / "configs" / "metadata.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"name": FAKE_MODEL.name, "version": FAKE_MODEL.version,
                                "device_uid": FAKE_MODEL.device_uid, "demo": True}))


def _results(data_dir: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["results", "--data-dir", str(data_dir), *args]) == 0
    return capsys.readouterr().out


def test_json_document(web_env: WebEnv, capsys: pytest.CaptureFixture[str]) -> None:
    """The DEMO flag recorded with each finding (no bundle needed to read it)."""
    data_dir = web_env.settings.storage.data_dir
    doc = json.loads(_results(data_dir, capsys, "--json"))
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    (study,) = doc["studies"]  # the only study with a finished analysis
    assert study["study_uid"] == web_env.data.done and study["state"] == "done"
    assert study["version"] == 1 and study["images"] == 2 and study["positive"] == 2
    assert study["analysed_at"].endswith("Z") and isinstance(study["job_id"], int)
    assert len(study["findings"]) == 2
    for finding in study["findings"]:
        assert finding["label"] == "nodule" and finding["positive"] is True
        assert finding["code"] == {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
        assert 0.0 <= finding["probability"] <= 1.0 and 0.0 <= finding["threshold"] <= 1.0
        assert len(finding["box"]) == 4
        assert finding["model"] == {
            "name": "fake-model", "version": "1.0", "device_uid": "2.25.1234567",
            "demo": True, "display_name": "fake-model 1.0 (DEMO, not for clinical use)"}
    kinds = sorted(r["kind"] for r in study["results"])
    assert kinds == ["gsps", "sc", "sc", "sr"]
    states = sorted(d["state"] for r in study["results"] for d in r["deliveries"])
    assert states == ["dead", "not_accepted", "retrying", "sent"]
    assert all(r["superseded"] is False and r["created_at"].endswith("Z")
               for r in study["results"])
    text = json.dumps(doc)
    for canary in CANARY_STRINGS:
        assert canary not in text


def test_text_per_study(web_env: WebEnv, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = web_env.settings.storage.data_dir
    out = _results(data_dir, capsys)
    lines = out.splitlines()
    uid = web_env.data.done
    assert lines[0].startswith(f"study {uid}  done, result v1 (job ")
    assert lines[0].endswith(": 2 image(s), 2 positive finding(s)")
    assert lines[1].split() == ["image", "label", "probability", "threshold", "positive",
                                "box", "model"]
    for line in lines[2:4]:
        cells = line.split()
        assert cells[1] == "nodule" and cells[4] == "yes" and float(cells[2]) >= float(cells[3])
        assert line.endswith("fake-model 1.0 (DEMO, not for clinical use)")
    assert lines[4].split() == ["id", "kind", "sop_instance_uid", "version", "created_at",
                                "deliveries"]
    objects = lines[5:9]
    assert sorted(line.split()[1] for line in objects) == ["gsps", "sc", "sc", "sr"]
    assert any(line.endswith("DEST@127.0.0.1:11199 sent") for line in objects), objects
    assert any(line.endswith("DEST@127.0.0.1:11199 dead") for line in objects), objects
    assert all(line.split()[3] == "current" for line in objects)
    for canary in CANARY_STRINGS:
        assert canary not in out


def test_rows_written_before_the_demo_flag_take_it_from_the_bundle(
        web_env: WebEnv, capsys: pytest.CaptureFixture[str]) -> None:
    with web_env.engine.begin() as conn:
        conn.execute(update(db.findings).values(model_demo=None))
    data_dir = web_env.settings.storage.data_dir
    model = json.loads(_results(data_dir, capsys, "--json"))["studies"][0]["findings"][0]
    assert model["model"]["demo"] is None  # unknown: no bundle says
    assert model["model"]["display_name"] == "fake-model 1.0"
    _demo_bundle(data_dir)
    model = json.loads(_results(data_dir, capsys, "--json"))["studies"][0]["findings"][0]
    assert model["model"]["demo"] is True
    assert model["model"]["display_name"] == "fake-model 1.0 (DEMO, not for clinical use)"


def test_filters_and_bad_input(web_env: WebEnv, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = web_env.settings.storage.data_dir
    assert _results(data_dir, capsys, "--study", "1.2.3.4").strip() == (
        "no analysed study 1.2.3.4")
    doc = json.loads(_results(data_dir, capsys, "--study", web_env.data.failed, "--json"))
    assert doc == {"schema_version": 1, "studies": []}  # failed: nothing found
    assert len(json.loads(_results(data_dir, capsys, "--limit", "1", "--json"))["studies"]) == 1
    assert main(["results", "--data-dir", str(data_dir), "--limit", "0"]) == 2
    captured = capsys.readouterr()
    assert "dicom-node: error: --limit must be at least 1, got 0" in captured.err
    assert "Traceback" not in captured.err
