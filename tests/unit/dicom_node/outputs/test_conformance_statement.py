"""docs/conformance.md states what the code does: its lists are checked against the code,
so a new transfer syntax, SOP class, output or code cannot ship undocumented."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT
from pydicom.uid import (
    ComprehensiveSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import StoragePresentationContexts
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from ai.selection import RADIOGRAPH_SOP_CLASSES
from dicom_node.delivery.syntaxes import LOSSLESS
from dicom_node.outputs import OutputSettings
from dicom_node.outputs.equipment import PROCESSING_ALGORITHM
from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES

DOC = ROOT / "docs" / "conformance.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _section(doc: str, heading: str) -> str:
    """The text of one '### heading' section, up to the next heading."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#)", doc, re.M | re.S)
    assert match is not None, f"no section {heading!r} in {DOC}"
    return match.group(1)


def test_accepted_transfer_syntaxes_are_listed(doc: str) -> None:
    section = _section(doc, "3.3 Transfer syntaxes accepted (every storage SOP class)")
    listed = set(re.findall(r"\| (1\.2\.840\.10008\.1\.2[\d.]*) \|", section))
    assert listed == {str(uid) for uid in ACCEPTED_TRANSFER_SYNTAXES}


def test_analysed_and_sent_sop_classes_are_listed(doc: str) -> None:
    analysed = _section(doc, "3.2 SOP classes accepted")
    assert set(re.findall(r"\| (1\.2\.840\.10008\.5\.1\.4\.1\.1[\d.]*) \|", analysed)) == (
        RADIOGRAPH_SOP_CLASSES)
    assert re.search(rf"\({len(StoragePresentationContexts)}\s+classes", analysed)
    sent = _section(doc, "4.2 SOP classes and transfer syntaxes sent")
    for uid in (ComprehensiveSRStorage, SecondaryCaptureImageStorage,
                GrayscaleSoftcopyPresentationStateStorage):
        assert f"| {uid} |" in sent, uid
    for uid in LOSSLESS:  # what sc_transfer_syntaxes may name
        assert f"{uid.keyword} ({uid})" in sent, uid.keyword
    assert str(StorageCommitmentPushModel) in doc


def test_output_conventions_match_the_code(doc: str) -> None:
    code, scheme, meaning = PROCESSING_ALGORITHM
    assert f"({code}, {scheme}, \"{meaning}\")" in doc
    settings = OutputSettings()
    numbers = (settings.series_number_sr, settings.series_number_sc, settings.series_number_gsps)
    assert f"Series Number {numbers[0]} (SR), {numbers[1]} (SC), {numbers[2]} (GSPS)" in doc


def test_readme_links_the_statement() -> None:
    assert "(docs/conformance.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
