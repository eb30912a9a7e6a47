"""The whole node (storescu -> node -> destination) against destinations that take only
some result objects: a pynetdicom SCP without Comprehensive SR, DCMTK storescp with an
association profile that omits it (and one that takes the SC only as RLE Lossless).
Accepted objects arrive, the others end ``not_accepted`` with the reason, the next study
proceeds, nothing stays ``sending``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import StoreSCP, free_port, storescu, wait_until
from helpers.dicomfiles import make_image, write
from helpers.fakes import FakeAnalyzer
from helpers.node import node_settings, query, start_node
from helpers.pacs import UNCOMPRESSED, TestPACS
from pydicom.uid import RLELossless
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import select

from dicom_node.cli import main as cli_main
from dicom_node.store import db

pytestmark = pytest.mark.integration

TERMINAL = {"sent", "committed", "not_accepted", "dead"}

PROFILE = r"""
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[RLEOnly]
TransferSyntax1 = RLELossless

[[PresentationContexts]]
[NoSR]
PresentationContext1 = VerificationSOPClass\Uncompressed
PresentationContext2 = SecondaryCaptureImageStorage\Uncompressed
PresentationContext3 = GrayscaleSoftcopyPresentationStateStorage\Uncompressed
[SCAsRLE]
PresentationContext1 = VerificationSOPClass\Uncompressed
PresentationContext2 = SecondaryCaptureImageStorage\RLEOnly

[[Profiles]]
[NoSR]
PresentationContexts = NoSR
[SCAsRLE]
PresentationContexts = SCAsRLE
"""


def _rows(settings: Any) -> list[Any]:
    d, o = db.deliveries.c, db.outputs.c
    return query(settings, select(db.deliveries, o.kind, o.study_uid, o.sop_instance_uid)
                 .join(db.outputs, o.id == d.output_id).order_by(d.id))


def _send_studies(settings: Any, tmp_path: Path, n: int) -> list[str]:
    uids = []
    for seed in range(n):
        ds = make_image(seed=seed)
        assert storescu(settings.dicom.port, [write(ds, tmp_path / "in" / str(seed))]
                        ).returncode == 0
        uids.append(str(ds.StudyInstanceUID))
    return uids


def _finished(settings: Any, n_studies: int, per_study: int = 3) -> list[Any]:
    def done() -> list[Any] | None:
        rows = _rows(settings)
        ok = len(rows) == n_studies * per_study and all(r.state in TERMINAL for r in rows)
        return rows if ok else None
    return wait_until(done, 60, what="every delivery in a terminal state")


def _by_kind(rows: list[Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r.kind, set()).add(r.state)
    return out


def test_pynetdicom_pacs_without_sr(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pacs = TestPACS(accept={SecondaryCaptureImageStorage: UNCOMPRESSED,
                            GrayscaleSoftcopyPresentationStateStorage: UNCOMPRESSED}).start()
    settings = node_settings(tmp_path / "node", destinations=[pacs.name], quiet=0.2)
    node = start_node(settings, lambda s: FakeAnalyzer())
    try:
        studies = _send_studies(settings, tmp_path, 2)
        rows = _finished(settings, 2)
    finally:
        node.stop()
        pacs.stop()
    assert _by_kind(rows) == {"sr": {"not_accepted"}, "sc": {"sent"}, "gsps": {"sent"}}
    assert {r.last_error for r in rows if r.kind == "sr"} == {
        f"not accepted by {pacs.name}: Comprehensive SR Storage"}
    assert {r.study_uid for r in rows if r.state == "sent"} == set(studies)
    assert sorted(s.sop_instance_uid for s in pacs.stored) == sorted(
        r.sop_instance_uid for r in rows if r.state == "sent")
    # visible in the CLI, by state, with the reason
    data_dir = str(settings.storage.data_dir)
    assert cli_main(["deliveries", "--state", "not_accepted", "--data-dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert out.count("not_accepted") == 2 and "Comprehensive SR Storage" in out


def test_dcmtk_storescp_profile_without_sr(tmp_path: Path) -> None:
    cfg = tmp_path / "storescp.cfg"
    cfg.write_text(PROFILE, encoding="utf-8")
    dest = StoreSCP(tmp_path / "dest", free_port(), extra=["-xf", str(cfg), "NoSR"])
    settings = node_settings(tmp_path / "node", destinations=[dest.destination], quiet=0.2)
    node = start_node(settings, lambda s: FakeAnalyzer())
    try:
        _send_studies(settings, tmp_path, 2)
        rows = _finished(settings, 2)
    finally:
        node.stop()
        dest.stop()
    assert _by_kind(rows) == {"sr": {"not_accepted"}, "sc": {"sent"}, "gsps": {"sent"}}
    assert {r.last_error for r in rows if r.kind == "sr"} == {
        f"not accepted by {dest.destination}: Comprehensive SR Storage"}
    got = sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in dest.files())
    assert got == sorted(r.sop_instance_uid for r in rows if r.state == "sent")


def test_dcmtk_storescp_takes_the_sc_only_as_rle(tmp_path: Path) -> None:
    cfg = tmp_path / "storescp.cfg"
    cfg.write_text(PROFILE, encoding="utf-8")
    dest = StoreSCP(tmp_path / "dest", free_port(), extra=["-xf", str(cfg), "SCAsRLE"])
    settings = node_settings(tmp_path / "node", quiet=0.2, destinations=[{
        "ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port, "outputs": ["sc"],
        "sc_transfer_syntaxes": ["RLELossless", "ExplicitVRLittleEndian"]}])
    node = start_node(settings, lambda s: FakeAnalyzer())
    try:
        _send_studies(settings, tmp_path, 1)
        [row] = _finished(settings, 1, per_study=1)
    finally:
        node.stop()
        dest.stop()
    assert (row.state, row.transfer_syntax) == ("sent", RLELossless)
    [received] = dest.files()
    got = pydicom.dcmread(received)
    assert got.file_meta.TransferSyntaxUID == RLELossless
    [original] = query(settings, select(db.outputs.c.path).where(db.outputs.c.kind == "sc"))
    mine = pydicom.dcmread(settings.storage.data_dir / "spool" / original.path)
    assert got.SOPInstanceUID == mine.SOPInstanceUID
    assert np.array_equal(got.pixel_array, mine.pixel_array)
