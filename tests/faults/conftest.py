"""In-process runs here read stderr through capsys: Lightning's log handler, made when Lightning was first
imported (possibly inside an earlier test's capture), is pointed at the current stderr before each test so it
never writes to a capture that has been closed."""

from __future__ import annotations

import logging
import sys

import pytest


@pytest.fixture(autouse=True)
def _lightning_logs_to_the_current_stderr():
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.stream = sys.stderr  # not setStream: it would flush the closed one
    yield
