"""/metrics: a strict reading of the Prometheus text format and the values behind it."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import pytest
from webdata import CANARY_STRINGS, DEST, WebEnv

from dicom_node.web.metrics import _IGNORE_CATEGORIES, category

pytest_plugins = ["webfixtures"]

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"^({NAME})(\{{(.*)\}})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Families (name -> type) and samples; asserts the format rules on the way."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: Samples = defaultdict(list)
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helps, f"two HELP lines for {name}"
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helps and name not in types, f"TYPE of {name} misplaced"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            types[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            name, _, inner, value = m.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types, f"sample {name} before its TYPE"
            labels: dict[str, str] = {}
            if inner:
                pos = 0
                for lm in LABEL.finditer(inner):
                    assert lm.start() == pos, f"bad labels in {line!r}"
                    labels[lm.group(1)] = lm.group(2)
                    pos = lm.end()
                assert pos == len(inner), f"bad labels in {line!r}"
            samples[name].append((labels, float(value)))
    for name, kind in types.items():
        if kind == "counter":
            assert name.endswith("_total"), name
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    matches = [v for lab, v in samples[name] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(matches) == 1, (name, labels, samples[name])
    return matches[0]


def test_exposition_format_and_values(web_env: WebEnv) -> None:
    resp = web_env.get("/metrics")
    assert resp.status_code == 200
    assert resp.content_type == "text/plain; version=0.0.4; charset=utf-8"
    types, s = parse(resp.text)
    assert value(s, "cxr_instances_received_total") == 5
    assert value(s, "cxr_instances_ignored_total", reason="sop_class") == 1
    assert value(s, "cxr_studies_analysed_total") == 1
    assert value(s, "cxr_studies", state="failed") == 1
    assert value(s, "cxr_jobs_failed_total") == 1
    assert value(s, "cxr_analysis_queue_depth") == 1  # the study still receiving
    assert value(s, "cxr_deliveries", destination=DEST, state="dead") == 1
    assert value(s, "cxr_deliveries", destination=DEST, state="sent") == 1
    assert value(s, "cxr_deliveries", destination=DEST, state="not_accepted") == 1
    assert value(s, "cxr_deliveries", destination=DEST, state="retrying") == 1
    for state in ("pending", "sending", "committed"):
        assert value(s, "cxr_deliveries", destination=DEST, state=state) == 0
    assert value(s, "cxr_delivery_queue_depth") == 1  # the retrying one
    job = {"job": "nightly-reference", "model": "fake-model", "label": "nodule"}
    assert value(s, "cxr_evaluation_sensitivity", **job) == pytest.approx(0.7)
    assert value(s, "cxr_evaluation_sensitivity_ci_lower", **job) == pytest.approx(0.58)
    assert value(s, "cxr_evaluation_specificity", **job) == pytest.approx(0.82)
    assert value(s, "cxr_evaluation_runs_total", job="nightly-reference", state="failed") == 1
    assert value(s, "cxr_evaluation_alerts_active", label="nodule", metric="sensitivity") == 1
    assert value(s, "cxr_evaluation_alerts_active_count") == 1
    assert types["cxr_inference_duration_seconds"] == "histogram"


def test_latency_histogram_is_cumulative(web_env: WebEnv) -> None:
    _, s = parse(web_env.get("/metrics").text)
    buckets = s["cxr_inference_duration_seconds_bucket"]
    les = [lab["le"] for lab, _ in buckets]
    counts = [v for _, v in buckets]
    assert les[-1] == "+Inf" and les[:3] == ["0.1", "0.25", "0.5"]
    assert [float(x) for x in les[:-1]] == sorted(float(x) for x in les[:-1])
    assert counts == sorted(counts)
    assert counts[-1] == value(s, "cxr_inference_duration_seconds_count") == 1
    assert 0 < value(s, "cxr_inference_duration_seconds_sum") < math.inf


def test_label_values_are_bounded_categories_never_free_text(web_env: WebEnv) -> None:
    text = web_env.get("/metrics").text
    _, s = parse(text)
    reasons = {lab["reason"] for name in ("cxr_instances_ignored_total",
                                          "cxr_instances_quarantined_total")
               for lab, _ in s[name]}
    assert reasons <= {c for _, c in _IGNORE_CATEGORIES} | {
        "other", "conflicting_duplicate", "invalid_uid", "header_unreadable"}
    for canary in CANARY_STRINGS:
        assert canary not in text


@pytest.mark.parametrize(("reason", "expected"), [
    ("modality CT is not one of CR, DX", "modality"),
    ("body part HIP is not a chest", "body_part"),
    ('SeriesDescription "KNIE LINKS" names non-chest anatomy (knee)', "body_part"),
    ('view position lateral (ViewCodeSequence 399198007 "right lateral")', "view_position"),
    ("secondary capture with ImageType DERIVED\\SECONDARY is a result page, not an acquired "
     "radiograph", "result_page"),
    ("colour image (PhotometricInterpretation RGB): a result page", "colour"),
    ("SOP class Comprehensive SR Storage is a result object (structured report), not "
     "an image", "sop_class"),
    ("view position LL is not frontal (PA, AP)", "view_position"),
    ("image 100x100 is smaller than 256x256", "too_small"),
    ("SOP class CT Image Storage is not a projection radiograph", "sop_class"),
    ("header unreadable (InvalidDicomError)", "header_unreadable"),
    ("something new", "other"), (None, "other"),
])
def test_reason_categories(reason: str | None, expected: str) -> None:
    assert category(reason, _IGNORE_CATEGORIES) == expected
