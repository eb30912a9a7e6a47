"""The header is parsed once per instance: at ingest, from a bounded prefix of the received
file; its selection attributes go on the instance row and assembly applies the rules to the
row without opening the file. Counted here (issue 9's regression guard)."""

from __future__ import annotations

import builtins
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
import test_studies_jobs
from helpers.counting import count_calls
from helpers.dicomfiles import CT, make_image
from sqlalchemy import select, update
from test_ingest import _received

from ai.selection import rejection_reason
from dicom_node import ingest, studies
from dicom_node.config import SelectionSettings
from dicom_node.dicomio import SELECTION_KEYWORDS, load_selection, selection_attributes
from dicom_node.ingest import Ingestor, StoreStatus
from dicom_node.spool import Spool
from dicom_node.store import db

env = test_studies_jobs.env  # the ingest + assembler fixture, shared


def _watch(monkeypatch: pytest.MonkeyPatch, spool_root: Path) -> Counter[str]:
    calls: Counter[str] = Counter()
    count_calls(monkeypatch, calls, ingest, "parse_header", "header parse")
    count_calls(monkeypatch, calls, ingest, "read_file_meta", "file meta read")
    count_calls(monkeypatch, calls, pydicom, "dcmread", "dcmread")
    count_calls(monkeypatch, calls, pydicom.dataset.Dataset, "convert_pixel_data", "pixels")
    count_calls(monkeypatch, calls, pydicom.pixels, "pixel_array", "pixels")
    count_calls(monkeypatch, calls, studies, "read_untrusted", "assembly file read")
    real_open = builtins.open

    def watched_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, Path)) and Path(file).is_relative_to(spool_root / "instances"):
            calls["spool file opened"] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watched_open)
    return calls


def test_cstore_parses_each_header_once_and_assembly_reads_no_file(
        env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    engine, ing, asm = env
    spool = ing.spool
    study = "1.2.3.4.9"
    images = [make_image(study_uid=study, seed=i) for i in range(3)]
    images.append(make_image(study_uid=study, view="LL", seed=7))
    images.append(make_image(study_uid=study, sop_class=CT, modality="CT", seed=8))
    received = [_received(ds) for ds in images]

    calls = _watch(monkeypatch, spool.root)
    for rec in received:
        assert ing.ingest(rec) == StoreStatus.SUCCESS
    assert calls == Counter({"header parse": 5, "file meta read": 5})  # once each, no pixels

    calls.clear()
    with engine.connect() as conn:
        last = conn.execute(select(db.studies.c.last_received_at)).scalar_one()
    [job] = asm.run_once(now=last + 60)
    assert calls == Counter()  # no parse, no dcmread, no spool file opened

    monkeypatch.undo()
    with engine.connect() as conn:
        rows = {r.sop_instance_uid: r for r in conn.execute(select(db.instances))}
    states = {uid: (rows[uid].analysis_state, rows[uid].reason) for uid in rows}
    assert [states[str(ds.SOPInstanceUID)][0] for ds in images] == [
        "selected", "selected", "selected", "ignored", "ignored"]
    assert all(rows[str(ds.SOPInstanceUID)].job_id == job for ds in images[:3])
    assert "view position LL" in (states[str(images[3].SOPInstanceUID)][1] or "")
    assert "not a projection radiograph" in (states[str(images[4].SOPInstanceUID)][1] or "")


def test_row_without_selection_reads_its_file_once(env, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:  # type: ignore[no-untyped-def]
    """A database from before the column (or attributes past the parsed prefix): the file."""
    engine, ing, asm = env
    spool = ing.spool
    ds = make_image(view="LL")
    assert ing.ingest(_received(ds)) == StoreStatus.SUCCESS
    with engine.begin() as conn:
        conn.execute(update(db.instances).values(selection=None))
        last = conn.execute(select(db.studies.c.last_received_at)).scalar_one()
    calls = _watch(monkeypatch, spool.root)
    assert asm.run_once(now=last + 60) == []
    assert calls == Counter({"assembly file read": 1, "dcmread": 1, "spool file opened": 1})
    monkeypatch.undo()
    with engine.connect() as conn:
        row = conn.execute(select(db.instances)).one()
    assert row.analysis_state == "ignored" and "view position LL" in row.reason


def test_stored_attributes_give_the_verdict_the_file_gives(realdicom: Path, tmp_path: Path
                                                           ) -> None:
    """Real headers (CR J2K, NIH SC, a hip): the rules on the stored row agree with the rules
    on the whole file."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    ing = Ingestor(engine, Spool(tmp_path / "spool"), max_instance_bytes=50_000_000)
    rules = SelectionSettings()
    for path in sorted(realdicom.glob("*.dcm")):
        full = pydicom.dcmread(path, stop_before_pixels=True)
        assert ing.ingest(_received(pydicom.dcmread(path))) == StoreStatus.SUCCESS
        with engine.connect() as conn:
            stored = conn.execute(select(db.instances.c.selection).where(
                db.instances.c.sop_instance_uid == str(full.SOPInstanceUID))).scalar_one()
        header = load_selection(stored)
        assert header is not None, path.name
        assert rejection_reason(header, rules) == rejection_reason(full, rules), path.name


def test_the_stored_keywords_are_the_ones_the_rules_read() -> None:
    read: set[str] = set()

    class Recording(dict[str, Any]):
        def get(self, key: str, default: Any = None) -> Any:
            read.add(key)
            return super().get(key, default)

    image = make_image(body_part="")  # no body part: every description is read
    image.NumberOfFrames = 1
    image.ImageType = ["ORIGINAL", "PRIMARY"]
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "399348003", "SCT", "antero-posterior")
    image.ViewCodeSequence = [code]
    for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription",
                    "AcquisitionDeviceProcessingDescription", "RequestedProcedureDescription"):
        setattr(image, keyword, "no anatomy named")
    everything = selection_attributes(image)
    assert everything is not None and set(everything) == set(SELECTION_KEYWORDS)
    rejection_reason(Recording(everything), SelectionSettings())  # type: ignore[arg-type]
    assert read == set(SELECTION_KEYWORDS)


def test_an_older_database_gets_the_column(db_url: str) -> None:
    engine = db.make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE instances DROP COLUMN selection")
    assert db.add_missing_columns(engine) == ["instances.selection"]
    assert db.add_missing_columns(engine) == []
