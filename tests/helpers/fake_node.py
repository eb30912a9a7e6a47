"""The node with the fake analyzer as a real process, for kill -9 tests that need no model.

``python tests/helpers/fake_node.py CONFIG [--block-study UID]``: images of the named
study block the analysis (until the process is killed); every other study is analysed at
once by ``FakeAnalyzer``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pydicom  # noqa: E402

from ai.types import ImageResult  # noqa: E402
from helpers.fakes import FakeAnalyzer  # noqa: E402


class BlockingAnalyzer(FakeAnalyzer):
    """Hangs on one study (a poison pill the test kills the process on)."""

    def __init__(self, block_study: str | None) -> None:
        super().__init__()
        self.block_study = block_study

    def analyze(self, datasets: Sequence[pydicom.Dataset]) -> list[ImageResult]:
        if any(str(ds.StudyInstanceUID) == self.block_study for ds in datasets):
            logging.getLogger(__name__).info("blocking on the poison study")
            threading.Event().wait()
        return super().analyze(datasets)


def main(argv: list[str] | None = None) -> None:
    from dicom_node.config import load_settings
    from dicom_node.service import Node, run_forever

    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--block-study")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    analyzer = BlockingAnalyzer(args.block_study)
    run_forever(Node(load_settings(args.config, environ={}), lambda _settings: analyzer))


if __name__ == "__main__":
    main()
