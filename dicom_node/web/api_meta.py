"""JSON API: the loaded models (identity, labels, thresholds, bundle metadata) and the
OpenAPI document describing every route."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify
from flask.typing import ResponseReturnValue

from ai.types import ModelIdentity
from dicom_node.web.context import WebContext, web_context
from dicom_node.web.validation import query_params

logger = logging.getLogger(__name__)

bp = Blueprint("api_meta", __name__, url_prefix="/api/v1")
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
_META_KEYS = ("task", "multi_label", "labels", "input", "network", "gradcam_layer", "created",
              "description", "training", "validation_metrics", "weights_sha256")


def _bundle_metadata(directory: Path) -> dict[str, Any] | None:
    """``configs/metadata.json`` read as JSON: no torch import, no model load."""
    try:
        doc = json.loads((directory / "configs" / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def models_info(ctx: WebContext) -> dict[str, Any]:
    node = ctx.node
    analyzer = getattr(node, "analyzer", None)
    metas: dict[str, tuple[Path, dict[str, Any]]] = {}
    for directory in ctx.settings.bundle_dirs:
        doc = _bundle_metadata(directory)
        if doc is not None:
            metas[str(doc.get("device_uid", ""))] = (directory, doc)
    items: list[dict[str, Any]] = []
    if analyzer is not None:
        for m in analyzer.models:
            item = {"name": m.name, "version": m.version, "device_uid": m.device_uid,
                    "task": m.task, "manufacturer": m.manufacturer, "demo": m.demo,
                    "display_name": m.display_name, "loaded": True, "bundle_dir": None}
            found = metas.get(m.device_uid)
            if found:
                item["bundle_dir"] = str(found[0])
                item.update({k: found[1].get(k) for k in _META_KEYS})
            items.append(item)
    else:
        for device_uid, (directory, doc) in metas.items():
            identity = ModelIdentity(name=str(doc.get("name")), version=str(doc.get("version")),
                                     device_uid=device_uid, task=str(doc.get("task", "")),
                                     demo=bool(doc.get("demo")))
            items.append({"name": doc.get("name"), "version": doc.get("version"),
                          "device_uid": device_uid, "manufacturer": doc.get("manufacturer"),
                          "demo": identity.demo, "display_name": identity.display_name,
                          "loaded": False, "bundle_dir": str(directory),
                          **{k: doc.get(k) for k in _META_KEYS}})
    for item in items:  # the gate, or an explicit "none": the user must know which is which
        ood = metas.get(str(item["device_uid"]), (None, {}))[1].get("ood") or {}
        item["ood_gate"] = ({"threshold": ood.get("threshold"), "quantile": ood.get("quantile"),
                             "fitted_on": ood.get("fitted_on")} if ood else None)
        item["ood_gate_text"] = (f"out-of-distribution gate: threshold {ood.get('threshold'):.2f}"
                                 if ood else "no out-of-distribution gate: every image is "
                                 "answered, however unlike the training data")
    return {"loaded": analyzer is not None,
            "error": getattr(node, "model_error", None) if node is not None else None,
            "items": items}


def display_names(ctx: WebContext) -> dict[str, str]:
    """Device UID -> the name the SR gives the model ("name version", plus "(DEMO, not for
    clinical use)" for a demo bundle), for every model loaded or found in a bundle folder."""
    return {str(m["device_uid"]): str(m["display_name"]) for m in models_info(ctx)["items"]
            if m.get("device_uid")}


@bp.get("/models")
@query_params()
def models() -> ResponseReturnValue:
    return jsonify(models_info(web_context()))


@bp.get("/openapi.yaml")
@query_params()
def openapi() -> ResponseReturnValue:
    return Response(OPENAPI_PATH.read_text(encoding="utf-8"), mimetype="application/yaml")
