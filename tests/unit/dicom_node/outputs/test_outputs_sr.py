"""The TID 1500 SR: structure OHIF and IHE AI Results expect, checked on the content tree."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from outputs_helpers import DEMO, DETECTOR, NODULE, make_result, make_source, save
from pydicom.dataset import Dataset
from sr_checks import dsrdump_problems

from ai.types import BoundingBox, Finding
from dicom_node.outputs import OutputSettings, build_outputs

BOX = BoundingBox(20, 40, 120, 140)


def _sr(items: list[tuple[Dataset, object]]) -> Dataset:
    outputs = build_outputs(items, OutputSettings(sc=False, gsps=False), "seed")
    assert [o.kind for o in outputs] == ["sr"]
    return outputs[0].dataset


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


def _code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def _children(item: Dataset, code: str) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if _code(c) == code]


def _groups(sr: Dataset) -> list[Dataset]:
    return [i for i in _walk(sr) if i.ValueType == "CONTAINER" and _code(i) == "125007"]


@pytest.fixture
def study() -> tuple[Dataset, Dataset]:
    ds = make_source(photometric="MONOCHROME1")
    return ds, _sr([(ds, make_result(ds, box=BOX))])


def test_root_is_imaging_measurement_report_with_image_library(study) -> None:
    ds, sr = study
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert _code(sr) == "126000"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    library = _children(sr, "111028")
    assert len(library) == 1
    images = [i for i in _walk(library[0]) if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [
        ds.SOPInstanceUID
    ]


def test_only_the_positive_boxed_finding_is_a_measurement_group(study) -> None:
    _, sr = study
    (group,) = _groups(sr)  # nodule (box, present); not the absent / unboxed findings
    assert len(_children(group, "112039")) == 1  # Tracking Identifier
    assert len(_children(group, "112040")) == 1  # Tracking Unique Identifier
    (finding,) = _children(group, "121071")
    assert finding.ConceptCodeSequence[0].CodeValue == "27925004"
    named = _children(group, "27925004")  # presence (CODE) and probability (NUM)
    assert sorted(i.ValueType for i in named) == ["CODE", "NUM"]
    (evaluation,) = [i for i in named if i.ValueType == "CODE"]
    assert evaluation.ConceptCodeSequence[0].CodeValue == "52101004"  # Present
    assert _children(group, "111001"), "AlgorithmIdentification on the group"
    (num,) = [c for c in group.ContentSequence if c.ValueType == "NUM"]
    assert _children(num, "111001"), "AlgorithmIdentification on the measurement"
    (method,) = _children(num, "370129005")  # Measurement Method: Certainty of Finding
    assert method.ConceptCodeSequence[0].CodeValue == "111012"


def test_ohif_labels_the_box_with_the_finding_name_and_probability(study) -> None:
    """What OHIF v3 draws beside a TID 1410 region: each NUM of the group as
    ``f"{CodeMeaning}: {NumericValue:.2f} {unit CodeValue}"`` (see sr.py's docstring)."""
    _, sr = study
    (group,) = _groups(sr)
    nums = [c for c in group.ContentSequence if c.ValueType == "NUM"]
    labels = [
        f"{n.ConceptNameCodeSequence[0].CodeMeaning}: "
        f"{float(n.MeasuredValueSequence[0].NumericValue):.2f} "
        f"{n.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue}"
        for n in nums
    ]
    assert labels == ["Nodule: 91.00 %"]


def _evaluations(sr: Dataset) -> dict[str, Dataset]:
    (container,) = _children(sr, "C0034375")
    return {_code(i): i for i in container.ContentSequence if _code(i) != "121073"}


def test_findings_without_box_are_qualitative_evaluations_with_probability(study) -> None:
    ds, sr = study
    evaluations = _evaluations(sr)
    assert set(evaluations) == {"287272002", "60046008"}  # cardiomegaly, effusion
    expected = {"287272002": ("272519000", "12.0"), "60046008": ("52101004", "66.0")}
    for code, item in evaluations.items():
        presence, probability = expected[code]
        assert item.ConceptCodeSequence[0].CodeValue == presence
        (num,) = _children(item, "111012")  # Certainty of Finding
        measured = num.MeasuredValueSequence[0]
        assert str(measured.NumericValue) == probability
        assert measured.MeasurementUnitsCodeSequence[0].CodeValue == "%"
        (source,) = _children(item, "121112")  # Source of Measurement
        assert source.RelationshipType == "INFERRED FROM"
        assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert _children(item, "111001"), "AlgorithmIdentification"
        assert not [i for i in _walk(item) if i.ValueType == "SCOORD"]


def _with_candidate(ds: Dataset):
    result = make_result(ds, box=BOX)
    candidate = Finding("Nodule", NODULE, 0.21, 0.5, False, DETECTOR, BoundingBox(150, 200, 190, 260))
    result.findings.append(candidate)
    return result


def test_below_threshold_candidates_are_omitted_by_default() -> None:
    ds = make_source()
    sr = _sr([(ds, _with_candidate(ds))])
    scoords = [i for i in _walk(sr) if i.ValueType == "SCOORD"]
    assert len(scoords) == 1  # the positive nodule only
    assert "27925004" not in _evaluations(sr)


def test_candidates_are_listed_without_region_when_asked() -> None:
    ds = make_source()
    settings = OutputSettings(sc=False, gsps=False, sr_candidates="list")
    sr = build_outputs([(ds, _with_candidate(ds))], settings, "seed")[0].dataset
    assert len([i for i in _walk(sr) if i.ValueType == "SCOORD"]) == 1
    candidate = _evaluations(sr)["27925004"]
    assert candidate.ConceptCodeSequence[0].CodeValue == "272519000"  # Absent
    (num,) = _children(candidate, "111012")
    assert str(num.MeasuredValueSequence[0].NumericValue) == "21.0"
    assert dsrdump_problems(sr) == []


def test_normal_study_has_no_region_and_no_imaging_measurements_container() -> None:
    ds = make_source()
    sr = _sr([(ds, make_result(ds, box=BOX, positive=False))])
    assert not [i for i in _walk(sr) if i.ValueType == "SCOORD"]
    assert not _children(sr, "126010")  # TID 1500 row 12 alone is valid
    assert set(_evaluations(sr)) == {"287272002", "60046008"}
    assert dsrdump_problems(sr) == []


def test_unknown_candidate_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="sr_candidates"):
        OutputSettings(sr_candidates="draw")


