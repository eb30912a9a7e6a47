"""/api/v1/models: the loaded bundles with their labels, codes and operating thresholds,
read from the bundle metadata (no model load in the web layer)."""

from __future__ import annotations

import json
from pathlib import Path

from webdata import AUTH, StubNode, WebEnv, web_settings

from ai.types import ModelIdentity
from dicom_node.disk import DiskUsage
from dicom_node.web import create_app

pytest_plugins = ["webfixtures"]


def _client(env: WebEnv, bundle: Path, loaded: bool):  # type: ignore[no-untyped-def]
    settings = web_settings(env.settings.storage.data_dir, **{"models.bundles": [str(bundle)]})
    node = StubNode(settings, env.engine)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())

    class _Analyzer:
        models = [ModelIdentity(meta["name"], meta["version"], meta["device_uid"],
                                "classification", demo=True)]

    node.analyzer = _Analyzer() if loaded else None  # type: ignore[assignment]
    return create_app(settings, node, testing=True).test_client(), meta


def test_loaded_models_with_labels_and_thresholds(web_env: WebEnv, tiny_bundle: Path) -> None:
    client, meta = _client(web_env, tiny_bundle, loaded=True)
    body = client.get("/api/v1/models", headers=AUTH).get_json()
    assert body["loaded"] and body["error"] is None
    [model] = body["items"]
    assert model["name"] == "tiny-test-classifier" and model["device_uid"] == meta["device_uid"]
    assert model["loaded"] and model["demo"] and model["bundle_dir"] == str(tiny_bundle)
    assert [(x["name"], x["threshold"]) for x in model["labels"]] == [
        ("nodule", 0.0), ("cardiomegaly", 0.5), ("pneumothorax", 1.0)]
    assert model["labels"][0]["code"] == {"value": "27925004", "scheme": "SCT",
                                          "meaning": "Nodule"}
    assert model["input"]["size"] == 64 and model["network"]["name"] == "densenet"


def test_configured_models_while_loading(web_env: WebEnv, tiny_bundle: Path) -> None:
    client, _ = _client(web_env, tiny_bundle, loaded=False)
    body = client.get("/api/v1/models", headers=AUTH).get_json()
    assert not body["loaded"]
    assert [(m["name"], m["loaded"]) for m in body["items"]] == [("tiny-test-classifier", False)]
    # named as the SR names it, from the bundle's metadata alone
    assert body["items"][0]["display_name"] == (
        f"tiny-test-classifier {body['items'][0]['version']} (DEMO, not for clinical use)")
    assert client.get("/readyz").get_json()["checks"]["model"] == "loading"


def test_readiness_follows_the_node(ready_env: WebEnv) -> None:
    node = ready_env.app.extensions["cxr_node"].node
    node.disk_usage = lambda: DiskUsage(total_bytes=100, used_bytes=50, free_bytes=50)
    ok = ready_env.client.get("/readyz")
    assert ok.status_code == 200 and ok.get_json() == {
        "status": "ready", "checks": {"listener": "up", "model": "loaded", "database": "up",
                                      "disk": "ok"},
        "reason": None, "disk": {"total_bytes": 100, "used_bytes": 50, "free_bytes": 50,
                                 "used_ratio": 0.5, "high_watermark_pct": 95.0}}
    node.analyzer, node.model_error = None, "BundleError: bad weights at /srv/models/x"
    failed = ready_env.client.get("/readyz")
    assert failed.status_code == 503 and failed.get_json()["checks"]["model"] == "failed"
    assert "bad weights" not in failed.text  # details stay in the log
    node.server = None
    assert "listener" in ready_env.client.get("/readyz").get_json()["reason"]
