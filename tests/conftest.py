"""Shared fixtures; the helpers they use are in tests/helpers.py."""
import os

import pytest
import torch

import train
from inference import index as search_index
from inference.encoder import Encoder
from tests.helpers import make_tiny_data, tiny_run, tiny_train_args

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 (the README's command): two test processes share the cores. One torch thread each, and in every
    # process a test starts: OpenMP threads that outnumber the cores spin against each other and run several
    # times slower.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """train/ (24 images x 2 captions), valid/ (12 images x 1 caption), text/ (a 1-layer RoBERTa)."""
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory):
    """(folder, train.main's history) of a run with tiny_train_args' defaults (2 epochs of 5 steps), trained once
    per session for test_train and test_runs_table: tests read its files or copy the folder, and add no more than
    their own outputs (eval.py's JSON) to it."""
    out = tmp_path_factory.mktemp("run")
    history = train.main(tiny_train_args(tiny_data, out))
    return out, history


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A one-step demo checkpoint, its validation images and text model (see helpers.tiny_run)."""
    return tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def encoder(tiny):
    """The tiny checkpoint's encoder on the CPU, one per test module (a module may define its own)."""
    return Encoder(str(tiny["checkpoint"]), "cpu")


@pytest.fixture(scope="module")
def index_dir(tiny, encoder, tmp_path_factory):
    """A flat index of the tiny checkpoint's validation images, one per test module."""
    out = tmp_path_factory.mktemp("index") / "index"
    search_index.build_index(encoder, str(tiny["images"]), str(out), progress=False)
    return out
