"""Decoding image files safely and cheaply: 8-bit RGB from any mode, reduced-scale JPEG decoding, and limits on
the work one file may cause.

A small file can describe a huge image (a 177-byte PNG of 1 x 100000 pixels; a 10000 x 10000 PNG that decodes to
300 MB). Every decode in the project goes through `open_image`, which reads the header first and refuses an image
whose decoded size or aspect ratio is over `ImageLimits`, before a single pixel is decoded: the resize that follows
scales the short side to the model's input, so a long thin image would otherwise blow up memory there too.
"""
import io
import math
from dataclasses import dataclass

from PIL import Image

from engine.errors import DataError

# The training crop (RandomResizedCrop): fraction of the image's area, and width / height of the crop.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ImageLimits:
    """The most work one image may cause: pixels after (reduced-scale) decoding, and long side / short side."""
    max_pixels: int = 40_000_000  # 40 MP: 120 MB of RGB; a 10000 x 10000 PNG is refused
    max_aspect_ratio: float = 20.0  # panoramas pass; a 1 x 100000 strip does not


DEFAULT_LIMITS = ImageLimits()


class ImageTooLarge(DataError):
    """An image whose decoded size or shape is over the configured limits."""


def check_size(width, height, limits, name):
    """Raise ImageTooLarge when a `width` x `height` decode would be over `limits`; `name` goes in the message."""
    if width < 1 or height < 1:
        raise ImageTooLarge(f"image {name} is {width}x{height} pixels: empty")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"image {name} is {width}x{height} = {width * height / 1e6:.1f} MP, over the "
                            f"{limits.max_pixels / 1e6:g} MP limit; shrink it or raise --max-image-pixels")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise ImageTooLarge(f"image {name} is {width}x{height}, an aspect ratio over {limits.max_aspect_ratio:g}; "
                            f"crop it or raise --max-aspect-ratio")


def load_image(path, min_size=None, limits=DEFAULT_LIMITS):
    """Open any image file as 8-bit RGB.

    `min_size` lets JPEG decoding run at a reduced scale (1/2, 1/4, 1/8) while the short side stays at least
    that many pixels: the resize that follows would throw those pixels away anyway.
    """
    img = Image.open(path)  # reads the header only
    check_size(*decode_size(img, min_size), limits, _name(path))
    return to_rgb(img)


def decode_size(img, min_size=None):
    """The (width, height) that decoding the opened (header-only) `img` will produce: a JPEG is set to decode at
    the smallest scale (1/2, 1/4, 1/8) that keeps its short side at least `min_size`. The limits apply to this
    size, the same for a file and an upload."""
    if min_size and img.format == "JPEG":
        img.draft("RGB", (min_size, min_size))
    return img.size


def crop_decode_size(width, height, image_size, scale=CROP_SCALE, ratio=CROP_RATIO):
    """The short side a `width` x `height` image must keep when decoded at a reduced scale so that the smallest
    training crop still has `image_size` pixels on its short side, and is never upsampled because of the scale.

    A crop of area A and aspect ratio r has the short side sqrt(A * min(r, 1/r)), smallest at the least area
    and the most elongated ratio. A crop that does not fit is redrawn, and after ten misses RandomResizedCrop
    takes a centre crop as tall (or wide) as the image; no crop is shorter than the image's own short side.
    Decoding scales both sides alike, so the short side must grow by image_size / (smallest crop's short side).
    """
    short = min(width, height)
    smallest_crop = min(short, math.sqrt(scale[0] * width * height * min(ratio[0], 1 / ratio[1])))
    return math.ceil(image_size * short / smallest_crop)


def load_crop_source(path, image_size, limits=DEFAULT_LIMITS):
    """A training image for the random crop to `image_size`: 8-bit RGB at the smallest decoding scale that keeps
    every crop at full resolution (`crop_decode_size`).

    A JPEG that needs its full size is decoded by torchvision's libjpeg-turbo decoder straight into uint8
    (3, H, W), faster than Pillow (same pixels); a JPEG that may be reduced goes through Pillow's draft mode
    (1/2, 1/4, 1/8), which beats a full decode; other formats and non-RGB JPEGs (grayscale, CMYK) come back as
    PIL images through `to_rgb`. The training transform takes both.
    """
    if hasattr(path, "read"):  # an in-memory file (a shard member, an upload)
        data = path.read()
    else:
        with open(path, "rb") as f:
            data = f.read()  # once, for Pillow's header and for whichever decoder runs
    img = Image.open(io.BytesIO(data))  # parses the header only
    if img.format != "JPEG":
        check_size(*img.size, limits, _name(path))
        return to_rgb(img)
    full = img.size
    check_size(*full, limits, _name(path))  # the shape first: crop_decode_size divides by the short side
    side = crop_decode_size(*full, image_size)
    img.draft("RGB", (side, side))
    if img.size == full and img.mode == "RGB":
        import torch  # here, not at the top: the entries' option parsing imports this file before torch loads
        from torchvision.io import decode_jpeg

        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # (3, H, W) uint8
    return to_rgb(img)


def to_rgb(img):
    """Any PIL image as 8-bit RGB: transparency over white, 16-bit grayscale scaled down, CMYK converted."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: scale to 8 bits before RGB
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


class MetadataTooLarge(DataError):
    """An image whose metadata is over Pillow's limits: its pixels may be fine, so "corrupt" would mislead."""

    def __init__(self, name, problem):
        super().__init__(f"image {name} {problem}")
        self.problem = problem


def metadata_over_limit(error):
    """A message when `error` is Pillow refusing metadata over its limits (a PNG text chunk over
    PngImagePlugin.MAX_TEXT_CHUNK): the pixels may be fine, so "corrupt" would mislead. Else None."""
    text = str(error)
    if isinstance(error, ValueError) and ("MAX_TEXT" in text or "text chunk" in text):
        return "holds metadata (a PNG text chunk) over Pillow's size limit; save it again without its metadata"
    return None


def _name(path):
    return path if isinstance(path, str) else getattr(path, "name", "in memory")


def open_image(path, strict, min_size=None, random_crop=False, limits=DEFAULT_LIMITS):
    """Decode an image file (a path or a binary file object) as 8-bit RGB, within `limits`.

    `min_size` allows reduced-scale JPEG decoding down to that short side; `random_crop` decodes for the training
    crop instead (`load_crop_source`). A file that cannot be decoded, or is over the limits, is a DataError when
    `strict`, else None (training skips it and counts it).
    """
    try:
        if random_crop:
            return load_crop_source(path, min_size, limits)  # decoded already
        image = load_image(path, min_size, limits)
        image.load()
        return image
    except DataError:
        if strict:
            raise
        return None
    except (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as e:
        # RuntimeError: torchvision's JPEG decoder on a corrupt or truncated file
        if strict:
            problem = metadata_over_limit(e)
            if problem:
                raise MetadataTooLarge(_name(path), problem) from None
            raise DataError(f"cannot decode image {path}: {e}; replace or remove it") from None
        return None


