"""The one "isolate the bad image" batching: one call when all images are usable, then each
alone, so only the unusable image is lost."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom import Dataset

from ai.batches import analyse_isolating
from ai.types import ImageResult, ModelIdentity, PixelDataError


class _Picky:
    models: list[ModelIdentity] = []

    def __init__(self) -> None:
        self.calls: list[int] = []

    def analyze(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        self.calls.append(len(datasets))
        if any(ds.SOPInstanceUID == "9.9" for ds in datasets):
            raise PixelDataError("undecodable")
        return [ImageResult(str(ds.SOPInstanceUID), 1, 1) for ds in datasets]


def _ds(uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = uid
    return ds


def test_usable_images_are_analysed_in_one_call() -> None:
    analyzer = _Picky()
    out = analyse_isolating(analyzer, [_ds("1"), _ds("2")])
    assert [r.sop_instance_uid for r in out] == ["1", "2"]  # type: ignore[union-attr]
    assert analyzer.calls == [2]


def test_the_bad_image_is_isolated_and_the_others_kept() -> None:
    analyzer = _Picky()
    out = analyse_isolating(analyzer, [_ds("1"), _ds("9.9"), _ds("3")])
    assert isinstance(out[1], PixelDataError)
    assert [getattr(r, "sop_instance_uid", None) for r in out] == ["1", None, "3"]
    assert analyzer.calls == [3, 1, 1, 1]
    single = analyse_isolating(analyzer, [_ds("9.9")])
    assert len(single) == 1 and isinstance(single[0], PixelDataError)
