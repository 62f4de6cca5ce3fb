"""Reader of the format Chinese-CLIP distributes MUGE, Flickr30k-CN and COCO-CN in: a folder with, per split,

  {split}_imgs.tsv     one image a line: image id, a tab, the image file's bytes in base64
  {split}_texts.jsonl  one text a line: {"text_id": 8428, "text": "...", "image_ids": [1076345, 517602]}

Each (image, text) pair becomes one row of captions.csv, so a text with two images gives two rows with the same
caption (evaluation groups identical captions into one query with several right images). Images are written as
<image id>.<ext>, the extension from the decoded image's format.

The TSV is streamed: a first pass reads it line by line and keeps, for each image a text refers to, only where its
base64 lies in the file (offset and length) once it has decoded and been recognised as an image; the images are
then read again one by one when they are written (tools.prepare_data.place_image). Memory stays flat however
large the TSV. Broken lines (no tab, a bad id, a repeated id, not JSON, missing fields), images that fail to decode
and images no text refers to are counted and the first few named in a warning; a text's image id that is not in
the TSV is a missing image (an error, or left out with --skip-missing, as for the other formats).
"""
import base64
import binascii
import io
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from tools.caption_sources import Item, fail, shown

ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # ids become file names: nothing else is accepted
MAX_LINE = 64 << 20  # bytes; a longer TSV line is broken (a missing newline), never read whole into memory
MAX_LISTED = 5
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


class Embedded(NamedTuple):
    """An image held in a TSV line: the base64 text at `offset`, `length` bytes long; offset None when the TSV has
    no image of that id."""
    tsv: str
    offset: object
    length: int
    label: str  # "<tsv> line N" or "<tsv> image ID", for messages

    def is_file(self):
        return self.offset is not None

    def __str__(self):
        return self.label


def read_embedded(src):
    """The image file's bytes from its TSV line."""
    with open(src.tsv, "rb") as f:
        f.seek(src.offset)
        data = f.read(src.length)
    return base64.b64decode(data, validate=True)


def warn_listed(what, listed, count=None):
    if listed:
        count = len(listed) if count is None else count
        print(f"warning: {count} {what} (first: {', '.join(listed[:MAX_LISTED])})", file=sys.stderr)


def text_image_id(value):
    # the JSONL writes ids as numbers, the TSV as text
    if type(value) is int and value >= 0:
        return str(value)
    if isinstance(value, str) and ID.fullmatch(value):
        return value
    raise ValueError(shown(value))


def read_texts(path):
    """[(text, [image id])] of a {split}_texts.jsonl; broken lines are counted, named and left out."""
    texts, broken = [], []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not (isinstance(record, dict) and isinstance(record.get("text"), str)
                            and isinstance(record.get("image_ids"), list)):
                        raise TypeError("needs 'text' and 'image_ids'")
                    texts.append((record["text"], [text_image_id(i) for i in record["image_ids"]]))
                except (ValueError, TypeError, RecursionError):  # not JSON, a 5000-digit number, deep nesting, a bad id
                    broken.append(f"line {number}")
    except FileNotFoundError:
        fail(f"{path} not found")
    except UnicodeDecodeError:
        fail(f"{path} is not a UTF-8 text file")
    warn_listed(f"broken line(s) in {path} are left out; each needs text and a list of image_ids", broken)
    return texts


def tsv_lines(path):
    """(line number, offset, bytes) of each line, or bytes None for a line longer than MAX_LINE (skipped)."""
    with open(path, "rb") as f:
        number, offset = 0, 0
        while True:
            line = f.readline(MAX_LINE + 1)
            if not line:
                return
            number += 1
            start = offset
            offset += len(line)
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # the rest of the line, a chunk at a time
                    line = f.readline(1 << 20)
                    offset += len(line)
                yield number, start, None
            else:
                yield number, start, line


def index_images(path, wanted):
    """{image id: (Embedded, extension)} of the images in `path` that `wanted` names and that decode to a known
    format, and the set of wanted ids whose image failed to decode."""
    index, failed, broken, undecodable, unused, unused_count = {}, set(), [], [], [], 0
    for number, offset, line in tsv_lines(path):
        where = f"line {number}"
        if line is None or b"\t" not in line:
            if line is None or line.strip():
                broken.append(where)
            continue
        raw_id, _, data = line.partition(b"\t")
        start = offset + len(raw_id) + 1  # where the base64 begins
        if number == 1 and raw_id.startswith(b"\xef\xbb\xbf"):  # a byte-order mark, as some editors save
            raw_id = raw_id[3:]
        image_id = raw_id.decode("ascii", "replace").strip()
        if not ID.fullmatch(image_id) or image_id in index or image_id in failed:
            broken.append(where)
            continue
        if image_id not in wanted:
            unused_count += 1
            if len(unused) < MAX_LISTED:
                unused.append(f"{where} (image {image_id})")
            continue
        data = data.rstrip(b"\r\n")
        try:
            with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
                ext = EXTENSIONS.get(image.format)
            if ext is None:
                raise ValueError(image.format)
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
            undecodable.append(f"{where} (image {image_id})")
            failed.add(image_id)
            continue
        index[image_id] = Embedded(str(path), start, len(data), f"{path} {where}"), ext
    warn_listed(f"broken line(s) in {path} are left out (no tab, an id that is not letters, digits, - or _, or "
                "an id seen before)", broken)
    warn_listed(f"image(s) in {path} failed to decode and are left out with their texts' pairs", undecodable)
    warn_listed(f"image(s) in {path} are in no text and are left out", unused, unused_count)
    return index, failed


def read_chinese_clip(folder, split):
    if not ID.fullmatch(split):
        fail(f"--split {shown(split)} is not a split name (letters, digits, - or _), e.g. train, valid or test")
    folder = Path(folder)
    tsv, jsonl = folder / f"{split}_imgs.tsv", folder / f"{split}_texts.jsonl"
    if not tsv.is_file() or not jsonl.is_file():
        found = sorted(p.name[:-len("_imgs.tsv")] for p in folder.glob("*_imgs.tsv")) if folder.is_dir() else []
        fail(f"{folder} has no {tsv.name} and {jsonl.name} (splits found: {', '.join(found) or 'none'}); pass the "
             "folder of a Chinese-CLIP dataset and one of its splits")
    texts = read_texts(jsonl)
    captions = {}  # image id -> its texts, in file order
    for text, image_ids in texts:
        for image_id in dict.fromkeys(image_ids):  # an id listed twice by one text is one pair
            captions.setdefault(image_id, []).append(text)
    index, failed = index_images(tsv, captions)
    items = []
    for image_id, caps in captions.items():
        if image_id in index:
            src, ext = index[image_id]
            items.append(Item(f"{image_id}.{ext}", src, caps))
        elif image_id not in failed:  # not in the TSV: missing, as a file would be
            items.append(Item(f"{image_id}.jpg", Embedded(str(tsv), None, 0, f"{tsv} image {image_id}"), caps))
    return items
