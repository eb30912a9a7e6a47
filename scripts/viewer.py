"""``make viewer``: look at the node's results the way a radiologist does, in OHIF Viewer v3.

Starts the trio the OHIF test uses: a private Orthanc with the DICOMweb plugin, the node
(``dicom-node serve``, its destination that Orthanc) and OHIF from npm served same-origin
(``scripts/ohif_server.py``); uploads a few phantom studies, waits for the SR, secondary
capture and GSPS, and prints the addresses: the study list and one link per study. The node
runs with ``outputs.seg`` on (whatever the config says), so every image with a positive
finding also gets its Grad-CAM as a binary DICOM Segmentation a person can open in OHIF (it
follows the other results moments later; an image without a positive finding has none, so
the wait does not count it). Runs until Ctrl-C. Other studies sent to Orthanc (REST upload, C-STORE with
``--allow-any-store``) go the same way.

OHIF 3.13.2 shows nothing for an image with VOI LUT Function LINEAR ("Invalid VOI LUT
function", see the README): the phantoms uploaded here leave the attribute out.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import demo  # noqa: E402 - after the path set-up above
import ohif_server  # noqa: E402
import orthanc  # noqa: E402

DEFAULT_VIEWER_PORT = 3000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "config" / "node.yaml")
    p.add_argument("--data-dir", type=Path, default=ROOT / "var" / "viewer",
                   help="node data dir; Orthanc lives in <data-dir>/orthanc")
    p.add_argument("--studies", type=int, default=2, help="phantom studies to upload (0: none)")
    p.add_argument("--seed", type=int, default=None, help="default: new studies each run")
    p.add_argument("--size", type=int, nargs=2, default=(1024, 896), metavar=("ROWS", "COLS"))
    p.add_argument("--port", type=int, default=None,
                   help=f"OHIF's port (default {DEFAULT_VIEWER_PORT} when free)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds to wait for results (the first run trains the demo model)")
    return p.parse_args(argv)


def viewable(files: list[Path]) -> None:
    """Drop VOI LUT Function from the phantoms (OHIF 3.13.2 cannot show LINEAR)."""
    import pydicom

    for path in files:
        ds = pydicom.dcmread(path)
        if "VOILUTFunction" in ds:
            del ds.VOILUTFunction
            ds.save_as(path, enforce_file_format=True)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    for name in ("demo", "orthanc", "ohif"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # Orthanc's start-up retries
    signal.signal(signal.SIGTERM, demo._on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from dicom_node.config import load_settings

    data_dir = args.data_dir.resolve()
    settings = load_settings(args.config, overrides={"storage.data_dir": str(data_dir),
                                                     "outputs.seg": True})
    o = settings.outputs
    expected = 1 + int(o.sr) + int(o.sc) + int(o.gsps)
    node_port = demo.pick_port(settings.dicom.port)
    web_port = None if orthanc.port_is_free(settings.web.port) else orthanc.free_port()
    pacs = orthanc.OrthancServer(data_dir / "orthanc", node_port=node_port,
                                 node_ae=settings.dicom.ae_title,
                                 http_port=demo.pick_port(orthanc.DEFAULT_HTTP_PORT),
                                 dicom_port=demo.pick_port(orthanc.DEFAULT_DICOM_PORT),
                                 dicomweb=True)
    node: demo.NodeProcess | None = None
    viewer: ohif_server.OhifServer | None = None
    try:
        dist = ohif_server.install_ohif()
        env: dict[str, str] = {"CXR_NODE__OUTPUTS__SEG": "true"}  # the heatmap SEG on
        if not settings.models.bundles:
            models = demo.shared_bundle_dir(args.config, None)
            demo.ensure_bundles(models, quick=settings.models.demo_build == "quick")
            env["CXR_NODE__MODELS__DEMO_DIR"] = str(models)
        pacs.start()
        node = demo.NodeProcess(args.config, data_dir, node_port, pacs.destination,
                           data_dir / "node.log", web_port, env=env)
        demo.wait_for_port(node_port, node, 120)
        viewer = ohif_server.OhifServer(
            dist, pacs.http_port, port=args.port or demo.pick_port(DEFAULT_VIEWER_PORT)).start()
        print(f"Orthanc:  {pacs.explorer_url} (DICOM {pacs.destination}, DICOMweb "
              f"{pacs.url}/dicom-web/)\nnode:     {settings.dicom.ae_title}@127.0.0.1:"
              f"{node_port} (destination {pacs.destination}, log {node.log_path})\n"
              f"OHIF:     {viewer.url}/ (study list)", flush=True)
        if args.studies > 0:
            seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
            files = demo.make_studies(data_dir / "phantoms", args.studies, seed, *args.size)
            viewable(files)
            studies = [pacs.upload(f)["ParentStudy"] for f in files]
            demo.wait_for_results(pacs, studies, expected, node, args.timeout, started)
            for study in studies:
                uid = pacs.study(study)["MainDicomTags"]["StudyInstanceUID"]
                print(f"  {viewer.viewer_url(uid)}", flush=True)
        print("Open a study, then the SR \"AI findings SR (CXR AI node)\" in the study "
              "browser (the boxes), or the SEG \"AI heatmap SEG (CXR AI node)\" and answer "
              "Yes to \"Do you want to open this Segmentation?\" (the Grad-CAM). Ctrl-C "
              "stops.", flush=True)
        while True:
            node.check()
            if pacs.proc is None or pacs.proc.poll() is not None:
                raise demo.DemoError(f"Orthanc exited; log: {pacs.log_path}")
            time.sleep(1.0)
    except (KeyboardInterrupt, demo.Stop):
        print("\nStopping.", flush=True)
        return 0
    except (demo.DemoError, orthanc.OrthancError, ohif_server.OhifError, OSError) as exc:
        print(f"viewer: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if viewer is not None:
            viewer.stop()
        if node is not None:
            node.stop()
        pacs.stop()


if __name__ == "__main__":
    sys.exit(main())
