"""Shared fixtures. Tests that need ../shared/datasets skip where it is absent (a user's
machine) but fail under CI=true, so CI never silently skips them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/datasets/<name>``; skip (or fail under CI=true) when absent."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        reason = f"{path} is absent: this test needs the staged dataset {name!r} (../shared/datasets)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " — CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    return path


@pytest.fixture(autouse=True)
def _two_threads():
    # CI has 2 cores; keep tests honest about that and deterministic.
    torch.set_num_threads(2)
    yield
