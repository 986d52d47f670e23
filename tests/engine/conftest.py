"""Fixtures for the training tests (helpers live in engine_helpers.py)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _portable_scan_one_thread():
    """Engine tests check training logic, not kernels: pin the portable scan and one thread.

    Module-scoped and autouse, so it is in place before module-scoped fixtures that train (an
    uninterrupted reference run must use the same backend as the resumed one), and undone after the
    module so the model and ops tests keep exercising the ``auto`` backend. Subprocesses inherit it.
    """
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMAMBA_SCAN_BACKEND", "torch")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)
