"""Decoding for the training crop (dataset.load_crop_source): reduced scale only where no crop loses resolution,
torchvision's decoder for full-size JPEGs, and a worker transform that crops without colour jitter."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dataset import PairDataset, image_transform
from engine.errors import DataError
from engine.images import CROP_RATIO, CROP_SCALE, crop_decode_size, load_crop_source, load_image
from tests.helpers import write_csv

SIZE = 224


def photo(width, height, seed=0):
    """Smooth colour fields with grain: decodes like a photo, and any upsampling would show."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                     Image.Resampling.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def decoded_size(image):
    return image.size if isinstance(image, Image.Image) else (image.shape[2], image.shape[1])


def smallest_crop_side(width, height):
    """The shortest side of any crop T.RandomResizedCrop can take from a width x height image: the least area at
    ratios from one bound to the other (log-spaced, as it draws them), rounded as torchvision rounds, where the
    crop fits; and the centre crop it falls back to."""
    area = width * height * CROP_SCALE[0]
    sides = []
    for ratio in np.geomspace(*CROP_RATIO, 101):
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if w <= width and h <= height:
            sides.append(min(w, h))
    aspect = width / height
    if aspect < CROP_RATIO[0]:
        sides.append(min(width, round(width / CROP_RATIO[0])))
    elif aspect > CROP_RATIO[1]:
        sides.append(min(height, round(height * CROP_RATIO[1])))
    else:
        sides.append(min(width, height))
    return min(sides)


# (width, height) -> the scale the rule must pick: the smallest that keeps every crop at >= 224 on its short side
CASES = {(640, 480): 1, (480, 640): 1, (500, 375): 1, (300, 200): 1, (1280, 960): 2, (2560, 1920): 4,
         (4000, 3000): 8, (3000, 800): 2}


@pytest.mark.parametrize("size,scale", CASES.items())
def test_no_training_crop_is_upsampled_because_of_draft_decoding(tmp_path, size, scale):
    path = tmp_path / "x.jpg"
    photo(*size).save(path, quality=90)
    image = load_crop_source(path, SIZE)
    width, height = decoded_size(image)
    assert (width, height) == (math.ceil(size[0] / scale), math.ceil(size[1] / scale))
    # no crop below 224 unless the full-size image has one too (300 x 200 is small to begin with)
    assert smallest_crop_side(width, height) >= min(SIZE, smallest_crop_side(*size))
    # one step further down (Pillow's next scale) would upsample some crops: the rule is not wasteful
    assert smallest_crop_side(math.ceil(size[0] / scale / 2), math.ceil(size[1] / scale / 2)) < SIZE
    # evaluation keeps its rule: the short side at >= 224 only, which is what fed upsampled training crops
    eval_size = load_image(path, SIZE).size
    if size == (640, 480):
        assert eval_size == (320, 240) and smallest_crop_side(*eval_size) == 170


def test_rule_on_the_usual_sizes():
    # 4:3 at any size: the smallest crop (area 0.5, ratio 3:4) has sqrt(0.5 * 0.75 * 4/3) = 0.707 of the short side
    assert crop_decode_size(640, 480, SIZE) == math.ceil(SIZE / math.sqrt(0.5)) == 317
    assert crop_decode_size(480, 640, SIZE) == 317
    assert crop_decode_size(1000, 1000, SIZE) == math.ceil(SIZE / math.sqrt(0.375)) == 366
    # very wide: every crop falls back to the full height, so the short side itself must stay at 224
    assert crop_decode_size(3000, 800, SIZE) == SIZE


def test_full_size_jpeg_comes_from_torchvision_with_pillows_pixels(tmp_path):
    path = tmp_path / "x.jpg"
    photo(640, 480).save(path, quality=90)
    image = load_crop_source(path, SIZE)
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape == (3, 480, 640)
    pillow = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
    assert torch.equal(image, pillow)


@pytest.mark.parametrize("mode,name", [("L", "g.jpg"), ("CMYK", "c.jpg"), ("RGB", "p.png"), ("RGBA", "a.png")])
def test_other_images_come_back_as_rgb_pil_images(tmp_path, mode, name):
    path = tmp_path / name
    photo(40, 30).convert(mode).save(path)
    image = load_crop_source(path, SIZE)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (40, 30)


def test_worker_transform_without_jitter_crops_as_before():
    # the same seed draws the same crop with and without jitter: only the colours differ
    img = photo(64, 48)
    torch.manual_seed(3)
    crop_only = T.Compose([image_transform(24, augment=True).transforms[0], T.PILToTensor()])(img)
    torch.manual_seed(3)
    got = image_transform(24, augment=True, jitter=False)(img)
    assert got.dtype == torch.uint8 and torch.equal(got, crop_only)
    # and on torchvision's uint8 tensors the crop is Pillow's resize within 1 level
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, H, W), a view of H, W, 3 as decoded
    torch.manual_seed(3)
    from_tensor = image_transform(24, augment=True, jitter=False)(tensor)
    assert from_tensor.shape == (3, 24, 24) and (from_tensor.int() - got.int()).abs().max() <= 1


def test_pair_dataset_with_random_crop(tmp_path):
    write_csv(tmp_path, [("a.jpg", "a red photo"), ("b.jpg", "broken"), ("c.jpg", "a big photo")])
    photo(640, 480).save(tmp_path / "images" / "a.jpg", quality=90)
    (tmp_path / "images" / "b.jpg").write_bytes(open(tmp_path / "images" / "a.jpg", "rb").read()[:5000])
    photo(1280, 960, seed=1).save(tmp_path / "images" / "c.jpg", quality=90)
    transform = image_transform(32, augment=True, jitter=False)
    data = PairDataset(str(tmp_path), transform, strict=False, min_size=32, random_crop=True)
    image, caption, _, skipped = data[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and skipped == 0
    image, caption, _, skipped = data[1]  # truncated JPEG: torchvision's decoder refuses it, the next row stands in
    assert skipped == 1 and caption == "a big photo" and image.shape == (3, 32, 32)
    strict = PairDataset(str(tmp_path), transform, strict=True, min_size=32, random_crop=True)
    with pytest.raises(DataError, match="cannot decode image .*b.jpg"):
        strict[1]
