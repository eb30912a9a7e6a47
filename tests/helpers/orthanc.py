"""A real Orthanc for tests: ``scripts/orthanc.py`` loaded as a module, plus test helpers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from conftest import ROOT, require_tool


def _load() -> ModuleType:
    """Import ``scripts/orthanc.py`` once, as the module ``orthanc`` (as scripts/demo.py does)."""
    if "orthanc" in sys.modules:
        return sys.modules["orthanc"]
    spec = importlib.util.spec_from_file_location("orthanc", ROOT / "scripts" / "orthanc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["orthanc"] = module
    spec.loader.exec_module(module)
    return module


orthanc = _load()
OrthancServer = orthanc.OrthancServer


class _ConfiguredOrthanc(OrthancServer):  # type: ignore[misc, valid-type]
    """An OrthancServer whose generated configuration gets ``extra`` keys on top."""

    def __init__(self, *args: Any, extra: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra = extra

    def write_config(self) -> Path:
        path = super().write_config()
        config = json.loads(path.read_text(encoding="utf-8"))
        config.update(self.extra)
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return Path(path)


def start_orthanc(work_dir: Path, node_port: int, *, stable_age: int = 2,
                  node_ae: str = "CXR_AI", dicomweb: bool = False,
                  users: dict[str, str] | None = None) -> Any:
    """A started OrthancServer routing to the node on ``node_port`` (fails if not installed).

    ``dicomweb``: load the DICOMweb plugin (Debian ``orthanc-dicomweb``) at ``/dicom-web/``
    (``pacs.url + "/dicom-web"`` is the root a stow-rs destination names; OHIF reads through
    it). ``users``: HTTP basic authentication on (user -> password), for the REST API and
    DICOMweb alike; the helper's own REST calls use the first user.
    """
    binary = require_tool("Orthanc")
    extra: dict[str, Any] = {}
    if users:
        extra.update(AuthenticationEnabled=True, RegisteredUsers=dict(users))
    server = _ConfiguredOrthanc(work_dir, node_port=node_port, node_ae=node_ae,
                                stable_age=stable_age, binary=binary, dicomweb=dicomweb,
                                extra=extra)
    if users:
        server.session.auth = next(iter(users.items()))
    return server.start()


def all_series(pacs: Any) -> list[dict[str, Any]]:
    """Every series in Orthanc (expanded records)."""
    return pacs.rest("/series?expand")


def modalities(pacs: Any, study_id: str) -> list[str]:
    """Sorted Modality of each series of the study."""
    return sorted(s["MainDicomTags"].get("Modality", "") for s in pacs.study_series(study_id))


def store_jobs(pacs: Any) -> list[dict[str, Any]]:
    """C-STORE jobs Orthanc ran towards modalities (one per auto-routed batch)."""
    return [j for j in pacs.rest("/jobs?expand") if j.get("Type") == "DicomModalityStore"]
