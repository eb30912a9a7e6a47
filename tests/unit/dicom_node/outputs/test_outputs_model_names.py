"""The overlay names the model of every finding: in ImageComments always, and in the
on-image summary line when the line still fits at its full size."""

from __future__ import annotations

import numpy as np
import pytest
from outputs_helpers import CARDIOMEGALY, DEMO, DETECTOR, EFFUSION, NODULE, make_source

from ai.types import BoundingBox, Finding, ImageResult, ModelIdentity
from dicom_node.outputs import OutputSettings, build_outputs
from dicom_node.outputs.common import prepare_sources
from dicom_node.outputs.render import banner_fits
from dicom_node.outputs.sc import render_overlay

OTHER = ModelIdentity("cxr-effusion", "3.0", "2.25.333", "classification")


def _result(rows: int, cols: int) -> tuple[object, ImageResult]:
    """A boxed detector nodule, two DEMO classifier findings and one of another classifier
    without box, one negative finding."""
    ds = make_source(rows=rows, cols=cols)
    findings = [
        Finding("Nodule", NODULE, 0.97, 0.5, True, DETECTOR,
                BoundingBox(cols * 0.6, rows * 0.5, cols * 0.7, rows * 0.6)),
        Finding("Cardiomegaly", CARDIOMEGALY, 0.71, 0.5, True, DEMO),
        Finding("Effusion", EFFUSION, 0.66, 0.5, True, DEMO),
        Finding("Effusion", EFFUSION, 0.58, 0.5, True, OTHER),
        Finding("Nodule", NODULE, 0.10, 0.5, False, DEMO),
    ]  # fmt: skip
    display = np.full((rows, cols), 90, np.uint8)
    result = ImageResult(str(ds.SOPInstanceUID), rows, cols, findings=findings,
                         models=[DETECTOR, DEMO, OTHER], display=display)
    return ds, result


def test_image_comments_name_the_model_of_each_positive_finding() -> None:
    ds, result = _result(300, 200)
    (sc,) = build_outputs([(ds, result)], OutputSettings(sr=False, gsps=False), "seed")
    assert sc.dataset.ImageComments == (
        "AI RESULT - NOT FOR PRIMARY DIAGNOSIS. "
        "Models: CXR detector 2.1.0; CXR classifier DEMO 0.1, DEMO; cxr-effusion 3.0. "
        "Positive findings: Nodule 97% (CXR detector 2.1.0), "
        "Cardiomegaly 71% (CXR classifier DEMO 0.1, DEMO), "
        "Effusion 66% (CXR classifier DEMO 0.1, DEMO), Effusion 58% (cxr-effusion 3.0)."
    )


@pytest.mark.parametrize(
    ("rows", "cols", "summary"),
    [
        (2000, 3000, "AI: Cardiomegaly 71%, Effusion 66% (CXR classifier DEMO 0.1, DEMO); "
                     "Effusion 58% (cxr-effusion 3.0)"),
        (2000, 2600, "AI: Cardiomegaly 71%, Effusion 66% (CXR classifier DEMO, DEMO); "
                     "Effusion 58% (cxr-effusion)"),
        (2000, 2000, "AI: Cardiomegaly 71%, Effusion 66%, Effusion 58%"),
    ],
    ids=["versions", "names", "no-room"],
)  # fmt: skip
def test_summary_line_names_the_models_as_far_as_it_fits(rows: int, cols: int,
                                                          summary: str) -> None:
    ds, result = _result(rows, cols)
    (source,) = prepare_sources([(ds, result)])
    overlay = render_overlay(source, OutputSettings())
    assert [label.text for label in overlay.labels] == ["Nodule 97%"]  # beside its box
    assert overlay.summary == summary
    if "(" in summary:  # a line with models is burnt in at full size, never shrunk
        assert banner_fits(summary, rows, cols)


def test_summary_line_of_a_small_image_has_no_models() -> None:
    rows, cols = 300, 200
    ds, result = _result(rows, cols)
    (source,) = prepare_sources([(ds, result)])
    overlay = render_overlay(source, OutputSettings())
    unboxed = "Cardiomegaly 71%, Effusion 66%, Effusion 58%"
    assert overlay.summary is not None
    assert overlay.summary.endswith(unboxed)  # the nodule too when its label found no room
    assert "(" not in overlay.summary
