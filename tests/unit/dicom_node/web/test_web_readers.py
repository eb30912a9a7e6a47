"""The web server reads without SQLite's write lock: every GET route (API, dashboard, health,
metrics, images, plots) begins only read-only transactions (``db.reading``), so a page, a
Prometheus scrape or a load balancer's ``/readyz`` never holds the lock the instance rows'
writer needs (before, each took it for as long as its queries ran: with the worker busy and
the pages polled 5 times a second, the writer's BEGIN waited up to 54 ms at p99 against 4 ms
without them). A real SQLite file with the web tests' data; the writes of a POST still take
the lock."""

from __future__ import annotations

import re

from helpers.counting import record_begins
from webdata import WebEnv

pytest_plugins = ["webfixtures"]

ARGUMENT_VALUES = {"job_id": "1", "run_id": "1", "study_key": "1", "instance_id": "1",
                   "output_id": "1", "label": "nodule"}


def _get_urls(env: WebEnv) -> list[str]:
    values = {**ARGUMENT_VALUES, "study_uid": env.data.done}
    urls = []
    for rule in env.app.url_map.iter_rules():
        if "GET" not in rule.methods or rule.endpoint == "static":
            continue
        assert set(rule.arguments) <= set(values), f"no value for {rule.rule}: add one"
        urls.append(re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: values[m.group(1)],
                           rule.rule))
    return urls


def test_every_get_route_begins_only_read_only_transactions(ready_env: WebEnv) -> None:
    urls = _get_urls(ready_env)
    assert len(urls) >= 25  # the API, the dashboard, health, metrics, images and plots
    begins, stop = record_begins(ready_env.engine)
    try:
        statuses = {}
        for url in urls:
            before = len(begins)
            statuses[url] = ready_env.get(url).status_code
            assert all(read_only for _, read_only in begins[before:]), \
                f"GET {url} began a transaction that takes the write lock"
    finally:
        stop()
    assert all(code < 500 for code in statuses.values()), statuses
    # the routes did read the database: the study, the job and the dashboard pages
    assert statuses[f"/api/v1/studies/{ready_env.data.done}"] == 200
    assert statuses["/dashboard/"] == 200
    assert len(begins) >= len(urls) // 2


def test_a_post_still_writes_under_the_lock(ready_env: WebEnv) -> None:
    begins, stop = record_begins(ready_env.engine)
    try:
        resp = ready_env.post(f"/api/v1/deliveries/{ready_env.data.dead_delivery}/resubmit")
    finally:
        stop()
    assert resp.status_code == 200, resp.get_json()
    assert any(not read_only for _, read_only in begins)
