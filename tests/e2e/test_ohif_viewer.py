"""What a radiologist sees: the node's SR opened in OHIF Viewer v3 in real Chromium.

A phantom radiograph with a nodule at a known place goes into a real Orthanc (with the
DICOMweb plugin), Orthanc routes it to a real node, the node's outputs come back into the
study, and OHIF (the npm build, served same-origin) opens the study. The analyzer is an
oracle that reports the phantom's ground truth (a positive nodule inside its true box, an
absent pneumothorax), so every check below is about the encoding and the viewer, not a
model's accuracy. Everything is read from the page: OHIF's services and cornerstone
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
return all.map(a => {
  const imageId = a.metadata.referencedImageId;
  const world = (a.data.renderableData && Object.values(a.data.renderableData).flat(2)) || [];
  const points = world.length ? world : (a.data.handles.points || []);
  return {label: a.data.label || '', labels: a.data.labels || [],
          image: points.map(p => Array.from(cs.utilities.worldToImageCoords(imageId, p))),
          canvas: vp ? points.map(p => Array.from(vp.worldToCanvas(p))) : []};
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
            out.append(ImageResult(uid, int(ds.Rows), int(ds.Columns), findings, None,
                                   [ORACLE]))
        return out


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
    """Wait for SR, SC and GSPS in the study; the SR as stored."""
    wait_until(lambda: len(pacs.study_series(study_id)) >= 4, 60, interval=0.5,
               what="the node's SR, SC and GSPS back in Orthanc")
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


def test_ohif_shows_the_nodes_sr_boxes_over_the_finding(tmp_path: Path) -> None:
    dist = ohif_dist()
    path, source, truth = _phantom(tmp_path / "in")
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", node_port, stable_age=1, dicomweb=True)
    node = viewer = driver = None
    try:
        settings = node_settings(tmp_path / "node", destinations=[pacs.destination],
                                 **{"dicom.port": node_port})
        oracle = PhantomOracle({str(source.SOPInstanceUID): truth})
        node = start_node(settings, lambda _s: oracle)
        study_id = pacs.upload(path)["ParentStudy"]
        sr = _results_in_orthanc(pacs, study_id)
        # The SR does report the pneumothorax, as Absent: it must not become a box.
        assert (DEFAULT_CODES["pneumothorax"].value, "272519000") in _coded(sr)

        viewer = OhifServer(dist, pacs.http_port).start()
        driver = ohif_browser(tmp_path / "profile")
        driver.get(viewer.viewer_url(str(source.StudyInstanceUID)))
        sets = wait_js(driver, f"const d = (() => {{{DISPLAY_SETS}}})();"
                       "return d && d.some(x => x.modality === 'SR') "
                       "&& d.some(x => x.modality === 'DX') ? d : null;",
                       60, "OHIF's display sets: the DX image and the AI SR")
        wait_js(driver, IMAGE_SHOWN, 60, "the radiograph rendered in a viewport")
        shoot(driver, "ohif-study")
        spread = driver.execute_script(CANVAS_SPREAD)
        assert spread is not None and spread > 10, f"the radiograph is not drawn ({spread})"
        messages = {d["modality"]: d["messages"] for d in sets}
        print("OHIF display sets and their messages:", messages)
        # Evidence for the README's table: OHIF lists the secondary capture and the SR, and
        # marks the GSPS "unsupported SOP class" (DisplaySetMessage.CODES 14): it ignores it.
        assert messages["DX"] == messages["OT"] == messages["SR"] == [], messages
        assert messages["PR"] == ["14"], messages

        (sr_set,) = [d for d in sets if d["modality"] == "SR"]
        assert sr_set["description"] == "AI findings SR (CXR AI node)"
        browser_text = driver.find_element(By.TAG_NAME, "body").text
        assert "AI findings SR" in browser_text, browser_text  # listed in the study browser

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
