"""Shared fixtures; the helpers they use are in tests/helpers.py."""
import pytest

from tests.helpers import make_tiny_data, tiny_run


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """train/ (24 images x 2 captions), valid/ (12 images x 1 caption), text/ (a 1-layer RoBERTa)."""
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A one-step demo checkpoint, its validation images and text model (see helpers.tiny_run)."""
    return tiny_run(tmp_path_factory.getbasetemp())
