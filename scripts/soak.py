"""``make soak``: the node under mixed traffic, kill -9 and hostile destinations, for minutes.

What runs (all real processes on loopback):

* the node: ``dicom-node serve`` as a subprocess, killed with SIGKILL at random moments and
  restarted at once, as a crashing host would be;
* traffic: DCMTK ``storescu`` sends phantom studies (every analysable variant, lateral views
  and CT that must be ignored) and the real radiographs of ``../shared/realdicom`` (with fresh
  UIDs each time), one association per study; what was not acknowledged is sent again, as a
  PACS does;
* destinations: a DCMTK ``storescp`` that goes down for a while now and then, a ``storescp``
  whose association profile refuses Comprehensive SR (many PACS do), and Orthanc asked for
  Storage Commitment.

At the end the traffic stops, the peers come back, the node drains, and the script prints
instances sent, acknowledged, analysed, ignored, delivered, committed, not accepted,
dead-lettered and **lost** (an acknowledged instance without a durable, intact file and a
terminal state: must be 0), with RSS and thread counts of the node over time. Exit status 0
only when nothing was lost and everything drained.

    python scripts/soak.py --minutes 30          # SOAK_MINUTES is the default for --minutes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import pydicom  # noqa: E402
import yaml  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

REALDICOM = Path(os.environ.get("CXR_REALDICOM", ROOT.parent / "shared" / "realdicom"))
if not REALDICOM.is_dir():
    REALDICOM = Path("/work/shared/realdicom")

NODE_AE = "CXR_AI"
PHANTOM_VARIANTS = ("dx_mono2_explicit", "cr_mono1_jpeg_lossless", "dx_mono1_j2k",
                    "cr_mono2_jpegls", "dx_mono2_rle", "cr_mono1_voi_lut_seq",
                    "dx_mono2_implicit_12bit", "cr_mono2_16bit_rescale")
IGNORED_VARIANTS = ("dx_lateral", "ct_slice")
TS_FLAGS = {  # storescu proposes the file's own compressed syntax with these flags
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr",
}
# A PACS that stores images and presentation states but refuses SR (DCMTK storescp -xf).
NO_SR_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[NoSR]
PresentationContext1 = SecondaryCaptureImageStorage\\Uncompressed
PresentationContext2 = GrayscaleSoftcopyPresentationStateStorage\\Uncompressed
PresentationContext3 = VerificationSOPClass\\Uncompressed

[[Profiles]]
[NoSR]
PresentationContexts = NoSR
"""


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                  else None)
    if path is None:
        raise SystemExit(f"soak: {name} is not installed (make test / make setup install it)")
    return path


# ------------------------------------------------------------------------------------ peers

