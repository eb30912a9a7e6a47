"""IHE AI Results conventions on every output of a build.

Each object names every model that produced the results in its Contributing Equipment
Sequence (purpose "Processing Algorithm", the bundle's manufacturer, name, version, device
UID, "DEMO" for a demo bundle), carries Series and Content (GSPS: Presentation Creation)
dates, and the SR's Image Library gives each source its own Modality, not highdicom's
SOP-class guess ("OT" for a DX radiograph stored as Secondary Capture).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from outputs_helpers import DEMO, DETECTOR, make_result, make_source
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from ai.types import BoundingBox, ModelIdentity
from dicom_node.outputs import OutputObject, OutputSettings, build_outputs
from dicom_node.outputs.common import node_version
from dicom_node.outputs.equipment import PROCESSING_ALGORITHM, is_algorithm_item
from dicom_node.outputs.image_library import source_modality

CREATED = datetime.datetime(2025, 3, 4, 5, 6, 7, 890123)
CONTENT_PAIR = {
    "sr": ("ContentDate", "ContentTime"),
    "sc": ("ContentDate", "ContentTime"),
    "gsps": ("PresentationCreationDate", "PresentationCreationTime"),
    "seg": ("ContentDate", "ContentTime"),
}


def dx_as_sc(sop_uid: str = "1.2.826.0.1.3680043.8.498.2.3") -> Dataset:
    """A DX radiograph stored as Secondary Capture, as the NIH ChestX-ray14 files are."""
    ds = make_source(modality="DX", sop_uid=sop_uid, rows=200, cols=300)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    return ds


def _study() -> list[tuple[Dataset, object]]:
    """A CR read by the detector and a DX-as-SC read by the demo classifier."""
    cr = make_source(sop_uid="1.2.826.0.1.3680043.8.498.2.1")
    sc = dx_as_sc()
    return [(cr, make_result(cr, box=BoundingBox(20, 40, 120, 140), heat_box=(40, 140, 20, 120))),
            (sc, make_result(sc, box=BoundingBox(30, 30, 90, 80), heat_box=(30, 80, 30, 90),
                             model=DEMO))]


def _build(items: list | None = None) -> list[OutputObject]:
    """Every output kind, the heatmap SEG included (off by default)."""
    return build_outputs(items or _study(), OutputSettings(seg=True), "ihe seed",
                         created=CREATED)


def _algorithm_items(ds: Dataset) -> dict[str, Dataset]:
    return {str(i.DeviceUID): i for i in ds.ContributingEquipmentSequence if is_algorithm_item(i)}


def library_modalities(sr: Dataset) -> dict[str, str]:
    """SOP Instance UID -> the Modality code value of its Image Library entry."""
    found: dict[str, str] = {}

    def walk(item: Dataset) -> None:
        if item.get("ValueType") == "IMAGE" and "ContentSequence" in item:
            uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for child in item.ContentSequence:
                if child.ConceptNameCodeSequence[0].CodeValue == "121139":
                    found[uid] = str(child.ConceptCodeSequence[0].CodeValue)
        for child in item.get("ContentSequence", []):
            walk(child)

    walk(sr)
    return found


def _assert_names(item: Dataset, model: ModelIdentity) -> None:
    (purpose,) = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        PROCESSING_ALGORITHM)
    assert item.Manufacturer == model.manufacturer
    assert item.ManufacturerModelName == model.name
    assert list(item.SoftwareVersions) == [model.version, node_version()]
    assert item.ContributionDateTime == "20250304050607.890123"
    assert ("DEMO" in item.ContributionDescription) is model.demo


def test_every_output_names_each_model_as_processing_algorithm() -> None:
    outputs = _build()
    assert sorted(o.kind for o in outputs) == ["gsps", "gsps", "sc", "sc", "seg", "seg", "sr"]
    for output in outputs:
        items = _algorithm_items(output.dataset)
        assert sorted(items) == sorted([DETECTOR.device_uid, DEMO.device_uid]), output.kind
        _assert_names(items[DETECTOR.device_uid], DETECTOR)
        _assert_names(items[DEMO.device_uid], DEMO)
        # highdicom's own item ("Processing Equipment") stays beside the models.
        others = [i for i in output.dataset.ContributingEquipmentSequence
                  if not is_algorithm_item(i)]
        assert [i.ManufacturerModelName for i in others] == ["highdicom"], output.kind


def test_contributing_equipment_and_sr_device_observers_name_the_same_models() -> None:
    sr = next(o.dataset for o in _build() if o.kind == "sr")
    observers = {str(item.UID) for item in _walk(sr)
                 if item.get("ValueType") == "UIDREF"
                 and item.ConceptNameCodeSequence[0].CodeValue == "121012"}
    assert observers == set(_algorithm_items(sr)) == {DETECTOR.device_uid, DEMO.device_uid}


def _walk(item: Dataset) -> list[Dataset]:
    return [item, *(d for c in item.get("ContentSequence", []) for d in _walk(c))]


def test_every_output_carries_series_and_content_dates() -> None:
    for output in _build():
        ds = output.dataset
        date, time = CONTENT_PAIR[output.kind]
        stamped = {(ds.SeriesDate, ds.SeriesTime), (ds.get(date), ds.get(time))}
        assert stamped == {("20250304", "050607.890123")}, output.kind
        if output.kind == "gsps":
            # The GSPS IOD has no Content Date: dciodvfy answers one with "Attribute is
            # not present in standard DICOM IOD"; Presentation Creation Date says it.
            assert "ContentDate" not in ds and "ContentTime" not in ds


def test_image_library_gives_each_source_its_own_modality(real_nih: Dataset) -> None:
    items = [*_study()]
    nih_result = make_result(real_nih)
    assert str(real_nih.SOPClassUID) == SecondaryCaptureImageStorage
    assert real_nih.Modality == "DX"
    sr = next(o.dataset for o in _build(items) if o.kind == "sr")
    assert library_modalities(sr) == {
        "1.2.826.0.1.3680043.8.498.2.1": "CR",
        "1.2.826.0.1.3680043.8.498.2.3": "DX",  # Secondary Capture, Modality DX: not "OT"
    }
    nih_sr = next(o.dataset for o in _build([(real_nih, nih_result)]) if o.kind == "sr")
    assert library_modalities(nih_sr) == {str(real_nih.SOPInstanceUID): "DX"}


@pytest.mark.parametrize("modality", ["", "XYZ", "OT"])
def test_a_modality_outside_cid_29_keeps_the_sop_class_code(modality: str) -> None:
    ds = dx_as_sc()
    ds.Modality = modality
    assert source_modality(ds) is None
    sr = next(o.dataset for o in _build([(ds, make_result(ds))]) if o.kind == "sr")
    assert library_modalities(sr) == {str(ds.SOPInstanceUID): "OT"}


def test_ihe_outputs_pass_dciodvfy_and_read_back(
    tmp_path: Path, dciodvfy_errors: Callable[[Dataset, str], list[str]], real_nih: Dataset
) -> None:
    sets = {"study": _build(), "nih": _build([(real_nih, make_result(real_nih, model=DEMO))])}
    for label, outputs in sets.items():
        for number, output in enumerate(outputs):
            name = f"{label}-{output.kind}{number}"
            assert dciodvfy_errors(output.dataset, name) == [], name
            read = pydicom.dcmread(tmp_path / f"{name}.dcm")
            assert _algorithm_items(read).keys() == _algorithm_items(output.dataset).keys()
            if output.kind == "sr":
                report = hd.sr.srread(tmp_path / f"{name}.dcm")
                assert set(library_modalities(report).values()) <= {"CR", "DX"}
