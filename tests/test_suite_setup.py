"""The suite's own plumbing (tests/conftest.py) works with and without pytest-xdist."""

import subprocess
import sys

from .conftest import REPO


def test_the_suite_collects_without_xdist():
    """conftest's xdist scheduler hook is optional: `pytest -p no:xdist` (one process, no
    plugin) must collect, not stop at 'unknown hook pytest_xdist_make_scheduler'."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "--collect-only", "-q",
         "tests/test_config.py"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "test_config.py::" in proc.stdout
