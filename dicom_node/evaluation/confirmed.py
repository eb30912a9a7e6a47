"""Ground truth confirmed after the node analysed a study, and the live-traffic cases.

Confirmed labels arrive keyed by Study or SOP Instance UID, from the API
(:meth:`EvaluationService.post_confirmed_labels`) or as CSV files dropped into
``evaluation.confirmed_watch_dir``: a ``study_instance_uid`` or ``sop_instance_uid`` column,
then one 0/1 column per label (empty = not stated). A processed file moves to
``processed/``; a bad one to ``failed/`` next to a ``.reason.txt``. Nothing is dropped
silently: a file that fails for a reason of ours (database down) stays for the next poll.

A 'confirmed' run pairs these labels with the findings the node stored for the same
images over a rolling window (by analysis time). A study-level label is compared with the
study-level call: positive if any image's finding is positive, probability = the maximum.
"""

from __future__ import annotations

import csv
import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, and_, func, insert, select, update

from ai.uids import is_valid_uid
from dicom_node.evaluation.errors import ConfirmedLabelError
from dicom_node.evaluation.figures import Case, study_cases
from dicom_node.store import db
from dicom_node.store.states import JobState

logger = logging.getLogger(__name__)

KeyKind = Literal["study", "sop"]
KEY_COLUMNS: dict[str, KeyKind] = {"sop_instance_uid": "sop", "study_instance_uid": "study"}
IGNORED_COLUMNS = frozenset({"path", "patient_id", "view", "comment"})  # training's CSV extras
_LABEL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_ .-]{0,63}$")
_SOURCE_RE = re.compile(r"^[a-z0-9_-]{1,16}$")


@dataclass(frozen=True)
class ConfirmedLabel:
    key_kind: KeyKind
    key_uid: str
    label: str
    value: int


def validate_labels(key_kind: str, key_uid: str, labels: Mapping[str, Any]
                    ) -> list[ConfirmedLabel]:
    """Check one key and its labels; errors name the bad argument and value."""
    if key_kind not in ("study", "sop"):
        raise ConfirmedLabelError(f'key_kind "{key_kind}" must be "study" or "sop"')
    if not is_valid_uid(key_uid, "lenient"):  # typed in from a real archive
        raise ConfirmedLabelError(f"key_uid {key_uid!r} is not a DICOM UID")
    if not labels:
        raise ConfirmedLabelError("labels must name at least one label")
    out = []
    for label, value in labels.items():
        if not isinstance(label, str) or not _LABEL_RE.match(label):
            raise ConfirmedLabelError(f"label name {label!r} must be 1-64 letters, digits, "
                                      "space, '_', '.' or '-'")
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int) or value not in (0, 1):
            raise ConfirmedLabelError(f"label {label!r}: value {value!r} must be 0 or 1")
        out.append(ConfirmedLabel(key_kind, key_uid, label, value))  # type: ignore[arg-type]
    return out


def store_confirmed(engine: Engine, items: Iterable[ConfirmedLabel], source: str,
                    now: float | None = None) -> int:
    """Insert or replace (same key and label) in one transaction; returns the row count."""
    if not _SOURCE_RE.match(source):
        raise ConfirmedLabelError(f"source {source!r} must be 1-16 of a-z, 0-9, '_', '-'")
    now = time.time() if now is None else now
    t = db.confirmed_labels
    n = 0
    with engine.begin() as conn:
        for item in items:
            values = {"value": item.value, "source": source, "received_at": now}
            done = conn.execute(update(t).where(t.c.key_kind == item.key_kind,
                                                t.c.key_uid == item.key_uid,
                                                t.c.label == item.label).values(**values))
            if done.rowcount == 0:
                conn.execute(insert(t).values(key_kind=item.key_kind, key_uid=item.key_uid,
                                              label=item.label, **values))
            n += 1
    return n


