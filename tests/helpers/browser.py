"""Headless Chromium (Debian's `chromium` and `chromium-driver`) through Selenium, and `mlflow ui`
on 127.0.0.1, for tests that look at what MLflow's UI renders."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.mlflow_server import free_port, wait_until_up

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1000"]


def why_no_browser() -> str | None:
    """Why no headless Chromium can be driven here (one line), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for binary in ("chromium", "chromedriver"):
        if shutil.which(binary) is None:
            return f"no {binary} on PATH (apt-get install chromium chromium-driver)"
    return None


@contextmanager
def mlflow_ui(store_uri: str, log_file: Path, startup_s: float = 90):
    """`mlflow ui` on the store at a free port of 127.0.0.1; yields its base URL. The process
    (in its own session, with its workers) is stopped by its id on the way out."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(log_file, "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(base, proc, log_file, startup_s, "mlflow ui")
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@contextmanager
def chromium():
    """A headless Chromium with a fresh profile; quit (driver and browser) on the way out."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, what: str, probe, timeout_s: float = 40):
    """Poll `probe(driver)` until it returns something true; fail naming `what` and the page's text."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = probe(driver)
        except Exception:  # the page is still being rebuilt
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            text = driver.find_element("tag name", "body").text[:1500]
            raise AssertionError(f"{what} not rendered within {timeout_s} s at {driver.current_url}; the page shows:\n{text}")
        time.sleep(0.5)


def page_text(driver) -> str:
    return driver.find_element("tag name", "body").text
