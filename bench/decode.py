"""Decode time of compressed radiographs through the installed pydicom plugins.

QUALITY.md, Performance 5: ms per image for JPEG Lossless (process 14 SV1), JPEG-LS
lossless, JPEG 2000 lossless and RLE lossless phantoms of ``training.synth`` at 2048 x 2048
and 3000 x 3000: pydicom's default choice (what the node gets: ``ai.pixels.decode_frame``
names no plugin) and every installed plugin of each syntax by name. Peer: the uncompressed
Explicit VR phantom of the same size read the same way. One timed call = parse the Part 10
bytes from memory + ``pydicom.pixels.pixel_array(ds, index=0)``; median of the repeats, all
cases interleaved so drift hits each alike. Decoded arrays are compared between plugins
(lossless: they must be identical).
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

import _common as c

CODECS = {  # label -> synth variant
    "uncompressed (peer)": "dx_mono2_explicit",
    "JPEG Lossless SV1": "cr_mono1_jpeg_lossless",
    "JPEG-LS lossless": "cr_mono2_jpegls",
    "JPEG 2000 lossless": "dx_mono1_j2k",
    "RLE lossless": "dx_mono2_rle",
}


def decode(blob: bytes, plugin: str) -> Any:
    import pydicom
    from pydicom.pixels import pixel_array

    ds = pydicom.dcmread(io.BytesIO(blob))
    return pixel_array(ds, index=0, decoding_plugin=plugin)


def cases(size: int) -> list[dict[str, Any]]:
    import pydicom
    from pydicom.pixels import get_decoder

    out = []
    for label, variant in CODECS.items():
        path = c.synth_file(c.WORK / "decode" / f"{variant}-{size}.dcm", variant, seed=21,
                            rows=size, columns=size)
        blob = path.read_bytes()
        ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        plugins = ["", *get_decoder(ts).available_plugins]
        for plugin in plugins:
            out.append({"codec": label, "variant": variant, "size": size, "plugin": plugin,
                        "bytes": len(blob), "blob": blob, "times": []})
    return out


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    p = c.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[2048, 3000])
    p.add_argument("--repeats", type=int, help="default 10 (quick 2)")
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 10)
    all_cases = [x for s in args.sizes for x in cases(s)]
    reference: dict[tuple[int, str], Any] = {}
    for x in all_cases:  # warm-up, and the lossless check
        arr = decode(x["blob"], x["plugin"])
        key = (x["size"], x["codec"])
        x["identical"] = bool(np.array_equal(arr, reference.setdefault(key, arr)))
    for _ in range(repeats):
        for x in all_cases:
            t = time.perf_counter()
            decode(x["blob"], x["plugin"])
            x["times"].append(time.perf_counter() - t)
    rows, results = [], []
    for x in all_cases:
        ms = 1000 * c.median(x["times"])
        peer = next(y for y in all_cases if y["size"] == x["size"] and not y["plugin"]
                    and y["codec"] == "uncompressed (peer)")
        peer_ms = 1000 * c.median(peer["times"])
        mpix = x["size"] ** 2 / 1e6
        rows.append((f"{x['size']}x{x['size']}", x["codec"],
                     x["plugin"] or "default (node)",
                     x["bytes"] / 1e6, ms, mpix / (ms / 1000), f"{ms / peer_ms:.1f}x",
                     "yes" if x["identical"] else "NO"))
        results.append({k: v for k, v in x.items() if k != "blob"} | {"median_ms": ms,
                                                                       "ratio": ms / peer_ms})
    c.table(["size", "syntax", "plugin", "MB", "ms/image", "Mpixel/s", "vs uncompressed",
             "same pixels"], rows,
            title=f"Decode (parse + pixel_array), median of {repeats}, {os.cpu_count()} CPU "
                  "cores; 'default (node)' = no plugin named, as the node decodes")
    c.write_results("decode", {"quick": args.quick, "repeats": repeats, "cases": results},
                    not args.no_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
