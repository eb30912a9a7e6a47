"""``dicom-node evaluate``: exit codes and messages without tracebacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from evalhelpers import ReferenceSet, make_reference_set
from sqlalchemy import insert

from dicom_node.cli import main
from dicom_node.evaluation.store import process_owner
from dicom_node.store import db


@pytest.fixture(scope="module")
def refset(tmp_path_factory: pytest.TempPathFactory) -> ReferenceSet:
    return make_reference_set(tmp_path_factory.mktemp("evaluation"))


def _config(tmp_path: Path, jobs: list[dict[str, Any]]) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "data")},
                                    "models": {"bundles": [str(tmp_path / "no-bundle")]},
                                    "evaluation": {"jobs": jobs}}))
    return path


def _ref(refset: ReferenceSet, name: str = "ref", **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "reference", "schedule": {"cron": "0 2 * * *"},
            "reference": {"dicom_dir": str(refset.dicom_dir),
                          "labels_csv": str(refset.labels_csv)}, **extra}


def test_unknown_job_exits_2_with_a_message(tmp_path: Path, refset: ReferenceSet,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--now", "nightly", "--config",
                 str(_config(tmp_path, [_ref(refset)]))]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("dicom-node: error: unknown evaluation job 'nightly' "
                           "(configured: ref)")


def test_failed_run_exits_1_and_prints_the_reason(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    job = {"name": "gone", "kind": "reference", "reference": {
        "dicom_dir": str(tmp_path / "missing"), "labels_csv": str(tmp_path / "l.csv")}}
    assert main(["evaluate", "--now", "gone", "--config", str(_config(tmp_path, [job]))]) == 1
    out, err = capsys.readouterr()
    assert "run 1: failed" in out
    assert "run 1 failed: EvaluationError: reference dicom_dir" in err
    assert "Traceback" not in out + err


def test_model_that_cannot_load_fails_the_run(tmp_path: Path, refset: ReferenceSet,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--now", "ref", "--config",
                 str(_config(tmp_path, [_ref(refset)]))]) == 1
    err = capsys.readouterr().err
    assert "the deployed model could not be loaded" in err and "Traceback" not in err


def test_busy_job_exits_3(tmp_path: Path, refset: ReferenceSet,
                          capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, [_ref(refset)])
    engine = db.make_engine(f"sqlite:///{tmp_path / 'data' / 'node.db'}")
    with engine.begin() as conn:  # a scheduled run of this (live) process is going on
        conn.execute(insert(db.evaluation_runs).values(
            job_name="ref", kind="reference", trigger="schedule", state="running",
            started_at=1.0e9, alerts=0, owner=process_owner()))
    engine.dispose()
    assert main(["evaluate", "--now", "ref", "--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert "'ref' is already running (run 1, trigger schedule" in err
    assert main(["evaluate", "--list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["Job", "Kind", "Enabled", "Schedule", "Last", "run",
                                           "Alerts"]
    assert "ref" in out and "cron 0 2 * * *" in out and "running" in out


def test_list_without_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--list", "--config", str(_config(tmp_path, []))]) == 0
    assert "no evaluation jobs configured" in capsys.readouterr().out


def test_now_or_list_is_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--config", str(_config(tmp_path, []))])
    assert exc.value.code == 2
    assert "one of the arguments --now --list is required" in capsys.readouterr().err
