"""The one "isolate the bad image" batching: analyse images together, and when one of them
cannot be used, each alone, so only the unusable one is lost.

The worker (a study's images, as one job), the node's reference evaluation (a study's images,
as a job would) and ``training evaluate`` (a batch of labelled images) all call
:func:`analyse_isolating`, so an undecodable image is treated the same way everywhere.

Named ``ai.batches`` rather than a function in :mod:`ai.inference` (the issue's suggestion):
``ai.inference`` imports torch at import time, and the worker, the evaluation jobs and their
tests use this with any :class:`~ai.types.Analyzer` without needing torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom import Dataset

from ai.types import Analyzer, ImageResult, PixelDataError


def analyse_isolating(analyzer: Analyzer, datasets: Sequence[Dataset]
                      ) -> list[ImageResult | PixelDataError]:
    """One entry per dataset, in order: its result, or the :class:`PixelDataError` that made
    it unusable. The images are analysed in one call first (results do not depend on the
    batch); only when that call raises ``PixelDataError`` is each analysed alone. Any other
    error propagates."""
    try:
        return list(analyzer.analyze(datasets))
    except PixelDataError as exc:
        if len(datasets) == 1:
            return [exc]
    outcomes: list[ImageResult | PixelDataError] = []
    for ds in datasets:
        try:
            outcomes.append(analyzer.analyze([ds])[0])
        except PixelDataError as exc:
            outcomes.append(exc)
    return outcomes
