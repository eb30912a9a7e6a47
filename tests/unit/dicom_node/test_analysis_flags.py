"""The node's analyzer makes per-finding Grad-CAM maps only when the SEG output, their one
reader, is on (issue 11: 16 MB per positive finding at 2000 x 2000 otherwise wasted)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.dicomfiles import make_image

from dicom_node.analysis import build_analyzer
from dicom_node.config import load_settings


@pytest.mark.parametrize("seg", [False, True])
def test_finding_maps_follow_the_seg_output(tiny_bundle: Path, tmp_path: Path, seg: bool) -> None:
    settings = load_settings(None, environ={}, overrides={
        "storage.data_dir": str(tmp_path), "models.device": "cpu", "outputs.seg": seg})
    (result,) = build_analyzer(settings, [tiny_bundle]).analyze([make_image(rows=200, cols=160)])
    assert result.positive_findings and result.heatmap is not None  # "nodule" always positive
    keys = {(f.model.device_uid, f.label) for f in result.positive_findings}
    assert set(result.finding_heatmaps) == (keys if seg else set())
