"""Headless Debian Chromium through Selenium and chromium-driver, for the dashboard e2e
tests: start a browser, log in, check that images really loaded, keep screenshots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"  # gitignored; kept as artefacts


WEBGL_ARGS = ("--use-angle=swiftshader", "--enable-unsafe-swiftshader")


def browser(profile: Path, *, extra_args: tuple[str, ...] = (), webgl: bool = False) -> Any:
    """Headless Chromium; ``webgl`` renders WebGL in software (SwiftShader) instead of
    disabling the GPU, for viewers that draw with WebGL (OHIF); ``extra_args`` are added
    as they are. The browser log (console errors) is readable with get_log("browser")."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            pytest.fail(f"{path} is missing: install the Debian package {package} "
                        "(`make test` does, through scripts/install-system-deps.sh --test)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    gpu = WEBGL_ARGS if webgl else ("--disable-gpu",)
    for arg in ("--headless=new", "--no-sandbox", *gpu, "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1000",
                *extra_args):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    driver.set_page_load_timeout(30)
    return driver


def shoot(driver: Any, name: str) -> Path:
    """A full-page screenshot under test-artifacts/screenshots/<name>.png."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(int(height) + 40, 800), 6000))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"screenshot of {name} failed"
    print(f"screenshot: {path.relative_to(ROOT)}")
    return path


def loaded(driver: Any, selector: str) -> int:
    """How many images matching ``selector`` are fully loaded with real pixels."""
    return int(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".filter(i => i.complete && i.naturalWidth > 0).length", selector))


def images(driver: Any) -> tuple[int, list[str]]:
    """(number of <img> on the page, the src of each one that is not loaded, or broken)."""
    total, broken = driver.execute_script(
        "const all = Array.from(document.images);"
        "return [all.length, all.filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.getAttribute('src'))];")
    return int(total), list(broken)


def all_images_loaded(driver: Any, page: str, timeout: float = 60) -> int:
    """Wait until every <img> of the page is complete with naturalWidth > 0; returns how
    many there are. A broken one (a 500, a 404) fails with its address."""
    def settled() -> bool:
        return bool(driver.execute_script(
            "return Array.from(document.images).every(i => i.complete)"))

    wait_until(settled, timeout, interval=0.2, what=f"images of the {page} page")
    total, broken = images(driver)
    assert not broken, f"{page}: images not loaded: {broken}"
    return total
