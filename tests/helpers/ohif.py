"""OHIF Viewer v3 in headless Chromium for the viewer tests: ``scripts/ohif_server.py``
(install from npm into a cache, serve same-origin with Orthanc's DICOMweb behind it) plus
a browser that records every uncaught error and reads OHIF's state through ``window``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import ROOT, wait_until

from helpers.browser import browser


def _load() -> ModuleType:
    """Import ``scripts/ohif_server.py`` once, as the module ``ohif_server``."""
    if "ohif_server" in sys.modules:
        return sys.modules["ohif_server"]
    spec = importlib.util.spec_from_file_location("ohif_server",
                                                  ROOT / "scripts" / "ohif_server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ohif_server"] = module
    spec.loader.exec_module(module)
    return module


ohif_server = _load()
OhifServer = ohif_server.OhifServer

# Every host but loopback resolves to nothing: proof that the viewer needs no network.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"

# Installed before any page script runs (CDP), so errors during OHIF's start count too.
# It also marks OHIF's first-visit tour as seen (its overlay would catch the test's clicks).
ERROR_HOOK = """
localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
window.__uncaught = [];
window.addEventListener('error', e => window.__uncaught.push(
  'error: ' + (e.message || (e.error && e.error.message) || String(e.target && e.target.src))));
window.addEventListener('unhandledrejection', e => window.__uncaught.push(
  'unhandledrejection: ' + (e.reason && (e.reason.stack || e.reason.message) || e.reason)));
"""


def ohif_dist() -> Path:
    """The cached OHIF ``dist/`` (fetched with npm the first time): fails, never skips,
    when npm cannot provide it."""
    try:
        return ohif_server.install_ohif()
    except ohif_server.OhifError as exc:
        pytest.fail(f"OHIF Viewer (@ohif/app@{ohif_server.OHIF_VERSION}) could not be "
                    f"installed from npm: {exc}")


def ohif_browser(profile: Path) -> Any:
    """Chromium with software WebGL, no network but loopback, and the error hook."""
    driver = browser(profile, webgl=True, extra_args=(OFFLINE,))
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_HOOK})
    return driver


def page_errors(driver: Any) -> list[str]:
    """Uncaught errors and unhandled rejections of the page, plus SEVERE browser-log lines
    (console.error, failed loads)."""
    hooked = driver.execute_script("return window.__uncaught || []")
    logged = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    return [str(m) for m in hooked] + logged


def wait_js(driver: Any, script: str, timeout: float, what: str) -> Any:
    """Poll ``script`` (a JS expression body returning a value) until it is truthy."""
    value: list[Any] = [None]

    def ready() -> bool:
        value[0] = driver.execute_script(script)
        return bool(value[0])

    wait_until(ready, timeout, interval=0.25, what=what)
    return value[0]
