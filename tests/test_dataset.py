import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dataset import DataError, PairCollate, PairDataset, image_transform, normalize, read_captions
from engine.images import load_image
from model import IMAGENET_MEAN, IMAGENET_STD, load_tokenizer
from tests.helpers import write_csv


def save(img, root, name, **kw):
    img.save(os.path.join(root, "images", name), **kw)


def test_missing_column_is_a_clear_error(tmp_path):
    write_csv(tmp_path, [("a.jpg", "x")], header=("file", "caption"))
    with pytest.raises(DataError,
                       match=r"must have the header 'filename,caption' \(each column once\), found file,caption"):
        read_captions(str(tmp_path))


def test_missing_csv_says_what_is_expected(tmp_path):
    with pytest.raises(DataError, match="captions.csv not found"):
        read_captions(str(tmp_path))


def test_missing_images_are_counted_and_named(tmp_path):
    write_csv(tmp_path, [("here.jpg", "a"), ("gone1.jpg", "b"), ("gone2.jpg", "c"), ("gone1.jpg", "d")])
    save(Image.new("RGB", (8, 8)), tmp_path, "here.jpg")
    with pytest.raises(DataError, match=r"2 image\(s\) listed .* are missing .*first: gone1.jpg, gone2.jpg"):
        read_captions(str(tmp_path))


def test_empty_captions_are_dropped_with_a_warning(tmp_path):
    write_csv(tmp_path, [("a.jpg", "  a dog  "), ("a.jpg", "   "), ("a.jpg", "")])
    save(Image.new("RGB", (8, 8)), tmp_path, "a.jpg")
    with pytest.warns(UserWarning, match=r"dropped 2 row\(s\) with an empty caption"):
        pairs = read_captions(str(tmp_path))
    assert pairs == [("a.jpg", "a dog")]


@pytest.mark.parametrize("mode,kw", [("L", {}), ("CMYK", {}), ("I;16", {"format": "PNG"}),
                                     ("P", {"format": "PNG"}), ("RGBA", {"format": "PNG"})])
def test_any_image_mode_loads_as_rgb(tmp_path, mode, kw):
    os.makedirs(tmp_path / "images")
    img = Image.new(mode, (20, 10), 200 if mode in ("L", "P") else None)
    name = "x.png" if kw else "x.jpg"
    save(img, tmp_path, name, **kw)
    out = load_image(tmp_path / "images" / name)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_transparent_pixels_become_white(tmp_path):
    os.makedirs(tmp_path / "images")
    save(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), tmp_path, "t.png")
    assert load_image(tmp_path / "images" / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_eval_transform_keeps_aspect_ratio():
    # 64x32: a red strip on the left quarter. Short side -> 32, centre crop 32 keeps x in [16, 48): all blue.
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 32))
    x = normalize(image_transform(32)(img)[None])[0]
    assert x.shape == (3, 32, 32)
    # Normalised red channel of pure blue is (0 - 0.485) / 0.229; a squashed image would keep red pixels.
    assert torch.allclose(x[0], torch.full((32, 32), (0 - 0.485) / 0.229), atol=1e-4)


@pytest.mark.parametrize("augment", [False, True])
def test_uint8_transform_then_normalize_equals_the_float_transform(augment):
    # The float pipeline the loaders used to run in the workers: same geometry, then ToTensor + Normalize.
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8))
    if augment:
        geometry = [T.RandomResizedCrop(24, scale=(0.5, 1.0), antialias=True),
                    T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)]
    else:
        geometry = [T.Resize(24, antialias=True), T.CenterCrop(24)]
    old = T.Compose([*geometry, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(1)  # the same random crop and jitter for both
    want = old(img)
    torch.manual_seed(1)
    pixels = image_transform(24, augment)(img)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 24)
    assert torch.allclose(normalize(pixels), want, atol=1e-5, rtol=0)
    batch = torch.stack([pixels, pixels]).contiguous(memory_format=torch.channels_last)  # (2, 3, 24, 24)
    x = normalize(batch)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[1], want, atol=1e-5, rtol=0)


def test_normalize_refuses_float_images():
    with pytest.raises(TypeError, match="expects the uint8 images"):
        normalize(torch.zeros(1, 3, 4, 4))


def test_corrupt_image_is_skipped_in_training_and_an_error_in_eval(tiny_data, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(tiny_data / "valid", root)
    bad = sorted(os.listdir(root / "images"))[0]
    (root / "images" / bad).write_bytes(b"this is not a jpeg")
    train_set = PairDataset(str(root), image_transform(16), strict=False)
    first = [i for i, (n, _) in enumerate(train_set.pairs) if n == bad][0]
    with pytest.warns(UserWarning, match=f"training skips an image: cannot decode image .*{bad}"):
        image, caption, image_id, skipped = train_set[first]  # the skip names the file
    assert skipped == 1 and caption == train_set.pairs[first + 1][1]  # the next pair took its place
    with pytest.raises(DataError, match=f"cannot decode image .*{bad}"):
        PairDataset(str(root), image_transform(16), strict=True)[first]


def test_collate_pads_to_the_longest_caption_in_the_batch(tiny_data):
    tok = load_tokenizer(str(tiny_data / "text"))
    collate = PairCollate(tok, max_length=32)
    img = torch.zeros(3, 8, 8)
    short = collate([(img, "red circle", 0, 0), (img, "a blue star", 1, 0)])
    long = collate([(img, "red circle", 0, 0), (img, "there is a huge red circle at the top left", 1, 1)])
    n_short = len(tok("a blue star")["input_ids"])
    assert short["input_ids"].shape == (2, n_short)
    assert long["input_ids"].shape[1] == len(tok("there is a huge red circle at the top left")["input_ids"])
    assert long["attention_mask"][0].sum() == len(tok("red circle")["input_ids"])
    assert long["skipped"] == 1 and long["image_ids"].tolist() == [0, 1]
    truncated = PairCollate(tok, max_length=4)([(img, "there is a huge red circle at the top left", 0, 0)])
    assert truncated["input_ids"].shape == (1, 4)


def test_same_file_gets_same_image_id(tiny_data):
    ds = PairDataset(str(tiny_data / "train"), transform=None)
    by_name = {}
    for (name, _), i in zip(ds.pairs, ds.image_ids, strict=True):
        assert by_name.setdefault(name, i) == i
    assert len(by_name) == 24 and len(ds) == 48
