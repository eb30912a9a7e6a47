"""Helpers shared by the benchmarks: peers, node start-up, corpora, tables and results.

Copied (not imported) from ``tests/`` where the tests have the same need, so ``bench/``
never depends on the test tree. Every benchmark prints absolute figures and a ratio against
a peer measured in the same run on the same machine, and writes its figures as JSON under
``var/bench/results/`` (``var/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var" / "bench"
RESULTS = VAR / "results"
WORK = VAR / "work"


# --------------------------------------------------------------------------------------------
# Command line, results


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="about one minute: fewer items/repeats")
    p.add_argument("--no-json", action="store_true", help="do not write var/bench/results/*.json")
    return p


def torch_threads(parser_: argparse.ArgumentParser) -> None:
    parser_.add_argument(
        "--threads", type=int,
        help="torch intra-op threads (default: torch's, one per core, as the node runs). On a "
             "machine shared with other work, 1 avoids OpenMP barriers waiting on a "
             "descheduled thread, which can slow small forwards 100-fold")


def set_torch_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def machine() -> dict[str, Any]:
    import numpy
    import pydicom
    import pynetdicom
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dcmtk = subprocess.run([tool("storescp"), "--version"], capture_output=True, text=True,
                           check=False).stdout.split("\n", 1)[0].strip()
    return {
        "host": platform.node(), "cpus": os.cpu_count(), "cpu_model": model,
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "pydicom": pydicom.__version__, "pynetdicom": pynetdicom.__version__,
        "numpy": numpy.__version__, "dcmtk": dcmtk, "loadavg_at_end": os.getloadavg(),
    }


def busy_warning(threshold: float = 0.5) -> str | None:
    """A warning when the 1-minute load average says other work shares the cores.

    Call it before measuring and put the result in the JSON (``machine_busy``): absolute
    figures from a busy machine are not comparable; same-run ratios suffer less.
    """
    load1 = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load1 <= threshold * cpus:
        return None
    text = (f"WARNING: the machine is busy (load average {load1:.1f} on {cpus} CPUs): "
            "absolute figures are not comparable; read the same-run ratios")
    print(text, flush=True)
    return text


def write_results(name: str, payload: dict[str, Any], enabled: bool = True) -> Path | None:
    if not enabled:
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    doc = {"benchmark": name, "created": stamp, "machine": machine(), **payload}
    path.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nload average now (1, 5, 15 min): {load} on {os.cpu_count()} CPUs; other work on "
          "the machine shows up in every figure, less in the same-run ratios")
    print(f"results: {path.relative_to(ROOT)}")
    return path


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str = "") -> str:
    """A plain fixed-width table; floats keep what ``fmt`` gave them."""
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title] if title else []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"
    return str(v)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def best_of(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of ``fn`` for each repeat."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# --------------------------------------------------------------------------------------------
# Network peers (DCMTK)

# The Debian/Ubuntu DCMTK 3.6.7 build leaves Nagle's algorithm on unless the environment
# says TCP_NODELAY=1: storescu then waits for the peer's delayed ACK (about 40 ms) between
# the PDUs of every instance, so storescu -> storescp moves about 11 small instances/s
# instead of about 2,000/s on loopback. Every DCMTK process here runs with it disabled, as
# a PACS tuned for throughput would; pynetdicom does not set the option either way.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                  else None)
    if path is None:
        raise SystemExit(f"{name} is not installed (make setup installs DCMTK)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


class StoreSCP:
    """A DCMTK storescp writing what it receives to ``out`` (``extra``: e.g. ``--fork``)."""

    def __init__(self, out: Path, port: int | None = None, ae_title: str = "DEST",
                 extra: Sequence[str] = ()) -> None:
        self.out, self.port, self.ae_title = out, port or free_port(), ae_title
        out.mkdir(parents=True, exist_ok=True)
        cmd = [tool("storescp"), "-aet", ae_title, "-od", str(out), *extra, str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=DCMTK_ENV)
        wait_for_port(self.port)

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def storescu_cmd(port: int, files: Sequence[Path], *, called: str, calling: str = "PACS",
                 syntax_flag: str = "-xe") -> list[str]:
    """One association sending ``files`` in order (all of one transfer syntax)."""
    return [tool("storescu"), "-aec", called, "-aet", calling, syntax_flag, "127.0.0.1",
            str(port), *map(str, files)]


def send_parallel(port: int, parts: Sequence[Sequence[Path]], *, called: str,
                  syntax_flag: str = "-xe", timeout: float = 600) -> float:
    """Start one storescu per part at once; wall seconds until the last one exits."""
    t = time.perf_counter()
    procs = [subprocess.Popen(storescu_cmd(port, p, called=called, syntax_flag=syntax_flag),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=DCMTK_ENV)
             for p in parts if p]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - t
    if errors:
        raise RuntimeError(f"storescu failed: {errors[0]}")
    return elapsed


SYNTAX_FLAGS = {
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2": "-xi",
}


def syntax_flag(transfer_syntax: str) -> str:
    return SYNTAX_FLAGS.get(str(transfer_syntax), "-xe")


# --------------------------------------------------------------------------------------------
# The node, in-process


def configure_logging(log_file: Path) -> None:
    """As ``dicom-node serve`` configures it (INFO, pynetdicom WARNING), into a file."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    from dicom_node import logs

    logs.configure_logging("INFO", logging.FileHandler(log_file))


