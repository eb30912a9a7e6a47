"""Out-of-distribution acceptance of a demo build (the README's full-build rows).

    python scripts/ood_acceptance.py BUILD_DIR [--studies 80] [--seed 4242]

BUILD_DIR is what ``training demo-bundles --out BUILD_DIR`` wrote. Prints, per bundle, how
many held-out frontal DICOM phantoms pass its gate, at sizes no demo gate was fitted on
(checked against :func:`training.ood.phantom_sizes`) and at synth's realistic plate sizes,
then every real radiograph's score and threshold (``../shared/realdicom`` by default).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pydicom

from ai.inference import Analyzer
from training.ood import phantom_files_of_sizes, phantom_sizes

UNSEEN_SIZES = [(560, 480), (704, 768), (1500, 1300), (2900, 2400)]
REALDICOM = Path(__file__).resolve().parents[2] / "shared" / "realdicom"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--studies", type=int, default=80, help="phantom studies per group")
    parser.add_argument("--seed", type=int, default=4242, help="synth seed (no build uses it)")
    parser.add_argument("--sizes", default=",".join(f"{r}x{c}" for r, c in UNSEEN_SIZES),
                        help="unseen sizes, ROWSxCOLUMNS,...")  # fmt: skip
    parser.add_argument("--real", type=Path, default=REALDICOM, help="real radiographs")
    args = parser.parse_args(argv)
    bundles = [args.build / "cxr-demo-classifier", args.build / "cxr-demo-detector"]
    missing = [str(b) for b in bundles if not (b / "configs" / "metadata.json").is_file()]
    if missing:
        print(f"error: no demo bundle at {', '.join(missing)}", file=sys.stderr)
        return 2
    unseen = [tuple(int(n) for n in s.split("x")) for s in args.sizes.split(",")]
    seen = {s for b in (224, 256) for s in phantom_sizes(b, quick=False)}
    if clash := [s for s in unseen if s in seen]:
        print(f"error: the gates were fitted at {clash}", file=sys.stderr)
        return 2
    analyzer = Analyzer(bundles, device="cpu", gradcam=False)
    with tempfile.TemporaryDirectory(prefix="ood-acceptance-") as tmp:
        groups = {
            "unseen sizes": phantom_files_of_sizes(Path(tmp) / "u", args.studies, args.seed, unseen),
            "plate sizes": phantom_files_of_sizes(Path(tmp) / "p", args.studies, args.seed + 1, [None]),
        }  # fmt: skip
        for group, files in groups.items():
            results = []
            for k in range(0, len(files), 8):
                results += analyzer.analyze([pydicom.dcmread(f) for f in files[k : k + 8]])
            for model in analyzer.models:
                passed = sum(not v.out_of_distribution
                             for r in results for v in r.ood if v.model == model)  # fmt: skip
                print(f"{model.name} {group}: {passed}/{len(files)} pass "
                      f"({100 * passed / max(1, len(files)):.1f} %)")  # fmt: skip
    for path in sorted(args.real.glob("*.dcm")):
        (result,) = analyzer.analyze([pydicom.dcmread(path)])
        scores = ", ".join(f"{v.model.name} {v.score:.1f} / {v.threshold:.1f} "
                           f"{'FLAGGED' if v.out_of_distribution else 'passes'}"
                           for v in result.ood)  # fmt: skip
        print(f"{path.name}: {scores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
