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
