"""Disk use of the spool in /readyz (not ready above the high watermark, with the reason)
and /metrics; retention's purge count in /metrics; a purged study cannot be re-analysed."""

from __future__ import annotations

import re
import time

from sqlalchemy import update
from webdata import WebEnv

from dicom_node.disk import DiskUsage
from dicom_node.store import db
from dicom_node.web.context import EXTENSION_KEY

pytest_plugins = ["webfixtures"]

GIB = 1024**3


def set_disk(env: WebEnv, used: int, free: int) -> None:
    node = env.app.extensions[EXTENSION_KEY].node
    node.disk_usage = lambda: DiskUsage(total_bytes=used + free, used_bytes=used,
                                        free_bytes=free)


def test_readyz_reports_disk_and_turns_not_ready_above_the_high_watermark(
        ready_env: WebEnv) -> None:
    set_disk(ready_env, used=60 * GIB, free=40 * GIB)
    ok = ready_env.client.get("/readyz")
    assert ok.status_code == 200 and ok.json["checks"]["disk"] == "ok"
    assert ok.json["disk"] == {"total_bytes": 100 * GIB, "used_bytes": 60 * GIB,
                               "free_bytes": 40 * GIB, "used_ratio": 0.6,
                               "high_watermark_pct": 95.0}
    set_disk(ready_env, used=96 * GIB, free=4 * GIB)
    full = ready_env.client.get("/readyz")
    assert full.status_code == 503 and full.json["checks"]["disk"] == "full"
    assert full.json["reason"] == ("spool disk 96.0 % used: instances are refused above "
                                   "storage.high_watermark_pct 95 % until below "
                                   "storage.low_watermark_pct 90 %")
    # the same hysteresis as C-STORE: still refusing between the watermarks ...
    set_disk(ready_env, used=92 * GIB, free=8 * GIB)
    assert ready_env.client.get("/readyz").status_code == 503
    # ... ready again below the low one
    set_disk(ready_env, used=89 * GIB, free=11 * GIB)
    assert ready_env.client.get("/readyz").status_code == 200


def test_readyz_measures_the_real_spool_without_a_node(web_env: WebEnv) -> None:
    body = web_env.client.get("/readyz").json
    assert body["checks"]["disk"] in ("ok", "full")
    assert body["disk"]["total_bytes"] > 0 and body["disk"]["free_bytes"] > 0


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert m, name + labels
    return float(m.group(1))


def test_metrics_show_disk_figures_and_purged_files(ready_env: WebEnv) -> None:
    set_disk(ready_env, used=30 * GIB, free=10 * GIB)
    text = ready_env.get("/metrics").text
    assert "# TYPE cxr_spool_disk_used_bytes gauge" in text
    assert metric(text, "cxr_spool_disk_used_bytes") == 30 * GIB
    assert metric(text, "cxr_spool_disk_free_bytes") == 10 * GIB
    assert metric(text, "cxr_spool_disk_total_bytes") == 40 * GIB
    assert metric(text, "cxr_spool_disk_used_ratio") == 0.75
    assert "# TYPE cxr_retention_purged_total counter" in text
    before = metric(text, "cxr_retention_purged_total", '{kind="instance"}')
    with ready_env.engine.begin() as conn:
        conn.execute(update(db.instances).where(db.instances.c.study_uid
                                                == ready_env.data.done)
                     .values(purged_at=time.time()))
    after = metric(ready_env.get("/metrics").text, "cxr_retention_purged_total",
                   '{kind="instance"}')
    assert after > before


def test_a_purged_study_cannot_be_reanalysed(web_env: WebEnv) -> None:
    with web_env.engine.begin() as conn:
        conn.execute(update(db.instances).where(db.instances.c.study_uid == web_env.data.done)
                     .values(purged_at=time.time()))
    resp = web_env.post(f"/api/v1/studies/{web_env.data.done}/reanalyse")
    assert resp.status_code == 409 and resp.json["error"]["code"] == "purged"
