"""The node's analyzer makes per-finding Grad-CAM maps only when the SEG output, their one
reader, is on (issue 11: 16 MB per positive finding at 2000 x 2000 otherwise wasted), and
analyses a large image at the size ``outputs.sc_min_side`` asks for."""

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


@pytest.mark.parametrize("min_side, shape", [(None, (1200, 1040)), (512, (600, 520)),
                                             (256, (300, 260))])
def test_display_size_follows_sc_min_side(tiny_bundle: Path, tmp_path: Path,
                                          min_side: int | None, shape: tuple[int, int]) -> None:
    """The tiny bundle reads 64 px: the display halves while its short side keeps
    ``sc_min_side`` (and twice the model input); null keeps the source's size."""
    settings = load_settings(None, environ={}, overrides={
        "storage.data_dir": str(tmp_path), "models.device": "cpu",
        "outputs.sc_min_side": min_side})
    image = make_image(rows=1200, cols=1040)
    (result,) = build_analyzer(settings, [tiny_bundle]).analyze([image])
    assert result.display is not None and result.display.shape == shape
    assert result.heatmap is not None and result.heatmap.shape == (1200, 1040)


def test_sc_min_side_default_and_bounds(tmp_path: Path) -> None:
    assert load_settings(None, environ={}).outputs.sc_min_side == 1024
    with pytest.raises(ValueError, match="sc_min_side"):
        load_settings(None, environ={}, overrides={"outputs.sc_min_side": 100})
