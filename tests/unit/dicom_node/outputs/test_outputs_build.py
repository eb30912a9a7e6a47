"""build_outputs: study membership, UIDs, validity, and the caller's datasets left alone."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pydicom
import pytest
from outputs_helpers import CR_J2K, DEMO, STUDY_UID, make_result, make_source
from pydicom.dataset import Dataset

from ai.types import BoundingBox
from ai.uids import is_valid_uid
from dicom_node.outputs import OutputObject, OutputSettings, build_outputs

SETTINGS = OutputSettings()


def _by_kind(outputs: list[OutputObject]) -> dict[str, list[OutputObject]]:
    kinds: dict[str, list[OutputObject]] = {}
    for output in outputs:
        kinds.setdefault(output.kind, []).append(output)
    return kinds


def _two_image_study() -> list[tuple[Dataset, object]]:
    first = make_source(photometric="MONOCHROME1", sop_uid="1.2.826.0.1.3680043.8.498.2.1")
    second = make_source(
        photometric="MONOCHROME1", voi="lut", sop_uid="1.2.826.0.1.3680043.8.498.2.2"
    )
    return [
        (first, make_result(first, box=BoundingBox(20, 40, 120, 140))),
        (second, make_result(second, positive=False)),
    ]


def test_one_sr_one_sc_per_image_one_gsps_all_in_the_source_study() -> None:
    outputs = build_outputs(_two_image_study(), SETTINGS, "seed")
    kinds = _by_kind(outputs)
    assert [len(kinds[k]) for k in ("sr", "sc", "gsps")] == [1, 2, 1]
    assert [o.kind for o in outputs] == ["sr", "sc", "sc", "gsps"]
    for output in outputs:
        ds = output.dataset
        assert ds.StudyInstanceUID == STUDY_UID
        assert ds.SOPInstanceUID == output.sop_instance_uid
        assert ds.SOPClassUID == output.sop_class_uid
        assert ds.Manufacturer == "CXR AI node"
        assert "cxr-ai-node" in str(ds.SoftwareVersions)
        assert ds.PatientID == "CANARY-ID"
        assert ds.PatientName == "Canary^Patient"
        assert is_valid_uid(ds.SeriesInstanceUID) and is_valid_uid(ds.SOPInstanceUID)
    series = {k: {o.dataset.SeriesInstanceUID for o in v} for k, v in kinds.items()}
    assert all(len(uids) == 1 for uids in series.values())
    all_series = set().union(*series.values())
    assert len(all_series) == 3
    assert "1.2.826.0.1.3680043.8.498.3" not in all_series
    assert kinds["sr"][0].dataset.ContentDate and kinds["sc"][0].dataset.ContentTime
    assert len({o.sop_instance_uid for o in outputs}) == len(outputs)


def test_same_seed_same_uids_other_seed_other_uids() -> None:
    def uids(seed: str) -> list[tuple[str, str]]:
        outputs = build_outputs(_two_image_study(), SETTINGS, seed)
        return [(o.dataset.SeriesInstanceUID, o.sop_instance_uid) for o in outputs]

    first, again, other = uids("seed A"), uids("seed A"), uids("seed B")
    assert first == again
    assert not {u for pair in first for u in pair} & {u for pair in other for u in pair}


def test_items_from_two_studies_are_refused_naming_the_uids() -> None:
    first = make_source()
    second = make_source(study_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    items = [(first, make_result(first)), (second, make_result(second))]
    with pytest.raises(ValueError, match=r"more than one study: \['1.2.3.4', '1.2.826"):
        build_outputs(items, SETTINGS, "seed")


def test_result_for_another_image_is_refused() -> None:
    ds = make_source()
    result = make_result(make_source(sop_uid="9.9.9"))
    with pytest.raises(ValueError, match="9.9.9"):
        build_outputs([(ds, result)], SETTINGS, "seed")


def test_settings_switch_kinds_off() -> None:
    ds = make_source()
    outputs = build_outputs([(ds, make_result(ds))], OutputSettings(sr=False, gsps=False), "s")
    assert [o.kind for o in outputs] == ["sc"]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="heatmap_alpha"):
        OutputSettings(heatmap_alpha=1.5)


def test_missing_type2_attributes_do_not_break_and_caller_dataset_is_unchanged(
    dciodvfy_errors: Callable[[Dataset, str], list[str]],
) -> None:
    ds = make_source(type2=False, modality="DX", photometric="MONOCHROME1", voi=None)
    before = copy.deepcopy(ds)
    result = make_result(ds, box=BoundingBox(10, 50, 90, 120), heat_box=(60, 100, 20, 80))
    outputs = build_outputs([(ds, result)], SETTINGS, "seed")
    assert ds == before
    assert "PatientBirthDate" not in ds and "PatientOrientation" not in ds
    for output in outputs:
        assert output.dataset.PatientID == "CANARY-ID"
        assert output.dataset.get("PatientBirthDate", "") == ""
        assert dciodvfy_errors(output.dataset, output.kind) == []


def test_real_cr_dataset_is_not_mutated() -> None:
    if not CR_J2K.exists():
        pytest.fail(f"{CR_J2K} is missing")
    ds = pydicom.dcmread(CR_J2K)
    before = copy.deepcopy(ds)
    build_outputs([(ds, make_result(ds, model=DEMO))], SETTINGS, "seed")
    assert ds == before
    assert str(ds.ReferringPhysicianName) == "ward"  # no caret added to the source


@pytest.mark.parametrize(
    "source_kwargs",
    [
        {"modality": "CR", "photometric": "MONOCHROME1", "rows": 300, "cols": 200},
        {"modality": "DX", "photometric": "MONOCHROME2", "rows": 200, "cols": 300, "voi": "lut"},
        {"modality": "DX", "photometric": "MONOCHROME2", "voi": None, "type2": False},
    ],
    ids=["cr-mono1-300x200", "dx-mono2-200x300-voilut", "dx-no-voi-no-type2"],
)
def test_generated_sources_give_valid_objects(
    source_kwargs: dict, dciodvfy_errors: Callable[[Dataset, str], list[str]]
) -> None:
    ds = make_source(**source_kwargs)
    result = make_result(ds, box=BoundingBox(30, 60, 150, 170))
    for output in build_outputs([(ds, result)], SETTINGS, "seed"):
        assert dciodvfy_errors(output.dataset, output.kind) == [], output.kind


def test_real_files_give_valid_objects(
    real_cr: Dataset, real_nih: Dataset, dciodvfy_errors: Callable[[Dataset, str], list[str]]
) -> None:
    for name, ds in (("cr", real_cr), ("nih", real_nih)):
        rows, cols = int(ds.Rows), int(ds.Columns)
        box = BoundingBox(cols * 0.3, rows * 0.3, cols * 0.5, rows * 0.45)
        result = make_result(ds, box=box, heat_box=(rows // 3, rows // 2, cols // 3, cols // 2))
        for output in build_outputs([(ds, result)], SETTINGS, f"seed {name}"):
            assert output.dataset.StudyInstanceUID == ds.StudyInstanceUID
            assert dciodvfy_errors(output.dataset, f"{name}-{output.kind}") == [], output.kind
