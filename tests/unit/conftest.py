from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.emulators.gce import GceEmulator


@pytest.fixture
def gce() -> Iterator[GceEmulator]:
    """A GCE metadata and Compute emulator on 127.0.0.1, stopped after the test."""
    emulator = GceEmulator().start()
    try:
        yield emulator
    finally:
        emulator.stop()
