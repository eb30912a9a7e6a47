"""The GSPS: vector boxes in source pixels, and a display pipeline that matches the source."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from outputs_helpers import make_result, make_source
from pydicom.dataset import Dataset

from ai.types import BoundingBox
from dicom_node.outputs import OutputObject, OutputSettings, build_outputs

BOX = BoundingBox(20, 100, 120, 200)
SOP_1 = "1.2.826.0.1.3680043.8.498.2.1"
SOP_2 = "1.2.826.0.1.3680043.8.498.2.2"


def _build(items: list[tuple[Dataset, object]]) -> list[OutputObject]:
    return build_outputs(items, OutputSettings(sc=False), "seed")


def _gsps(items: list[tuple[Dataset, object]]) -> list[Dataset]:
    return [o.dataset for o in _build(items) if o.kind == "gsps"]


def _texts(annotation: Dataset) -> list[str]:
    return [str(t.UnformattedTextValue) for t in annotation.get("TextObjectSequence", [])]


@pytest.mark.parametrize(
    ("photometric", "shape"), [("MONOCHROME1", "INVERSE"), ("MONOCHROME2", "IDENTITY")]
)
def test_presentation_lut_shape_follows_polarity(photometric: str, shape: str) -> None:
    ds = make_source(photometric=photometric)
    (gsps,) = _gsps([(ds, make_result(ds))])
    assert gsps.PresentationLUTShape == shape


def test_real_monochrome1_cr_gets_inverse_and_its_window(real_cr: Dataset) -> None:
    (gsps,) = _gsps([(real_cr, make_result(real_cr))])
    assert gsps.PresentationLUTShape == "INVERSE"
    (voi,) = gsps.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (15000.0, 30000.0)


def test_box_is_a_closed_pixel_polyline_with_the_sr_tracking_uid() -> None:
    ds = make_source()
    outputs = _build([(ds, make_result(ds, box=BOX))])
    gsps = outputs[-1].dataset
    assert gsps.ContentLabel == "AI_RESULTS"
    assert re.fullmatch(r"[A-Z0-9 _]{1,16}", gsps.ContentLabel)
    (layer,) = gsps.GraphicLayerSequence
    assert layer.GraphicLayer == "AI_FINDINGS"
    (annotation,) = gsps.GraphicAnnotationSequence
    assert annotation.GraphicLayer == "AI_FINDINGS"
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == SOP_1
    (graphic,) = annotation.GraphicObjectSequence
    assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
    assert graphic.NumberOfGraphicPoints == 5
    corners = [20, 100, 120, 100, 120, 200, 20, 200, 20, 100]
    assert [float(v) for v in graphic.GraphicData] == corners
    texts = _texts(annotation)
    assert "Nodule 91%" in texts
    assert "AI: Effusion 66%" in texts  # positive finding without a box
    assert any("NOT FOR PRIMARY DIAGNOSIS" in t for t in texts)
    sr = outputs[0].dataset
    sr_uids = {str(i.UID) for i in _items(sr) if _name(i) == "112040"}
    assert graphic.TrackingUID in sr_uids


def _items(item: Dataset):
    for child in item.get("ContentSequence", []):
        yield child
        yield from _items(child)


def _name(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def test_no_positive_finding_still_says_so() -> None:
    ds = make_source()
    (gsps,) = _gsps([(ds, make_result(ds, box=BOX, positive=False))])
    (annotation,) = gsps.GraphicAnnotationSequence
    assert "GraphicObjectSequence" not in annotation
    assert "AI: no finding above threshold" in _texts(annotation)


def test_window_and_voi_lut_are_copied_per_image() -> None:
    first = make_source(sop_uid=SOP_1)
    second = make_source(sop_uid=SOP_2, voi="lut")
    (gsps,) = _gsps([(first, make_result(first)), (second, make_result(second))])
    refs = [
        [r.ReferencedSOPInstanceUID for r in a.ReferencedImageSequence]
        for a in gsps.GraphicAnnotationSequence
    ]
    assert refs == [[SOP_1], [SOP_2]]
    window, lut = gsps.SoftcopyVOILUTSequence
    assert (float(window.WindowCenter), float(window.WindowWidth)) == (2000.0, 4000.0)
    assert window.ReferencedImageSequence[0].ReferencedSOPInstanceUID == SOP_1
    assert list(lut.VOILUTSequence[0].LUTDescriptor) == [4096, 0, 16]
    assert lut.ReferencedImageSequence[0].ReferencedSOPInstanceUID == SOP_2


def test_source_without_voi_gives_gsps_without_voi() -> None:
    ds = make_source(voi=None)
    (gsps,) = _gsps([(ds, make_result(ds))])
    assert "SoftcopyVOILUTSequence" not in gsps


def test_rescale_is_carried_over() -> None:
    ds = make_source()
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    (gsps,) = _gsps([(ds, make_result(ds))])
    assert (float(gsps.RescaleSlope), float(gsps.RescaleIntercept)) == (2.0, -100.0)


def test_mixed_polarity_gives_one_gsps_per_polarity_in_one_series(
    dciodvfy_errors: Callable[[Dataset, str], list[str]],
) -> None:
    first = make_source(sop_uid=SOP_1, photometric="MONOCHROME1")
    second = make_source(sop_uid=SOP_2, rows=200, cols=300)
    pair = _gsps([(first, make_result(first, box=BOX)), (second, make_result(second))])
    assert [g.PresentationLUTShape for g in pair] == ["INVERSE", "IDENTITY"]
    assert len({g.SeriesInstanceUID for g in pair}) == 1
    assert len({g.SOPInstanceUID for g in pair}) == 2
    for index, gsps in enumerate(pair):
        assert dciodvfy_errors(gsps, f"gsps{index}") == []
