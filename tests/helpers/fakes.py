"""A stand-in for the model side, to isolate the service in unit and socket tests.

The real ``ai.inference.Analyzer`` is exercised by the pipeline, crash and Orthanc tests.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pydicom

from ai.types import BoundingBox, CodedConcept, Finding, ImageResult, ModelIdentity, PixelDataError

FAKE_MODEL = ModelIdentity(name="fake-model", version="1.0", device_uid="2.25.1234567",
                           task="classification", demo=True)
NODULE = CodedConcept("27925004", "SCT", "Nodule")


class FakeAnalyzer:
    """One positive nodule in the image centre; counts calls; can fail on demand."""

    def __init__(self, fail_with: Exception | None = None, delay_s: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.fail_with = fail_with
        self.delay_s = delay_s
        self._lock = threading.Lock()

    @property
    def models(self) -> list[ModelIdentity]:
        return [FAKE_MODEL]

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        with self._lock:
            self.calls.append([str(ds.SOPInstanceUID) for ds in datasets])
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        out = []
        for ds in datasets:
            if "PixelData" not in ds:
                raise PixelDataError("no pixel data")
            rows, cols = int(ds.Rows), int(ds.Columns)
            box = BoundingBox(cols * 0.4, rows * 0.4, cols * 0.6, rows * 0.6)
            heat = np.zeros((rows, cols), np.float32)
            heat[int(rows * 0.4):int(rows * 0.6), int(cols * 0.4):int(cols * 0.6)] = 1.0
            finding = Finding("nodule", NODULE, 0.9, 0.5, True, FAKE_MODEL, box)
            out.append(ImageResult(str(ds.SOPInstanceUID), rows, cols, [finding], heat,
                                   [FAKE_MODEL]))
        return out
