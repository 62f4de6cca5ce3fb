"""The built-in demo: a synthetic captioned image set and a tiny text encoder, made locally in seconds.

Each image holds one shape of some colour and size at one of nine places on a noisy background; its captions
say all four in different words ("a big red circle in the top left", "upper left: large red circle"), in English
or in Chinese ("左上角有一个大的红色圆形"). The validation split has every combination exactly once, so a perfect
model reaches recall 1 and every caption has exactly one right image. The text encoder is a 2-layer transformer
(hidden size 128) with a tokenizer trained on the training captions: RoBERTa with byte-level BPE for English, BERT
with WordPiece for Chinese (one token per character, as Chinese BERTs split it), saved in the ordinary Hugging Face
folder format so the real loading code reads it.

Everything is drawn from `seed` alone, so two fresh runs write the same bytes (tests/test_demo_determinism.py).

`python -m tools.demo` writes it; `train.py` does the same on its own when a config sets `demo-data: true` and
the folders are absent. The benchmarks draw their captions from here too.
"""
import argparse
import csv
import itertools
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from engine.files import atomic_write

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 230), "yellow": (240, 215, 40),
           "purple": (140, 60, 190), "orange": (250, 140, 30), "white": (250, 250, 250), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.16, "large": 0.28}  # radius as a fraction of the image side
PLACES = {(r, c): name for (r, c), name in zip(itertools.product(range(3), range(3)), (
    "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"), strict=True)}

# Ways of saying the same thing, so the text tower has to learn meanings rather than strings.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
PLACE_WORDS = {"top left": ("top left", "upper left"), "top": ("top", "top middle"),
               "top right": ("top right", "upper right"), "left": ("left", "middle left"),
               "centre": ("centre", "middle"), "right": ("right", "middle right"),
               "bottom left": ("bottom left", "lower left"), "bottom": ("bottom", "bottom middle"),
               "bottom right": ("bottom right", "lower right")}
TEMPLATES = ("a {size} {colour} {shape} in the {place}",
             "{place}: a {size} {colour} {shape}",
             "there is a {size} {colour} {shape} at the {place}",
             "{colour} {shape}, {size}, {place}",
             "a picture of a {size} {shape} coloured {colour} in the {place}")

# The same scenes in Chinese: each word with its synonyms, and templates that order them differently.
SIZE_WORDS_ZH = {"small": ("小", "很小", "小小"), "large": ("大", "很大", "巨大")}
COLOUR_WORDS_ZH = {"red": ("红色", "红"), "green": ("绿色", "绿"), "blue": ("蓝色", "蓝"), "yellow": ("黄色", "黄"),
                   "purple": ("紫色", "紫"), "orange": ("橙色", "橙"), "white": ("白色", "白"),
                   "black": ("黑色", "黑")}
SHAPE_WORDS_ZH = {"circle": ("圆形", "圆"), "square": ("正方形", "方块"), "triangle": ("三角形", "三角"),
                  "star": ("星形", "星星")}
PLACE_WORDS_ZH = {"top left": ("左上角", "左上方"), "top": ("上方", "上边中间"), "top right": ("右上角", "右上方"),
                  "left": ("左边", "左侧"), "centre": ("中间", "正中"), "right": ("右边", "右侧"),
                  "bottom left": ("左下角", "左下方"), "bottom": ("下方", "下边中间"),
                  "bottom right": ("右下角", "右下方")}
TEMPLATES_ZH = ("{place}有一个{size}的{colour}{shape}",
                "{place}：一个{size}的{colour}{shape}",
                "图片的{place}是一个{size}的{colour}{shape}",
                "{colour}{shape}，{size}，在{place}",
                "一个{size}{shape}，颜色是{colour}，位于{place}")
LANGUAGES = ("en", "zh")

IMAGE_SIDE = 96


def all_scenes():
    return list(itertools.product(COLOURS, SHAPES, SIZES, PLACES.values()))


def caption(scene, rng, language="en"):
    colour, shape, size, place = scene
    if language == "zh":
        return rng.choice(TEMPLATES_ZH).format(size=rng.choice(SIZE_WORDS_ZH[size]),
                                               colour=rng.choice(COLOUR_WORDS_ZH[colour]),
                                               shape=rng.choice(SHAPE_WORDS_ZH[shape]),
                                               place=rng.choice(PLACE_WORDS_ZH[place]))
    return rng.choice(TEMPLATES).format(size=rng.choice(SIZE_WORDS[size]), colour=colour, shape=shape,
                                        place=rng.choice(PLACE_WORDS[place]))


def distinct_captions(scene, count, rng, language="en", tries=50):
    """`count` different captions of one scene (a repeated row would be dropped as a duplicate when read)."""
    out = []
    for _ in range(tries * count):
        c = caption(scene, rng, language)
        if c not in out:
            out.append(c)
        if len(out) == count:
            break
    return out


def draw(scene, rng):
    colour, shape, size, place = scene
    side = IMAGE_SIDE
    base = np.array([rng.randint(110, 170)] * 3, dtype=np.float32)
    pixels = base + np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (side, side, 3))
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    row, col = next(rc for rc, name in PLACES.items() if name == place)
    r = SIZES[size] * side * rng.uniform(0.9, 1.1)
    # Centre somewhere inside the cell, keeping the whole shape in the picture.
    cx = min(max((col + rng.uniform(0.3, 0.7)) * side / 3, r), side - r)
    cy = min(max((row + rng.uniform(0.3, 0.7)) * side / 3, r), side - r)
    pen = ImageDraw.Draw(img)
    fill = tuple(int(v + rng.randint(-15, 15)) for v in COLOURS[colour])
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        pen.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:  # a five-pointed star: outer and inner points alternate
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * np.sin(k * np.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * np.cos(k * np.pi / 5)) for k in range(10)]
        pen.polygon(pts, fill=fill)
    return img


