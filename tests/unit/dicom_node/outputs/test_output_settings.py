"""Output settings from node.yaml (documented there) and the environment to the builders."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ConfigError, Destination, load_settings
from dicom_node.service import output_settings

NODE_YAML = Path(__file__).resolve().parents[4] / "config" / "node.yaml"


def test_default_omits_candidates_and_node_yaml_documents_the_key() -> None:
    assert "sr_candidates:" in NODE_YAML.read_text()
    settings = load_settings(NODE_YAML, environ={})
    assert output_settings(settings).sr_candidates == "omit"


def test_environment_can_ask_for_the_list() -> None:
    settings = load_settings(NODE_YAML, environ={"CXR_NODE__OUTPUTS__SR_CANDIDATES": "list"})
    assert output_settings(settings).sr_candidates == "list"


def test_a_bad_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match="sr_candidates"):
        load_settings(NODE_YAML, environ={"CXR_NODE__OUTPUTS__SR_CANDIDATES": "draw"})


def test_seg_is_off_by_default_and_node_yaml_documents_it() -> None:
    text = NODE_YAML.read_text()
    assert "  seg: false" in text and "seg_type:" in text
    settings = load_settings(NODE_YAML, environ={})
    built = output_settings(settings)
    assert (built.seg, built.seg_type) == (False, "binary")


def test_environment_turns_the_seg_on_and_destinations_take_it_by_default() -> None:
    environ = {"CXR_NODE__OUTPUTS__SEG": "true", "CXR_NODE__OUTPUTS__SEG_TYPE": "fractional"}
    built = output_settings(load_settings(NODE_YAML, environ=environ))
    assert (built.seg, built.seg_type) == (True, "fractional")
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=104)
    assert destination.outputs == ["sr", "sc", "gsps", "seg"]
    assert Destination(ae_title="PACS", host="h", port=1, outputs=["sr", "seg"]).outputs == [
        "sr", "seg"]


def test_bad_seg_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match="seg_type"):
        load_settings(NODE_YAML, environ={"CXR_NODE__OUTPUTS__SEG_TYPE": "labelmap"})
    with pytest.raises(ValueError, match="outputs"):
        Destination(ae_title="PACS", host="h", port=1, outputs=["pmap"])
