"""Typed node settings: loaded from YAML, overridden by environment and command line,
validated once at start-up and passed down. Errors name the key and the bad value.

Every path setting (``storage.data_dir``, ``models.bundles``, ``dicom.tls.*_file``, the
evaluation jobs' folders and files, ...) may be written relative: :func:`load_settings`
makes each one absolute once, against the working directory the node was started in
(``~`` is expanded), so no code downstream ever sees a relative path. Flask's
``send_file``, for one, would resolve a relative path against the package folder.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ai.anatomy import (
    CHEST_KEYWORDS,
    FRONTAL_KEYWORDS,
    LATERAL_KEYWORDS,
    NON_CHEST_KEYWORDS,
    KeywordError,
    check_keywords,
)
from ai.selection import SelectionRules
from dicom_node.delivery.syntaxes import fastest_lossless, sendable
from dicom_node.errors import ConfigError
from dicom_node.evaluation.settings import EvaluationSettings

ENV_PREFIX = "CXR_NODE__"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"AE title {value!r} must be 1-16 printable characters, no backslash")
    return value.strip()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Model):
    """Optional second listener with TLS (DICOM PS3.15 B.9 / BCP 195): TLS 1.2 or newer,
    client certificates signed by ``ca_file`` required unless ``require_client_cert`` is off."""

    enabled: bool = False
    port: int = Field(2762, ge=1, le=65535)
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _files(self) -> TlsSettings:
        if self.enabled:
            for key in ("cert_file", "key_file") + (("ca_file",) if self.require_client_cert
                                                    else ()):
                value = getattr(self, key)
                if value is None or not Path(value).is_file():
                    raise ValueError(f"dicom.tls.{key} {str(value)!r} is not a readable file")
        return self


class DicomSettings(_Model):
    ae_title: str = "CXR_AI"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aes: list[str] = Field(default_factory=list)
    max_associations: int = Field(16, ge=1, le=1000)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    # the receive PDU size we announce (PS3.8 9.3.3.3: 0 would mean "unlimited": refused).
    # DCMTK's storescu (3.6.7) sends PDUs of at most 128 kB whatever we announce, so a
    # larger default bought it nothing (issue 11: measured with 1 and 4 MiB)
    maximum_pdu_size: int = Field(262144, ge=4096, le=16 * 1024 * 1024)
    # one calling AE may hold at most this many of max_associations at once
    max_associations_per_calling_ae: int = Field(8, ge=1, le=1000)
    # an association is aborted after this long, whatever it does (a trickling peer)
    association_deadline_s: float = Field(3600.0, gt=0)
    # ... or when a message in transfer arrives slower than this (bytes/s over the window)
    min_transfer_rate_bps: int = Field(16384, ge=0)
    transfer_rate_window_s: float = Field(30.0, gt=0)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    # receiver processes behind the port(s) of one node process (role all or receiver):
    # each binds them with SO_REUSEPORT and the kernel spreads the connections; more than 1
    # for many parallel associations (one process's GIL caps what it can receive)
    receiver_processes: int = Field(1, ge=1, le=64)
    # bind with SO_REUSEPORT, so that other processes may listen on the same port (None:
    # on when receiver_processes > 1); two `serve --role receiver` on one port both need it
    reuse_port: bool | None = None

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, v: list[str]) -> list[str]:
        return [_check_ae(x) for x in v]

    @model_validator(mode="after")
    def _reuse(self) -> DicomSettings:
        if self.receiver_processes > 1 and self.reuse_port is False:
            raise ValueError(f"dicom.receiver_processes {self.receiver_processes} needs "
                             "dicom.reuse_port (the processes bind one port); set it true "
                             "or leave it null")
        if self.reuses_port and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("dicom.reuse_port needs SO_REUSEPORT, which this platform "
                             "lacks (Linux has it)")
        return self

    @property
    def reuses_port(self) -> bool:
        """Whether the listeners bind with SO_REUSEPORT."""
        return (self.reuse_port if self.reuse_port is not None
                else self.receiver_processes > 1)


class RetentionSettings(_Model):
    """What may be removed from the spool; undelivered or uncommitted results never are."""

    enabled: bool = True
    max_age_days: float | None = Field(30.0, gt=0)  # None: no age limit
    # purge oldest finished studies while the spool filesystem is fuller than this
    max_disk_used_pct: float | None = Field(85.0, gt=0, le=100)
    interval_s: float = Field(300.0, gt=0)


class StorageSettings(_Model):
    data_dir: Path = Path("var")
    max_instance_bytes: int = Field(512 * 1024 * 1024, gt=0)
    # a Deflated Explicit VR instance may inflate to at most this (a deflate bomb is refused)
    max_inflated_bytes: int = Field(128 * 1024 * 1024, gt=0)
    min_free_bytes: int = Field(64 * 1024 * 1024, ge=0)
    # C-STORE answers Out of Resources once the spool filesystem is fuller than the high
    # watermark, and accepts again once it is below the low one
    high_watermark_pct: float = Field(95.0, gt=0, le=100)
    low_watermark_pct: float = Field(90.0, gt=0, le=100)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    @model_validator(mode="after")
    def _watermarks(self) -> StorageSettings:
        if self.low_watermark_pct > self.high_watermark_pct:
            raise ValueError("storage.low_watermark_pct must be <= storage.high_watermark_pct")
        return self


DATABASE_SCHEMES = ("sqlite:///", "postgresql+psycopg://")


class DatabaseSettings(_Model):
    url: str | None = None  # default: sqlite:///<data_dir>/node.db

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str | None) -> str | None:
        """The two engines the node is tested on; ``postgresql://`` means psycopg 3 (the
        driver installed with the node), as SQLAlchemy would otherwise look for psycopg2."""
        if url is None:
            return None
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        if not url.startswith(DATABASE_SCHEMES):
            raise ValueError("must start with sqlite:/// (a file) or postgresql+psycopg:// "
                             "(user:password@host:port/dbname)")
        return url


def _checked_keywords(keywords: list[str]) -> list[str]:
    try:
        return check_keywords(keywords)
    except KeywordError as exc:  # pydantic reports a ValueError with the key's location
        raise ValueError(str(exc)) from exc


class SelectionSettings(_Model):
    """Which received images the models see (:func:`ai.selection.rejection_reason`).

    The keyword lists are read in ``BodyPartExamined`` and the descriptions (series,
    protocol, CR processing, study, requested procedure), as whole words, case- and
    accent-insensitively; each list replaces its default (:mod:`ai.anatomy`, shown in full in
    ``config/node.yaml``). ``non_chest_keywords`` maps the anatomy a reason names to its
    keywords."""

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    body_parts: list[str] = Field(default_factory=lambda: ["CHEST", "THORAX", "LUNG"])
    accept_missing_body_part: bool = True
    view_positions: list[str] = Field(default_factory=lambda: ["PA", "AP"])
    accept_missing_view_position: bool = True
    min_rows: int = Field(256, ge=1)
    min_columns: int = Field(256, ge=1)
    chest_keywords: list[str] = Field(default_factory=lambda: list(CHEST_KEYWORDS))
    non_chest_keywords: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in NON_CHEST_KEYWORDS.items()})
    lateral_keywords: list[str] = Field(default_factory=lambda: list(LATERAL_KEYWORDS))
    frontal_keywords: list[str] = Field(default_factory=lambda: list(FRONTAL_KEYWORDS))

    @field_validator("chest_keywords", "lateral_keywords", "frontal_keywords")
    @classmethod
    def _keywords(cls, v: list[str]) -> list[str]:
        return _checked_keywords(v)

    @field_validator("non_chest_keywords")
    @classmethod
    def _anatomy(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return {name: _checked_keywords(words) for name, words in v.items()}

    def to_rules(self) -> SelectionRules:
        """The rules :func:`ai.selection.rejection_reason` applies, from these settings."""
        return SelectionRules(
            tuple(self.modalities), tuple(self.body_parts), self.accept_missing_body_part,
            tuple(self.view_positions), self.accept_missing_view_position, self.min_rows,
            self.min_columns, tuple(self.chest_keywords),
            tuple((name, tuple(words)) for name, words in self.non_chest_keywords.items()),
            tuple(self.lateral_keywords), tuple(self.frontal_keywords))


class StudySettings(_Model):
    # a study is ready this long after the association that delivered it was released
    # (A-RELEASE, not an abort) when no image of it arrived meanwhile and no other open
    # association delivered images of it; None turns release-driven completion off
    release_grace_s: float | None = Field(1.0, ge=0)
    # the fallback: ready once no image of it arrived for this long (images of one study
    # over overlapping associations, an aborted association, a restart)
    quiet_period_s: float = Field(10.0, ge=0)
    # a study whose images keep arriving is analysed this long after the first image of its
    # receiving round with what has arrived; later images start a new round whose result
    # supersedes that one
    max_wait_s: float = Field(600.0, gt=0)
    poll_interval_s: float = Field(1.0, gt=0)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)


class ModelSettings(_Model):
    bundles: list[Path] = Field(default_factory=list)  # empty: the demo bundle
    demo_dir: Path | None = None  # default: <data_dir>/models/demo
    build_demo_if_missing: bool = True
    demo_build: Literal["full", "quick"] = "full"  # quick: seconds, for tests / tiny machines
    device: str = "auto"
    gradcam: bool = True
    max_pixels: int = Field(40_000_000, gt=0)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not re.match(r"^cuda(:\d+)?$", v):
            raise ValueError(f"device {v!r} must be auto, cpu, cuda or cuda:N")
        return v


class WorkerSettings(_Model):
    count: int = Field(1, ge=1, le=64)
    # "process": each worker is an OS process of its own (its own GIL, bounded torch
    # threads), so receiving never waits on inference; "thread": workers share the node's
    # process (tests that inject an analyzer that cannot be sent to another process)
    mode: Literal["process", "thread"] = "process"
    # torch threads of each worker process (None: CPU cores - 1, at least 1): a core is
    # left to the receiver
    torch_threads: int | None = Field(None, ge=1)
    # a worker takes up to this many already-queued jobs at once and analyses their images
    # in one call; it waits at most batch_wait_s for more to arrive (0: never waits)
    batch_jobs: int = Field(4, ge=1, le=64)
    batch_wait_s: float = Field(0.0, ge=0, le=10)
    # CPU priority of worker processes (os.nice increment): when the cores are contended
    # the listener, which answers the PACS, goes first; an idle CPU still goes to inference
    nice: int = Field(10, ge=0, le=19)
    # a worker process that dies is restarted after this, doubled while it keeps dying
    restart_backoff_s: float = Field(1.0, gt=0)
    lease_s: float = Field(300.0, gt=0)
    # a running job renews its lease this often (None: lease_s / 3)
    heartbeat_s: float | None = Field(None, gt=0)
    # attempts per job, counted across restarts (a job that kills the process counts too)
    max_attempts: int = Field(3, ge=1)
    backoff_initial_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    jitter: float = Field(0.2, ge=0, le=1)
    poll_interval_s: float = Field(0.5, gt=0)
    # before a worker says it is ready, it analyses one synthetic image and builds its
    # outputs (discarded), so the first study after a start does not pay the first-use
    # costs (dicom_node.warmup: about 0.9 s on 2 cores); off: ready as soon as loaded
    warm_up: bool = True

    @model_validator(mode="after")
    def _timers(self) -> WorkerSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("workers.backoff_max_s must be >= workers.backoff_initial_s")
        if self.heartbeat_s is not None and self.heartbeat_s >= self.lease_s:
            raise ValueError("workers.heartbeat_s must be shorter than workers.lease_s")
        return self

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_s or self.lease_s / 3.0

    @property
    def torch_thread_count(self) -> int:
        return self.torch_threads or max(1, (os.cpu_count() or 1) - 1)


class OutputSettingsModel(_Model):
    sr: bool = True
    sc: bool = True
    gsps: bool = True
    # the Grad-CAM as a DICOM Segmentation, one segment per positive finding; off by
    # default (many PACS refuse SEG); "binary": the region where the map is >= 0.5 (the form
    # OHIF 3.x shows), "fractional": the map's grades (Weasis, 3D Slicer; OHIF refuses it)
    seg: bool = False
    seg_type: Literal["fractional", "binary"] = "binary"
    institution_name: str | None = None
    heatmap_alpha: float = Field(0.35, ge=0, le=1)
    # detector candidates below their operating threshold: left out of the SR ("omit"),
    # or listed as Absent with their probability and without an image region ("list")
    sr_candidates: Literal["omit", "list"] = "omit"
    # the SC as written: a lossless transfer syntax (keyword or UID; default the fastest
    # installed encoder: JPEG-LS, else RLE, else uncompressed); a destination that does not
    # take it gets the SC decompressed by the sender
    sc_transfer_syntax: str | None = Field(None, validate_default=True)
    # the SC's short side keeps at least this many pixels: a larger image is analysed and
    # overlaid at the deepest halving of its size that keeps them (a JPEG 2000 decoded at
    # that resolution level, any other syntax shrunk right after its decode: faster, the same
    # size whatever the syntax); null: at the source's full size
    sc_min_side: int | None = Field(1024, ge=256)
    # the SC's longest side in pixels (null: the display image's size)
    sc_max_side: int | None = Field(None, ge=256)

    @field_validator("sc_transfer_syntax")
    @classmethod
    def _sc_syntax(cls, v: str | None) -> str:
        return str(fastest_lossless() if v is None else sendable(v))


OutputKind = Literal["sr", "sc", "gsps", "seg"]


class Destination(_Model):
    """A C-STORE destination (DICOM DIMSE): a PACS's AE title, host and port."""

    type: Literal["c-store"] = "c-store"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = None
    # which result objects this destination gets (many PACS refuse SR or GSPS)
    # ("seg" is only built when outputs.seg is on)
    outputs: list[OutputKind] = Field(default_factory=lambda: ["sr", "sc", "gsps", "seg"])
    # transfer syntaxes offered for the secondary capture, in order of preference
    # (keywords or UIDs, e.g. [RLELossless, ExplicitVRLittleEndian]); the SC is transcoded
    # to the one the destination accepts
    sc_transfer_syntaxes: list[str] = Field(
        default_factory=lambda: ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"],
        validate_default=True)
    # ask for Storage Commitment (N-ACTION) after storing; a delivery is 'committed' once
    # the destination's N-EVENT-REPORT confirms it, and re-sent when not within the timeout
    storage_commitment: bool = False
    commitment_timeout_s: float = Field(600.0, gt=0)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("sc_transfer_syntaxes")
    @classmethod
    def _sc_syntaxes(cls, v: list[str]) -> list[str]:
        """Keywords or UIDs -> UIDs (lossless ones the node can encode), order kept."""
        if not v:
            raise ValueError("sc_transfer_syntaxes needs at least one transfer syntax")
        return list(dict.fromkeys(str(sendable(name)) for name in v))

    @property
    def name(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@HOST:PORT`` (the ``--destination`` form)."""
        m = re.match(r"^([^@]{1,16})@([^:]+):(\d+)$", text.strip())
        if not m:
            raise ConfigError(f"destination {text!r} must look like AE@HOST:PORT")
        try:
            return cls(ae_title=m.group(1), host=m.group(2), port=int(m.group(3)))
        except ValidationError as exc:
            raise ConfigError(f"destination {text!r}: {_first_error(exc)}") from exc


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class StowRsAuth(_Model):
    """How the node authenticates to a STOW-RS server. Secrets never sit in the YAML: it
    names the environment variables that hold them (``token_env``, ``password_env``); they
    are read once, when the settings are validated, and kept out of dumps, the settings
    summary and its fingerprint."""

    type: Literal["none", "bearer", "basic"] = "none"
    token_env: str | None = None  # bearer: the variable holding the token
    username: str | None = None  # basic: the user name (not a secret)
    password_env: str | None = None  # basic: the variable holding the password
    _secret: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_secret(self) -> StowRsAuth:
        wanted = {"none": (), "bearer": ("token_env",), "basic": ("username", "password_env")}
        for key in ("token_env", "username", "password_env"):
            value = getattr(self, key)
            if key in wanted[self.type] and not value:
                raise ValueError(f"auth.{key} is required with auth.type {self.type}")
            if key not in wanted[self.type] and value is not None:
                raise ValueError(f"auth.{key} does not apply to auth.type {self.type}")
        variable = self.token_env or self.password_env
        if variable is not None:
            if not _ENV_NAME_RE.match(variable):
                raise ValueError(f"auth: {variable!r} is not an environment variable name "
                                 "(give the variable's name, never the secret itself)")
            secret = os.environ.get(variable)
            if not secret:
                raise ValueError(f"auth: environment variable {variable} is not set or empty")
            self._secret = secret
        return self

    def requests_auth(self) -> tuple[str, str] | None:
        """``requests``' basic-auth pair, or None."""
        if self.type == "basic" and self.username and self._secret:
            return (self.username, self._secret)
        return None

    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header of bearer auth (empty otherwise)."""
        return {"Authorization": f"Bearer {self._secret}"} if self.type == "bearer" else {}


class StowRsDestination(_Model):
    """A DICOMweb destination: results are POSTed to ``<url>/studies`` (STOW-RS).

    ``url`` is the DICOMweb root (Orthanc: ``http://pacs:8042/dicom-web``), never the
    ``/studies`` endpoint itself, and carries no credentials (see ``auth``). Storage
    commitment is a DIMSE service and does not apply: a STOW-RS answer is final.
    """

    type: Literal["stow-rs"]
    url: str
    name_: str | None = Field(None, alias="name")  # shown on the dashboard/API; default: url
    auth: StowRsAuth = Field(default_factory=StowRsAuth)
    verify_tls: bool = True
    ca_file: Path | None = None  # PEM bundle trusted for this server (instead of certifi's)
    timeout_s: float = Field(30.0, gt=0)  # connect and read timeout of one request
    # as for C-STORE destinations: every kind the node builds (the SEG only when outputs.seg)
    outputs: list[OutputKind] = Field(default_factory=lambda: ["sr", "sc", "gsps", "seg"])

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              serialize_by_alias=True)  # dumps say "name", as the YAML

    @model_validator(mode="before")
    @classmethod
    def _no_commitment(cls, data: Any) -> Any:
        if isinstance(data, dict) and "storage_commitment" in data:
            raise ValueError("storage_commitment does not apply to a stow-rs destination "
                             "(a DIMSE service; the STOW-RS response is final)")
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {v!r} must be an http:// or https:// DICOMweb root")
        if parts.username or parts.password:
            raise ValueError("url must not carry credentials: use auth with a *_env variable")
        if parts.query or parts.fragment:
            raise ValueError(f"url {v!r} must not have a query or fragment")
        if parts.path.rstrip("/").endswith("/studies"):
            raise ValueError(f"url {v!r} must be the DICOMweb root, without /studies")
        return v.strip().rstrip("/")

    @model_validator(mode="after")
    def _tls(self) -> StowRsDestination:
        if not 0 < len(self.name) <= 128 or not self.name.isprintable():
            raise ValueError(f"destination name {self.name!r} must be 1-128 printable "
                             "characters (the API filters and resubmits by it): set name")
        if self.ca_file is not None:
            if not self.verify_tls:
                raise ValueError("ca_file needs verify_tls: true")
            if not Path(self.ca_file).is_file():
                raise ValueError(f"ca_file {str(self.ca_file)!r} is not a readable file")
        return self

    @property
    def name(self) -> str:
        """The destination's key in the deliveries table, the dashboard and the API."""
        return self.name_ or f"stow-rs:{self.url}"

    @property
    def storage_commitment(self) -> bool:
        """Never: storage commitment is a DIMSE service (a STOW-RS answer is final)."""
        return False

    @property
    def stow_url(self) -> str:
        return f"{self.url}/studies"

    @property
    def tls_verify(self) -> bool | str:
        """``requests``' ``verify``: the CA file, or whether to check against certifi's CAs
        (requests' default)."""
        return str(self.ca_file) if self.ca_file is not None else self.verify_tls


def _destination_type(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "c-store"))
    return str(getattr(value, "type", "c-store"))


_DESTINATION_TAGS = ("c-store", "stow-rs")
# A destination is a C-STORE peer (no ``type``, or ``type: c-store``) or ``type: stow-rs``.
AnyDestination = Annotated[
    Annotated[Destination, Tag("c-store")] | Annotated[StowRsDestination, Tag("stow-rs")],
    Discriminator(_destination_type, custom_error_type="destination_type",
                  custom_error_message="type must be c-store (the default) or stow-rs")]


class SenderSettings(_Model):
    max_attempts: int = Field(8, ge=1)
    backoff_initial_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)
    jitter: float = Field(0.2, ge=0, le=1)
    timeout_s: float = Field(30.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)
    # after a storage commitment request, keep the association open this long for an
    # N-EVENT-REPORT on it (a PACS may also report later on an association of its own)
    commitment_wait_s: float = Field(5.0, ge=0)