def node_settings(data_dir: Path, *, destinations: Sequence[str] = (), quiet: float = 0.5,
                  **overrides: Any) -> Any:
    """Settings for a benchmark node: loopback, no web, no scheduler, short poll intervals."""
    from dicom_node.config import load_settings

    values: dict[str, Any] = {
        "storage.data_dir": str(data_dir),
        "dicom.port": free_port(),
        "studies.quiet_period_s": quiet,
        "studies.poll_interval_s": 0.1,
        "workers.poll_interval_s": 0.1,
        "sender.poll_interval_s": 0.1,
        "sender.backoff_initial_s": 0.2,
        "sender.backoff_max_s": 1.0,
        "sender.timeout_s": 30,
        "storage.min_free_bytes": 0,
        "web.enabled": False,
        "evaluation.enabled": False,
        "destinations": [{"ae_title": d.split("@")[0], "host": d.split("@")[1].split(":")[0],
                          "port": int(d.rsplit(":", 1)[1])} for d in destinations],
    }
    values.update(overrides)
    return load_settings(None, overrides=values, environ={})


def start_node(settings: Any, analyzer_factory: Callable[[Any], Any] | None = None) -> Any:
    from dicom_node.analysis import load_analyzer
    from dicom_node.service import Node

    node = Node(settings, analyzer_factory or load_analyzer)
    node.start()
    wait_for_port(settings.dicom.port)
    return node


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------------------------
# Models and images


TINY_LABELS = (
    ("nodule", ("27925004", "SCT", "Nodule"), 0.0),  # always positive: Grad-CAM, box, heatmap
    ("cardiomegaly", ("287272002", "SCT", "Cardiomegaly"), 0.5),
    ("pneumothorax", ("36118008", "SCT", "Pneumothorax"), 1.0),  # never positive
)


def make_random_bundle(directory: Path, *, network: str = "densenet", size: int = 64,
                       seed: int = 0) -> Path:
    """A randomly initialised classification bundle (as tests/helpers/bundles.py builds).

    ``network="densenet"`` gives the tests' tiny DenseNet (8 features, growth 4, one layer
    per block) at 64 px; ``"densenet121"`` the full DenseNet121.
    """
    import torch

    from ai.bundle.load import build_model, save_bundle
    from ai.bundle.metadata import BundleMetadata, InputSpec, LabelSpec, NetworkSpec
    from ai.types import CodedConcept

    if (directory / "configs" / "metadata.json").exists():
        return directory
    torch.manual_seed(seed)
    args = ({"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}
            if network == "densenet" else {})
    meta = BundleMetadata(
        name=f"bench-random-{network}-{size}", version="0.0.1",
        labels=tuple(LabelSpec(n, CodedConcept(*c), t) for n, c, t in TINY_LABELS),
        network=NetworkSpec(network, args), input=InputSpec(size=size), demo=True,
        description="random weights, for benchmarks only",
    )
    save_bundle(directory, meta, build_model(meta))
    return directory


def synth_file(path: Path, variant: str, *, seed: int, rows: int, columns: int) -> Path:
    """A phantom instance written once and cached (the generator is deterministic)."""
    if path.exists():
        return path
    from training.synth import StudyContext, make_dataset

    ds = make_dataset(variant, seed=seed, rows=rows, columns=columns,
                      study=StudyContext.from_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    return path


def clone_instances(template: Path, out_dir: Path, count: int, *, per_study: int = 2,
                    tag: str = "") -> list[Path]:
    """``count`` copies of ``template`` with new SOP/Series/Study UIDs (pixels unchanged).

    Changing UIDs needs no re-encoding, so compressed pixel data stays as generated; the
    node's duplicate check sees new instances. ``per_study`` instances share a study.
    """
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(template)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for n in range(count):
        if n % per_study == 0:
            study = generate_uid(entropy_srcs=["bench", tag, str(out_dir), "study", str(n)])
            series = generate_uid(entropy_srcs=["bench", tag, str(out_dir), "series", str(n)])
        sop = generate_uid(entropy_srcs=["bench", tag, str(out_dir), "sop", str(n)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.InstanceNumber = n % per_study + 1
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        path = out_dir / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def split(items: Sequence[Path], parts: int) -> list[list[Path]]:
    """Contiguous split into ``parts`` near-equal runs (a study stays in one association)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)
