"""The truth test every SR built in the test suite passes (outputs_fixtures wraps build_sr).

Parsed with highdicom, as a third party reads it: every measurement group under Imaging
Measurements has an image region and belongs to a finding the model calls present, with
the probability the model gave; no region anywhere for an absent finding; every finding
without a location is in Qualitative Evaluations with its presence and probability;
below-threshold candidates only there, and only when the settings ask for them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset

from dicom_node.outputs.common import OutputSettings, Source, clip_box

PRESENT, ABSENT = "52101004", "272519000"
MEASUREMENT_GROUP, IMAGING_MEASUREMENTS = "125007", "126010"
QUALITATIVE_EVALUATIONS = "C0034375"


def walk(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        yield child
        yield from walk(child)


def code_of(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def children(item: Dataset, code: str) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if code_of(c) == code]


def assert_truthful_sr(sr: Dataset, sources: Sequence[Source], settings: OutputSettings) -> None:
    report = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True).content
    assert not report.get_image_measurement_groups(), "group without image region"
    assert not report.get_volumetric_roi_measurement_groups()
    expected = _expected_regions(sources)
    seen = []
    for group in report.get_planar_roi_measurement_groups():
        assert group.roi is not None, f"group {group.tracking_uid} has no SCOORD"
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.value.value == PRESENT, "region for a finding that is not present"
        (measurement,) = group.get_measurements()
        assert measurement.name == group.finding_type  # OHIF labels the box with this name
        image = group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        seen.append((str(image), group.finding_type.value, float(measurement.value)))
    assert sorted(seen) == sorted(expected), (seen, expected)
    for item in walk(sr):
        if item.ValueType in ("SCOORD", "SCOORD3D"):
            assert _inside_present_group(sr, item), "SCOORD outside a Present finding's group"
    assert _evaluations(sr) == _expected_evaluations(sources, settings)


def assert_regions_only_for_present_findings(sr: Dataset) -> None:
    """What a viewer relies on, checkable without the results: every measurement group
    has an image region and says Present, and no region sits anywhere else."""
    report = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True).content
    assert not report.get_image_measurement_groups(), "group without image region"
    for group in report.get_planar_roi_measurement_groups():
        assert group.roi is not None
        values = [e.value.value for e in group.get_qualitative_evaluations()]
        assert values == [PRESENT], values
    for item in walk(sr):
        if item.ValueType in ("SCOORD", "SCOORD3D"):
            assert _inside_present_group(sr, item), "SCOORD outside a Present finding's group"


def _expected_regions(sources: Sequence[Source]) -> list[tuple[str, str, float]]:
    regions = []
    for source in sources:
        rows, cols = int(source.work.Rows), int(source.work.Columns)
        for finding in source.result.findings:
            if finding.positive and clip_box(finding, rows, cols) is not None:
                percent = round(finding.probability * 100.0, 2)
                regions.append((source.sop_instance_uid, finding.concept.value, percent))
    return regions


def _expected_evaluations(
    sources: Sequence[Source], settings: OutputSettings
) -> list[tuple[str, str, float]]:
    listed = []
    for source in sources:
        rows, cols = int(source.work.Rows), int(source.work.Columns)
        for finding in source.result.findings:
            boxed = clip_box(finding, rows, cols) is not None
            if finding.positive and boxed:
                continue  # it has its region group
            if finding.box is not None and not finding.positive and settings.sr_candidates != "list":
                continue  # a below-threshold candidate, omitted by default
            presence = PRESENT if finding.positive else ABSENT
            listed.append((finding.concept.value, presence, round(finding.probability * 100, 2)))
    return sorted(listed)


def _evaluations(sr: Dataset) -> list[tuple[str, str, float]]:
    (container,) = children(sr, QUALITATIVE_EVALUATIONS)
    listed = []
    for item in container.ContentSequence:
        if code_of(item) == "121073":  # the impression
            continue
        assert item.ValueType == "CODE"
        assert not [c for c in walk(item) if c.ValueType in ("SCOORD", "SCOORD3D")]
        (certainty,) = children(item, "111012")
        value = float(certainty.MeasuredValueSequence[0].NumericValue)
        listed.append((code_of(item), str(item.ConceptCodeSequence[0].CodeValue), value))
    return sorted(listed)


def _inside_present_group(sr: Dataset, scoord: Dataset) -> bool:
    for imaging in children(sr, IMAGING_MEASUREMENTS):
        for group in children(imaging, MEASUREMENT_GROUP):
            if any(child is scoord for child in group.ContentSequence):
                return any(
                    c.ValueType == "CODE" and c.ConceptCodeSequence[0].CodeValue == PRESENT
                    for c in group.ContentSequence
                )
    return False


# What DCMTK says about source UIDs copied exactly although they break UID rules, and about
# the IMAGE items that reference such a UID: expected when the source has such UIDs.
_COPIED_UID_WARNINGS = re.compile(
    r"W: (StudyInstanceUID|SeriesInstanceUID|ReferencedSOPInstanceUID) \(\w{4},\w{4}\) "
    r"violates VR definition in \w+"
    r"|W: Reading invalid/incomplete content item IMAGE \"[\d.]+\""
)


def dsrdump_problems(sr: Dataset, source_uids_break_rules: bool = False) -> list[str]:
    """DCMTK's complaints about the SR (empty when it reads it cleanly)."""
    if shutil.which("dsrdump") is None:
        raise RuntimeError("DCMTK dsrdump is not installed; make test installs it")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        proc = subprocess.run(
            ["dsrdump", "-Ee", "-Ec", str(path)], capture_output=True, timeout=60, check=False
        )
    lines = proc.stderr.decode("latin-1").splitlines()  # it echoes values, in any charset
    if source_uids_break_rules:
        lines = [line for line in lines if not _COPIED_UID_WARNINGS.fullmatch(line)]
    if proc.returncode != 0:
        lines.append(f"dsrdump exit status {proc.returncode}")
    return [line for line in lines if line.strip()]
