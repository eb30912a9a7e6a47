"""`dicom-node deliveries` shows every state (default: all but sent and committed) and
`dicom-node resubmit` takes dead and not accepted deliveries back, audited."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.results import ResultBench
from sqlalchemy import update

from dicom_node.cli import main as cli_main
from dicom_node.store import db
from dicom_node.store.states import DeliveryState

DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 11104}


@pytest.fixture
def bench(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CXR_NODE__DATABASE__URL", db_url)  # the CLI's database
    bench = ResultBench(tmp_path, [DEST], db_url=db_url)
    bench.study(seed=1)
    bench.study(seed=2)
    states = ["sent", "committed", "not_accepted", "retrying", "dead", "pending"]
    rows = bench.rows()
    with bench.engine.begin() as conn:
        for row, state in zip(rows, states, strict=False):
            conn.execute(update(db.deliveries).where(db.deliveries.c.id == row.id).values(
                state=state, last_status=0xA700 if state == "retrying" else None,
                last_error="not accepted by PACS@127.0.0.1:11104: Comprehensive SR Storage"
                if state == "not_accepted" else None))
    yield bench
    bench.close()


def _table(capsys, *args: str, data_dir: Path) -> list[list[str]]:  # type: ignore[no-untyped-def]
    assert cli_main(["deliveries", *args, "--data-dir", str(data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:7] == ["id", "destination", "kind", "state", "attempts", "status",
                                    "last_error"]
    return [line.split() for line in lines[1:]]


def test_deliveries_by_state(bench: ResultBench, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    default = {row[3] for row in _table(capsys, data_dir=tmp_path)}
    assert default == {"not_accepted", "retrying", "dead", "pending"}
    assert {row[3] for row in _table(capsys, "--state", "all", data_dir=tmp_path)} == {
        *DeliveryState} - {"sending"}
    for state in DeliveryState:
        rows = _table(capsys, "--state", state, data_dir=tmp_path)
        assert {row[3] for row in rows} <= {state}
    [retrying] = _table(capsys, "--state", "retrying", data_dir=tmp_path)
    assert retrying[5] == "0xA700"
    [refused] = _table(capsys, "--state", "not_accepted", data_dir=tmp_path)
    assert " ".join(refused[6:]).endswith(": Comprehensive SR Storage")
    with pytest.raises(SystemExit) as exc:
        cli_main(["deliveries", "--state", "stuck", "--data-dir", str(tmp_path)])
    assert exc.value.code == 2 and "invalid choice: 'stuck'" in capsys.readouterr().err


def test_resubmit_dead_and_not_accepted(bench: ResultBench, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli_main(["resubmit", "--all", "--data-dir", str(tmp_path)]) == 0
    assert "resubmitted 2 deliveries" in capsys.readouterr().out
    states = [r.state for r in bench.rows()]
    assert states.count("pending") == 3 and "dead" not in states
    events = bench.audit("resubmitted")
    assert [e.actor for e in events] == ["cli", "cli"]
    assert sorted(e.detail.rsplit(" ", 1)[1] for e in events) == ["dead", "not_accepted"]
