"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

# The project's shared reference folder sits beside the repository root (../shared); a clone
# elsewhere has none, and the tests that read it skip.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared`` folder beside the repository root; skips the test when it is absent."""
    if not (SHARED / "data" / "model-configs").is_dir():
        pytest.skip("../shared/data/model-configs not found")
    return SHARED
