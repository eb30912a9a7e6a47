"""Phantom DICOM: every variant decodes losslessly, validates, and matches its labels."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_voi_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from training.cli import COMMANDS, main
from training.phantoms import FINDINGS
from training.synth import (
    ANALYSABLE_VARIANTS,
    LABEL_COLUMNS,
    VARIANT_SPECS,
    VARIANTS,
    StudyContext,
    SynthError,
    make_dataset,
    make_image,
    safe_name,
    synthesize,
    write_dataset,
)

REQUIRED_VARIANTS = (
    "dx_mono2_explicit",
    "dx_mono1_j2k",
    "cr_mono1_jpeg_lossless",
    "cr_mono2_jpegls",
    "dx_mono2_rle",
    "cr_mono1_voi_lut_seq",
    "dx_mono2_implicit_12bit",
    "cr_mono2_16bit_rescale",
    "dx_lateral",
    "ct_slice",
)


def _dciodvfy_errors(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dicom3tools dciodvfy is not installed" + "; make test installs it")
    res = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def _dcmdump_ok(path: Path) -> bool:
    tool = shutil.which("dcmdump")
    if tool is None:
        pytest.fail("DCMTK dcmdump is not installed" + "; make test installs it")
    return subprocess.run([tool, "-q", str(path)], capture_output=True, timeout=60).returncode == 0


def test_required_variants_are_declared() -> None:
    assert set(REQUIRED_VARIANTS) <= set(VARIANTS)
    syntaxes = {VARIANT_SPECS[v].transfer_syntax for v in VARIANTS}
    assert {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEGLosslessSV1,
        JPEGLSLossless,
    } <= syntaxes
    assert {JPEG2000Lossless, RLELossless} <= syntaxes
    assert {VARIANT_SPECS[v].bits_stored for v in VARIANTS} >= {10, 12, 14, 15, 16}
    assert "dx_lateral" not in ANALYSABLE_VARIANTS and "ct_slice" not in ANALYSABLE_VARIANTS


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_round_trips_and_validates(tmp_path: Path, variant: str) -> None:
    spec = VARIANT_SPECS[variant]
    findings = {"nodule": True} if spec.analysable else None
    img = make_image(variant, seed=3, rows=160, columns=128, findings=findings)
    path = tmp_path / "x.dcm"
    write_dataset(img.dataset, path)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == spec.transfer_syntax
    assert ds.SOPClassUID == img.dataset.SOPClassUID
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (160, 128, 16)
    assert ds.HighBit == ds.BitsStored - 1 and ds.PixelRepresentation == 0
    assert ds.PhotometricInterpretation == spec.photometric
    assert np.array_equal(ds.pixel_array, img.pixels), (
        "lossless decode differs from what was encoded"
    )
    assert int(img.pixels.max()) < 1 << ds.BitsStored
    assert _dciodvfy_errors(path) == []
    assert _dcmdump_ok(path)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if VARIANT_SPECS[v].sop != "ct"])
def test_projection_headers(variant: str) -> None:
    spec = VARIANT_SPECS[variant]
    ds = make_dataset(variant, seed=1, rows=96, columns=80)
    assert ds.Modality == ("DX" if spec.sop.startswith("dx") else "CR")
    assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition == spec.view
    assert list(ds.PatientOrientation) == (["P", "F"] if spec.view == "LL" else ["L", "F"])
    assert len(ds.ImagerPixelSpacing) == 2 and float(ds.ImagerPixelSpacing[0]) > 0
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
    ):
        assert str(ds.data_element(keyword).value)
    if spec.sop.startswith("dx"):
        expected = "INVERSE" if spec.photometric == "MONOCHROME1" else "IDENTITY"
        assert ds.PresentationLUTShape == expected
    assert ("WindowCenter" in ds) == (spec.voi == "window")
    assert ("VOILUTSequence" in ds) == (spec.voi == "lut")


def test_voi_lut_sequence_applies() -> None:
    img = make_image("cr_mono1_voi_lut_seq", seed=2, rows=128, columns=128)
    ds = img.dataset
    entries, first, bits = ds.VOILUTSequence[0].LUTDescriptor
    assert bits == 16 and entries > 16 and first >= 0
    out = apply_voi_lut(img.pixels, ds)
    assert out.min() >= 0 and out.max() <= 65535 and out.std() > 1000


def test_rescale_variant_has_modality_lut() -> None:
    ds = make_dataset("cr_mono2_16bit_rescale", seed=4, rows=96, columns=96)
    assert float(ds.RescaleSlope) != 1.0 or float(ds.RescaleIntercept) != 0.0
    assert ds.BitsStored == 16 and "WindowCenter" not in ds


def test_monochrome1_is_inverted() -> None:
    """Same seed: MONOCHROME1 stores bright anatomy as low values."""
    mono2 = make_image("dx_mono2_implicit_12bit", seed=9, rows=128, columns=128).pixels.astype(
        float
    )
    mono1 = make_image("cr_mono1_voi_lut_seq", seed=9, rows=128, columns=128).pixels.astype(float)
    assert np.corrcoef(mono1.ravel(), mono2.ravel())[0, 1] < -0.95


def test_ct_slice_is_a_ct_object() -> None:
    ds = make_dataset("ct_slice", seed=1, rows=128, columns=128)
    assert ds.Modality == "CT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.RescaleIntercept == -1024 and ds.FrameOfReferenceUID


def test_same_seed_same_uids_and_pixels() -> None:
    a = make_dataset("dx_mono1_j2k", seed=42, rows=96, columns=96)
    b = make_dataset("dx_mono1_j2k", seed=42, rows=96, columns=96)
    c = make_dataset("dx_mono1_j2k", seed=43, rows=96, columns=96)
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "PatientID",
        "PixelData",
    ):
        assert a[keyword].value == b[keyword].value
        assert a[keyword].value != c[keyword].value
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID


def test_study_context_groups_images() -> None:
    study = StudyContext.from_seed(7)
    first = make_dataset("dx_mono2_explicit", seed=1, rows=96, columns=96, study=study)
    second = make_dataset("dx_lateral", seed=2, rows=96, columns=96, study=study)
    assert first.StudyInstanceUID == second.StudyInstanceUID == study.study_instance_uid
    assert first.PatientID == second.PatientID == study.patient.patient_id
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    assert (first.SeriesNumber, second.SeriesNumber) == (1, 2)
    assert first.AccessionNumber == second.AccessionNumber


def test_large_non_square_jpeg_lossless(tmp_path: Path) -> None:
    img = make_image("cr_mono1_jpeg_lossless", seed=5, rows=2500, columns=2048)
    path = tmp_path / "big.dcm"
    write_dataset(img.dataset, path)
    assert np.array_equal(pydicom.dcmread(path).pixel_array, img.pixels)
    assert path.stat().st_size < img.pixels.nbytes * 0.8
    assert _dciodvfy_errors(path) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "mr_brain"}, 'Variant "mr_brain" is not known'),
        ({"rows": 10}, "out of range"),
        ({"variant": "ct_slice", "findings": {"nodule": True}}, "not analysable"),
        ({"seed": -3}, "Seed -3"),
    ],
)
def test_make_dataset_rejects_bad_requests(kwargs: dict, match: str) -> None:
    args = {"variant": "dx_mono2_explicit", "seed": 0, "rows": 96, "columns": 96} | kwargs
    with pytest.raises(SynthError, match=match):
        make_dataset(args.pop("variant"), **args)


def test_safe_name() -> None:
    assert safe_name("../etc/passwd") == "etc_passwd"
    assert safe_name("PH123") == "PH123" and safe_name("") == "unnamed"


# --------------------------------------------------------------------------- synthesize


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 30, seed=5, size=(96, 80), variants=list(VARIANTS), prevalence=0.4)
    return out


def _labels(out: Path) -> list[dict[str, str]]:
    with (out / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_labels_match_files(dataset_dir: Path) -> None:
    rows = _labels(dataset_dir)
    assert list(rows[0]) == list(LABEL_COLUMNS)
    files = sorted(p.relative_to(dataset_dir).as_posix() for p in dataset_dir.rglob("*.dcm"))
    assert sorted(r["path"] for r in rows) == files
    for row in rows:
        ds = pydicom.dcmread(dataset_dir / row["path"], stop_before_pixels=True)
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert (
            ds.StudyInstanceUID == row["study_instance_uid"] and ds.PatientID == row["patient_id"]
        )
        assert Path(row["path"]).parts == (
            safe_name(ds.PatientID),
            ds.StudyInstanceUID,
            ds.SOPInstanceUID + ".dcm",
        )
        assert all(row[name] in ("0", "1") for name in FINDINGS)
    assert (dataset_dir / "classes.txt").read_text().split() == list(FINDINGS)


def test_boxes_match_labels(dataset_dir: Path) -> None:
    rows = _labels(dataset_dir)
    boxes = json.loads((dataset_dir / "boxes.json").read_text())
    assert set(boxes) == {r["path"] for r in rows}
    for row in rows:
        lines = [line.split() for line in boxes[row["path"]]]
        classes = {FINDINGS[int(parts[0])] for parts in lines}
        assert classes == {name for name in FINDINGS if row[name] == "1"}
        for parts in lines:
            assert len(parts) == 5 and all(0.0 <= float(v) <= 1.0 for v in parts[1:])
    assert any(boxes.values()) and any(not v for v in boxes.values())


def test_variety_patients_and_multi_image_studies(dataset_dir: Path) -> None:
    rows = _labels(dataset_dir)
    studies_per_patient: dict[str, set[str]] = {}
    images_per_study: dict[str, int] = {}
    for row in rows:
        studies_per_patient.setdefault(row["patient_id"], set()).add(row["study_instance_uid"])
        images_per_study[row["study_instance_uid"]] = (
            images_per_study.get(row["study_instance_uid"], 0) + 1
        )
    assert len(images_per_study) == 30
    assert any(len(s) > 1 for s in studies_per_patient.values()), "no patient with two studies"
    assert any(n > 1 for n in images_per_study.values()), "no study with two images"
    views = {r["view"] for r in rows}
    assert {"PA", "AP", "LL", "CT"} <= views
    lateral = [r for r in rows if r["view"] in ("LL", "CT")]
    assert all(r[name] == "0" for r in lateral for name in FINDINGS)


def test_synthesize_is_deterministic(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", 4, seed=9, size=80, variants=["cr_mono2_jpegls", "dx_mono2_rle"])
    b = synthesize(tmp_path / "b", 4, seed=9, size=80, variants=["cr_mono2_jpegls", "dx_mono2_rle"])
    assert a.images == b.images and a.positives == b.positives
    assert (tmp_path / "a" / "labels.csv").read_bytes() == (
        tmp_path / "b" / "labels.csv"
    ).read_bytes()
    for row in _labels(tmp_path / "a"):
        assert (tmp_path / "a" / row["path"]).read_bytes() == (
            tmp_path / "b" / row["path"]
        ).read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": 0}, "Count 0"),
        ({"variants": ["nope"]}, 'Variant "nope"'),
        ({"size": 20}, "out of range"),
        ({"prevalence": -0.1}, "Prevalence"),
    ],
)
def test_synthesize_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"count": 1, "size": 64} | kwargs
    with pytest.raises(SynthError, match=match):
        synthesize(tmp_path, args.pop("count"), **args)


# --------------------------------------------------------------------------- CLI


def test_cli_synth_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    code = main(
        ["-q", "synth", "--out", str(out), "--count", "3", "--size", "96x80", "--seed", "1"]
    )
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    assert len(_labels(out)) == len(list(out.rglob("*.dcm"))) >= 3
    ds = pydicom.dcmread(next(out.rglob("*.dcm")), stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == (96, 80)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["synth", "--count", "0", "--out", "x"], "--count: 0 must be at least 1"),
        (
            ["synth", "--count", "2", "--out", "x", "--size", "12x9000"],
            "--size: Image size 12x9000",
        ),
        (["synth", "--count", "2", "--out", "x", "--size", "big"], "--size"),
        (
            ["synth", "--count", "2", "--out", "x", "--variants", "dx_mono2_explicit,bogus"],
            'unknown variant "bogus"',
        ),
        (
            ["synth", "--count", "2", "--out", "x", "--prevalence", "2"],
            "--prevalence: 2.0 is not within",
        ),
        (
            ["synth", "--count", "2", "--out", "x", "--seed", "-4"],
            "--seed: -4 must be non-negative",
        ),
        (["synth", "--count", "2"], "--out and --count are required"),
        (["nonsense"], "invalid choice"),
        ([], "required: COMMAND"),
    ],
)
def test_cli_bad_arguments_exit_2_with_message(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["synth", "--out", str(target), "--count", "1"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_cli_unwritable_out_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert main(["-q", "synth", "--out", str(blocker / "sub"), "--count", "1", "--size", "64"]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_cli_lists_variants_and_has_extensible_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--list-variants"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in VARIANTS)
    assert [c.name for c in COMMANDS][0] == "synth"
    assert all(callable(c.add_arguments) and callable(c.run) for c in COMMANDS)


def test_python_dash_m_training(tmp_path: Path) -> None:
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "training", "synth", "--count", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        res.returncode == 2 and "must be at least 1" in res.stderr and "Traceback" not in res.stderr
    )
