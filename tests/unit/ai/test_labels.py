"""Label files of every supported format, the DICOM index, and mismatch reporting."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest

from ai.reference.dicom_files import index_dicom_tree
from ai.reference.labels import (
    ClassificationLabels,
    LabelError,
    PixelBox,
    YoloBox,
    normalise_path,
    read_classification_labels,
    read_nih_boxes,
    read_yolo_labels,
)
from ai.reference.matching import LabelMismatchError, match_labels
from training.phantoms import FINDINGS
from training.synth import synthesize

NIH_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"  # verbatim BBox_List_2017.csv


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six studies of small phantoms (some with two images) plus labels.csv / boxes.json."""
    root = tmp_path_factory.mktemp("labels") / "data"
    synthesize(root, 6, seed=11, size=96, prevalence=0.5)
    return root


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_sr(path: Path) -> None:
    """A header-only object without pixels (as an SR or a presentation state is)."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality, ds.StudyInstanceUID = "SR", pydicom.uid.generate_uid()
    ds.save_as(path, enforce_file_format=True)


# ------------------------------------------------------------------ classification CSV


def test_synth_labels_auto_key_is_sop(tree: Path) -> None:
    labels = read_classification_labels(tree / "labels.csv")
    assert labels.key == "sop" and labels.key_column == "sop_instance_uid"
    assert labels.label_names == FINDINGS and labels.multi_label
    rows = _rows(tree)
    assert len(labels.records) == len(rows)
    first = labels.records[rows[0]["sop_instance_uid"]]
    assert first.targets == tuple(int(rows[0][n]) for n in FINDINGS)
    assert first.patient_id == rows[0]["patient_id"]


@pytest.mark.parametrize("key", ["sop", "path", "study"])
def test_every_key_kind_matches_every_image(tree: Path, key: str) -> None:
    labels = read_classification_labels(tree / "labels.csv", key=key)
    match = match_labels(index_dicom_tree(tree), labels, strict=True)
    assert labels.key == key and match.ok
    assert len(match.matched) == len(_rows(tree))
    by_sop = {r["sop_instance_uid"]: r for r in _rows(tree)}
    for pair in match.matched:  # a study's labels equal its images' labels in synth data
        row = by_sop[pair.image.sop_instance_uid]
        assert pair.targets == tuple(int(row[n]) for n in FINDINGS)


def test_path_key_only_header_and_label_subset(tree: Path, tmp_path: Path) -> None:
    rows = _rows(tree)
    csv_path = _write_csv(
        tmp_path / "by_path.csv",
        ["File", "Cardiomegaly", "Pleural Effusion"],
        [
            ["./" + r["path"].replace("/", "\\"), r["cardiomegaly"], r["pleural_effusion"]]
            for r in rows
        ],
    )
    labels = read_classification_labels(csv_path, ["cardiomegaly", "pleural_effusion"])
    assert labels.key == "path" and labels.label_names == ("cardiomegaly", "pleural_effusion")
    assert match_labels(index_dicom_tree(tree), labels).ok


def test_multiclass_label_column(tree: Path, tmp_path: Path) -> None:
    rows = _rows(tree)
    classes = ["normal", "cardiomegaly", "other"]
    values = ["Cardiomegaly" if r["cardiomegaly"] == "1" else "normal" for r in rows]
    values[0] = "covid-19"  # not in the class list: an unknown class
    csv_path = _write_csv(tmp_path / "mc.csv", ["SOPInstanceUID", "label"],
                          [[r["sop_instance_uid"], v] for r, v in zip(rows, values, strict=True)])  # fmt: skip
    labels = read_classification_labels(csv_path, classes)
    assert not labels.multi_label and labels.label_names == tuple(classes)
    match = match_labels(index_dicom_tree(tree), labels)
    assert len(match.matched) == len(rows) - 1
    assert all(sum(p.targets) == 1 for p in match.matched)
    assert len(match.unknown_classes) == 1 and "covid-19" in match.unknown_classes[0]
    assert "unknown classes: 1" in match.report()
    inferred = read_classification_labels(csv_path)  # class list from the data, sorted
    assert inferred.label_names == tuple(sorted(set(values)))


def test_mismatches_are_reported_not_dropped(tree: Path, tmp_path: Path) -> None:
    rows = _rows(tree)
    kept = rows[1:]  # the first image has no label row
    body = [[r["sop_instance_uid"], r["nodule"]] for r in kept]
    body += [["1.2.3.4.5.6.7.8", "1"], [kept[0]["sop_instance_uid"], kept[0]["nodule"]]]
    labels = read_classification_labels(
        _write_csv(tmp_path / "l.csv", ["sop_instance_uid", "nodule"], body)
    )
    data = tmp_path / "data"
    shutil.copytree(tree, data)
    (data / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    (data / "notes.txt").write_text("not DICOM")
    _write_sr(data / "report.dcm")
    shutil.copy(data / "report.dcm", data / "DICOMDIR")  # stands in for a media directory
    index = index_dicom_tree(data)
    assert index.skipped >= 2 and [rel for rel, _ in index.unreadable] == ["broken.dcm"]
    assert index.non_images == [("report.dcm", "SR")]
    match = match_labels(index, labels)
    assert len(match.matched) == len(kept)
    assert [im.sop_instance_uid for im in match.images_without_labels] == [
        rows[0]["sop_instance_uid"]
    ]
    assert (
        len(match.labels_without_images) == 1
        and "1.2.3.4.5.6.7.8" in match.labels_without_images[0]
    )
    assert match.problems == {"labels without images": 1, "images without labels": 1,
                              "unreadable files": 1}  # fmt: skip
    assert match.summary()["duplicate label rows"] == 1
    assert match.summary()["non-image objects"] == 1 and "report.dcm (SR)" in match.report()
    report = match.report()
    for text in ("1.2.3.4.5.6.7.8", rows[0]["sop_instance_uid"], "broken.dcm", "line"):
        assert text in report
    assert rows[0]["patient_id"] not in report.replace(rows[0]["path"], "")  # only in the path
    with pytest.raises(LabelMismatchError, match="labels without images: 1"):
        match_labels(index, labels, strict=True)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,b\n1,0\n", "no key column"),
        ("sop_instance_uid,nodule\n1.2.3,maybe\n", 'value "maybe"'),
        ("sop_instance_uid,nodule\n,1\n", "empty key"),
        ("sop_instance_uid,nodule\n1.2.3,1\n1.2.3,0\n", "different labels"),
        ("sop_instance_uid,patient_id\n1.2.3,P1\n", "no label columns"),
        ("", "empty"),
    ],
)
def test_bad_classification_csv(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(LabelError, match=match):
        read_classification_labels(path)


def test_missing_label_file_and_bad_key(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="does not exist"):
        read_classification_labels(tmp_path / "nope.csv")
    path = _write_csv(tmp_path / "x.csv", ["sop_instance_uid", "nodule"], [["1.2", 1]])
    with pytest.raises(LabelError, match="must be one of"):
        read_classification_labels(path, key="accession")
    with pytest.raises(LabelError, match=r"\['mass'\] not in the header"):
        read_classification_labels(path, ["mass"])


# ------------------------------------------------------------------ YOLO boxes


def test_yolo_json_map_from_synth(tree: Path) -> None:
    boxes = read_yolo_labels(tree / "boxes.json", tree / "classes.txt")
    doc = json.loads((tree / "boxes.json").read_text())
    assert set(boxes) == set(doc)
    assert any(v == [] for v in boxes.values()) or all(boxes.values())
    match = match_labels(index_dicom_tree(tree), boxes, classes=list(FINDINGS), strict=True)
    assert len(match.matched) == len(doc)
    for pair in match.matched:
        expected = {FINDINGS[int(line.split()[0])] for line in doc[pair.label_key]}
        assert {FINDINGS[b[0]] for b in pair.boxes} == expected
        for _, x0, y0, x1, y1 in pair.boxes:
            assert 0 <= x0 < x1 <= pair.image.cols and 0 <= y0 < y1 <= pair.image.rows


def test_yolo_txt_folder_unknown_class_and_outside_box(tree: Path, tmp_path: Path) -> None:
    rows = _rows(tree)
    folder = tmp_path / "yolo"
    for i, row in enumerate(rows):
        txt = folder / (row["path"][: -len(".dcm")] + ".txt")
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text({0: "0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n", 1: "1 0.95 0.5 0.2 0.2\n",
                        2: "\n"}.get(i, ""))  # fmt: skip
    boxes = read_yolo_labels(folder, ["nodule", "cardiomegaly"])
    first = boxes[rows[0]["path"][:-4]]
    assert [b.label for b in first] == ["nodule", None] and isinstance(first[0], YoloBox)
    assert boxes[rows[2]["path"][:-4]] == []  # empty file: a negative image
    match = match_labels(index_dicom_tree(tree), boxes)
    assert len(match.matched) == len(rows)
    assert len(match.unknown_classes) == 1 and "class index 7" in match.unknown_classes[0]
    assert len(match.boxes_outside) == 1 and "cardiomegaly" in match.boxes_outside[0]
    by_sop = {p.image.sop_instance_uid: p for p in match.matched}
    assert by_sop[rows[0]["sop_instance_uid"]].targets[:2] == (1, 0)
    assert by_sop[rows[1]["sop_instance_uid"]].boxes == ()  # the outside box is not kept


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"a.dcm": ["0 0.5 0.5"]}, "is not"),
        ({"a.dcm": ["x 0.5 0.5 0.1 0.1"]}, "numbers"),
        ({"a.dcm": "0 0.5 0.5 0.1 0.1"}, "must be a list"),
        (["a.dcm"], "JSON object"),
    ],
)
def test_bad_yolo_map(tmp_path: Path, doc: object, match: str) -> None:
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(LabelError, match=match):
        read_yolo_labels(path, ["nodule"])


# ------------------------------------------------------------------ NIH boxes


def test_nih_real_header_against_a_real_nih_dicom(realdicom: Path, tmp_path: Path) -> None:
    data = tmp_path / "nih"
    data.mkdir()
    shutil.copy(realdicom / "dx_chest_nih_cxr14_sc.dcm", data / "00013118_008.dcm")
    # a second file with the same SOP Instance UID: reported as a duplicate, not indexed
    shutil.copy(realdicom / "dx_chest_nih_cxr14_sc.dcm", data / "zz_copy.dcm")
    csv_path = tmp_path / "BBox_List_2017.csv"
    csv_path.write_text(
        NIH_HEADER
        + "00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,\n"
        + "00013118_008.png,Nodule,900,900,200,200,,,\n"  # runs off a 1024 x 1024 image
        + "00013118_008.png,Hernia,10,10,20,20,,,\n"  # not in the class list
        + "00099999_000.png,Nodule,1,2,3,4,,,\n"  # no such image
    )
    boxes = read_nih_boxes(csv_path)
    assert boxes["00013118_008.png"][0] == PixelBox(
        "Atelectasis", 225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661,
        source="BBox_List_2017.csv:2",
    )  # fmt: skip
    index = index_dicom_tree(data)
    assert len(index) == 1 and len(index.duplicates) == 1
    image = index[0]
    ds = pydicom.dcmread(realdicom / "dx_chest_nih_cxr14_sc.dcm", stop_before_pixels=True)
    assert (image.rows, image.cols, image.modality) == (ds.Rows, ds.Columns, "DX")
    assert image.relpath == "00013118_008.dcm" and index.duplicates[0][0] == "zz_copy.dcm"
    match = match_labels(index, boxes, classes=["atelectasis", "nodule"])
    assert len(match.matched) == 1 and match.matched[0].boxes[0][0] == 0
    assert len(match.boxes_outside) == 1 and "Nodule" in match.boxes_outside[0]
    assert len(match.unknown_classes) == 1 and "Hernia" in match.unknown_classes[0]
    assert (
        len(match.labels_without_images) == 1 and "00099999_000" in match.labels_without_images[0]
    )
    assert match.problems["duplicate images"] == 1


@pytest.mark.parametrize(
    "text",
    [
        "Image Index,Finding Label,x,y,w,h\nimg.png,Nodule,1,2,3,4\n",
        'Image Index,Finding Label,Bbox [x,y,w,h]\nimg.png,Nodule,"[1, 2, 3, 4]"\n',
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\nimg.png,Nodule,1,2,3,4\n",
    ],
)
def test_nih_header_variants(tmp_path: Path, text: str) -> None:
    path = tmp_path / "b.csv"
    path.write_text(text)
    box = read_nih_boxes(path)["img.png"][0]
    assert (box.label, box.x, box.y, box.w, box.h) == ("Nodule", 1, 2, 3, 4)


def test_nih_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    path.write_text(NIH_HEADER + "img.png,Nodule,1,2,three,4,,,\n")
    with pytest.raises(LabelError, match="not four numbers"):
        read_nih_boxes(path)
    path.write_text("Image,Label\nimg.png,Nodule\n")
    with pytest.raises(LabelError, match="Image Index and Finding Label"):
        read_nih_boxes(path)


# ------------------------------------------------------------------ index


def test_index_reads_headers_only(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ai.pixels

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("the index must not decode pixels")

    monkeypatch.setattr(ai.pixels, "decode_frame", no_decode)
    index = index_dicom_tree(tree)
    rows = {r["sop_instance_uid"]: r for r in _rows(tree)}
    assert {im.sop_instance_uid for im in index} == set(rows)
    for image in index:
        row = rows[image.sop_instance_uid]
        assert image.relpath == row["path"] and image.patient_id == row["patient_id"]
        assert image.study_instance_uid == row["study_instance_uid"]
        assert (image.rows, image.cols) == (96, 96) and image.modality in ("CR", "DX")
        assert image.patient_id not in repr(image).replace(image.relpath, "")
    with pytest.raises(LabelError, match="does not exist"):
        index_dicom_tree(tree / "missing")


def test_normalise_path() -> None:
    assert normalise_path(" ./a\\b/c.dcm ") == "a/b/c.dcm"
    assert normalise_path("/a/b") == "a/b"


def test_match_needs_a_match(tree: Path, tmp_path: Path) -> None:
    labels = read_classification_labels(
        _write_csv(tmp_path / "l.csv", ["sop_instance_uid", "nodule"], [["1.2.3", 1]])
    )
    match = match_labels(index_dicom_tree(tree), labels)
    assert isinstance(labels, ClassificationLabels) and not match.matched
    with pytest.raises(LabelError, match="no image matched"):
        match.check(strict=False)