class WebSettings(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str | None = None  # None: a random token written to <data_dir>/api-token
    # production WSGI server (waitress): bounded worker threads and connections; an open
    # connection costs a socket, not a thread, so the limit is high enough that slow or
    # idle clients cannot lock real ones out (the open-file limit is raised to match)
    threads: int = Field(8, ge=1, le=256)
    connection_limit: int = Field(1000, ge=1, le=10000)
    channel_timeout_s: float = Field(30.0, gt=0)  # an idle or stalled client is dropped
    max_request_body_bytes: int = Field(1024 * 1024, gt=0)


class SyslogSettings(_Model):
    """Forward audit events as RFC 5424 messages; events wait in the database while the
    syslog server is down, so none is dropped."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(514, ge=1, le=65535)
    protocol: Literal["udp", "tcp"] = "udp"
    app_name: str = "cxr-ai-node"
    facility: int = Field(10, ge=0, le=23)  # 10 = security/authorization (authpriv)
    poll_interval_s: float = Field(2.0, gt=0)


class AuditSettings(_Model):
    syslog: SyslogSettings = Field(default_factory=SyslogSettings)


class LoggingSettings(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(_Model):
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    studies: StudySettings = Field(default_factory=StudySettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    outputs: OutputSettingsModel = Field(default_factory=OutputSettingsModel)
    destinations: list[AnyDestination] = Field(default_factory=list)
    sender: SenderSettings = Field(default_factory=SenderSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)

    @model_validator(mode="after")
    def _backoff(self) -> Settings:
        if self.sender.backoff_max_s < self.sender.backoff_initial_s:
            raise ValueError("sender.backoff_max_s must be >= sender.backoff_initial_s")
        names = [d.name for d in self.destinations]
        for name in dict.fromkeys(n for n in names if names.count(n) > 1):
            raise ValueError(f"destinations: two destinations are named {name!r}")
        return self

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.storage.data_dir / 'node.db'}"

    @property
    def demo_bundle_dir(self) -> Path:
        return self.models.demo_dir or (self.storage.data_dir / "models" / "demo")

    @property
    def bundle_dirs(self) -> list[Path]:
        """The configured bundles, or else the demo bundles present (one sub-folder each)."""
        if self.models.bundles:
            return list(self.models.bundles)
        root = self.demo_bundle_dir
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if (p / "configs" / "metadata.json").is_file())



def _absolute_path(path: Path, base: Path) -> Path:
    return Path(os.path.normpath(base / path.expanduser()))


def _with_absolute_paths(value: Any, base: Path) -> Any:
    """``value`` with every :class:`Path` inside it (fields of nested models, lists, dicts)
    made absolute against ``base``; unchanged parts are returned as they are."""
    if isinstance(value, Path):
        return _absolute_path(value, base)
    if isinstance(value, BaseModel):
        updates = {}
        for name in type(value).model_fields:
            old = getattr(value, name)
            new = _with_absolute_paths(old, base)
            if new is not old:
                updates[name] = new
        return value.model_copy(update=updates) if updates else value
    if isinstance(value, (list, tuple)):
        items = [_with_absolute_paths(v, base) for v in value]
        changed = any(a is not b for a, b in zip(items, value, strict=True))
        return type(value)(items) if changed else value
    if isinstance(value, dict):
        pairs = {k: _with_absolute_paths(v, base) for k, v in value.items()}
        return pairs if any(pairs[k] is not value[k] for k in value) else value
    return value


def resolve_paths(settings: Settings, base: Path | None = None) -> Settings:
    """The settings with every path absolute: relative ones are taken against ``base``
    (default: the current working directory), ``~`` is expanded."""
    return _with_absolute_paths(settings, Path.cwd() if base is None else base)  # type: ignore[no-any-return]


_URL_USERINFO_RE = re.compile(r"(?<=://)[^/@\s'\"]+@")


def _first_error(exc: ValidationError) -> str:
    """Every error with its key and value; user:password in a URL is masked."""
    parts = []
    for err in exc.errors():
        # the union's tag (destinations.0.stow-rs.url) is not a key the user wrote
        key = ".".join(str(p) for p in err["loc"] if p not in _DESTINATION_TAGS) or "<root>"
        parts.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return _URL_USERINFO_RE.sub("***@", "; ".join(parts))


def _set_path(tree: dict[str, Any], dotted: list[str], value: Any) -> None:
    node = tree
    for key in dotted[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot override {'.'.join(dotted)}: {key} is not a section")
    node[dotted[-1]] = value


def env_overrides(environ: dict[str, str]) -> list[tuple[list[str], Any]]:
    """``CXR_NODE__DICOM__PORT=4242`` -> (["dicom", "port"], 4242); values parsed as YAML."""
    out = []
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX):
            dotted = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
            out.append((dotted, yaml.safe_load(raw) if raw else raw))
    return out


def load_settings(
    path: Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Load YAML (optional), apply environment then explicit overrides (dotted keys), and
    make every path absolute against the working directory (see :func:`resolve_paths`)."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {str(path)!r} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top")
        tree = loaded or {}
    for dotted, value in env_overrides(dict(os.environ if environ is None else environ)):
        _set_path(tree, dotted, value)
    for key, value in (overrides or {}).items():
        _set_path(tree, key.split("."), value)
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_first_error(exc)}") from exc
    return resolve_paths(settings)
