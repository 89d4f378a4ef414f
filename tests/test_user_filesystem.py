"""What ``kiln export`` and ``kiln generate`` leave on the user's filesystem: folders with
the user's permissions."""

from __future__ import annotations

import os

import pytest

from training.cli import outputs


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_an_exported_folder_has_the_users_permissions(tmp_path, umask_022):
    """Was drwx------ whatever the umask (``tempfile.mkdtemp``): a team sharing the
    folder could not read the exported pipeline."""
    out = tmp_path / "exported"
    with outputs.whole_folder(out) as tmp:
        (tmp / "model_index.json").write_text("{}")
    assert out.stat().st_mode & 0o777 == 0o755
    os.umask(0o077)  # a private umask is the user's to choose, and kept
    private = tmp_path / "private"
    with outputs.whole_folder(private) as tmp:
        (tmp / "model_index.json").write_text("{}")
    assert private.stat().st_mode & 0o777 == 0o700
