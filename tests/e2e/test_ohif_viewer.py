"""What a radiologist sees: the node's SR and heatmap SEG opened in OHIF Viewer v3 in real
Chromium.

A phantom radiograph with a nodule at a known place goes into a real Orthanc (with the
DICOMweb plugin), Orthanc routes it to a real node by C-STORE, the node's outputs (SR, SC,
GSPS and the binary Grad-CAM SEG) come back into the study by STOW-RS through Orthanc's
DICOMweb root, and OHIF (the npm build, served same-origin) opens the study. The analyzer
is an oracle that reports the phantom's ground truth (a positive nodule inside its true box,
its Grad-CAM an ellipse inscribed in that box, an absent pneumothorax), so every check below
is about the encoding, the delivery and the viewer, not a model's accuracy. Everything is read from the page: OHIF's services and cornerstone
through ``window``, the browser log, screenshots under test-artifacts/screenshots/.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import free_port, wait_until
from helpers.browser import shoot
from helpers.node import node_settings, start_node
from helpers.ohif import OhifServer, ohif_browser, ohif_dist, page_errors, wait_js
from helpers.orthanc import start_orthanc
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from ai.codes import DEFAULT_CODES
from ai.types import BoundingBox, Finding, ImageResult, ModelIdentity

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ORACLE = ModelIdentity(name="phantom-oracle", version="1.0", device_uid="2.25.4242424242",
                       task="detection", demo=True)
NODULE_P, PNEUMOTHORAX_P = 0.93, 0.04
ROWS = COLUMNS = 512
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
TOLERANCE_PX = 2.0  # image pixels, after OHIF's world -> image transform

DISPLAY_SETS = """
const s = window.services; if (!s) return null;
return s.displaySetService.getActiveDisplaySets().map(d => ({
  uid: d.displaySetInstanceUID, modality: d.Modality, sopClass: d.SOPClassUID || null,
  description: d.SeriesDescription || '',
  messages: ((d.messages && d.messages.messages) || []).map(m => String(m.id || m.message || m)),
  measurements: (d.measurements || []).map(m => ({labels: m.labels || [],
    tracking: m.TrackingIdentifier || ''}))}));
"""
IMAGE_SHOWN = """
const engines = window.cornerstone && window.cornerstone.getRenderingEngines();
if (!engines || !engines.length) return null;
const shown = engines[0].getViewports().map(v => v.getCurrentImageId && v.getCurrentImageId())
  .filter(Boolean);
return shown.length ? shown : null;
"""
# Grey levels of the viewport's canvas: a white or black canvas (a failed render) is flat.
CANVAS_SPREAD = """
const c = document.querySelector('canvas.cornerstone-canvas');
if (!c || !c.width) return null;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0, s = 0, s2 = 0;
for (let i = 0; i < d.length; i += 4 * 97) { n++; s += d[i]; s2 += d[i] * d[i]; }
return Math.sqrt(s2 / n - (s / n) * (s / n));
"""
# Text the viewport draws (cornerstone's SVG layer) and the study browser lists.
SVG_TEXT = """
return Array.from(document.querySelectorAll('svg text')).map(e => e.textContent)
  .filter(s => s.trim());
"""
# Every SR annotation cornerstone holds, with its corners in image pixels (OHIF's own
# world -> image transform) and on the canvas (the viewport's world -> canvas transform).
SR_BOXES = """
const cs = window.cornerstone, tools = window.cornerstoneTools;
const all = tools.annotation.state.getAllAnnotations()
  .filter(a => a.metadata && a.metadata.toolName === 'DICOMSRDisplay');
if (!all.length) return null;
const vp = cs.getRenderingEngines()[0].getViewports()
  .find(v => v.getCurrentImageId && v.getCurrentImageId());
