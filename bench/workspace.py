"""What every benchmark stands on: interleaved timing, and generated inputs (COCO-like JPEGs, demo captions, a
small random text model), made in a temporary folder so nothing is downloaded."""
import itertools
import os
import random
import time

import numpy as np
import torch
from PIL import Image

from tools.demo import all_scenes, distinct_captions, write_captions_csv

MAX_LENGTH = 64  # configs/train.yaml's caption length, capped by the model like train.py does

# ---------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cycle(fn, items):
    """A no-argument function that calls `fn` on the next item, round and round."""
    it = itertools.cycle(items)
    return lambda: fn(next(it))


def alternate(fns, repeats, device, warmup=1):
    """Seconds per call of each function, interleaved round by round (the order rotating, so none always goes
    first); `warmup` untimed rounds before."""
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times



# ---------------------------------------------------------------- generated data

def make_photo(rng, width=640, height=480):
    """Smooth random colour fields and blobs plus sensor-like grain: compresses like a photo, not a flat colour."""
    def field(h, w, amount):
        coarse = rng.uniform(0, 255, (h, w, 3)).astype(np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        return amount * (np.asarray(smooth, dtype=np.float32) - 128)
    pixels = 128 + field(6, 8, 1.0) + field(48, 64, 0.35) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


class Workspace:
    """Generated inputs, made on first use in a temporary folder: COCO-like JPEGs, captions, a text model."""

    def __init__(self, folder, images, captions_per_image, text_model, text_size, seed=0):
        self.folder, self.images, self.per_image = folder, images, captions_per_image
        self.rng = random.Random(seed)
        # the demo's caption generator, `captions_per_image` different captions of a random scene per image
        scenes = all_scenes()
        self.captions = [c for _ in range(images)
                         for c in distinct_captions(self.rng.choice(scenes), captions_per_image, self.rng)]
        self._text_model, self.text_size = text_model, text_size
        self._photos = self._resized = None

    @property
    def photos(self):
        """Dataset folder of 640x480 JPEGs (quality 90) with `captions_per_image` captions each."""
        if self._photos is None:
            self._photos = os.path.join(self.folder, "photos")
            np_rng = np.random.default_rng(self.rng.randrange(2**32))
            self._write(self._photos, lambda i, path: make_photo(np_rng).save(path, quality=90))
        return self._photos

    @property
    def resized(self):
        """The same images with the short side at 256, as `python -m tools.prepare_data --resize 256` writes them."""
        if self._resized is None:
            self._resized = os.path.join(self.folder, "resized256")
            source = self.photos

            def shrink(i, path):
                with Image.open(os.path.join(source, "images", f"{i:05d}.jpg")) as img:
                    w, h = img.size
                    new = (256, round(h * 256 / w)) if w <= h else (round(w * 256 / h), 256)
                    img.convert("RGB").resize(new, Image.Resampling.BICUBIC).save(path, quality=90)
            self._write(self._resized, shrink)
        return self._resized

    def _write(self, root, save):
        os.makedirs(os.path.join(root, "images"))
        for i in range(self.images):
            save(i, os.path.join(root, "images", f"{i:05d}.jpg"))
        write_captions_csv(os.path.join(root, "captions.csv"),
                           [(f"{i // self.per_image:05d}.jpg", c) for i, c in enumerate(self.captions)])

    @property
    def text_label(self):
        if self._text_model is None or self._text_model.startswith(self.folder):
            return "random RoBERTa (hidden {}, {} layers)".format(*self.text_size)
        return self._text_model

    @property
    def text_model(self):
        """The text model folder: the one asked for, else a small random RoBERTa made here."""
        if self._text_model is None:
            from tools.demo import write_text_model
            self._text_model = os.path.join(self.folder, "text-model")
            hidden, layers = self.text_size
            write_text_model(self._text_model, self.captions, hidden=hidden, layers=layers)
        return self._text_model


def build(ws, image_model, device):
    """The model (random weights) with configs/train.yaml's settings, its tokenizer and caption length limit."""
    from model import build_model
    cfg = {"image-model": image_model, "text-model": ws.text_model, "load-pretrained": False, "temperature": 0.07,
           "learnable-temperature": False, "text-pooling": "first", "weight-decay": 0.05, "learning-rate": 5e-6,
           "warmup-steps": 1000, "use-amp": False, "amp-dtype": "float16", "grad-clip": 1.0}
    model = build_model(cfg, pretrained=False).to(device).to(memory_format=torch.channels_last)
    tokenizer, max_length = text_setup(ws)
    return model, tokenizer, max_length, cfg


def text_setup(ws):
    """Tokenizer and caption length limit, as train.py sets them up (max-length 64, capped by the model)."""
    from transformers import AutoConfig

    from model import load_tokenizer, text_length_limit
    tokenizer = load_tokenizer(ws.text_model)  # first: a wrong path becomes a one-line ModelError
    limit = text_length_limit(AutoConfig.from_pretrained(ws.text_model))
    return tokenizer, min(MAX_LENGTH, limit)
