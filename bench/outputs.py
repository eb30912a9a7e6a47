"""Build + write + send cost of each result object (SR, SC, GSPS, SEG) on a 3000 x 2500 phantom, the
way the node made them before issue 11 against the way it makes them now, same run.

"old": float heatmap blend with a boolean gather/scatter, highdicom given the full source
datasets (pixel data included: it deep-copies them), the SC written uncompressed, and the
sender parsing the whole file (``dcmread``) before sending it. "new": uint8 OpenCV blend, slim
reference datasets, the SC in ``outputs.sc_transfer_syntax`` (default: the fastest installed
lossless encoder), the sender streaming the file (``dicom_node.sender.streamed``). Send = one
C-STORE to a DCMTK ``storescp`` on loopback (accepting every syntax), the file read included.
"new, SC uncompressed": the same with ``outputs.sc_transfer_syntax: ExplicitVRLittleEndian``
(what the compression costs in CPU against what it saves in bytes). Write = ``dcmwrite`` +
write + fsync, as the spool does. Ratios are old / new (above 1: faster now). One warm-up
round is not counted (first-use imports and caches).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common as c

KINDS = ("sr", "sc", "gsps", "seg")
VARIANTS = ("old", "new", "new_uncompressed")


def _float_blend(rgb: Any, heat: Any, alpha: float) -> None:
    """The blend before issue 11 (float RGB over the masked pixels), the old column's."""
    import cv2
    import numpy as np

    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0), 0.0, 1.0)
    mask = heat > 0.2
    jet = cv2.applyColorMap((heat[mask] * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    base = rgb[mask].astype(np.float32) * (1.0 - alpha)
    rgb[mask] = np.clip(base + jet.reshape(-1, 3)[:, ::-1] * alpha + 0.5, 0, 255).astype(np.uint8)


@contextlib.contextmanager
def _old_blend() -> Iterator[None]:
    from dicom_node.outputs import render

    new = render.blend_heatmap
    render.blend_heatmap = _float_blend
    try:
        yield
    finally:
        render.blend_heatmap = new


def _phantom(rows: int, columns: int) -> tuple[Any, Any]:
    """A synthetic DX and a result with a box and a source-resolution heatmap, its display
    image kept as the analyzer keeps it."""
    import numpy as np
    import pydicom

    from ai.types import BoundingBox, CodedConcept, Finding, ImageResult, ModelIdentity
    from dicom_node.outputs import render_grey

    path = c.synth_file(c.WORK / "outputs" / f"dx-{rows}x{columns}.dcm", "dx_mono2_explicit",
                        seed=11, rows=rows, columns=columns)
    ds = pydicom.dcmread(path)
    model = ModelIdentity("bench detector", "1.0", "2.25.4711", "detection")
    box = BoundingBox(columns * 0.2, rows * 0.3, columns * 0.5, rows * 0.6)
    finding = Finding("Nodule", CodedConcept("27925004", "SCT", "Nodule"), 0.9, 0.5, True,
                      model, box)
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    heat = np.exp(-((x - columns * 0.35) ** 2 + (y - rows * 0.45) ** 2) / (2 * (rows / 8) ** 2))
    result = ImageResult(str(ds.SOPInstanceUID), rows, columns, findings=[finding],
                         heatmap=heat.astype(np.float32), models=[model],
                         display=render_grey(ds),
                         finding_heatmaps={(model.device_uid, "Nodule"): heat})
    return ds, result


def _write(dataset: Any, path: Path) -> int:
    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, dataset, enforce_file_format=True)
    data = buf.getvalue()
    with path.open("wb") as fp:
        fp.write(data)
        fp.flush()
        os.fsync(fp.fileno())
    return len(data)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return (time.perf_counter() - start) * 1000.0, value


def _association(port: int) -> Any:
    import socket

    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        ComprehensiveSRStorage,
        GrayscaleSoftcopyPresentationStateStorage,
        SecondaryCaptureImageStorage,
        SegmentationStorage,
    )

    ae = AE("CXR_AI")
    for sop in (ComprehensiveSRStorage, SecondaryCaptureImageStorage, SegmentationStorage,
                GrayscaleSoftcopyPresentationStateStorage):
        for syntax in (ExplicitVRLittleEndian, JPEGLSLossless, RLELossless):
            ae.add_requested_context(sop, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="DEST")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def _send(assoc: Any, path: Path, old: bool) -> None:
    import pydicom

    from dicom_node.sender import streamed

    if old:
        status = assoc.send_c_store(pydicom.dcmread(path))
    else:
        with streamed():
            status = assoc.send_c_store(path)
    if not status or status.Status != 0:
        raise RuntimeError(f"storescp refused {path.name}: {status}")


