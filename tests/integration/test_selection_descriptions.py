"""What real PACS send, through the real path: DCMTK storescu -> the node's listener ->
ingest (which stores the selection attributes on the row) -> study assembler (which
decides from the row alone) -> the analyser. Phantoms whose headers carry no or a vague
Body Part Examined and name the anatomy and the view only in their descriptions, in
several languages and character sets, and other systems' result objects sent along."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import storescu, wait_until
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node, studies
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicom_node.store import db
from training.synth import StudyContext, make_dataset

pytestmark = pytest.mark.integration

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _phantom(study: StudyContext, seed: int, **header: object) -> Dataset:
    """A 256 x 256 chest phantom of ``study`` with ``header`` set (None: attribute removed)."""
    ds = make_dataset("dx_mono2_explicit", seed=seed, rows=256, columns=256, findings={},
                      study=study)
    for keyword, value in header.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _view_code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def _result_object(study: StudyContext, sop_class: str, modality: str) -> Dataset:
    """Another vendor's non-image result in the study (header only: enough to store)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_instance_uid, generate_uid()
    ds.PatientName, ds.PatientID = study.patient.name, study.patient.patient_id
    ds.Modality, ds.Manufacturer = modality, "Other Vendor AI"
    return ds


def _colour_page(study: StudyContext) -> Dataset:
    """A vendor's RGB result page, as a secondary capture."""
    ds = _result_object(study, SECONDARY_CAPTURE, "OT")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows = ds.Columns = 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((256, 256, 3), np.uint8).tobytes()
    return ds


def test_descriptions_decide_what_is_analysed(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    chest = StudyContext.from_seed(1201)
    chest.description = "RX TÓRAX PA Y LAT"  # ISO_IR 100, as the phantoms are written
    other = StudyContext.from_seed(1202)
    other.description = "Röntgen"
    cases: dict[str, tuple[Dataset, str | None]] = {
        "no body part, chest named by the study only": (
            _phantom(chest, 1, BodyPartExamined=None, SeriesDescription="PA"), None),
        "vague body part, Thorax in the protocol": (
            _phantom(chest, 2, BodyPartExamined="OTHER", ProtocolName="Thorax p.a."), None),
        "lateral from the view code": (
            _phantom(chest, 3, BodyPartExamined=None, ViewPosition="",
                     ViewCodeSequence=[_view_code("399198007", "right lateral")]),
            'view position lateral (ViewCodeSequence 399198007 "right lateral")'),
        "lateral from the series description": (
            _phantom(chest, 4, BodyPartExamined=None, ViewPosition=None,
                     ViewCodeSequence=None, SeriesDescription="Thorax seitlich"),
            'view position lateral (SeriesDescription "Thorax seitlich")'),
        "another vendor's GSPS": (
            _result_object(chest, GSPS, "PR"), "SOP class Grayscale Softcopy Presentation "
            "State Storage is a result object (presentation state), not an image"),
        "another vendor's SR": (
            _result_object(chest, COMPREHENSIVE_SR, "SR"), "SOP class Comprehensive SR "
            "Storage is a result object (structured report), not an image"),
        "another vendor's colour page": (
            _colour_page(chest), "secondary capture with ImageType DERIVED\\SECONDARY is a "
            "result page, not an acquired radiograph"),
        "a knee, in German": (
            _phantom(other, 5, BodyPartExamined=None, SeriesDescription="KNIE LINKS"),
            'SeriesDescription "KNIE LINKS" names non-chest anatomy (knee)'),
        "a panoramic, in French, with a wrong body part": (
            _phantom(other, 6, BodyPartExamined="OTHER",
                     RequestedProcedureDescription="Panoramique dentaire"),
            'RequestedProcedureDescription "Panoramique dentaire" names non-chest anatomy '
            "(dental)"),
        "an explicit non-chest body part": (
            _phantom(other, 7, BodyPartExamined="LSPINE", StudyDescription="THORAX"),
            "body part LSPINE is not a chest"),
    }
    paths = []
    for i, (ds, _) in enumerate(cases.values()):
        paths.append(tmp_path / "in" / f"{i}.dcm")
        paths[-1].parent.mkdir(exist_ok=True)
        ds.save_as(paths[-1], enforce_file_format=True)

    fake = FakeAnalyzer()
    settings = node_settings(tmp_path / "node", quiet=0.3)
    node = start_node(settings, lambda s: fake)
    try:
        res = storescu(settings.dicom.port, paths)
        assert res.returncode == 0, res.stderr
        done = wait_until(lambda: (s := studies(settings)) and len(s) == 2 and all(
            st.state in ("done", "ignored") for st in s.values()) and s, 60,
            what="both studies decided")
    finally:
        node.stop()

    rows = {r.sop_instance_uid: r for r in query(settings, select(db.instances))}
    for what, (ds, reason) in cases.items():
        row = rows[str(ds.SOPInstanceUID)]
        assert row.selection is not None, what  # decided from the row, no file opened
        assert (row.analysis_state, row.reason) == (
            ("analysed", None) if reason is None else ("ignored", reason)), what
    analysed = [ds for ds, reason in cases.values() if reason is None]
    assert sorted(uid for call in fake.calls for uid in call) == sorted(
        str(ds.SOPInstanceUID) for ds in analysed)
    assert done[chest.study_instance_uid].state == "done"
    assert done[other.study_instance_uid].state == "ignored"
    assert 'SeriesDescription "KNIE LINKS" names non-chest anatomy (knee)' in (
        done[other.study_instance_uid].reason)
    # the descriptions are stored, shown to signed-in users, never logged
    for text in ("KNIE", "Panoramique", "seitlich", "TÓRAX"):
        assert text not in caplog.text
    assert pydicom.dcmread(paths[0]).SpecificCharacterSet == "ISO_IR 100"
