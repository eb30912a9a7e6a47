"""PNG thumbnails for the dashboard: the original image (the grey display rendering the
SC overlay starts from) and the SC overlay, addressed by internal ids, cached under
``<data_dir>/thumbs``. Decoding is bounded to two images at a time."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import cv2
import numpy as np
import pydicom
from sqlalchemy import select

from dicom_node.store import db
from dicom_node.web.context import WebContext
from dicom_node.web.errors import ApiError

logger = logging.getLogger(__name__)

THUMB_SIZE = 512


def fit(image: np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
    """Scale so the longer side is ``size`` (never up), keeping the aspect ratio."""
    rows, cols = image.shape[:2]
    scale = min(1.0, size / max(rows, cols))
    if scale >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(cols * scale)), max(1, round(rows * scale))),
                      interpolation=cv2.INTER_AREA)


def encode_png(image: np.ndarray) -> bytes:
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ApiError(422, "image cannot be encoded")
    return bytes(buf)


def _cached(ctx: WebContext, name: str, render: object) -> Path:
    path = ctx.thumbs_dir / name
    if path.exists():
        return path
    with ctx.render_lock:
        if path.exists():
            return path
        try:
            data = render()  # type: ignore[operator]
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - undecodable pixels are a 422, not a crash
            logger.warning("thumbnail %s cannot be rendered: %s", name, type(exc).__name__)
            raise ApiError(422, "this image cannot be rendered") from None
    ctx.thumbs_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.thumbs_dir / f".{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def instance_thumbnail(ctx: WebContext, instance_id: int) -> Path:
    with db.reading(ctx.engine) as conn:
        relpath = conn.execute(select(db.instances.c.path)
                               .where(db.instances.c.id == instance_id)).scalar_one_or_none()
    if relpath is None:
        raise ApiError(404, "instance not found")

    def render() -> bytes:
        from dicom_node.outputs import render_grey  # highdicom: imported on first use

        return encode_png(fit(render_grey(pydicom.dcmread(ctx.spool.path(relpath)))))

    return _cached(ctx, f"instance-{instance_id}-{THUMB_SIZE}.png", render)


def output_thumbnail(ctx: WebContext, output_id: int) -> Path:
    with db.reading(ctx.engine) as conn:
        row = conn.execute(select(db.outputs.c.kind, db.outputs.c.path)
                           .where(db.outputs.c.id == output_id)).first()
    if row is None or row.kind != "sc":
        raise ApiError(404, "no secondary-capture overlay with this id")
    source = ctx.spool.path(row.path)
    try:
        stamp = source.stat().st_mtime_ns  # a re-run rewrites the file under the same UID
    except OSError:
        raise ApiError(404, "overlay file is missing") from None

    def render() -> bytes:
        pixels = pydicom.dcmread(source).pixel_array
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        return encode_png(fit(np.ascontiguousarray(pixels.astype(np.uint8))))

    return _cached(ctx, f"output-{output_id}-{stamp}-{THUMB_SIZE}.png", render)


def sc_sources(ctx: WebContext, outputs: list[dict[str, object]]) -> dict[int, str]:
    """SC output id -> the SOP Instance UID of the image it overlays."""
    out: dict[int, str] = {}
    with db.reading(ctx.engine) as conn:
        ids = [int(o["id"]) for o in outputs if o["kind"] == "sc"]  # type: ignore[call-overload]
        rows = conn.execute(select(db.outputs.c.id, db.outputs.c.path)
                            .where(db.outputs.c.id.in_(ids))).all() if ids else []
    for r in rows:
        try:
            ds = pydicom.dcmread(ctx.spool.path(r.path), stop_before_pixels=True,
                                 specific_tags=["SourceImageSequence"])
            out[r.id] = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
        except Exception as exc:  # noqa: BLE001 - an unreadable SC shows without its pair
            logger.debug("SC %d source unknown: %s", r.id, type(exc).__name__)
    return out
