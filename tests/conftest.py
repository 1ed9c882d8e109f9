"""
Fixtures shared by the test files (plain helper functions are in testutil.py).
"""
import pytest
import torch

import tinyworld
import weightfiles


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """The tiny demo DiT, Gemma and AE in the real file layouts, written once per session (about 4 s): the
    files are only read by the tests, and a test that needs another file writes its own copy."""
    return tinyworld.make_demo_weights(str(tmp_path_factory.mktemp("weights")))


@pytest.fixture
def ae(weights):
    """The demo AE in fp32, loaded through the real loader (a fresh one per test)."""
    return weightfiles.load_ae(weights["ae"], dtype=torch.float32)


@pytest.fixture
def te(weights):
    """The demo Gemma text encoder in fp32, loaded through the real loader (a fresh one per test)."""
    return weightfiles.load_text_encoder(weights["gemma"], dtype=torch.float32)
