"""What the tests build for themselves: dataset folders in the real layout, a tiny text model, command lines for
seconds-long CPU runs, and a tiny trained checkpoint. Every test imports these as `from tests.helpers import ...`;
fixtures live in conftest.py."""
import contextlib
import csv
import os
import random
import socket
from pathlib import Path

import torch
from transformers import AutoModel

import train
from dataset import tokenize
from model import RetrievalModel, load_tokenizer
from tools import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = Path(ROOT)
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.yaml")
DEMO_EVAL_CONFIG = os.path.join(ROOT, "configs", "demo-eval.yaml")
VALID_SCENES = 24  # a small validation split (demo.make_demo would write all 576 scenes)


def write_split(root, scenes, captions_per_image, seed=0):
    """A dataset folder in the real layout, with demo scenes (captions describe the picture)."""
    return demo.write_split(str(root), scenes, captions_per_image, random.Random(seed))


def write_csv(root, rows, header=("filename", "caption")):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "captions.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_tiny_data(base):
    """train/ (24 images x 2 captions), valid/ (12 images x 1 caption), text/ (a 1-layer RoBERTa)."""
    scenes = demo.all_scenes()
    rng = random.Random(0)
    rows = write_split(base / "train", rng.sample(scenes, 24), 2, seed=1)
    write_split(base / "valid", rng.sample(scenes, 12), 1, seed=2)
    demo.write_text_model(str(base / "text"), [c for _, c in rows], hidden=32, layers=1)
    return base


def tiny_train_args(data, out, *extra):
    """Command-line arguments for a seconds-long CPU training run on `tiny_data`; each `--key value` pair of
    `extra` replaces the default of its key (a key given twice on the command line is an error)."""
    args = {"--config": DEMO_CONFIG,
            "--train-root": str(data / "train"), "--valid-root": str(data / "valid"),
            "--text-model": str(data / "text"), "--demo-data": "false",
            "--image-size": "32", "--batch-size": "8", "--epochs": "2", "--warmup-steps": "2",
            "--num-workers": "0", "--device": "cpu", "--select-images": "4", "--report-every-epoch": "false",
            "--last-path": str(out / "last.pt"), "--best-path": str(out / "best.pt")}
    if len(extra) % 2:
        raise ValueError(f"extra arguments come in --key value pairs, got {extra}")
    args.update(zip(extra[::2], extra[1::2], strict=True))
    return [token for pair in args.items() for token in pair]


def tiny_run(base):
    """{"checkpoint", "images", "text_model", "captions"} of a one-step demo model built under `base`.

    The model is barely trained, which is enough to check that every inference path encodes exactly as
    evaluation does. Building takes 5-30 s on two CPU cores, so it is made once per test session under pytest's
    base temporary folder: later calls find the files already there.
    """
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
    train.main(["--config", DEMO_CONFIG, "--train-root", str(base / "train"),
                "--valid-root", str(valid), "--text-model", str(base / "text"), "--epochs", "1",
                "--batch-size", "16", "--image-size", "32", "--num-workers", "0", "--select-root", str(valid),
                "--last-path", str(base / "ck" / "last.pt"), "--best-path", str(paths["checkpoint"])])
    return paths


# ---------------------------------------------------------------- a tiny model and batch for step tests
B = 16


def tiny_model(text_dir, dropout):
    text = AutoModel.from_pretrained(str(text_dir), hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout, add_pooling_layer=False)
    torch.manual_seed(0)
    model = RetrievalModel(text, "resnet18", pretrained=False, learnable_temperature=True)
    return model.freeze(batchnorm=True).train()


def tiny_batch(text_dir):
    g = torch.Generator().manual_seed(1)
    captions = [f"a {s} {c} circle in the {p}" for s in ("small", "big") for c in ("red", "blue")
                for p in ("top", "left", "bottom", "right")][:B]
    ids, mask = tokenize(load_tokenizer(str(text_dir)), captions, 32)
    return {"images": torch.randn(B, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "image_ids": torch.tensor([i // 2 for i in range(B)])}  # pairs of captions share an image


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=1e-5):
    assert a.keys() == b.keys() and len(a) > 40
    for n in a:
        assert torch.allclose(a[n], b[n], atol=tol, rtol=1e-4), (n, (a[n] - b[n]).abs().max().item())


class NoScaler:
    def scale(self, loss):
        return loss


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, *args, world_size=2):
    """Run `target(rank, world_size, port, *args)` in `world_size` fresh processes; each must exit cleanly."""
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world_size, port, *args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0


@contextlib.contextmanager
def gloo_group(rank, world_size, port):
    """The gloo process group of one of spawn's processes; left after a barrier, so that no process tears it down
    while another still sends."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    yield
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def spawn_into(folder, target, *args):
    """spawn(target, *args, folder): processes that save what the tests compare into `folder`; returns it."""
    spawn(target, *args, str(folder))
    return folder



def one_line_exit(excinfo):
    """The message of an entry's SystemExit, checked to be one `error:` line with no traceback."""
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message
