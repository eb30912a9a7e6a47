"""Grad-CAM localisation measures on constructed heatmaps: the pointing game (hit, miss,
tolerance, all-zero map), energy inside a mask, and the locations sidecar round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ai.reference.localisation import (
    LUNG_GRID,
    ImageLocations,
    LocalisationTally,
    LocationsError,
    energy_inside,
    image_entry,
    measure,
    pack_mask,
    pointing_hit,
    read_locations,
    tolerance_for,
    unpack_mask,
    write_locations,
)


def _peak(shape: tuple[int, int], row: int, col: int) -> np.ndarray:
    heat = np.zeros(shape, np.float32)
    heat[row, col] = 1.0
    heat[0, 0] = 0.5  # a lesser maximum elsewhere must not count
    return heat


BOX = (0.25, 0.25, 0.5, 0.5)  # rows/cols 25..50 of a 100 x 100 map


def test_pointing_hit_inside_the_box() -> None:
    assert pointing_hit(_peak((100, 100), 30, 40), [BOX], tolerance_px=0)


def test_pointing_miss_outside_the_box_and_tolerance() -> None:
    assert not pointing_hit(_peak((100, 100), 80, 80), [BOX], tolerance_px=5)
    assert not pointing_hit(_peak((100, 100), 80, 80), [], tolerance_px=5)


def test_pointing_tolerance_is_a_distance_in_map_pixels() -> None:
    heat = _peak((100, 100), 30, 53)  # centre x 53.5: 3.5 px right of the box edge at 50
    assert not pointing_hit(heat, [BOX], tolerance_px=3.0)
    assert pointing_hit(heat, [BOX], tolerance_px=4.0)
    diagonal = _peak((100, 100), 53, 53)  # 3.5 px beyond both edges: 4.95 px away
    assert not pointing_hit(diagonal, [BOX], tolerance_px=4.5)
    assert pointing_hit(diagonal, [BOX], tolerance_px=5.0)


def test_pointing_any_of_several_regions_and_non_square_maps() -> None:
    heat = _peak((50, 200), 40, 180)  # boxes are normalised: x uses columns, y rows
    assert pointing_hit(heat, [BOX, (0.85, 0.7, 0.95, 0.9)], tolerance_px=0)
    assert not pointing_hit(heat, [(0.7, 0.7, 0.85, 0.9)], tolerance_px=0)


def test_an_all_zero_map_points_nowhere() -> None:
    assert not pointing_hit(np.zeros((10, 10)), [(0.0, 0.0, 1.0, 1.0)], tolerance_px=100)
    assert math.isnan(energy_inside(np.zeros((10, 10)), np.ones((10, 10), bool)))
    with pytest.raises(ValueError, match="2-D"):
        pointing_hit(np.zeros(10), [BOX], 1)


def test_energy_inside_a_mask_and_resampled_masks() -> None:
    heat = np.zeros((100, 100), np.float32)
    heat[:, :50] = 1.0
    heat[:, 50:] = 3.0  # a quarter of the mass on the left half
    left = np.zeros((100, 100), bool)
    left[:, :50] = True
    assert energy_inside(heat, left) == pytest.approx(0.25)
    coarse = np.zeros((4, 4), bool)
    coarse[:, :2] = True  # same region on a coarse grid: resampled to the map
    assert energy_inside(heat, coarse) == pytest.approx(0.25)
    assert energy_inside(heat - 5.0 * (heat > 2), left) == pytest.approx(1.0)  # negatives clip


def test_tolerance_scales_with_the_map() -> None:
    assert tolerance_for((224, 180)) == pytest.approx(15.0)
    assert tolerance_for((1000, 2240)) == pytest.approx(150.0)


def test_measure_uses_the_label_region_and_the_lungs() -> None:
    lungs = np.zeros((LUNG_GRID, LUNG_GRID), bool)
    lungs[LUNG_GRID // 2 :, :] = True  # the lower half
    where = ImageLocations((("nodule", (0.25, 0.7, 0.5, 0.8)),), lungs)
    heat = _peak((200, 200), 150, 70)
    hit, energy = measure(heat, where, "Nodule", tolerance_px=0)  # type: ignore[misc]
    assert hit and energy == pytest.approx(1.0 / 1.5)  # the 0.5 corner is outside the lungs
    assert measure(heat, where, "consolidation") is None


def test_tally_reports_rate_with_interval_and_mean_energy() -> None:
    tally = LocalisationTally()
    for hit, energy in [(True, 0.8), (True, 0.6), (False, float("nan")), (True, None)]:
        tally.add(hit, energy)
    doc = tally.as_dict()
    assert doc["tp_images"] == 4 and doc["hits"] == 3
    assert doc["hit_rate"]["value"] == pytest.approx(0.75)
    assert doc["hit_rate"]["lower"] < 0.75 < doc["hit_rate"]["upper"]
    assert doc["lung_energy"] == pytest.approx(0.7)


def test_sidecar_round_trip_and_bad_input(tmp_path: Path) -> None:
    lungs = np.zeros((300, 250), bool)
    lungs[50:250, 20:120] = True
    path = write_locations(tmp_path / "locations.json", {
        "p/s/a.dcm": image_entry([("Pleural Effusion", (0.1, 0.6, 0.4, 0.9))], lungs),
        "./p/s/b.dcm": image_entry([], None),
    })
    found = read_locations(path)
    assert set(found) == {"p/s/a.dcm", "p/s/b.dcm"}
    a = found["p/s/a.dcm"]
    assert a.regions("pleural_effusion") == [(0.1, 0.6, 0.4, 0.9)]
    assert a.lungs is not None and a.lungs.shape == (LUNG_GRID, LUNG_GRID)
    assert abs(a.lungs.mean() - lungs.mean()) < 0.02
    assert found["p/s/b.dcm"].lungs is None
    assert np.array_equal(unpack_mask(pack_mask(a.lungs)), a.lungs)
    doc = json.loads(path.read_text())
    doc["images"]["p/s/a.dcm"]["boxes"] = [["nodule", 0.5, 0.5, 0.2, 0.9]]
    path.write_text(json.dumps(doc))
    with pytest.raises(LocationsError, match=r'image "p/s/a.dcm".*x0<=x1'):
        read_locations(path)
    path.write_text('{"format": "other"}')
    with pytest.raises(LocationsError, match="format"):
        read_locations(path)
