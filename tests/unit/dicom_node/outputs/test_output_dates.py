"""Every output is dated: SeriesDate/Time (a PACS files an undated series under "?"),
Content or Presentation Creation Date/Time, Instance Creation Date/Time; one instant for
the whole set, the moment it was built, and the UIDs of a re-run unchanged."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from outputs_helpers import DEMO, make_result, make_source, save
from pydicom.dataset import Dataset

from ai.types import BoundingBox
from dicom_node.outputs import OutputObject, OutputSettings, build_outputs

CREATED = datetime.datetime(2025, 3, 4, 5, 6, 7, 890123)
# What each kind must carry besides SeriesDate/Time and InstanceCreationDate/Time.
CONTENT_PAIR = {
    "sr": ("ContentDate", "ContentTime"),
    "sc": ("ContentDate", "ContentTime"),
    "gsps": ("PresentationCreationDate", "PresentationCreationTime"),
}


def _study() -> list[tuple[Dataset, object]]:
    """Two images of different size: one SR, two SCs, two GSPS."""
    first = make_source(sop_uid="1.2.826.0.1.3680043.8.498.2.1")
    second = make_source(sop_uid="1.2.826.0.1.3680043.8.498.2.2", rows=200, cols=300,
                         photometric="MONOCHROME1")
    return [(first, make_result(first, box=BoundingBox(20, 40, 120, 140))),
            (second, make_result(second, model=DEMO))]


def _dates(ds: Dataset, kind: str) -> set[tuple[str, str]]:
    """Every (date, time) pair the object must carry, as written."""
    pairs = [("SeriesDate", "SeriesTime"), ("InstanceCreationDate", "InstanceCreationTime"),
             CONTENT_PAIR[kind]]
    return {(str(ds.get(d, "")), str(ds.get(t, ""))) for d, t in pairs}


def _build(created: datetime.datetime | None = None, seed: str = "seed") -> list[OutputObject]:
    return build_outputs(_study(), OutputSettings(), seed, series_seed="study seed",
                         created=created)


def test_every_output_carries_the_one_creation_instant() -> None:
    outputs = _build(CREATED)
    assert sorted(o.kind for o in outputs) == ["gsps", "gsps", "sc", "sc", "sr"]
    for output in outputs:
        assert _dates(output.dataset, output.kind) == {("20250304", "050607.890123")}, (
            output.kind)
    sc = next(o.dataset for o in outputs if o.kind == "sc")
    assert (sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture) == ("20250304",
                                                                      "050607.890123")


def test_default_is_the_moment_of_building_shared_by_the_set() -> None:
    before = datetime.datetime.now()
    outputs = _build()
    after = datetime.datetime.now()
    stamps = set().union(*(_dates(o.dataset, o.kind) for o in outputs))
    assert len(stamps) == 1, stamps
    ((date, tm),) = stamps
    written = datetime.datetime.strptime(date + tm, "%Y%m%d%H%M%S.%f")
    assert before <= written <= after


def test_a_rerun_keeps_every_uid_and_takes_its_own_time() -> None:
    first = _build(CREATED)
    later = CREATED + datetime.timedelta(days=1, hours=2)
    again = _build(later)
    uids = [(o.sop_instance_uid, str(o.dataset.SeriesInstanceUID)) for o in first]
    assert [(o.sop_instance_uid, str(o.dataset.SeriesInstanceUID)) for o in again] == uids
    for output in again:
        assert _dates(output.dataset, output.kind) == {("20250305", "070607.890123")}


@pytest.fixture
def kolkata() -> Iterator[None]:
    """The node's local zone is UTC+05:30 for one test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TZ", "Asia/Kolkata")
        time.tzset()
        yield
    time.tzset()


def test_an_aware_time_is_written_in_the_nodes_local_time(kolkata: None) -> None:
    utc = datetime.datetime(2025, 3, 4, 22, 0, 0, tzinfo=datetime.UTC)
    for output in _build(utc):
        assert _dates(output.dataset, output.kind) == {("20250305", "033000.000000")}


def test_dated_outputs_pass_dciodvfy_and_highdicom(
    tmp_path: Path, dciodvfy_errors: Callable[[Dataset, str], list[str]]
) -> None:
    for number, output in enumerate(_build(CREATED)):
        name = f"{output.kind}{number}"
        assert dciodvfy_errors(output.dataset, name) == [], name
        path = tmp_path / f"{name}.dcm"  # written by dciodvfy_errors: read it back
        if output.kind == "sr":
            read = hd.sr.srread(path)
            assert (read.ContentDate, read.SeriesDate) == ("20250304", "20250304")
        elif output.kind == "sc":
            image = hd.imread(path)
            assert (image.SeriesDate, image.SeriesTime) == ("20250304", "050607.890123")
        else:
            read = pydicom.dcmread(path)
            assert _dates(read, "gsps") == {("20250304", "050607.890123")}


def test_real_file_outputs_are_dated(real_nih: Dataset, tmp_path: Path) -> None:
    result = make_result(real_nih)
    for output in build_outputs([(real_nih, result)], OutputSettings(), "nih", created=CREATED):
        read = pydicom.dcmread(save(output.dataset, tmp_path / f"{output.kind}.dcm"))
        assert _dates(read, output.kind) == {("20250304", "050607.890123")}