def run_variant(ds: Any, result: Any, variant: str, out: Path, port: int
                ) -> dict[str, dict[str, float]]:
    """ms of build, write and send, and the file size, per kind."""
    from pydicom.uid import ExplicitVRLittleEndian

    from dicom_node.outputs import OutputSettings
    from dicom_node.outputs.common import prepare_sources
    from dicom_node.outputs.gsps import build_gsps
    from dicom_node.outputs.heatmap import build_seg
    from dicom_node.outputs.sc import build_sc
    from dicom_node.outputs.sr import build_sr

    builders = {"sr": build_sr, "sc": build_sc, "gsps": build_gsps, "seg": build_seg}
    old = variant == "old"
    syntax = {} if variant == "new" else {"sc_transfer_syntax": ExplicitVRLittleEndian}
    settings = OutputSettings(seg=True, **syntax)
    figures: dict[str, dict[str, float]] = {}
    assoc = _association(port)
    with _old_blend() if old else contextlib.nullcontext():
        for kind in KINDS:
            build_ms, built = _timed(lambda kind=kind: builders[kind](
                prepare_sources([(ds, result)], slim=not old), settings, "bench-seed"))
            obj = built if not isinstance(built, list) else built[0]
            path = out / f"{kind}-{variant}.dcm"
            write_ms, size = _timed(lambda obj=obj, path=path: _write(obj.dataset, path))
            send_ms, _ = _timed(lambda path=path: _send(assoc, path, old))
            figures[kind] = {"build_ms": build_ms, "write_ms": write_ms, "send_ms": send_ms,
                             "bytes": float(size)}
    assoc.release()
    return figures


def main(argv: list[str] | None = None) -> int:
    p = c.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--columns", type=int, default=2500)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    busy = c.busy_warning()
    repeats = 1 if args.quick else args.repeats
    out = c.fresh_dir(c.WORK / "outputs" / "written")
    ds, result = _phantom(args.rows, args.columns)
    runs: dict[str, list[dict[str, dict[str, float]]]] = {v: [] for v in VARIANTS}
    with c.StoreSCP(c.fresh_dir(c.WORK / "outputs" / "dest"), extra=["+xa"]) as scp:
        for variant in VARIANTS:
            run_variant(ds, result, variant, out, scp.port)  # warm-up, not counted
        for _ in range(repeats):  # interleaved, so a busy spell hits every column alike
            for variant in VARIANTS:
                runs[variant].append(run_variant(ds, result, variant, out, scp.port))
    median = {v: {k: {m: c.median([r[k][m] for r in rs]) for m in rs[0][k]} for k in KINDS}
              for v, rs in runs.items()}
    total = {v: {k: sum(median[v][k][m] for m in ("build_ms", "write_ms", "send_ms"))
                 for k in KINDS} for v in VARIANTS}
    rows = []
    for kind in KINDS:
        o, n = median["old"][kind], median["new"][kind]
        t_old, t_new, t_unc = (total[v][kind] for v in VARIANTS)
        rows.append([kind, o["build_ms"], n["build_ms"], o["write_ms"], n["write_ms"],
                     o["send_ms"], n["send_ms"], o["bytes"] / 1e6, n["bytes"] / 1e6,
                     t_old, t_new, t_old / t_new, t_unc, t_old / t_unc])
    sums = {v: sum(total[v].values()) for v in VARIANTS}
    rows.append(["all", "", "", "", "", "", "", "", "", sums["old"], sums["new"],
                 sums["old"] / sums["new"], sums["new_uncompressed"],
                 sums["old"] / sums["new_uncompressed"]])
    c.table(["kind", "build old", "build new", "write old", "write new", "send old",
             "send new", "old MB", "new MB", "old ms", "new ms", "old/new", "new unc. SC ms",
             "old/new unc."], rows,
            title=f"Result objects, {args.rows} x {args.columns} phantom, median of {repeats}")
    c.write_results("outputs", {"rows": args.rows, "columns": args.columns,
                                "repeats": repeats, "machine_busy": busy, "median": median,
                                "runs": runs, "ratio_all": sums["old"] / sums["new"],
                                "ratio_all_uncompressed_sc": sums["old"] / sums["new_uncompressed"]},
                    enabled=not args.no_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
