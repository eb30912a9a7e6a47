"""The evaluation section of the configuration: the documented example loads, and bad
values stop the start with a message naming the key and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[4]


def _load(jobs: list[dict[str, Any]], **evaluation: Any):  # type: ignore[no-untyped-def]
    return load_settings(None, overrides={"evaluation.jobs": jobs, **{
        f"evaluation.{k}": v for k, v in evaluation.items()}}, environ={})


def test_node_yaml_documents_a_valid_evaluation_example() -> None:
    text = (ROOT / "config" / "node.yaml").read_text()
    section = text[text.index("evaluation:"):]
    example = "\n".join(line.replace("#  ", "  ", 1).replace("#    ", "    ", 1)
                        for line in section.splitlines() if line.startswith("#"))
    jobs = yaml.safe_load(example)
    settings = _load(jobs)
    ref, live = settings.evaluation.jobs
    assert ref.schedule is not None and ref.schedule.cron == "0 2 * * *"
    assert ref.floors["nodule"].sensitivity == 0.8 and ref.catchup
    assert live.kind == "confirmed" and live.window_s == 30 * 86400
    assert load_settings(ROOT / "config" / "node.yaml", environ={}).evaluation.jobs == []


def _ref(**extra: Any) -> dict[str, Any]:
    return {"name": "ref", "kind": "reference",
            "reference": {"dicom_dir": "/r", "labels_csv": "/r/l.csv"}, **extra}


@pytest.mark.parametrize(("jobs", "match"), [
    ([_ref(schedule={"cron": "0 25 * * *"})], r"evaluation\.jobs\.0\.schedule\.cron.*'0 25 \* \* \*'"),
    ([_ref(schedule={"cron": "0 2 * *"})], r"cron expression '0 2 \* \*' is invalid"),
    ([_ref(schedule={})], "exactly one of cron or interval_s"),
    ([_ref(schedule={"cron": "0 2 * * *", "interval_s": 60})], "exactly one of cron"),
    ([_ref(schedule={"interval_s": 0})], r"interval_s.*greater than 0.*got 0"),
    ([_ref(floors={"nodule": {"sensitivity": 1.5}})], r"floors\.nodule\.sensitivity.*1\.5"),
    ([_ref(floors={"nodule": {"sensitivty": 0.8}})], r"sensitivty.*Extra inputs"),
    ([{"name": "x", "kind": "reference"}], "job 'x': kind reference needs reference"),
    ([{"name": "x", "kind": "confirmed", "reference": {"dicom_dir": "a", "labels_csv": "b"}}],
     "job 'x': reference is for kind reference"),
    ([{"name": "x", "kind": "audit"}], r"evaluation\.jobs\.0\.kind.*'audit'"),
    ([{"name": "bad name!", "kind": "confirmed"}], "job name 'bad name!'"),
    ([_ref(), _ref()], "evaluation job name 'ref' is used twice"),
    ([_ref(webhook_url="ftp://x")], "webhook_url 'ftp://x'"),
])
def test_bad_job_settings_name_key_and_value(jobs: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _load(jobs)


def test_bad_timezone_is_named() -> None:
    with pytest.raises(ConfigError, match="timezone 'Mars/Olympus' is not a known IANA zone"):
        _load([], timezone="Mars/Olympus")


def test_environment_override_reaches_the_section() -> None:
    s = load_settings(None, environ={"CXR_NODE__EVALUATION__ENABLED": "false"})
    assert s.evaluation.enabled is False
