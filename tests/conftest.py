"""Shared fixtures: tiny datasets and text models that the tests build themselves (no downloads)."""
import csv
import os
import random

import pytest

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_split(root, scenes, captions_per_image, seed=0):
    """A dataset folder in the real layout, with demo scenes (captions describe the picture)."""
    return demo.write_split(str(root), scenes, captions_per_image, random.Random(seed))


def write_csv(root, rows, header=("filename", "caption")):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "captions.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """train/ (24 images x 2 captions), valid/ (12 images x 1 caption), text/ (a 1-layer RoBERTa)."""
    base = tmp_path_factory.mktemp("tiny")
    scenes = demo.all_scenes()
    rng = random.Random(0)
    rows = write_split(base / "train", rng.sample(scenes, 24), 2, seed=1)
    write_split(base / "valid", rng.sample(scenes, 12), 1, seed=2)
    demo.write_text_model(str(base / "text"), [c for _, c in rows], hidden=32, layers=1)
    return base


def tiny_train_args(data, out, *extra):
    """Command-line arguments for a seconds-long CPU training run on `tiny_data`."""
    return ["--config", os.path.join(ROOT, "configs", "demo.yaml"),
            "--train-root", str(data / "train"), "--valid-root", str(data / "valid"),
            "--text-model", str(data / "text"), "--demo-data", "false",
            "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--warmup-steps", "2",
            "--num-workers", "0", "--device", "cpu",
            "--last-path", str(out / "last.pt"), "--best-path", str(out / "best.pt"), *extra]
