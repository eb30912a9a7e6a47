"""The SC overlay: geometry of what is burnt in, the grey rendering, and its attributes."""

from __future__ import annotations

import numpy as np
import pytest
from outputs_helpers import DEMO, make_result, make_source
from pydicom.dataset import Dataset

from ai.types import BoundingBox
from dicom_node.outputs import OutputSettings, build_outputs, render_grey
from dicom_node.outputs.render import BANNER_BACKGROUND, BOX_COLOURS

# 300 rows x 200 columns; box pixels are columns 20..119 and rows 100..199.
BOX = BoundingBox(20, 100, 120, 200)
HEAT = (230, 280, 130, 190)  # rows 230..279, columns 130..189
YELLOW = BOX_COLOURS[0]


def _sc(ds: Dataset, result) -> Dataset:
    outputs = build_outputs([(ds, result)], OutputSettings(sr=False, gsps=False), "seed")
    assert [o.kind for o in outputs] == ["sc"]
    return outputs[0].dataset


@pytest.fixture
def overlay() -> tuple[Dataset, np.ndarray, np.ndarray]:
    ds = make_source(photometric="MONOCHROME2", rows=300, cols=200)
    sc = _sc(ds, make_result(ds, box=BOX, heat_box=HEAT))
    return sc, sc.pixel_array, render_grey(ds)


def test_sc_is_rgb_at_source_size_in_new_series(overlay) -> None:
    sc, pixels, _ = overlay
    assert (sc.Rows, sc.Columns) == (300, 200)
    assert pixels.shape == (300, 200, 3) and pixels.dtype == np.uint8
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.SeriesNumber == 9902
    assert sc.SeriesDescription == "AI overlay (CXR AI node)"


def test_box_outline_lies_exactly_on_the_box_edges(overlay) -> None:
    _, pixels, grey = overlay
    for col in (20, 70, 119):
        assert tuple(pixels[100, col]) == YELLOW  # top edge
        assert tuple(pixels[199, col]) == YELLOW  # bottom edge
    for row in (100, 150, 199):
        assert tuple(pixels[row, 20]) == YELLOW  # left edge
        assert tuple(pixels[row, 119]) == YELLOW  # right edge
    for row, col in ((150, 18), (150, 121), (202, 70), (160, 60)):  # just outside / inside
        assert tuple(pixels[row, col]) == (grey[row, col],) * 3


def test_heatmap_is_coloured_where_it_is_and_nowhere_else(overlay) -> None:
    _, pixels, grey = overlay
    inside = pixels[235:275, 135:185].astype(int)
    assert (np.abs(inside[..., 0] - inside[..., 2]) > 20).all()  # coloured
    for row, col in ((255, 120), (225, 160), (290, 160), (255, 195)):
        assert tuple(pixels[row, col]) == (grey[row, col],) * 3


def test_pixels_well_away_from_annotations_are_the_grey_rendering(overlay) -> None:
    _, pixels, grey = overlay
    region = pixels[215:300, 0:110]
    assert (region == grey[215:300, 0:110, None]).all()


def test_banner_is_burnt_in_and_demo_models_add_a_line() -> None:
    ds = make_source()
    plain = _sc(ds, make_result(ds)).pixel_array
    demo = _sc(ds, make_result(ds, model=DEMO)).pixel_array

    def banner_rows(pixels: np.ndarray) -> int:
        return int((pixels[:, 0] == BANNER_BACKGROUND).all(axis=1).sum())

    assert banner_rows(plain) > 5
    assert banner_rows(demo) > banner_rows(plain)


def test_attributes_say_what_the_sc_is(overlay) -> None:
    sc, _, _ = overlay
    assert sc.BurnedInAnnotation == "YES"
    assert sc.ConversionType == "WSD"
    assert sc.BodyPartExamined == "CHEST"
    assert "NOT FOR PRIMARY DIAGNOSIS" in sc.ImageComments
    assert "NOT FOR PRIMARY DIAGNOSIS" in sc.DerivationDescription
    (source,) = sc.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == "1.2.826.0.1.3680043.8.498.2.1"
    assert source.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    assert list(sc.PatientOrientation) == ["L", "F"]


def test_nih_sc_gets_chest_and_no_invented_orientation(real_nih: Dataset) -> None:
    sc = _sc(real_nih, make_result(real_nih))
    assert sc.BodyPartExamined == "CHEST"
    assert not sc.PatientOrientation
    assert sc.StudyDescription == real_nih.StudyDescription


@pytest.mark.parametrize("voi", ["window", "lut", None])
def test_render_grey_follows_voi_and_polarity(voi: str | None) -> None:
    mono2 = render_grey(make_source(voi=voi))
    mono1 = render_grey(make_source(voi=voi, photometric="MONOCHROME1"))
    assert mono2.shape == (300, 200) and mono2.dtype == np.uint8
    # ramp 0..4000 spans the output (the LUT covers 0..4095, so it ends at 4000/4095)
    assert mono2[0, 0] <= 2 and mono2[0, -1] >= 245
    assert (np.diff(mono2[0].astype(int)) >= 0).all()
    assert (mono1.astype(int) + mono2.astype(int) == 255).all()


def test_sc_of_monochrome1_source_is_inverted_relative_to_stored_values(real_cr: Dataset) -> None:
    rows, cols = int(real_cr.Rows), int(real_cr.Columns)
    sc = _sc(real_cr, make_result(real_cr, positive=False))
    grey = sc.pixel_array[rows // 4 :, :, 1].astype(np.float64)  # below the banner
    raw = real_cr.pixel_array[rows // 4 :, :].astype(np.float64)
    assert (sc.Rows, sc.Columns) == (rows, cols)
    assert np.corrcoef(grey.ravel(), raw.ravel())[0, 1] < -0.9
