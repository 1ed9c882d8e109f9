"""
Fixtures shared by the test files (plain helper functions are in testutil.py).
"""
import pytest

import data


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """The tiny demo DiT, Gemma and AE in the real file layouts, written once per session (about 4 s): the
    files are only read by the tests, and a test that needs another file writes its own copy."""
    return data.make_demo_weights(str(tmp_path_factory.mktemp("weights")))
