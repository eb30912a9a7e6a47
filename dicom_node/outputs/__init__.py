"""The result objects the node sends back into the analysed study: SR, SC overlay, GSPS,
heatmap SEG.

``build_outputs`` is the one entry point. Every UID it creates is derived from
``uid_seed`` (the node passes the sorted input SOP Instance UIDs plus the model
identities), so re-running a job re-creates the same objects with the same UIDs.

Dates are not derived: every object of one set carries the moment the set was built as
SeriesDate/Time, Content (or Presentation Creation) Date/Time and Instance Creation
Date/Time, one instant for the whole set. A re-run keeps the UIDs and takes the new time:
the dates say when this content was made, and the findings (the meaning) are the same. A
job killed before its commit was never sent, so nobody sees the first dates; a
re-analysis of a delivered study rebuilds the same UIDs and does not send them again
(``dicom_node.web.actions``), so the destination keeps the first dates and the node's copy
has the later ones. A caller that needs byte-identical re-runs passes ``created``.

Each image's SC is drawn here and encoded on a thread of its own (as many threads as
cores) while the next SC is drawn and the SR and GSPS are built: the JPEG-LS encoding
(``dicom_node.delivery.jpegls``) runs with the GIL released, one call per image. The
drawing stays on this thread: its many short OpenCV calls each give the GIL up and wait to
get it back, which beside the SR's Python made a job slower, not faster (measured). The
objects, their order and their UIDs are those ``sc.build_sc`` and the others make one
after the other.

Every object of the set also names each model that produced the results in its
Contributing Equipment Sequence, the IHE AI Results convention (``equipment``), so a PACS or
viewer that reads no SR content can still tell which algorithm, version and device made it.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pydicom

from ai.types import ImageResult
from dicom_node.outputs.common import (
    OutputObject,
    OutputSettings,
    local_time,
    models_of,
    prepare_sources,
    series_uid,
    stamp_created,
)
from dicom_node.outputs.equipment import add_algorithm_equipment
from dicom_node.outputs.gsps import build_gsps
from dicom_node.outputs.heatmap import build_seg
from dicom_node.outputs.render import render_grey
from dicom_node.outputs.sc import draw_sc, encode_sc
from dicom_node.outputs.sr import build_sr

logger = logging.getLogger(__name__)

__all__ = ["OutputObject", "OutputSettings", "build_outputs", "render_grey"]


def build_outputs(
    items: Sequence[tuple[pydicom.Dataset, ImageResult]],
    settings: OutputSettings,
    uid_seed: str,
    *,
    series_seed: str | None = None,
    created: datetime.datetime | None = None,
) -> list[OutputObject]:
    """Build the enabled outputs for the analysed images of one study.

    Returns the SR first, then one SC per image (in ``items`` order), then the GSPS, then
    (when enabled) one heatmap SEG per image with a heatmap. The
    caller's datasets are not modified. Raises ``ValueError`` if the items span more
    than one study, or a result does not match its dataset.

    ``series_seed`` (the node passes the study UID plus the model identities) seeds the
    Series Instance UIDs instead of ``uid_seed``, so every version of a study's result
    lands in the same series per kind while its instance UIDs follow the inputs.

    ``created`` (default: now) dates every object of the set (see the module docstring).
    """
    if not uid_seed:
        raise ValueError("uid_seed must not be empty")
    outputs: list[OutputObject] = []
    with warnings.catch_warnings():
        # Source UIDs kept as received (e.g. "1.2.03.4"): the reference must stay exact.
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        sources = prepare_sources(items)
        threads = max(1, min(len(sources), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sc") as pool:
            encoding = [pool.submit(encode_sc, draw_sc(source, index, settings, uid_seed),
                                    settings)
                        for index, source in enumerate(sources, start=1)] if settings.sc else []
            if settings.sr:
                outputs.append(build_sr(sources, settings, uid_seed))
            gsps = build_gsps(sources, settings, uid_seed) if settings.gsps else []
            outputs.extend(sc.result() for sc in encoding)
        outputs.extend(gsps)
        if settings.seg:
            outputs.extend(build_seg(sources, settings, uid_seed))
    created = local_time(created or datetime.datetime.now())
    models = models_of(sources)
    for output in outputs:
        stamp_created(output, created)
        add_algorithm_equipment(output.dataset, models, created)
        if series_seed is not None:
            output.dataset.SeriesInstanceUID = series_uid(series_seed, output.kind)
    logger.debug(
        "Built %d output object(s) for study %s",
        len(outputs),
        sources[0].work.StudyInstanceUID,
    )
    return outputs