def _impression(sr: Dataset) -> str:
    (container,) = _children(sr, "C0034375")
    (impression,) = _children(container, "121073")
    return str(impression.ConceptCodeSequence[0].CodeValue)


def test_impression_abnormal_when_any_finding_is_positive(study) -> None:
    assert _impression(study[1]) == "263654008"


def test_impression_normal_when_no_finding_is_positive() -> None:
    ds = make_source()
    assert _impression(_sr([(ds, make_result(ds, positive=False))])) == "17621005"


def _observers(sr: Dataset) -> list[tuple[str, str]]:
    uids = [str(i.UID) for i in _children(sr, "121012")]
    names = [str(i.TextValue) for i in _children(sr, "121013")]
    return list(zip(uids, names, strict=True))


def test_device_observer_is_the_model(study) -> None:
    assert _observers(study[1]) == [(DETECTOR.device_uid, DETECTOR.display_name)]


def test_each_model_is_a_device_observer_and_demo_is_marked() -> None:
    first = make_source(sop_uid="1.2.826.0.1.3680043.8.498.2.1")
    second = make_source(sop_uid="1.2.826.0.1.3680043.8.498.2.2")
    sr = _sr([(first, make_result(first, box=BOX)), (second, make_result(second, model=DEMO))])
    observers = _observers(sr)
    assert [uid for uid, _ in observers] == [DETECTOR.device_uid, DEMO.device_uid]
    assert "DEMO" in observers[1][1]
    assert len(_groups(sr)) == 1  # the first image's boxed nodule; the second has no box


def test_nih_image_library_has_no_invented_descriptors(real_nih: Dataset) -> None:
    sr = _sr([(real_nih, make_result(real_nih))])
    (library,) = _children(sr, "111028")
    codes = {_code(i) for i in _walk(library)}
    assert not codes & {"111026", "111066", "111043", "111044"}  # spacing, orientation
    assert {"121139", "110910", "110911"} <= codes  # modality, rows, columns


def test_cr_keeps_its_real_orientation_descriptors(real_cr: Dataset) -> None:
    sr = _sr([(real_cr, make_result(real_cr))])
    (library,) = _children(sr, "111028")
    rows = [i.TextValue for i in _walk(library) if _code(i) == "111044"]
    assert rows == ["L"]


def test_dcmtk_reads_the_sr(study, tmp_path: Path) -> None:
    if shutil.which("dsrdump") is None or shutil.which("dsr2xml") is None:
        pytest.fail("DCMTK dsrdump/dsr2xml are not installed" + "; make test installs it")
    path = save(study[1], tmp_path / "sr.dcm")
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=False)
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    assert "Certainty of Finding" in dump.stdout
    xml = subprocess.run(["dsr2xml", str(path)], capture_output=True, text=True, check=False)
    assert xml.returncode == 0, xml.stderr
    assert DETECTOR.device_uid in xml.stdout
    assert pydicom.dcmread(path).SOPInstanceUID == study[1].SOPInstanceUID
    assert dsrdump_problems(study[1]) == []  # -Ee -Ec: no encoding or content errors
