"""Fixtures for the training tests (helpers live in engine_helpers.py)."""

import os

import pytest
import torch

os.environ.setdefault("EMAMBA_SCAN_BACKEND", "torch")  # tests must not depend on the fused kernel's state


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