def write_split(root, scenes, captions_per_image, rng, language="en"):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i, scene in enumerate(scenes):
        name = f"{i:05d}.jpg"
        draw(scene, rng).save(os.path.join(root, "images", name), quality=90)
        rows += [(name, c) for c in distinct_captions(scene, captions_per_image, rng, language)]
    write_captions_csv(os.path.join(root, "captions.csv"), rows)  # written last: it marks a finished split
    return rows


def write_captions_csv(path, rows):
    """(filename, caption) rows as a captions.csv, atomically."""
    def write(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["filename", "caption"])
        w.writerows(rows)
    atomic_write(path, write)


def write_text_model(folder, captions, language="en", hidden=128, layers=2, max_tokens=32, seed=0):
    """A tiny random encoder and a tokenizer trained on `captions`, as a Hugging Face folder: RoBERTa with
    byte-level BPE for English, BERT with WordPiece for Chinese. Its weights are drawn from `seed` alone."""
    import torch
    from transformers import AutoTokenizer

    os.makedirs(folder, exist_ok=True)
    if language == "zh":
        from tokenizers import BertWordPieceTokenizer
        from transformers import BertConfig
        from transformers import BertModel as Encoder

        # Chinese characters are split off one by one before training, as in Chinese BERTs; lowercase and
        # accent stripping would only touch Latin text, which these captions do not have
        trainer = BertWordPieceTokenizer(handle_chinese_chars=True, lowercase=False, strip_accents=False)
        trainer.train_from_iterator(captions, vocab_size=400, min_frequency=1, show_progress=False)
        trainer.save_model(folder)  # vocab.txt
        config = BertConfig(vocab_size=trainer.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=2, intermediate_size=hidden * 2,
                            max_position_embeddings=max_tokens, pad_token_id=0)
    else:
        from tokenizers import ByteLevelBPETokenizer
        from transformers import RobertaConfig
        from transformers import RobertaModel as Encoder

        trainer = ByteLevelBPETokenizer()
        trainer.train_from_iterator(captions, vocab_size=400, min_frequency=1, show_progress=False,
                                    special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        trainer.save_model(folder)  # vocab.json + merges.txt
        # RoBERTa's positions start after the padding index, hence two more than the tokens
        config = RobertaConfig(vocab_size=trainer.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=2, intermediate_size=hidden * 2,
                               max_position_embeddings=max_tokens + 2, pad_token_id=1, bos_token_id=0,
                               eos_token_id=2)
    config.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)  # reads the trained vocabulary through the real path
    tokenizer.save_pretrained(folder)
    # A forked generator: the weights do not depend on what the caller drew before, and the caller's stream is
    # left as it was, so train.py builds the same model whether or not this run wrote the demo.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Encoder(config, add_pooling_layer=False).save_pretrained(folder)


def make_demo(train_root, valid_root, text_model, train_images=3000, captions_per_image=3, seed=0,
              language="en"):
    """Write whatever of the demo is missing, with captions in `language` (en or zh); return what was written
    (empty when all of it was there). Validation holds each of the 576 scenes once."""
    if language not in LANGUAGES:
        raise ValueError(f"demo language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    rng = random.Random(seed)
    scenes = all_scenes()
    train_rows, written = None, []
    if not os.path.isfile(os.path.join(train_root, "captions.csv")):
        train_rows = write_split(train_root, [rng.choice(scenes) for _ in range(train_images)],
                                 captions_per_image, rng, language)
        print(f"demo: wrote {len(train_rows)} training pairs to {train_root}")
        written.append(train_root)
    if not os.path.isfile(os.path.join(valid_root, "captions.csv")):
        rows = write_split(valid_root, scenes, 1, random.Random(seed + 1), language)
        print(f"demo: wrote {len(rows)} validation pairs to {valid_root}")
        written.append(valid_root)
    if not os.path.isfile(os.path.join(text_model, "config.json")):
        if train_rows is None:
            from dataset import read_captions_csv  # here, not at the top: dataset loads torch and transformers
            train_rows = [values for _, values in read_captions_csv(os.path.join(train_root, "captions.csv"))]
        write_text_model(text_model, [c for _, c in train_rows], language, seed=seed)
        print(f"demo: wrote a tiny text encoder and tokenizer to {text_model}")
        written.append(text_model)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-root", default="datasets/demo/train", help="training split folder to write")
    p.add_argument("--valid-root", default="datasets/demo/valid", help="validation split folder to write")
    p.add_argument("--text-model", default="pretrains/demo-text", help="folder for the tiny text encoder")
    p.add_argument("--train-images", type=int, default=3000, help="training images (3 captions each)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--language", choices=LANGUAGES, default="en", help="language of the captions")
    a = p.parse_args(argv)
    if a.train_images < 1:
        p.error("--train-images must be at least 1")
    if not make_demo(a.train_root, a.valid_root, a.text_model, a.train_images, seed=a.seed, language=a.language):
        print(f"demo: nothing to write, the demo data already exists: training split in {a.train_root}, "
              f"validation split in {a.valid_root}, text model in {a.text_model} (delete a folder to write it "
              f"again)")


if __name__ == "__main__":
    main()
