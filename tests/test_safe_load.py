"""Opening a model file runs no code (issue 17): checkpoints are read with torch.load(weights_only=True), so a file
carrying a pickled call is refused in one line by every entry, and what train.py saves loads under that loader."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_entry
import train
from bench.study import read_run
from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.runtime import rng_state, set_rng_state
from inference import classify, export, search, serve
from tests.helpers import one_line_exit, tiny_train_args
from tests.trusted import TRUSTED


class Payload:
    """Unpickling this calls os.system, which creates `marker`: the attack of issue 17."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def small_checkpoint():
    """The shape of a train.py checkpoint, in miniature: the payload only has to sit where real values do."""
    return {"model": {"image.proj.weight": torch.zeros(2, 2)}, "config": {"image-model": "resnet18", "seed": 0},
            "metrics": {"rsum": 0.5}, "rng": [rng_state()],
            "optimizer": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2, 2)}},
                          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]},
            "scheduler": {"last_epoch": 1}, "scaler": {}, "epoch": 0, "best_rsum": 0.5, "log_line": {"epoch": 0}}


def plant(place, payload):
    ckpt = small_checkpoint()
    if place == "top level":
        return payload
    if place == "top-level key":
        ckpt["extra"] = payload
    elif place == "config":
        ckpt["config"]["image-model"] = payload
    elif place == "metrics":
        ckpt["metrics"]["rsum"] = payload
    elif place == "rng state":
        ckpt["rng"][0]["numpy"] = payload
    elif place == "optimizer state":
        ckpt["optimizer"]["state"][0]["exp_avg"] = payload
    elif place == "model weights":
        ckpt["model"]["image.proj.weight"] = payload
    return ckpt


PLACES = ["top level", "top-level key", "config", "metrics", "rng state", "optimizer state", "model weights"]


def evil_file(tmp_path, place):
    """(the .pt file, the marker its payload would create)."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save(plant(place, Payload(marker)), path)
    return path, marker


def image_file(tmp_path):
    path = tmp_path / "cat.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    return path


def run_eval(path, tmp_path, data):
    eval_entry.main(["--model-path", str(path), "--valid-root", str(data / "valid"), "--device", "cpu",
                     "--output", str(tmp_path / "eval.json")])


def run_train_resume(path, tmp_path, data):
    out = tmp_path / "run"
    train.main(tiny_train_args(data, out, "--load-checkpoint", "true", "--load-path", str(path)))


def run_study(path, tmp_path, data):
    os.replace(path, tmp_path / "best.pt")
    (tmp_path / "report.json").write_text("{}")
    read_run(str(tmp_path))


ENTRIES = {
    "eval": run_eval,
    "train resume": run_train_resume,
    "classify": lambda p, t, d: classify.main(["--model-path", str(p), "--image", str(image_file(t)),
                                               "--labels", "cat,dog", "--device", "cpu"]),
    "search index": lambda p, t, d: search.main(["index", "--model-path", str(p), "--images", str(d / "valid"),
                                                 "--output", str(t / "index"), "--device", "cpu"]),
    "search query": lambda p, t, d: search.main(["query", "--model-path", str(p), "--captions",
                                                 str(d / "valid" / "captions.csv"), "--image", str(image_file(t)),
                                                 "--device", "cpu"]),
    "export onnx": lambda p, t, d: export.main(["--model-path", str(p), "--output", str(t / "onnx")]),
    "export hf": lambda p, t, d: export.main(["--format", "hf", "--model-path", str(p), "--output", str(t / "hf")]),
    "study": run_study,
}


@pytest.mark.parametrize("place", PLACES)
def test_the_payload_runs_when_unpickled_the_old_way(place, tmp_path):
    """The files of these tests are real attacks: the loader these entries used before ran them."""
    path, marker = evil_file(tmp_path, place)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("place", PLACES)
def test_every_entry_refuses_a_file_that_would_run_code(entry, place, tmp_path, tiny_data):
    path, marker = evil_file(tmp_path, place)
    with pytest.raises((SystemExit, CheckpointError)) as excinfo:  # bench.study's reader raises, its entry exits
        ENTRIES[entry](path, tmp_path, tiny_data)
    message = str(excinfo.value) if excinfo.type is CheckpointError else one_line_exit(excinfo)
    assert "was refused: it holds posix.system" in message and str(tmp_path) in message, message
    assert not marker.exists()


def test_serve_refuses_a_file_that_would_run_code(tmp_path, index_dir):
    path, marker = evil_file(tmp_path, "config")
    with pytest.raises(SystemExit) as excinfo:
        serve.main(["--model-path", str(path), "--index", str(index_dir), "--device", "cpu", *TRUSTED])
    assert "refused" in one_line_exit(excinfo) and not marker.exists()


def test_what_train_saves_loads_with_the_strict_safe_loader(tiny):
    """No allowlist at all: torch.load's default weights_only=True reads a checkpoint of today's train.py."""
    ckpt = torch.load(tiny["checkpoint"], weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "config", "metrics", "log_line", "text_vocab"} <= set(ckpt)
    kind, keys, pos, *_ = ckpt["rng"][0]["numpy"]
    assert kind == "MT19937" and keys.dtype == torch.int64 and keys.shape == (624,) and 0 <= pos <= 624


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    save_checkpoint(tmp_path / "c.pt", model={}, config={}, rng=[rng_state()])
    expected = (random.random(), np.random.rand(4).tolist(), torch.rand(3).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0])
    assert (random.random(), np.random.rand(4).tolist(), torch.rand(3).tolist()) == expected


def test_checkpoints_written_before_the_change_still_load_safely(tmp_path):
    """Their NumPy RNG state is an ndarray (and older metrics may be NumPy numbers): rebuilt, not refused."""
    np.random.seed(7)
    old = {"model": {"w": torch.ones(2)}, "config": {"seed": 0}, "metrics": {"rsum": np.float64(1.25)},
           "rng": [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}]}
    torch.save(old, tmp_path / "old.pt")
    expected = np.random.rand(5).tolist()
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert ckpt["metrics"]["rsum"] == 1.25
    np.random.seed(0)
    set_rng_state(ckpt["rng"][0])
    assert np.random.rand(5).tolist() == expected


def test_saving_converts_numpy_values_and_refuses_other_objects(tmp_path):
    save_checkpoint(tmp_path / "c.pt", model={}, config={"x": np.int64(3)}, metrics={"r": np.float32(0.5)},
                    extra=np.arange(3))
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ckpt["config"]["x"] == 3 and type(ckpt["config"]["x"]) is int and ckpt["metrics"]["r"] == 0.5
    assert ckpt["extra"].tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match=r"state\['config'\]\['f'\] is a function"):
        save_checkpoint(tmp_path / "d.pt", model={}, config={"f": lambda: 0})
    assert not (tmp_path / "d.pt").exists()


def test_a_damaged_file_is_still_one_line(tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint(path, model={"w": torch.zeros(1000)}, config={})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
