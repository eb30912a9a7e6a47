"""The selection rules run on a pydicom Dataset and on a plain keyword mapping alike, read
only the keywords they declare, and default to the node's configured defaults."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom import Dataset

from ai.selection import (
    SELECTION_KEYWORDS,
    SelectionRules,
    header_values,
    rejection_reason,
    screening_reason,
)
from dicom_node.config import SelectionSettings

CHEST = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1", "Modality": "DX",
         "BodyPartExamined": "CHEST", "ViewPosition": "PA", "SamplesPerPixel": 1,
         "Rows": 512, "Columns": 512}


def _dataset(values: dict[str, Any]) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


class _Recording(dict):
    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


@pytest.mark.parametrize("change", [
    {}, {"ViewPosition": "LL"}, {"Modality": "CT"}, {"BodyPartExamined": "HIP"},
    {"Rows": 100}, {"SamplesPerPixel": 3}, {"NumberOfFrames": 2}, {"SOPClassUID": "1.2.3"},
    {"ViewPosition": ""}, {"BodyPartExamined": ""},
])
def test_dataset_and_mapping_give_the_same_reason(change: dict[str, Any]) -> None:
    values = {**CHEST, **change}
    rules = SelectionRules(accept_missing_view_position=False)
    header = _Recording(values)
    assert rejection_reason(header, rules) == rejection_reason(_dataset(values), rules)
    assert screening_reason(header) == screening_reason(_dataset(values))
    assert header.read <= set(SELECTION_KEYWORDS)
    assert rejection_reason(header_values(_dataset(values)), rules) == rejection_reason(
        header, rules)


def test_rules_default_to_the_node_settings() -> None:
    assert SelectionSettings().to_rules() == SelectionRules()
    assert rejection_reason(CHEST, SelectionRules()) is None
