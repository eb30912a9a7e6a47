"""Confirmed cases: the API function, the CSV drop folder, and the rolling-window job over
the node's stored findings."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from evalhelpers import MODEL, add_analysed, eval_settings, temp_engine
from sqlalchemy import Engine, select

from dicom_node.evaluation.confirmed import process_drop_folder
from dicom_node.evaluation.errors import ConfirmedLabelError
from dicom_node.evaluation.service import EvaluationService
from dicom_node.store import db

STUDY = "1.2.826.0.1.3680043.8.498.10"
SOP = "1.2.826.0.1.3680043.8.498.11"



@pytest.fixture
def engine(tmp_path: Path, db_url: str) -> Iterator[Engine]:
    yield from temp_engine(tmp_path, db_url)


def _service(engine: Engine, tmp_path: Path, **evaluation: object) -> EvaluationService:
    jobs = [{"name": "live", "kind": "confirmed", "window_days": 7}]
    return EvaluationService(engine, eval_settings(tmp_path / "data", jobs, **evaluation))


def _confirmed(engine: Engine) -> dict[tuple[str, str, str], tuple[int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(select(db.confirmed_labels)).all()
    return {(r.key_kind, r.key_uid, r.label): (r.value, r.source) for r in rows}


def test_post_confirmed_labels_stores_and_replaces(engine: Engine, tmp_path: Path) -> None:
    service = _service(engine, tmp_path)
    assert service.post_confirmed_labels("study", STUDY, {"nodule": 1, "cardiomegaly": 0},
                                         "api") == 2
    assert service.post_confirmed_labels("study", STUDY, {"nodule": False}, "api") == 1
    assert service.post_confirmed_labels("sop", SOP, {"nodule": True}, "api") == 1
    assert _confirmed(engine) == {("study", STUDY, "nodule"): (0, "api"),
                                  ("study", STUDY, "cardiomegaly"): (0, "api"),
                                  ("sop", SOP, "nodule"): (1, "api")}


@pytest.mark.parametrize(("args", "match"), [
    (("series", STUDY, {"nodule": 1}), 'key_kind "series" must be "study" or "sop"'),
    (("study", "1.2.abc", {"nodule": 1}), "key_uid '1.2.abc' is not a DICOM UID"),
    (("study", STUDY, {}), "at least one label"),
    (("study", STUDY, {"nodule": 2}), "label 'nodule': value 2 must be 0 or 1"),
    (("study", STUDY, {"nodule": "1"}), "value '1' must be 0 or 1"),
    (("study", STUDY, {"no/dule": 1}), "label name 'no/dule'"),
])
def test_post_confirmed_labels_rejects_bad_input(engine: Engine, tmp_path: Path,
                                                 args: tuple, match: str) -> None:
    service = _service(engine, tmp_path)
    with pytest.raises(ConfirmedLabelError, match=match):
        service.post_confirmed_labels(*args)


def _drop(folder: Path, name: str, text: str, age_s: float = 10.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def test_drop_folder_processes_good_and_moves_bad_with_reason(
        engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "drop"
    _drop(folder, "good.csv", f"study_instance_uid,nodule,cardiomegaly\n{STUDY},1,\n"
                              f"1.2.826.0.1.3680043.8.498.12,0,1\n")
    _drop(folder, "sop.csv", f"sop_instance_uid,patient_id,nodule\n{SOP},P1,1\n")
    _drop(folder, "bad.csv", f"study_instance_uid,nodule\n{STUDY},yes\n")
    _drop(folder, "nokey.csv", "accession,nodule\nA1,1\n")
    _drop(folder, "notes.txt", "hello")
    _drop(folder, "fresh.csv", f"study_instance_uid,nodule\n{STUDY},1\n", age_s=0)
    _drop(folder, ".hidden.csv", "x", age_s=100)
    with caplog.at_level(logging.INFO):
        outcomes = {o.name: o for o in process_drop_folder(engine, folder, settle_s=2.0)}
    assert {n: o.state for n, o in outcomes.items()} == {
        "good.csv": "processed", "sop.csv": "processed", "bad.csv": "failed",
        "nokey.csv": "failed", "notes.txt": "failed"}
    assert outcomes["good.csv"].rows == 3 and outcomes["sop.csv"].rows == 1
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [".hidden.csv",
                                                                       "fresh.csv"]
    assert sorted(p.name.split("_", 1)[1] for p in (folder / "processed").iterdir()) == [
        "good.csv", "sop.csv"]
    failed = sorted(p.name.split("_", 1)[1] for p in (folder / "failed").iterdir())
    assert failed == ["bad.csv", "bad.csv.reason.txt", "nokey.csv", "nokey.csv.reason.txt",
                      "notes.txt", "notes.txt.reason.txt"]
    reason = next((folder / "failed").glob("*bad.csv.reason.txt")).read_text()
    assert "line 2, column 'nodule': value 'yes' must be 0, 1 or empty" in reason
    assert "P1" not in caplog.text  # patient id column is ignored, never logged
    assert _confirmed(engine)[("study", STUDY, "nodule")] == (1, "csv")
    assert ("study", STUDY, "cardiomegaly") not in _confirmed(engine)  # empty = not stated
    assert _confirmed(engine)[("sop", SOP, "nodule")] == (1, "csv")


def test_service_reads_its_watch_dir(engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "watch"
    _drop(folder, "a.csv", f"study_instance_uid,nodule\n{STUDY},1\n")
    service = _service(engine, tmp_path, confirmed_watch_dir=str(folder), confirmed_settle_s=0)
    assert [o.state for o in service.process_confirmed_folder()] == ["processed"]


def _uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{n}"


def test_confirmed_job_over_the_rolling_window(engine: Engine, tmp_path: Path) -> None:
    service = _service(engine, tmp_path)
    now = time.time()
    # study 100: two images, one positive (0.8) -> study positive, probability 0.8; truth 1: TP
    add_analysed(engine, _uid(100), {_uid(101): {"nodule": 0.2}, _uid(102): {"nodule": 0.8}})
    # study 200: negative call (0.3), truth 1: FN
    add_analysed(engine, _uid(200), {_uid(201): {"nodule": 0.3}})
    # study 300: analysed twice; the re-analysis (0.1) wins over the first (0.9); truth 0: TN
    add_analysed(engine, _uid(300), {_uid(301): {"nodule": 0.9}}, finished_at=now - 60)
    add_analysed(engine, _uid(300), {_uid(301): {"nodule": 0.1}})
    # study 400: outside the 7-day window (ignored even though confirmed)
    add_analysed(engine, _uid(400), {_uid(401): {"nodule": 0.9}}, finished_at=now - 8 * 86400)
    # image-level truth for study 500: positive call 0.6, truth 0: FP
    add_analysed(engine, _uid(500), {_uid(501): {"nodule": 0.6}})
    # study 600: image-level label, but a study-level label for the same label wins
    add_analysed(engine, _uid(600), {_uid(601): {"nodule": 0.7}})
    for study, value in ((100, 1), (200, 1), (300, 0), (400, 0), (600, 1)):
        service.post_confirmed_labels("study", _uid(study), {"nodule": value})
    service.post_confirmed_labels("sop", _uid(501), {"nodule": 0})
    service.post_confirmed_labels("sop", _uid(601), {"nodule": 0})
    service.post_confirmed_labels("study", _uid(999), {"nodule": 1})  # never analysed here
    detail = service.run_now("live")
    assert detail.run.state == "succeeded", detail.run.error
    (fig,) = detail.figures
    assert (fig.model_name, fig.label, fig.threshold) == (MODEL.name, "nodule", 0.5)
    assert (fig.tp, fig.fn, fig.tn, fig.fp) == (2, 1, 1, 1)  # 100 and 600 TP, 200 FN
    # pos {.8, .3, .7} vs neg {.1, .6}: .8 > both, .3 > .1, .7 > both: 5 of 6 pairs
    assert fig.auroc.value == pytest.approx(5 / 6)
    assert detail.run.summary is not None and detail.run.summary["studies"] == 4
    assert detail.run.models[0]["thresholds"] == {"nodule": 0.5}


def test_confirmed_job_without_cases_succeeds_with_a_note(engine: Engine, tmp_path: Path
                                                          ) -> None:
    detail = _service(engine, tmp_path).run_now("live")
    assert detail.run.state == "succeeded" and detail.figures == []
    assert detail.run.summary is not None and "no confirmed case" in detail.run.summary["note"]
