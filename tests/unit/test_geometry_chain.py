"""The whole geometric chain, for every aspect ratio and both polarities: an object in the
source image -> its position in model space (real preprocessing) -> mapped back with the
letterbox -> the SR region, the GSPS graphic and the SC pixels land on the source object."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from helpers.dicomfiles import make_image

from ai.pixels import PreprocessParams, preprocess
from ai.types import CodedConcept, Finding, ImageResult, ModelIdentity
from dicom_node.outputs import OutputSettings, build_outputs

MODEL = ModelIdentity("geometry-model", "1", "2.25.99", "classification", demo=True)
SIZES = [(600, 400), (400, 600), (500, 500), (333, 517), (1955, 1841), (257, 1024)]


def _source(rows: int, cols: int, photometric: str, box: tuple[int, int, int, int]
            ) -> pydicom.Dataset:
    ds = make_image(rows=rows, cols=cols, photometric=photometric)
    x0, y0, x1, y1 = box
    bright, dark = (4000, 800) if photometric == "MONOCHROME2" else (100, 3300)
    arr = np.full((rows, cols), dark, np.uint16)
    arr[y0:y1, x0:x1] = bright  # bright on screen in both polarities
    ds.PixelData = arr.tobytes()
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    return ds


def _scoords(items) -> list[list[float]]:  # type: ignore[no-untyped-def]
    out = []
    for item in items:
        if item.get("ValueType") == "SCOORD":
            out.append([float(v) for v in item.GraphicData])
        out.extend(_scoords(item.get("ContentSequence", [])))
    return out


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize(("rows", "cols"), SIZES)
def test_model_space_finding_lands_on_source_object(rows: int, cols: int,
                                                    photometric: str) -> None:
    src_box = (int(cols * 0.55), int(rows * 0.2), int(cols * 0.8), int(rows * 0.45))
    ds = _source(rows, cols, photometric, src_box)
    image, lb = preprocess(ds, PreprocessParams(size=224))
    model = image[0]
    ys, xs = np.nonzero(model > 0.7)
    assert xs.size, "the object must be visible (bright) in model space"
    model_box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # what a model would report
    box = lb.box_to_source(model_box)
    assert box is not None
    tol = 1.0 / lb.scale + 1.0  # one model pixel, in source pixels, plus resampling
    for got, want in zip((box.x0, box.y0, box.x1, box.y1), src_box, strict=True):
        assert abs(got - want) <= tol, (box, src_box, lb)

    heat_model = np.zeros((224, 224), np.float32)
    heat_model[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1.0
    heat = lb.heatmap_to_source(heat_model)
    assert heat.shape == (rows, cols)
    cx, cy = (src_box[0] + src_box[2]) // 2, (src_box[1] + src_box[3]) // 2
    assert heat[cy, cx] > 0.9 and heat[5, 5] < 0.05
    finding = Finding("nodule", CodedConcept("27925004", "SCT", "Nodule"), 0.93, 0.5, True,
                      MODEL, box)
    result = ImageResult(str(ds.SOPInstanceUID), rows, cols, [finding], heat, [MODEL])
    outs = {o.kind: o.dataset for o in build_outputs([(ds, result)], OutputSettings(), "seed")}

    want_poly = np.array(box.polyline(), np.float32).ravel()
    [sr_poly] = _scoords(outs["sr"].ContentSequence)
    np.testing.assert_allclose(sr_poly, want_poly, atol=1e-3)
    gsps_polys = [np.array(g.GraphicData, np.float32)
                  for ann in outs["gsps"].GraphicAnnotationSequence
                  for g in ann.get("GraphicObjectSequence", [])
                  if g.GraphicAnnotationUnits == "PIXEL"]
    assert any(np.allclose(p, want_poly, atol=1e-3) for p in gsps_polys)
    assert outs["gsps"].PresentationLUTShape == (
        "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY")

    sc = outs["sc"].pixel_array.astype(int)
    assert sc.shape == (rows, cols, 3)
    def coloured(y: int, x: int) -> bool:
        r, g, b = sc[y, x]
        return max(r, g, b) - min(r, g, b) > 30

    assert coloured(cy, cx)  # heatmap over the object
    assert coloured(int(round(box.y0)), cx) or coloured(int(round(box.y0)) + 1, cx)  # box edge
    far_y, far_x = rows - 3, 2 if src_box[0] > cols // 2 else cols - 3
    assert not coloured(far_y, far_x)  # untouched grey far from the object
