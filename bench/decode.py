"""Decode time of compressed radiographs: every installed decoder, and what the node runs.

QUALITY.md, Performance 5; issue 11 (decode only what the models need). ``training.synth``
phantoms (JPEG Lossless SV1, JPEG-LS lossless, JPEG 2000 lossless, RLE lossless, and an
8-bit JPEG Baseline made from the uncompressed one) at 2048 x 2048 and 3000 x 2500 by
default. Rows per syntax:

- each installed pydicom plugin named explicitly (``pixel_array(decoding_plugin=...)``);
- ``node``: ``ai.pixels.decode_frame``, labelled by the decoder it really runs
  (``ai.decoders.decoder_for``: the node names its plugin, pydicom's order is not used);
- ``node reduce=N``: what the Analyzer runs for a large image, ``1 / 2**N`` of each side:
  for JPEG 2000 the reduced-resolution decode (Pillow's OpenJPEG; levels 1-3), for the
  other syntaxes the full decode and its shrink (``ai.pixels.shrink``); ``*`` marks the
  level the Analyzer picks for the demo pair (inputs 224 and 256 px, ``display_min_side``
  1024).

Peer: the uncompressed Explicit VR phantom of the same size read the same way. One timed
call = parse the Part 10 bytes from memory + decode; median of the repeats, all cases
interleaved so drift hits each alike. Full decodes are compared with the node's (lossless:
max |diff| 0); reduced ones report their decoded size instead.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as c

CODECS = {  # label -> synth variant
    "uncompressed (peer)": "dx_mono2_explicit",
    "JPEG Lossless SV1": "cr_mono1_jpeg_lossless",
    "JPEG-LS lossless": "cr_mono2_jpegls",
    "JPEG 2000 lossless": "dx_mono1_j2k",
    "RLE lossless": "dx_mono2_rle",
}
DEMO_INPUTS = (224, 256)  # the shipped classifier and detector


def _plugin_decoder(plugin: str) -> Callable[[bytes], Any]:
    def run(blob: bytes) -> Any:
        import pydicom
        from pydicom.pixels import pixel_array

        return pixel_array(pydicom.dcmread(io.BytesIO(blob)), index=0, decoding_plugin=plugin)

    return run


def _node_decoder(reduce: int) -> Callable[[bytes], Any]:
    def run(blob: bytes) -> Any:
        import pydicom

        from ai.pixels import decode_frame

        return decode_frame(pydicom.dcmread(io.BytesIO(blob)), reduce=reduce)

    return run


def baseline_file(rows: int, cols: int) -> Path:
    """An 8-bit JPEG Baseline (lossy, quality 90) of the uncompressed phantom: no synth
    variant has this syntax, which DX/CR rarely use but secondary captures do."""
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    path = c.WORK / "decode" / f"jpeg_baseline-{rows}x{cols}.dcm"
    if path.exists():
        return path
    src = c.synth_file(c.WORK / "decode" / f"{CODECS['uncompressed (peer)']}-{rows}x{cols}.dcm",
                       CODECS["uncompressed (peer)"], seed=21, rows=rows, columns=cols)
    ds = pydicom.dcmread(src)
    stored = ds.pixel_array.astype(np.float64)
    grey = np.round(255 * (stored - stored.min()) / max(np.ptp(stored), 1)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG", quality=90)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def parse_size(text: str) -> tuple[int, int]:
    rows, _, cols = text.lower().partition("x")
    return int(rows), int(cols or rows)


def cases(rows: int, cols: int) -> list[dict[str, Any]]:
    import pydicom
    from pydicom.pixels import get_decoder

    from ai.decoders import REDUCED_J2K_DECODER, decoder_label
    from ai.inference import DEFAULT_DISPLAY_MIN_SIDE
    from ai.pixels import display_level

    out = []
    for label, variant in [*CODECS.items(), ("JPEG Baseline 8-bit (lossy)", "")]:
        path = (c.synth_file(c.WORK / "decode" / f"{variant}-{rows}x{cols}.dcm", variant,
                             seed=21, rows=rows, columns=cols)
                if variant else baseline_file(rows, cols))
        blob = path.read_bytes()
        ds = pydicom.dcmread(path)
        ts = str(ds.file_meta.TransferSyntaxUID)
        base = {"codec": label, "variant": variant, "size": f"{rows}x{cols}", "bytes": len(blob),
                "blob": blob, "reduce": 0}
        out.append(base | {"decoder": f"node: {decoder_label(ts)}", "node": True,
                           "fn": _node_decoder(0)})
        for plugin in get_decoder(ts).available_plugins:
            out.append(base | {"decoder": plugin, "node": False, "fn": _plugin_decoder(plugin)})
        chosen = display_level(ds, max(2 * max(DEMO_INPUTS), DEFAULT_DISPLAY_MIN_SIDE))
        if chosen and not label.startswith("JPEG 2000"):  # one full decode, then the shrink
            out.append(base | {"decoder": f"node reduce={chosen}: {decoder_label(ts)} + shrink *",
                               "node": True, "reduce": chosen, "chosen": True,
                               "fn": _node_decoder(chosen)})
        if label.startswith("JPEG 2000"):
            for level in (1, 2, 3):
                mark = " *" if level == chosen else ""
                out.append(base | {"decoder": f"node reduce={level}: {REDUCED_J2K_DECODER}{mark}",
                                   "node": True, "reduce": level, "chosen": level == chosen,
                                   "fn": _node_decoder(level)})
    return out


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    p = c.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", type=parse_size, nargs="*",
                   default=[(2048, 2048), (3000, 2500)], help="ROWSxCOLS (or one number)")
    p.add_argument("--repeats", type=int, help="default 10 (quick 2)")
    args = p.parse_args(argv)
    busy = c.busy_warning()
    repeats = args.repeats or (2 if args.quick else 10)
    all_cases = [x | {"times": []} for rows, cols in args.sizes for x in cases(rows, cols)]
    reference: dict[tuple[str, str], Any] = {}
    for x in all_cases:  # warm-up, and the lossless check between full decodes
        arr = x["fn"](x["blob"])
        x["shape"] = list(arr.shape)
        if x["reduce"]:
            x["max_abs_diff"] = None
        else:  # lossless: 0 between decoders; lossy baseline: IDCTs differ by a few levels
            ref = reference.setdefault((x["size"], x["codec"]), arr)
            x["max_abs_diff"] = int(np.abs(arr.astype(np.int64) - ref).max())
    for _ in range(repeats):
        for x in all_cases:
            t = time.perf_counter()
            x["fn"](x["blob"])
            x["times"].append(time.perf_counter() - t)
    rows, results = [], []
    for x in all_cases:
        ms = 1000 * c.median(x["times"])
        peer = next(y for y in all_cases if y["size"] == x["size"] and y["node"]
                    and y["codec"] == "uncompressed (peer)")
        peer_ms = 1000 * c.median(peer["times"])
        full = next(y for y in all_cases if y["size"] == x["size"] and y["node"]
                    and y["codec"] == x["codec"] and not y["reduce"])
        full_ms = 1000 * c.median(full["times"])
        mpix = x["shape"][0] * x["shape"][1] / 1e6
        same = "-" if x["max_abs_diff"] is None else str(x["max_abs_diff"])
        rows.append((x["size"], x["codec"], x["decoder"], "x".join(map(str, x["shape"][:2])),
                     x["bytes"] / 1e6, ms, mpix / (ms / 1000), f"{ms / peer_ms:.1f}x",
                     f"{ms / full_ms:.2f}x", same))
        results.append({k: v for k, v in x.items() if k not in ("blob", "fn")}
                       | {"median_ms": ms, "ratio_vs_uncompressed": ms / peer_ms,
                          "ratio_vs_node_full": ms / full_ms})
    c.table(["size", "syntax", "decoder (actually used)", "decoded", "MB", "ms/image",
             "Mpixel/s", "vs uncompressed", "vs node full", "max |diff| vs node"], rows,
            title=f"Decode (parse + decode), median of {repeats}, {os.cpu_count()} CPU cores; "
                  "'node: X' = ai.pixels.decode_frame running decoder X; '*' = the reduce "
                  "level the Analyzer picks for the demo pair")
    c.write_results("decode", {"quick": args.quick, "repeats": repeats, "machine_busy": busy,
                               "cases": results}, not args.no_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