def read_confirmed_csv(path: Path) -> list[ConfirmedLabel]:
    """Parse a dropped CSV; raises :class:`ConfirmedLabelError` naming line and column."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [(c or "").strip() for c in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()
                     if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfirmedLabelError(f"not a readable UTF-8 CSV: {exc}") from exc
    key_cols = [c for c in columns if c in KEY_COLUMNS]
    if not key_cols:
        raise ConfirmedLabelError("needs a study_instance_uid or sop_instance_uid column "
                                  f"(columns: {', '.join(columns) or 'none'})")
    key_col = "sop_instance_uid" if "sop_instance_uid" in key_cols else key_cols[0]
    label_cols = [c for c in columns if c not in KEY_COLUMNS and c not in IGNORED_COLUMNS]
    if not label_cols:
        raise ConfirmedLabelError("has no label columns")
    out: list[ConfirmedLabel] = []
    for line, row in enumerate(rows, start=2):
        values: dict[str, int] = {}
        for col in label_cols:
            raw = row.get(col, "")
            if raw == "":
                continue
            if raw not in ("0", "1"):
                raise ConfirmedLabelError(f"line {line}, column {col!r}: value "
                                          f"{raw[:16]!r} must be 0, 1 or empty")
            values[col] = int(raw)
        if not values:
            continue
        try:
            out.extend(validate_labels(KEY_COLUMNS[key_col], row.get(key_col, ""), values))
        except ConfirmedLabelError as exc:
            raise ConfirmedLabelError(f"line {line}: {exc}") from exc
    if not out:
        raise ConfirmedLabelError("has no labelled rows")
    return out


@dataclass(frozen=True)
class DropOutcome:
    """What happened to one dropped file (``processed`` or ``failed``)."""

    name: str
    state: str
    rows: int = 0
    reason: str | None = None


def _move(path: Path, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = folder / f"{stamp}_{path.name}"
    n = 1
    while target.exists():
        target = folder / f"{stamp}_{n}_{path.name}"
        n += 1
    path.rename(target)
    return target


def process_drop_folder(engine: Engine, folder: Path, settle_s: float = 2.0,
                        now: float | None = None) -> list[DropOutcome]:
    """Import every settled CSV in ``folder``; move each to processed/ or failed/."""
    now = time.time() if now is None else now
    if not folder.is_dir():
        return []
    outcomes = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.name.startswith(".") or path.stat().st_mtime > now - settle_s:
            continue  # editors' temp files, and files perhaps still being written
        try:
            if path.suffix.lower() != ".csv":
                raise ConfirmedLabelError("only .csv files are read from the drop folder")
            rows = store_confirmed(engine, read_confirmed_csv(path), "csv", now)
        except ConfirmedLabelError as exc:
            target = _move(path, folder / "failed")
            target.with_name(target.name + ".reason.txt").write_text(
                f"{exc}\n", encoding="utf-8")
            logger.warning("confirmed labels file %s failed: %s (moved to failed/)",
                           path.name, exc)
            outcomes.append(DropOutcome(path.name, "failed", reason=str(exc)))
            continue
        _move(path, folder / "processed")
        logger.info("confirmed labels file %s: %d label(s) stored", path.name, rows)
        outcomes.append(DropOutcome(path.name, "processed", rows=rows))
    return outcomes


@dataclass
class ConfirmedOutcome:
    cases: list[Case]
    models: list[dict[str, Any]]
    n_images: int
    summary: dict[str, Any]


def _rows(engine: Engine, cutoff: float, key_kind: str) -> list[Any]:
    f, j, c = db.findings, db.jobs, db.confirmed_labels
    key = j.c.study_uid if key_kind == "study" else f.c.sop_instance_uid
    q = (select(f.c.id, f.c.job_id, j.c.study_uid, f.c.sop_instance_uid, f.c.model_name,
                f.c.model_version, f.c.device_uid, f.c.label, f.c.probability, f.c.threshold,
                f.c.positive, c.c.value)
         .select_from(f.join(j, f.c.job_id == j.c.id).join(
             c, and_(c.c.key_kind == key_kind, c.c.key_uid == key, c.c.label == f.c.label)))
         .where(j.c.state == JobState.DONE, j.c.finished_at >= cutoff))
    with db.reading(engine) as conn:
        return conn.execute(q).all()


def _latest(rows: list[Any]) -> list[Any]:
    """Per image, model and label the finding of the most recent job (re-analysis wins)."""
    best: dict[tuple[str, str, str, str], Any] = {}
    for r in rows:
        k = (r.sop_instance_uid, r.model_name, r.model_version, r.label)
        if k not in best or r.job_id > best[k].job_id:
            best[k] = r
    return list(best.values())


def confirmed_cases(engine: Engine, window_s: float, now: float | None = None,
                    models: set[tuple[str, str]] | None = None) -> ConfirmedOutcome:
    """Cases from the node's stored findings in the window joined with confirmed labels.

    ``models`` restricts to (name, version) pairs; None = every model that produced findings.
    A study-level label takes precedence over image-level labels of the same study and label.
    """
    now = time.time() if now is None else now
    keep = (lambda r: True) if models is None else (
        lambda r: (r.model_name, r.model_version) in models)
    study_rows = [r for r in _latest(_rows(engine, now - window_s, "study")) if keep(r)]
    sop_rows = [r for r in _latest(_rows(engine, now - window_s, "sop")) if keep(r)]
    study_labels = {(r.study_uid, r.label) for r in study_rows}
    sop_rows = [r for r in sop_rows if (r.study_uid, r.label) not in study_labels]

    def case(r: Any, unit: str) -> Case:
        return Case(r.model_name, r.model_version, r.label, unit, int(r.value),
                    float(r.probability), bool(r.positive), float(r.threshold))

    cases = study_cases((r.study_uid, case(r, r.sop_instance_uid)) for r in study_rows)
    cases += [case(r, r.sop_instance_uid) for r in sop_rows]
    used = study_rows + sop_rows
    identities: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for r in used:
        identities[(r.model_name, r.model_version, r.device_uid)][r.label] = float(r.threshold)
    with db.reading(engine) as conn:
        total = conn.execute(select(func.count()).select_from(db.confirmed_labels)).scalar_one()
    summary = {"unit": "study/image", "window_days": window_s / 86400.0,
               "studies": len({r.study_uid for r in study_rows}),
               "images_sop_keyed": len({r.sop_instance_uid for r in sop_rows}),
               "cases": len(cases), "confirmed_labels_stored": int(total)}
    if not cases:
        summary["note"] = "no confirmed case among the studies analysed in the window"
    models_json = [{"name": n, "version": v, "device_uid": d, "thresholds": dict(sorted(t.items()))}
                   for (n, v, d), t in sorted(identities.items())]
    return ConfirmedOutcome(cases, models_json, len({r.sop_instance_uid for r in used}), summary)
