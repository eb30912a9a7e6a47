"""One INFO line per study when a connection closes, instead of one per instance."""

from __future__ import annotations

import logging

import pytest

from dicom_node.receipts import Receipts


def test_one_line_per_study_when_the_connection_closes(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.receipts")
    receipts = Receipts()
    for _ in range(3):
        receipts.stored("10.0.0.5:50346", "PACS", "1.2.3")
    receipts.stored("10.0.0.5:50346", "PACS", "1.2.4")
    receipts.duplicate("10.0.0.5:50346", "PACS", "1.2.4")
    receipts.stored("10.0.0.6:4000", "OTHER", "1.2.9")  # another connection: not yet
    receipts.stored(None, "TOOL", "1.2.5")  # in-process ingest without a peer: not tallied
    assert caplog.messages == []
    assert receipts.close("10.0.0.5:50346") == 4
    assert caplog.messages == [
        "received 3 image(s) of study 1.2.3 from 'PACS' (10.0.0.5:50346)",
        "received 1 image(s) of study 1.2.4 from 'PACS' (10.0.0.5:50346) (1 duplicate(s) "
        "with identical bytes, not analysed again)"]
    assert receipts.close("10.0.0.5:50346") == 0  # once only
    assert receipts.close("10.0.0.7:1") == 0  # an association that stored nothing: silent
    assert len(caplog.messages) == 2


# -- which studies a release completes ---------------------------------------------------------

def test_release_completes_the_studies_no_other_open_association_holds() -> None:
    receipts = Receipts()
    receipts.stored("h:1", "PACS", "1.2.3")
    receipts.stored("h:1", "PACS", "1.2.4")
    receipts.stored("h:2", "PACS", "1.2.4")  # overlapping: same study, still open
    receipts.duplicate("h:3", "PACS", "1.2.5")  # nothing new stored: completes nothing
    assert receipts.release("h:1") == ["1.2.3"]
    receipts.close("h:1")
    assert receipts.release("h:2") == ["1.2.4"]  # the last association of it
    assert receipts.release("h:3") == []
    assert receipts.release("h:9") == []  # unknown (no image stored): nothing


def test_two_releases_at_once_leave_neither_study_waiting() -> None:
    """Released but not yet closed holds nothing open: the later release completes it."""
    receipts = Receipts()
    receipts.stored("h:1", "PACS", "1.2.3")
    receipts.stored("h:2", "PACS", "1.2.3")
    assert receipts.release("h:1") == []  # h:2 still open
    assert receipts.release("h:2") == ["1.2.3"]  # h:1 released (its close still to come)


def test_an_association_ended_without_release_leaves_its_studies_to_the_quiet_period() -> None:
    receipts = Receipts()
    receipts.stored("h:1", "PACS", "1.2.3")
    receipts.stored("h:2", "PACS", "1.2.3")
    receipts.stored("h:2", "PACS", "1.2.4")
    receipts.close("h:1")  # aborted (no release): what it sent may come again
    assert receipts.release("h:2") == ["1.2.4"]
    receipts.close("h:2")
    receipts.stored("h:3", "PACS", "1.2.3")  # the retry, after the abort: a fresh start
    assert receipts.release("h:3") == ["1.2.3"]
