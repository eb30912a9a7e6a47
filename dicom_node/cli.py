"""``dicom-node``: serve, inspect and operate the node.

Errors end as a one-line message on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dicom_node import logs
from dicom_node.config import ConfigError, Destination, Settings, load_settings
from dicom_node.errors import NodeError
from dicom_node.roles import ALL, ROLES, parse_roles
from dicom_node.store import db
from dicom_node.store.states import DeliveryState

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("config/node.yaml")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="YAML settings file (default: config/node.yaml when present)")
    p.add_argument("--data-dir", type=Path, help="override storage.data_dir")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _roles(text: str) -> frozenset[str]:
    try:
        return parse_roles(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node", description="Chest X-ray AI DICOM node: receives CR/DX images, "
        "returns SR, secondary-capture overlay and GSPS into the same study.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the node (DICOM listener, workers, sender, web)")
    _add_common(p)
    p.add_argument("--port", type=int, help="override dicom.port")
    p.add_argument("--ae-title", help="override dicom.ae_title")
    p.add_argument("--host", help="override dicom.host (bind address)")
    p.add_argument("--destination", action="append", default=[], metavar="AE@HOST:PORT",
                   help="add a destination for results (repeatable)")
    p.add_argument("--web-port", type=int, help="override web.port")
    p.add_argument("--role", type=_roles, default=ALL, metavar="ROLES",
                   help="what this process runs: all (default) or a comma list of "
                   f"{', '.join(ROLES)} (e.g. receiver,web); every role shares the database "
                   "and storage.data_dir (the spool)")

    p = sub.add_parser("check-config", help="validate the configuration and print it")
    _add_common(p)

    p = sub.add_parser("status", help="counts of instances, studies, jobs and deliveries")
    _add_common(p)

    p = sub.add_parser("studies", help="list studies with their state")
    _add_common(p)
    p.add_argument("--state", help="only studies in this state")
    p.add_argument("--limit", type=int, default=50)

    p = sub.add_parser("results", help="per analysed study: the findings (label, probability, "
                       "positive, model) and the result objects (SR, SC, GSPS) with their "
                       "deliveries")
    _add_common(p)
    p.add_argument("--study", help="only this Study Instance UID")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the N most recently analysed studies")
    p.add_argument("--json", action="store_true",
                   help="one JSON document for scripts (schema: README, dicom_node/results.py)")

    p = sub.add_parser("export", help="copy result objects into a folder")
    _add_common(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--study", help="only this Study Instance UID")

    p = sub.add_parser("deliveries", help="list deliveries (default: those not delivered "
                       "yet, i.e. all but sent and committed)")
    _add_common(p)
    p.add_argument("--state", default=None, choices=[*DeliveryState, "all"],
                   help="only deliveries in this state (all: every delivery)")

    p = sub.add_parser("resubmit", help="put dead and not accepted deliveries back in the "
                       "queue (same objects, same UIDs)")
    _add_common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--all", action="store_true", help="every dead or not accepted delivery")
    g.add_argument("--id", type=int, action="append", help="a delivery id (repeatable)")
    p.add_argument("--destination", help="only deliveries to AE@HOST:PORT")

    p = sub.add_parser("evaluate", help="run an evaluation job now and print its table, or "
                       "list the jobs (exit 1: run failed, 3: job already running)")
    _add_common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--now", metavar="JOB", help="run evaluation job JOB once, synchronously")
    g.add_argument("--list", action="store_true", help="configured jobs and their last runs")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    config = args.config
    if config is None and DEFAULT_CONFIG.exists():
        config = DEFAULT_CONFIG
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["storage.data_dir"] = str(args.data_dir)
    if getattr(args, "log_level", None):
        overrides["logging.level"] = args.log_level
    for key, attr in (("dicom.port", "port"), ("dicom.ae_title", "ae_title"),
                      ("dicom.host", "host"), ("web.port", "web_port")):
        if getattr(args, attr, None) is not None:
            overrides[key] = getattr(args, attr)
    settings = load_settings(config, overrides=overrides)
    extra = [Destination.parse(d) for d in getattr(args, "destination", []) or []]
    if extra:
        settings = settings.model_copy(update={"destinations": [*settings.destinations, *extra]})
    return settings


def _rows(settings: Settings, query: Any) -> list[Any]:
    engine = db.make_engine(settings.database_url)
    try:
        with db.reading(engine) as conn:
            return conn.execute(query).all()
    finally:
        engine.dispose()


def _print_table(rows: list[Any], columns: list[str], indent: str = "") -> None:
    cells = [columns, *([_fmt(getattr(r, c)) for c in columns] for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print((indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
              .rstrip())


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value > 1e9:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return "" if value is None else str(value)


def cmd_serve(settings: Settings, roles: frozenset[str] = ALL) -> int:
    from dicom_node.service import Node, run_forever

    node = Node(settings, roles=roles)
    run_forever(node)
    return node.exit_status


def cmd_status(settings: Settings) -> int:
    out: dict[str, dict[str, int]] = {}
    for name, table in (("studies", db.studies), ("jobs", db.jobs),
                        ("deliveries", db.deliveries)):
        rows = _rows(settings, select(table.c.state, func.count()).group_by(table.c.state))
        out[name] = {r[0]: r[1] for r in rows}
    rows = _rows(settings, select(db.instances.c.analysis_state, func.count())
                 .group_by(db.instances.c.analysis_state))
    out["instances"] = {r[0]: r[1] for r in rows}
    out["quarantine"] = {"count": _rows(settings, select(func.count())
                                        .select_from(db.quarantine))[0][0]}
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def cmd_studies(settings: Settings, args: argparse.Namespace) -> int:
    q = select(db.studies).order_by(db.studies.c.last_received_at.desc()).limit(args.limit)
    if args.state:
        q = q.where(db.studies.c.state == args.state)
    _print_table(_rows(settings, q), ["study_uid", "state", "reason", "last_received_at"])
    return 0


def _results_query(study: str | None) -> Any:
    q = select(db.outputs).order_by(db.outputs.c.id)
    return q.where(db.outputs.c.study_uid == study) if study else q


def cmd_results(settings: Settings, args: argparse.Namespace) -> int:
    from dicom_node.results import demo_flags, results_document

    if args.limit is not None and args.limit < 1:
        raise NodeError(f"--limit must be at least 1, got {args.limit}")
    engine = db.make_engine(settings.database_url)
    try:
        with db.reading(engine) as conn:
            doc = results_document(conn, study=args.study, limit=args.limit,
                                   demo=demo_flags(settings.bundle_dirs))
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(doc, indent=2))
    elif not doc["studies"]:
        print("no analysed study" + (f" {args.study}" if args.study else " yet"))
    for study in [] if args.json else doc["studies"]:
        _print_study(study)
    return 0


def _print_study(study: dict[str, Any]) -> None:
    """One study as the dashboard shows it: findings per image, then the result objects."""
    ns = argparse.Namespace
    print(f"study {study['study_uid']}  {study['state']}, result v{study['version']} "
          f"(job {study['job_id']}) analysed {study['analysed_at']}: {study['images']} "
          f"image(s), {study['positive']} positive finding(s)")
    findings = [ns(image=f["sop_instance_uid"], label=f["label"],
                  probability=f"{f['probability']:.3f}", threshold=f"{f['threshold']:.3f}",
                  positive="yes" if f["positive"] else "no",
                  box="" if f["box"] is None else ",".join(f"{v:.0f}" for v in f["box"]),
                  model=f["model"]["display_name"]) for f in study["findings"]]
    _print_table(findings, ["image", "label", "probability", "threshold", "positive", "box",
                            "model"], indent="  ")
    for v in study.get("ood", []):
        if v["out_of_distribution"]:
            print(f"  image {v['sop_instance_uid']}: OUT OF DISTRIBUTION for "
                  f"{v['model']['display_name']} (score {v['score']:.2f} > threshold "
                  f"{v['threshold']:.2f}): findings withheld")
    objects = [ns(id=r["id"], kind=r["kind"], sop_instance_uid=r["sop_instance_uid"],
                 created_at=r["created_at"],
                 version="superseded" if r["superseded"] else "current",
                 deliveries=", ".join(f"{d['destination']} {d['state']}"
                                      for d in r["deliveries"]) or "-")
               for r in study["results"]]
    _print_table(objects, ["id", "kind", "sop_instance_uid", "version", "created_at",
                           "deliveries"], indent="  ")
    print()


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    rows = _rows(settings, _results_query(args.study))
    args.out.mkdir(parents=True, exist_ok=True)
    spool_root = settings.storage.data_dir / "spool"
    for r in rows:
        shutil.copyfile(spool_root / r.path, args.out / f"{r.kind}_{r.sop_instance_uid}.dcm")
    print(f"exported {len(rows)} result object(s) to {args.out}")
    return 0


def cmd_deliveries(settings: Settings, args: argparse.Namespace) -> int:
    d, o = db.deliveries.c, db.outputs.c
    q = (select(db.deliveries, o.kind).join(db.outputs, o.id == d.output_id).order_by(d.id))
    if args.state is None:
        q = q.where(d.state.not_in((DeliveryState.SENT, DeliveryState.COMMITTED)))
    elif args.state != "all":
        q = q.where(d.state == args.state)
    rows = [{**r._mapping, "status": "" if r.last_status is None else f"0x{r.last_status:04X}"}
            for r in _rows(settings, q)]
    _print_table([argparse.Namespace(**r) for r in rows],
                 ["id", "destination", "kind", "state", "attempts", "status", "last_error"])
    return 0


def cmd_resubmit(settings: Settings, args: argparse.Namespace) -> int:
    from dicom_node.sender import resubmit

    engine = db.make_engine(settings.database_url)
    try:
        n = resubmit(engine, delivery_ids=None if args.all else args.id,
                     destination=args.destination, actor="cli")
    finally:
        engine.dispose()
    print(f"resubmitted {n} deliver{'y' if n == 1 else 'ies'} (dead or not accepted)")
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from dicom_node.evaluation.commands import evaluate_command

    return evaluate_command(settings, job_name=args.now, list_jobs=args.list)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        with logs.logging_configured(settings.logging.level):
            return _run(settings, args)
    except (NodeError, ConfigError, OSError) as exc:
        print(f"dicom-node: error: {exc}", file=sys.stderr)
        return 2


def _run(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "serve":
        return cmd_serve(settings, args.role)
    if args.command == "check-config":
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "status":
        return cmd_status(settings)
    handlers = {"studies": cmd_studies, "results": cmd_results, "export": cmd_export,
                "deliveries": cmd_deliveries, "resubmit": cmd_resubmit,
                "evaluate": cmd_evaluate}
    return handlers[args.command](settings, args)


if __name__ == "__main__":
    sys.exit(main())
