"""Each received image is decoded once per job: the overlay reuses the display rendering the
models saw (ImageResult.display) instead of decoding the pixel data a second time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers.dicomfiles import make_image

import ai.pixels
from ai.inference import Analyzer
from dicom_node.outputs import OutputSettings, build_outputs, render_grey


def test_analysis_and_outputs_decode_each_image_once(tiny_bundle: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    datasets = [make_image(rows=320, cols=280, seed=i, photometric=p, study_uid="1.2.3.4")
                for i, p in enumerate(["MONOCHROME2", "MONOCHROME1"])]
    expected = [render_grey(ds) for ds in datasets]
    calls: list[str] = []
    real = ai.pixels.decode_frame

    def counting(ds, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(str(ds.SOPInstanceUID))
        return real(ds, *args, **kwargs)

    monkeypatch.setattr(ai.pixels, "decode_frame", counting)
    results = Analyzer([tiny_bundle], device="cpu").analyze(datasets)
    outs = build_outputs(list(zip(datasets, results, strict=True)), OutputSettings(), "s")
    assert sorted(calls) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for res, grey in zip(results, expected, strict=True):
        assert res.display is not None and np.array_equal(res.display, grey)
    assert len([o for o in outs if o.kind == "sc"]) == 2
