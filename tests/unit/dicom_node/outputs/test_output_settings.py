"""outputs.sr_candidates: from node.yaml (documented there) and the environment to the SR."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ConfigError, load_settings
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
