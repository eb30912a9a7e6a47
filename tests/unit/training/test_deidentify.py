"""``training deidentify``: canaries never survive (files, labels, report, logs), UIDs are
remapped consistently (references follow), pixel data bytes are untouched, files stay valid
(dcmread, dciodvfy, decoding) for uncompressed, JPEG 2000 and JPEG Lossless phantoms."""

from __future__ import annotations

import csv
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, generate_uid

from training.cli import main
from training.deidentify import (
    PROFILE,
    REPORT_NAME,
    DeidentificationError,
    Pseudonymizer,
    deidentify_dataset,
)
from training.evaluate import load_labelled_set
from training.synth import synthesize

SALT = "test-salt-do-not-use"
VARIANTS = ["dx_mono1_j2k", "cr_mono1_jpeg_lossless", "dx_mono2_explicit",
            "dx_mono2_implicit_12bit"]  # fmt: skip
BIRTH_DATE = "19230405"
UID_RE = re.compile(r"2\.25\.[1-9][0-9]{0,38}")


def dciodvfy_errors(path: Path) -> list[str]:
    """``Error`` lines of dicom3tools' dciodvfy (as tests/conftest.py gates outputs; a local
    copy because ``conftest`` resolves to another package's when tests/unit/ai runs too)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy is not installed; run `make test` (it installs dicom3tools)")
    res = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def _canaries(ds: Dataset, patient: str) -> None:
    """Unique strings (all containing CANARY, plus one date) wherever PHI hides."""
    ds.PatientName = "CANARY^PATNAME"
    ds.PatientID = patient
    ds.PatientBirthDate = BIRTH_DATE
    ds.AccessionNumber = "CANARYACC"
    ds.InstitutionName = "CANARY INSTITUTE"
    ds.InstitutionAddress = "1 CANARY ROAD"
    ds.ReferringPhysicianName = "CANARYREF^DOC"
    ds.OperatorsName = "CANARYOP^ERATOR"
    ds.PerformingPhysicianName = "CANARYPERF^DOC"
    ds.StudyID = "CANARYSID"
    ds.StudyDescription = "CANARY STUDY DESCRIPTION"
    ds.DeviceSerialNumber = "CANARYSERIAL"
    ds.StationName = "CANARYSTATION"
    ds.ImageComments = "CANARY free text comment"
    ds.PatientComments = "CANARY patient comment"
    request = Dataset()
    request.RequestedProcedureID = "CANARYRPID"
    request.ScheduledProcedureStepDescription = "CANARY SPS DESCRIPTION"
    ds.RequestAttributesSequence = Sequence([request])
    other = Dataset()
    other.PatientID = "CANARYOTHERID"
    other.IssuerOfPatientID = "CANARY ISSUER"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.ReferencedStudySequence = Sequence([_ref("1.2.840.10008.3.1.2.3.1", generate_uid())])
    block = ds.private_block(0x0029, "CANARY CORP", create=True)
    block.add_new(0x10, "LO", "CANARYPRIVATE")
    block.add_new(0x11, "OB", b"CANARYBYTES\0")


def _ref(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
    return item


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Phantoms with canaries, one derived image referencing its source in the same study,
    one image flagged BurnedInAnnotation YES, and the labels rewritten to match."""
    root = tmp_path_factory.mktemp("deid_in")
    synthesize(root, 4, seed=41, size=(128, 112), variants=VARIANTS)
    paths = sorted(root.rglob("*.dcm"))
    patients: dict[str, str] = {}
    originals: set[str] = set()
    for path in paths:
        ds = pydicom.dcmread(path)
        originals |= {str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                      str(ds.SOPInstanceUID)}  # fmt: skip
        patient = patients.setdefault(str(ds.PatientID), f"CANARYPID{len(patients)}")
        _canaries(ds, patient)
        ds.save_as(path)
    # a derived image in the first study that points at its source
    first = pydicom.dcmread(paths[0])
    derived = pydicom.dcmread(paths[0])
    derived.SOPInstanceUID = derived.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    derived.SourceImageSequence = Sequence([_ref(first.SOPClassUID, first.SOPInstanceUID)])
    derived.SourceImageSequence[0].PersonName = "CANARYNESTED^PN"
    derived.SourceImageSequence[0].PatientID = "CANARYNESTEDID"
    derived.save_as(paths[0].with_name("derived.dcm"))
    burned = pydicom.dcmread(paths[1])
    burned.SOPInstanceUID = burned.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    burned.BurnedInAnnotation = "YES"
    burned.save_as(paths[1].with_name("burned.dcm"))
    labels = root / "labels.csv"
    with labels.open() as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["patient_id"] = patients[row["patient_id"]]
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"root": root, "first": paths[0], "derived": paths[0].with_name("derived.dcm"),
            "originals": originals, "labelled": len(rows)}  # fmt: skip