if (!vp) return null;  // the SR's viewport is still loading its image: not drawn yet
return all.map(a => {
  const imageId = a.metadata.referencedImageId;
  const world = (a.data.renderableData && Object.values(a.data.renderableData).flat(2)) || [];
  const points = world.length ? world : (a.data.handles.points || []);
  return {label: a.data.label || '', labels: a.data.labels || [],
          image: points.map(p => Array.from(cs.utilities.worldToImageCoords(imageId, p))),
          canvas: points.map(p => Array.from(vp.worldToCanvas(p)))};
});
"""
# Every segmentation OHIF's segmentationService holds: its segments' labels, and the
# labelmap cornerstone renders (image size, the bounding box of its non-zero pixels, the
# values in it), read from cornerstone's cache through the representation's image ids.
SEG_STATE = """
const s = window.services, cs = window.cornerstone;
if (!s || !s.segmentationService) return null;
const segs = s.segmentationService.getSegmentations() || [];
if (!segs.length) return null;
return segs.map(x => {
  const lm = (x.representationData && (x.representationData.Labelmap
    || x.representationData.LABELMAP)) || {};
  const ids = lm.imageIds || [];
  let labelmap = null;
  const img = ids.length ? cs.cache.getImage(ids[0]) : null;
  if (img) {
    const px = img.getPixelData(), w = img.columns, h = img.rows, values = new Set();
    let x0 = w, y0 = h, x1 = -1, y1 = -1;
    for (let i = 0; i < px.length; i++) {
      if (!px[i]) continue;
      values.add(px[i]);
      const x = i % w, y = Math.floor(i / w);
      x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x); y1 = Math.max(y1, y);
    }
    labelmap = {rows: h, columns: w, box: [x0, y0, x1, y1], values: Array.from(values)};
  }
  return {id: x.segmentationId, label: x.label || '', imageIds: ids.length, labelmap,
          segments: Object.values(x.segments || {}).filter(Boolean)
            .map(g => ({index: g.segmentIndex, label: g.label || ''}))};
});
"""
# RGB of the rendered canvas at image pixels (arguments[0]: [[column, row], ...]), through
# the viewport's image -> world -> canvas transform (canvas pixels may be device pixels).
CANVAS_AT = """
const cs = window.cornerstone;
const vp = cs.getRenderingEngines()[0].getViewports()
  .find(v => v.getCurrentImageId && v.getCurrentImageId());
