"""pytest configuration: one shared Inductor cache and a fresh Dynamo state per test."""

from __future__ import annotations

import os

# One Inductor cache for every test run on this machine: recompiles become cache hits.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/slimcompile/inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
