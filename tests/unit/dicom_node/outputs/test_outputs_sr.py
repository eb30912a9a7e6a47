"""The TID 1500 SR: structure OHIF and IHE AI Results expect, checked on the content tree."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from outputs_helpers import DEMO, DETECTOR, make_result, make_source, save
from pydicom.dataset import Dataset

from ai.types import BoundingBox
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


def test_every_finding_is_a_group_with_tracking_probability_and_presence(study) -> None:
    _, sr = study
    groups = _groups(sr)
    assert len(groups) == 3  # nodule (box), cardiomegaly (negative), effusion (no box)
    expected = {
        "27925004": ("91.0", "52101004"),
        "287272002": ("12.0", "272519000"),
        "60046008": ("66.0", "52101004"),
    }
    tracking_uids = set()
    for group in groups:
        assert len(_children(group, "112039")) == 1  # Tracking Identifier
        (uid_item,) = _children(group, "112040")  # Tracking Unique Identifier
        tracking_uids.add(uid_item.UID)
        (finding,) = _children(group, "121071")
        code = finding.ConceptCodeSequence[0].CodeValue
        probability, presence = expected[code]
        (num,) = _children(group, "111012")
        measured = num.MeasuredValueSequence[0]
        assert str(measured.NumericValue) == probability
        assert measured.MeasurementUnitsCodeSequence[0].CodeValue == "%"
        assert _children(num, "111001"), "AlgorithmIdentification on the measurement"
        (evaluation,) = _children(group, code)  # presence, named after the finding
        assert evaluation.ConceptCodeSequence[0].CodeValue == presence
        assert _children(group, "111001"), "AlgorithmIdentification on the group"
    assert len(tracking_uids) == 3


def test_box_is_an_image_region_polyline_in_source_pixels(study) -> None:
    ds, sr = study
    scoords = [i for i in _walk(sr) if i.ValueType == "SCOORD"]
    assert len(scoords) == 1
    (region,) = scoords
    assert _code(region) == "111030" and region.GraphicType == "POLYLINE"
    assert [float(v) for v in region.GraphicData] == [20, 40, 120, 40, 120, 140, 20, 140, 20, 40]
    (source,) = region.ContentSequence
    assert source.RelationshipType == "SELECTED FROM"
    assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert not [i for i in _walk(sr) if i.ValueType == "SCOORD3D"]


def test_finding_without_box_references_its_image(study) -> None:
    ds, sr = study
    unboxed = [g for g in _groups(sr) if not [i for i in _walk(g) if i.ValueType == "SCOORD"]]
    assert len(unboxed) == 2
    for group in unboxed:
        (source,) = _children(group, "121112")
        assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


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
    assert len(_groups(sr)) == 6


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