if (!vp) return null;
const imageId = vp.getCurrentImageId(), c = vp.canvas;
const scale = c.width / c.clientWidth, ctx = c.getContext('2d');
return arguments[0].map(p => {
  const xy = vp.worldToCanvas(cs.utilities.imageToWorldCoords(imageId, p));
  const d = ctx.getImageData(Math.round(xy[0] * scale), Math.round(xy[1] * scale), 1, 1).data;
  return [d[0], d[1], d[2]];
});
"""


class PhantomOracle:
    """An analyzer that reports the phantom's truth: the nodule inside its true box
    (positive), a pneumothorax absent (below threshold, no box)."""

    def __init__(self, truth: dict[str, BoundingBox]) -> None:
        self.truth = truth

    @property
    def models(self) -> list[ModelIdentity]:
        return [ORACLE]

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        out = []
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            findings = [
                Finding("nodule", DEFAULT_CODES["nodule"], NODULE_P, 0.5, True, ORACLE,
                        self.truth[uid]),
                Finding("pneumothorax", DEFAULT_CODES["pneumothorax"], PNEUMOTHORAX_P, 0.5,
                        False, ORACLE, None),
            ]
            heat = _inscribed_heatmap(self.truth[uid], int(ds.Rows), int(ds.Columns))
            out.append(ImageResult(uid, int(ds.Rows), int(ds.Columns), findings, heat,
                                   [ORACLE], finding_heatmaps={
                                       (ORACLE.device_uid, "nodule"): heat}))
        return out


def _inscribed_heatmap(box: BoundingBox, rows: int, columns: int) -> np.ndarray:
    """A Grad-CAM stand-in: 1 at the box's centre, 0.5 on the ellipse inscribed in the box,
    so the binary SEG (map >= 0.5) is that ellipse."""
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    rx, ry = (box.x1 - box.x0) / 2, (box.y1 - box.y0) / 2
    r2 = ((xx + 0.5 - (box.x0 + rx)) / rx) ** 2 + ((yy + 0.5 - (box.y0 + ry)) / ry) ** 2
    return np.exp(-np.log(2.0) * r2).astype(np.float32)


def _phantom(folder: Path) -> tuple[Path, pydicom.Dataset, BoundingBox]:
    """A DX phantom with a nodule, saved for Orthanc; its ground-truth box in pixels."""
    from training.synth import make_image

    img = make_image("dx_mono2_explicit", seed=31, rows=ROWS, columns=COLUMNS,
                     findings={"nodule": True})
    assert img.phantom is not None
    (nodule,) = [b for b in img.phantom.boxes if b.label == "nodule"]
    c0, r0, c1, r1 = nodule.to_pixels(ROWS, COLUMNS)
    ds = img.dataset
    # OHIF 3.13.2 (and 3.14.0-beta.6) throw "Invalid VOI LUT function" and show nothing
    # for this image when it carries VOI LUT Function LINEAR (README, "Look at the results
    # in OHIF"): only the copy Orthanc gets loses the attribute (LINEAR is the default).
    if "VOILUTFunction" in ds:
        del ds.VOILUTFunction
    path = folder / "phantom.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path, ds, BoundingBox(float(c0), float(r0), float(c1), float(r1))


def _bounds(points: list[list[float]]) -> tuple[float, float, float, float]:
    xy = np.array(points, dtype=float)[:, :2]
    return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), \
        float(xy[:, 1].max())


def _results_in_orthanc(pacs: Any, study_id: str) -> pydicom.Dataset:
    """Wait for SR, SC, GSPS and SEG in the study; the SR as stored."""
    wait_until(lambda: len(pacs.study_series(study_id)) >= 5, 60, interval=0.5,
               what="the node's SR, SC, GSPS and SEG back in Orthanc")
    sr_series = next(s for s in pacs.study_series(study_id)
                     if s["MainDicomTags"]["Modality"] == "SR")
    sr = pydicom.dcmread(io.BytesIO(pacs.rest(f"/instances/{sr_series['Instances'][0]}/file",
                                              raw=True)))
    assert str(sr.SOPClassUID) == SR_CLASS
    return sr


def _coded(sr: pydicom.Dataset) -> set[tuple[str, str]]:
    """(concept name code, concept code) of every CODE item of the SR."""
    out, todo = set(), list(sr.ContentSequence)
    while todo:
        item = todo.pop()
        todo.extend(item.get("ContentSequence", []))
        if item.ValueType == "CODE":
            out.add((item.ConceptNameCodeSequence[0].CodeValue,
                     item.ConceptCodeSequence[0].CodeValue))
    return out


def _origins(pacs: Any, study_id: str) -> dict[str, str]:
    """Modality -> Orthanc's Origin metadata of the series' first instance."""
    return {series["MainDicomTags"]["Modality"]: pacs.rest(
        f"/instances/{series['Instances'][0]}/metadata/Origin", raw=True).decode()
        for series in pacs.study_series(study_id)}


def _open_seg_and_check(driver: Any, truth: BoundingBox) -> None:
    """As a radiologist does: double-click the SEG in the study browser and answer Yes to
    OHIF's "Do you want to open this Segmentation?"; then the segment names the finding and
    the model, its labelmap is the ellipse inside the nodule's box, and the canvas is tinted
    over the nodule and grey beside it."""
    entry = driver.find_element(By.XPATH, "//*[starts-with(normalize-space(text()), "
                                "'AI heatmap SEG')]")
    ActionChains(driver).double_click(entry).perform()
    yes = wait_js(driver, "return Array.from(document.querySelectorAll('button'))"
                  ".find(b => b.textContent.trim() === 'Yes' && document.body.textContent"
                  ".includes('open this Segmentation')) || null;",
                  30, "OHIF's prompt \"Do you want to open this Segmentation?\"")
    yes.click()
    segs = wait_js(driver, f"const g = (() => {{{SEG_STATE}}})();"
                   "return g && g.every(x => x.labelmap) ? g : null;",
                   60, "the SEG loaded as a segmentation with its labelmap")
    print("OHIF segmentations:", segs)
    (seg,) = segs
    label = f"nodule ({ORACLE.name} {ORACLE.version}, DEMO)"
    assert [g["label"] for g in seg["segments"]] == [label], seg
    lm = seg["labelmap"]
    assert (lm["rows"], lm["columns"]) == (ROWS, COLUMNS), lm
    assert lm["values"] == [1], lm  # one segment
    for got, want in zip(lm["box"], (truth.x0, truth.y0, truth.x1 - 1, truth.y1 - 1),
                         strict=True):
        assert abs(got - want) <= TOLERANCE_PX, (lm, truth)
    centre = [(truth.x0 + truth.x1) / 2, (truth.y0 + truth.y1) / 2]
    beside = [COLUMNS - centre[0], centre[1]]  # the other lung, mirrored

    def tinted() -> Any:
        rgb = driver.execute_script(CANVAS_AT, [centre, beside])
        return rgb if rgb and max(rgb[0]) - min(rgb[0]) > 40 else None

    inside, outside = wait_until(tinted, 30, interval=0.25,
                                 what="the segment's colour drawn over the nodule")
    shoot(driver, "ohif-seg")
    print("canvas RGB at the nodule / beside it:", inside, outside)
    assert max(outside) - min(outside) <= 10, (inside, outside)  # grey: no overlay there


def test_ohif_shows_the_nodes_sr_boxes_and_seg_over_the_finding(tmp_path: Path) -> None:
    dist = ohif_dist()
    path, source, truth = _phantom(tmp_path / "in")
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", node_port, stable_age=1, dicomweb=True)
    node = viewer = driver = None
    try:
        # Results go back by STOW-RS to Orthanc's DICOMweb root (the study came by C-STORE).
        # (A stow-rs destination's default outputs are sr, sc and gsps: the SEG is named.)
        stow = {"type": "stow-rs", "url": f"{pacs.url}/dicom-web/", "timeout_s": 10,
                "outputs": ["sr", "sc", "gsps", "seg"]}
        settings = node_settings(tmp_path / "node", destinations=[stow],
                                 **{"dicom.port": node_port, "outputs.seg": True})
        oracle = PhantomOracle({str(source.SOPInstanceUID): truth})
        node = start_node(settings, lambda _s: oracle)
        study_id = pacs.upload(path)["ParentStudy"]
        sr = _results_in_orthanc(pacs, study_id)
        origins = _origins(pacs, study_id)
        print("Orthanc's Origin of each series:", origins)
        # Orthanc records how each instance came: the results by its DICOMweb plugin.
        assert origins == {"DX": "RestApi", "OT": "Plugins", "PR": "Plugins",
                           "SEG": "Plugins", "SR": "Plugins"}, origins
        # The SR does report the pneumothorax, as Absent: it must not become a box.
        assert (DEFAULT_CODES["pneumothorax"].value, "272519000") in _coded(sr)

        viewer = OhifServer(dist, pacs.http_port).start()
        driver = ohif_browser(tmp_path / "profile")
        driver.get(viewer.viewer_url(str(source.StudyInstanceUID)))
        sets = wait_js(driver, f"const d = (() => {{{DISPLAY_SETS}}})();"
                       "return d && ['SR', 'SEG', 'DX'].every(m => "
                       "d.some(x => x.modality === m)) ? d : null;",
                       60, "OHIF's display sets: the DX image, the AI SR and SEG")
        wait_js(driver, IMAGE_SHOWN, 60, "the radiograph rendered in a viewport")
        shoot(driver, "ohif-study")
        spread = driver.execute_script(CANVAS_SPREAD)
        assert spread is not None and spread > 10, f"the radiograph is not drawn ({spread})"
        messages = {d["modality"]: d["messages"] for d in sets}
        print("OHIF display sets and their messages:", messages)
        # Evidence for the README's table: OHIF lists the secondary capture and the SR, and
        # marks the GSPS "unsupported SOP class" (DisplaySetMessage.CODES 14): it ignores it.
        assert messages["DX"] == messages["OT"] == messages["SR"] == messages["SEG"] == [], \
            messages
        assert messages["PR"] == ["14"], messages

        (sr_set,) = [d for d in sets if d["modality"] == "SR"]
        assert sr_set["description"] == "AI findings SR (CXR AI node)"
        browser_text = driver.find_element(By.TAG_NAME, "body").text
        assert "AI findings SR" in browser_text, browser_text  # listed in the study browser
        assert "AI heatmap SEG" in browser_text, browser_text

        # As a radiologist does: double-click the SR in the study browser (OHIF parses an
        # SR when it is shown).
        entry = driver.find_element(By.XPATH, "//*[starts-with(normalize-space(text()), "
                                    "'AI findings SR')]")
        ActionChains(driver).double_click(entry).perform()
        boxes = wait_js(driver, SR_BOXES, 60, "the SR's boxes drawn over the image")
        shoot(driver, "ohif-sr-boxes")
        (sr_set,) = [d for d in driver.execute_script(DISPLAY_SETS) if d["modality"] == "SR"]
        # One measurement per positive finding (the absent pneumothorax has none).
        assert len(sr_set["measurements"]) == 1, sr_set
        labels = sr_set["measurements"][0]["labels"]
        assert {"label": "Nodule", "value": f"{NODULE_P * 100:.2f} %"} in labels, labels
        assert len(boxes) == 1, boxes
        drawn = wait_js(driver, SVG_TEXT, 30, "the box's label drawn in the viewport")
        label = f"Nodule: {NODULE_P * 100:.2f} %"
        assert any(label in s for s in drawn), drawn  # what the radiologist reads
        assert not any("Pneumothorax" in s for s in drawn), drawn
        (box,) = boxes
        assert any(lb.get("label") == "Nodule" for lb in box["labels"]), box
        assert "Pneumothorax" not in repr(boxes)  # no box for the absent finding
        x0, y0, x1, y1 = _bounds(box["image"])
        for got, want in zip((x0, y0, x1, y1), (truth.x0, truth.y0, truth.x1, truth.y1),
                             strict=True):
            assert abs(got - want) <= TOLERANCE_PX, (box["image"], truth)
        cx0, cy0, cx1, cy1 = _bounds(box["canvas"])
        assert cx1 - cx0 > 5 and cy1 - cy0 > 5, box["canvas"]  # visible on the canvas

        _open_seg_and_check(driver, truth)

        errors = page_errors(driver)
        assert not errors, "uncaught errors in OHIF:\n" + "\n".join(errors)
    finally:
        if driver is not None:
            driver.quit()
        if viewer is not None:
            viewer.stop()
        if node is not None:
            node.stop()
        pacs.stop()
