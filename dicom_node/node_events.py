"""Audit events of the node's life: configuration loaded, node started, node stopped.

The configuration is summarised without secrets (no token, no database credentials), with
a fingerprint of the whole settings so an auditor sees when anything changed.
"""

from __future__ import annotations

import hashlib
import json
import os

from sqlalchemy import Engine

from dicom_node.audit import AuditKind, Outcome, record_now
from dicom_node.config import Settings

_SECRETS = ("token",)


def _public(value: object) -> object:
    if isinstance(value, dict):
        return {k: ("<set>" if k in _SECRETS and v else _public(v)) for k, v in value.items()
                if k != "database"}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def settings_fingerprint(settings: Settings) -> str:
    """sha256 of the settings without secrets (changes whenever the configuration does)."""
    public = _public(settings.model_dump(mode="json"))
    text = json.dumps([public, settings.database_url.split(":", 1)[0]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_summary(settings: Settings) -> str:
    d, w, r = settings.dicom, settings.web, settings.storage.retention
    syslog = settings.audit.syslog
    dests = ", ".join(f"{x.name}[{','.join(x.outputs)}]"
                      f"{' commitment' if x.storage_commitment else ''}"
                      for x in settings.destinations) or "none"
    parts = [
        f"dicom {d.ae_title}@{d.host}:{d.port} tls {'on' if d.tls.enabled else 'off'}, "
        f"calling AEs {len(d.allowed_calling_aes) or 'any'}",
        f"web {f'{w.host}:{w.port}' if w.enabled else 'off'}, token "
        f"{'configured' if w.token else 'file'}",
        f"destinations {dests}",
        f"models {len(settings.models.bundles) or 'demo'}, workers {settings.workers.count}",
        f"retention {'off' if not r.enabled else f'{r.max_age_days} d / {r.max_disk_used_pct} %'}",
        f"syslog {f'{syslog.protocol} {syslog.host}:{syslog.port}' if syslog.enabled else 'off'}",
        f"database {settings.database_url.split(':', 1)[0]}",
        f"settings {settings_fingerprint(settings)}",
    ]
    return "; ".join(parts)


def record_started(engine: Engine, settings: Settings, node_id: str) -> None:
    record_now(engine, AuditKind.CONFIG_LOADED, Outcome.SUCCESS, actor="node",
               subject=node_id, detail=settings_summary(settings))
    record_now(engine, AuditKind.NODE_STARTED, Outcome.SUCCESS, actor="node",
               subject=node_id, detail=f"pid {os.getpid()}")


def record_stopped(engine: Engine, node_id: str) -> None:
    record_now(engine, AuditKind.NODE_STOPPED, Outcome.SUCCESS, actor="node",
               subject=node_id, detail=f"pid {os.getpid()}")
