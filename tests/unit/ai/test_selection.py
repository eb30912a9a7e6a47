"""The selection rules run on a pydicom Dataset and on a plain keyword mapping alike, read
only the keywords they declare, and default to the node's configured defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import Dataset

from ai.selection import (
    SELECTION_KEYWORDS,
    SelectionRules,
    header_values,
    rejection_reason,
    screening_reason,
)
from dicom_node.config import SelectionSettings
from training.synth import VARIANT_SPECS, make_dataset

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


def _code(value: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, "x"
    return item


NO_BODY = {**CHEST, "BodyPartExamined": ""}


@pytest.mark.parametrize(("change", "expected"), [
    # explicit non-chest body part: ignored whatever the descriptions say
    ({"BodyPartExamined": "KNEE", "StudyDescription": "THORAX"}, "body part KNEE is not a chest"),
    ({"BodyPartExamined": "LSPINE"}, "body part LSPINE is not a chest"),
    # explicit chest body part: accepted
    ({"BodyPartExamined": "CHEST", "StudyDescription": "Hand"}, None),
    # missing / unknown body part: the descriptions decide
    ({"SeriesDescription": "KNIE LINKS"},
     'SeriesDescription "KNIE LINKS" names non-chest anatomy (knee)'),
    ({"ProtocolName": "OPG"}, 'ProtocolName "OPG" names non-chest anatomy (dental)'),
    ({"RequestedProcedureDescription": "Rx columna lumbar"},
     'RequestedProcedureDescription "Rx columna lumbar" names non-chest anatomy (spine)'),
    ({"BodyPartExamined": "OTHER", "StudyDescription": "RX TÓRAX PA"}, None),
    ({"BodyPartExamined": "TORAX"}, None),
    ({"BodyPartExamined": "OTHER"}, "body part OTHER is not a chest"),
    ({"StudyDescription": "POUMONS"}, None),
    ({"StudyDescription": "CHESTER"}, None),  # no anatomy named: accept_missing_body_part
    ({"StudyDescription": "No Finding"}, None),
    # the most specific description naming anatomy decides
    ({"SeriesDescription": "Thorax pa", "StudyDescription": "Thorax + Abdomen"}, None),
    ({"SeriesDescription": "Abdomen", "StudyDescription": "Thorax + Abdomen"},
     'SeriesDescription "Abdomen" names non-chest anatomy (abdomen)'),
    ({"SeriesDescription": "Thorax / Abdomen"},
     'SeriesDescription "Thorax / Abdomen" names non-chest anatomy (abdomen)'),
    ({"AcquisitionDeviceProcessingDescription": "HAND PA"},
     'AcquisitionDeviceProcessingDescription "HAND PA" names non-chest anatomy (hand)'),
])
def test_anatomy_decision_order(change: dict[str, Any], expected: str | None) -> None:
    values = {**NO_BODY, **change}
    assert rejection_reason(values, SelectionRules()) == expected
    assert rejection_reason(_dataset(values), SelectionRules()) == expected


def test_missing_body_part_without_keywords_follows_the_setting() -> None:
    rules = SelectionRules(accept_missing_body_part=False)
    assert rejection_reason({**NO_BODY, "StudyDescription": "x"}, rules) == (
        "BodyPartExamined is empty")
    assert rejection_reason({**NO_BODY, "StudyDescription": "Thorax"}, rules) is None


@pytest.mark.parametrize(("change", "expected"), [
    ({"ViewPosition": "", "ViewCodeSequence": [_code("399198007")]},
     'view position lateral (ViewCodeSequence 399198007 "right lateral")'),
    ({"ViewPosition": "PA", "ViewCodeSequence": [_code("R-10236", "SRT")]},
     'view position lateral (ViewCodeSequence R-10236 "left lateral")'),
    ({"ViewPosition": "", "ViewCodeSequence": [_code("399067008")]},
     'view position lateral (ViewCodeSequence 399067008 "lateral")'),
    ({"ViewPosition": "", "ViewCodeSequence": [_code("272479007")]}, None),  # PA
    ({"ViewPosition": "", "SeriesDescription": "Thorax seitlich"},
     'view position lateral (SeriesDescription "Thorax seitlich")'),
    ({"ViewPosition": "", "ProtocolName": "CHEST LAT"},
     'view position lateral (ProtocolName "CHEST LAT")'),
    ({"ViewPosition": "", "SeriesDescription": "Thorax profil"},
     'view position lateral (SeriesDescription "Thorax profil")'),
    ({"ViewPosition": "", "ProtocolName": "THORAX PA + LAT"}, None),  # both views named
    ({"ViewPosition": "", "StudyDescription": "THORAX LAT"}, None),  # the study's, not the image's
    ({"ViewPosition": "", "SeriesDescription": "LATERALITY"}, None),  # not the word LAT
])
def test_lateral_views(change: dict[str, Any], expected: str | None) -> None:
    values = {**CHEST, **change}
    assert rejection_reason(_dataset(values), SelectionRules()) == expected
    lateral = expected is not None
    assert (screening_reason(_dataset(values)) == "lateral view") is lateral


@pytest.mark.parametrize(("change", "expected"), [
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.11.1"}, "SOP class Grayscale Softcopy "
     "Presentation State Storage is a result object (presentation state), not an "
     "image"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.33"}, "SOP class Comprehensive SR Storage "
     "is a result object (structured report), not an image"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.59"}, "SOP class Key Object Selection "
     "Document Storage is a result object (key object selection), not an image"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.66.4"}, "SOP class Segmentation Storage is "
     "a result object (segmentation), not an image"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "ImageType": ["DERIVED", "SECONDARY"]},
     "secondary capture with ImageType DERIVED\\SECONDARY is a result page, not an acquired "
     "radiograph"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "PhotometricInterpretation": "RGB",
      "SamplesPerPixel": 3}, "colour image (PhotometricInterpretation RGB): a result page"),
    ({"PhotometricInterpretation": "PALETTE COLOR"},
     "colour image (PhotometricInterpretation PALETTE COLOR): a result page"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, None),  # NIH ChestX-ray14 as distributed
    ({"ImageType": ["DERIVED", "PRIMARY"]}, None),
])
def test_other_systems_results_are_ignored(change: dict[str, Any], expected: str | None
                                           ) -> None:
    values = {**CHEST, **change}
    assert rejection_reason(values, SelectionRules()) == expected
    assert rejection_reason(_dataset(values), SelectionRules()) == expected


def test_a_long_description_is_quoted_cut() -> None:
    text = "KNIE " + "x" * 200
    reason = rejection_reason({**NO_BODY, "SeriesDescription": text}, SelectionRules())
    assert reason is not None and '"KNIE xxx' in reason and text not in reason
    quoted = reason.split('"')[1]
    assert len(quoted) == 64 and quoted.endswith("\u2026")
    assert rejection_reason({**NO_BODY, "SeriesDescription": "Knie\x07\x91 links\n"},
                            SelectionRules()) == (
        'SeriesDescription "Knie links" names non-chest anatomy (knee)')


def test_configured_keywords_replace_the_defaults() -> None:
    settings = SelectionSettings(chest_keywords=["BRYSTKASSE"],
                                 non_chest_keywords={"hoof": ["HUF"]})
    rules = settings.to_rules()
    assert rejection_reason({**NO_BODY, "StudyDescription": "huf"}, rules) == (
        'StudyDescription "huf" names non-chest anatomy (hoof)')
    assert rejection_reason({**NO_BODY, "StudyDescription": "KNEE"}, rules) is None
    with pytest.raises(ValueError, match=r"(?s)chest_keywords.*no letter or digit"):
        SelectionSettings(chest_keywords=["--"])


def test_the_shipped_config_documents_the_defaults() -> None:
    """config/node.yaml lists the keyword defaults in full: it must say what the code does."""
    shipped = Path(__file__).resolve().parents[3] / "config" / "node.yaml"
    selection = yaml.safe_load(shipped.read_text(encoding="utf-8"))["studies"]["selection"]
    assert SelectionSettings(**selection) == SelectionSettings()


@pytest.mark.parametrize("codes", ["399198007", ["399198007"], [{"CodingSchemeDesignator": 1}], 7])
def test_a_malformed_view_code_sequence_is_no_view(codes: object) -> None:
    assert rejection_reason({**CHEST, "ViewCodeSequence": codes}, SelectionRules()) is None


@pytest.mark.parametrize("variant", sorted(VARIANT_SPECS))
def test_every_phantom_variant_is_selected_as_its_spec_says(variant: str) -> None:
    """Phantom headers, View Code Sequence and descriptions included, pass the rules as
    their variant says: the lateral one by its view, the CT by its class, the rest selected."""
    ds = make_dataset(variant, seed=3, rows=256, columns=256, findings={})
    reason = rejection_reason(ds, SelectionRules())
    assert (reason is None) is VARIANT_SPECS[variant].analysable, reason
    assert (screening_reason(ds) is None) is VARIANT_SPECS[variant].analysable
