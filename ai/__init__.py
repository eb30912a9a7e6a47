"""Model side of the CXR AI node: DICOM pixels to tensors, networks, inference, Grad-CAM,
model bundles and metrics. Never imports ``dicom_node`` or ``training``."""

import logging

from ai.types import (
    AnalysisError,
    BoundingBox,
    CodedConcept,
    Finding,
    ImageResult,
    ModelIdentity,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AnalysisError",
    "BoundingBox",
    "CodedConcept",
    "Finding",
    "ImageResult",
    "ModelIdentity",
]
