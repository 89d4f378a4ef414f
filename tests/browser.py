"""Headless Chromium driven through WebDriver (selenium + Debian's chromedriver), for
the tests that look at a page as a person would. ``make browser`` installs both."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium + chromedriver (make test installs Debian's chromium-driver)",
)


@contextlib.contextmanager
def chrome(width: int = 1200, height: int = 900) -> Iterator:
    """A headless Chromium window; closed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float = 120, what: str = "the page"):
    """``condition(driver)`` once truthy; on timeout, the assertion names ``what`` and
    the page's status line."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        status = driver.execute_script(
            "const s = document.getElementById('status'); return s ? s.textContent : ''"
        )
        raise AssertionError(f"{what} did not happen in {timeout} s (status: {status!r})") from None
