"""The demo is the same bytes on every fresh run: images, captions, tokenizer and text-model weights.

Each copy is written by its own process with a different Python hash seed and a different number of threads
for the tokenizer trainer, so neither set order nor a multi-threaded merge can creep into the files unseen.
"""
import os
import subprocess
import sys

import torch

from tests.helpers import ROOT
from tools import demo

WRITE = ("import sys; from tools.demo import make_demo; d = sys.argv[1]\n"
         "for lang in ('en', 'zh'):\n"
         "    make_demo(f'{d}/{lang}/train', f'{d}/{lang}/valid', f'{d}/{lang}/text', train_images=40, language=lang)")


def files(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_two_fresh_demos_are_identical_byte_for_byte(tmp_path):
    writers = []  # both at once: each is one busy Python, and the machine has two cores
    for copy, hash_seed, threads in (("a", "1", "1"), ("b", "2", "2")):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, RAYON_NUM_THREADS=threads)
        writers.append(subprocess.Popen([sys.executable, "-c", WRITE, str(tmp_path / copy)], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for writer in writers:
        output, _ = writer.communicate(timeout=300)
        assert writer.returncode == 0, output[-3000:]
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for lang in ("en", "zh"):  # everything a run reads is there, in both languages
        assert {f"{lang}/train/captions.csv", f"{lang}/valid/captions.csv", f"{lang}/text/config.json",
                f"{lang}/text/model.safetensors", f"{lang}/valid/images/00575.jpg"} <= set(a)
    assert a[os.path.join("zh", "text", "vocab.txt")] != b"" and os.path.join("en", "text", "merges.txt") in a
    differ = [name for name in sorted(a) if a[name] != b[name]]
    assert not differ, differ


def test_writing_the_demo_leaves_the_callers_random_stream_alone(tmp_path):
    # train.py seeds, then writes the demo only when it is missing: its model must not depend on which
    torch.manual_seed(5)
    before = torch.get_rng_state()
    demo.write_text_model(str(tmp_path / "text"), ["a big red circle in the top left"] * 4, hidden=32, layers=1)
    assert torch.equal(torch.get_rng_state(), before)
    # and the weights come from the seed alone, not from the caller's stream
    torch.manual_seed(6)
    demo.write_text_model(str(tmp_path / "again"), ["a big red circle in the top left"] * 4, hidden=32, layers=1)
    demo.write_text_model(str(tmp_path / "seed1"), ["a big red circle in the top left"] * 4, hidden=32, layers=1,
                          seed=1)
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("text", "again", "seed1")}
    assert weights["text"] == weights["again"] != weights["seed1"]