class StoreSCP:
    """A DCMTK storescp destination that can be taken down and brought back on its port."""

    def __init__(self, out: Path, ae_title: str, extra: list[str] | None = None) -> None:
        self.out, self.ae_title, self.extra = out, ae_title, extra or []
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        out.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        if self.proc is None:
            self.proc = subprocess.Popen(
                [tool("storescp"), "-aet", self.ae_title, "-od", str(self.out),
                 # +xa (accept every syntax) is not allowed with a profile (-xf)
                 *([] if "-xf" in self.extra else ["+xa"]), *self.extra, str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            wait_port(self.port, 20)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    @property
    def destination(self) -> dict[str, Any]:
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}


class Peers:
    def __init__(self, work: Path, node_port: int, with_orthanc: bool) -> None:
        profile = work / "no-sr.cfg"
        profile.write_text(NO_SR_PROFILE, encoding="ascii")
        self.flaky = StoreSCP(work / "dest-flaky", "FLAKY")
        self.no_sr = StoreSCP(work / "dest-nosr", "NOSR", ["-xf", str(profile), "NoSR"])
        self.orthanc: Any = None
        if with_orthanc:
            from orthanc import OrthancServer

            self.orthanc = OrthancServer(work / "orthanc", node_port=node_port,
                                         node_ae=NODE_AE, stable_age=3600,
                                         binary=tool("Orthanc"))
        self.outages = 0

    def start(self) -> None:
        self.flaky.start()
        self.no_sr.start()
        if self.orthanc is not None:
            self.orthanc.start()

    def stop(self) -> None:
        self.flaky.stop()
        self.no_sr.stop()
        if self.orthanc is not None:
            self.orthanc.stop()

    def destinations(self) -> list[dict[str, Any]]:
        dests = [self.flaky.destination, {**self.no_sr.destination}]
        if self.orthanc is not None:
            ae, rest = self.orthanc.destination.split("@")
            host, port = rest.split(":")
            dests.append({"ae_title": ae, "host": host, "port": int(port),
                          "storage_commitment": True, "commitment_timeout_s": 60})
        return dests


# ------------------------------------------------------------------------------------- node

@dataclass
class Sample:
    t: float
    incarnation: int
    rss_mib: float
    threads: int


class NodeRunner:
    """The node as a subprocess; kill -9 and restart; RSS and threads sampled."""

    def __init__(self, config: Path, log_path: Path, port: int) -> None:
        self.config, self.log_path, self.port = config, log_path, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.kills = 0
        self.samples: list[Sample] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with self.lock, open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve",
                                          "--config", str(self.config)], cwd=ROOT,
                                         stdout=fh, stderr=subprocess.STDOUT, env=env)
            self.incarnation += 1
        if not wait_port(self.port, 120):
            raise SystemExit(f"soak: the node did not listen within 120 s (see {self.log_path})")

    def kill9(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(20)
                self.kills += 1
            self.proc = None

    def stop(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None

    def sample(self, t0: float) -> None:
        with self.lock:
            proc, incarnation = self.proc, self.incarnation
        if proc is None or proc.poll() is not None:
            return
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            return
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        self.samples.append(Sample(time.monotonic() - t0, incarnation, rss, threads))


# ---------------------------------------------------------------------------------- traffic

@dataclass
class Study:
    files: list[Path]
    uids: list[str]
    analysable: bool


@dataclass
class Traffic:
    work: Path
    port: int
    rng: random.Random
    sent: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    backlog: list[Study] = field(default_factory=list)
    studies: int = 0
    associations_failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def make_study(self, n: int) -> Study:
        from training.synth import StudyContext, make_dataset

        self.studies += 1
        folder = self.work / "traffic" / f"s{self.studies:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        roll = self.rng.random()
        files, uids = [], []
        if roll < 0.12 and REALDICOM.is_dir():
            source = self.rng.choice(sorted(REALDICOM.glob("*.dcm")))
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / "real.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            uids.append(str(ds.SOPInstanceUID))
            return Study(files, uids, "hip" not in source.name)
        variants = IGNORED_VARIANTS if roll < 0.22 else PHANTOM_VARIANTS
        context = StudyContext.from_seed(self.rng.randrange(1 << 30))
        for i in range(n):
            variant = self.rng.choice(variants)
            ds = make_dataset(variant, seed=self.rng.randrange(1 << 30), rows=384,
                              columns=320, study=context)
            path = folder / f"img{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            uids.append(str(ds.SOPInstanceUID))
        return Study(files, uids, variants is PHANTOM_VARIANTS)

    def send(self, study: Study) -> bool:
        """storescu per transfer syntax group; returns True when every file was ACKed."""
        groups: dict[str, list[Path]] = {}
        for f in study.files:
            ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            groups.setdefault(TS_FLAGS.get(ts, "-xe"), []).append(f)
        uid_of = dict(zip(map(str, study.files), study.uids, strict=True))
        with self.lock:
            self.sent.update(study.uids)
        acked_here: set[str] = set()
        for flag, group in groups.items():
            cmd = [tool("storescu"), "-v", "-aec", NODE_AE, "-aet", "PACS", flag, "-to", "20",
                   "127.0.0.1", str(self.port), *map(str, group)]
            try:
                # storescu -v logs to stderr: that is where the responses are
                out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, timeout=120).stdout
            except subprocess.TimeoutExpired:
                out = ""
            current = None
            for line in out.splitlines():
                m = re.search(r"Sending file: (\S+)", line)
                if m:
                    current = m.group(1)
                elif "Received Store Response (Success)" in line and current in uid_of:
                    acked_here.add(uid_of[current])
        with self.lock:
            self.acked.update(acked_here)
        if acked_here != set(study.uids):
            self.associations_failed += 1
            return False
        return True


# ----------------------------------------------------------------------------------- report

def db_rows(db_path: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def drained(db_path: Path) -> bool:
    busy = db_rows(db_path, "SELECT count(*) FROM studies WHERE state IN "
                            "('receiving', 'queued', 'analysing')")[0][0]
    moving = db_rows(db_path, "SELECT count(*) FROM deliveries WHERE state IN "
                              "('pending', 'sending', 'retrying')")[0][0]
    uncommitted = db_rows(db_path, "SELECT count(*) FROM deliveries WHERE state = 'sent' "
                                   "AND commit_requested_at IS NOT NULL")[0][0]
    return busy == 0 and moving == 0 and uncommitted == 0


def account(db_path: Path, spool: Path, traffic: Traffic) -> dict[str, Any]:
    rows = db_rows(db_path, "SELECT sop_instance_uid, analysis_state, path, size, sha256 "
                            "FROM instances")
    by_uid = {r[0]: r for r in rows}
    lost, damaged, not_terminal = [], [], []
    for uid in sorted(traffic.acked):
        row = by_uid.get(uid)
        if row is None:
            lost.append(uid)
            continue
        if row[1] not in ("analysed", "ignored", "failed"):
            not_terminal.append(uid)
        data = (spool / row[2]).read_bytes() if (spool / row[2]).is_file() else b""
        if len(data) != row[3] or hashlib.sha256(data).hexdigest() != row[4]:
            damaged.append(uid)
    states = Counter(r[1] for r in rows)
    deliveries = Counter(dict(db_rows(db_path, "SELECT state, count(*) FROM deliveries "
                                               "GROUP BY state")))
    return {
        "instances_sent": len(traffic.sent), "instances_acknowledged": len(traffic.acked),
        "instances_stored": len(rows), "analysed": states.get("analysed", 0),
        "ignored": states.get("ignored", 0), "failed": states.get("failed", 0),
        "delivered": deliveries.get("sent", 0) + deliveries.get("committed", 0),
        "committed": deliveries.get("committed", 0),
        "not_accepted": deliveries.get("not_accepted", 0),
        "dead_lettered": deliveries.get("dead", 0),
        "deliveries_by_state": dict(deliveries),
        "lost": len(lost) + len(damaged), "not_terminal": len(not_terminal),
        "lost_uids": (lost + damaged)[:20],
        "jobs": dict(Counter(r[0] for r in db_rows(db_path, "SELECT state FROM jobs"))),
    }


def rss_table(samples: list[Sample], minutes: float) -> list[dict[str, Any]]:
    """Per time slice (a tenth of the run, at least a minute): RSS and threads, min/max."""
    if not samples:
        return []
    width = max(60.0, minutes * 6.0)
    table = []
    for k in range(int(samples[-1].t // width) + 1):
        part = [s for s in samples if k * width <= s.t < (k + 1) * width]
        if part:
            table.append({"from_s": round(k * width), "rss_mib_min": round(min(s.rss_mib for s in part), 1),
                          "rss_mib_max": round(max(s.rss_mib for s in part), 1),
                          "threads_min": min(s.threads for s in part),
                          "threads_max": max(s.threads for s in part),
                          "incarnations": sorted({s.incarnation for s in part})})
    return table


# ------------------------------------------------------------------------------------ main

def build_bundles(work: Path, bundles: list[str]) -> list[str]:
    if bundles:
        return bundles
    cache = ROOT / "var" / "soak-bundles"
    if not any(cache.glob("*/configs/metadata.json")):
        log("building the quick demo bundles once (var/soak-bundles)")
        subprocess.run([sys.executable, "-m", "training", "demo-bundles", "--out", str(cache),
                        "--quick"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return [str(p.parent.parent) for p in sorted(cache.glob("*/configs/metadata.json"))]


def node_config(work: Path, port: int, bundles: list[str], destinations: list[dict]) -> Path:
    config = {
        "dicom": {"port": port, "ae_title": NODE_AE},
        "storage": {"data_dir": str(work / "node"), "min_free_bytes": 0},
        "studies": {"quiet_period_s": 1.0, "poll_interval_s": 0.2, "max_wait_s": 60},
        "models": {"bundles": bundles, "device": "cpu"},
        "workers": {"lease_s": 120, "backoff_initial_s": 1, "backoff_max_s": 10,
                    "poll_interval_s": 0.2},
        "destinations": destinations,
        "sender": {"max_attempts": 10, "backoff_initial_s": 1, "backoff_max_s": 10,
                   "timeout_s": 10, "poll_interval_s": 0.2},
        "web": {"enabled": False},
        "evaluation": {"enabled": False},
    }
    path = work / "node.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work or ROOT / "var" / "soak" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    port = free_port()
    peers = Peers(work, port, with_orthanc=not args.no_orthanc)
    peers.start()
    bundles = build_bundles(work, args.bundles)
    node = NodeRunner(node_config(work, port, bundles, peers.destinations()), work / "node.log",
                      port)
    traffic = Traffic(work, port, rng)
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60.0
    stop = threading.Event()
    node.start()
    log(f"node up (port {port}); traffic for {args.minutes} min; work dir {work}")

    # the chaos schedule has a generator of its own: the traffic thread's draws do not shift
    # it, so a seed gives the same kills and outages at the same moments every run
    chaos_rng = random.Random(f"chaos-{args.seed}")

    def chaos() -> None:  # kill -9 the node, and take the flaky destination down now and then
        mean = max(15.0, min(90.0, args.minutes * 60.0 / 8))
        while not stop.wait(chaos_rng.uniform(0.5 * mean, 1.5 * mean)):
            if chaos_rng.random() < 0.7:
                node.kill9()
                log(f"kill -9 #{node.kills}")
                time.sleep(chaos_rng.uniform(0.2, 2.0))
                node.start()
            else:
                peers.flaky.stop()
                peers.outages += 1
                log(f"destination FLAKY down (outage #{peers.outages})")
                stop.wait(chaos_rng.uniform(5, 20))
                peers.flaky.start()

    def monitor() -> None:
        while not stop.wait(2.0):
            node.sample(t0)

    threads = [threading.Thread(target=chaos, daemon=True),
               threading.Thread(target=monitor, daemon=True)]
    for t in threads:
        t.start()
    while time.monotonic() < deadline:
        study = traffic.backlog.pop(0) if traffic.backlog else traffic.make_study(
            rng.randint(1, 3))
        if not traffic.send(study):
            traffic.backlog.append(study)  # the PACS re-sends what was not acknowledged
            time.sleep(1.0)
        else:
            time.sleep(rng.uniform(0.5, 2.5))
    stop.set()
    for t in threads:
        t.join(120)
    if node.proc is None:
        node.start()
    peers.flaky.start()
    log("traffic stopped; re-sending the unacknowledged backlog, then draining")
    retry_deadline = time.monotonic() + 120
    while traffic.backlog and time.monotonic() < retry_deadline:
        study = traffic.backlog.pop(0)
        if not traffic.send(study):
            traffic.backlog.append(study)
            time.sleep(1.0)
    db_path = work / "node" / "node.db"
    drain_deadline = time.monotonic() + args.drain_s
    while time.monotonic() < drain_deadline and not drained(db_path):
        node.sample(t0)
        time.sleep(1.0)
    ok_drained = drained(db_path)
    node.sample(t0)
    node.stop()
    peers.stop()
    report = account(db_path, work / "node" / "spool", traffic)
    report.update({
        "minutes": args.minutes, "seed": args.seed, "kills": node.kills,
        "destination_outages": peers.outages, "studies_generated": traffic.studies,
        "unacknowledged_backlog": len(traffic.backlog), "drained": ok_drained,
        "rss_threads": rss_table(node.samples, args.minutes),
        "rss_mib_max": round(max((s.rss_mib for s in node.samples), default=0.0), 1),
        "threads_max": max((s.threads for s in node.samples), default=0),
        "work_dir": str(work),
    })
    (work / "soak.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def print_report(r: dict[str, Any]) -> None:
    print()
    print(f"Soak {r['minutes']} min (seed {r['seed']}): {r['kills']} kill -9, "
          f"{r['destination_outages']} destination outages, {r['studies_generated']} studies")
    for key in ("instances_sent", "instances_acknowledged", "instances_stored", "analysed",
                "ignored", "failed", "delivered", "committed", "not_accepted", "dead_lettered",
                "not_terminal", "lost"):
        print(f"  {key:24s} {r[key]}")
    print(f"  {'deliveries by state':24s} {r['deliveries_by_state']}")
    print(f"  {'jobs by state':24s} {r['jobs']}")
    print(f"  {'drained':24s} {r['drained']}")
    print("  RSS (MiB) and threads of the node over time:")
    for row in r["rss_threads"]:
        print(f"    from {row['from_s']:5d} s  RSS {row['rss_mib_min']:7.1f} - "
              f"{row['rss_mib_max']:7.1f}  threads {row['threads_min']:3d} - "
              f"{row['threads_max']:3d}  incarnations {row['incarnations']}")
    print(f"  report: {r['work_dir']}/soak.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float,
                   default=float(os.environ.get("SOAK_MINUTES", "30")))
    p.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", "7")))
    p.add_argument("--work", type=Path, default=None, help="work dir (default var/soak/<time>)")
    p.add_argument("--bundles", nargs="*", default=[], help="model bundles (default: quick "
                   "demo bundles, built once into var/soak-bundles)")
    p.add_argument("--drain-s", type=float, default=300.0)
    p.add_argument("--no-orthanc", action="store_true", help="skip the commitment destination")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    report = run(args)
    print_report(report)
    if report["lost"] or report["not_terminal"] or not report["drained"]:
        print("SOAK FAILED: something was lost, left unfinished, or did not drain",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