@pytest.fixture(scope="module")
def deidentified(tree: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:  # fmt: skip
    root = tree["root"]
    assert isinstance(root, Path)
    out = tmp_path_factory.mktemp("deid") / "out"
    capture, root_logger = _Capture(), logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(capture)
    root_logger.setLevel(logging.DEBUG)  # everything, pydicom's debug output included
    try:
        code = main(["-vv", "deidentify", "--in", str(root), "--out", str(out), "--salt", SALT,
                     "--labels", str(root / "labels.csv"), "--boxes", str(root / "boxes.json")])  # fmt: skip
    finally:
        root_logger.removeHandler(capture)
        root_logger.setLevel(level)
    assert code == 0
    return {"out": out, "log": "\n".join(capture.lines)}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


def test_no_canary_in_any_output_file_report_or_log(tree: dict[str, object],
                                                    deidentified: dict[str, object],
                                                    capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out, root = deidentified["out"], tree["root"]
    assert isinstance(out, Path) and isinstance(root, Path)
    assert all(b"CANARY" in p.read_bytes() for p in root.rglob("*.dcm"))  # not vacuous
    files = _outputs(out)
    assert {p.name for p in files} >= {"labels.csv", "boxes.json", REPORT_NAME}
    forbidden = [b"CANARY", BIRTH_DATE.encode()] + [o.encode() for o in tree["originals"]]  # type: ignore[attr-defined]
    for path in files:
        data = path.read_bytes()
        for needle in forbidden:
            assert needle not in data, f"{needle!r} survived in {path.name}"
    text = str(deidentified["log"]) + capfd.readouterr().err
    for needle in forbidden:
        assert needle.decode() not in text
    assert "de-identified" in str(deidentified["log"])  # the log was captured at all


def test_uids_remapped_consistently_and_references_follow(tree: dict[str, object],
                                                          deidentified: dict[str, object]) -> None:  # fmt: skip
    out = deidentified["out"]
    assert isinstance(out, Path)
    ids = Pseudonymizer(SALT.encode())
    first = pydicom.dcmread(tree["first"])  # type: ignore[arg-type]
    source = pydicom.dcmread(tree["derived"])  # type: ignore[arg-type]
    new_first = _find(out, ids.uid(first.SOPInstanceUID))
    new_derived = _find(out, ids.uid(source.SOPInstanceUID))
    assert (
        new_first.StudyInstanceUID
        == new_derived.StudyInstanceUID
        == ids.uid(first.StudyInstanceUID)
    )
    assert new_derived.SourceImageSequence[0].ReferencedSOPInstanceUID == new_first.SOPInstanceUID
    assert new_derived.SourceImageSequence[0].ReferencedSOPClassUID == first.SOPClassUID
    assert new_derived.SourceImageSequence[0].PersonName == "ANONYMIZED^"
    assert new_derived.SourceImageSequence[0].PatientID == new_first.PatientID
    studies, patients = set(), set()
    for path in _outputs(out):
        if path.suffix != ".dcm":
            continue
        ds = pydicom.dcmread(path)
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert UID_RE.fullmatch(uid) and len(uid) <= 64
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (
            path.relative_to(out).as_posix()
            == f"{ds.PatientID}/{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
        )
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert "ReferencedStudySequence" not in ds and "RequestAttributesSequence" not in ds
        assert not any(elem.tag.is_private for elem in ds.iterall())
        studies.add(ds.StudyInstanceUID)
        patients.add(ds.PatientID)
    assert len(studies) == 4 and len(patients) >= 1


def _find(out: Path, sop_uid: str) -> Dataset:
    (path,) = out.rglob(f"{sop_uid}.dcm")
    return pydicom.dcmread(path)


def test_pixel_bytes_identical_and_files_valid(tree: dict[str, object],
                                               deidentified: dict[str, object]) -> None:  # fmt: skip
    root, out = tree["root"], deidentified["out"]
    assert isinstance(root, Path) and isinstance(out, Path)
    ids = Pseudonymizer(SALT.encode())
    syntaxes = set()
    checked = 0
    for src_path in sorted(root.rglob("*.dcm")):
        src = pydicom.dcmread(src_path)
        if src.get("BurnedInAnnotation") == "YES":
            assert not list(out.rglob(f"{ids.uid(src.SOPInstanceUID)}.dcm"))  # refused
            continue
        (dst_path,) = out.rglob(f"{ids.uid(src.SOPInstanceUID)}.dcm")
        dst = pydicom.dcmread(dst_path)
        assert dst.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert dst.PixelData == src.PixelData  # encapsulated or native: the very same bytes
        assert (dst.pixel_array == src.pixel_array).all()
        new_errors = set(dciodvfy_errors(dst_path)) - set(dciodvfy_errors(src_path))
        assert not new_errors, new_errors
        syntaxes.add(str(src.file_meta.TransferSyntaxUID))
        checked += 1
    assert {JPEG2000Lossless, JPEGLosslessSV1} <= syntaxes and checked >= 5


def test_labels_and_report_follow_the_new_tree(tree: dict[str, object],
                                               deidentified: dict[str, object]) -> None:  # fmt: skip
    import json

    out = deidentified["out"]
    assert isinstance(out, Path)
    labelled = load_labelled_set(out, out / "labels.csv")
    assert len(labelled.images) == tree["labelled"]
    with (out / "labels.csv").open() as fh:
        rows = {r["sop_instance_uid"]: r for r in csv.DictReader(fh)}
    for image in labelled.images:
        ds = pydicom.dcmread(image.path, stop_before_pixels=True)
        row = rows[image.sop_instance_uid]
        assert (
            row["patient_id"] == ds.PatientID and row["study_instance_uid"] == ds.StudyInstanceUID
        )
        assert (out / row["path"]).resolve() == image.path.resolve()
    boxes = json.loads((out / "boxes.json").read_text())
    assert all((out / rel).is_file() for rel in boxes)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["files"]["refused: BurnedInAnnotation YES"] == 1
    # labels.csv, boxes.json, classes.txt, locations.json
    assert report["files"]["not DICOM (not copied)"] == 4
    assert report["instances"] == tree["labelled"] + 1  # + the derived image
    assert report["actions"]["private removed"] > 0 and report["salt"].startswith("given")


def test_same_salt_same_mapping_other_salt_other_uids(tree: dict[str, object],
                                                      deidentified: dict[str, object],
                                                      tmp_path: Path) -> None:  # fmt: skip
    root, out = tree["root"], deidentified["out"]
    assert isinstance(root, Path) and isinstance(out, Path)
    again = tmp_path / "again"
    assert main(["-q", "deidentify", "--in", str(root), "--out", str(again), "--salt", SALT,
                 "--allow-burned-in"]) == 0  # fmt: skip
    first = {p.relative_to(out) for p in out.rglob("*.dcm")}
    second = {p.relative_to(again) for p in again.rglob("*.dcm")}
    assert first < second and len(second - first) == 1  # the burned-in image, now allowed
    other = tmp_path / "other"
    assert main(["-q", "deidentify", "--in", str(root), "--out", str(other), "--salt", "x"]) == 0
    assert not first & {p.relative_to(other) for p in other.rglob("*.dcm")}


def test_refusals(tree: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    root = tree["root"]
    assert isinstance(root, Path)
    assert main(["-q", "deidentify", "--in", str(root), "--out", str(root / "inside")]) == 1
    assert "must not be inside --in" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["-q", "deidentify", "--in", str(root), "--out", str(busy)]) == 1
    err = capsys.readouterr().err
    assert "not empty; add --force" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["-q", "deidentify", "--in", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "no DICOM file" in capsys.readouterr().err


def test_profile_table_and_dataset_level_rules() -> None:
    assert set(PROFILE.values()) <= {"X", "Z", "D", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    ds = Dataset()
    ds.PatientID, ds.PatientName = "", "CANARY^X"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.ContentDate, ds.AcquisitionDate = "20200101", "20200101"
    ds.AcquisitionContextSequence = Sequence([Dataset()])
    ds.add_new(0x60000010, "US", 512)  # an overlay plane's rows
    ds.add_new(0x00081040, "LO", "CANARY DEPARTMENT")
    deidentify_dataset(ds, Pseudonymizer(b"k"))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"  # classes are not instances
    assert ds.SOPInstanceUID.startswith("2.25.")
    assert ds.ContentDate == "19000101"  # Type 1 in SR: dummy
    assert ds["AcquisitionDate"].is_empty  # X/Z on a plain attribute: present, emptied
    assert len(ds.AcquisitionContextSequence) == 0  # Type 2 sequence: kept, emptied
    assert 0x60000010 not in ds and "InstitutionalDepartmentName" not in ds
    assert ds["PatientName"].is_empty and ds["PatientID"].is_empty  # no ID: no pseudonym
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    with pytest.raises(DeidentificationError, match="salt"):
        Pseudonymizer(b"")
