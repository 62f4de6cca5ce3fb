"""A tiny trained checkpoint and an image folder for the inference, serving and export tests.

One training step on synthetic shapes: the model is barely trained, which is enough to check that every path
encodes exactly as eval.py does. Building takes 5-30 s on two CPU cores, so it is made once per test session
under pytest's base temporary folder: every test module calls `tiny_run` with that folder, and later calls
find the files already there.
"""
import random
from pathlib import Path

import demo
import train

REPO = Path(__file__).resolve().parents[1]
VALID_SCENES = 24  # a small validation split (demo.make_demo would write all 576 scenes)


def tiny_run(base):
    """Return {"checkpoint", "images", "text_model", "captions"} of a one-step demo model built under `base`."""
    base = Path(base) / "tiny"
    paths = {"checkpoint": base / "ck" / "best.pt", "images": base / "valid" / "images",
             "text_model": base / "text", "captions": base / "valid" / "captions.csv"}
    if paths["checkpoint"].is_file():
        return paths
    valid = base / "valid"
    if not (valid / "captions.csv").is_file():  # written before make_demo, which then leaves it alone
        scenes = random.Random(1).sample(demo.all_scenes(), VALID_SCENES)
        demo.write_split(str(valid), scenes, 1, random.Random(2))
    demo.make_demo(str(base / "train"), str(valid), str(base / "text"), train_images=16, captions_per_image=1)
    train.main(["--config", str(REPO / "configs" / "demo.yaml"), "--train-root", str(base / "train"),
                "--valid-root", str(valid), "--text-model", str(base / "text"), "--epochs", "1",
                "--batch-size", "16", "--image-size", "32", "--num-workers", "0",
                "--last-path", str(base / "ck" / "last.pt"), "--best-path", str(paths["checkpoint"])])
    return paths
